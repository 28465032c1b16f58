//! `grove lineage REF [--upstream|--downstream] [--depth N]`: where a commit's data came from,
//! or what was derived from it, across volumes.

use clap::Args;
use grove_mgmt_api::model::{Commit, LineageGraph};
use grove_mgmt_api::size::format_size;

use super::client::{decode, segment, Client};
use super::output::{message_summary, print_json, short_id, time, Table};
use super::refs;

#[derive(Debug, Args)]
pub struct LineageArgs {
    /// The commit: VOL@COMMIT, VOL@TAG, or VOL[@BRANCH] (its latest commit).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Walk back through parents and sources to the original data (the default).
    #[arg(long, conflicts_with = "downstream")]
    pub upstream: bool,
    /// Walk forward to the commits derived from it, in any volume.
    #[arg(long)]
    pub downstream: bool,
    /// Steps to walk (1-1000) [default: 100].
    #[arg(long, value_name = "N")]
    pub depth: Option<usize>,
}

pub fn run(client: &Client, json: bool, args: LineageArgs) -> anyhow::Result<()> {
    let reference = refs::parse(&args.reference)?;
    let volume = segment(&reference.volume)?;
    // The ref's commit: the first entry of its log.
    let log: Vec<Commit> = decode(&client.get(
        &format!("/v1/volumes/{volume}/log"),
        &[("ref", reference.name.clone()), ("limit", "1".into())],
    )?)?;
    let Some(commit) = log.first() else {
        anyhow::bail!("{} has no commits yet", args.reference);
    };
    let direction = if args.downstream {
        "downstream"
    } else {
        "upstream"
    };
    let mut query = vec![("direction", direction.to_string())];
    if let Some(depth) = args.depth {
        query.push(("depth", depth.to_string()));
    }
    let text = client.get(
        &format!("/v1/volumes/{volume}/commits/{}/lineage", commit.id),
        &query,
    )?;
    if json {
        return print_json(&text);
    }
    let graph: LineageGraph = decode(&text)?;
    let mut table = Table::new(&[
        "COMMIT",
        "VOLUME",
        "BRANCH",
        "CREATED",
        "WRITTEN BY",
        "MESSAGE",
    ]);
    for commit in &graph.commits {
        let writers: Vec<String> = commit
            .lineage
            .sessions
            .iter()
            .map(|s| match &s.job {
                Some(job) => format!("{}:{} (job {job})", s.protocol, s.client),
                None => format!("{}:{}", s.protocol, s.client),
            })
            .collect();
        table.row(vec![
            short_id(&commit.id),
            commit.volume.clone(),
            commit.branch.clone(),
            time(commit.created_unix),
            if writers.is_empty() {
                "-".into()
            } else {
                writers.join(", ")
            },
            message_summary(&commit.message),
        ]);
    }
    table.print();
    if !graph.edges.is_empty() {
        println!();
        for edge in &graph.edges {
            let how = match &edge.source {
                Some(source) if source.kind == "job" => format!(
                    "source, read by job {} ({})",
                    source.job.as_deref().unwrap_or("?"),
                    format_size(source.bytes_read)
                ),
                Some(_) => "source, named".to_string(),
                None => edge.kind.clone(),
            };
            println!(
                "{} <- {}  {how}",
                short_id(&edge.commit),
                short_id(&edge.from)
            );
        }
    }
    if graph.truncated {
        println!("(more beyond --depth)");
    }
    Ok(())
}
