//! `grove sessions`.

use grove_mgmt_api::model::Session;
use grove_mgmt_api::size::format_size;

use super::client::{decode, Client};
use super::output::{print_json, time, Table};

pub fn run(client: &Client, json: bool) -> anyhow::Result<()> {
    let text = client.get("/v1/sessions", &[])?;
    if json {
        return print_json(&text);
    }
    let sessions: Vec<Session> = decode(&text)?;
    let mut table = Table::new(&[
        "ID", "EXPORT", "PROTOCOL", "CLIENT", "OPENED", "READS", "READ", "WRITES", "WRITTEN",
        "FLUSHES",
    ]);
    for session in sessions {
        let counters = session.counters;
        table.row(vec![
            session.id.to_string(),
            session.export,
            session.client.protocol,
            session.client.address,
            time(session.opened_unix),
            counters.read_ops.to_string(),
            format_size(counters.read_bytes),
            counters.write_ops.to_string(),
            format_size(counters.write_bytes),
            counters.flush_ops.to_string(),
        ]);
    }
    table.print();
    Ok(())
}
