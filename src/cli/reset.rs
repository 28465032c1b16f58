//! `grove reset VOL@BRANCH REF [--discard-uncommitted]`: move a branch head to a commit.

use clap::Args;
use grove_mgmt_api::model::Branch;
use serde_json::json;

use super::client::{decode, segment, ApiFailure, Client};
use super::output::{print_json, short_id};
use super::refs;

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The branch to move: VOL (its main branch) or VOL@BRANCH.
    #[arg(value_name = "VOL@BRANCH")]
    pub branch: String,
    /// Where the head goes: VOL@COMMIT, VOL@TAG, VOL@BRANCH (its latest commit), or a name in
    /// VOL.
    #[arg(value_name = "REF")]
    pub target: String,
    /// Throw away writes made on the branch since its latest commit (refused without it).
    #[arg(long)]
    pub discard_uncommitted: bool,
}

pub fn run(client: &Client, json: bool, args: ResetArgs) -> anyhow::Result<()> {
    let branch = refs::parse_branch(&args.branch)?;
    let target = refs::ref_in_context(&branch.volume, &args.target)?;
    let path = format!(
        "/v1/volumes/{}/branches/{}/reset",
        segment(&branch.volume)?,
        segment(&branch.name)?
    );
    let body = json!({"to": target, "discard_uncommitted": args.discard_uncommitted});
    let text = client.post(&path, &body).map_err(|error| {
        let refused_uncommitted = error
            .downcast_ref::<ApiFailure>()
            .is_some_and(|f| f.status == 409 && f.body.error.message.contains("uncommitted"));
        if refused_uncommitted && !args.discard_uncommitted {
            error.context("the branch has uncommitted writes; reset with --discard-uncommitted to throw them away")
        } else {
            error
        }
    })?;
    if json {
        return print_json(&text);
    }
    let reset: Branch = decode(&text)?;
    let at = reset
        .head_commit
        .as_deref()
        .map(short_id)
        .unwrap_or_default();
    println!("reset {}@{} to {at}", reset.volume, reset.name);
    Ok(())
}
