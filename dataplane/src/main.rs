//! `dataplane`: the meshbox node proxy.
//!
//! Only the certificate manager exists so far (see the crate docs); the proxy
//! itself is being built, so `run` says so instead of pretending.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dataplane",
    version,
    about = "The meshbox node proxy (in progress)"
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run => anyhow::bail!(
            "the dataplane proxy is not built yet; this release ships the control plane \
             (see README.md)"
        ),
    }
}
