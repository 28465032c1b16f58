//! `grove fsck --data-dir DIR [--repair]`: checks a stopped pool offline (it reads the files
//! itself; no server is involved) and exits 1 if it is not clean.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct FsckArgs {
    /// The pool's data directory; no running grove may have it open.
    #[arg(long, value_name = "DIR", env = "GROVE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Fix what can be fixed without guessing: cut a torn journal tail, complete commit
    /// bitmaps from what the extent maps prove changed.
    #[arg(long)]
    pub repair: bool,
}

pub fn run(json: bool, args: FsckArgs) -> anyhow::Result<()> {
    let report = grove_engine::fsck::fsck(&args.data_dir, args.repair)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !report.unopenable {
        println!(
            "pool in {}: {} volumes, {} branches, {} commits, {} metadata pages and {} data blocks referenced",
            args.data_dir.display(),
            report.volumes,
            report.branches,
            report.commits,
            report.meta_pages,
            report.data_blocks
        );
        if report.torn_journal_bytes > 0 {
            println!(
                "journal: an incomplete last record of {} bytes (an interrupted sync; cut at the next start, or with --repair)",
                report.torn_journal_bytes
            );
        }
        for fixed in &report.repaired {
            println!("repaired: {fixed}");
        }
    }
    if !json {
        match report.problems.len() {
            0 => println!("clean"),
            1 => println!("1 problem:"),
            n => println!("{n} problems:"),
        }
        for problem in &report.problems {
            println!("  {}: {}", problem.at, problem.what);
        }
    }
    if !report.clean() {
        anyhow::bail!("the pool is not clean");
    }
    Ok(())
}
