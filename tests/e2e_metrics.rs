//! End-to-end: `/metrics`. The scrape passes `promtool check metrics`; its counters move with
//! real I/O from qemu-io (requests, bytes, latency counts, errors), and its gauges follow the
//! pool, the volumes, the event log and the hooks. Prometheus itself gets OpenMetrics.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::{
    metric_sample, promtool_check, qemu_io, require_nbd_tools, require_tool, run, write_pattern,
    Grove, MIB,
};

fn scrape(grove: &Grove) -> String {
    let reply = grove.http("GET", "/metrics", None);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        reply.content_type
    );
    reply.body
}

#[test]
fn metrics_move_with_real_io_and_pass_promtool() {
    require_nbd_tools();
    require_tool("promtool", "prometheus");
    let grove = Grove::start();
    grove.create_volume("m", "8MiB");
    let before = scrape(&grove);
    promtool_check(&before);
    assert_eq!(
        metric_sample(&before, "grove_volume_size_bytes", &[("volume", "m")]),
        Some(8.0 * MIB as f64)
    );
    assert_eq!(metric_sample(&before, "grove_pool_failed", &[]), Some(0.0));

    // 3 MiB written and 1 MiB read over NBD, one read out of range.
    write_pattern(&grove.unix_uri("m"), 0x5a, 0, 3 * MIB);
    let read = qemu_io(&grove.unix_uri("m"), &["read 0 1M".to_string()], true);
    read.assert_success();
    let past_end = qemu_io(&grove.unix_uri("m"), &["read 8M 4k".to_string()], true);
    assert!(
        !past_end.success()
            || past_end.combined().contains("failed")
            || past_end.combined().contains("error"),
        "a read past the end must fail: {}",
        past_end.report()
    );
    grove.commit("m", "metrics");
    grove.wait_no_sessions();

    let after = scrape(&grove);
    promtool_check(&after);
    let written = metric_sample(
        &after,
        "grove_request_bytes_total",
        &[("protocol", "nbd"), ("export", "m"), ("op", "write")],
    )
    .unwrap_or_default();
    assert_eq!(written, 3.0 * MIB as f64, "{after}");
    let read_bytes = metric_sample(
        &after,
        "grove_request_bytes_total",
        &[("protocol", "nbd"), ("export", "m"), ("op", "read")],
    )
    .unwrap_or_default();
    assert!(read_bytes >= MIB as f64, "{read_bytes}");
    let writes = metric_sample(
        &after,
        "grove_requests_total",
        &[("protocol", "nbd"), ("export", "m"), ("op", "write")],
    )
    .unwrap_or_default();
    let write_latencies = metric_sample(
        &after,
        "grove_request_duration_seconds_count",
        &[("protocol", "nbd"), ("export", "m"), ("op", "write")],
    )
    .unwrap_or_default();
    assert!(
        writes >= 1.0 && write_latencies == writes,
        "{writes} {write_latencies}"
    );
    assert_eq!(
        metric_sample(&after, "grove_volume_commits", &[("volume", "m")]),
        Some(1.0)
    );
    assert!(
        metric_sample(&after, "grove_pool_used_bytes", &[]).unwrap_or_default() >= 3.0 * MIB as f64
    );
    assert!(
        metric_sample(&after, "grove_sync_duration_seconds_count", &[]).unwrap_or_default() >= 1.0
    );
    assert!(
        metric_sample(&after, "grove_event_log_last_seq", &[]).unwrap_or_default()
            > metric_sample(&before, "grove_event_log_last_seq", &[]).unwrap_or_default()
    );
    assert!(
        metric_sample(
            &after,
            "grove_api_requests_total",
            &[
                ("route", "/v1/volumes/{vol}/branches/{branch}/commits"),
                ("status", "201")
            ]
        )
        .unwrap_or_default()
            >= 1.0,
        "{after}"
    );
    assert!(after
        .lines()
        .any(|l| l.starts_with("grove_io_backend_info{backend=")));

    // A live session shows; a hook's deliveries and backlog show.
    let mut nbd = Command::new("qemu-io")
        .args(["-f", "raw", "-r"])
        .arg(grove.unix_uri("m"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let mut live = 0.0;
    for _ in 0..100 {
        live = metric_sample(&scrape(&grove), "grove_sessions", &[("protocol", "nbd")])
            .unwrap_or_default();
        if live >= 1.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(live >= 1.0, "no live session in the scrape");
    drop(nbd.stdin.take());
    let _ = nbd.wait();
    let hook = grove.http(
        "POST",
        "/v1/hooks",
        Some(r#"{"url": "http://127.0.0.1:9/", "events": ["tag.created"], "timeout_ms": 200}"#),
    );
    assert_eq!(hook.status, 201, "{hook:?}");
    let id = hook.json()["id"].as_str().unwrap_or_default().to_string();
    grove.cli_ok(&["tag", "create", "m", "t1", "m"]);
    let mut failed = 0.0;
    for _ in 0..100 {
        failed = metric_sample(
            &scrape(&grove),
            "grove_hook_deliveries_total",
            &[("hook", &id), ("outcome", "failed")],
        )
        .unwrap_or_default();
        if failed >= 1.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        failed >= 1.0,
        "a delivery to a closed port must count as failed"
    );
    let text = scrape(&grove);
    assert!(
        metric_sample(&text, "grove_hook_backlog_events", &[("hook", &id)]).unwrap_or_default()
            >= 1.0
    );
    promtool_check(&text);

    // Prometheus asks for OpenMetrics and gets it.
    let out = run(
        Command::new("curl").args([
            "-s",
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
            &format!("{}/metrics", grove.api()),
        ]),
        Duration::from_secs(30),
    );
    out.assert_success();
    assert!(out.stdout.trim_end().ends_with("# EOF"), "{}", out.stdout);
}
