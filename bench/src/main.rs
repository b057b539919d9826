//! `bench`: meshbox's benchmarks, each figure next to a baseline measured in
//! the same run (these machines are shared and noisy: read the ratios).
//!
//! `cargo build --release --workspace && target/release/bench ca` measures the
//! CA; `bench model` the control plane's mesh model.

mod ca;
mod model;
mod proc;
mod report;
mod xds;

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
    /// The xDS server: full sync and change propagation to many clients.
    Xds(xds::XdsArgs),
    /// (internal) the client side of `xds`, run as a child process.
    #[command(hide = true)]
    XdsClients(xds::ClientArgs),
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
        What::Xds(args) => runtime.block_on(xds::run(args))?,
        What::XdsClients(args) => return runtime.block_on(xds::run_clients(args)),
    };
    report::write(&cli.out, &[section])
}
