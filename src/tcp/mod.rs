//! Hardware trackers over TCP: a listener per binary protocol (`INGEST_TELTONIKA_LISTEN`, `INGEST_GT06_LISTEN`),
//! one task per device connection, and the promise the HTTP routes keep — a packet is acknowledged to the device
//! only once its records are durable (the device's ack is our `202`); until then the device keeps them and sends
//! them again.
//!
//! - [`listener`]: binds, accepts within the connection caps (in total and per source address), and stops.
//! - [`connection`]: one device's connection, generic over its protocol: frames read into a buffer that grows to
//!   one packet at most, the identification, the records checked and submitted (waiting, not reading, while the
//!   intake is full), the answers, the timeouts and the count of garbage that closes it.
//! - [`teltonika`]: Teltonika's framing and answers, over the model's decoder.
//! - [`gt06`]: GT06's framing and replies, over the model's decoder.
//! - [`imeis`]: the `imeis=` lists of the API keys file: which units may connect.
//!
//! A protocol plugs in through [`DeviceProtocol`]: find a frame in the bytes read, decode it (the device says who
//! it is, or sends records, or only something to answer), and encode the answers.

pub mod connection;
pub mod gt06;
pub mod imeis;
pub mod listener;
pub mod teltonika;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::runtime::Runtime;
use tracing::{info, warn};

use crate::config::Settings;
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::model::tracker::{Protocol, TrackerFix};
use crate::model::{DeadLetter, LocationUpdate};
use imeis::KeyFileUnits;

pub use listener::TcpServer;

/// Where a frame ends in the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Not a whole frame yet; `frame_bytes` is the whole frame's length once the header says it, so that the
    /// buffer grows to exactly that.
    Incomplete { frame_bytes: Option<usize> },
    /// A whole frame of this many bytes starts the buffer.
    Frame(usize),
    /// This many bytes start the buffer and mean nothing to answer or store (a keep-alive byte).
    Skip(usize),
    /// The bytes cannot start a frame, or announce one longer than the protocol allows: the stream cannot be
    /// followed any further, and the connection is closed.
    Unreadable(BadPacket),
}

/// What a whole frame held.
#[derive(Debug)]
pub enum Decoded<A> {
    /// The device says who it is: what it sends next is its own.
    Identification { device_id: String, answer: A },
    /// Records to store, then acknowledge.
    Records { fixes: Vec<TrackerFix>, answer: A },
    /// Nothing to store (a heartbeat): answered at once with these bytes, if any.
    Reply(Option<Vec<u8>>),
}

/// One binary protocol's framing, decoding and answers; its connections are served by [`connection`].
pub trait DeviceProtocol: Send + Sync + 'static {
    /// What an answer needs to know of the frame it answers (a serial number, a packet type), if anything.
    type Answer: Send + 'static;

    /// The protocol's name in metrics, `/stats` and `dead_letters.protocol`.
    fn protocol(&self) -> Protocol;

    /// Where the frame at the start of `buf` ends; `identified` once the device said who it is.
    fn frame(&self, identified: bool, buf: &[u8]) -> Framing;

    /// Reads one whole frame; `device` is the identified device's id. A frame that cannot be read is not
    /// acknowledged, so that the device sends it again.
    fn decode(&self, device: Option<&str>, frame: &[u8]) -> Result<Decoded<Self::Answer>, BadPacket>;

    /// The bytes that accept or refuse an identification; `None` to answer nothing (a refused device is then
    /// disconnected without a word).
    fn identification_answer(&self, answer: &Self::Answer, accepted: bool) -> Option<Vec<u8>>;

    /// The bytes that acknowledge `records` records, sent once they are durable.
    fn records_answer(&self, answer: Self::Answer, records: usize) -> Option<Vec<u8>>;
}

/// Why bytes could not be read as a packet: the `reason` of `ingest_tcp_bad_packets_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BadPacket {
    /// The checksum does not match: damaged on the way.
    BadCrc,
    /// Lengths, counts or markers that do not hold together.
    Malformed,
    /// A length beyond what the protocol allows: the connection is closed rather than the bytes read.
    Oversized,
    /// A well-formed packet of a kind the gateway does not read.
    UnsupportedCodec,
    /// A packet started and not finished within the read timeout (a slow drip, or a packet cut short).
    ReadTimeout,
}

impl BadPacket {
    pub const ALL: [BadPacket; 5] = [
        BadPacket::BadCrc,
        BadPacket::Malformed,
        BadPacket::Oversized,
        BadPacket::UnsupportedCodec,
        BadPacket::ReadTimeout,
    ];

    pub const fn code(self) -> &'static str {
        match self {
            BadPacket::BadCrc => "bad_crc",
            BadPacket::Malformed => "malformed",
            BadPacket::Oversized => "oversized",
            BadPacket::UnsupportedCodec => "unsupported_codec",
            BadPacket::ReadTimeout => "read_timeout",
        }
    }
}

/// Why a device was not let in (or let in no longer): the `reason` of `ingest_tcp_handshakes_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The id it gave is not a device id (1–64 of `A-Z a-z 0-9 . _ : -`).
    InvalidDeviceId,
    /// No `imeis=` list of the API keys names it.
    UnknownDevice,
    /// It was let in, and its id has since been removed from the keys file (SIGHUP): refused at its next packet.
    Revoked,
    /// The gateway is stopping.
    ShuttingDown,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::InvalidDeviceId,
        Refusal::UnknownDevice,
        Refusal::Revoked,
        Refusal::ShuttingDown,
    ];

    pub const fn code(self) -> &'static str {
        match self {
            Refusal::InvalidDeviceId => "invalid_device_id",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::Revoked => "revoked",
            Refusal::ShuttingDown => "shutting_down",
        }
    }
}

/// Why a connection was closed as soon as it was accepted: the `reason` of `ingest_tcp_connections_refused_total`.
pub const CONNECTION_REFUSALS: [&str; 2] = ["total_limit", "address_limit"];

/// Why a packet's submission waited (the device not read meanwhile): the `reason` of
/// `ingest_tcp_intake_waits_total`.
pub const INTAKE_WAITS: [&str; 4] = ["overloaded", "log_full", "storage_error", "unavailable"];

/// Who may connect: a device is let in by the id it gives, since binary trackers carry no key.
pub trait DeviceGate: Send + Sync + 'static {
    /// Whether a device that says it is `device_id` may connect and write its fixes.
    fn admits(&self, device_id: &str) -> bool;
}

/// Without API keys: every device. The listener then binds a non-loopback address only when anonymous access
/// is allowed (`INGEST_ALLOW_ANONYMOUS`).
#[derive(Debug, Clone, Copy)]
pub struct AnyDevice;

impl DeviceGate for AnyDevice {
    fn admits(&self, _device_id: &str) -> bool {
        true
    }
}

/// How long connections may stay and how many there may be (`INGEST_TCP_*`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A connection that sends nothing for this long is closed (devices reconnect when they have data).
    pub idle_timeout: Duration,
    /// A packet (or the identification) started must be whole within this; past it the connection is closed.
    pub read_timeout: Duration,
    /// Connections open at once, per protocol; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections open at once from one source address, per protocol.
    pub max_connections_per_address: usize,
}

/// What a connection hands its records to, and the rules they are checked by.
#[derive(Clone)]
pub struct Intakes {
    pub location: Arc<Intake<LocationUpdate>>,
    pub dead_letters: Arc<Intake<DeadLetter>>,
    /// How far in the future a fix's time may be (`INGEST_MAX_FUTURE_SKEW`).
    pub max_future_skew: Duration,
    /// How old a fix may be (`INGEST_MAX_AGE`).
    pub max_age: Duration,
    pub metrics: Arc<Metrics>,
}

/// Makes every series of the TCP metrics of `protocol` at zero, so that `/metrics` and `/stats` show them before
/// the first connection.
pub fn init_metrics(metrics: &Metrics, protocol: Protocol) {
    let m = &metrics.tcp;
    let name = protocol.name();
    m.connections.with_label_values(&[name]);
    for reason in CONNECTION_REFUSALS {
        m.connections_refused.with_label_values(&[name, reason]);
    }
    for refusal in Refusal::ALL {
        m.handshakes_refused.with_label_values(&[name, refusal.code()]);
    }
    for bad in BadPacket::ALL {
        m.bad_packets.with_label_values(&[name, bad.code()]);
    }
    for reason in INTAKE_WAITS {
        m.intake_waits.with_label_values(&[name, reason]);
    }
}

/// The tracker listeners, bound at start-up (a port taken stops the start before anything runs) and served once
/// the gateway runs, on a runtime of their own: device connections never wait behind the HTTP workers or the
/// database's connections.
pub struct TrackerPlan {
    teltonika: Vec<std::net::TcpListener>,
    gt06: Vec<std::net::TcpListener>,
    /// With API keys: the units their `imeis=` lists let in (re-read with the keys); without: every unit.
    units: Option<Arc<KeyFileUnits>>,
    limits: ConnectionLimits,
    runtime: Runtime,
}

impl TrackerPlan {
    /// Binds every tracker listener the settings name; `None` when they name none.
    pub fn bind(settings: &Settings) -> anyhow::Result<Option<Self>> {
        if settings.trackers.teltonika_listen.is_none() && settings.trackers.gt06_listen.is_none() {
            return Ok(None);
        }
        let teltonika = match &settings.trackers.teltonika_listen {
            Some(list) => bind_all(list, Protocol::Teltonika)?,
            None => Vec::new(),
        };
        let gt06 = match &settings.trackers.gt06_listen {
            Some(list) => bind_all(list, Protocol::Gt06)?,
            None => Vec::new(),
        };
        let units = match &settings.auth.api_keys_file {
            Some(path) => Some(Arc::new(KeyFileUnits::load(path)?)),
            None => {
                warn!(
                    "no api keys file (INGEST_API_KEYS_FILE): every tracker unit that connects is let in, whatever \
                     IMEI it gives"
                );
                None
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("trackers")
            .enable_all()
            .build()
            .context("could not start the tracker listeners' runtime")?;
        Ok(Some(TrackerPlan {
            teltonika,
            gt06,
            units,
            limits: ConnectionLimits {
                idle_timeout: settings.trackers.tcp_idle_timeout,
                read_timeout: settings.trackers.tcp_read_timeout,
                max_connections: settings.trackers.tcp_max_connections as usize,
                max_connections_per_address: settings.trackers.tcp_max_connections_per_address as usize,
            },
            runtime,
        }))
    }

    /// The units the keys let in, for whoever reloads the keys.
    pub fn units(&self) -> Option<Arc<KeyFileUnits>> {
        self.units.clone()
    }

    /// The addresses bound, by protocol.
    pub fn addresses(&self) -> Vec<(Protocol, SocketAddr)> {
        let teltonika = self.teltonika.iter().map(|l| (Protocol::Teltonika, l));
        let gt06 = self.gt06.iter().map(|l| (Protocol::Gt06, l));
        teltonika
            .chain(gt06)
            .filter_map(|(p, l)| l.local_addr().ok().map(|a| (p, a)))
            .collect()
    }

    /// Starts serving: from now on units connect, and their records go to `intakes`.
    pub fn start(self, intakes: Intakes) -> anyhow::Result<Trackers> {
        let gate: Arc<dyn DeviceGate> = match self.units {
            Some(units) => units,
            None => Arc::new(AnyDevice),
        };
        let mut servers = Vec::new();
        if !self.teltonika.is_empty() {
            servers.push(TcpServer::start(
                teltonika::Teltonika,
                self.teltonika,
                intakes.clone(),
                gate.clone(),
                self.limits,
                self.runtime.handle(),
            )?);
        }
        if !self.gt06.is_empty() {
            servers.push(TcpServer::start(
                gt06::Gt06::default(),
                self.gt06,
                intakes,
                gate,
                self.limits,
                self.runtime.handle(),
            )?);
        }
        Ok(Trackers {
            servers,
            runtime: self.runtime,
        })
    }
}

/// The tracker listeners, serving.
pub struct Trackers {
    servers: Vec<TcpServer>,
    runtime: Runtime,
}

impl Trackers {
    /// Stops them: no new connection, each connection finishes the packet it is storing and answers it, then
    /// closes; waits for that at most `within`.
    pub async fn stop(self, within: Duration) {
        for server in self.servers {
            server.stop(within).await;
        }
        // Called from another runtime, which must not block on this one's threads.
        self.runtime.shutdown_background();
    }
}

/// Binds each TCP address of a comma-separated list.
fn bind_all(list: &str, protocol: Protocol) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::new();
    for address in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let listener = std::net::TcpListener::bind(address)
            .with_context(|| format!("could not listen on {address} for {} units", protocol.name()))?;
        let bound = listener.local_addr()?;
        info!(
            address = %bound,
            protocol = protocol.name(),
            tracker_port = bound.port(),
            "tracker listener is listening"
        );
        listeners.push(listener);
    }
    anyhow::ensure!(
        !listeners.is_empty(),
        "no address to listen on for {} units",
        protocol.name()
    );
    Ok(listeners)
}
