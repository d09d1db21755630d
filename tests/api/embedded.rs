//! The embedded PostgreSQL as other programs drive it: its process, its version and its temporary directory.

use std::path::Path;

use ingest_gateway::db::EmbeddedPostgres;

#[test]
fn a_throwaway_server_names_its_process_and_version_and_removes_its_directory_after_stopping() {
    let mut server = EmbeddedPostgres::start_ephemeral_crash_safe().expect("start PostgreSQL");
    let pid = server.pid().expect("a running server has a process");
    assert!(Path::new(&format!("/proc/{pid}/stat")).exists());
    let version = server.version().expect("postgres --version runs");
    assert!(version.contains("PostgreSQL"), "{version}");

    let dir = server
        .temp_dir()
        .expect("a throwaway server has a directory")
        .to_owned();
    let canonical = dir.canonicalize().expect("the directory exists");
    assert!(server.data_dir().starts_with(&canonical));
    std::fs::write(dir.join("scratch.log"), "kept with the server").expect("a caller may write there");

    server.stop();
    assert_eq!(server.pid(), None);
    assert!(dir.exists(), "a stopped server keeps its directory until it is dropped");
    drop(server);
    assert!(!dir.exists());
}
