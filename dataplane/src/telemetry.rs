//! What the proxy tells operators about each connection: one access-log
//! line when it ends (the fields Istio's ztunnel logs) and Istio's
//! `istio_tcp_*` metrics with Istio's labels, so existing dashboards work.
//!
//! A connection is recorded by [`Telemetry::open`], which counts it opened
//! and returns a [`ConnectionRecord`]; [`ConnectionRecord::finish`] counts it
//! closed with its bytes and writes the log line. Dropping a record without
//! finishing it still counts it closed (with an error), so the two counters
//! never drift apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use meshbox_certs::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::info;

use crate::state::{ServiceInfo, Workload};

/// Which side of the connection this proxy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From a local workload (Istio's reporter `source`).
    Outbound,
    /// To a local workload (reporter `destination`).
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

/// Whether the connection was carried over mutual TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    MutualTls,
    Plaintext,
}

/// Everything known about a connection when it is accepted and routed.
#[derive(Clone, Debug)]
pub struct Connection {
    pub direction: Direction,
    pub src_addr: SocketAddr,
    pub src_workload: Option<Arc<Workload>>,
    pub src_identity: Option<SpiffeId>,
    /// The address connected to (a peer's 15008 for HBONE).
    pub dst_addr: SocketAddr,
    /// The `:authority` of the HBONE stream, when there is one.
    pub hbone_addr: Option<SocketAddr>,
    pub dst_service: Option<ServiceInfo>,
    pub dst_workload: Option<Arc<Workload>>,
    pub dst_identity: Option<SpiffeId>,
    pub security: Security,
}

/// Istio's standard TCP metric labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    #[prometheus(flatten)]
    peers: PeerLabels,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// Istio's standard labels for the two ends of a connection or request,
/// shared by the dataplane's TCP metrics and the waypoint's HTTP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,
    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,
}

/// What Istio's labels say when a value is not known.
pub const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_owned()
    } else {
        s.to_owned()
    }
}

/// `(workload, canonical service, canonical revision, namespace, cluster)`.
fn workload_labels(w: Option<&Workload>) -> [String; 5] {
    match w {
        Some(w) => [
            or_unknown(if w.workload_name.is_empty() {
                &w.name
            } else {
                &w.workload_name
            }),
            or_unknown(&w.canonical_name),
            or_unknown(&w.canonical_revision),
            or_unknown(&w.namespace),
            or_unknown(&w.cluster_id),
        ],
        None => std::array::from_fn(|_| UNKNOWN.to_owned()),
    }
}

impl PeerLabels {
    /// The labels of a source and a destination; what is not known is
    /// `unknown`, as in Istio.
    pub fn new(
        source: Option<&Workload>,
        source_identity: Option<&SpiffeId>,
        service: Option<&ServiceInfo>,
        destination: Option<&Workload>,
        destination_identity: Option<&SpiffeId>,
    ) -> Self {
        let [src_wl, src_cs, src_cr, src_ns, src_cluster] = workload_labels(source);
        let [dst_wl, dst_cs, dst_cr, dst_ns, dst_cluster] = workload_labels(destination);
        let principal = |id: Option<&SpiffeId>| {
            id.map(|i| i.to_string())
                .unwrap_or_else(|| UNKNOWN.to_owned())
        };
        let (svc, svc_ns, svc_name) = match service {
            Some(s) => (s.hostname.clone(), s.namespace.clone(), s.name.clone()),
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        Self {
            source_app: src_cs.clone(),
            source_version: src_cr.clone(),
            source_workload: src_wl,
            source_canonical_service: src_cs,
            source_canonical_revision: src_cr,
            source_workload_namespace: src_ns,
            source_principal: principal(source_identity),
            source_cluster: src_cluster,
            destination_service: svc,
            destination_service_namespace: svc_ns,
            destination_service_name: svc_name,
            destination_app: dst_cs.clone(),
            destination_version: dst_cr.clone(),
            destination_workload: dst_wl,
            destination_canonical_service: dst_cs,
            destination_canonical_revision: dst_cr,
            destination_workload_namespace: dst_ns,
            destination_principal: principal(destination_identity),
            destination_cluster: dst_cluster,
        }
    }
}

impl TcpLabels {
    fn new(c: &Connection) -> Self {
        Self {
            reporter: c.direction.reporter(),
            peers: PeerLabels::new(
                c.src_workload.as_deref(),
                c.src_identity.as_ref(),
                c.dst_service.as_ref(),
                c.dst_workload.as_deref(),
                c.dst_identity.as_ref(),
            ),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: match c.security {
                Security::MutualTls => "mutual_tls",
                Security::Plaintext => UNKNOWN,
            },
        }
    }
}

/// Why a connection was refused before any byte reached the other side:
/// the `reason` label of `meshbox_proxy_connections_refused`. The caller
/// logs the details.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefusalReason {
    /// A connection that reached a capture listener without being redirected to it (no original destination, or addressed to the proxy itself).
    NotRedirected,
    /// Outbound from an address that is no local workload.
    UnknownSource,
    /// Outbound with no route to its destination.
    NoRoute,
    /// Outbound whose destination (or its HBONE tunnel) could not be reached.
    UpstreamUnreachable,
    /// No certificate for the local identity (the CA refused, or timed out).
    NoCertificate,
    /// Inbound HBONE to an address that is no local workload.
    UnknownDestination,
    /// Inbound HBONE whose TLS handshake failed or timed out.
    TlsHandshake,
    /// An inbound HBONE request that is not CONNECT.
    NotConnect,
    /// An inbound CONNECT without an `ip:port` authority.
    BadAuthority,
    /// Inbound (CONNECT or plaintext) to an address that is no local workload.
    NotLocal,
    /// A CONNECT to a workload other than the one the connection was opened to.
    IdentityMismatch,
    /// A CONNECT to the proxy's own port (it would loop).
    ProxyPort,
    /// Denied by authorization policy.
    PolicyDenied,
    /// The destination application refused the connection.
    AppUnreachable,
}

impl RefusalReason {
    /// The label value (what the metric has always said).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::NotRedirected => "not_redirected",
            RefusalReason::UnknownSource => "unknown_source",
            RefusalReason::NoRoute => "no_route",
            RefusalReason::UpstreamUnreachable => "upstream_unreachable",
            RefusalReason::NoCertificate => "no_certificate",
            RefusalReason::UnknownDestination => "unknown_destination",
            RefusalReason::TlsHandshake => "tls_handshake",
            RefusalReason::NotConnect => "not_connect",
            RefusalReason::BadAuthority => "bad_authority",
            RefusalReason::NotLocal => "not_local",
            RefusalReason::IdentityMismatch => "identity_mismatch",
            RefusalReason::ProxyPort => "proxy_port",
            RefusalReason::PolicyDenied => "policy_denied",
            RefusalReason::AppUnreachable => "app_unreachable",
        }
    }
}

/// The connection metrics, registered once.
#[derive(Clone)]
pub struct Telemetry {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    active: Gauge,
    refused: Family<RefusedLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    direction: &'static str,
    reason: &'static str,
}

impl Telemetry {
    pub fn register(registry: &mut Registry) -> Self {
        let t = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            active: Gauge::default(),
            refused: Family::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            t.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            t.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            t.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            t.received.clone(),
        );
        registry.register(
            "meshbox_proxy_active_connections",
            "Connections being proxied now",
            t.active.clone(),
        );
        registry.register(
            "meshbox_proxy_connections_refused",
            "Connections refused before any byte reached the other side, by reason",
            t.refused.clone(),
        );
        t
    }

    /// Counts a connection opened; finish the record when it ends.
    pub fn open(&self, connection: Connection) -> ConnectionRecord {
        let labels = TcpLabels::new(&connection);
        self.opened.get_or_create(&labels).inc();
        self.active.inc();
        // The record keeps handles on its label set's counters (each an
        // `Arc` shared with the family), not the 19 label strings: a node
        // proxy holds tens of thousands of records, mostly with the same
        // few label sets.
        ConnectionRecord {
            active: self.active.clone(),
            closed: self.closed.get_or_create(&labels).clone(),
            received: self.received.get_or_create(&labels).clone(),
            sent: self.sent.get_or_create(&labels).clone(),
            connection,
            started: Instant::now(),
            finished: false,
        }
    }

    /// Counts a connection refused (policy, routing, protocol errors). The
    /// caller logs why, with the details.
    pub fn refused(&self, direction: Direction, reason: RefusalReason) {
        self.refused
            .get_or_create(&RefusedLabels {
                direction: direction.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }
}

/// An open connection.
pub struct ConnectionRecord {
    active: Gauge,
    closed: Counter,
    received: Counter,
    sent: Counter,
    connection: Connection,
    started: Instant,
    finished: bool,
}

impl ConnectionRecord {
    /// Counts the connection closed and writes its access-log line.
    /// `request_bytes` went from the client towards the server,
    /// `response_bytes` back.
    pub fn finish(mut self, request_bytes: u64, response_bytes: u64, error: Option<&str>) {
        self.finished = true;
        self.close(request_bytes, response_bytes, error);
    }

    fn close(&self, request_bytes: u64, response_bytes: u64, error: Option<&str>) {
        self.active.dec();
        self.closed.inc();
        self.received.inc_by(request_bytes);
        self.sent.inc_by(response_bytes);
        let c = &self.connection;
        // From the reporting workload's side, as Istio logs it: an outbound
        // connection sends the request, an inbound one sends the response.
        let (bytes_sent, bytes_recv) = match c.direction {
            Direction::Outbound => (request_bytes, response_bytes),
            Direction::Inbound => (response_bytes, request_bytes),
        };
        let name = |w: &Option<Arc<Workload>>| w.as_ref().map(|w| w.name.clone());
        let namespace = |w: &Option<Arc<Workload>>| w.as_ref().map(|w| w.namespace.clone());
        let id = |i: &Option<SpiffeId>| i.as_ref().map(|i| i.to_string());
        info!(
            src.addr = %c.src_addr,
            src.workload = name(&c.src_workload),
            src.namespace = namespace(&c.src_workload),
            src.identity = id(&c.src_identity),
            dst.addr = %c.dst_addr,
            dst.hbone_addr = c.hbone_addr.map(|a| a.to_string()),
            dst.service = c.dst_service.as_ref().map(|s| s.hostname.clone()),
            dst.workload = name(&c.dst_workload),
            dst.namespace = namespace(&c.dst_workload),
            dst.identity = id(&c.dst_identity),
            direction = c.direction.as_str(),
            bytes_sent,
            bytes_recv,
            duration = format!("{}ms", self.started.elapsed().as_millis()),
            error,
            "connection complete"
        );
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        if !self.finished {
            self.close(0, 0, Some("connection abandoned"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label values are what dashboards and alerts match on: they
    /// must not change with the enum.
    #[test]
    fn refusal_reasons_keep_their_label_values() {
        let expected = [
            (RefusalReason::NotRedirected, "not_redirected"),
            (RefusalReason::UnknownSource, "unknown_source"),
            (RefusalReason::NoRoute, "no_route"),
            (RefusalReason::UpstreamUnreachable, "upstream_unreachable"),
            (RefusalReason::NoCertificate, "no_certificate"),
            (RefusalReason::UnknownDestination, "unknown_destination"),
            (RefusalReason::TlsHandshake, "tls_handshake"),
            (RefusalReason::NotConnect, "not_connect"),
            (RefusalReason::BadAuthority, "bad_authority"),
            (RefusalReason::NotLocal, "not_local"),
            (RefusalReason::IdentityMismatch, "identity_mismatch"),
            (RefusalReason::ProxyPort, "proxy_port"),
            (RefusalReason::PolicyDenied, "policy_denied"),
            (RefusalReason::AppUnreachable, "app_unreachable"),
        ];
        for (reason, label) in expected {
            assert_eq!(reason.as_str(), label);
        }
    }
}
