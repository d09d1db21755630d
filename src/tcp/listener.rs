//! A protocol's TCP listeners: accept within the connection caps, one task per connection, and the stop (no more
//! connections; each finishes the packet in hand, acknowledges it, and closes).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use prometheus::{IntCounter, IntGauge};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::connection::{self, Shared};
use super::{ConnectionLimits, DeviceGate, DeviceProtocol, Intakes};

/// How long the accept loop pauses after an error such as too many open files, so that it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A protocol's running listeners and connections.
pub struct TcpServer {
    /// The protocol's name, for the log.
    name: &'static str,
    /// Set once: the accept loops return, and every connection closes after the packet in hand.
    stop: watch::Sender<bool>,
    accepting: Vec<JoinHandle<()>>,
    open: Arc<OpenConnections>,
}

impl TcpServer {
    /// Serves `listeners` (already bound) with `protocol`, on `runtime`.
    pub fn start<P: DeviceProtocol>(
        protocol: P,
        listeners: Vec<std::net::TcpListener>,
        intakes: Intakes,
        gate: Arc<dyn DeviceGate>,
        limits: ConnectionLimits,
        runtime: &Handle,
    ) -> anyhow::Result<Self> {
        let name = protocol.protocol().name();
        let metrics = &intakes.metrics.tcp;
        let open = Arc::new(OpenConnections {
            limits,
            by_address: Mutex::new(HashMap::new()),
            gauge: metrics.connections.with_label_values(&[name]),
            refused_total: metrics.connections_refused.with_label_values(&[name, "total_limit"]),
            refused_address: metrics.connections_refused.with_label_values(&[name, "address_limit"]),
        });
        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared::new(protocol, intakes, gate, limits));
        let _inside = runtime.enter();
        let mut accepting = Vec::new();
        for listener in listeners {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)
                .with_context(|| format!("could not take the {name} listener into the runtime"))?;
            accepting.push(runtime.spawn(accept(listener, shared.clone(), open.clone(), stopped.clone())));
        }
        Ok(TcpServer {
            name,
            stop,
            accepting,
            open,
        })
    }

    /// Stops accepting, lets every connection finish the packet it is storing (and acknowledge it), closes them,
    /// and waits for that at most `within`.
    pub async fn stop(self, within: Duration) {
        self.stop.send_replace(true);
        for task in &self.accepting {
            task.abort();
        }
        let deadline = tokio::time::Instant::now() + within;
        while self.open.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.open.count();
        if left > 0 {
            warn!(
                protocol = self.name,
                connections = left,
                "stopping: device connections still storing a packet were left"
            );
        } else {
            info!(protocol = self.name, "device connections closed");
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.open.count()
    }
}

async fn accept<P: DeviceProtocol>(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared<P>>,
    open: Arc<OpenConnections>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, most likely: the connection waits in the backlog meanwhile.
                warn!(error = %error, "could not accept a device connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(slot) = open.admit(peer) else {
            // Closed at once rather than left in the backlog, where it would hold up the devices behind it.
            drop(stream);
            continue;
        };
        // Answers are a few bytes each, and the device waits for each one.
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection::serve(stream, peer, shared.clone(), stopped.clone(), slot));
    }
}

/// The connections open, by source address, within their caps.
struct OpenConnections {
    limits: ConnectionLimits,
    by_address: Mutex<HashMap<IpAddr, usize>>,
    /// `ingest_tcp_connections{protocol}`: also the total the cap is checked against.
    gauge: IntGauge,
    refused_total: IntCounter,
    refused_address: IntCounter,
}

impl OpenConnections {
    fn count(&self) -> usize {
        usize::try_from(self.gauge.get()).unwrap_or(0)
    }

    /// A slot for a connection from `peer`, or `None` (counted) when a cap is reached.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Slot> {
        let address = peer.ip().to_canonical();
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if self.count() >= self.limits.max_connections {
            self.refused_total.inc();
            debug!(peer = %peer, "device connection refused: the connection cap is reached");
            return None;
        }
        let from_address = by_address.entry(address).or_insert(0);
        if *from_address >= self.limits.max_connections_per_address {
            self.refused_address.inc();
            debug!(peer = %peer, "device connection refused: the per-address cap is reached");
            return None;
        }
        *from_address += 1;
        self.gauge.inc();
        Some(Slot {
            open: self.clone(),
            address,
        })
    }
}

/// One open connection's place within the caps; given back when dropped, however the connection ends.
pub struct Slot {
    open: Arc<OpenConnections>,
    address: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_address = self.open.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&self.address);
            }
        }
        self.open.gauge.dec();
    }
}
