//! The stop sequence: stop taking updates (503), let in-flight requests finish, close the queues, let the
//! writers write everything they were given, and report what, if anything, could not be written in time.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::info;

/// What the stop achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownOutcome {
    /// Accepted updates that were not written before the shutdown timeout (0 for a clean stop).
    pub unwritten: usize,
    pub elapsed: Duration,
}

impl ShutdownOutcome {
    pub fn is_clean(&self) -> bool {
        self.unwritten == 0
    }
}

/// Resolves at the first SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process can only be killed; never resolving keeps it serving.
        tracing::error!("could not install the SIGTERM/SIGINT handlers; the gateway can only be killed");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(
        signal = name,
        "stop requested: no more updates are taken, accepted ones are being written"
    );
}

/// Waits until every thread has finished or `deadline` has passed; returns whether all finished.
/// Polls with async sleeps so that the HTTP runtime it runs on is not blocked.
pub async fn wait_for_threads(threads: &[JoinHandle<()>], deadline: Instant) -> bool {
    loop {
        if threads.iter().all(JoinHandle::is_finished) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
