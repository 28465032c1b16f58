//! `grove scrub [--rate SIZE_PER_SECOND] [--wait]`, `grove scrub --status [--wait]` and
//! `grove scrub --stop`: starts a scrub, which reads every live data block of the pool and
//! checks it against its checksum, online (`POST /v1/pool/scrub`), shows the running or last
//! one (`GET /v1/pool/scrub`), or stops the running one (`DELETE /v1/pool/scrub`).
//! With `--wait` it follows the scrub to its end and exits non-zero when it found bad blocks or
//! failed, so that scripts and timers can act on it.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use grove_mgmt_api::model::{ScrubReport, ScrubState};
use grove_mgmt_api::size::{format_size, ByteSize};
use serde_json::json;

use super::client::{decode, Client};
use super::output::{print_fields, print_json, time, Table};

#[derive(Debug, Args)]
pub struct ScrubArgs {
    /// Bandwidth budget per second, such as 64MiB or 1GiB (a trailing "/s" is accepted)
    /// [default: 64MiB].
    #[arg(long, value_name = "SIZE_PER_SECOND", value_parser = parse_rate, conflicts_with = "status")]
    pub rate: Option<ByteSize>,
    /// Wait until the scrub ends, print what it found, and exit non-zero if it found bad
    /// blocks or failed.
    #[arg(long)]
    pub wait: bool,
    /// Show the running or last scrub instead of starting one.
    #[arg(long, conflicts_with = "stop")]
    pub status: bool,
    /// Stop the running scrub (it ends with state "stopped").
    #[arg(long, conflicts_with_all = ["rate", "wait"])]
    pub stop: bool,
}

/// How often `--wait` asks how far the scrub got.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

fn parse_rate(text: &str) -> Result<ByteSize, String> {
    let size = text.strip_suffix("/s").unwrap_or(text);
    let rate: ByteSize = size.parse().map_err(|error| format!("{error}"))?;
    if rate.bytes() == 0 {
        return Err("the rate must be above 0 bytes per second".to_string());
    }
    Ok(rate)
}

pub fn run(client: &Client, json: bool, args: ScrubArgs) -> anyhow::Result<()> {
    let mut text = if args.status {
        status(client)?
    } else if args.stop {
        client.delete("/v1/pool/scrub").map_err(|error| {
            match error.downcast_ref::<super::client::ApiFailure>() {
                Some(failure) if failure.status == 404 => {
                    anyhow::anyhow!("no scrub has run since the server started")
                }
                _ => error,
            }
        })?;
        // The answer is the report as it was when asked; show how it ended.
        let mut text = status(client)?;
        while decode::<ScrubReport>(&text)?.state == ScrubState::Running {
            std::thread::sleep(Duration::from_millis(100));
            text = status(client)?;
        }
        text
    } else {
        let body = match args.rate {
            Some(rate) => json!({"rate": rate.bytes()}),
            None => json!({}),
        };
        client.post("/v1/pool/scrub", &body)?
    };
    let mut report: ScrubReport = decode(&text)?;
    if args.wait {
        if !json && report.state == ScrubState::Running {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "scrub running since {}, at most {}/s; waiting for it to end",
                time(report.started_unix),
                format_size(report.rate_bytes_per_second)
            )?;
            out.flush()?;
        }
        while report.state == ScrubState::Running {
            std::thread::sleep(POLL_INTERVAL);
            text = status(client)?;
            report = decode(&text)?;
        }
    }
    if json {
        print_json(&text)?;
    } else {
        print_report(&report);
        if !args.wait && report.state == ScrubState::Running {
            println!(
                "(`grove scrub --status` shows how far it got; add --wait to wait for its end)"
            );
        }
    }
    if args.wait {
        verdict(&report)?;
    }
    Ok(())
}

/// `GET /v1/pool/scrub`, with "none yet" said in the CLI's terms.
fn status(client: &Client) -> anyhow::Result<String> {
    client.get("/v1/pool/scrub", &[]).map_err(|error| {
        match error.downcast_ref::<super::client::ApiFailure>() {
            Some(failure) if failure.status == 404 => {
                anyhow::anyhow!(
                    "no scrub has run since the server started (`grove scrub` starts one)"
                )
            }
            _ => error,
        }
    })
}

fn blocks(count: u64) -> String {
    match count {
        1 => "1 block".to_string(),
        n => format!("{n} blocks"),
    }
}

fn print_report(report: &ScrubReport) {
    let state = match report.state {
        ScrubState::Running => "running",
        ScrubState::Completed => "completed",
        ScrubState::Stopped => "stopped",
        ScrubState::Failed => "failed",
    };
    let mut fields = vec![
        ("scrub", state.to_string()),
        ("started", time(report.started_unix)),
        (
            "finished",
            report.finished_unix.map(time).unwrap_or_else(|| "-".into()),
        ),
        (
            "rate",
            format!("at most {}/s", format_size(report.rate_bytes_per_second)),
        ),
        ("checked", blocks(report.checked_blocks)),
        (
            "unchecked",
            format!(
                "{} (no checksum: volumes with checksums off)",
                blocks(report.unchecked_blocks)
            ),
        ),
        ("bad", blocks(report.bad_blocks)),
    ];
    if let Some(failure) = &report.failure {
        fields.push(("failure", failure.clone()));
    }
    print_fields(&fields);
    if report.errors.is_empty() {
        return;
    }
    println!();
    let mut table = Table::new(&["EXPORT", "OFFSET", "DATA BLOCK"]);
    for error in &report.errors {
        table.row(vec![
            error.export.clone(),
            error.offset_bytes.to_string(),
            error.data_block.to_string(),
        ]);
    }
    table.print();
    if report.bad_blocks > report.errors.len() as u64 {
        println!(
            "(the first {} of {} bad blocks are listed)",
            report.errors.len(),
            report.bad_blocks
        );
    }
}

/// Fails when a finished scrub found bad blocks, failed or was stopped.
fn verdict(report: &ScrubReport) -> anyhow::Result<()> {
    if report.state == ScrubState::Stopped {
        anyhow::bail!("the scrub was stopped before it read every block");
    }
    if report.state == ScrubState::Failed {
        anyhow::bail!(
            "the scrub failed: {}",
            report.failure.as_deref().unwrap_or("no reason given")
        );
    }
    if report.bad_blocks > 0 {
        anyhow::bail!(
            "the scrub found {} not matching their checksums: their reads fail until they are \
             written again (`grove events --type data.corrupted` lists them)",
            blocks(report.bad_blocks)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_sizes_per_second() {
        assert_eq!(parse_rate("64MiB"), Ok(ByteSize(64 << 20)));
        assert_eq!(parse_rate("1GiB/s"), Ok(ByteSize(1 << 30)));
        assert_eq!(parse_rate("4096"), Ok(ByteSize(4096)));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1GiB/min").is_err());
    }
}
