//! `waypoint`: the meshbox L7 waypoint proxy.

use clap::{Parser, Subcommand};
use meshbox_dataplane::config::LogFormat;
use meshbox_dataplane::process::{init_logging, raise_open_files_limit, wait_for_signal};
use meshbox_waypoint::config::{Config, Settings};
use tracing::info;

/// jemalloc, as in the dataplane: many small per-request allocations.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Run the proxy.
    Run {
        #[command(flatten)]
        settings: Settings,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Threads serving connections. One by default: in `bench waypoint`
        /// one thread cost 20% less CPU per request than two, with the
        /// same request rates, since a request no longer wakes another
        /// thread at each hop. Scale out with replicas, or raise this.
        #[arg(long, env = "WAYPOINT_WORKER_THREADS", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..))]
        worker_threads: u16,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            settings,
            log_format,
            worker_threads,
        } => {
            init_logging(log_format);
            let config = Config::from_settings(&settings)?;
            let drain_timeout = config.drain_timeout;
            raise_open_files_limit();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(usize::from(worker_threads))
                .enable_all()
                .build()?
                .block_on(async move {
                    let running = meshbox_waypoint::app::start(config).await?;
                    wait_for_signal().await?;
                    info!("shutting down");
                    running.drain(drain_timeout).await;
                    Ok(())
                })
        }
    }
}
