//! Small utilities with one home each, shared by the modules above them and by the tests and the benchmark.
//! Imports nothing of the crate but its own modules.
//!
//! - [`atomic_file`]: replace a small file whole, directory fsync included.
//! - [`hex`]: lowercase hex.
//! - [`io_context`]: IO errors that name the operation and the path.
//! - [`process`]: signals to children and the parent-death signal.
//! - [`random`]: random bytes from the kernel.

pub mod atomic_file;
pub mod hex;
pub mod io_context;
pub mod process;
pub mod random;
