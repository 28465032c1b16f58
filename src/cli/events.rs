//! `grove events [--since SEQ] [--type T]... [--volume V] [--limit N] [--follow]`: the event
//! log, oldest first, one event per line (`--json`: one JSON object per line). `--follow`
//! keeps printing new events as they happen, reconnecting after `Last-Event-ID` if the
//! connection drops, so that none is missed or printed twice.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use clap::Args;
use grove_mgmt_api::model::{Event, EventPage};
use grove_mgmt_api::validate;

use super::client::{decode, Client};
use super::output::{short_id, time};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Print the events after this sequence number [default: from the oldest; with --follow,
    /// only new ones].
    #[arg(long, value_name = "SEQ")]
    pub since: Option<u64>,
    /// Only events of this type (`commit.created`, `merge.completed`, ...); repeatable.
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Only events about this volume.
    #[arg(long, value_name = "VOL")]
    pub volume: Option<String>,
    /// Print at most this many events (not with --follow).
    #[arg(long, value_name = "N", conflicts_with = "follow")]
    pub limit: Option<usize>,
    /// Keep printing events as they happen, until interrupted.
    #[arg(short, long)]
    pub follow: bool,
}

/// Events asked for per page.
const PAGE: usize = 1000;
/// Wait before reconnecting a dropped stream.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

pub fn run(client: &Client, json: bool, args: EventsArgs) -> anyhow::Result<()> {
    if let Some(volume) = &args.volume {
        validate::volume_name(volume)?;
    }
    let mut filters: Vec<(&str, String)> = Vec::new();
    if !args.types.is_empty() {
        filters.push(("type", args.types.join(",")));
    }
    if let Some(volume) = &args.volume {
        filters.push(("volume", volume.clone()));
    }
    if args.follow {
        return follow(client, json, args.since, &filters);
    }
    let mut since = args.since.unwrap_or(0);
    let mut left = args.limit.unwrap_or(usize::MAX);
    while left > 0 {
        let mut query = filters.clone();
        query.push(("since", since.to_string()));
        query.push(("limit", left.min(PAGE).to_string()));
        let page: EventPage = decode(&client.get("/v1/events", &query)?)?;
        for event in &page.events {
            print_event(event, json)?;
        }
        left = left.saturating_sub(page.events.len());
        if page.next_since <= since || page.next_since >= page.last_seq {
            break;
        }
        since = page.next_since;
    }
    Ok(())
}

fn follow(
    client: &Client,
    json: bool,
    since: Option<u64>,
    filters: &[(&str, String)],
) -> anyhow::Result<()> {
    let mut last = since;
    loop {
        let mut query = filters.to_vec();
        if let Some(last) = last {
            query.push(("since", last.to_string()));
        }
        let reader = match client.stream("/v1/events/stream", &query) {
            Ok(reader) => reader,
            // Refused by the API (a bad filter): no use retrying.
            Err(error) if error.downcast_ref::<super::client::ApiFailure>().is_some() => {
                return Err(error)
            }
            Err(error) => {
                eprintln!("grove: {error:#}; reconnecting");
                std::thread::sleep(RECONNECT_DELAY);
                continue;
            }
        };
        let mut data = String::new();
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                let event: Event = decode(&data)?;
                data.clear();
                last = Some(event.seq);
                print_event(&event, json)?;
            }
        }
        eprintln!("grove: the event stream ended; reconnecting");
        std::thread::sleep(RECONNECT_DELAY);
        // From the last event printed; with none yet, from the start of the first attempt.
        last = last.or(Some(since.unwrap_or(0)));
    }
}

fn print_event(event: &Event, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(event)?)?;
    } else {
        writeln!(
            out,
            "{:>6}  {}  {:<16} {}",
            event.seq,
            time(event.time_unix_ms / 1000),
            event.event_type,
            details(event)
        )?;
    }
    out.flush()?;
    Ok(())
}

/// The event's fields as `key=value`, ids shortened, long lists counted.
fn details(event: &Event) -> String {
    let mut parts = Vec::new();
    for (key, value) in &event.fields {
        let text = match value {
            serde_json::Value::String(s)
                if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                short_id(s)
            }
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(items) if items.iter().all(|i| i.is_string()) => items
                .iter()
                .filter_map(|i| i.as_str())
                .map(short_id)
                .collect::<Vec<_>>()
                .join(","),
            serde_json::Value::Array(items) => format!("[{} items]", items.len()),
            serde_json::Value::Null => continue,
            other => other.to_string(),
        };
        parts.push(format!("{key}={text}"));
    }
    if let Some(actor) = &event.actor {
        parts.push(format!("by={actor}"));
    }
    parts.join(" ")
}
