//! `/metrics` in the OpenMetrics text format (which Prometheus scrapes). The API's own requests
//! are counted as they happen; everything else is read from the engine and the hooks at each
//! scrape (`PoolCollector`), so nothing on the I/O path waits on this module.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use grove_engine::metrics::HistogramSnapshot;
use grove_engine::Pool;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::hooks::Hooks;

/// The content type of the OpenMetrics answer (for scrapers that ask for it, as Prometheus
/// does), and of the classic text format (for everyone else: curl, promtool).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

type ApiLabels = Vec<(&'static str, String)>;

/// The metrics registry and the API's request counters.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    api_requests: Family<ApiLabels, Counter>,
    api_latency: Family<ApiLabels, Histogram>,
}

impl Metrics {
    pub fn new(pool: Pool, hooks: Hooks) -> Metrics {
        let mut registry = Registry::with_prefix("grove");
        let api_requests = Family::<ApiLabels, Counter>::default();
        let api_latency = Family::<ApiLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(
                grove_engine::metrics::LATENCY_BUCKETS_SECONDS
                    .iter()
                    .copied(),
            )
        });
        registry.register(
            "api_requests",
            "HTTP API requests by method, route and status",
            api_requests.clone(),
        );
        registry.register_with_unit(
            "api_request_duration",
            "HTTP API request latency by method and route",
            Unit::Seconds,
            api_latency.clone(),
        );
        registry.register_collector(Box::new(PoolCollector { pool, hooks }));
        Metrics {
            registry: Arc::new(registry),
            api_requests,
            api_latency,
        }
    }

    /// Counts an API request; `route` is the route's template, not the path.
    pub fn observe_api(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = vec![("method", method.to_string()), ("route", route.to_string())];
        self.api_latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        let mut labels = labels;
        labels.push(("status", status.to_string()));
        self.api_requests.get_or_create(&labels).inc();
    }

    /// The OpenMetrics text to answer a scrape with. Reads engine state: call it on a
    /// blocking thread.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// OpenMetrics text in the classic Prometheus text format (0.0.4): there a counter's HELP
/// and TYPE lines name its samples, `_total` included, and there are no UNIT or EOF lines.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Reads the pool and the hooks at each scrape.
struct PoolCollector {
    pool: Pool,
    hooks: Hooks,
}

impl fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PoolCollector")
    }
}

/// Writes one metric family: its descriptor, then one sample per label set.
fn family<L, F>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, F)>,
) -> fmt::Result
where
    L: prometheus_client::encoding::EncodeLabelSet,
    F: FnOnce(&mut MetricEncoder) -> fmt::Result,
{
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, encode) in samples {
        let mut sample = metric.encode_family(&labels)?;
        encode(&mut sample)?;
    }
    Ok(())
}

/// Writes one metric without labels.
fn single<F>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    encode: F,
) -> fmt::Result
where
    F: FnOnce(&mut MetricEncoder) -> fmt::Result,
{
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    encode(&mut metric)
}

fn counter(value: u64) -> impl FnOnce(&mut MetricEncoder) -> fmt::Result {
    move |m| m.encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn gauge(value: i64) -> impl FnOnce(&mut MetricEncoder) -> fmt::Result {
    move |m| m.encode_gauge(&value)
}

fn histogram(snapshot: HistogramSnapshot) -> impl FnOnce(&mut MetricEncoder) -> fmt::Result {
    move |m| {
        // The encoder sums the buckets itself: it takes each bucket's own count.
        let mut below = 0;
        let mut buckets: Vec<(f64, u64)> = snapshot
            .buckets
            .iter()
            .map(|&(bound, cumulative)| {
                let own = cumulative - below;
                below = cumulative;
                (bound, own)
            })
            .collect();
        buckets.push((f64::MAX, snapshot.count.saturating_sub(below)));
        m.encode_histogram::<NoLabelSet>(snapshot.sum_seconds, snapshot.count, &buckets, None)
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let pool = &self.pool;
        let exports = pool.io_metrics();
        let per_op = |f: &dyn Fn(&grove_engine::metrics::OpSnapshot) -> u64| {
            exports
                .iter()
                .flat_map(|e| {
                    e.ops.iter().map(move |op| {
                        (
                            [
                                ("protocol", e.protocol.clone()),
                                ("export", e.export.clone()),
                                ("op", op.op.name().to_string()),
                            ],
                            f(op),
                        )
                    })
                })
                .collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "requests",
            "Requests served per export, protocol and operation",
            None,
            MetricType::Counter,
            per_op(&|op| op.requests)
                .into_iter()
                .map(|(l, v)| (l, counter(v))),
        )?;
        family(
            &mut encoder,
            "request",
            "Bytes read, written, zeroed or trimmed per export, protocol and operation",
            Some(&Unit::Bytes),
            MetricType::Counter,
            per_op(&|op| op.bytes)
                .into_iter()
                .map(|(l, v)| (l, counter(v))),
        )?;
        family(
            &mut encoder,
            "request_errors",
            "Failed requests per export, protocol, operation and error kind",
            None,
            MetricType::Counter,
            exports.iter().flat_map(|e| {
                e.errors.iter().map(move |&(op, kind, n)| {
                    (
                        [
                            ("protocol", e.protocol.clone()),
                            ("export", e.export.clone()),
                            ("op", op.to_string()),
                            ("kind", kind.to_string()),
                        ],
                        counter(n),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "request_duration",
            "Request latency per export, protocol and operation",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            exports.iter().flat_map(|e| {
                e.ops.iter().map(move |op| {
                    (
                        [
                            ("protocol", e.protocol.clone()),
                            ("export", e.export.clone()),
                            ("op", op.op.name().to_string()),
                        ],
                        histogram(op.latency.clone()),
                    )
                })
            }),
        )?;

        let mut by_protocol = std::collections::BTreeMap::<String, i64>::new();
        for session in pool.sessions() {
            *by_protocol.entry(session.client.protocol).or_default() += 1;
        }
        family(
            &mut encoder,
            "sessions",
            "Live sessions per protocol",
            None,
            MetricType::Gauge,
            by_protocol
                .into_iter()
                .map(|(protocol, n)| ([("protocol", protocol)], gauge(n))),
        )?;

        let volumes = pool.volumes();
        let per_volume = |name: &str,
                          help: &str,
                          unit: Option<&Unit>,
                          f: &dyn Fn(&grove_engine::VolumeInfo) -> u64,
                          encoder: &mut DescriptorEncoder| {
            family(
                encoder,
                name,
                help,
                unit,
                MetricType::Gauge,
                volumes
                    .iter()
                    .map(|v| ([("volume", v.name.clone())], gauge(to_i64(f(v))))),
            )
        };
        per_volume(
            "volume_size",
            "Logical size of each volume",
            Some(&Unit::Bytes),
            &|v| v.size_bytes,
            &mut encoder,
        )?;
        per_volume(
            "volume_written",
            "Pool space each volume's refs map (shared blocks once)",
            Some(&Unit::Bytes),
            &|v| v.written_bytes,
            &mut encoder,
        )?;
        per_volume(
            "volume_commits",
            "Commits of each volume",
            None,
            &|v| v.commits as u64,
            &mut encoder,
        )?;
        per_volume(
            "volume_branches",
            "Branches of each volume",
            None,
            &|v| v.branches as u64,
            &mut encoder,
        )?;

        if let Ok(stats) = pool.stats() {
            for (name, help, value) in [
                (
                    "pool_capacity",
                    "Used plus free bytes of the pool",
                    stats.capacity_bytes,
                ),
                ("pool_used", "Bytes of data blocks in use", stats.used_bytes),
                (
                    "pool_free",
                    "Free bytes: free blocks in the data file plus free space on its file system",
                    stats.free_bytes,
                ),
                (
                    "pool_metadata",
                    "Bytes of metadata pages in use",
                    stats.metadata_bytes,
                ),
            ] {
                single(
                    &mut encoder,
                    name,
                    help,
                    Some(&Unit::Bytes),
                    MetricType::Gauge,
                    gauge(to_i64(value)),
                )?;
            }
            // An info metric the classic way (Prometheus' text parser knows no "info" type).
            family(
                &mut encoder,
                "io_backend_info",
                "The disk I/O backend in use (value 1)",
                None,
                MetricType::Gauge,
                [([("backend", stats.io_backend)], gauge(1))],
            )?;
        }
        single(
            &mut encoder,
            "disk_ops_in_flight",
            "Disk operations submitted to the I/O backend and not completed (its queue depth)",
            None,
            MetricType::Gauge,
            gauge(to_i64(pool.disk_queue_depth())),
        )?;
        single(
            &mut encoder,
            "sync_duration",
            "Sync points (FLUSH, commits, catalog changes): data sync to durable journal record",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            histogram(pool.sync_latency()),
        )?;
        single(
            &mut encoder,
            "pool_failed",
            "1 once an I/O failure stopped the pool taking writes (until restart)",
            None,
            MetricType::Gauge,
            gauge(i64::from(pool.is_failed())),
        )?;
        if let Some(report) = pool.space_report() {
            single(
                &mut encoder,
                "reclaim_last_scan_timestamp",
                "When the latest space scan finished",
                Some(&Unit::Seconds),
                MetricType::Gauge,
                gauge(to_i64(report.computed_unix)),
            )?;
            single(
                &mut encoder,
                "reclaim_last_freed",
                "What the latest space scan returned to the pool",
                Some(&Unit::Bytes),
                MetricType::Gauge,
                gauge(to_i64(report.reclaimed_bytes)),
            )?;
        }
        single(
            &mut encoder,
            "reclaim_scans",
            "Space scans completed since start (background and asked for)",
            None,
            MetricType::Counter,
            counter(pool.space_scans()),
        )?;
        single(
            &mut encoder,
            "checksum_errors",
            "Reads and scrubs that found a data block not matching its checksum, since start",
            None,
            MetricType::Counter,
            counter(pool.checksum_errors()),
        )?;
        let scrub = pool.scrub_status();
        single(
            &mut encoder,
            "scrub_running",
            "1 while a scrub runs",
            None,
            MetricType::Gauge,
            gauge(i64::from(
                scrub.as_ref().is_some_and(|s| s.state == "running"),
            )),
        )?;
        if let Some(scrub) = &scrub {
            for (name, help, value) in [
                (
                    "scrub_checked_blocks",
                    "Data blocks the running or last scrub read and checked",
                    scrub.checked_blocks,
                ),
                (
                    "scrub_unchecked_blocks",
                    "Data blocks without a checksum the running or last scrub read",
                    scrub.unchecked_blocks,
                ),
                (
                    "scrub_bad_blocks",
                    "Data blocks the running or last scrub found not matching their checksum",
                    scrub.bad_blocks,
                ),
            ] {
                single(
                    &mut encoder,
                    name,
                    help,
                    None,
                    MetricType::Gauge,
                    gauge(to_i64(value)),
                )?;
            }
            if let Some(finished_unix) = scrub.finished_unix {
                single(
                    &mut encoder,
                    "scrub_last_finished_timestamp",
                    "When the last scrub finished",
                    Some(&Unit::Seconds),
                    MetricType::Gauge,
                    gauge(to_i64(finished_unix)),
                )?;
            }
        }
        let last_seq = pool.last_event_seq();
        single(
            &mut encoder,
            "event_log_last_seq",
            "Sequence number of the newest event logged",
            None,
            MetricType::Gauge,
            gauge(to_i64(last_seq)),
        )?;

        let hooks = self.hooks.list();
        family(
            &mut encoder,
            "hook_deliveries",
            "Hook delivery attempts per hook and outcome",
            None,
            MetricType::Counter,
            hooks.iter().flat_map(|h| {
                [
                    (
                        [("hook", h.id.clone()), ("outcome", "ok".to_string())],
                        counter(h.status.deliveries_ok),
                    ),
                    (
                        [("hook", h.id.clone()), ("outcome", "failed".to_string())],
                        counter(h.status.deliveries_failed),
                    ),
                ]
            }),
        )?;
        family(
            &mut encoder,
            "hook_backlog_events",
            "Events logged after the last one each hook took (its retry backlog, unfiltered)",
            None,
            MetricType::Gauge,
            hooks.iter().map(|h| {
                (
                    [("hook", h.id.clone())],
                    gauge(to_i64(last_seq.saturating_sub(h.status.delivered_seq))),
                )
            }),
        )?;
        family(
            &mut encoder,
            "hook_failing",
            "1 while a hook keeps failing (a hook.failed event was logged)",
            None,
            MetricType::Gauge,
            hooks
                .iter()
                .map(|h| ([("hook", h.id.clone())], gauge(i64::from(h.status.failing)))),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_classic_text() {
        let text = "# HELP a Things.\n# TYPE a counter\na_total{x=\"1\"} 2\n# HELP b_bytes B.\n\
                    # TYPE b_bytes gauge\n# UNIT b_bytes bytes\nb_bytes 3\n# EOF\n";
        assert_eq!(
            to_prometheus_text(text),
            "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n\
             # HELP b_bytes B.\n# TYPE b_bytes gauge\nb_bytes 3\n"
        );
    }
}
