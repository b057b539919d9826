//! `dataplane`: the meshbox node proxy.

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use meshbox_dataplane::config::{Config, LogFormat, Settings};
use tracing::info;
use tracing_subscriber::EnvFilter;

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

/// Every proxied connection holds two sockets; the usual soft limit of 1024
/// would cap a node at a few hundred. Raise it to the hard limit, as
/// Istio's ztunnel does.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open files limit"),
            Err(error) => {
                tracing::warn!(%error, soft, hard, "could not raise the open files limit")
            }
        },
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "could not read the open files limit"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: access logs end up in files and pipes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
