//! What is re-read on SIGHUP without dropping a connection (API keys, TLS certificates, …): each part registers
//! how to reload itself; a failed reload keeps what was loaded before and says why.

use std::sync::{Arc, Mutex};

use tracing::{info, warn};

type ReloadFn = Box<dyn Fn() -> anyhow::Result<()> + Send + Sync>;

/// The reloadable parts of a running gateway.
#[derive(Clone, Default)]
pub struct Reloads {
    parts: Arc<Mutex<Vec<(&'static str, ReloadFn)>>>,
}

impl Reloads {
    /// Registers `reload`, named `what` in the log.
    pub fn register(&self, what: &'static str, reload: impl Fn() -> anyhow::Result<()> + Send + Sync + 'static) {
        self.lock().push((what, Box::new(reload)));
    }

    /// Reloads every part; one that fails keeps its previous state.
    pub fn reload_all(&self) {
        for (what, reload) in self.lock().iter() {
            match reload() {
                Ok(()) => info!(what = *what, "reloaded"),
                Err(error) => warn!(
                    what = *what,
                    error = format!("{error:#}"),
                    "reload failed; the previous one stays"
                ),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, ReloadFn)>> {
        // A reload that panicked leaves the list itself intact.
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes SIGHUP over from its default (ending the process) at once, and returns the task that reloads everything
/// at each one, until the process ends. Called before the gateway says it listens, so that a SIGHUP sent as soon
/// as it does is a reload, never the end of the process.
pub fn on_sighup(reloads: Reloads) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let hangup = signal(SignalKind::hangup());
    async move {
        let Ok(mut hangup) = hangup else {
            warn!("could not install the SIGHUP handler; reloading needs a restart");
            return;
        };
        while hangup.recv().await.is_some() {
            info!(signal = "SIGHUP", "reloading");
            reloads.reload_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_part_is_reloaded_even_after_one_fails() {
        let reloads = Reloads::default();
        let count = Arc::new(AtomicUsize::new(0));
        reloads.register("broken", || anyhow::bail!("no such file"));
        let seen = count.clone();
        reloads.register("counted", move || {
            seen.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        reloads.reload_all();
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
