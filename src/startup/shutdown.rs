//! The stop sequence: stop taking updates (503), let in-flight requests finish, close the queues, let the
//! writers write everything they were given (logging their progress while that takes long), and report what, if
//! anything, could not be written in time.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::progress::{seconds_left, Meter};
use super::streams::StreamHandle;
use crate::intake::{Drain, Gate};
use crate::wal::Wal;

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

/// Waits until every thread of `threads` has ended or `deadline` has passed; returns whether all ended.
///
/// A watcher thread joins them one after the other and then sends on a channel, so the stop wakes when the last
/// one ends rather than looking every few milliseconds; the HTTP runtime it awaits on is never blocked. Past the
/// deadline the watcher is left behind, detached: a thread still writing does not hold up the process's exit.
async fn wait_for_threads(threads: Vec<JoinHandle<()>>, deadline: Instant) -> bool {
    let (ended, all_ended) = tokio::sync::oneshot::channel::<()>();
    let watcher = std::thread::Builder::new().name("stop-watcher".into()).spawn(move || {
        // A thread that panicked has ended too; its panic was reported where it happened.
        for thread in threads {
            let _ = thread.join();
        }
        let _ = ended.send(());
    });
    if let Err(e) = watcher {
        // Without a watcher nobody can say that the threads ended: the stop treats them as not done in time.
        warn!(error = %e, "could not start the thread that waits for the writers");
        return false;
    }
    // A closed channel without a message means the watcher itself ended early: not proof that the threads did.
    matches!(tokio::time::timeout_at(deadline.into(), all_ended).await, Ok(Ok(())))
}

/// What is left to write, over every stream.
#[derive(Debug, Clone, Copy)]
struct DrainFigures {
    /// Updates committed since the start of the process.
    written: u64,
    /// Updates in the queues, not yet committed.
    queued: u64,
    /// Bytes of log not yet read back into the queues.
    backlog_bytes: u64,
}

fn drain_figures(drains: &[Arc<dyn Drain>]) -> DrainFigures {
    drains.iter().fold(
        DrainFigures {
            written: 0,
            queued: 0,
            backlog_bytes: 0,
        },
        |sum, s| DrainFigures {
            written: sum.written + s.written(),
            queued: sum.queued + s.queued() as u64,
            backlog_bytes: sum.backlog_bytes + s.backlog_bytes(),
        },
    )
}

/// Logs, every `interval`, how the writing of what was accepted goes; never returns (the stop drops it once the
/// writers are done or the deadline passed).
async fn report_drain(drains: &[Arc<dyn Drain>], deadline: Instant, interval: Duration) -> Infallible {
    let start = drain_figures(drains);
    let now = Instant::now();
    if start.queued > 0 || start.backlog_bytes > 0 {
        info!(
            updates_left = start.queued,
            backlog_bytes = start.backlog_bytes,
            timeout_left_s = deadline.saturating_duration_since(now).as_secs(),
            "stopping: writing what was accepted"
        );
    }
    let mut updates = Meter::new(start.written, now);
    // The backlog only shrinks during a stop (nothing new is logged), so what it lost is what was read back.
    let mut read_back = Meter::new(0, now);
    loop {
        tokio::time::sleep(interval).await;
        let now = Instant::now();
        let figures = drain_figures(drains);
        let updates_per_s = updates.rate(figures.written, now);
        let bytes_per_s = read_back.rate(start.backlog_bytes.saturating_sub(figures.backlog_bytes), now);
        // The queued updates at the writers' pace, plus the backlog at the pace it is read back; unknown while
        // either stands still.
        let eta_s = match (
            seconds_left(figures.queued, updates_per_s),
            seconds_left(figures.backlog_bytes, bytes_per_s),
        ) {
            (Some(queue), Some(backlog)) => Some(queue + backlog),
            _ => None,
        };
        info!(
            updates_written = figures.written.saturating_sub(start.written),
            updates_left = figures.queued,
            backlog_bytes = figures.backlog_bytes,
            updates_per_s = updates_per_s.round() as u64,
            eta_s,
            timeout_left_s = deadline.saturating_duration_since(now).as_secs(),
            "stopping: writing accepted updates"
        );
    }
}

/// Runs the whole stop: the gate closes (new submissions get 503), `stop_transports` lets the requests in flight
/// finish, the log writes its last group, each stream's feed queues its backlog, the queues close and the writers
/// write what they hold, with their progress logged every `progress_interval`. Past `timeout`, the writers give
/// up and whatever is left stays in the log (if any).
pub async fn stop(
    gate: &Gate,
    stop_transports: impl Future<Output = ()>,
    wal: Option<&Wal>,
    streams: Vec<StreamHandle>,
    timeout: Duration,
    progress_interval: Duration,
) -> ShutdownOutcome {
    let started = Instant::now();
    let deadline = started + timeout;
    // 1. Stop taking updates; requests already past the gate finish and may still queue theirs.
    gate.close();
    stop_transports.await;
    // 2. Nothing more can arrive: the log writes its last group, the feeds queue their backlog.
    if let Some(wal) = wal {
        wal.close();
    }
    let mut drains = Vec::with_capacity(streams.len());
    let mut feeds = Vec::with_capacity(streams.len());
    let mut writers = Vec::new();
    for stream in streams {
        stream.drain.close_input();
        drains.push(stream.drain);
        feeds.push(stream.feed);
        writers.extend(stream.writers);
    }
    let drained = async {
        let fed = wait_for_threads(feeds, deadline).await;
        // 3. Closing the queues before the feeds are done would strand the backlog; a timed-out stop leaves it in
        //    the log for the next start.
        for drain in &drains {
            drain.close_queue();
        }
        fed && wait_for_threads(writers, deadline).await
    };
    let finished = tokio::select! {
        finished = drained => finished,
        never = report_drain(&drains, deadline, progress_interval) => match never {},
    };
    if !finished {
        for drain in &drains {
            drain.abandon();
        }
    }
    let unwritten = drains.iter().map(|d| d.unwritten()).sum();
    let outcome = ShutdownOutcome {
        unwritten,
        elapsed: started.elapsed(),
    };
    if finished && unwritten == 0 {
        info!(
            elapsed_ms = outcome.elapsed.as_millis() as u64,
            "stopped; every accepted update is written"
        );
    } else if wal.is_some() {
        warn!(
            unwritten,
            ?timeout,
            "stopped before every accepted update was written; the write-ahead log keeps them for the next start"
        );
    } else {
        warn!(
            unwritten,
            ?timeout,
            "stopped before every accepted update was written; with durability=memory they are lost"
        );
    }
    outcome
}
