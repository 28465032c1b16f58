//! `grove volume create | list | show | delete`.

use clap::Subcommand;
use grove_mgmt_api::model::Volume;
use grove_mgmt_api::size::{format_size, ByteSize};
use grove_mgmt_api::validate;
use serde_json::json;

use super::client::{decode, segment, Client};
use super::output::{print_fields, print_json, time, Table};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create an empty volume with a main branch.
    Create {
        /// Volume name: 1-63 lowercase letters, digits and '-'.
        volume: String,
        /// Size, such as 10GiB, 512MiB or 1TiB (a multiple of 4 KiB).
        #[arg(long, value_name = "SIZE")]
        size: ByteSize,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { volume: String },
    /// Delete a volume with all its branches, commits and tags.
    Delete { volume: String },
}

pub fn run(client: &Client, json: bool, command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create { volume, size } => {
            validate::volume_name(&volume)?;
            let text = client.post(
                "/v1/volumes",
                &json!({"name": volume, "size": size.bytes()}),
            )?;
            if json {
                return print_json(&text);
            }
            let created: Volume = decode(&text)?;
            println!(
                "created volume {} ({})",
                created.name,
                format_size(created.size_bytes)
            );
        }
        VolumeCommand::List => {
            let text = client.get("/v1/volumes", &[])?;
            if json {
                return print_json(&text);
            }
            let volumes: Vec<Volume> = decode(&text)?;
            let mut table = Table::new(&[
                "NAME", "SIZE", "WRITTEN", "BRANCHES", "COMMITS", "TAGS", "CREATED",
            ]);
            for volume in volumes {
                table.row(vec![
                    volume.name,
                    format_size(volume.size_bytes),
                    format_size(volume.written_bytes),
                    volume.branches.to_string(),
                    volume.commits.to_string(),
                    volume.tags.to_string(),
                    time(volume.created_unix),
                ]);
            }
            table.print();
        }
        VolumeCommand::Show { volume } => {
            validate::volume_name(&volume)?;
            let text = client.get(&format!("/v1/volumes/{}", segment(&volume)?), &[])?;
            if json {
                return print_json(&text);
            }
            let volume: Volume = decode(&text)?;
            print_fields(&[
                ("name", volume.name),
                (
                    "size",
                    format!(
                        "{} ({} bytes)",
                        format_size(volume.size_bytes),
                        volume.size_bytes
                    ),
                ),
                (
                    "written",
                    format!(
                        "{} ({} bytes)",
                        format_size(volume.written_bytes),
                        volume.written_bytes
                    ),
                ),
                ("branches", volume.branches.to_string()),
                ("commits", volume.commits.to_string()),
                ("tags", volume.tags.to_string()),
                ("created", time(volume.created_unix)),
            ]);
        }
        VolumeCommand::Delete { volume } => {
            validate::volume_name(&volume)?;
            let text = client.delete(&format!("/v1/volumes/{}", segment(&volume)?))?;
            if json {
                return print_json(&text);
            }
            println!("deleted volume {volume}");
        }
    }
    Ok(())
}
