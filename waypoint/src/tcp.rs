//! A CONNECT stream that does not carry HTTP: authorized with L4 attributes
//! only ([`crate::authz::authorize_tcp`]), then relayed to one endpoint,
//! chosen as for a request without a route.

use std::sync::Arc;

use http::HeaderMap;
use meshbox_dataplane::proxy::tunnel::HboneStream;
use meshbox_dataplane::state::direct;
use tokio::io::AsyncWriteExt;
use tower::Service;
use tracing::{info, warn};

use crate::authz::{self, Policy};
use crate::proxy::{Destination, Tunnel, Waypoint};
use crate::sniff::Prefixed;

pub async fn proxy(wp: Arc<Waypoint>, tunnel: Arc<Tunnel>, mut io: Prefixed<HboneStream>) {
    let headers = HeaderMap::new();
    let facts = authz::Request {
        source_identity: Some(&tunnel.peer_identity),
        source_ip: tunnel.peer_addr.ip(),
        destination_port: tunnel.target.port(),
        method: "",
        path: "",
        host: "",
        headers: &headers,
    };
    let l7 = wp.l7.load_full();
    let upstream = {
        let state = wp.mesh.read();
        match &tunnel.destination {
            Destination::Service { key, port, .. } => {
                state.service_endpoint(key, *port, &wp.me.load())
            }
            Destination::Workload { workload, addr } => Ok(direct(workload, *addr, None)),
        }
    };
    let upstream = match upstream {
        Ok(u) => u,
        Err(error) => {
            warn!(src.identity = %tunnel.peer_identity, %error, "TCP through the waypoint: no endpoint");
            let _ = io.shutdown().await;
            return;
        }
    };
    let (service, workload) = match &tunnel.destination {
        Destination::Service { key, .. } => (Some(key.as_str()), None),
        Destination::Workload { workload, .. } => (None, Some(workload.uid.as_str())),
    };
    let mut policies: Vec<&Policy> = l7.policies.for_target(service, workload).collect();
    if let Some(w) = &upstream.destination_workload {
        policies.extend(l7.policies.for_endpoint(&w.uid, service));
    }
    let decision = authz::authorize_tcp(&facts, &policies);
    if !decision.is_allowed() {
        info!(
            target: "access",
            protocol = "tcp",
            src.identity = %tunnel.peer_identity,
            dst.addr = %tunnel.target,
            reason = ?decision.reason,
            "TCP connection through the waypoint denied"
        );
        let _ = io.shutdown().await;
        return;
    }
    let addr = upstream.authority().unwrap_or(upstream.connect_to);
    let uri = match http::Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query("/")
        .build()
    {
        Ok(u) => u,
        Err(_) => return,
    };
    let mut connector = wp.upstreams.connector.clone();
    let mut up = match connector.call(uri).await {
        Ok(up) => up.into_inner(),
        Err(error) => {
            warn!(upstream = %addr, %error, "TCP through the waypoint: upstream unreachable");
            let _ = io.shutdown().await;
            return;
        }
    };
    let relayed = tokio::io::copy_bidirectional(&mut io, &mut up).await;
    info!(
        target: "access",
        protocol = "tcp",
        src.identity = %tunnel.peer_identity,
        dst.addr = %addr,
        bytes = ?relayed.ok(),
        "TCP connection through the waypoint"
    );
}
