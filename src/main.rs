//! `grove`: the daemon (`grove serve`) and the command-line client of its HTTP API.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cli;
mod config;
mod serve;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
