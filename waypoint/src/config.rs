//! `waypoint run`'s settings: flags, with the environment names Istio's
//! proxies and meshbox's dataplane use, so one deployment template drives
//! either.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use meshbox_certs::SpiffeId;
use meshbox_dataplane::config::{ControlPlaneSettings, Endpoint};
use meshbox_dataplane::token::TokenFile;

/// The `waypoint run` flags.
#[derive(Args, Debug, Clone)]
pub struct Settings {
    #[command(flatten)]
    pub control_plane: ControlPlaneSettings,
    /// The network the waypoint is on (Istio's `NETWORK`).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// The namespace of the waypoint's Gateway (and of its pod).
    #[arg(long = "namespace", env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The waypoint's pod, for xDS node metadata and logs.
    #[arg(long, env = "POD_NAME", default_value = "waypoint")]
    pub pod_name: String,
    /// The service account whose identity the waypoint serves with; istiod
    /// (and meshbox) name it after the Gateway. Default: the Gateway's name.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// The Gateway this waypoint serves (in `--namespace`).
    #[arg(long = "gateway", env = "GATEWAY_NAME")]
    pub gateway: String,
    /// Mark set on every socket the waypoint opens; 0 turns marking off.
    #[arg(long, env = "PACKET_MARK", default_value_t = 0)]
    pub packet_mark: u32,

    /// Inbound HBONE.
    #[arg(long, default_value = "[::]:15008")]
    pub inbound_addr: SocketAddr,
    /// Admin: `/config_dump`.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus `/metrics`.
    #[arg(long, default_value = "[::]:15020")]
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready`.
    #[arg(long, default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,

    /// Largest request header block (HTTP/1.1 and HTTP/2), in bytes;
    /// larger ones are answered 431.
    #[arg(long, default_value_t = 60 * 1024)]
    pub max_header_bytes: usize,
    /// How long a client may take to send a request's headers before its
    /// connection is closed (slowloris).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Requested certificate lifetime (the CA may grant less).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// On SIGTERM: how long open requests may finish before they are cut.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// HBONE streams per pooled upstream connection before another opens.
    #[arg(long, default_value_t = 100)]
    pub pool_max_streams: usize,
    /// A pooled upstream connection with no stream for this long is closed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub pool_idle_timeout: Duration,
}

/// Settings checked as a whole.
#[derive(Debug, Clone)]
pub struct Config {
    pub xds: Endpoint,
    pub ca: Endpoint,
    pub auth_token: Option<TokenFile>,
    pub cluster_id: String,
    pub trust_domain: String,
    pub network: String,
    pub pod_name: String,
    /// `{namespace}/{name}` of the Gateway: how resources name their waypoint.
    pub gateway: String,
    pub namespace: String,
    pub identity: SpiffeId,
    pub packet_mark: Option<u32>,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub cert_ttl: Duration,
    pub drain_timeout: Duration,
    pub pool_max_streams: usize,
    pub pool_idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Endpoint(#[from] meshbox_dataplane::config::ConfigError),
    #[error("{what} {value:?} is not a valid Kubernetes name")]
    BadName { what: &'static str, value: String },
    #[error("the waypoint's identity is not a SPIFFE ID: {0}")]
    Identity(String),
    #[error("--max-header-bytes must be at least 1024")]
    HeaderLimit,
}

impl Config {
    pub fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        let cp = s.control_plane.check()?;
        let service_account = s.service_account.clone().unwrap_or(s.gateway.clone());
        for (what, value) in [
            ("namespace", &s.namespace),
            ("gateway", &s.gateway),
            ("service account", &service_account),
        ] {
            if !is_dns_label(value) {
                return Err(ConfigError::BadName {
                    what,
                    value: value.clone(),
                });
            }
        }
        let identity = SpiffeId::new(&cp.trust_domain, &s.namespace, &service_account)
            .map_err(|e| ConfigError::Identity(e.to_string()))?;
        if s.max_header_bytes < 1024 {
            return Err(ConfigError::HeaderLimit);
        }
        Ok(Self {
            xds: cp.xds,
            ca: cp.ca,
            auth_token: cp.auth_token,
            cluster_id: cp.cluster_id,
            trust_domain: cp.trust_domain,
            network: s.network.clone(),
            pod_name: s.pod_name.clone(),
            gateway: format!("{}/{}", s.namespace, s.gateway),
            namespace: s.namespace.clone(),
            identity,
            packet_mark: (s.packet_mark != 0).then_some(s.packet_mark),
            inbound_addr: s.inbound_addr,
            admin_addr: s.admin_addr,
            metrics_addr: s.metrics_addr,
            readiness_addr: s.readiness_addr,
            max_header_bytes: s.max_header_bytes,
            header_read_timeout: s.header_read_timeout,
            cert_ttl: s.cert_ttl,
            drain_timeout: s.drain_timeout,
            pool_max_streams: s.pool_max_streams,
            pool_idle_timeout: s.pool_idle_timeout,
        })
    }
}

/// RFC 1123 label: what Kubernetes allows for namespaces and most names.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["waypoint"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| ConfigError::Identity(e.to_string()))?;
        Config::from_settings(&cli.settings)
    }

    #[test]
    fn identity_is_the_gateways_service_account_by_default() {
        let c = config(&[
            "--xds-address",
            "http://127.0.0.1:15010",
            "--namespace",
            "shop",
            "--gateway",
            "waypoint",
        ])
        .expect("valid");
        assert_eq!(
            c.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/waypoint"
        );
        assert_eq!(c.gateway, "shop/waypoint");
        assert_eq!(c.ca.uri, "http://127.0.0.1:15010");
    }

    #[test]
    fn bad_names_and_tls_without_root_are_refused() {
        let err = config(&[
            "--xds-address",
            "http://127.0.0.1:15010",
            "--namespace",
            "Shop",
            "--gateway",
            "waypoint",
        ])
        .expect_err("upper case");
        assert!(err.to_string().contains("namespace"), "{err}");
        let err = config(&[
            "--xds-address",
            "https://cp:15012",
            "--namespace",
            "shop",
            "--gateway",
            "waypoint",
        ])
        .expect_err("https without root");
        assert!(err.to_string().contains("XDS_ROOT_CA"), "{err}");
    }
}
