//! What a 202 promises with the write-ahead log: the gateway keeps taking updates while PostgreSQL is away
//! (until the log is full), loses none across a damaged log tail, stores a retried update once, isolates a
//! row the table refuses, answers `?ack=commit` only once the rows are committed, and on a full disk refuses what
//! it cannot write and takes updates again once space returns.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ingest_gateway::config::Durability;
use ingest_gateway::db::EmbeddedPostgres;
use ingest_gateway::wal::file_io::{FileIo, PlainFiles, SegmentFile};

use crate::helpers::{
    eventually, fresh_database, location_array, location_json, spawn_app, spawn_app_on, spawn_app_with_log_files, Db,
    Ledger,
};

const LOCATION: &str = "/api/v1/location/update";

/// Posts single updates `<tag>-0` … `<tag>-<n-1>` one after another.
fn post_singles(app: &crate::helpers::TestApp, tag: &str, n: usize) -> Ledger {
    let mut ledger = Ledger::default();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let answer = app.post_json(LOCATION, &location_json(&id));
        match answer.status {
            202 => ledger.acknowledged.insert(id),
            503 => ledger.refused.insert(id),
            other => panic!("unexpected {other}: {}", answer.body),
        };
    }
    ledger
}

fn stored_ids(db: &Db) -> BTreeSet<String> {
    db.device_ids()
        .into_iter()
        .map(|(id, n)| {
            assert_eq!(n, 1, "{id} stored {n} times");
            id
        })
        .collect()
}

#[test]
fn with_the_log_updates_are_taken_past_the_queue_while_the_database_is_down_and_all_land() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().unwrap();
    let name = fresh_database(&cluster);
    let mut app = spawn_app_on(cluster.config(&name), |s| {
        s.pipeline.queue_capacity = 50;
        s.pipeline.batch_size = 20;
    });
    cluster.stop();

    let ledger = post_singles(&app, "behind", 400);

    assert_eq!(
        ledger.acknowledged.len(),
        400,
        "the log, not the queue, bounds what is taken"
    );
    let stats = app.get("/stats").json();
    assert!(
        stats["streams"]["location"]["wal_backlog_bytes"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(
        stats["streams"]["location"]["queue_depth"].as_u64().unwrap() <= 50,
        "memory stays bounded"
    );
    cluster.restart().unwrap();
    app.db = Db::connect(cluster.config(&name));
    eventually("every update lands", Duration::from_secs(60), || {
        app.db.count("location_updates") == 400
    });
    assert!(app.stop().is_clean());
    assert_eq!(stored_ids(&app.db), ledger.acknowledged);
    let files: Vec<_> = std::fs::read_dir(app.data_dir.join("wal")).unwrap().collect();
    assert!(files.is_empty(), "a drained log leaves no segment behind: {files:?}");
}

#[test]
fn a_full_log_answers_503_with_retry_after_and_every_202_lands_once_the_database_is_back() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().unwrap();
    let name = fresh_database(&cluster);
    let mut app = spawn_app_on(cluster.config(&name), |s| {
        s.pipeline.queue_capacity = 20;
        s.storage.wal_max_bytes = 16 * 1024;
    });
    cluster.stop();

    let mut ledger = Ledger::default();
    let mut saw_log_full = false;
    for i in 0..400 {
        let id = format!("full-{i}");
        let answer = app.post_json(LOCATION, &location_json(&id));
        match answer.status {
            202 => {
                ledger.acknowledged.insert(id);
            }
            503 => {
                assert_eq!(answer.retry_after.as_deref(), Some("1"));
                assert_eq!(answer.json()["error"], "overloaded");
                saw_log_full = true;
                ledger.refused.insert(id);
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    assert!(
        saw_log_full && !ledger.acknowledged.is_empty(),
        "{} acknowledged",
        ledger.acknowledged.len()
    );
    let stats = app.get("/stats").json();
    assert_eq!(
        stats["streams"]["location"]["rejected_by_reason"]["log_full"]
            .as_u64()
            .unwrap() as usize,
        ledger.refused.len()
    );
    assert!(stats["wal"]["bytes"].as_u64().unwrap() <= 16 * 1024);

    cluster.restart().unwrap();
    app.db = Db::connect(cluster.config(&name));
    let expected = ledger.acknowledged.len() as i64;
    eventually("the log drains", Duration::from_secs(60), || {
        app.db.count("location_updates") == expected
    });
    assert_eq!(
        app.post_json(LOCATION, &location_json("after")).status,
        202,
        "room again once written"
    );
    assert!(app.stop().is_clean());
    let mut stored = stored_ids(&app.db);
    assert!(stored.remove("after"));
    assert_eq!(stored, ledger.acknowledged);
}

#[test]
fn a_torn_or_bit_flipped_log_is_survived_and_every_intact_update_lands() {
    let mut cluster = EmbeddedPostgres::start_ephemeral().unwrap();
    let name = fresh_database(&cluster);
    let data_dir = tempfile::tempdir().unwrap();
    let dir = data_dir.path().to_owned();
    let tune = move |s: &mut ingest_gateway::config::Settings| {
        s.storage.data_dir = dir.clone();
        s.pipeline.shutdown_timeout = Duration::from_secs(1);
    };
    let mut app = spawn_app_on(cluster.config(&name), tune.clone());
    cluster.stop();
    let ledger = post_singles(&app, "torn", 30);
    assert_eq!(ledger.acknowledged.len(), 30);
    assert!(
        !app.stop().is_clean(),
        "the database is down: the stop times out and the log keeps the updates"
    );

    // Damage the log: flip a byte inside record 10 and cut the last record short.
    let wal_dir = data_dir.path().join("wal");
    let mut segments: Vec<_> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let path = segments
        .iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&path).unwrap();
    let mut frames = Vec::new();
    let mut offset = 0;
    // The segment is zero-filled ahead of its records: a zero header is where they end.
    while offset + 8 <= bytes.len() && bytes[offset..offset + 8] != [0u8; 8] {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        frames.push((offset, len));
        offset += 8 + len;
    }
    assert_eq!(frames.len(), 30, "one record per request, all in the first segment");
    let (flip_at, flip_len) = frames[10];
    bytes[flip_at + 8 + flip_len / 2] ^= 0x20;
    let (last_at, _) = frames[29];
    bytes.truncate(last_at + 12);
    std::fs::write(&path, &bytes).unwrap();

    cluster.restart().unwrap();
    let mut app = spawn_app_on(cluster.config(&name), tune);
    eventually("the intact updates land", Duration::from_secs(30), || {
        app.db.count("location_updates") == 28
    });
    let stats = app.get("/stats").json();
    assert_eq!(stats["wal"]["corrupt_records"], 2, "{stats}");
    assert!(app.stop().is_clean());
    let mut expected = ledger.acknowledged.clone();
    expected.remove("torn-10");
    expected.remove("torn-29");
    assert_eq!(stored_ids(&app.db), expected);
}

#[test]
fn the_same_request_sent_three_times_is_stored_once_and_counted_as_duplicates() {
    let mut app = spawn_app(|_| {});
    let body = location_array("retry", 5);
    for _ in 0..3 {
        assert_eq!(app.post_json(LOCATION, &body).status, 202);
        // One request per batch, so that the repeats meet rows already committed.
        eventually("the batch is written", Duration::from_secs(10), || {
            app.get("/stats").json()["streams"]["location"]["queue_depth"] == 0
        });
    }
    // And twice within one batch: the first is kept; the second, with another latitude, is a conflict, kept in
    // dead_letters rather than stored or absorbed.
    let same = location_json("same");
    let twice = format!("[{same},{}]", same.replace("48.85", "48.86"));
    assert_eq!(app.post_json(LOCATION, &twice).status, 202);
    assert!(app.stop().is_clean());
    let rows: Vec<String> = app
        .db
        .query("SELECT device_id || ' ' || recorded_at::text FROM location_updates ORDER BY 1")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows.len(), 6, "{rows:?}");
    let kept: Vec<String> = app
        .db
        .query("SELECT reason FROM dead_letters")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kept, ["conflict"]);
}

#[test]
fn duplicates_are_counted_in_stats_and_metrics() {
    let app = spawn_app(|_| {});
    let body = location_array("dup", 3);
    for _ in 0..2 {
        assert_eq!(app.post_json(LOCATION, &body).status, 202);
        eventually("written", Duration::from_secs(10), || {
            app.get("/stats").json()["streams"]["location"]["queue_depth"] == 0
        });
    }
    let stats = app.get("/stats").json();
    assert_eq!(stats["streams"]["location"]["duplicate"], 3);
    assert_eq!(stats["streams"]["location"]["written"], 3);
    let metrics = app.get("/metrics").body;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"ingest_updates_duplicate_total{stream="location"} 3"#),
        "{metrics}"
    );
}

#[test]
fn a_row_the_table_refuses_goes_to_dead_letters_with_the_error_and_the_rest_of_its_batch_lands() {
    let mut app = spawn_app(|_| {});
    app.db
        .execute("ALTER TABLE location_updates ADD CONSTRAINT no_poison CHECK (device_id <> 'poison')");
    let mut updates: Vec<String> = (0..49).map(|i| location_json(&format!("good-{i}"))).collect();
    updates.insert(17, location_json("poison"));
    let body = format!("[{}]", updates.join(","));

    assert_eq!(app.post_json(LOCATION, &body).status, 202);

    // The rows are visible at the commit, the counter just after it: wait for both.
    eventually(
        "the batch is written and its dead letter counted",
        Duration::from_secs(10),
        || app.db.count("location_updates") == 49 && app.location_stat("dead_lettered") == 1,
    );
    assert!(app.stop().is_clean());
    let dead = app
        .db
        .query("SELECT stream, payload->>'device_id', error, sqlstate FROM dead_letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].get::<_, String>(0), "location");
    assert_eq!(dead[0].get::<_, String>(1), "poison");
    assert!(
        dead[0].get::<_, String>(2).contains("no_poison"),
        "{}",
        dead[0].get::<_, String>(2)
    );
    assert_eq!(dead[0].get::<_, String>(3), "23514");
    assert!(!stored_ids(&app.db).contains("poison"));
}

#[test]
fn a_trigger_that_raises_dead_letters_its_rows_and_a_duplicate_in_the_same_batch_is_still_absorbed() {
    let mut app = spawn_app(|_| {});
    app.db.execute(
        "CREATE FUNCTION refuse_nan_island() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.device_id LIKE 'island-%' THEN RAISE EXCEPTION 'no trucks on the island'; END IF; RETURN NEW; \
         END $$; \
         CREATE TRIGGER refuse_island BEFORE INSERT ON location_updates FOR EACH ROW EXECUTE FUNCTION refuse_nan_island()",
    );
    let first = location_json("kept");
    assert_eq!(app.post_json(LOCATION, &format!("[{first}]")).status, 202);
    eventually("written", Duration::from_secs(10), || {
        app.db.count("location_updates") == 1
    });
    let body = format!(
        "[{first},{},{},{}]",
        location_json("island-1"),
        location_json("new-1"),
        location_json("island-2")
    );
    assert_eq!(app.post_json(LOCATION, &body).status, 202);
    assert!(app.stop().is_clean());
    assert_eq!(
        stored_ids(&app.db),
        BTreeSet::from(["kept".to_owned(), "new-1".to_owned()])
    );
    let dead = app
        .db
        .query("SELECT payload->>'device_id', sqlstate FROM dead_letters ORDER BY 1");
    let dead: Vec<(String, String)> = dead.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        dead,
        [
            ("island-1".to_owned(), "P0001".to_owned()),
            ("island-2".to_owned(), "P0001".to_owned())
        ]
    );
}

#[test]
fn ack_commit_answers_only_once_the_rows_are_committed_in_both_durability_modes() {
    for durability in [Durability::Wal, Durability::Memory] {
        // An hour-long interval: only `?ack=commit` can get these rows written now.
        let app = spawn_app(|s| {
            s.pipeline.flush_interval = Duration::from_secs(3600);
            s.storage.durability = durability;
        });
        let answer = app.post_json(&format!("{LOCATION}?ack=commit"), &location_array("commit", 3));
        assert_eq!(answer.status, 202, "{}", answer.body);
        assert_eq!(answer.json(), serde_json::json!({"accepted": 3, "committed": true}));
        assert_eq!(
            app.db.count("location_updates"),
            3,
            "{durability:?}: committed before the answer"
        );
        assert_eq!(
            app.post_json(&format!("{LOCATION}?ack=maybe"), &location_json("x"))
                .status,
            400
        );
    }
}

#[test]
fn memory_durability_writes_without_a_log() {
    let mut app = spawn_app(|s| s.storage.durability = Durability::Memory);
    assert_eq!(app.post_json(LOCATION, &location_array("mem", 10)).status, 202);
    assert_eq!(app.get("/stats").json()["durability"], "memory");
    assert!(app.stop().is_clean());
    assert_eq!(app.db.count("location_updates"), 10);
    let wal = app.data_dir.join("wal");
    assert!(std::fs::read_dir(&wal).map_or(true, |mut d| d.next().is_none()));
}

/// A disk of `room` bytes under the log, through its file-I/O seam: a write that passes the room writes what fits
/// (a short write) and the next one fails with `ENOSPC`, as a full filesystem does. Files the log removes do not give
/// their room back; [`Disk::grow`] is space coming back.
struct Disk {
    room: std::sync::atomic::AtomicU64,
    used: std::sync::Mutex<u64>,
}

impl Disk {
    fn new(room: u64) -> Arc<Self> {
        Arc::new(Disk {
            room: room.into(),
            used: std::sync::Mutex::new(0),
        })
    }

    fn grow(&self, bytes: u64) {
        self.room.fetch_add(bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

struct DiskFiles(Arc<Disk>);

impl FileIo for DiskFiles {
    fn create(&self, path: &std::path::Path) -> std::io::Result<Box<dyn SegmentFile>> {
        Ok(Box::new(DiskFile {
            file: PlainFiles.create(path)?,
            len: 0,
            disk: self.0.clone(),
        }))
    }
}

struct DiskFile {
    file: Box<dyn SegmentFile>,
    len: u64,
    disk: Arc<Disk>,
}

impl SegmentFile for DiskFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        let mut used = self.disk.used.lock().unwrap();
        let room = self.disk.room.load(std::sync::atomic::Ordering::SeqCst);
        // Bytes of this file past which the disk is full.
        let limit = self.len + room.saturating_sub(*used);
        let fits = limit.saturating_sub(offset).min(buf.len() as u64) as usize;
        if fits == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let written = self.file.write_at(&buf[..fits], offset)?;
        let end = offset + written as u64;
        if end > self.len {
            *used += end - self.len;
            self.len = end;
        }
        Ok(written)
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        let mut used = self.disk.used.lock().unwrap();
        *used = (*used + len).saturating_sub(self.len);
        self.len = len;
        Ok(())
    }
}

#[test]
fn a_full_disk_answers_503_acknowledges_only_what_it_wrote_and_takes_updates_again_once_space_returns() {
    let disk = Disk::new(64 * 1024);
    let mut app = spawn_app_with_log_files(Arc::new(DiskFiles(disk.clone())), |_| {});

    let mut ledger = Ledger::default();
    let mut storage_errors = 0;
    let mut i = 0;
    // Until the disk has refused a good many requests in a row: it is full, not merely fragmented.
    while storage_errors < 20 {
        assert!(i < 10_000, "64 KiB never filled");
        let id = format!("disk-{i}");
        i += 1;
        let answer = app.post_json(LOCATION, &location_array(&id, 20));
        let ids = (0..20).map(|k| format!("{id}-{k}"));
        match answer.status {
            202 => ledger.acknowledged.extend(ids),
            503 => {
                assert_eq!(answer.json()["error"], "storage_unavailable", "{}", answer.body);
                assert!(answer.retry_after.is_some());
                ledger.refused.extend(ids);
                storage_errors += 1;
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    assert!(!ledger.acknowledged.is_empty());
    let metrics = app.get("/metrics").body;
    let write_errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ingest_wal_write_errors_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(write_errors.is_some_and(|n| n >= 20.0), "{write_errors:?}");

    disk.grow(1 << 30);
    let after = app.post_json(LOCATION, &location_json("after-disk-full"));
    assert_eq!(after.status, 202, "space again: {}", after.body);
    ledger.acknowledged.insert("after-disk-full".to_owned());
    let expected = ledger.acknowledged.len() as i64;
    eventually("every acknowledged update lands", Duration::from_secs(60), || {
        app.db.count("location_updates") >= expected
    });
    assert!(app.stop().is_clean());
    let stored = app.db.device_ids();
    ledger.assert_stored_exactly_once("full disk through the file-I/O seam", &stored);
}

#[test]
#[ignore = "needs root to mount a tmpfs"]
fn a_full_tmpfs_answers_503_and_loses_nothing_that_was_acknowledged() {
    // A 256 KiB filesystem for the log; needs root to mount, which CI has.
    let mount = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(mount.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "mounting a small tmpfs needs root (as in CI): run the tests as root"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.path().to_owned());

    let mut cluster = EmbeddedPostgres::start_ephemeral().unwrap();
    let name = fresh_database(&cluster);
    let dir = mount.path().to_owned();
    let mut app = spawn_app_on(cluster.config(&name), |s| {
        s.storage.data_dir = dir;
        s.pipeline.queue_capacity = 10;
    });
    cluster.stop();
    let mut ledger = Ledger::default();
    let mut storage_errors = 0;
    for i in 0..400 {
        let id = format!("disk-{i}");
        let answer = app.post_json(LOCATION, &location_array(&id, 20));
        match answer.status {
            202 => {
                ledger.acknowledged.extend((0..20).map(|k| format!("{id}-{k}")));
            }
            503 => {
                assert_eq!(answer.json()["error"], "storage_unavailable", "{}", answer.body);
                assert!(answer.retry_after.is_some());
                storage_errors += 1;
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    assert!(
        storage_errors > 0 && !ledger.acknowledged.is_empty(),
        "{storage_errors} refused"
    );
    cluster.restart().unwrap();
    app.db = Db::connect(cluster.config(&name));
    let expected = ledger.acknowledged.len() as i64;
    eventually("the log drains", Duration::from_secs(60), || {
        app.db.count("location_updates") == expected
    });
    let after = app.post_json(LOCATION, &location_json("after-disk-full"));
    assert_eq!(after.status, 202, "space again once written: {}", after.body);
    assert!(app.stop().is_clean());
    let mut stored = stored_ids(&app.db);
    assert!(stored.remove("after-disk-full"));
    assert_eq!(stored, ledger.acknowledged);
}
