//! Rebuilds the crate when a migration is added or changed, since the SQL files are embedded at build time.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
