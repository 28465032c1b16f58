//! `grove merge VOL --from REF --into BRANCH [--strategy fail|ours|theirs|manual] [--dry-run]`,
//! and for merges left in progress by `--strategy manual`: `grove merge VOL --status`,
//! `--conclude MERGE_BRANCH [-m MSG]` and `--abort MERGE_BRANCH`.
//!
//! Conflicts with strategy `fail` change nothing and exit non-zero, listing the conflicting
//! ranges on stderr (and, with `--json`, the API's error document on stdout). A dry run prints
//! its report and exits non-zero when the merge would stop on conflicts.

use clap::{Args, ValueEnum};
use grove_mgmt_api::model::{ByteRange, Commit, MergeInProgress, MergeOutcome, MergeReport};
use grove_mgmt_api::size::format_size;
use grove_mgmt_api::validate;
use serde_json::json;

use super::client::{decode, segment, ApiFailure, Client};
use super::output::{print_fields, print_json, short_id, Table};
use super::refs;

/// What to do with blocks both sides changed differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Change nothing and list the conflicting ranges.
    Fail,
    /// Keep the branch's content.
    Ours,
    /// Take the merged side's content.
    Theirs,
    /// Leave the merge in progress on a writable merge branch to resolve by hand.
    Manual,
}

impl Strategy {
    fn wire_name(self) -> &'static str {
        match self {
            Strategy::Fail => "fail",
            Strategy::Ours => "ours",
            Strategy::Theirs => "theirs",
            Strategy::Manual => "manual",
        }
    }
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The volume whose branch receives the merge.
    #[arg(value_name = "VOL")]
    pub volume: String,
    /// What to merge: VOL@BRANCH (its latest commit), VOL@TAG, VOL@COMMIT, or a name in VOL.
    #[arg(long, value_name = "REF", required_unless_present_any = ["status", "conclude", "abort"])]
    pub from: Option<String>,
    /// The branch of VOL to merge into; it must have no uncommitted writes or open sessions.
    #[arg(long, value_name = "BRANCH", required_unless_present_any = ["status", "conclude", "abort"])]
    pub into: Option<String>,
    /// What to do with blocks both sides changed differently.
    #[arg(long, value_enum, default_value = "fail")]
    pub strategy: Strategy,
    /// Report what the merge would do and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Message of the merge commit [default: "Merge REF into BRANCH"].
    #[arg(short, long, value_name = "MSG")]
    pub message: Option<String>,
    /// Author of the merge commit.
    #[arg(long, value_name = "A")]
    pub author: Option<String>,
    /// With --strategy manual: the merge branch's name [default: merge-BRANCH].
    #[arg(long, value_name = "NAME")]
    pub merge_branch: Option<String>,
    /// List the merges of VOL in progress, with their conflicting ranges.
    #[arg(long, conflicts_with_all = ["from", "into", "conclude", "abort"])]
    pub status: bool,
    /// Conclude the merge in progress on MERGE_BRANCH: commit it into its target branch.
    #[arg(long, value_name = "MERGE_BRANCH", conflicts_with_all = ["from", "into", "abort"])]
    pub conclude: Option<String>,
    /// Abort the merge in progress on MERGE_BRANCH, deleting the merge branch.
    #[arg(long, value_name = "MERGE_BRANCH", conflicts_with_all = ["from", "into"])]
    pub abort: Option<String>,
}

/// Ranges as an indented table, for messages.
fn ranges_table(ranges: &[ByteRange]) -> String {
    let mut table = Table::new(&["OFFSET", "LENGTH", "SIZE"]);
    for range in ranges {
        table.row(vec![
            range.offset_bytes.to_string(),
            range.len_bytes.to_string(),
            format_size(range.len_bytes),
        ]);
    }
    table
        .render()
        .lines()
        .map(|line| format!("  {line}\n"))
        .collect()
}

fn amount(bytes: u64, ranges: usize) -> String {
    let unit = if ranges == 1 { "range" } else { "ranges" };
    format!("{} ({bytes} bytes) in {ranges} {unit}", format_size(bytes))
}

pub fn run(client: &Client, json: bool, args: MergeArgs) -> anyhow::Result<()> {
    validate::volume_name(&args.volume)?;
    let merges = format!("/v1/volumes/{}/merges", segment(&args.volume)?);
    if args.status {
        let text = client.get(&merges, &[])?;
        let list: Vec<MergeInProgress> = decode(&text)?;
        if json {
            print_json(&text)?;
        } else {
            print_status(&list);
        }
        return Ok(());
    }
    if let Some(branch) = &args.conclude {
        validate::branch_name(branch)?;
        let mut body = json!({});
        if let Some(message) = &args.message {
            body["message"] = json!(message);
        }
        if let Some(author) = &args.author {
            body["author"] = json!(author);
        }
        let text = client.post(&format!("{merges}/{}/conclude", segment(branch)?), &body)?;
        let commit: Commit = decode(&text)?;
        if json {
            print_json(&text)?;
        } else {
            println!("{}", commit.id);
        }
        return Ok(());
    }
    if let Some(branch) = &args.abort {
        validate::branch_name(branch)?;
        client.post(&format!("{merges}/{}/abort", segment(branch)?), &json!({}))?;
        if !json {
            println!("aborted the merge on {}@{branch}", args.volume);
        }
        return Ok(());
    }
    let (Some(from), Some(into)) = (&args.from, &args.into) else {
        anyhow::bail!("--from and --into are required");
    };
    validate::branch_name(into)?;
    let from = refs::ref_in_context(&args.volume, from)?;
    let mut body = json!({
        "from": from,
        "into": into,
        "strategy": args.strategy.wire_name(),
        "dry_run": args.dry_run,
    });
    if let Some(message) = &args.message {
        body["message"] = json!(message);
    }
    if let Some(author) = &args.author {
        body["author"] = json!(author);
    }
    if let Some(name) = &args.merge_branch {
        if args.strategy != Strategy::Manual {
            anyhow::bail!("--merge-branch only goes with --strategy manual");
        }
        validate::branch_name(name)?;
        body["merge_branch"] = json!(name);
    }
    let path = merges;
    let text = match client.post(&path, &body) {
        Ok(text) => text,
        Err(error) => {
            let Some(failure) = error.downcast_ref::<ApiFailure>() else {
                return Err(error);
            };
            let conflicts = match &failure.body.error.conflicts {
                Some(conflicts) if failure.status == 409 => conflicts,
                _ => return Err(error),
            };
            if json {
                print_json(&failure.text)?;
            }
            anyhow::bail!(
                "{}\nconflicting ranges:\n{}",
                failure.body.error.message,
                ranges_table(conflicts).trim_end()
            );
        }
    };
    let report: MergeReport = decode(&text)?;
    let would_conflict = report.outcome == MergeOutcome::Conflicts;
    if json {
        print_json(&text)?;
    } else {
        print_report(&report, args.strategy);
    }
    if would_conflict {
        anyhow::bail!(
            "the merge would stop on conflicts: both sides changed {} differently; \
             merge with --strategy ours or --strategy theirs to settle them, or \
             --strategy manual to resolve them by hand",
            amount(report.conflict_bytes, report.conflicts.len())
        );
    }
    Ok(())
}

fn print_report(report: &MergeReport, strategy: Strategy) {
    let into = format!("{}@{}", report.volume, report.into);
    let commit = report.commit.as_ref().map(|c| c.id.clone());
    let headline = match (report.outcome, report.dry_run) {
        (MergeOutcome::UpToDate, _) => format!("{into} is already up to date"),
        (MergeOutcome::FastForward, false) => format!(
            "fast-forwarded {into} to {}",
            commit.as_deref().map(short_id).unwrap_or_default()
        ),
        (MergeOutcome::FastForward, true) => format!(
            "dry run: {into} would fast-forward to {}",
            short_id(&report.from_commit)
        ),
        (MergeOutcome::Merged, false) => format!(
            "merged into {into}: commit {}",
            commit.as_deref().unwrap_or_default()
        ),
        (MergeOutcome::Merged, true) => format!("dry run: {into} would get a merge commit"),
        (MergeOutcome::Conflicts, _) => format!("dry run: merging into {into} would conflict"),
        (MergeOutcome::InProgress, false) => format!(
            "merge in progress on {}@{}: write the resolved content of the conflicting ranges \
             there (NBD export {}@{}), then run `grove merge {} --conclude {}` (or --abort)",
            report.volume,
            report.merge_branch.as_deref().unwrap_or_default(),
            report.volume,
            report.merge_branch.as_deref().unwrap_or_default(),
            report.volume,
            report.merge_branch.as_deref().unwrap_or_default(),
        ),
        (MergeOutcome::InProgress, true) => {
            format!("dry run: merging into {into} would leave conflicts to resolve by hand")
        }
    };
    println!("{headline}");
    let none = || "-".to_string();
    let mut fields = vec![
        ("merged commit", short_id(&report.from_commit)),
        (
            "branch was at",
            report
                .ours_commit
                .as_deref()
                .map(short_id)
                .unwrap_or_else(none),
        ),
        (
            "common ancestor",
            report
                .base
                .as_deref()
                .map(short_id)
                .unwrap_or_else(|| "(the empty volume)".into()),
        ),
        ("taken", amount(report.taken_bytes, report.taken.len())),
    ];
    let settled = match strategy {
        Strategy::Fail => "",
        Strategy::Ours => ", kept ours",
        Strategy::Theirs => ", took theirs",
        Strategy::Manual => ", to resolve by hand",
    };
    fields.push((
        "conflicts",
        format!(
            "{}{settled}",
            amount(report.conflict_bytes, report.conflicts.len())
        ),
    ));
    print_fields(&fields);
    if !report.conflicts.is_empty() {
        println!("conflicting ranges:");
        print!("{}", ranges_table(&report.conflicts));
    }
}

fn print_status(merges: &[MergeInProgress]) {
    if merges.is_empty() {
        println!("no merges in progress");
        return;
    }
    for (i, merge) in merges.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!(
            "merge of {} into {}@{} in progress on {}@{}",
            merge.from, merge.volume, merge.into, merge.volume, merge.merge_branch
        );
        let none = || "-".to_string();
        print_fields(&[
            ("merged commit", short_id(&merge.from_commit)),
            (
                "branch was at",
                merge
                    .ours_commit
                    .as_deref()
                    .map(short_id)
                    .unwrap_or_else(none),
            ),
            ("taken", amount(merge.taken_bytes, merge.taken.len())),
            (
                "conflicts",
                amount(merge.conflict_bytes, merge.conflicts.len()),
            ),
            ("written since", format_size(merge.edited_bytes)),
        ]);
        if !merge.conflicts.is_empty() {
            println!("conflicting ranges:");
            print!("{}", ranges_table(&merge.conflicts));
        }
    }
}
