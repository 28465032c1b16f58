//! `grove commit VOL[@BRANCH] -m MSG [--author A] [--meta k=v]... [--source REF]...`: prints the
//! new commit id.
//! `grove commit delete VOL ID`: squashes a commit into its children.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use grove_mgmt_api::model::Commit;
use grove_mgmt_api::validate;
use serde_json::json;

use super::client::{decode, segment, Client};
use super::output::print_json;
use super::refs;

/// `grove commit` makes a commit, unless a subcommand follows. (A volume named like a
/// subcommand is committed as `VOL@main`.)
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CommitArgs {
    #[command(subcommand)]
    pub command: Option<CommitCommand>,
    /// The branch to commit: VOL (its main branch) or VOL@BRANCH.
    #[arg(value_name = "VOL[@BRANCH]", required = true)]
    pub target: Option<String>,
    /// Commit message.
    #[arg(short, long, value_name = "MSG", required = true)]
    pub message: Option<String>,
    /// Who makes the commit.
    #[arg(long, value_name = "A")]
    pub author: Option<String>,
    /// Metadata entry; repeat for more.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// A commit the data was derived from (lineage): VOL@REF, or a name in the volume;
    /// repeat for more.
    #[arg(long = "source", value_name = "REF")]
    pub sources: Vec<String>,
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("invalid metadata {text:?}: use KEY=VALUE")),
    }
}

fn meta_map(entries: Vec<(String, String)>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut meta = BTreeMap::new();
    for (key, value) in entries {
        if meta.insert(key.clone(), value).is_some() {
            anyhow::bail!("metadata key {key:?} is given more than once");
        }
    }
    Ok(meta)
}

#[derive(Debug, Subcommand)]
pub enum CommitCommand {
    /// Delete a commit, squashing its changes into its children (refused while a tag names it
    /// or it is a branch's latest commit). The space only it held returns to the pool.
    Delete {
        volume: String,
        /// Commit id or a unique prefix of one.
        #[arg(value_name = "ID")]
        id: String,
    },
}

pub fn run(client: &Client, json: bool, args: CommitArgs) -> anyhow::Result<()> {
    if let Some(CommitCommand::Delete { volume, id }) = args.command {
        validate::volume_name(&volume)?;
        let id = validate::commit_id_prefix(&id)?;
        let text = client.delete(&format!(
            "/v1/volumes/{}/commits/{}",
            segment(&volume)?,
            segment(&id)?
        ))?;
        if json {
            return print_json(&text);
        }
        println!("deleted commit {id} of volume {volume} (squashed into its children)");
        return Ok(());
    }
    // Clap requires both when no subcommand is given.
    let (Some(target), Some(message)) = (args.target, args.message) else {
        anyhow::bail!("usage: grove commit VOL[@BRANCH] -m MSG");
    };
    let target = refs::parse_branch(&target)?;
    let meta = meta_map(args.meta)?;
    let sources = args
        .sources
        .iter()
        .map(|source| refs::ref_in_context(&target.volume, source))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut body = json!({"message": message, "meta": meta, "sources": sources});
    if let Some(author) = &args.author {
        body["author"] = json!(author);
    }
    let path = format!(
        "/v1/volumes/{}/branches/{}/commits",
        segment(&target.volume)?,
        segment(&target.name)?
    );
    let text = client.post(&path, &body)?;
    if json {
        return print_json(&text);
    }
    let commit: Commit = decode(&text)?;
    println!("{}", commit.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_entries() {
        assert_eq!(parse_meta("a=1"), Ok(("a".into(), "1".into())));
        assert_eq!(parse_meta("a="), Ok(("a".into(), String::new())));
        assert_eq!(
            parse_meta("url=http://x?a=b"),
            Ok(("url".into(), "http://x?a=b".into()))
        );
        assert!(parse_meta("a").is_err());
        assert!(parse_meta("=1").is_err());
        assert!(meta_map(vec![("a".into(), "1".into()), ("a".into(), "2".into())]).is_err());
        assert_eq!(meta_map(vec![("b".into(), "2".into())]).unwrap().len(), 1);
    }
}
