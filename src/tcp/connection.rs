//! One device's connection, whatever its protocol: read frames, let the device in by the id it gives, store its
//! records and acknowledge them once durable, answer the rest.
//!
//! Memory: an idle connection holds no buffer at all; bytes are read only once the socket is readable, into a
//! buffer that grows to the packet's announced length and no further (the protocol caps that length), and is
//! freed again once every whole packet in it is handled.
//!
//! One packet at a time: while a packet's records are being made durable nothing more is read, so a full intake
//! (`Overloaded`, a full log, JetStream away) holds the device back through TCP itself — the submission is retried
//! with a growing pause while the device keeps its records, and it is never acknowledged before they are
//! taken. After [`MAX_INTAKE_WAIT`] the connection is closed unacknowledged and the device sends the packet again
//! when it reconnects.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use super::listener::Slot;
use super::{BadPacket, ConnectionLimits, Decoded, DeviceGate, DeviceProtocol, Framing, Intakes, Refusal};
use crate::intake::{Ack, Intake, SubmitError};
use crate::model::location::is_valid_device_id;
use crate::model::tracker::{check, Checked, TrackerFix};
use crate::model::{DeadLetter, LocationUpdate, ValidationRules, MAX_ATTRIBUTES_BYTES};

/// Bytes read at once while the frame's length is not known yet: a header, a handshake, or a small packet whole.
const READ_CHUNK_BYTES: usize = 2048;

/// Frames that could not be read (a bad checksum, a malformed or unsupported packet) before the connection is
/// closed: a device whose packets keep arriving damaged is better off reconnecting, and a peer that is no device
/// should not be read for ever.
pub const MAX_BAD_PACKETS: u32 = 3;

/// The first pause before a refused submission is tried again, and the longest.
const FIRST_INTAKE_PAUSE: Duration = Duration::from_millis(50);
const MAX_INTAKE_PAUSE: Duration = Duration::from_secs(2);

/// How long a packet's submission is retried while the intake is full; past it, the connection is closed
/// unacknowledged (the device has long given up waiting, and sends the packet again on a new connection).
pub const MAX_INTAKE_WAIT: Duration = Duration::from_secs(60);

/// What every connection of one listener shares.
pub struct Shared<P> {
    protocol: P,
    intakes: Intakes,
    gate: Arc<dyn DeviceGate>,
    limits: ConnectionLimits,
}

impl<P: DeviceProtocol> Shared<P> {
    pub fn new(protocol: P, intakes: Intakes, gate: Arc<dyn DeviceGate>, limits: ConnectionLimits) -> Self {
        Shared {
            protocol,
            intakes,
            gate,
            limits,
        }
    }
}

/// Why a connection ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    ByPeer,
    Idle,
    /// Nothing, or not a whole frame, within the read timeout.
    ReadTimeout,
    Unreadable(BadPacket),
    TooManyBadPackets,
    Refused(Refusal),
    /// The intake stayed full for [`MAX_INTAKE_WAIT`], or can never take the packet.
    IntakeUnavailable,
    Stopping,
    SocketError,
}

/// Serves one accepted connection until it ends; `slot` gives its place in the caps back when it does.
pub async fn serve<P: DeviceProtocol>(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared<P>>,
    stop: watch::Receiver<bool>,
    slot: Slot,
) {
    let mut connection = Connection {
        stream,
        shared,
        stop,
        buf: Vec::new(),
        device: None,
        bad_packets: 0,
        opened: Instant::now(),
        last_read: Instant::now(),
        frame_started: None,
        frame_bytes: None,
    };
    let closed = connection.run().await;
    debug!(
        peer = %peer,
        device = connection.device.as_deref().unwrap_or(""),
        reason = ?closed,
        protocol = connection.shared.protocol.protocol().name(),
        "device connection closed"
    );
    drop(slot);
}

struct Connection<P> {
    stream: TcpStream,
    shared: Arc<Shared<P>>,
    stop: watch::Receiver<bool>,
    /// Bytes read and not yet handled; empty (no allocation) between packets.
    buf: Vec<u8>,
    /// The id the device gave, once it was let in.
    device: Option<String>,
    bad_packets: u32,
    opened: Instant,
    last_read: Instant,
    /// When the first byte of the frame now in `buf` arrived.
    frame_started: Option<Instant>,
    /// The whole length of that frame, once its header said it.
    frame_bytes: Option<usize>,
}

impl<P: DeviceProtocol> Connection<P> {
    async fn run(&mut self) -> Closed {
        loop {
            if let Err(closed) = self.handle_whole_frames().await {
                return closed;
            }
            if self.buf.is_empty() {
                // Between packets a connection holds no buffer: an idle device costs its socket and little else.
                self.buf = Vec::new();
                self.frame_started = None;
            } else if self.frame_started.is_none() {
                self.frame_started = Some(self.last_read);
            }
            let limits = &self.shared.limits;
            let (deadline, on_timeout) = match (self.frame_started, &self.device) {
                (Some(started), _) => (started + limits.read_timeout, Closed::ReadTimeout),
                // Whoever connects must say who it is soon: a silent connection only holds a slot.
                (None, None) => (self.opened + limits.read_timeout, Closed::ReadTimeout),
                (None, Some(_)) => (self.last_read + limits.idle_timeout, Closed::Idle),
            };
            let readable = tokio::select! {
                biased;
                _ = self.stop.wait_for(|stop| *stop) => return Closed::Stopping,
                readable = tokio::time::timeout_at(deadline, self.stream.readable()) => readable,
            };
            match readable {
                Err(_) => {
                    if self.frame_started.is_some() {
                        self.count_bad(BadPacket::ReadTimeout);
                    }
                    return on_timeout;
                }
                Ok(Err(_)) => return Closed::SocketError,
                Ok(Ok(())) => {}
            }
            let want = match self.frame_bytes {
                Some(total) => total.saturating_sub(self.buf.len()).max(1),
                None => READ_CHUNK_BYTES,
            };
            self.buf.reserve_exact(want);
            match self.stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Closed::ByPeer,
                Ok(_) => self.last_read = Instant::now(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Closed::SocketError,
            }
        }
    }

    /// Handles every whole frame at the start of the buffer.
    async fn handle_whole_frames(&mut self) -> Result<(), Closed> {
        loop {
            match self.shared.protocol.frame(self.device.is_some(), &self.buf) {
                Framing::Incomplete { frame_bytes } => {
                    self.frame_bytes = frame_bytes;
                    return Ok(());
                }
                Framing::Skip(bytes) => {
                    self.buf.drain(..bytes);
                }
                Framing::Frame(bytes) => {
                    let buf = std::mem::take(&mut self.buf);
                    let handled = self.handle_frame(&buf[..bytes]).await;
                    self.buf = buf;
                    self.buf.drain(..bytes);
                    self.frame_bytes = None;
                    // The next frame's bytes, if any, arrived with this one.
                    self.frame_started = None;
                    handled?;
                }
                Framing::Unreadable(bad) => {
                    self.count_bad(bad);
                    return Err(Closed::Unreadable(bad));
                }
            }
        }
    }

    async fn handle_frame(&mut self, frame: &[u8]) -> Result<(), Closed> {
        let decoded = match self.shared.protocol.decode(self.device.as_deref(), frame) {
            Ok(decoded) => decoded,
            Err(bad) => {
                self.count_bad(bad);
                self.bad_packets += 1;
                if self.bad_packets >= MAX_BAD_PACKETS {
                    return Err(Closed::TooManyBadPackets);
                }
                return Ok(());
            }
        };
        match decoded {
            Decoded::Identification { device_id, answer } => Box::pin(self.identify(device_id, answer)).await,
            Decoded::Records { fixes, answer } => {
                let records = fixes.len();
                // Boxed: a submission's future is large, and an idle connection's task would otherwise hold its
                // room for as long as it lives.
                Box::pin(self.store(fixes, frame)).await?;
                match self.shared.protocol.records_answer(answer, records) {
                    Some(reply) => self.write(&reply).await,
                    None => Ok(()),
                }
            }
            Decoded::Reply(Some(reply)) => self.write(&reply).await,
            Decoded::Reply(None) => Ok(()),
        }
    }

    async fn identify(&mut self, device_id: String, answer: P::Answer) -> Result<(), Closed> {
        let refusal = if !is_valid_device_id(&device_id) {
            Some(Refusal::InvalidDeviceId)
        } else if !self.shared.gate.admits(&device_id) {
            Some(Refusal::UnknownDevice)
        } else if !self.shared.intakes.location.is_accepting() {
            Some(Refusal::ShuttingDown)
        } else {
            None
        };
        let shared = self.shared.clone();
        let protocol = &shared.protocol;
        if let Some(reply) = protocol.identification_answer(&answer, refusal.is_none()) {
            self.write(&reply).await?;
        }
        match refusal {
            None => {
                debug!(device = %device_id, protocol = protocol.protocol().name(), "device connected");
                self.device = Some(device_id);
                Ok(())
            }
            Some(refusal) => {
                self.count_refusal(refusal);
                let device = if refusal == Refusal::InvalidDeviceId {
                    ""
                } else {
                    device_id.as_str()
                };
                info!(
                    device,
                    reason = refusal.code(),
                    protocol = protocol.protocol().name(),
                    "device refused at its handshake"
                );
                Err(Closed::Refused(refusal))
            }
        }
    }

    /// Checks `fixes` and makes them durable: the storable ones in the location stream, the others in
    /// `dead_letters`. While the intake is full nothing more is read from the device, and the submission is tried
    /// again; each attempt reads the records afresh from `frame` (a refused submission gives its updates up), at
    /// the time it is made.
    async fn store(&mut self, fixes: Vec<TrackerFix>, frame: &[u8]) -> Result<(), Closed> {
        let Some(device) = self.device.clone() else {
            // A protocol hands records over only once the device is identified.
            return Err(Closed::Unreadable(BadPacket::Malformed));
        };
        if !self.shared.gate.admits(&device) {
            self.count_refusal(Refusal::Revoked);
            info!(device = %device, reason = Refusal::Revoked.code(), "device refused at its next packet");
            return Err(Closed::Refused(Refusal::Revoked));
        }
        let protocol = self.shared.protocol.protocol();
        let name = protocol.name();
        let started = Instant::now();
        let mut pause = FIRST_INTAKE_PAUSE;
        let mut locations_taken = false;
        let mut fixes = Some(fixes);
        loop {
            let fixes = match fixes.take() {
                Some(fixes) => fixes,
                None => match self.shared.protocol.decode(Some(&device), frame) {
                    Ok(Decoded::Records { fixes, .. }) => fixes,
                    // Decoding is deterministic: the frame read as records the first time.
                    _ => return Err(Closed::Unreadable(BadPacket::Malformed)),
                },
            };
            let checked = CheckedFixes::of(fixes, protocol, self.rules());
            let intakes = &self.shared.intakes;
            let mut result = Ok(());
            if !locations_taken {
                result = submit(&intakes.location, checked.stored).await;
                locations_taken = result.is_ok();
                if result.is_ok() {
                    intakes.location.metrics().accepted.inc_by(checked.stored_count as u64);
                }
            }
            if result.is_ok() {
                result = submit(&intakes.dead_letters, checked.letters).await;
                if result.is_ok() {
                    intakes
                        .dead_letters
                        .metrics()
                        .accepted
                        .inc_by(checked.reasons.len() as u64);
                }
            }
            match result {
                Ok(()) => {
                    let m = &intakes.metrics.trackers;
                    m.fixes
                        .with_label_values(&[name, "stored"])
                        .inc_by(checked.stored_count as u64);
                    m.fixes
                        .with_label_values(&[name, "dead_lettered"])
                        .inc_by(checked.reasons.len() as u64);
                    if checked.time_repairs > 0 {
                        m.time_repairs.with_label_values(&[name]).inc_by(checked.time_repairs);
                    }
                    for reason in checked.reasons {
                        m.dead_lettered.with_label_values(&[name, reason]).inc();
                    }
                    return Ok(());
                }
                Err(error) => {
                    let wait = match &error {
                        SubmitError::Overloaded => "overloaded",
                        SubmitError::LogFull => "log_full",
                        SubmitError::LogWrite(_) => "storage_error",
                        SubmitError::Unavailable(_) => "unavailable",
                        SubmitError::ShuttingDown => return Err(Closed::Stopping),
                        SubmitError::LargerThanQueue { .. } => return Err(Closed::IntakeUnavailable),
                    };
                    intakes.metrics.tcp.intake_waits.with_label_values(&[name, wait]).inc();
                    if started.elapsed() + pause > MAX_INTAKE_WAIT {
                        info!(
                            device = %device,
                            reason = wait,
                            protocol = name,
                            "the intake stayed full: closing the device connection unacknowledged"
                        );
                        return Err(Closed::IntakeUnavailable);
                    }
                    tokio::select! {
                        biased;
                        _ = self.stop.wait_for(|stop| *stop) => return Err(Closed::Stopping),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(MAX_INTAKE_PAUSE);
                }
            }
        }
    }

    fn rules(&self) -> ValidationRules {
        ValidationRules {
            now: OffsetDateTime::now_utc(),
            max_future_skew: self.shared.intakes.max_future_skew,
            max_age: self.shared.intakes.max_age,
            max_attributes_bytes: MAX_ATTRIBUTES_BYTES,
        }
    }

    /// Writes `bytes` whole, within the read timeout: a device that does not read its answers is not waited for.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), Closed> {
        let deadline = Instant::now() + self.shared.limits.read_timeout;
        let mut written = 0;
        while written < bytes.len() {
            match tokio::time::timeout_at(deadline, self.stream.writable()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(Closed::SocketError),
            }
            match self.stream.try_write(&bytes[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Closed::SocketError),
            }
        }
        Ok(())
    }

    fn count_bad(&self, bad: BadPacket) {
        let name = self.shared.protocol.protocol().name();
        let m = &self.shared.intakes.metrics.tcp;
        m.bad_packets.with_label_values(&[name, bad.code()]).inc();
        debug!(
            device = self.device.as_deref().unwrap_or(""),
            reason = bad.code(),
            protocol = name,
            "bad packet from a device"
        );
    }

    fn count_refusal(&self, refusal: Refusal) {
        let name = self.shared.protocol.protocol().name();
        let m = &self.shared.intakes.metrics.tcp;
        m.handshakes_refused.with_label_values(&[name, refusal.code()]).inc();
    }
}

/// Submits `updates` and waits until they are durable; nothing to submit is taken at once.
async fn submit<T>(intake: &Intake<T>, updates: Vec<T>) -> Result<(), SubmitError>
where
    T: crate::model::Update + crate::intake::record::RecordCodec,
{
    if updates.is_empty() {
        return Ok(());
    }
    intake.submit(updates, Ack::Durable).await.map(|_| ())
}

/// A packet's fixes sorted by the rules.
struct CheckedFixes {
    stored: Vec<LocationUpdate>,
    stored_count: usize,
    letters: Vec<DeadLetter>,
    /// The dead letters' reasons, for their counter.
    reasons: Vec<&'static str>,
    time_repairs: u64,
}

impl CheckedFixes {
    fn of(fixes: Vec<TrackerFix>, protocol: crate::model::tracker::Protocol, rules: ValidationRules) -> Self {
        let mut checked = CheckedFixes {
            stored: Vec::with_capacity(fixes.len()),
            stored_count: 0,
            letters: Vec::new(),
            reasons: Vec::new(),
            time_repairs: 0,
        };
        for fix in fixes {
            match check(fix, protocol, &rules) {
                Checked::Stored { update, time_repaired } => {
                    checked.time_repairs += u64::from(time_repaired);
                    checked.stored.push(update);
                }
                Checked::Rejected { letter, rejection } => {
                    checked.reasons.push(rejection.code());
                    checked.letters.push(letter);
                }
            }
        }
        checked.stored_count = checked.stored.len();
        checked
    }
}
