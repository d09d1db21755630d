//! Small utilities with one home each, shared by the modules above them and by the tests and the benchmark.
//!
//! - [`process`]: signals to children and the parent-death signal.

pub mod process;
