//! `grove log REF [--limit N]`.

use clap::Args;
use grove_engine::BLOCK_SIZE;
use grove_mgmt_api::model::Commit;
use grove_mgmt_api::size::format_size;
use grove_mgmt_api::validate::{LOG_LIMIT_DEFAULT, LOG_LIMIT_MAX};

use super::client::{decode, segment, Client};
use super::output::{message_summary, or_dash, print_json, short_id, time, Table};
use super::refs;

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Where the history starts: VOL, VOL@BRANCH, VOL@TAG or VOL@COMMIT.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Most commits to show (1-10000) [default: 1000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=LOG_LIMIT_MAX as u64))]
    pub limit: Option<u64>,
}

pub fn run(client: &Client, json: bool, args: LogArgs) -> anyhow::Result<()> {
    let reference = refs::parse(&args.reference)?;
    let limit = args.limit.unwrap_or(LOG_LIMIT_DEFAULT as u64);
    let path = format!("/v1/volumes/{}/log", segment(&reference.volume)?);
    let text = client.get(
        &path,
        &[("ref", reference.name), ("limit", limit.to_string())],
    )?;
    if json {
        return print_json(&text);
    }
    let commits: Vec<Commit> = decode(&text)?;
    let mut table = Table::new(&[
        "COMMIT", "CREATED", "BRANCH", "AUTHOR", "CHANGED", "MESSAGE",
    ]);
    for commit in commits {
        table.row(vec![
            short_id(&commit.id),
            time(commit.created_unix),
            commit.branch,
            or_dash(commit.author.as_deref()),
            format_size(commit.changed_blocks.saturating_mul(BLOCK_SIZE)),
            message_summary(&commit.message),
        ]);
    }
    table.print();
    Ok(())
}
