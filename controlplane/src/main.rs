//! `controlplane`: run the meshbox control plane, or mint a token for it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshbox_controlplane::auth::local::LocalTokens;
use meshbox_controlplane::run::{LogFormat, RunConfig, run};

#[derive(Parser)]
#[command(name = "controlplane", version, about = "The meshbox control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: CA and xDS on 15012, REST API on 15014.
    Run(Box<RunConfig>),
    /// Print (or write to a file) a bearer token this control plane accepts
    /// (standalone mode).
    Token(TokenArgs),
    /// Replace the token signing key with a new one (standalone mode): every
    /// token minted so far stops working once the control plane restarts.
    /// Then mint new tokens with `token`.
    RotateTokenKey(RotateArgs),
}

#[derive(clap::Args)]
struct RotateArgs {
    /// The control plane's state directory (holds the token signing key).
    #[arg(long, env = "MESHBOX_STATE_DIR")]
    state_dir: PathBuf,
}

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("subject").required(true))]
struct TokenArgs {
    /// The control plane's state directory (holds the token signing key).
    #[arg(long, env = "MESHBOX_STATE_DIR")]
    state_dir: PathBuf,
    /// A token for one workload: it may get certificates for this identity only.
    #[arg(long, group = "subject")]
    identity: Option<String>,
    /// A token for a node proxy: it may get certificates for pods on this node.
    #[arg(long, group = "subject")]
    node: Option<String>,
    /// How long the token is valid (e.g. 90m, 24h, 7d; at most 1y: a leaked
    /// token must die on its own; rotate-token-key revokes all sooner).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Write the token to this file (mode 0600, no trailing newline, the way
    /// Kubernetes projects tokens; Istio's ztunnel sends `AUTH_TOKEN`'s
    /// content verbatim) instead of printing it.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(config) => {
            init_tracing(config.log_format);
            meshbox_certs::install_crypto_provider();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(run(*config))
        }
        Command::RotateTokenKey(args) => {
            LocalTokens::rotate(&args.state_dir).context("rotating the token signing key")?;
            eprintln!(
                "new token signing key in {}: restart the control plane to revoke every \
                 token minted before, then mint new ones with `controlplane token`",
                args.state_dir.display()
            );
            Ok(())
        }
        Command::Token(args) => {
            let tokens = LocalTokens::load_or_create(&args.state_dir, &args.trust_domain)
                .context("loading the token signing key")?;
            let token = match (&args.identity, &args.node) {
                (Some(identity), _) => {
                    let id = identity
                        .parse()
                        .with_context(|| format!("--identity {identity:?}"))?;
                    tokens.mint_for_identity(&id, args.ttl)?
                }
                (None, Some(node)) => tokens.mint_for_node(node, args.ttl)?,
                (None, None) => anyhow::bail!("give --identity or --node"),
            };
            match &args.out {
                Some(path) => write_secret(path, token.as_bytes())
                    .with_context(|| format!("writing {}", path.display())),
                None => {
                    println!("{token}");
                    Ok(())
                }
            }
        }
    }
}

/// Writes `content` to `path`, readable by its owner only (also when the
/// file already existed with wider permissions).
fn write_secret(path: &std::path::Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(content)?;
    file.sync_all()
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
