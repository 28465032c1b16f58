//! `grove pool` and `grove pool reclaim`.

use clap::{Args, Subcommand};
use grove_mgmt_api::model::{PoolStatus, SpaceReport};
use grove_mgmt_api::size::format_size;

use super::client::{decode, Client};
use super::output::{print_fields, print_json, time, Table};

#[derive(Debug, Args)]
pub struct PoolArgs {
    #[command(subcommand)]
    pub command: Option<PoolCommand>,
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Run a space scan now: return unreferenced space to the pool and measure what each
    /// volume, branch and commit holds alone.
    Reclaim,
}

fn bytes(value: u64) -> String {
    format!("{} ({value} bytes)", format_size(value))
}

pub fn run(client: &Client, json: bool, args: PoolArgs) -> anyhow::Result<()> {
    match args.command {
        None => status(client, json),
        Some(PoolCommand::Reclaim) => reclaim(client, json),
    }
}

fn status(client: &Client, json: bool) -> anyhow::Result<()> {
    let text = client.get("/v1/pool", &[])?;
    if json {
        return print_json(&text);
    }
    let pool: PoolStatus = decode(&text)?;
    let mut fields = vec![
        ("capacity", bytes(pool.capacity_bytes)),
        ("used", bytes(pool.used_bytes)),
        ("free", bytes(pool.free_bytes)),
        ("metadata", bytes(pool.metadata_bytes)),
        ("io backend", pool.io_backend),
    ];
    match &pool.space {
        Some(space) => fields.extend([
            (
                "space scan",
                format!(
                    "generation {} at {}",
                    space.generation,
                    time(space.computed_unix)
                ),
            ),
            ("reclaimed", bytes(space.reclaimed_bytes)),
        ]),
        None => fields.push(("space scan", "none yet".to_string())),
    }
    print_fields(&fields);
    if let Some(space) = &pool.space {
        if !space.volumes.is_empty() {
            println!();
            let mut table = Table::new(&["VOLUME", "REFERENCED", "EXCLUSIVE"]);
            for (name, figures) in &space.volumes {
                table.row(vec![
                    name.clone(),
                    format_size(figures.referenced_bytes),
                    format_size(figures.exclusive_bytes),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

fn reclaim(client: &Client, json: bool) -> anyhow::Result<()> {
    let text = client.post("/v1/pool/reclaim", &serde_json::json!({}))?;
    if json {
        return print_json(&text);
    }
    let report: SpaceReport = decode(&text)?;
    let pool: PoolStatus = decode(&client.get("/v1/pool", &[])?)?;
    print_fields(&[
        ("reclaimed", bytes(report.reclaimed_bytes)),
        ("used now", bytes(pool.used_bytes)),
        (
            "space scan",
            format!(
                "generation {} at {}",
                report.generation,
                time(report.computed_unix)
            ),
        ),
    ]);
    if !report.volumes.is_empty() {
        println!();
        let mut table = Table::new(&["VOLUME", "REFERENCED", "EXCLUSIVE", "BRANCHES", "COMMITS"]);
        for (name, space) in &report.volumes {
            table.row(vec![
                name.clone(),
                format_size(space.referenced_bytes),
                format_size(space.exclusive_bytes),
                space.branches.len().to_string(),
                space.commits.len().to_string(),
            ]);
        }
        table.print();
    }
    Ok(())
}
