//! End-to-end: the control plane (HTTP API, space scans, event log) runs on its own threads,
//! at a lower scheduling priority than the threads serving NBD and iSCSI, so that when the
//! CPU is short the data path comes first.

mod support;

use support::Grove;

/// (thread name, nice value) of every thread of a process, from /proc.
fn threads(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc tasks") {
        let dir = task.expect("task entry").path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // Fields after the parenthesised name: state is field 3, nice is field 19.
        let rest = &stat[stat.rfind(')').expect("stat has a name") + 2..];
        let nice: i64 = rest
            .split_whitespace()
            .nth(16)
            .and_then(|f| f.parse().ok())
            .expect("stat has a nice value");
        out.push((name.trim().to_string(), nice));
    }
    out
}

#[test]
fn control_plane_threads_run_below_the_data_path() {
    let grove = Grove::start();
    // API requests, a change and a scan make sure the control plane's threads exist.
    grove.create_volume("v", "64MiB");
    grove.cli_ok(&["pool", "reclaim"]);
    let threads = threads(grove.pid());
    let nice_of = |name: &str| -> Vec<i64> {
        threads
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, nice)| *nice)
            .collect()
    };
    let data = nice_of("grove");
    let control = nice_of("grove-control");
    assert!(!data.is_empty(), "no data-path threads: {threads:?}");
    assert!(!control.is_empty(), "no control-plane threads: {threads:?}");
    let base = data[0];
    assert!(data.iter().all(|&n| n == base), "{threads:?}");
    let lowered = (base + 10).min(19);
    assert!(
        control.iter().all(|&n| n == lowered),
        "control-plane threads should run at nice {lowered}: {threads:?}"
    );
}
