//! `grove volume create | clone | list | show | delete`.

use clap::Subcommand;
use grove_mgmt_api::model::{Volume, VolumeDetail, VolumeSpaceScan};
use grove_mgmt_api::size::{format_size, ByteSize};
use grove_mgmt_api::validate;
use serde_json::json;

use super::client::{decode, segment, Client};
use super::output::{or_dash, print_fields, print_json, short_id, time, Table};
use super::refs;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create an empty volume with a main branch; every block written gets a checksum unless
    /// --no-checksums.
    Create {
        /// Volume name: 1-63 lowercase letters, digits and '-'.
        volume: String,
        /// Size, such as 10GiB, 512MiB or 1TiB (a multiple of 4 KiB).
        #[arg(long, value_name = "SIZE")]
        size: ByteSize,
        /// Store no checksums: reads return what the disk holds, damaged or not. By default
        /// every block written gets a crc32c that every read checks.
        #[arg(long)]
        no_checksums: bool,
    },
    /// Create a volume from a ref of another, in O(1): it shares every block, nothing is copied.
    Clone {
        /// What to clone: VOL, VOL@BRANCH (uncommitted writes included), VOL@TAG or VOL@COMMIT.
        #[arg(value_name = "REF")]
        source: String,
        /// Name of the new volume.
        #[arg(value_name = "NEWVOL")]
        name: String,
    },
    /// List volumes.
    List,
    /// Show one volume, with what its branches and commits hold alone (space figures).
    Show { volume: String },
    /// Delete a volume with all its branches, commits and tags (refused while it has clones).
    Delete { volume: String },
}

pub fn run(client: &Client, json: bool, command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create {
            volume,
            size,
            no_checksums,
        } => {
            validate::volume_name(&volume)?;
            let text = client.post(
                "/v1/volumes",
                &json!({"name": volume, "size": size.bytes(), "checksums": !no_checksums}),
            )?;
            if json {
                return print_json(&text);
            }
            let created: Volume = decode(&text)?;
            println!(
                "created volume {} ({}, checksums {})",
                created.name,
                format_size(created.size_bytes),
                on_off(created.checksums)
            );
        }
        VolumeCommand::List => {
            let text = client.get("/v1/volumes", &[])?;
            if json {
                return print_json(&text);
            }
            let volumes: Vec<Volume> = decode(&text)?;
            let mut table = Table::new(&[
                "NAME",
                "SIZE",
                "WRITTEN",
                "BRANCHES",
                "COMMITS",
                "TAGS",
                "CHECKSUMS",
                "CREATED",
                "ORIGIN",
            ]);
            for volume in volumes {
                table.row(vec![
                    volume.name,
                    format_size(volume.size_bytes),
                    format_size(volume.written_bytes),
                    volume.branches.to_string(),
                    volume.commits.to_string(),
                    volume.tags.to_string(),
                    on_off(volume.checksums).to_string(),
                    time(volume.created_unix),
                    or_dash(volume.origin.as_ref().map(|o| o.source.as_str())),
                ]);
            }
            table.print();
        }
        VolumeCommand::Clone { source, name } => {
            let source = refs::parse(&source)?;
            validate::volume_name(&name)?;
            let text = client.post(
                &format!("/v1/volumes/{}/clones", segment(&source.volume)?),
                &json!({"name": name, "ref": source.name}),
            )?;
            if json {
                return print_json(&text);
            }
            let created: Volume = decode(&text)?;
            let origin = created
                .origin
                .as_ref()
                .map(|o| o.source.clone())
                .unwrap_or_default();
            println!(
                "cloned {origin} into volume {} ({}; blocks are shared, nothing was copied)",
                created.name,
                format_size(created.size_bytes)
            );
        }
        VolumeCommand::Show { volume } => {
            validate::volume_name(&volume)?;
            let text = client.get(&format!("/v1/volumes/{}", segment(&volume)?), &[])?;
            if json {
                return print_json(&text);
            }
            let detail: VolumeDetail = decode(&text)?;
            print_volume(detail);
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

fn on_off(value: bool) -> &'static str {
    if value {
        "on"
    } else {
        "off"
    }
}

fn bytes(value: u64) -> String {
    format!("{} ({value} bytes)", format_size(value))
}

fn print_volume(detail: VolumeDetail) {
    let VolumeDetail { volume, space } = detail;
    let origin = match &volume.origin {
        Some(origin) => match &origin.commit {
            Some(commit) => format!(
                "clone of {} (at commit {})",
                origin.source,
                short_id(commit)
            ),
            None => format!("clone of {}", origin.source),
        },
        None => "-".to_string(),
    };
    let mut fields = vec![
        ("name", volume.name),
        ("size", bytes(volume.size_bytes)),
        ("written", bytes(volume.written_bytes)),
        ("origin", origin),
        ("branches", volume.branches.to_string()),
        ("commits", volume.commits.to_string()),
        ("tags", volume.tags.to_string()),
        ("checksums", on_off(volume.checksums).to_string()),
        ("created", time(volume.created_unix)),
    ];
    let Some(space) = space else {
        fields.push((
            "space scan",
            "none has seen this volume yet (`grove pool reclaim` runs one)".to_string(),
        ));
        print_fields(&fields);
        return;
    };
    fields.extend([
        (
            "space scan",
            format!(
                "generation {} at {}",
                space.generation,
                time(space.computed_unix)
            ),
        ),
        ("referenced", bytes(space.referenced_bytes)),
        (
            "exclusive",
            format!(
                "{} (what deleting the volume frees)",
                bytes(space.exclusive_bytes)
            ),
        ),
    ]);
    print_fields(&fields);
    print_exclusive_table(&space);
}

/// What each branch and commit holds alone: what deleting it would free.
fn print_exclusive_table(space: &VolumeSpaceScan) {
    if space.branches.is_empty() && space.commits.is_empty() {
        return;
    }
    println!();
    let mut table = Table::new(&["REF", "KIND", "EXCLUSIVE", "BYTES"]);
    for (branch, bytes) in &space.branches {
        table.row(vec![
            branch.clone(),
            "branch".into(),
            format_size(*bytes),
            bytes.to_string(),
        ]);
    }
    for (commit, bytes) in &space.commits {
        table.row(vec![
            short_id(commit),
            "commit".into(),
            format_size(*bytes),
            bytes.to_string(),
        ]);
    }
    table.print();
}
