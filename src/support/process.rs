//! Child processes the gateway, its tests and its benchmark start: signals to a child not yet reaped, and the
//! parent-death signal that stops a child when the gateway dies, so a crash or a kill leaves nothing running.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tracing::warn;

/// Sends `signal` to `child`, which must not have been waited for yet: once reaped, its pid may name another
/// process. (`Child::kill` sends only SIGKILL.)
pub fn send_signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill has no memory effects; the pid is of a child not yet reaped, so it names no other process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// Has the kernel send `signal` to the process `command` starts when the *thread* that spawns it ends — with the
/// whole process when spawned from the main thread or a thread that lives as long — so a crash or a kill leaves
/// no child running.
pub fn die_with_parent(command: &mut Command, signal: libc::c_int) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Spawns `command` from one long-lived thread: the parent-death signal fires when the *thread* that spawned
/// the child ends, so spawning from a short-lived thread (a test) would stop the server too early.
pub fn spawn_from_keeper_thread(command: Command) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("postgres-keeper".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // The sender lives in a static, so this thread lives as long as the process.
            })
            .map(|_| ())
            .unwrap_or_else(|e| warn!(error = %e, "could not start the postgres keeper thread"));
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = keeper
        .lock()
        .map_err(|_| io::Error::other("postgres keeper lock poisoned"))?
        .send((command, reply_tx));
    sent.map_err(|_| io::Error::other("postgres keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("postgres keeper thread is gone"))?
}
