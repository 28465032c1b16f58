//! `grove status`: one screen on the server: version, pool use, volumes, sessions, hooks.

use grove_mgmt_api::hooks::Hook;
use grove_mgmt_api::model::{PoolStatus, Session, Volume};
use grove_mgmt_api::size::format_size;
use serde_json::json;

use super::client::{decode, Client};
use super::output::{print_fields, Table};

pub fn run(client: &Client, json: bool) -> anyhow::Result<()> {
    let pool: PoolStatus = decode(&client.get("/v1/pool", &[])?)?;
    let volumes: Vec<Volume> = decode(&client.get("/v1/volumes", &[])?)?;
    let sessions: Vec<Session> = decode(&client.get("/v1/sessions", &[])?)?;
    let hooks: Vec<Hook> = decode(&client.get("/v1/hooks", &[])?)?;
    if json {
        let all = json!({"pool": pool, "volumes": volumes, "sessions": sessions, "hooks": hooks});
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let used_percent = if pool.capacity_bytes > 0 {
        pool.used_bytes as f64 * 100.0 / pool.capacity_bytes as f64
    } else {
        0.0
    };
    let failing = hooks.iter().filter(|h| h.status.failing).count();
    print_fields(&[
        (
            "grove",
            format!("{} at {}", pool.version, client.base_url()),
        ),
        (
            "state",
            if pool.failed {
                "FAILED: an I/O error stopped writes; restart after fixing the disk".into()
            } else {
                "serving".into()
            },
        ),
        (
            "pool",
            format!(
                "{} used of {} ({used_percent:.1}%), {} free, {} metadata",
                format_size(pool.used_bytes),
                format_size(pool.capacity_bytes),
                format_size(pool.free_bytes),
                format_size(pool.metadata_bytes)
            ),
        ),
        ("io backend", pool.io_backend.clone()),
        ("volumes", volumes.len().to_string()),
        ("sessions", sessions.len().to_string()),
        (
            "hooks",
            match failing {
                0 => hooks.len().to_string(),
                n => format!("{} ({n} failing)", hooks.len()),
            },
        ),
        ("events", format!("{} logged", pool.event_log_last_seq)),
    ]);
    if !volumes.is_empty() {
        println!();
        let mut table = Table::new(&[
            "VOLUME", "SIZE", "WRITTEN", "BRANCHES", "COMMITS", "SESSIONS",
        ]);
        for volume in &volumes {
            let attached = sessions
                .iter()
                .filter(|s| s.export.split(['@', '?']).next() == Some(volume.name.as_str()))
                .count();
            table.row(vec![
                volume.name.clone(),
                format_size(volume.size_bytes),
                format_size(volume.written_bytes),
                volume.branches.to_string(),
                volume.commits.to_string(),
                attached.to_string(),
            ]);
        }
        table.print();
    }
    Ok(())
}
