//! `waypoint`: the meshbox L7 waypoint proxy. Not serving yet (issue 16):
//! only the authorization engine in the library exists.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "waypoint",
    version,
    about = "The meshbox waypoint proxy (L7: HTTP authorization and routing)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (not available yet).
    Run,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        // Refuse rather than start something that looks like a waypoint and
        // passes no traffic: a Gateway pointed at it would black-hole.
        Command::Run => {
            eprintln!(
                "waypoint: not yet serving: see issue 16 (the proxy is being built; \
                 only its L7 authorization engine exists so far)"
            );
            ExitCode::FAILURE
        }
    }
}
