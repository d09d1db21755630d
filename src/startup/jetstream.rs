//! The JetStream side of the start (`INGEST_QUEUE=jetstream`): the NATS client on its own runtime, the streams
//! made or checked while the cluster settles, and the shard leases the writers hold in the database.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::runtime::Runtime;

use super::database::{self, Database};
use super::reload::Reloads;
use super::streams::{JetStreamParts, StreamHandle};
use super::Role;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::{DeadLetter, LocationUpdate, PollResult, Update};

/// How long a start waits for JetStream to answer (its cluster electing a leader) before it gives up.
const JETSTREAM_STARTUP_WAIT: Duration = Duration::from_secs(60);

/// A runtime for the NATS client, its shard consumers and their acks.
fn nats_runtime() -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("nats")
        .enable_all()
        .build()
        .context("could not start the NATS runtime")
}

/// The NATS client once the streams are built: flushed at the stop, so that the last acks go out; the lease
/// loop's stop signal; and the runtime they run on.
pub(super) type Nats = (async_nats::Client, Option<tokio::sync::watch::Sender<bool>>, Runtime);

/// Connects to NATS and makes (or checks) the three streams; what every stream needs from JetStream, and the
/// runtime it runs on.
pub(super) fn connect(
    settings: &Settings,
    role: Role,
    metrics: &Metrics,
    reloads: &Reloads,
) -> anyhow::Result<(JetStreamParts, Runtime)> {
    let consume = role == Role::Write || settings.jetstream.jetstream_local_writers;
    if consume && settings.pipeline.queue_capacity < settings.limits.max_updates {
        anyhow::bail!("INGEST_QUEUE_CAPACITY must hold at least INGEST_MAX_UPDATES updates with JetStream writers");
    }
    // Required: without it, whoever may publish in the NATS account writes past the keys and the rules.
    let Some(signing_path) = &settings.jetstream.jetstream_signing_key_file else {
        anyhow::bail!(
            "INGEST_QUEUE=jetstream needs INGEST_JETSTREAM_SIGNING_KEY_FILE: a file holding a key (`openssl rand \
                 -hex 32`), the same on every gateway and writer, with which records and commit notices are \
                 signed, so that nobody else who can publish to NATS can write updates"
        );
    };
    let signing = Arc::new(crate::intake::jetstream::signing::SigningKeys::load(signing_path)?);
    let reloaded = signing.clone();
    reloads.register("jetstream signing keys", move || reloaded.reload());
    let nats_runtime = nats_runtime()?;
    let js = crate::intake::jetstream::JetStreamSettings::from_settings(settings);
    let name = match role {
        Role::Serve => "ingest-gateway",
        Role::Write => "ingest-gateway-writer",
    };
    let client = nats_runtime.block_on(crate::intake::jetstream::connect(settings, name))?;
    nats_runtime.block_on(async {
        let context = async_nats::jetstream::new(client.clone());
        // A cluster that is electing leaders (a node just restarted) answers after a while: retried for
        // a bounded time; a mismatch with the settings is not retried.
        let deadline = tokio::time::Instant::now() + JETSTREAM_STARTUP_WAIT;
        for stream in [LocationUpdate::STREAM, PollResult::STREAM, DeadLetter::STREAM] {
            loop {
                match crate::intake::jetstream::ensure_stream(&context, stream, &js).await {
                    Ok(()) => break,
                    Err(e) if e.is::<crate::intake::jetstream::SettingsMismatch>() => return Err(e),
                    Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "JetStream not ready; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let parts = JetStreamParts {
        client,
        settings: js,
        publish: role == Role::Serve,
        consume,
        runtime: nats_runtime.handle().clone(),
        signing,
        metrics: metrics.jetstream.clone(),
    };
    Ok((parts, nats_runtime))
}

/// Starts the loop that holds this process's shard leases (advisory locks, in a session of their own), when its
/// streams have shards to consume.
pub(super) fn hold_leases(
    parts: JetStreamParts,
    nats_runtime: Runtime,
    runtime: &Runtime,
    database: &Database,
    streams: &[StreamHandle],
) -> anyhow::Result<Nats> {
    let sets: Vec<_> = streams.iter().flat_map(|s| &s.shards).cloned().collect();
    let lease_stop = if sets.is_empty() {
        None
    } else {
        // The leases' own session: its locks live exactly as long as it does.
        let lease_pool = database::pool(database, runtime, 1)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        runtime.spawn(crate::intake::jetstream::consume::hold_leases(
            lease_pool, sets, stopped,
        ));
        Some(stop)
    };
    Ok((parts.client, lease_stop, nats_runtime))
}
