//! The writers' side of JetStream: which shards this process writes, and how a shard's messages reach the batch
//! writers and are acknowledged.
//!
//! # One writer per shard: PostgreSQL advisory locks
//! Each writer process keeps one dedicated PostgreSQL session that holds an advisory lock per shard it writes
//! (see [`crate::db::shard_lease`]). The database is already shared by every writer and is where the exactly-once
//! bookkeeping lives, so the lock needs no other service, and a dead writer's session ends with it: its shards are
//! free the moment PostgreSQL notices, and the next writer's lease loop (once a second) takes them. Each process
//! also holds a membership lock, counts the members and takes `ceil(shards / members)`, handing extra shards
//! back (after their in-flight messages are committed) when a writer joins. JetStream's pinned-client priority
//! groups would hand a shard over only after a pull timeout, and a writer that stalls while pinned keeps it.
//!
//! # Exactly once
//! Taking a shard, a writer reads the shard's committed stream sequence (`ingest_wal_progress`, instance
//! `jetstream:<stream>`, slot = shard), then deletes and recreates the shard's durable consumer so that every
//! message not yet acknowledged is delivered to it at once, in order, instead of after the previous holder's ack
//! wait. Messages at or below the committed sequence are acknowledged and skipped; the rest go to the queue with a
//! [`JetStreamDelivery`], whose checkpoint (the message's stream sequence, and how many of its updates, when a
//! large message spans batches) the writer commits in the batch's transaction. Only after that commit is the
//! message acknowledged in JetStream; an ack that is lost only means a redelivery, which the checkpoint skips.
//! Should a writer lose its lock session while a batch is in flight (a network cut to PostgreSQL alone), the new
//! holder may write that batch's updates again: the natural keys absorb them, so nothing is stored twice.
//!
//! # What is not taken
//! Before a message reaches the queue its signature is checked ([`super::signing`]) and each of its updates is
//! validated again ([`crate::model::recheck`]). A record without a valid signature, or that cannot be read, is kept
//! whole in `dead_letters` (what can be said of it: subject, sequence, size, hash, its first bytes) and
//! acknowledged; an update that breaks a rule is kept there on its own, and the rest of its message goes on. These
//! are written before the message is acknowledged, outside the batches' exactly-once bookkeeping, so a writer that
//! dies between the two keeps them again at the redelivery: at least once, for what was never the gateways'.
//! The verdict on a record depends only on the record and on when JetStream stored it, so every delivery of a
//! message sees the same valid updates, and a checkpoint's count within a message keeps meaning the same ones.

use crate::support::hex::encode as hex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::AckKind;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::publish::{COMMIT_REPLY_HEADER, COMMIT_SEQUENCE_HEADER, COMMIT_STREAM_HEADER};
use super::signing::{SigningKeys, SIGNATURE_HEADER};
use super::{checkpoint_instance, is_inbox_subject, stream_name, subject};
use crate::db::{positions, shard_lease, Checkpoint};
use crate::intake::record::{self, RecordCodec};
use crate::metrics::JetStreamMetrics;
use crate::model::recheck::{Recheck, RecheckRules};
use crate::model::Update;
use crate::pipeline::copy::{keep_refused, Refused};
use crate::pipeline::{Chunk, CommitWaiter, CopyRecord, Delivery, PushError, StreamQueue};

/// How often a writer process looks at the leases: takes free shards, hands extra ones back.
const LEASE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a full queue is waited on before trying again.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);
/// Messages asked for per pull.
const PULL_BATCH: usize = 512;
/// Bytes asked for per pull, at most (raised to the server's `max_payload` when that is larger).
const PULL_BYTES: usize = 1024 * 1024;

/// What a shard's consumer task shares with the lease loop and the deliveries.
#[derive(Debug, Default)]
pub struct ShardState {
    /// The highest stream sequence whose updates are all committed (0 when none is known).
    committed: AtomicU64,
    /// Messages queued and not yet committed.
    in_flight: AtomicUsize,
}

/// One message on its way to PostgreSQL, shared by the parts a batch split may cut it into.
struct InFlight {
    parts: AtomicUsize,
    /// Taken once, when the last part is committed.
    acker: Mutex<Option<Acker>>,
    /// Where the gateway that published it waits for its commit (`?ack=commit`), and how to tell it.
    notice: Option<Notice>,
    /// The message's valid updates, in the order the positions within it count them.
    updates: u32,
    seq: u64,
    shard: Arc<ShardState>,
    runtime: Handle,
}

/// A signed commit notice to send once a message is committed.
struct Notice {
    client: async_nats::Client,
    /// The gateway's inbox, checked to be under the inbox prefix.
    reply: String,
    stream: &'static str,
    seq: u64,
    /// Every update of the message, valid or kept in `dead_letters`: all are as committed as they will be.
    updates: u32,
    signing: Arc<SigningKeys>,
}

impl Notice {
    async fn send(self) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(COMMIT_STREAM_HEADER, self.stream);
        headers.insert(COMMIT_SEQUENCE_HEADER, self.seq.to_string().as_str());
        let signature = self
            .signing
            .sign_notice(&self.reply, self.stream, self.seq, self.updates);
        headers.insert(SIGNATURE_HEADER, signature.as_str());
        let _ = self
            .client
            .publish_with_headers(self.reply, headers, self.updates.to_string().into())
            .await;
    }
}

impl InFlight {
    /// Every part is committed: acknowledge the message, and tell the gateway that waits.
    fn all_committed(&self) {
        self.shard.committed.fetch_max(self.seq, Ordering::AcqRel);
        self.shard.in_flight.fetch_sub(1, Ordering::AcqRel);
        let Some(acker) = self.acker.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let notice = self.notice.as_ref().map(Notice::again);
        self.runtime.spawn(async move {
            // A lost ack means a redelivery, which the committed sequence skips.
            if let Err(e) = acker.ack().await {
                debug!(error = %e, "could not acknowledge a committed message; it will be skipped when redelivered");
            }
            if let Some(notice) = notice {
                notice.send().await;
            }
        });
    }
}

/// Updates `start..end` of the JetStream message `seq` of shard `slot`.
pub struct JetStreamDelivery {
    slot: u16,
    start: u32,
    end: u32,
    message: Arc<InFlight>,
}

impl Notice {
    fn again(&self) -> Notice {
        Notice {
            client: self.client.clone(),
            reply: self.reply.clone(),
            stream: self.stream,
            seq: self.seq,
            updates: self.updates,
            signing: self.signing.clone(),
        }
    }
}

impl Delivery for JetStreamDelivery {
    fn split_off(&mut self, at: usize) -> Box<dyn Delivery> {
        let split = self.start + at as u32;
        self.message.parts.fetch_add(1, Ordering::AcqRel);
        let rest = JetStreamDelivery {
            slot: self.slot,
            start: split,
            end: self.end,
            message: self.message.clone(),
        };
        self.end = split;
        Box::new(rest)
    }

    fn checkpoint(&self) -> Option<Checkpoint> {
        Some(Checkpoint {
            slot: self.slot,
            lsn: self.message.seq,
            updates_done: (self.end < self.message.updates).then_some(self.end),
        })
    }

    fn committed(self: Box<Self>) {
        if self.message.parts.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.message.all_committed();
        }
    }
}

/// A running shard consumer.
struct ShardTask {
    stop: watch::Sender<bool>,
    state: Arc<ShardState>,
}

/// One update kind's shards, as the lease loop sees them.
pub trait ShardSet: Send + Sync {
    fn stream(&self) -> &'static str;
    /// The number the stream's locks are keyed by.
    fn stream_number(&self) -> u8;
    fn shards(&self) -> u16;
    /// Starts consuming `shard`, whose committed position is `checkpoint`.
    fn start(&self, shard: u16, checkpoint: Option<Checkpoint>) -> (watch::Sender<bool>, Arc<ShardState>);
}

/// Feeds one update kind's queue from the JetStream shards this process holds.
pub struct ShardConsumers<T> {
    pub context: async_nats::jetstream::Context,
    pub queue: Arc<StreamQueue<T>>,
    pub shards: u16,
    pub ack_wait: Duration,
    /// The runtime the consumers and acks run on.
    pub runtime: Handle,
    /// What is checked before a message is taken, and where what is refused goes.
    pub trust: Arc<Trust>,
}

/// The checks at the trust boundary, shared by a stream's shard consumers.
pub struct Trust {
    /// The keys the gateways sign with.
    pub signing: Arc<SigningKeys>,
    /// The rules each update is validated against again.
    pub rules: RecheckRules,
    /// `INGEST_NATS_INBOX_PREFIX`: where commit notices may go.
    pub inbox_prefix: String,
    /// Where refused records and updates are kept (`dead_letters`).
    pub pool: deadpool_postgres::Pool,
    /// The database runtime, where the pool's connections live.
    pub database: Handle,
    pub metrics: JetStreamMetrics,
}

/// How long a refusal that could not be kept (the database away) waits before it is tried again; the shard waits
/// with it, as its writers would.
const REFUSAL_RETRY: Duration = Duration::from_secs(1);

impl Trust {
    /// Keeps `rows` in `dead_letters`, trying again while the database is away (until the shard is stopped); a row
    /// the database refuses for good is given up, with a warning, rather than hold the shard for ever.
    async fn keep(&self, rows: Vec<Refused>, stopped: &watch::Receiver<bool>) {
        loop {
            let pool = self.pool.clone();
            let batch = rows.clone();
            let kept = self
                .database
                .spawn(async move { keep_refused(&pool, &batch).await })
                .await;
            match kept {
                Ok(Ok(())) => return,
                Ok(Err(e)) if e.is_retriable() && !*stopped.borrow() => {
                    warn!(error = %e, "could not keep refused JetStream records in dead_letters; retrying");
                    tokio::time::sleep(REFUSAL_RETRY).await;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, rows = rows.len(), "refused JetStream records could not be kept in dead_letters");
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

impl<T: Update + RecordCodec + CopyRecord + Recheck> ShardSet for ShardConsumers<T> {
    fn stream(&self) -> &'static str {
        T::STREAM
    }

    fn stream_number(&self) -> u8 {
        T::STREAM_ID
    }

    fn shards(&self) -> u16 {
        self.shards
    }

    fn start(&self, shard: u16, checkpoint: Option<Checkpoint>) -> (watch::Sender<bool>, Arc<ShardState>) {
        let (stop, stopped) = watch::channel(false);
        let state = Arc::new(ShardState::default());
        if let Some(c) = checkpoint {
            // A message committed only in part is delivered again and written from where it stopped.
            let whole = if c.updates_done.is_some() {
                c.lsn.saturating_sub(1)
            } else {
                c.lsn
            };
            state.committed.store(whole, Ordering::Release);
        }
        let task = ShardTaskRun {
            context: self.context.clone(),
            queue: self.queue.clone(),
            shard,
            checkpoint,
            ack_wait: self.ack_wait,
            state: state.clone(),
            runtime: self.runtime.clone(),
            trust: self.trust.clone(),
        };
        self.runtime.spawn(task.run(stopped));
        (stop, state)
    }
}

struct ShardTaskRun<T> {
    context: async_nats::jetstream::Context,
    queue: Arc<StreamQueue<T>>,
    shard: u16,
    checkpoint: Option<Checkpoint>,
    ack_wait: Duration,
    state: Arc<ShardState>,
    runtime: Handle,
    trust: Arc<Trust>,
}

impl<T: Update + RecordCodec + CopyRecord + Recheck> ShardTaskRun<T> {
    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let name = format!("{}-{}", T::STREAM, self.shard);
        let mut highest_queued = 0u64;
        let mut fresh = true;
        // The consumer sequence of the last delivery taken: JetStream numbers every delivery of a consumer, first
        // ones and redeliveries alike, so a number skipped is a delivery that never arrived (a NATS node died
        // with it in flight). Its message would come again later, after messages behind it — out of order, where
        // the committed sequence would skip it. So a gap stops the consumer, which is made afresh and hands out
        // again, in stream order, everything not yet acknowledged.
        let mut last_delivery = 0u64;
        while !*stopped.borrow() {
            let consumer = match self.consumer(&name, fresh).await {
                Ok(consumer) => consumer,
                Err(e) => {
                    warn!(consumer = %name, error = %e, "could not set up a JetStream consumer; retrying");
                    tokio::select! {
                        _ = stopped.changed() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            if fresh {
                last_delivery = 0;
            }
            fresh = false;
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                // Messages shared by many requests hold up to a thousand updates each: what a shard has pulled and
                // not yet queued is bounded by bytes too, never less than one message of the largest size.
                .max_bytes_per_batch(PULL_BYTES.max(self.context.client().server_info().max_payload))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
            {
                Ok(messages) => messages,
                Err(e) => {
                    warn!(consumer = %name, error = %e, "could not pull from JetStream; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stopped.changed() => break,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => match self
                        .take(message, &mut highest_queued, &mut last_delivery, &stopped)
                        .await
                    {
                        Taken::Yes => {}
                        Taken::Closed => return,
                        Taken::Gap => {
                            info!(
                                stream = T::STREAM,
                                shard = self.shard,
                                "a JetStream delivery went missing; the shard's consumer is made afresh"
                            );
                            fresh = true;
                            break;
                        }
                    },
                    Some(Err(e)) => {
                        debug!(consumer = %name, error = %e, "pull from JetStream interrupted; pulling again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                    None => break,
                }
            }
        }
        debug!(consumer = %name, "shard consumer stopped");
    }

    /// The shard's consumer; recreated when the shard is newly taken, so that what the previous holder had been
    /// handed is delivered again at once.
    async fn consumer(
        &self,
        name: &str,
        recreate: bool,
    ) -> anyhow::Result<async_nats::jetstream::consumer::PullConsumer> {
        let stream = self.context.get_stream(stream_name(T::STREAM)).await?;
        if recreate {
            // Not found is fine: the shard was never consumed.
            let _ = stream.delete_consumer(name).await;
        }
        let config = pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: subject(T::STREAM, self.shard),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: -1,
            max_ack_pending: 20_000,
            ..Default::default()
        };
        Ok(stream.get_or_create_consumer(name, config).await?)
    }

    /// Queues one message (or skips it).
    async fn take(
        &self,
        message: async_nats::jetstream::Message,
        highest_queued: &mut u64,
        last_delivery: &mut u64,
        stopped: &watch::Receiver<bool>,
    ) -> Taken {
        let (seq, delivery) = match message.info() {
            Ok(info) => (info.stream_sequence, info.consumer_sequence),
            Err(e) => {
                warn!(stream = T::STREAM, shard = self.shard, error = %e, "a JetStream message without metadata; ignored");
                return Taken::Yes;
            }
        };
        if delivery != *last_delivery + 1 {
            // Neither taken nor acknowledged: the fresh consumer hands it out again, in order.
            return Taken::Gap;
        }
        *last_delivery = delivery;
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let commit_reply = header(COMMIT_REPLY_HEADER);
        let signature = header(SIGNATURE_HEADER);
        let verdict = self.trust.signing.check_record(
            message.subject.as_str(),
            commit_reply.as_deref(),
            &message.payload,
            signature.as_deref(),
        );
        // A notice goes only to an inbox, and only for a record a gateway signed (the signature covers the reply
        // subject, so nobody moved it).
        let reply = commit_reply.filter(|reply| {
            let allowed = verdict.is_ok() && is_inbox_subject(&self.trust.inbox_prefix, reply);
            if verdict.is_ok() && !allowed {
                self.trust
                    .metrics
                    .commit_notices_refused
                    .with_label_values(&["reply_subject"])
                    .inc();
            }
            allowed
        });
        let notice_for = |updates: u32| {
            reply.clone().map(|reply| Notice {
                client: self.context.client(),
                reply,
                stream: T::STREAM,
                seq,
                updates,
                signing: self.trust.signing.clone(),
            })
        };
        if seq <= self.state.committed.load(Ordering::Acquire) {
            // Committed before (its ack was lost, or its holder died between commit and ack).
            let _ = message.ack().await;
            let count = record::decode_header(&message.payload).map_or(0, |h| h.count);
            if let Some(notice) = notice_for(count) {
                notice.send().await;
            }
            return Taken::Yes;
        }
        if seq <= *highest_queued {
            // Handed out again while still in the queue: the first delivery's commit acknowledges it.
            return Taken::Yes;
        }
        let stored_at = message
            .info()
            .map_or_else(|_| OffsetDateTime::now_utc(), |info| info.published);
        if let Err(refusal) = verdict {
            self.refuse_record(&message, seq, refusal.as_str(), stored_at, stopped)
                .await;
            let _ = message.ack_with(AckKind::Term).await;
            return Taken::Yes;
        }
        let decoded = record::decode_updates::<T>(&message.payload)
            .filter(|_| record::decode_header(&message.payload).is_some_and(|h| h.slot == self.shard));
        let Some(decoded) = decoded else {
            warn!(
                stream = T::STREAM,
                shard = self.shard,
                seq,
                "a signed JetStream message that is not a record of this stream and shard; kept in dead_letters"
            );
            self.refuse_record(&message, seq, "undecodable", stored_at, stopped)
                .await;
            let _ = message.ack_with(AckKind::Term).await;
            return Taken::Yes;
        };
        let sent = decoded.len() as u32;
        // The message's positions count its valid updates only (see the module's doc).
        let partly_committed = self.checkpoint.is_some_and(|c| c.lsn == seq);
        let mut updates = Vec::with_capacity(decoded.len());
        let mut invalid = Vec::new();
        for update in decoded {
            let broken = update.recheck(&self.trust.rules, stored_at);
            if broken.is_empty() {
                updates.push(update);
            } else {
                invalid.push(refused_update(&update, &broken));
            }
        }
        if !invalid.is_empty() {
            self.trust
                .metrics
                .updates_invalid
                .with_label_values(&[T::STREAM])
                .inc_by(invalid.len() as u64);
            warn!(
                stream = T::STREAM,
                shard = self.shard,
                seq,
                invalid = invalid.len(),
                "updates of a signed JetStream record break a rule; kept in dead_letters"
            );
            // Kept at the first delivery already, if part of the message was committed since.
            if !partly_committed {
                self.trust.keep(invalid, stopped).await;
            }
        }
        if updates.is_empty() {
            // Nothing to write: what there was is in dead_letters, as committed as it will be.
            let _ = message.ack().await;
            if let Some(notice) = notice_for(sent) {
                notice.send().await;
            }
            return Taken::Yes;
        }
        let total = updates.len() as u32;
        let start = match self.checkpoint {
            Some(c) if c.lsn == seq => c.updates_done.unwrap_or(0).min(total),
            _ => 0,
        };
        if start > 0 {
            updates.drain(..start as usize);
        }
        let bytes = crate::intake::memory_bytes(&updates);
        let slot = usize::from(self.shard);
        let reservation = loop {
            match self.queue.reserve_on(updates.len(), bytes, slot) {
                Ok(reservation) => break reservation,
                Err(PushError::Closed) => return Taken::Closed,
                Err(PushError::Full { .. }) => {
                    if *stopped.borrow() {
                        return Taken::Yes;
                    }
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
            }
        };
        // A waiting gateway wants the batch written at once, as a local `?ack=commit` does.
        let commit = reply.as_ref().map(|_| CommitWaiter::new(updates.len()).0);
        let notice = notice_for(sent);
        let (_, acker) = message.split();
        let in_flight = Arc::new(InFlight {
            parts: AtomicUsize::new(1),
            acker: Mutex::new(Some(acker)),
            notice,
            updates: total,
            seq,
            shard: self.state.clone(),
            runtime: self.runtime.clone(),
        });
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        *highest_queued = seq;
        reservation.push(Chunk {
            updates,
            bytes,
            delivery: Some(Box::new(JetStreamDelivery {
                slot: self.shard,
                start,
                end: total,
                message: in_flight,
            })),
            commit,
        });
        Taken::Yes
    }
}

impl<T: Update + RecordCodec + CopyRecord + Recheck> ShardTaskRun<T> {
    /// Counts a record refused whole and keeps in `dead_letters` what can be said of it: never its updates, which
    /// nothing vouches for, but enough to find it (subject, sequence, size, hash) and its first bytes.
    async fn refuse_record(
        &self,
        message: &async_nats::jetstream::Message,
        seq: u64,
        reason: &'static str,
        stored_at: OffsetDateTime,
        stopped: &watch::Receiver<bool>,
    ) {
        use sha2::{Digest, Sha256};
        self.trust
            .metrics
            .records_refused
            .with_label_values(&[T::STREAM, reason])
            .inc();
        warn!(
            stream = T::STREAM,
            shard = self.shard,
            seq,
            reason,
            "a JetStream record refused; kept in dead_letters"
        );
        let payload = &message.payload;
        let head = &payload[..payload.len().min(REFUSED_HEAD_BYTES)];
        let described = serde_json::json!({
            "subject": message.subject.as_str(),
            "stream_sequence": seq,
            "bytes": payload.len(),
            "sha256": hex(&Sha256::digest(payload)),
            "head_hex": hex(head),
        });
        let error = match reason {
            "unsigned" => "a JetStream record without a signature: not published by a gateway with the signing key",
            "bad_signature" => "a JetStream record whose signature does not hold under any signing key",
            _ => "a JetStream record that is not a record of its stream and shard",
        };
        let row = Refused {
            stream: T::STREAM,
            reason,
            error: error.to_owned(),
            payload: described.to_string(),
            device_id: None,
            received_at: Some(stored_at),
        };
        self.trust.keep(vec![row], stopped).await;
    }
}

/// How much of a refused record's bytes its dead letter shows.
const REFUSED_HEAD_BYTES: usize = 256;

/// An update that broke a rule when checked again, as its dead letter.
fn refused_update<T: Update + CopyRecord>(update: &T, broken: &[crate::model::FieldError]) -> Refused {
    let reasons: Vec<String> = broken
        .iter()
        .map(|e| format!("{} {}", e.field.as_deref().unwrap_or("the update"), e.reason))
        .collect();
    let json = update.to_json();
    // Every stream's JSON names its device (if any) and when it was received.
    let parsed = serde_json::from_str::<serde_json::Value>(&json).ok();
    let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name)?.as_str().map(str::to_owned));
    let received_at = field("received_at")
        .and_then(|at| OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339).ok());
    Refused {
        stream: T::STREAM,
        reason: "invalid",
        error: format!(
            "a signed JetStream record's update breaks a rule: {}",
            reasons.join("; ")
        ),
        device_id: field("device_id"),
        payload: json,
        received_at,
    }
}

/// What became of a delivery.
enum Taken {
    /// Queued, or skipped as already queued or committed, or left for the next holder.
    Yes,
    /// The queue is closed: the process is stopping.
    Closed,
    /// A delivery before it never arrived.
    Gap,
}

/// The lease loop of one writer process: holds a fair share of every stream's shards and runs their consumers,
/// until `stop` is set; then stops every consumer (what is queued is still written and acknowledged).
pub async fn hold_leases(pool: Pool, sets: Vec<Arc<dyn ShardSet>>, mut stop: watch::Receiver<bool>) {
    let units: Vec<(usize, u16)> = sets
        .iter()
        .enumerate()
        .flat_map(|(i, set)| (0..set.shards()).map(move |shard| (i, shard)))
        .collect();
    let mut held: Vec<((usize, u16), ShardTask)> = Vec::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let session = match pool.get().await {
            Ok(session) => session,
            Err(e) => {
                warn!(error = %e, "no PostgreSQL session for the shard leases; retrying");
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(LEASE_INTERVAL) => {}
                }
                continue;
            }
        };
        let member = match shard_lease::join(&session).await {
            Ok(Some(member)) => member,
            Ok(None) | Err(_) => {
                warn!("could not join the shard leases; retrying");
                drop(session);
                tokio::time::sleep(LEASE_INTERVAL).await;
                continue;
            }
        };
        info!(member, "joined the JetStream shard leases");
        let lost = loop {
            if *stop.borrow() {
                break false;
            }
            match balance(&session, &sets, &units, member, &mut held).await {
                Ok(()) => {}
                Err(e) => {
                    warn!(error = %e, "the shard lease session failed; every shard is given up");
                    break true;
                }
            }
            tokio::select! {
                _ = stop.changed() => {}
                () = tokio::time::sleep(LEASE_INTERVAL) => {}
            }
        };
        for (_, task) in held.drain(..) {
            task.stop.send_replace(true);
        }
        if !lost {
            break;
        }
        // The broken session must not go back to the pool.
        let _ = deadpool_postgres::Object::take(session);
        tokio::time::sleep(LEASE_INTERVAL).await;
    }
    info!("shard leases given up");
}

/// One round of the lease loop: takes free shards up to this process's share, or hands one extra back.
async fn balance(
    session: &tokio_postgres::Client,
    sets: &[Arc<dyn ShardSet>],
    units: &[(usize, u16)],
    member: i32,
    held: &mut Vec<((usize, u16), ShardTask)>,
) -> Result<(), tokio_postgres::Error> {
    let members = shard_lease::members(session).await?.max(1) as usize;
    let share = units.len().div_ceil(members);
    if held.len() > share {
        // Handed back in two rounds: its consumer is stopped first, and the lock is released only once nothing
        // of it is in flight, so that the next holder starts after its commits.
        if let Some((_, task)) = held.last() {
            if !*task.stop.borrow() {
                task.stop.send_replace(true);
            } else if task.state.in_flight.load(Ordering::Acquire) == 0 {
                if let Some(((set, shard), _)) = held.pop() {
                    shard_lease::release(session, sets[set].stream_number(), shard).await?;
                    info!(stream = sets[set].stream(), shard, "shard handed back");
                }
            }
        }
        return Ok(());
    }
    if held.len() == share {
        return Ok(());
    }
    // Each member starts looking at a different place, so that two writers do not race for the same shards.
    let offset = (member as usize * share) % units.len().max(1);
    for k in 0..units.len() {
        if held.len() >= share {
            break;
        }
        let (set, shard) = units[(offset + k) % units.len()];
        if held.iter().any(|(unit, _)| *unit == (set, shard)) {
            continue;
        }
        let shards = &sets[set];
        if !shard_lease::try_take(session, shards.stream_number(), shard).await? {
            continue;
        }
        let checkpoints = positions::load(session, &checkpoint_instance(shards.stream())).await?;
        let position = checkpoints
            .get(shards.stream())
            .and_then(|slots| slots.get(&shard))
            .copied();
        let (stop, state) = shards.start(shard, position);
        info!(
            stream = shards.stream(),
            shard,
            committed = position.map_or(0, |c| c.lsn),
            "shard taken"
        );
        held.push(((set, shard), ShardTask { stop, state }));
    }
    Ok(())
}
