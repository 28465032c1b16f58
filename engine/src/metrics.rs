//! I/O and sync-point measurements for the control plane's `/metrics`: per export and protocol,
//! requests, bytes, errors by kind and latency histograms; sync-point latency; the disk
//! operations in flight. Kept with atomics (errors, rare, behind a lock) so that the I/O path
//! only adds. Totals outlive sessions: they are kept per export name.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::pool::Pool;

/// Latency bucket bounds, in seconds: 50 µs to 1 s.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A latency histogram with the fixed buckets above.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; observations above the last bound count only in
    /// `count`.
    buckets: [AtomicU64; LATENCY_BUCKETS_SECONDS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A histogram as read: cumulative buckets `(upper bound, count)`, without `+Inf`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS_SECONDS.iter().position(|&b| seconds <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS_SECONDS
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (bound, cumulative)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The operations measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOp {
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
    BlockStatus,
}

impl RequestOp {
    pub const ALL: [RequestOp; 6] = [
        RequestOp::Read,
        RequestOp::Write,
        RequestOp::WriteZeroes,
        RequestOp::Trim,
        RequestOp::Flush,
        RequestOp::BlockStatus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RequestOp::Read => "read",
            RequestOp::Write => "write",
            RequestOp::WriteZeroes => "write_zeroes",
            RequestOp::Trim => "trim",
            RequestOp::Flush => "flush",
            RequestOp::BlockStatus => "block_status",
        }
    }
}

#[derive(Debug, Default)]
struct OpIo {
    requests: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
}

/// What one export (by protocol) has served since the server started.
#[derive(Debug, Default)]
pub struct ExportIo {
    ops: [OpIo; 6],
    /// Failed requests by operation and error kind.
    errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl ExportIo {
    pub(crate) fn observe<T>(
        &self,
        op: RequestOp,
        bytes: u64,
        elapsed: Duration,
        result: &Result<T>,
    ) {
        let stats = &self.ops[op as usize];
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.latency.observe(elapsed);
        match result {
            Ok(_) => {
                stats.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(error) => {
                *self
                    .errors
                    .lock()
                    .entry((op.name(), error_kind(error)))
                    .or_default() += 1;
            }
        }
    }
}

/// A short, stable name for an error's kind (a label value).
pub fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::NotFound { .. } => "not_found",
        Error::AlreadyExists { .. } => "already_exists",
        Error::InvalidArgument(_) => "invalid_argument",
        Error::Ambiguous { .. } => "ambiguous",
        Error::Conflict(_) => "conflict",
        Error::ReadOnly(_) => "read_only",
        Error::OutOfRange { .. } => "out_of_range",
        Error::NoSpace => "no_space",
        Error::Corrupt { .. } => "corrupt",
        Error::Poisoned => "pool_failed",
        _ => "io",
    }
}

/// One export's figures, as read.
#[derive(Clone, Debug)]
pub struct ExportIoSnapshot {
    pub protocol: String,
    pub export: String,
    pub ops: Vec<OpSnapshot>,
    /// (operation, error kind, count).
    pub errors: Vec<(&'static str, &'static str, u64)>,
}

#[derive(Clone, Debug)]
pub struct OpSnapshot {
    pub op: RequestOp,
    pub requests: u64,
    pub bytes: u64,
    pub latency: HistogramSnapshot,
}

/// Every export's figures, and the pool's own.
#[derive(Debug, Default)]
pub struct IoMetrics {
    exports: Mutex<HashMap<(String, String), Arc<ExportIo>>>,
    /// Sync points: from the data sync to the journal record being durable.
    pub(crate) sync_latency: Histogram,
}

impl IoMetrics {
    /// The measurements of `export` served over `protocol`, shared by its sessions.
    pub(crate) fn export(&self, protocol: &str, export: &str) -> Arc<ExportIo> {
        self.exports
            .lock()
            .entry((protocol.to_string(), export.to_string()))
            .or_default()
            .clone()
    }
}

/// Disk operations submitted to the backend and not yet completed (the queue depth).
pub(crate) static DISK_OPS_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

impl Pool {
    /// What every export has served, by protocol, since the server started.
    pub fn io_metrics(&self) -> Vec<ExportIoSnapshot> {
        let exports: Vec<((String, String), Arc<ExportIo>)> = self
            .inner
            .metrics
            .exports
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out: Vec<ExportIoSnapshot> = exports
            .into_iter()
            .map(|((protocol, export), io)| ExportIoSnapshot {
                protocol,
                export,
                ops: RequestOp::ALL
                    .iter()
                    .map(|&op| {
                        let stats = &io.ops[op as usize];
                        OpSnapshot {
                            op,
                            requests: stats.requests.load(Ordering::Relaxed),
                            bytes: stats.bytes.load(Ordering::Relaxed),
                            latency: stats.latency.snapshot(),
                        }
                    })
                    .collect(),
                errors: io
                    .errors
                    .lock()
                    .iter()
                    .map(|(&(op, kind), &n)| (op, kind, n))
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| (&a.export, &a.protocol).cmp(&(&b.export, &b.protocol)));
        out
    }

    /// How long sync points take to become durable.
    pub fn sync_latency(&self) -> HistogramSnapshot {
        self.inner.metrics.sync_latency.snapshot()
    }

    /// Disk operations in flight in the I/O backend.
    pub fn disk_queue_depth(&self) -> u64 {
        DISK_OPS_IN_FLIGHT.load(Ordering::Relaxed)
    }
}
