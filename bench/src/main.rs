//! `bench`: meshbox's benchmarks, each figure next to a baseline measured in
//! the same run (these machines are shared and noisy: read the ratios).
//!
//! `cargo build --release --workspace && target/release/bench ca` measures the
//! CA; `bench model` the control plane's mesh model.

mod ca;
mod model;
mod report;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "meshbox benchmarks")]
struct Cli {
    /// Folder for the report (markdown + JSON).
    #[arg(long, default_value = "target/bench-report")]
    out: PathBuf,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// CA issuance through the full gRPC path vs raw ECDSA signing.
    Ca(ca::CaArgs),
    /// The control plane's mesh model: full build, incremental updates, memory.
    Model(model::ModelArgs),
}

fn main() -> anyhow::Result<()> {
    meshbox_certs::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let section = match cli.what {
        What::Ca(args) => runtime.block_on(ca::run(args))?,
        What::Model(args) => model::run(args),
    };
    report::write(&cli.out, &[section])
}
