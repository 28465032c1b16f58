//! `grove blame REF --offset BYTES --length BYTES`: who last wrote each part of a range.

use clap::Args;
use grove_mgmt_api::model::{BlameReport, BlameState};
use grove_mgmt_api::size::{format_size, ByteSize};

use super::client::{decode, segment, Client};
use super::diff::describe_ref;
use super::output::{message_summary, or_dash, print_json, short_id, time, Table};
use super::refs;

#[derive(Debug, Args)]
pub struct BlameArgs {
    /// The ref whose content is explained: VOL, VOL@BRANCH, VOL@TAG or VOL@COMMIT.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Where the range starts: bytes, or a size such as 1MiB.
    #[arg(long, value_name = "BYTES")]
    pub offset: ByteSize,
    /// Length of the range: bytes, or a size such as 64KiB.
    #[arg(long, value_name = "BYTES")]
    pub length: ByteSize,
}

pub fn run(client: &Client, json: bool, args: BlameArgs) -> anyhow::Result<()> {
    let reference = refs::parse(&args.reference)?;
    let text = client.get(
        &format!("/v1/volumes/{}/blame", segment(&reference.volume)?),
        &[
            ("ref", reference.name),
            ("offset", args.offset.bytes().to_string()),
            ("length", args.length.bytes().to_string()),
        ],
    )?;
    if json {
        return print_json(&text);
    }
    let blame: BlameReport = decode(&text)?;
    println!(
        "{}, bytes {}..{} ({})",
        describe_ref(&blame.target),
        blame.offset_bytes,
        blame.offset_bytes + blame.len_bytes,
        format_size(blame.len_bytes)
    );
    println!();
    let mut table = Table::new(&[
        "OFFSET", "LENGTH", "STATE", "COMMIT", "AUTHOR", "CREATED", "MESSAGE",
    ]);
    for range in blame.ranges {
        let state = match range.state {
            BlameState::Committed => "committed",
            BlameState::Uncommitted => "uncommitted",
            BlameState::NeverWritten => "never written",
        };
        let mut row = vec![
            range.offset_bytes.to_string(),
            range.len_bytes.to_string(),
            state.to_string(),
        ];
        match &range.commit {
            Some(commit) => row.extend([
                short_id(&commit.id),
                or_dash(commit.author.as_deref()),
                time(commit.created_unix),
                message_summary(&commit.message),
            ]),
            None => row.extend(["-".to_string(), "-".into(), "-".into(), String::new()]),
        }
        table.row(row);
    }
    table.print();
    Ok(())
}
