//! The command line: `grove serve` and the client commands, which talk to a running daemon's
//! HTTP API and print tables (or the API's JSON with `--json`).

mod blame;
mod branch;
mod client;
mod commit;
mod diff;
mod events;
mod fsck;
mod hook;
mod lineage;
mod log;
mod merge;
mod output;
mod pool;
mod refs;
mod reset;
mod scrub;
mod sessions;
mod status;
mod tag;
mod volume;

use clap::{Args, Parser, Subcommand};

use crate::config::ServeArgs;
use client::Client;

/// Default address of the API, matching `grove serve`'s default `api-listen`.
pub const API_URL_DEFAULT: &str = "http://127.0.0.1:8470";

#[derive(Debug, Parser)]
#[command(
    name = "grove",
    version,
    about = "Block-device versioning appliance: volumes with branches, commits and tags, served over NBD and iSCSI",
    after_help = "Refs: VOL means VOL@main; VOL@BRANCH, VOL@TAG, VOL@COMMIT (full id or unique prefix)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// URL of the grove API that client commands talk to.
    #[arg(long, global = true, value_name = "URL", env = "GROVE_API", default_value = API_URL_DEFAULT)]
    pub api: String,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the pool, the NBD server, the iSCSI target and the HTTP API.
    Serve(ServeArgs),
    /// Create, clone, list, show and delete volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Show the pool's capacity, used and free bytes; `pool reclaim` frees unreferenced space.
    Pool(pool::PoolArgs),
    /// Check every data block of the pool against its checksum, online; --wait for the result
    /// (exit 1 if a block is bad), --status for the running or last scrub.
    Scrub(scrub::ScrubArgs),
    /// Create, list and delete branches.
    #[command(subcommand)]
    Branch(branch::BranchCommand),
    /// Commit the head of a branch and print the new commit id; `commit delete VOL ID`
    /// squashes a commit into its children.
    Commit(commit::CommitArgs),
    /// Create, list and delete tags.
    #[command(subcommand)]
    Tag(tag::TagCommand),
    /// Show the history of a ref, newest first.
    Log(log::LogArgs),
    /// Show the byte ranges that differ between two refs, with counts.
    Diff(diff::DiffArgs),
    /// Merge a ref into a branch (three-way, against their common ancestor).
    Merge(merge::MergeArgs),
    /// Move a branch head back (or forward) to a commit: a rollback.
    Reset(reset::ResetArgs),
    /// Show which commit last wrote each part of a byte range of a ref.
    Blame(blame::BlameArgs),
    /// List live NBD and iSCSI sessions with their I/O counters.
    Sessions,
    /// One screen on the server: version, pool use, volumes, sessions, hooks.
    Status,
    /// Print the event log; `--follow` keeps printing new events.
    Events(events::EventsArgs),
    /// Show where a commit's data came from (--upstream) or what was derived from it
    /// (--downstream), across volumes.
    Lineage(lineage::LineageArgs),
    /// Check a stopped pool offline (exit 1 if not clean); --repair fixes what can be fixed
    /// without guessing.
    Fsck(fsck::FsckArgs),
    /// Print the manual page (roff) of grove and its commands.
    #[command(hide = true)]
    Man,
    /// Add, list, show and delete hooks; see and redo their deliveries.
    #[command(subcommand)]
    Hook(hook::HookCommand),
}

/// Writes the manual: the top page, then one section per command, from the same definitions
/// as `--help`.
fn man() -> anyhow::Result<()> {
    use clap::CommandFactory;
    let command = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_mangen::Man::new(command.clone()).render(&mut out)?;
    for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("grove-{}", sub.get_name());
        let sub = sub.clone().display_name(name);
        clap_mangen::Man::new(sub).render(&mut out)?;
    }
    Ok(())
}

/// Runs a command: `serve` runs the daemon, every other command is a client of its API.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli { global, command } = cli;
    let client = || Client::new(&global.api);
    let json = global.json;
    match command {
        Command::Serve(args) => crate::serve::main(args),
        Command::Volume(command) => volume::run(&client()?, json, command),
        Command::Pool(args) => pool::run(&client()?, json, args),
        Command::Scrub(args) => scrub::run(&client()?, json, args),
        Command::Branch(command) => branch::run(&client()?, json, command),
        Command::Commit(args) => commit::run(&client()?, json, args),
        Command::Tag(command) => tag::run(&client()?, json, command),
        Command::Log(args) => log::run(&client()?, json, args),
        Command::Diff(args) => diff::run(&client()?, json, args),
        Command::Merge(args) => merge::run(&client()?, json, args),
        Command::Reset(args) => reset::run(&client()?, json, args),
        Command::Blame(args) => blame::run(&client()?, json, args),
        Command::Sessions => sessions::run(&client()?, json),
        Command::Status => status::run(&client()?, json),
        Command::Events(args) => events::run(&client()?, json, args),
        Command::Hook(command) => hook::run(&client()?, json, command),
        Command::Lineage(args) => lineage::run(&client()?, json, args),
        Command::Man => man(),
        Command::Fsck(args) => fsck::run(json, args),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from(["grove", "volume", "list", "--json", "--api", "http://h:1"])
            .expect("parses");
        assert!(cli.global.json);
        assert_eq!(cli.global.api, "http://h:1");
        let cli = Cli::try_parse_from(["grove", "--json", "pool"]).expect("parses");
        assert!(cli.global.json);
    }

    #[test]
    fn serve_flags_parse() {
        let cli = Cli::try_parse_from([
            "grove",
            "serve",
            "--data-dir",
            "/d",
            "--nbd-listen",
            "127.0.0.1:0",
            "--nbd-socket",
            "/run/nbd.sock",
            "--iscsi-listen",
            "0.0.0.0:3260",
            "--api-listen",
            "[::1]:8470",
            "--io-backend",
            "io-uring",
            "--cache-size",
            "64MiB",
        ])
        .expect("parses");
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.data_dir.as_deref(), Some(std::path::Path::new("/d")));
        assert_eq!(args.io_backend, Some(crate::config::IoBackend::IoUring));
        assert_eq!(
            args.cache_size,
            Some(grove_mgmt_api::size::ByteSize(64 << 20))
        );
        assert!(Cli::try_parse_from(["grove", "serve", "--io-backend", "uring"]).is_err());
        assert!(Cli::try_parse_from(["grove", "serve", "--cache-size", "big"]).is_err());
        assert!(Cli::try_parse_from(["grove", "serve", "--api-listen", "localhost"]).is_err());
    }

    #[test]
    fn contract_commands_parse() {
        for line in [
            "grove volume create vm --size 10GiB",
            "grove volume list",
            "grove volume show vm",
            "grove volume delete vm",
            "grove pool",
            "grove branch create vm dev --from vm@v1",
            "grove branch list vm",
            "grove branch delete vm dev",
            "grove commit vm@dev -m msg --author ana --meta a=1 --meta b=2",
            "grove tag create vm v1 vm@main",
            "grove tag list vm",
            "grove tag delete vm v1",
            "grove log vm@dev --limit 5",
            "grove sessions",
            "grove volume clone vm@v1 vm-2",
            "grove diff vm@v1 vm@dev --json",
            "grove diff vm vm-2@main",
            "grove merge vm --from vm@dev --into main",
            "grove merge vm --from dev --into main --strategy theirs --dry-run -m msg --author ana",
            "grove reset vm@dev vm@v1",
            "grove reset vm@dev v1 --discard-uncommitted",
            "grove blame vm@v1 --offset 0 --length 4096 --json",
            "grove blame vm --offset 1MiB --length 64KiB",
            "grove commit delete vm 3f2a9c",
            "grove pool reclaim",
            "grove volume create vm --size 10GiB --no-checksums",
            "grove scrub",
            "grove scrub --rate 64MiB --wait",
            "grove scrub --rate 1GiB/s",
            "grove scrub --status",
            "grove scrub --status --wait --json",
        ] {
            let words: Vec<&str> = line.split(' ').collect();
            Cli::try_parse_from(&words).unwrap_or_else(|error| panic!("{line}: {error}"));
        }
        assert!(
            Cli::try_parse_from(["grove", "volume", "create", "vm"]).is_err(),
            "--size is required"
        );
        assert!(
            Cli::try_parse_from(["grove", "commit", "vm"]).is_err(),
            "-m is required"
        );
        assert!(Cli::try_parse_from(["grove", "commit", "-m", "x"]).is_err());
        assert!(Cli::try_parse_from(["grove", "commit", "delete", "vm"]).is_err());
        assert!(Cli::try_parse_from(["grove", "commit", "delete", "vm", "ab", "-m", "x"]).is_err());
        assert!(
            Cli::try_parse_from(["grove", "merge", "vm", "--from", "dev"]).is_err(),
            "--into is required"
        );
        assert!(Cli::try_parse_from([
            "grove",
            "merge",
            "vm",
            "--from",
            "a",
            "--into",
            "b",
            "--strategy",
            "mine"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["grove", "blame", "vm", "--offset", "0"]).is_err(),
            "--length is required"
        );
        assert!(
            Cli::try_parse_from(["grove", "blame", "vm", "--offset", "x", "--length", "1"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["grove", "diff", "vm"]).is_err());
        assert!(Cli::try_parse_from(["grove", "reset", "vm@dev"]).is_err());
        assert!(Cli::try_parse_from(["grove", "pool", "scrub"]).is_err());
        assert!(Cli::try_parse_from(["grove", "scrub", "--rate", "0"]).is_err());
        assert!(Cli::try_parse_from(["grove", "scrub", "--rate", "fast"]).is_err());
        assert!(
            Cli::try_parse_from(["grove", "scrub", "--status", "--rate", "1GiB"]).is_err(),
            "--status starts nothing"
        );
    }

    #[test]
    fn commit_makes_or_deletes() {
        let cli = Cli::try_parse_from(["grove", "commit", "vm@dev", "-m", "msg"]).expect("parses");
        let Command::Commit(args) = cli.command else {
            panic!("not commit")
        };
        assert!(args.command.is_none());
        assert_eq!(args.target.as_deref(), Some("vm@dev"));
        assert_eq!(args.message.as_deref(), Some("msg"));
        let cli = Cli::try_parse_from(["grove", "commit", "delete", "vm", "3f2a"]).expect("parses");
        let Command::Commit(args) = cli.command else {
            panic!("not commit")
        };
        assert!(matches!(
            args.command,
            Some(commit::CommitCommand::Delete { ref volume, ref id }) if volume == "vm" && id == "3f2a"
        ));
        // A volume named like the subcommand is reached through VOL@main.
        let cli =
            Cli::try_parse_from(["grove", "commit", "delete@main", "-m", "m"]).expect("parses");
        let Command::Commit(args) = cli.command else {
            panic!("not commit")
        };
        assert_eq!(args.target.as_deref(), Some("delete@main"));
    }
}
