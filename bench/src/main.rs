//! `bench`: meshbox's benchmarks, each figure next to a baseline measured in
//! the same run (these machines are shared and noisy: read the ratios).
//!
//! `cargo build --release --workspace && target/release/bench ca` measures the
//! CA; `bench model` the control plane's mesh model.

mod ca;
mod dataplane;
mod model;
mod netns;
mod proc;
mod report;
mod xds;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "meshbox benchmarks")]
struct Cli {
    /// Folder for the report (markdown + JSON).
    #[arg(long, global = true, default_value = "target/bench-report")]
    out: PathBuf,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// CA issuance through the full gRPC path vs raw ECDSA signing.
    Ca(ca::CaArgs),
    /// Two dataplanes carrying captured pod traffic vs the same traffic
    /// without the mesh (root; network namespaces, iperf3, wrk, nginx).
    Dataplane(dataplane::DataplaneArgs),
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
        What::Dataplane(args) => runtime.block_on(dataplane::run(args, &cli.out))?,
        What::Model(args) => model::run(args),
        What::Xds(args) => runtime.block_on(xds::run(args))?,
        What::XdsClients(args) => return runtime.block_on(xds::run_clients(args)),
    };
    report::write(&cli.out, &[section])
}
