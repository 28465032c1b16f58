//! `grove branch create | list | delete`.

use clap::Subcommand;
use grove_engine::BLOCK_SIZE;
use grove_mgmt_api::model::Branch;
use grove_mgmt_api::size::format_size;
use grove_mgmt_api::validate;
use serde_json::json;

use super::client::{decode, segment, Client};
use super::output::{print_json, short_id, time, Table};
use super::refs;

#[derive(Debug, Subcommand)]
pub enum BranchCommand {
    /// Create a branch (O(1): nothing is copied).
    Create {
        volume: String,
        /// Branch name: 1-128 letters, digits, '-', '_', '.' and '/'.
        branch: String,
        /// Where the branch starts: VOL@BRANCH, VOL@TAG, VOL@COMMIT, or a name in VOL
        /// [default: VOL@main].
        #[arg(long, value_name = "REF")]
        from: Option<String>,
    },
    /// List the branches of a volume.
    List { volume: String },
    /// Delete a branch.
    Delete { volume: String, branch: String },
    /// Protect a branch: only merges change it (its exports turn read-only; resets and
    /// deletes are refused).
    Protect { volume: String, branch: String },
    /// Lift a branch's protection.
    Unprotect { volume: String, branch: String },
}

pub fn run(client: &Client, json: bool, command: BranchCommand) -> anyhow::Result<()> {
    match command {
        BranchCommand::Create {
            volume,
            branch,
            from,
        } => {
            validate::volume_name(&volume)?;
            validate::branch_name(&branch)?;
            let mut body = json!({"name": branch});
            if let Some(from) = &from {
                body["from"] = json!(refs::name_in_volume(&volume, from)?);
            }
            let text = client.post(
                &format!("/v1/volumes/{}/branches", segment(&volume)?),
                &body,
            )?;
            if json {
                return print_json(&text);
            }
            let created: Branch = decode(&text)?;
            let head = match &created.head_commit {
                Some(id) => format!("at {}", short_id(id)),
                None => "(no commits yet)".to_string(),
            };
            println!("created branch {}@{} {head}", created.volume, created.name);
        }
        BranchCommand::List { volume } => {
            validate::volume_name(&volume)?;
            let text = client.get(&format!("/v1/volumes/{}/branches", segment(&volume)?), &[])?;
            if json {
                return print_json(&text);
            }
            let branches: Vec<Branch> = decode(&text)?;
            let mut table = Table::new(&["NAME", "HEAD", "UNCOMMITTED", "CREATED", "PROTECTED"]);
            for branch in branches {
                let protected = if branch.protected { "yes" } else { "-" };
                table.row(vec![
                    branch.name,
                    branch
                        .head_commit
                        .as_deref()
                        .map(short_id)
                        .unwrap_or_else(|| "-".into()),
                    format_size(branch.uncommitted_blocks.saturating_mul(BLOCK_SIZE)),
                    time(branch.created_unix),
                    protected.to_string(),
                ]);
            }
            table.print();
        }
        BranchCommand::Delete { volume, branch } => {
            validate::volume_name(&volume)?;
            validate::branch_name(&branch)?;
            let path = format!(
                "/v1/volumes/{}/branches/{}",
                segment(&volume)?,
                segment(&branch)?
            );
            let text = client.delete(&path)?;
            if json {
                return print_json(&text);
            }
            println!("deleted branch {volume}@{branch}");
        }
        BranchCommand::Protect { volume, branch } => protect(client, json, &volume, &branch, true)?,
        BranchCommand::Unprotect { volume, branch } => {
            protect(client, json, &volume, &branch, false)?
        }
    }
    Ok(())
}

fn protect(
    client: &Client,
    json: bool,
    volume: &str,
    branch: &str,
    protected: bool,
) -> anyhow::Result<()> {
    validate::volume_name(volume)?;
    validate::branch_name(branch)?;
    let path = format!(
        "/v1/volumes/{}/branches/{}/protection",
        segment(volume)?,
        segment(branch)?
    );
    let text = client.put(&path, &json!({ "protected": protected }))?;
    if json {
        return print_json(&text);
    }
    let state = if protected {
        "protected"
    } else {
        "unprotected"
    };
    println!("{state} branch {volume}@{branch}");
    Ok(())
}
