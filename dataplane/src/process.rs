//! What a meshbox proxy process does at its edges, shared by the dataplane
//! and the waypoint binaries: logging set-up, the open-files limit, and
//! waiting for the signal to drain.

use std::io::IsTerminal;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Every proxied connection holds two sockets; the usual soft limit of 1024
/// would cap a node at a few hundred. Raise it to the hard limit, as
/// Istio's ztunnel does.
pub fn raise_open_files_limit() {
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

pub fn init_logging(format: LogFormat) {
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

pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// Stops accepting (`shutdown`), lets the open connections (`tasks`) finish
/// for up to `timeout`, then returns: dropping the runtime cuts whatever is
/// left.
pub async fn drain(shutdown: &CancellationToken, tasks: &TaskTracker, timeout: Duration) {
    shutdown.cancel();
    tasks.close();
    info!(open_tasks = tasks.len(), ?timeout, "draining");
    if tokio::time::timeout(timeout, tasks.wait()).await.is_err() {
        warn!(
            still_open = tasks.len(),
            "drain deadline reached; closing the remaining connections"
        );
    } else {
        info!("drained");
    }
}
