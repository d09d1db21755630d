//! Recovery: the log directory as the previous run left it — its segments listed in log order for the replay,
//! and the highest sequence number in them, after which new records are numbered.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::info;

use super::file_io::{FileIo, PlainFiles};
use super::group::{State, Wal};
use super::segment::{create_segment, written_len, Accounting, ActiveSegment, Segment};
use super::{frame, open_error, record_lsn, WalConfig, WalObserver, WalOpenError};

/// The log directory as the previous run left it.
pub struct Recovery {
    /// Segments in log order. Each is removed once dropped and every update replayed from it is committed.
    pub segments: Vec<Arc<Segment>>,
    config: WalConfig,
    /// What the log writes its segments through.
    io: Arc<dyn FileIo>,
    accounting: Arc<Accounting>,
    next_seq: u64,
}

impl Recovery {
    /// Opens the log directory (creating it) and lists the segments of the previous run. The log writes its
    /// files as they are ([`PlainFiles`]).
    pub fn open(config: WalConfig, observer: Arc<dyn WalObserver>) -> Result<Self, WalOpenError> {
        Self::open_with(config, observer, Arc::new(PlainFiles))
    }

    /// [`open`](Self::open), writing the log's segments through `io`.
    pub fn open_with(
        config: WalConfig,
        observer: Arc<dyn WalObserver>,
        io: Arc<dyn FileIo>,
    ) -> Result<Self, WalOpenError> {
        fs::create_dir_all(&config.dir).map_err(open_error("could not create the log directory", &config.dir))?;
        let accounting = Arc::new(Accounting {
            live_bytes: AtomicU64::new(0),
            max_bytes: config.max_bytes,
            observer,
        });
        let mut found: Vec<(u64, PathBuf, u64)> = Vec::new();
        for entry in fs::read_dir(&config.dir).map_err(open_error("could not list", &config.dir))? {
            let entry = entry.map_err(open_error("could not list", &config.dir))?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".wal"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let len = written_len(&path).map_err(open_error("could not read", &path))?;
            found.push((seq, path, len));
        }
        found.sort();
        let next_seq = found.last().map_or(1, |(seq, _, _)| seq + 1);
        let segments = found
            .into_iter()
            .map(|(_, path, len)| {
                accounting.live_bytes.fetch_add(len, Ordering::AcqRel);
                accounting.observer.segments_changed(1);
                Arc::new(Segment {
                    path,
                    dir: config.dir.clone(),
                    bytes: AtomicU64::new(len),
                    keep: AtomicBool::new(false),
                    reported_faults: Mutex::new(Vec::new()),
                    damaged: AtomicBool::new(false),
                    accounting: accounting.clone(),
                })
            })
            .collect::<Vec<_>>();
        accounting
            .observer
            .bytes_on_disk(accounting.live_bytes.load(Ordering::Acquire));
        if !segments.is_empty() {
            info!(segments = segments.len(), dir = %config.dir.display(), "found write-ahead log segments to replay");
        }
        Ok(Recovery {
            segments,
            config,
            io,
            accounting,
            next_seq,
        })
    }

    /// Starts the log for new records, numbered from `next_lsn`.
    pub fn start(self, next_lsn: u64) -> Result<Wal, WalOpenError> {
        let (file, segment) = create_segment(self.io.as_ref(), &self.config, self.next_seq, &self.accounting)?;
        Ok(Wal {
            state: Mutex::new(State {
                buf: Vec::new(),
                pending: Vec::new(),
                next_lsn,
                leader_named: false,
                closed: false,
            }),
            file: Mutex::new(ActiveSegment {
                config: self.config,
                io: self.io,
                file,
                segment,
                seq: self.next_seq,
                zeroed_to: 0,
                spare: Vec::new(),
            }),
            file_free: tokio::sync::Notify::new(),
            accounting: self.accounting,
        })
    }

    /// The highest lsn in the segments (0 when there are none): new records are numbered after it.
    pub fn last_lsn(&self) -> Result<u64, WalOpenError> {
        // Records are numbered in file order, so the last segment that holds a readable record has the highest.
        for segment in self.segments.iter().rev() {
            let bytes = fs::read(&segment.path).map_err(open_error("could not read", &segment.path))?;
            let written = segment.durable_len().min(bytes.len() as u64) as usize;
            let last = frame::FrameReader::new(&bytes[..written]).filter_map(record_lsn).max();
            if let Some(lsn) = last {
                return Ok(lsn);
            }
        }
        Ok(0)
    }
}
