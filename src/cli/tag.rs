//! `grove tag create | list | delete`.

use clap::Subcommand;
use grove_mgmt_api::model::Tag;
use grove_mgmt_api::validate;
use serde_json::json;

use super::client::{decode, segment, Client};
use super::output::{print_json, short_id, time, Table};
use super::refs;

#[derive(Debug, Subcommand)]
pub enum TagCommand {
    /// Name a commit (a branch as REF tags its head commit).
    Create {
        volume: String,
        /// Tag name: 1-128 letters, digits, '-', '_', '.' and '/'.
        tag: String,
        /// What to tag: VOL@BRANCH, VOL@TAG, VOL@COMMIT, or a name in VOL.
        #[arg(value_name = "REF")]
        target: String,
    },
    /// List the tags of a volume.
    List { volume: String },
    /// Delete a tag.
    Delete { volume: String, tag: String },
}

pub fn run(client: &Client, json: bool, command: TagCommand) -> anyhow::Result<()> {
    match command {
        TagCommand::Create {
            volume,
            tag,
            target,
        } => {
            validate::volume_name(&volume)?;
            validate::tag_name(&tag)?;
            let target = refs::name_in_volume(&volume, &target)?;
            let body = json!({"name": tag, "ref": target});
            let text = client.post(&format!("/v1/volumes/{}/tags", segment(&volume)?), &body)?;
            if json {
                return print_json(&text);
            }
            let created: Tag = decode(&text)?;
            println!(
                "created tag {}@{} at {}",
                created.volume,
                created.name,
                short_id(&created.commit)
            );
        }
        TagCommand::List { volume } => {
            validate::volume_name(&volume)?;
            let text = client.get(&format!("/v1/volumes/{}/tags", segment(&volume)?), &[])?;
            if json {
                return print_json(&text);
            }
            let tags: Vec<Tag> = decode(&text)?;
            let mut table = Table::new(&["NAME", "COMMIT", "CREATED"]);
            for tag in tags {
                table.row(vec![
                    tag.name,
                    short_id(&tag.commit),
                    time(tag.created_unix),
                ]);
            }
            table.print();
        }
        TagCommand::Delete { volume, tag } => {
            validate::volume_name(&volume)?;
            validate::tag_name(&tag)?;
            let path = format!("/v1/volumes/{}/tags/{}", segment(&volume)?, segment(&tag)?);
            let text = client.delete(&path)?;
            if json {
                return print_json(&text);
            }
            println!("deleted tag {volume}@{tag}");
        }
    }
    Ok(())
}
