//! Dataplane settings: flags, each also readable from the environment name
//! Istio's ztunnel uses, so one deployment manifest can drive either proxy.
//!
//! [`Settings`] is what the command line says; [`Config::from_settings`]
//! checks it as a whole (missing or contradictory settings are startup
//! errors that say which variable to fix) and resolves the defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use meshbox_certs::SpiffeId;

use crate::token::TokenFile;

/// How the proxy finds the workloads it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    /// Node mode: every enrolled pod on `NODE_NAME`.
    Shared,
    /// One workload (`PROXY_WORKLOAD_INFO`), like a sidecar, in the network
    /// namespace the proxy starts in.
    Dedicated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the control plane is and how to talk to it: the settings the
/// dataplane and the waypoint share, under Istio's environment names.
#[derive(Args, Debug, Clone)]
pub struct ControlPlaneSettings {
    /// The control plane's xDS endpoint, e.g. `https://meshbox.meshbox-system.svc:15012`.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// The CA endpoint; defaults to the xDS address (one port serves both).
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// PEM root(s) that sign the control plane's serving certificate.
    #[arg(long, env = "XDS_ROOT_CA")]
    pub xds_root_ca: Option<PathBuf>,
    /// PEM root(s) for the CA endpoint; defaults to `XDS_ROOT_CA`.
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_ca: Option<PathBuf>,
    /// File holding the bearer token (re-read on every request, tokens rotate).
    #[arg(long, env = "AUTH_TOKEN")]
    pub auth_token: Option<PathBuf>,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
}

/// [`ControlPlaneSettings`], checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane {
    pub xds: Endpoint,
    pub ca: Endpoint,
    pub auth_token: Option<TokenFile>,
    pub cluster_id: String,
    pub trust_domain: String,
}

impl ControlPlaneSettings {
    pub fn check(&self) -> Result<ControlPlane, ConfigError> {
        let xds_uri = self
            .xds_address
            .clone()
            .filter(|a| !a.trim().is_empty())
            .ok_or(ConfigError::MissingXdsAddress)?;
        let xds = endpoint(
            "XDS_ADDRESS",
            "XDS_ROOT_CA",
            xds_uri,
            self.xds_root_ca.clone(),
        )?;
        let ca_uri = self
            .ca_address
            .clone()
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| xds.uri.clone());
        let ca_root = self.ca_root_ca.clone().or_else(|| self.xds_root_ca.clone());
        let ca = endpoint("CA_ADDRESS", "CA_ROOT_CA", ca_uri, ca_root)?;
        if meshbox_certs::spiffe::check_trust_domain(&self.trust_domain).is_err() {
            return Err(ConfigError::BadTrustDomain(self.trust_domain.clone()));
        }
        Ok(ControlPlane {
            xds,
            ca,
            auth_token: self.auth_token.clone().map(TokenFile::new),
            cluster_id: self.cluster_id.clone(),
            trust_domain: self.trust_domain.clone(),
        })
    }
}

/// The `dataplane run` flags.
#[derive(Args, Debug, Clone)]
pub struct Settings {
    #[command(flatten)]
    pub control_plane: ControlPlaneSettings,
    /// The Kubernetes node this proxy serves (node mode).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The network the local workloads are on (Istio's `NETWORK`).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    #[arg(long, env = "PROXY_MODE", value_enum, default_value = "shared")]
    pub proxy_mode: ProxyMode,
    /// `namespace/pod/serviceaccount` of the one workload (dedicated mode).
    #[arg(long, env = "PROXY_WORKLOAD_INFO")]
    pub proxy_workload_info: Option<String>,
    /// Mark set on every socket the dataplane opens (control-plane connections
    /// included) so the capture rules never redirect its own traffic.
    /// 0 turns marking off.
    #[arg(long, env = "PACKET_MARK", default_value_t = 1337)]
    pub packet_mark: u32,

    /// Connect to the application from the client's own address (needs the
    /// capture rules' connmark and route table to get replies back; Istio's
    /// `ENABLE_ORIG_SRC`). Default: on in node mode, off in dedicated mode.
    #[arg(long, env = "ENABLE_ORIG_SRC")]
    pub enable_orig_src: Option<bool>,

    /// Node mode captures each enrolled pod on this node inside its own
    /// network namespace (rules + listeners there), as Istio's ztunnel does;
    /// default `true` in node mode. Needs root (CAP_NET_ADMIN,
    /// CAP_SYS_ADMIN). `false` is for development only: the listeners below
    /// are served in the dataplane's own namespace, and a pod is told apart
    /// by its source address alone, which a pod able to add an address to
    /// its interface can claim.
    #[arg(long, env = "INPOD_ENABLED", action = clap::ArgAction::Set)]
    pub inpod: Option<bool>,
    /// In-pod mode: the Unix socket the CNI plugin (`meshbox-cni`) reaches
    /// the agent on, e.g. `/var/run/meshbox/cni.sock`; off unless given.
    #[arg(long, env = "CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// In-pod mode, when the dataplane runs in the node's own network
    /// namespace (a hostNetwork DaemonSet): rewrite the source of
    /// connections the node itself opens to captured pods (kubelet's health
    /// probes) to Istio's probe address 169.254.7.127, which the pods'
    /// rules let through uncaptured, so an ALLOW policy does not fail them.
    #[arg(long, env = "PROBE_SNAT", default_value_t = false, action = clap::ArgAction::Set)]
    pub probe_snat: bool,

    /// Captured outbound TCP.
    #[arg(long, default_value = "[::]:15001")]
    pub outbound_addr: SocketAddr,
    /// Captured inbound plaintext TCP.
    #[arg(long, default_value = "[::]:15006")]
    pub inbound_plaintext_addr: SocketAddr,
    /// Inbound HBONE.
    #[arg(long, default_value = "[::]:15008")]
    pub inbound_addr: SocketAddr,
    /// Admin: `/config_dump`, `/certs`.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus `/metrics`.
    #[arg(long, default_value = "[::]:15020")]
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready`.
    #[arg(long, default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,
    /// An optional SOCKS5 listener for outbound traffic that is not captured
    /// (local development and tests); off unless given.
    #[arg(long)]
    pub socks5_addr: Option<SocketAddr>,

    /// Requested certificate lifetime (the CA may grant less).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// On SIGTERM: how long open connections may finish before they are cut.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// HBONE streams per pooled connection before another one is opened.
    #[arg(long, default_value_t = 100)]
    pub pool_max_streams: usize,
    /// A pooled connection with no stream for this long is closed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub pool_idle_timeout: Duration,
    /// Ask the control plane about an unknown destination IP before treating
    /// it as outside the mesh.
    #[arg(long, env = "ON_DEMAND_LOOKUP", default_value_t = true, action = clap::ArgAction::Set)]
    pub on_demand_lookup: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// A control-plane endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub uri: String,
    /// `None` for plaintext `http://`.
    pub root_ca: Option<PathBuf>,
}

/// Who the proxy serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every workload on this node.
    Node { node: String, capture: Capture },
    /// One workload.
    Workload {
        namespace: String,
        name: String,
        identity: SpiffeId,
        /// Its node, if known (node metadata for xDS).
        node: Option<String>,
    },
}

/// How node mode gets its pods' traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    /// The listeners are served in the dataplane's own network namespace;
    /// whatever redirects traffic to them is not the dataplane's doing.
    None,
    /// In-pod (`INPOD_ENABLED`): rules and listeners inside each enrolled
    /// pod's network namespace.
    InPod {
        /// Where the CNI plugin reaches the agent (`CNI_SOCKET`); `None`:
        /// new pods are found by the namespace scan only.
        cni_socket: Option<PathBuf>,
        /// Rewrite the node's own connections to captured pods (kubelet's
        /// probes) to Istio's probe address (`PROBE_SNAT`).
        probe_snat: bool,
    },
}

/// Checked settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub xds: Endpoint,
    pub ca: Endpoint,
    pub auth_token: Option<TokenFile>,
    pub scope: Scope,
    pub cluster_id: String,
    pub trust_domain: String,
    pub network: String,
    /// `None`: sockets are not marked.
    pub packet_mark: Option<u32>,
    pub original_source: bool,
    pub outbound_addr: SocketAddr,
    pub inbound_plaintext_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub socks5_addr: Option<SocketAddr>,
    pub cert_ttl: Duration,
    /// On SIGTERM: how long open connections may finish (`--drain-timeout`).
    pub drain_timeout: Duration,
    pub pool_max_streams: usize,
    pub pool_idle_timeout: Duration,
    pub on_demand_lookup: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("XDS_ADDRESS (--xds-address) is required: where is the control plane?")]
    MissingXdsAddress,
    #[error("{var} must start with https:// or http://, got {value:?}")]
    BadAddress { var: &'static str, value: String },
    #[error(
        "{var} is https but {root_var} is not set: the control plane's root certificate is needed to trust it"
    )]
    MissingRoot {
        var: &'static str,
        root_var: &'static str,
    },
    #[error("{root_var} is set but {var} is plaintext http://; use https:// or drop {root_var}")]
    RootWithPlaintext {
        var: &'static str,
        root_var: &'static str,
    },
    #[error("PROXY_MODE=shared (node mode) needs NODE_NAME (--node-name)")]
    MissingNodeName,
    #[error("PROXY_MODE=dedicated needs PROXY_WORKLOAD_INFO=namespace/pod/serviceaccount")]
    MissingWorkloadInfo,
    #[error(
        "PROXY_WORKLOAD_INFO is only for PROXY_MODE=dedicated; node mode serves every pod on NODE_NAME"
    )]
    WorkloadInfoInSharedMode,
    #[error("PROXY_WORKLOAD_INFO must be namespace/pod/serviceaccount, got {0:?}")]
    BadWorkloadInfo(String),
    #[error("TRUST_DOMAIN {0:?} is not a valid trust domain")]
    BadTrustDomain(String),
    #[error(
        "INPOD_ENABLED (--inpod) is node mode's capture; PROXY_MODE=dedicated runs inside the pod already"
    )]
    InpodInDedicatedMode,
    #[error("--cni-socket (CNI_SOCKET) serves in-pod capture, which INPOD_ENABLED=false turns off")]
    CniWithoutInpod,
    #[error(
        "--probe-snat (PROBE_SNAT) rewrites probes to captured pods, which INPOD_ENABLED=false turns off"
    )]
    ProbeSnatWithoutInpod,
    #[error("--pool-max-streams must be at least 1")]
    ZeroStreams,
    #[error("{0} and {1} are the same address")]
    SameAddress(&'static str, &'static str),
}

impl Config {
    pub fn from_settings(s: Settings) -> Result<Self, ConfigError> {
        let cp = s.control_plane.check()?;
        let mut scope = match s.proxy_mode {
            ProxyMode::Shared => {
                if s.proxy_workload_info.is_some() {
                    return Err(ConfigError::WorkloadInfoInSharedMode);
                }
                let node = s
                    .node_name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .ok_or(ConfigError::MissingNodeName)?;
                Scope::Node {
                    node,
                    capture: Capture::None,
                }
            }
            ProxyMode::Dedicated => {
                let info = s
                    .proxy_workload_info
                    .as_deref()
                    .ok_or(ConfigError::MissingWorkloadInfo)?;
                let parts: Vec<&str> = info.split('/').collect();
                let [namespace, name, sa] = parts[..] else {
                    return Err(ConfigError::BadWorkloadInfo(info.to_owned()));
                };
                if [namespace, name, sa].iter().any(|p| p.is_empty()) {
                    return Err(ConfigError::BadWorkloadInfo(info.to_owned()));
                }
                let identity = SpiffeId::new(&cp.trust_domain, namespace, sa)
                    .map_err(|_| ConfigError::BadWorkloadInfo(info.to_owned()))?;
                Scope::Workload {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    identity,
                    node: s.node_name.clone().filter(|n| !n.is_empty()),
                }
            }
        };
        if s.inpod == Some(true) && s.proxy_mode == ProxyMode::Dedicated {
            return Err(ConfigError::InpodInDedicatedMode);
        }
        let inpod = s.inpod.unwrap_or(s.proxy_mode == ProxyMode::Shared);
        if s.cni_socket.is_some() && !inpod {
            return Err(ConfigError::CniWithoutInpod);
        }
        if s.probe_snat && !inpod {
            return Err(ConfigError::ProbeSnatWithoutInpod);
        }
        if let Scope::Node { capture, .. } = &mut scope
            && inpod
        {
            *capture = Capture::InPod {
                cni_socket: s.cni_socket,
                probe_snat: s.probe_snat,
            };
        }
        if s.pool_max_streams == 0 {
            return Err(ConfigError::ZeroStreams);
        }
        let listeners = [
            ("--outbound-addr", s.outbound_addr),
            ("--inbound-plaintext-addr", s.inbound_plaintext_addr),
            ("--inbound-addr", s.inbound_addr),
            ("--admin-addr", s.admin_addr),
            ("--metrics-addr", s.metrics_addr),
            ("--readiness-addr", s.readiness_addr),
        ];
        for (i, (a_name, a)) in listeners.iter().enumerate() {
            for (b_name, b) in &listeners[i + 1..] {
                if a == b && a.port() != 0 {
                    return Err(ConfigError::SameAddress(a_name, b_name));
                }
            }
        }
        Ok(Self {
            xds: cp.xds,
            ca: cp.ca,
            auth_token: cp.auth_token,
            scope,
            cluster_id: cp.cluster_id,
            trust_domain: cp.trust_domain,
            network: s.network,
            packet_mark: (s.packet_mark != 0).then_some(s.packet_mark),
            original_source: s
                .enable_orig_src
                .unwrap_or(s.proxy_mode == ProxyMode::Shared),
            outbound_addr: s.outbound_addr,
            inbound_plaintext_addr: s.inbound_plaintext_addr,
            inbound_addr: s.inbound_addr,
            admin_addr: s.admin_addr,
            metrics_addr: s.metrics_addr,
            readiness_addr: s.readiness_addr,
            socks5_addr: s.socks5_addr,
            cert_ttl: s.cert_ttl,
            drain_timeout: s.drain_timeout,
            pool_max_streams: s.pool_max_streams,
            pool_idle_timeout: s.pool_idle_timeout,
            on_demand_lookup: s.on_demand_lookup,
        })
    }

    /// The node name sent to the control plane.
    pub fn node_name(&self) -> Option<&str> {
        match &self.scope {
            Scope::Node { node, .. } => Some(node),
            Scope::Workload { node, .. } => node.as_deref(),
        }
    }
}

/// A control-plane endpoint from its address and root-certificate settings
/// (`var`/`root_var` name them in errors): `https://` needs a root, `http://`
/// refuses one. The waypoint takes its endpoints the same way.
pub fn endpoint(
    var: &'static str,
    root_var: &'static str,
    uri: String,
    root_ca: Option<PathBuf>,
) -> Result<Endpoint, ConfigError> {
    if let Some(rest) = uri.strip_prefix("https://") {
        if rest.is_empty() {
            return Err(ConfigError::BadAddress { var, value: uri });
        }
        let root_ca = root_ca.ok_or(ConfigError::MissingRoot { var, root_var })?;
        Ok(Endpoint {
            uri,
            root_ca: Some(root_ca),
        })
    } else if let Some(rest) = uri.strip_prefix("http://") {
        if rest.is_empty() {
            return Err(ConfigError::BadAddress { var, value: uri });
        }
        if root_ca.is_some() {
            return Err(ConfigError::RootWithPlaintext { var, root_var });
        }
        Ok(Endpoint { uri, root_ca: None })
    } else {
        Err(ConfigError::BadAddress { var, value: uri })
    }
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

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["dataplane"];
        argv.extend_from_slice(args);
        Config::from_settings(Cli::try_parse_from(argv).expect("flags parse").settings)
    }

    #[test]
    fn node_mode_needs_a_node_name() {
        assert_eq!(
            parse(&["--xds-address", "http://cp:15010"]).unwrap_err(),
            ConfigError::MissingNodeName
        );
        let c = parse(&["--xds-address", "http://cp:15010", "--node-name", "n1"]).unwrap();
        assert_eq!(
            c.scope,
            Scope::Node {
                node: "n1".into(),
                capture: Capture::InPod {
                    cni_socket: None,
                    probe_snat: false
                }
            },
            "node mode captures in-pod unless told not to, as Istio's ztunnel does"
        );
        assert_eq!(
            c.ca.uri, "http://cp:15010",
            "CA defaults to the xDS address"
        );
        assert_eq!(c.packet_mark, Some(1337));
    }

    #[test]
    fn tls_needs_a_root_and_plaintext_refuses_one() {
        assert_eq!(
            parse(&["--xds-address", "https://cp:15012", "--node-name", "n"]).unwrap_err(),
            ConfigError::MissingRoot {
                var: "XDS_ADDRESS",
                root_var: "XDS_ROOT_CA"
            }
        );
        assert_eq!(
            parse(&[
                "--xds-address",
                "http://cp:15010",
                "--xds-root-ca",
                "/r.pem",
                "--node-name",
                "n"
            ])
            .unwrap_err(),
            ConfigError::RootWithPlaintext {
                var: "XDS_ADDRESS",
                root_var: "XDS_ROOT_CA"
            }
        );
        let c = parse(&[
            "--xds-address",
            "https://cp:15012",
            "--xds-root-ca",
            "/r.pem",
            "--node-name",
            "n",
        ])
        .unwrap();
        assert_eq!(
            c.ca.root_ca.as_deref(),
            Some(std::path::Path::new("/r.pem"))
        );
        assert!(matches!(
            parse(&["--xds-address", "cp:15012", "--node-name", "n"]).unwrap_err(),
            ConfigError::BadAddress { .. }
        ));
    }

    #[test]
    fn dedicated_mode_takes_its_identity_from_workload_info() {
        let base = [
            "--xds-address",
            "http://cp:15010",
            "--proxy-mode",
            "dedicated",
        ];
        assert_eq!(parse(&base).unwrap_err(), ConfigError::MissingWorkloadInfo);
        for bad in [
            "default/web",
            "default//web",
            "a/b/c/d",
            "default/web/BAD SA",
        ] {
            let mut args = base.to_vec();
            args.extend(["--proxy-workload-info", bad]);
            assert!(
                matches!(parse(&args).unwrap_err(), ConfigError::BadWorkloadInfo(_)),
                "{bad}"
            );
        }
        let mut args = base.to_vec();
        args.extend(["--proxy-workload-info", "default/web-0/web"]);
        let c = parse(&args).unwrap();
        let Scope::Workload { identity, name, .. } = c.scope else {
            panic!("dedicated mode must serve one workload")
        };
        assert_eq!(
            identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(name, "web-0");
    }

    #[test]
    fn in_pod_capture_is_part_of_the_node_scope() {
        let base = ["--xds-address", "http://cp:15010", "--node-name", "n"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            parse(&args)
        };
        assert_eq!(
            with(&[
                "--inpod",
                "true",
                "--cni-socket",
                "/run/cni.sock",
                "--probe-snat",
                "true"
            ])
            .unwrap()
            .scope,
            Scope::Node {
                node: "n".into(),
                capture: Capture::InPod {
                    cni_socket: Some("/run/cni.sock".into()),
                    probe_snat: true
                }
            }
        );
        assert_eq!(
            with(&["--inpod", "false"]).unwrap().scope,
            Scope::Node {
                node: "n".into(),
                capture: Capture::None
            }
        );
        assert_eq!(
            with(&["--inpod", "false", "--cni-socket", "/run/cni.sock"]).unwrap_err(),
            ConfigError::CniWithoutInpod
        );
        assert_eq!(
            with(&["--inpod", "false", "--probe-snat", "true"]).unwrap_err(),
            ConfigError::ProbeSnatWithoutInpod
        );
        assert_eq!(
            parse(&[
                "--xds-address",
                "http://cp:15010",
                "--proxy-mode",
                "dedicated",
                "--proxy-workload-info",
                "a/b/c",
                "--inpod",
                "true"
            ])
            .unwrap_err(),
            ConfigError::InpodInDedicatedMode
        );
    }

    #[test]
    fn contradictions_are_errors() {
        assert_eq!(
            parse(&[
                "--xds-address",
                "http://cp:15010",
                "--node-name",
                "n",
                "--proxy-workload-info",
                "a/b/c"
            ])
            .unwrap_err(),
            ConfigError::WorkloadInfoInSharedMode
        );
        assert_eq!(
            parse(&[
                "--xds-address",
                "http://cp:15010",
                "--node-name",
                "n",
                "--inbound-addr",
                "[::]:15001"
            ])
            .unwrap_err(),
            ConfigError::SameAddress("--outbound-addr", "--inbound-addr")
        );
        assert_eq!(
            parse(&["--node-name", "n"]).unwrap_err(),
            ConfigError::MissingXdsAddress
        );
    }
}
