//! `grove diff REF1 REF2 [--limit N]`: the byte ranges that differ between two refs.

use clap::Args;
use grove_mgmt_api::model::{DiffReport, RefKind, ResolvedRef};
use grove_mgmt_api::size::format_size;
use grove_mgmt_api::validate::DIFF_EXTENTS_LIMIT_MAX;

use super::client::{decode, segment, Client};
use super::output::{print_fields, print_json, Table};
use super::refs;

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The old side: VOL, VOL@BRANCH, VOL@TAG or VOL@COMMIT.
    #[arg(value_name = "REF1")]
    pub from: String,
    /// The new side, of the same volume or of one sharing its history (a clone or its source).
    /// A branch includes its uncommitted writes.
    #[arg(value_name = "REF2")]
    pub to: String,
    /// Most ranges to list (1-1000000) [default: 100000]; the counts cover the whole diff.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=DIFF_EXTENTS_LIMIT_MAX as u64))]
    pub limit: Option<u64>,
}

/// How a resolved ref is shown: its name and what it is.
pub fn describe_ref(resolved: &ResolvedRef) -> String {
    let kind = match resolved.kind {
        RefKind::Branch => "branch head",
        RefKind::Tag => "tag",
        RefKind::Commit => "commit",
    };
    format!("{} ({kind})", resolved.name)
}

pub fn run(client: &Client, json: bool, args: DiffArgs) -> anyhow::Result<()> {
    let from = refs::parse(&args.from)?;
    let to = refs::full(&args.to)?;
    let mut query = vec![
        ("from", format!("{}@{}", from.volume, from.name)),
        ("to", to),
    ];
    if let Some(limit) = args.limit {
        query.push(("limit", limit.to_string()));
    }
    let text = client.get(
        &format!("/v1/volumes/{}/diff", segment(&from.volume)?),
        &query,
    )?;
    if json {
        return print_json(&text);
    }
    let diff: DiffReport = decode(&text)?;
    print_fields(&[
        ("from", describe_ref(&diff.from)),
        ("to", describe_ref(&diff.to)),
        (
            "changed",
            format!(
                "{} ({} bytes, {} blocks) in {} ranges",
                format_size(diff.changed_bytes),
                diff.changed_bytes,
                diff.changed_blocks,
                diff.extent_count
            ),
        ),
        (
            "checked",
            format!("{} candidate blocks", diff.candidate_blocks),
        ),
        ("note", diff.note.clone()),
    ]);
    if diff.extents.is_empty() {
        return Ok(());
    }
    println!();
    let mut table = Table::new(&["OFFSET", "LENGTH", "SIZE"]);
    for extent in &diff.extents {
        table.row(vec![
            extent.offset_bytes.to_string(),
            extent.len_bytes.to_string(),
            format_size(extent.len_bytes),
        ]);
    }
    table.print();
    if diff.extents_truncated {
        println!(
            "... {} more ranges not listed (raise --limit)",
            diff.extent_count - diff.extents.len() as u64
        );
    }
    Ok(())
}
