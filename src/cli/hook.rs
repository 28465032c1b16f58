//! `grove hook add | list | show | delete | deliveries | redeliver`.

use clap::Subcommand;
use grove_mgmt_api::hooks::{Attempt, Hook};
use serde_json::json;

use super::client::{decode, segment, Client};
use super::output::{print_fields, print_json, time, Table};

#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// Add a webhook (URL) or an exec hook (--exec PROGRAM).
    Add {
        /// Where to POST the events (http:// or https://).
        #[arg(value_name = "URL", required_unless_present = "exec")]
        url: Option<String>,
        /// Run this program with each event's JSON on stdin instead (exit 0 takes it).
        #[arg(long, value_name = "PROGRAM", conflicts_with = "url")]
        exec: Option<String>,
        /// An argument for the program; repeatable.
        #[arg(long = "arg", value_name = "ARG", requires = "exec")]
        args: Vec<String>,
        /// Event type (commit.created, ...) or blocking type (pre-commit, pre-merge,
        /// pre-delete); repeatable.
        #[arg(long = "event", value_name = "TYPE", required = true)]
        events: Vec<String>,
        /// Only events about volumes matching this glob.
        #[arg(long, value_name = "GLOB")]
        volume: Option<String>,
        /// Only events about branches or tags matching this glob.
        #[arg(long, value_name = "GLOB")]
        branch: Option<String>,
        /// Sign bodies with HMAC-SHA256 under this secret (X-Grove-Signature).
        #[arg(long, value_name = "S")]
        secret: Option<String>,
        /// How long a call may take [default: 10000].
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
        /// Blocking hooks: let the operation through when the hook does not answer in time.
        #[arg(long)]
        allow_on_timeout: bool,
    },
    /// List the hooks with how their deliveries are going.
    List,
    /// Show a hook.
    Show { id: String },
    /// Delete a hook.
    Delete { id: String },
    /// A hook's recent delivery attempts.
    Deliveries { id: String },
    /// Deliver event SEQ to a hook again, now.
    Redeliver { id: String, seq: u64 },
}

pub fn run(client: &Client, json: bool, command: HookCommand) -> anyhow::Result<()> {
    match command {
        HookCommand::Add {
            url,
            exec,
            args,
            events,
            volume,
            branch,
            secret,
            timeout_ms,
            allow_on_timeout,
        } => {
            let exec = exec.map(|program| std::iter::once(program).chain(args).collect::<Vec<_>>());
            let body = json!({
                "url": url,
                "exec": exec,
                "events": events,
                "volume": volume,
                "branch": branch,
                "secret": secret,
                "timeout_ms": timeout_ms,
                "allow_on_timeout": allow_on_timeout,
            });
            let text = client.post("/v1/hooks", &body)?;
            if json {
                return print_json(&text);
            }
            let hook: Hook = decode(&text)?;
            println!("{}", hook.id);
        }
        HookCommand::List => {
            let text = client.get("/v1/hooks", &[])?;
            if json {
                return print_json(&text);
            }
            let hooks: Vec<Hook> = decode(&text)?;
            let mut table = Table::new(&["ID", "TARGET", "EVENTS", "FILTER", "DELIVERED", "STATE"]);
            for hook in hooks {
                table.row(vec![
                    hook.id.clone(),
                    target(&hook),
                    hook.events.join(","),
                    filter(&hook),
                    hook.status.delivered_seq.to_string(),
                    state(&hook),
                ]);
            }
            table.print();
        }
        HookCommand::Show { id } => {
            let text = client.get(&format!("/v1/hooks/{}", segment(&id)?), &[])?;
            if json {
                return print_json(&text);
            }
            let hook: Hook = decode(&text)?;
            print_fields(&[
                ("id", hook.id.clone()),
                ("target", target(&hook)),
                ("events", hook.events.join(", ")),
                ("filter", filter(&hook)),
                ("signed", if hook.has_secret { "yes" } else { "no" }.into()),
                ("timeout", format!("{} ms", hook.timeout_ms)),
                ("created", time(hook.created_unix)),
                ("delivered up to", hook.status.delivered_seq.to_string()),
                (
                    "deliveries",
                    format!(
                        "{} ok, {} failed",
                        hook.status.deliveries_ok, hook.status.deliveries_failed
                    ),
                ),
                ("state", state(&hook)),
            ]);
        }
        HookCommand::Delete { id } => {
            client.delete(&format!("/v1/hooks/{}", segment(&id)?))?;
            if !json {
                println!("deleted hook {id}");
            }
        }
        HookCommand::Deliveries { id } => {
            let text = client.get(&format!("/v1/hooks/{}/deliveries", segment(&id)?), &[])?;
            if json {
                return print_json(&text);
            }
            let attempts: Vec<Attempt> = decode(&text)?;
            let mut table = Table::new(&["SEQ", "TYPE", "AT", "MS", "RESULT"]);
            for attempt in attempts {
                table.row(vec![
                    attempt.event_seq.to_string(),
                    attempt.event_type.clone(),
                    time(attempt.started_unix_ms / 1000),
                    attempt.duration_ms.to_string(),
                    result(&attempt),
                ]);
            }
            table.print();
        }
        HookCommand::Redeliver { id, seq } => {
            let text = client.post(
                &format!("/v1/hooks/{}/deliveries", segment(&id)?),
                &json!({ "seq": seq }),
            )?;
            if json {
                return print_json(&text);
            }
            let attempt: Attempt = decode(&text)?;
            println!("event {seq} to hook {id}: {}", result(&attempt));
            if !attempt.ok {
                anyhow::bail!("the hook did not take the event");
            }
        }
    }
    Ok(())
}

fn target(hook: &Hook) -> String {
    match (&hook.url, &hook.exec) {
        (Some(url), _) => url.clone(),
        (None, Some(exec)) => format!("exec {}", exec.join(" ")),
        (None, None) => "-".into(),
    }
}

fn filter(hook: &Hook) -> String {
    let mut parts = Vec::new();
    if let Some(volume) = &hook.volume {
        parts.push(format!("volume={volume}"));
    }
    if let Some(branch) = &hook.branch {
        parts.push(format!("branch={branch}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn state(hook: &Hook) -> String {
    match (&hook.status.last_error, hook.status.failing) {
        (Some(error), true) => format!("failing: {error}"),
        (_, false) if hook.status.consecutive_failures > 0 => {
            format!("retrying ({} failures)", hook.status.consecutive_failures)
        }
        _ => "ok".into(),
    }
}

fn result(attempt: &Attempt) -> String {
    let status = attempt.status.map(|s| format!(" {s}")).unwrap_or_default();
    match (&attempt.error, attempt.ok) {
        (_, true) => format!("ok{status}"),
        (Some(error), false) => format!("failed{status}: {error}"),
        (None, false) => format!("failed{status}"),
    }
}
