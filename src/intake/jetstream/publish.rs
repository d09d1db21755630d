//! The gateway's side of JetStream: a request's updates are grouped by shard, each group becomes one message (a
//! record, as in the write-ahead log), and all of them are published at once; the request is answered once
//! JetStream has acknowledged every one.
//!
//! Each message's `Nats-Msg-Id` is a hash of its content (stream, shard and the encoded updates, less the time
//! each update was received, which is all a retry changes). A client that
//! retries a request (because its answer was lost, or because it got a 503 after part of the request was
//! stored) sends the same updates, which become the same messages with the same ids: within the duplicate window
//! JetStream stores each only once. Two different requests with identical updates are also stored once — which
//! is what the natural key would make of them in PostgreSQL anyway.
//!
//! Every message is signed ([`super::signing`]) over its subject, its reply subject and its bytes; with a commit
//! asked for, the answer believes only signed notices for the messages this request stored.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use async_nats::Subscriber;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use prometheus::IntCounterVec;

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
    stream: PhantomData<fn(T)>,
}

impl<T: Update + RecordCodec + ShardKey> Publisher<T> {
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
        Self {
            client,
            context,
            shards,
            timeout,
            signing,
            notices_refused,
            stream: PhantomData,
        }
    }

    /// Whether the connection to NATS is up right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes `updates` and returns once JetStream has stored them all; any failure (NATS unreachable, no
    /// quorum, the stream full, no ack within the timeout) refuses the whole request, which the client retries.
    pub async fn publish(&self, updates: Vec<T>, want_commit: bool) -> Result<Published, SubmitError> {
        if !self.is_connected() {
            return Err(SubmitError::Unavailable("not connected to NATS".to_owned()));
        }
        let commits = if want_commit {
            let inbox = self.client.new_inbox();
            let subscriber = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| SubmitError::Unavailable(format!("could not subscribe for commit notices: {e}")))?;
            Some((inbox, subscriber))
        } else {
            None
        };
        let messages = messages(&updates, self.shards);
        let mut acks = Vec::with_capacity(messages.len());
        let mut sizes = Vec::with_capacity(messages.len());
        let publish_all = async {
            for ShardMessage {
                shard,
                updates: count,
                payload,
                id,
            } in messages
            {
                let subject = subject(T::STREAM, shard);
                let reply = commits.as_ref().map(|(inbox, _)| inbox.as_str());
                let signature = self.signing.sign_record(&subject, reply, &payload);
                let mut message = PublishMessage::build()
                    .payload(payload.into())
                    .message_id(id)
                    .header(SIGNATURE_HEADER, signature.as_str());
                if let Some(inbox) = reply {
                    message = message.header(COMMIT_REPLY_HEADER, inbox);
                }
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
        published.commits = commits.map(|(inbox, subscriber)| CommitNotices {
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

/// One message of a request: its shard, how many updates it carries, its payload (a record) and its
/// `Nats-Msg-Id`.
pub struct ShardMessage {
    pub shard: u16,
    pub updates: usize,
    pub payload: Vec<u8>,
    pub id: String,
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
            id: message_id(&digest),
        });
        return;
    }
    let (first, second) = group.split_at(group.len() / 2);
    encode_split(shard, first, out);
    encode_split(shard, second, out);
}

/// The message id of a content digest: its first 128 bits, as 32 hex digits.
fn message_id(digest: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    digest[..16]
        .iter()
        .flat_map(|byte| [HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]])
        .map(char::from)
        .collect()
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
            messages(updates, 4).into_iter().map(|m| (m.shard, m.id)).collect()
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
}
