//! The JetStream variant: a single `nats-server` with JetStream (file storage, fsync as it ships), one gateway that
//! only publishes (`INGEST_QUEUE=jetstream`, `INGEST_JETSTREAM_LOCAL_WRITERS=false`) and one `ingest-gateway write`
//! process, each with otherwise default settings. Rows landed are read from the writer's `/stats`; the CPU of each
//! of the three processes is reported per landed row in the variant's notes, and their sum as its CPU.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procs::{self, Monitor, Service};
use crate::variants::{gateway_stats, Bench, Measurement, Shape, Variant};

/// Whether `nats-server` is installed (the variant is skipped, with a note on stderr, when it is not).
pub fn nats_server_available() -> bool {
    Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Bench {
    fn ingest_process(&self, role: &str, slug: &str, nats_port: u16) -> anyhow::Result<(Service, PathBuf)> {
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        // Gateways and writers sign and check every record with a key they share; one per run, owner-only.
        let key_file = self.scratch("jetstream-signing.key");
        if !key_file.exists() {
            let mut key = [0u8; 32];
            std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)
                .context("random bytes for the JetStream signing key")?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&key_file, hex + "\n").context("write the JetStream signing key")?;
            std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        let key_file = key_file.display().to_string();
        let envs = [
            ("INGEST_QUEUE", "jetstream"),
            ("INGEST_NATS_URL", nats_url.as_str()),
            ("INGEST_JETSTREAM_LOCAL_WRITERS", "false"),
            ("INGEST_JETSTREAM_SIGNING_KEY_FILE", key_file.as_str()),
        ];
        self.start_ingest_process(role, slug, &envs, "/healthz")
    }

    /// Measures gateway → JetStream → writer → PostgreSQL once.
    pub fn jetstream(&self, variant: &Variant, round: u32, shape: Shape) -> anyhow::Result<Measurement> {
        let slug = format!("{}-{round}", variant.slug());
        let nats_port = procs::free_port()?;
        let monitor_port = procs::free_port()?;
        let store = self.scratch(&format!("{slug}-nats"));
        let mut nats = Command::new("nats-server");
        nats.args(["-js", "-a", "127.0.0.1"])
            .args(["-p", &nats_port.to_string(), "-m", &monitor_port.to_string()])
            .arg("-sd")
            .arg(&store);
        let nats = Service::start(
            "nats-server",
            nats,
            monitor_port,
            &self.scratch(&format!("{slug}-nats.log")),
            "/healthz",
            Duration::from_secs(30),
        )?;
        let (writer, writer_dir) = self.ingest_process("write", &format!("{slug}-writer"), nats_port)?;
        let (gateway, gateway_dir) = self.ingest_process("serve", &format!("{slug}-gateway"), nats_port)?;
        let writer_port = writer.port;
        let t0 = Instant::now();
        let monitor = Monitor::start(
            t0,
            writer.pid(),
            Box::new(move || gateway_stats(writer_port).map(|s| s.written)),
        );
        let wrk = self.wrk(shape, gateway.port)?;
        let accepted = wrk.accepted * shape.updates_per_request();
        let mut notes = Vec::new();
        // Everything accepted is in JetStream: wait until the writer has written it (all but the partial batches
        // that wait for the flush interval), or until its counter stands still.
        let start = Instant::now();
        let mut last = (0u64, Instant::now());
        loop {
            let written = gateway_stats(writer_port).map_or(0, |s| s.written);
            if written >= accepted {
                break;
            }
            if written != last.0 {
                last = (written, Instant::now());
            } else if last.1.elapsed() >= Duration::from_secs(12) {
                break;
            }
            if start.elapsed() > Duration::from_secs(180) {
                notes.push("the writer had not written everything 180 s after the load".to_owned());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(procs::PROGRESS_EVERY * 2);
        let seen = monitor.finish();
        let gateway_usage = gateway.stop(Duration::from_secs(60)).context("stopping the gateway")?;
        let writer_usage = writer.stop(Duration::from_secs(60)).context("stopping the writer")?;
        let nats_usage = nats.stop(Duration::from_secs(30)).context("stopping nats-server")?;
        for dir in [gateway_dir, writer_dir, store] {
            let _ = std::fs::remove_dir_all(dir);
        }
        let rows = self.admin.count_rows("location_updates")?;
        if rows < accepted {
            notes.push(format!("{} updates answered 202 are not in the table", accepted - rows));
        }
        let (landed_secs, landed_rows) =
            crate::variants::flow_end(&seen.samples).unwrap_or((t0.elapsed().as_secs_f64(), rows));
        let per_row = |secs: f64| secs * 1e6 / rows.max(1) as f64;
        notes.push(format!(
            "CPU µs per landed row: gateway {:.1}, writer {:.1}, nats-server {:.1} (CPU s: {:.1}, {:.1}, {:.1})",
            per_row(gateway_usage.cpu_secs),
            per_row(writer_usage.cpu_secs),
            per_row(nats_usage.cpu_secs),
            gateway_usage.cpu_secs,
            writer_usage.cpu_secs,
            nats_usage.cpu_secs
        ));
        Ok(Measurement {
            rows_per_sec: landed_rows as f64 / landed_secs.max(f64::MIN_POSITIVE),
            rows,
            accepted_rows_per_sec: Some(accepted as f64 / wrk.duration_secs),
            peak_rss_kib: Some(seen.peak_rss_kib.max(writer_usage.max_rss_kib)),
            cpu_secs: Some(gateway_usage.cpu_secs + writer_usage.cpu_secs + nats_usage.cpu_secs),
            cpu_parts: vec![
                ("gateway", gateway_usage.cpu_secs),
                ("writer", writer_usage.cpu_secs),
                ("nats-server", nats_usage.cpu_secs),
            ],
            load_cpu_secs: Some(wrk.cpu_secs),
            landed_secs,
            series: crate::variants::rates(&seen.samples),
            wrk: Some(wrk),
            notes,
            ..Measurement::default()
        })
    }
}
