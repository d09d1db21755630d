//! The gateway's side of JetStream: a request's updates are grouped by shard and go into JetStream as records (as
//! in the write-ahead log), one message per shard shared with other requests: while a shard's message awaits its
//! ack, the requests that arrive fill the next one ([`Coalescer`], the group commit of the log). A request is
//! answered once JetStream has acknowledged every message holding its updates.
//!
//! Each part of a request (its updates of one shard) has a content digest: stream, shard and the encoded updates,
//! less the time each update was received, which is all a retry changes. A message holding one part has that
//! digest as its `Nats-Msg-Id` (the id a request alone always had); one holding several, a hash of their digests.
//! A client that retries a request alone gets the same id, and JetStream stores it once within the duplicate
//! window; a retry that shares a message with others is stored again and absorbed by the natural keys in
//! PostgreSQL (counted as `duplicate`), as after the window. Within one message a part already in it is not sent
//! twice.
//!
//! Every message is signed ([`super::signing`]) over its subject, its reply subject and its bytes. A request that
//! asks for its commit (`?ack=commit`) is published in messages of its own, which name its inbox; the answer
//! believes only signed notices for the messages it stored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::IntoFuture;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use async_nats::Subscriber;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use prometheus::IntCounterVec;
use sha2::Digest;
use tokio::sync::oneshot;

use super::signing::{SigningKeys, SIGNATURE_HEADER};
use super::{shard_of, subject, ShardKey};
use crate::intake::record::{self, RecordCodec};
use crate::intake::SubmitError;
use crate::model::Update;

/// The header that asks the writer to say on this Core NATS subject when the message's updates are committed.
pub const COMMIT_REPLY_HEADER: &str = "Ingest-Commit-Reply";
/// A commit notice's header naming the stream of the message it confirms.
pub const COMMIT_STREAM_HEADER: &str = "Ingest-Commit-Stream";
/// A commit notice's header naming the stream sequence of the message it confirms.
pub const COMMIT_SEQUENCE_HEADER: &str = "Ingest-Commit-Seq";

/// Largest message a publish makes; a larger shard group is split. Below NATS's default `max_payload` (1 MiB),
/// with room for headers.
const MAX_MESSAGE_BYTES: usize = 512 * 1024;

/// What a request's publish got.
pub struct Published {
    /// Updates in messages JetStream stored now.
    pub stored: usize,
    /// Updates in messages JetStream already held (a retry within the duplicate window).
    pub duplicates: usize,
    /// With a commit asked for: where the writers say what they committed.
    pub commits: Option<CommitNotices>,
}

/// The writers' notices for one request's messages, as they arrive on its inbox.
pub struct CommitNotices {
    subscriber: Subscriber,
    inbox: String,
    stream: &'static str,
    /// The messages this request stored, by stream sequence, with their updates, until each is confirmed.
    pending: HashMap<u64, u32>,
    signing: Arc<SigningKeys>,
    /// `ingest_jetstream_commit_notices_refused_total`.
    refused: IntCounterVec,
}

impl CommitNotices {
    /// Whether every message this request stored is confirmed committed within `wait`: only a notice signed with a
    /// shared key, for one of those messages and its count, counts. `false` when there was nothing to confirm.
    pub async fn wait(mut self, wait: Duration) -> bool {
        let confirm = async {
            if self.pending.is_empty() {
                return false;
            }
            while !self.pending.is_empty() {
                let Some(notice) = self.subscriber.next().await else {
                    return false;
                };
                if let Err(reason) = self.check(&notice) {
                    self.refused.with_label_values(&[reason]).inc();
                    tracing::warn!(reason, inbox = %self.inbox, "a commit notice not believed");
                }
            }
            true
        };
        let done = tokio::time::timeout(wait, confirm).await.unwrap_or(false);
        let _ = self.subscriber.unsubscribe().await;
        done
    }

    /// Takes a notice's message off the pending ones, or says why it is not believed.
    fn check(&mut self, notice: &async_nats::Message) -> Result<(), &'static str> {
        let header = |name: &str| notice.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str());
        let signature = header(SIGNATURE_HEADER).ok_or("unsigned")?;
        let sequence = header(COMMIT_SEQUENCE_HEADER).and_then(|s| s.parse::<u64>().ok());
        let updates = std::str::from_utf8(&notice.payload)
            .ok()
            .and_then(|t| t.parse::<u32>().ok());
        let (Some(sequence), Some(updates)) = (sequence, updates) else {
            return Err("unknown_message");
        };
        if header(COMMIT_STREAM_HEADER) != Some(self.stream) {
            return Err("unknown_message");
        }
        self.signing
            .check_notice(&self.inbox, self.stream, sequence, updates, Some(signature))
            .map_err(|refusal| refusal.as_str())?;
        match self.pending.get(&sequence) {
            Some(expected) if *expected == updates => {
                self.pending.remove(&sequence);
                Ok(())
            }
            _ => Err("unknown_message"),
        }
    }
}

/// Publishes one update kind's requests to its JetStream stream.
pub struct Publisher<T> {
    client: async_nats::Client,
    context: Context,
    shards: u16,
    /// Longest a request waits for all its publish acks.
    timeout: Duration,
    /// Signs every message, and checks the commit notices.
    signing: Arc<SigningKeys>,
    /// `ingest_jetstream_commit_notices_refused_total`.
    notices_refused: IntCounterVec,
    /// Where requests that wait for no commit notice put their updates, to share messages with others.
    coalescer: Arc<Coalescer>,
    stream: PhantomData<fn(T)>,
}

impl<T: Update + RecordCodec + ShardKey> Publisher<T> {
    /// Made on the runtime the publishes are to run on (the coalescer's tasks are spawned there).
    pub fn new(
        client: async_nats::Client,
        shards: u16,
        timeout: Duration,
        signing: Arc<SigningKeys>,
        notices_refused: IntCounterVec,
    ) -> Self {
        let context = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(timeout)
            // Publishes in flight wait for room here instead of failing; the request's own timeout bounds it.
            .max_ack_inflight(65_536)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let coalescer = Arc::new(Coalescer::new(
            T::STREAM,
            context.clone(),
            signing.clone(),
            client.server_info().max_payload,
            shards,
        ));
        Self {
            client,
            context,
            shards,
            timeout,
            signing,
            notices_refused,
            coalescer,
            stream: PhantomData,
        }
    }

    /// Whether the connection to NATS is up right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes `updates` and returns once JetStream has stored them all; any failure (NATS unreachable, no
    /// quorum, the stream full, no ack within the timeout) refuses the whole request, which the client retries.
    ///
    /// Without a commit asked for, the request's updates join the messages other requests are filling (see
    /// [`Coalescer`]); with one, they go in messages of their own, which name the request's inbox.
    pub async fn publish(&self, updates: Vec<T>, want_commit: bool) -> Result<Published, SubmitError> {
        if !self.is_connected() {
            return Err(SubmitError::Unavailable("not connected to NATS".to_owned()));
        }
        if want_commit {
            self.publish_alone(updates).await
        } else {
            self.publish_coalesced(&updates).await
        }
    }

    /// The request's messages go in with others'; answered once every message holding a part of it is stored.
    async fn publish_coalesced(&self, updates: &[T]) -> Result<Published, SubmitError> {
        let groups = messages(updates, self.shards);
        let waits = self.coalescer.add(groups);
        let results = tokio::time::timeout(self.timeout, futures_util::future::join_all(waits))
            .await
            .map_err(|_| SubmitError::Unavailable("JetStream did not acknowledge in time".to_owned()))?;
        let mut published = Published {
            stored: 0,
            duplicates: 0,
            commits: None,
        };
        for result in results {
            let (outcome, count) = result;
            match outcome {
                Ok(Ok(Stored { duplicate: true })) => published.duplicates += count,
                Ok(Ok(Stored { duplicate: false })) => published.stored += count,
                Ok(Err(refused)) => return Err(SubmitError::Unavailable(refused)),
                Err(_) => {
                    return Err(SubmitError::Unavailable(
                        "the publish to JetStream was abandoned".to_owned(),
                    ))
                }
            }
        }
        Ok(published)
    }

    /// The request's messages on their own, naming the inbox where the writers tell their commits.
    async fn publish_alone(&self, updates: Vec<T>) -> Result<Published, SubmitError> {
        let inbox = self.client.new_inbox();
        let subscriber = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| SubmitError::Unavailable(format!("could not subscribe for commit notices: {e}")))?;
        let messages = messages(&updates, self.shards);
        let mut acks = Vec::with_capacity(messages.len());
        let mut sizes = Vec::with_capacity(messages.len());
        let publish_all = async {
            for ShardMessage {
                shard,
                updates: count,
                payload,
                digest,
            } in messages
            {
                let subject = subject(T::STREAM, shard);
                let signature = self.signing.sign_record(&subject, Some(&inbox), &payload);
                let message = PublishMessage::build()
                    .payload(payload.into())
                    .message_id(message_id(&digest))
                    .header(SIGNATURE_HEADER, signature.as_str())
                    .header(COMMIT_REPLY_HEADER, inbox.as_str());
                let ack = self
                    .context
                    .send_publish(subject, message)
                    .await
                    .map_err(|e| SubmitError::Unavailable(format!("could not publish to JetStream: {e}")))?;
                acks.push(ack.into_future());
                sizes.push(count);
            }
            Ok::<_, SubmitError>(futures_util::future::join_all(acks).await)
        };
        let results = tokio::time::timeout(self.timeout, publish_all)
            .await
            .map_err(|_| SubmitError::Unavailable("JetStream did not acknowledge in time".to_owned()))??;
        let mut published = Published {
            stored: 0,
            duplicates: 0,
            commits: None,
        };
        let mut pending = HashMap::new();
        for (result, count) in results.into_iter().zip(sizes) {
            let ack =
                result.map_err(|e| SubmitError::Unavailable(format!("JetStream did not store the updates: {e}")))?;
            if ack.duplicate {
                published.duplicates += count;
            } else {
                published.stored += count;
                pending.insert(ack.sequence, count as u32);
            }
        }
        published.commits = Some(CommitNotices {
            subscriber,
            inbox,
            stream: T::STREAM,
            pending,
            signing: self.signing.clone(),
            refused: self.notices_refused.clone(),
        });
        Ok(published)
    }
}

/// Largest message the coalescer makes: [`MAX_MESSAGE_BYTES`], or less when the server takes less (with room for
/// the headers).
fn message_limit(max_payload: usize) -> usize {
    if max_payload == 0 {
        return MAX_MESSAGE_BYTES;
    }
    MAX_MESSAGE_BYTES.min(max_payload.saturating_sub(HEADER_ROOM).max(max_payload / 2))
}

/// Bytes kept free under the server's `max_payload` for a message's headers (id, signature).
const HEADER_ROOM: usize = 4 * 1024;

/// Most updates the coalescer puts in one message: about one batch of the writers, so that a message is seldom
/// split over batches.
const MAX_MESSAGE_UPDATES: u32 = 1000;

/// What JetStream said of a message that holds part of a request.
#[derive(Debug, Clone, Copy)]
struct Stored {
    /// JetStream already held the message, or the same updates were already in it from another request.
    duplicate: bool,
}

/// The answer a request's part gets: stored, or why not (the text of its 503).
type Outcome = Result<Stored, String>;

/// A shard's message being filled: the record of several requests' updates, and who waits for it.
struct Batch {
    /// A record (the first part's header, its count patched when sent) followed by every part's updates.
    payload: Vec<u8>,
    updates: u32,
    /// The parts' content digests: the first, a hash of them all (the message's id) and, to spot a part already
    /// in, their first 128 bits.
    first: [u8; 32],
    digests: sha2::Sha256,
    seen: HashSet<u128>,
    /// Each part's waiter, and whether its updates were already in the message.
    waiters: Vec<(oneshot::Sender<Outcome>, bool)>,
}

impl Batch {
    fn new(part: &ShardMessage) -> Self {
        Batch {
            payload: part.payload[..record::HEADER_BYTES].to_vec(),
            updates: 0,
            first: part.digest,
            digests: sha2::Sha256::new_with_prefix(b"ingest-gateway coalesced message\0"),
            seen: HashSet::new(),
            waiters: Vec::new(),
        }
    }

    fn fits(&self, part: &ShardMessage, max_bytes: usize) -> bool {
        self.payload.len() + part.payload.len() - record::HEADER_BYTES <= max_bytes
            && self.updates + part.updates as u32 <= MAX_MESSAGE_UPDATES
    }

    fn push(&mut self, part: &ShardMessage) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        // A part already in this message (the same updates from a retry or a twin request) is not sent twice.
        if !self
            .seen
            .insert(u128::from_le_bytes(part.digest[..16].try_into().unwrap_or_default()))
        {
            self.waiters.push((tx, true));
            return rx;
        }
        self.payload.extend_from_slice(&part.payload[record::HEADER_BYTES..]);
        self.updates += part.updates as u32;
        self.digests.update(part.digest);
        self.waiters.push((tx, false));
        rx
    }

    /// The finished record and its `Nats-Msg-Id`: the only part's digest when it holds one (a request alone in
    /// its message has the id it had before messages were shared), else a hash of its parts' digests in order.
    fn finish(&mut self) -> (Vec<u8>, String) {
        let mut payload = std::mem::take(&mut self.payload);
        payload[COUNT_OFFSET..record::HEADER_BYTES].copy_from_slice(&self.updates.to_le_bytes());
        let id = if self.seen.len() == 1 {
            message_id(&self.first)
        } else {
            message_id(&self.digests.clone().finalize().into())
        };
        (payload, id)
    }

    /// Tells every part what became of the message.
    fn answer(self, outcome: Result<bool, String>) {
        for (waiter, already_in) in self.waiters {
            let _ = waiter.send(match &outcome {
                Ok(duplicate) => Ok(Stored {
                    duplicate: *duplicate || already_in,
                }),
                Err(refused) => Err(refused.clone()),
            });
        }
    }
}

/// Where a record's update count lies in its header (after the lsn, the stream and the slot).
const COUNT_OFFSET: usize = record::HEADER_BYTES - 4;

/// One shard's messages on their way.
#[derive(Default)]
struct ShardBatches {
    /// The message requests join now.
    filling: Option<Batch>,
    /// Messages that are full, to be sent in this order before `filling`.
    full: VecDeque<Batch>,
    /// Messages sent and not yet acknowledged.
    in_flight: usize,
}

/// Every shard's messages, under one lock, with one task sending them.
struct Batches {
    shards: Vec<ShardBatches>,
    /// Whether a task is sending messages.
    sending: bool,
    /// The shard after the one whose message went last, where the next look for one to send starts.
    cursor: usize,
}

impl Batches {
    /// The next message to send, if any may go: a full one at once; one being filled when its shard awaits no ack.
    fn next(&mut self) -> Option<(u16, Batch)> {
        let count = self.shards.len();
        for shard in (0..count).map(|k| (self.cursor + k) % count) {
            let batches = &mut self.shards[shard];
            let batch = match batches.full.pop_front() {
                Some(batch) => batch,
                None if batches.in_flight == 0 => match batches.filling.take() {
                    Some(batch) => batch,
                    None => continue,
                },
                None => continue,
            };
            batches.in_flight += 1;
            self.cursor = (shard + 1) % count;
            return Some((shard as u16, batch));
        }
        None
    }

    /// Whether a message may go now: a sending task is to be started.
    fn ready(&self) -> bool {
        self.shards
            .iter()
            .any(|s| !s.full.is_empty() || (s.in_flight == 0 && s.filling.is_some()))
    }
}

/// Publish coalescing, as the log's group commit: a request's updates join its shards' messages being filled; a
/// shard's message is sent when the shard has no message awaiting its ack, or at once when it is full
/// ([`MAX_MESSAGE_UPDATES`], or [`message_limit`] bytes). So a quiet gateway sends a request's updates at once, and
/// a busy one sends, per ack, a message per shard holding everything that came in meanwhile: JetStream's cost per
/// message (its store, its ack, the delivery and the writer's ack) is shared by many requests. Fewer messages in
/// flight over all shards would fill each further, but would bound what few clients that each wait for their
/// answer can send through a NATS cluster far away (a few messages per round trip); one per shard keeps that bound
/// where one message per request had it. Each request is answered once every message holding its updates is
/// acknowledged, and a message that fails fails every request in it, with the answer one alone would get.
struct Coalescer {
    stream: &'static str,
    context: Context,
    signing: Arc<SigningKeys>,
    runtime: tokio::runtime::Handle,
    max_bytes: usize,
    batches: Mutex<Batches>,
}

impl Coalescer {
    fn new(stream: &'static str, context: Context, signing: Arc<SigningKeys>, max_payload: usize, shards: u16) -> Self {
        let shards = usize::from(shards.max(1));
        Coalescer {
            stream,
            context,
            signing,
            runtime: tokio::runtime::Handle::current(),
            max_bytes: message_limit(max_payload),
            batches: Mutex::new(Batches {
                shards: (0..shards).map(|_| ShardBatches::default()).collect(),
                sending: false,
                cursor: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Batches> {
        self.batches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a request's parts to their shards' messages; each receiver says what became of one part, with its
    /// update count.
    fn add(
        self: &Arc<Self>,
        parts: Vec<ShardMessage>,
    ) -> Vec<impl std::future::Future<Output = (Result<Outcome, oneshot::error::RecvError>, usize)>> {
        let mut waits = Vec::with_capacity(parts.len());
        let start = {
            let mut batches = self.lock();
            for part in parts {
                let shard = &mut batches.shards[usize::from(part.shard)];
                if shard.filling.as_ref().is_some_and(|b| !b.fits(&part, self.max_bytes)) {
                    let full = shard.filling.take();
                    shard.full.extend(full);
                }
                let receiver = shard.filling.get_or_insert_with(|| Batch::new(&part)).push(&part);
                let count = part.updates;
                waits.push(async move { (receiver.await, count) });
            }
            let start = !batches.sending && batches.ready();
            if start {
                batches.sending = true;
            }
            start
        };
        if start {
            self.runtime.spawn(self.clone().send());
        }
        waits
    }

    /// Sends every message that may go, then stops, to be started again by the next request or ack.
    async fn send(self: Arc<Self>) {
        loop {
            let next = {
                let mut batches = self.lock();
                let next = batches.next();
                if next.is_none() {
                    batches.sending = false;
                }
                next
            };
            let Some((shard, mut batch)) = next else {
                return;
            };
            let subject = subject(self.stream, shard);
            let (payload, id) = batch.finish();
            let signature = self.signing.sign_record(&subject, None, &payload);
            let message = PublishMessage::build()
                .payload(payload.into())
                .message_id(id)
                .header(SIGNATURE_HEADER, signature.as_str());
            match self.context.send_publish(subject, message).await {
                Ok(ack) => {
                    let this = self.clone();
                    self.runtime.spawn(async move {
                        let outcome = match ack.into_future().await {
                            Ok(ack) => Ok(ack.duplicate),
                            Err(e) => Err(format!("JetStream did not store the updates: {e}")),
                        };
                        batch.answer(outcome);
                        this.acknowledged(shard);
                    });
                }
                Err(e) => {
                    batch.answer(Err(format!("could not publish to JetStream: {e}")));
                    self.lock().shards[usize::from(shard)].in_flight -= 1;
                }
            }
        }
    }

    /// A message of `shard` is answered: others may go.
    fn acknowledged(self: &Arc<Self>, shard: u16) {
        let start = {
            let mut batches = self.lock();
            batches.shards[usize::from(shard)].in_flight -= 1;
            let start = !batches.sending && batches.ready();
            if start {
                batches.sending = true;
            }
            start
        };
        if start {
            self.runtime.spawn(self.clone().send());
        }
    }
}

/// A stream's publisher as the intake holds it, whatever its update type's bounds.
pub trait Publish<T>: Send + Sync {
    fn publish(&self, updates: Vec<T>, want_commit: bool) -> BoxFuture<'_, Result<Published, SubmitError>>;
    /// Whether the connection to NATS is up right now.
    fn is_connected(&self) -> bool;
}

impl<T: Update + RecordCodec + ShardKey + Sync> Publish<T> for Publisher<T> {
    fn publish(&self, updates: Vec<T>, want_commit: bool) -> BoxFuture<'_, Result<Published, SubmitError>> {
        Box::pin(Publisher::publish(self, updates, want_commit))
    }

    fn is_connected(&self) -> bool {
        Publisher::is_connected(self)
    }
}

/// One message of a request: its shard, how many updates it carries, its payload (a record) and the digest of
/// its content, which its `Nats-Msg-Id` is made of.
pub struct ShardMessage {
    pub shard: u16,
    pub updates: usize,
    pub payload: Vec<u8>,
    pub digest: [u8; 32],
}

/// `updates` as messages, one per shard (split when large), each shard's updates in request order.
pub fn messages<T: RecordCodec + ShardKey>(updates: &[T], shards: u16) -> Vec<ShardMessage> {
    let mut by_shard: std::collections::BTreeMap<u16, Vec<&T>> = std::collections::BTreeMap::new();
    for update in updates {
        by_shard.entry(shard_of(update, shards)).or_default().push(update);
    }
    let mut out = Vec::with_capacity(by_shard.len());
    for (shard, group) in by_shard {
        encode_split(shard, &group, &mut out);
    }
    out
}

/// Encodes `group` as one record, or as several when it would be larger than a message may be.
fn encode_split<T: RecordCodec>(shard: u16, group: &[&T], out: &mut Vec<ShardMessage>) {
    let (payload, digest) = record::encode_record_refs_with_digest(shard, group);
    if payload.len() <= MAX_MESSAGE_BYTES || group.len() == 1 {
        out.push(ShardMessage {
            shard,
            updates: group.len(),
            payload,
            digest,
        });
        return;
    }
    let (first, second) = group.split_at(group.len() / 2);
    encode_split(shard, first, out);
    encode_split(shard, second, out);
}

/// The message id of a content digest: its first 128 bits, as 32 hex digits.
fn message_id(digest: &[u8; 32]) -> String {
    crate::support::hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LocationUpdate;

    fn update(device: &str, second: i64) -> LocationUpdate {
        LocationUpdate {
            device_id: device.into(),
            recorded_at: time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(second),
            lat: 1.0,
            lon: 2.0,
            speed_kmh: None,
            heading_deg: None,
            accuracy_m: None,
            attributes: None,
            received_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_same_request_makes_the_same_messages_and_ids() {
        let request: Vec<_> = (0..50).map(|i| update(&format!("truck-{}", i % 7), i)).collect();
        let ids = |updates: &[LocationUpdate]| -> Vec<(u16, String)> {
            messages(updates, 4)
                .into_iter()
                .map(|m| (m.shard, message_id(&m.digest)))
                .collect()
        };
        assert_eq!(ids(&request), ids(&request.clone()));
        // A retry is the same updates received later: the same ids, though the records differ.
        let mut retry = request.clone();
        for update in &mut retry {
            update.received_at += time::Duration::seconds(3);
        }
        assert_eq!(ids(&request), ids(&retry));
        assert_ne!(messages(&request, 4)[0].payload, messages(&retry, 4)[0].payload);
        let mut other = request.clone();
        other[3].lat = 1.5;
        assert_ne!(ids(&request), ids(&other));
    }

    #[test]
    fn each_shard_keeps_its_updates_in_request_order_and_a_large_group_is_split() {
        let request: Vec<_> = (0..20_000).map(|i| update("one-device", i)).collect();
        let made = messages(&request, 16);
        assert!(made.len() > 1, "a group over the message size is split");
        assert!(made.iter().all(|m| m.payload.len() <= MAX_MESSAGE_BYTES));
        let decoded: Vec<LocationUpdate> = made
            .iter()
            .flat_map(|m| {
                let updates = record::decode_updates::<LocationUpdate>(&m.payload).unwrap();
                assert_eq!(updates.len(), m.updates);
                updates
            })
            .collect();
        assert_eq!(decoded, request);
    }

    #[test]
    fn a_shared_message_is_one_record_of_its_parts_and_a_part_alone_keeps_its_own_id() {
        let requests: Vec<Vec<LocationUpdate>> = (0..5)
            .map(|r| (0..3).map(|i| update(&format!("truck-{r}-{i}"), i)).collect())
            .collect();
        let parts: Vec<ShardMessage> = requests.iter().map(|r| messages(r, 1).remove(0)).collect();
        let mut batch = Batch::new(&parts[0]);
        let mut waiters: Vec<_> = parts.iter().map(|p| batch.push(p)).collect();
        // The same part again (a resend while its first copy is still waiting): answered, not sent twice.
        waiters.push(batch.push(&parts[1]));
        let (payload, id) = batch.finish();
        let decoded = record::decode_updates::<LocationUpdate>(&payload).unwrap();
        assert_eq!(decoded, requests.concat());
        assert_eq!(record::decode_header(&payload).unwrap().count, 15);
        assert_ne!(id, message_id(&parts[0].digest));

        let mut alone = Batch::new(&parts[2]);
        let _waiter = alone.push(&parts[2]);
        let (payload, id) = alone.finish();
        assert_eq!(payload, parts[2].payload);
        assert_eq!(
            id,
            message_id(&parts[2].digest),
            "a request alone keeps the id it always had"
        );

        batch.answer(Ok(false));
        let outcomes: Vec<bool> = waiters
            .into_iter()
            .map(|mut w| w.try_recv().unwrap().unwrap().duplicate)
            .collect();
        assert_eq!(outcomes, [false, false, false, false, false, true]);
    }
}
