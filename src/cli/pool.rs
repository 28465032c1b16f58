//! `grove pool`.

use grove_mgmt_api::model::PoolStatus;
use grove_mgmt_api::size::format_size;

use super::client::{decode, Client};
use super::output::{print_fields, print_json};

pub fn run(client: &Client, json: bool) -> anyhow::Result<()> {
    let text = client.get("/v1/pool", &[])?;
    if json {
        return print_json(&text);
    }
    let pool: PoolStatus = decode(&text)?;
    let bytes = |value: u64| format!("{} ({value} bytes)", format_size(value));
    print_fields(&[
        ("capacity", bytes(pool.capacity_bytes)),
        ("used", bytes(pool.used_bytes)),
        ("free", bytes(pool.free_bytes)),
        ("metadata", bytes(pool.metadata_bytes)),
        ("io backend", pool.io_backend),
    ]);
    Ok(())
}
