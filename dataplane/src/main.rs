//! `dataplane`: the meshbox node proxy.

use clap::{Parser, Subcommand};
use meshbox_dataplane::config::{Config, Settings};
use meshbox_dataplane::process::{init_logging, raise_open_files_limit, wait_for_signal};
use tracing::info;

/// jemalloc, not the system allocator: the relay allocates a chunk per
/// read, and in `bench dataplane --ztunnel` runs (same seats, same run)
/// jemalloc cut the CPU per GB of bulk traffic by roughly 15% and held the
/// same memory per idle connection; mimalloc was as fast but doubled the
/// memory at start and added half again per connection.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "dataplane",
    version,
    about = "The meshbox node proxy (a mini ztunnel)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Settings),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(settings) => {
            let log_format = settings.log_format;
            init_logging(log_format);
            let config = Config::from_settings(settings)?;
            let drain_timeout = config.drain_timeout;
            raise_open_files_limit();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    let running = meshbox_dataplane::app::start(config).await?;
                    wait_for_signal().await?;
                    info!("shutting down");
                    running.drain(drain_timeout).await;
                    Ok(())
                })
        }
    }
}
