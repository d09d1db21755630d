//! One stream, built the same way whatever its update type: its queue, its batch writers, the feed that replays
//! the previous run's log into it, and its intake.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::runtime::Handle;

use crate::db::Checkpoints;
use crate::intake::feed::LogFeed;
use crate::intake::jetstream::consume::{ShardConsumers, ShardSet, Trust};
use crate::intake::jetstream::publish::Publisher;
use crate::intake::jetstream::signing::SigningKeys;
use crate::intake::jetstream::{checkpoint_instance, JetStreamSettings, ShardKey};
use crate::intake::record::RecordCodec;
use crate::intake::{Drain, Gate, Intake};
use crate::metrics::{JetStreamMetrics, StreamMetrics};
use crate::model::recheck::Recheck;
use crate::model::Update;
use crate::pipeline::{self, Backoff, BatchPolicy, BatchWriter, CopyRecord};
use crate::wal::{Segment, Wal};

/// An update type the gateway takes: validated from JSON (and again when read back from JetStream), logged (or
/// published), written by `COPY`.
pub trait Stream: Update + RecordCodec + CopyRecord + ShardKey + Recheck + Sync {}
impl<T: Update + RecordCodec + CopyRecord + ShardKey + Recheck + Sync> Stream for T {}

/// What a stream needs with `INGEST_QUEUE=jetstream`.
#[derive(Clone)]
pub struct JetStreamParts {
    pub client: async_nats::Client,
    pub settings: JetStreamSettings,
    /// Whether this process takes updates (publishes them); `false` for `ingest-gateway write`.
    pub publish: bool,
    /// Whether this process runs writers fed from JetStream.
    pub consume: bool,
    /// The runtime the shard consumers and acks run on.
    pub runtime: Handle,
    /// The key records and commit notices are signed with.
    pub signing: Arc<SigningKeys>,
    /// What is refused at the trust boundary.
    pub metrics: JetStreamMetrics,
}

/// What every stream is built from.
pub struct StreamParts<'a> {
    /// The gateway's identity, under which its writers record their log positions.
    pub instance: Arc<str>,
    pub pool: &'a Pool,
    /// The database runtime, which the writers enter to do IO.
    pub runtime: Handle,
    pub policy: BatchPolicy,
    /// Whether writers keep the "latest per key" tables.
    pub keep_latest: bool,
    pub writers: usize,
    pub capacity: usize,
    /// About how much memory a stream's queued updates may take.
    pub max_bytes: usize,
    /// The log new submissions go to; `None` with `durability=memory`.
    pub wal: Option<Arc<Wal>>,
    /// The segments the previous run left, oldest first: every stream replays its own records from them.
    pub recovered: Vec<Arc<Segment>>,
    pub gate: Gate,
    /// Longest a `?ack=commit` submission waits for its commit.
    pub commit_wait: Duration,
    /// Set with `INGEST_QUEUE=jetstream`.
    pub jetstream: Option<JetStreamParts>,
}

/// A running stream, as the stop sequence sees it.
pub struct StreamHandle {
    pub name: &'static str,
    pub drain: Arc<dyn Drain>,
    /// The feed's refill thread: finishes once the log is closed and its backlog queued.
    pub feed: JoinHandle<()>,
    /// The writers: finish once the queue is closed and drained.
    pub writers: Vec<JoinHandle<()>>,
    /// With JetStream writers: the stream's shards, for the lease loop.
    pub shards: Option<Arc<dyn ShardSet>>,
}

impl StreamParts<'_> {
    /// Builds stream `T`: its writers start at once, its feed starts replaying what the previous run left.
    pub fn build<T: Stream>(
        &self,
        metrics: &StreamMetrics,
        checkpoints: &mut Checkpoints,
    ) -> anyhow::Result<(Arc<Intake<T>>, StreamHandle)> {
        let queue = pipeline::bounded::<T>(self.capacity, self.max_bytes, self.writers);
        metrics.queue_capacity.set(self.capacity as i64);
        // JetStream writers record each shard's stream sequence under the stream's shared identity, whichever
        // process writes the shard.
        let instance: Arc<str> = match &self.jetstream {
            Some(_) => checkpoint_instance(T::STREAM).into(),
            None => self.instance.clone(),
        };
        let writer_count = match &self.jetstream {
            Some(js) if !js.consume => 0,
            _ => self.writers,
        };
        let mut writers = Vec::with_capacity(writer_count);
        for slot in 0..writer_count {
            let writer = BatchWriter {
                name: format!("{}-writer-{slot}", T::STREAM),
                stream: T::STREAM,
                instance: instance.clone(),
                keep_latest: self.keep_latest,
                source: queue.receiver(slot),
                policy: self.policy,
                backoff: Backoff::default(),
                pool: self.pool.clone(),
                runtime: self.runtime.clone(),
                metrics: metrics.clone(),
            };
            writers.push(writer.spawn().context("could not start a batch writer thread")?);
        }
        let feed = LogFeed::new(
            queue.clone(),
            self.recovered.clone(),
            checkpoints.remove(T::STREAM).unwrap_or_default(),
            metrics.clone(),
        );
        let feed_thread = feed.spawn().context("could not start a log feed thread")?;
        let mut intake = Intake::new(
            queue.clone(),
            self.wal.clone(),
            feed,
            self.gate.clone(),
            metrics.clone(),
            writers.iter().map(|w| w.state.clone()).collect(),
            self.commit_wait,
        );
        let mut shards: Option<Arc<dyn ShardSet>> = None;
        if let Some(js) = &self.jetstream {
            // A JetStream context starts its ack task on the runtime it is made in.
            let _inside = js.runtime.enter();
            if js.publish {
                let publisher = Publisher::<T>::new(
                    js.client.clone(),
                    js.settings.shards,
                    js.settings.publish_timeout,
                    js.signing.clone(),
                    js.metrics.commit_notices_refused.clone(),
                );
                intake = intake.with_publisher(Box::new(publisher));
            }
            if js.consume {
                // Exported from the start, so that an alert on them has a series to watch.
                for reason in ["unsigned", "bad_signature", "undecodable"] {
                    js.metrics.records_refused.with_label_values(&[T::STREAM, reason]);
                }
                js.metrics.updates_invalid.with_label_values(&[T::STREAM]);
                shards = Some(Arc::new(ShardConsumers {
                    context: async_nats::jetstream::new(js.client.clone()),
                    queue,
                    shards: js.settings.shards,
                    ack_wait: js.settings.ack_wait,
                    runtime: js.runtime.clone(),
                    trust: Arc::new(Trust {
                        signing: js.signing.clone(),
                        rules: js.settings.recheck,
                        inbox_prefix: js.settings.inbox_prefix.clone(),
                        pool: self.pool.clone(),
                        database: self.runtime.clone(),
                        metrics: js.metrics.clone(),
                    }),
                }));
            }
        }
        let intake = Arc::new(intake);
        let handle = StreamHandle {
            name: T::STREAM,
            drain: intake.clone(),
            feed: feed_thread,
            writers: writers.into_iter().map(|w| w.thread).collect(),
            shards,
        };
        Ok((intake, handle))
    }
}
