//! Outbound (15001): a local workload's connection, captured, is routed by
//! the mesh state — HBONE to the destination (or its waypoint) with the
//! source workload's certificate, plain TCP to a workload outside HBONE, or
//! out of the mesh untouched — and relayed.
//!
//! [`establish`] is shared with the SOCKS5 listener, which differs only in
//! how it learns the destination.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::pool::{PoolKey, StreamGuard};
use super::relay::{Relayed, tcp_to_hbone, tcp_to_tcp};
use super::tunnel::HboneStream;
use super::{ProxyContext, error_text, socket};
use crate::state::{Route, ServiceInfo, Transport, Workload};
use crate::telemetry::{Connection, ConnectionRecord, Direction, RefusalReason, Security};

/// Why an outbound connection was not established. The reason is logged
/// where it happens; callers only close (or answer SOCKS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Routing or policy: the mesh says no.
    NotAllowed,
    /// The far end could not be reached.
    Unreachable,
}

/// Where an established connection's bytes go.
pub enum Upstream {
    /// A CONNECT stream, holding its place on the pooled connection.
    Hbone(HboneStream, StreamGuard),
    /// Plain TCP: a workload outside HBONE, or out of the mesh.
    Tcp(TcpStream),
}

/// An upstream ready for bytes.
pub struct Established {
    pub upstream: Upstream,
    pub record: ConnectionRecord,
}

impl Established {
    /// Relays `downstream` (the local workload's connection) to the
    /// upstream until both are done, then logs and counts the connection.
    ///
    /// Not an `async fn`: rustc keeps an async fn's arguments twice in its
    /// state (as captured, and as moved into the body), and this future
    /// lives as long as the connection. The block captures `self` once.
    #[allow(clippy::manual_async_fn)]
    pub fn relay(mut self, downstream: &mut TcpStream) -> impl Future<Output = ()> + Send + '_ {
        async move {
            let Relayed {
                forward,
                backward,
                error,
            } = match &mut self.upstream {
                Upstream::Hbone(stream, _guard) => tcp_to_hbone(downstream, stream).await,
                Upstream::Tcp(stream) => tcp_to_tcp(downstream, stream).await,
            };
            self.record
                .finish(forward, backward, error_text(&error).as_deref());
        }
    }
}

/// Serves one captured outbound connection, from its original destination
/// to the end of the relay. A plain function returning a block, not an
/// `async fn`, so the connection task holds its arguments once (see
/// [`Established::relay`]).
#[allow(clippy::manual_async_fn)]
pub fn handle_captured(
    ctx: Arc<ProxyContext>,
    mut stream: TcpStream,
    peer: SocketAddr,
    listener: Option<SocketAddr>,
) -> impl Future<Output = ()> + Send {
    async move {
        let target = match socket::original_dst(&stream) {
            Ok(target) => target,
            Err(error) => {
                warn!(src.addr = %peer, %error, "outbound connection without an original destination (not redirected by the capture rules); refusing");
                ctx.telemetry
                    .refused(Direction::Outbound, RefusalReason::NotRedirected);
                return;
            }
        };
        let local = stream.local_addr().ok().map(socket::canonical);
        if Some(target) == local || Some(target) == listener {
            warn!(src.addr = %peer, "outbound connection addressed to the proxy itself (not redirected); refusing");
            ctx.telemetry
                .refused(Direction::Outbound, RefusalReason::NotRedirected);
            return;
        }
        // Boxed: the routing and dialing states are large and short-lived, and
        // a task keeps its largest state's memory for as long as it lives.
        let Ok(upstream) = Box::pin(establish(&ctx, peer, target)).await else {
            return;
        };
        upstream.relay(&mut stream).await;
    }
}

/// Routes and connects a connection from `peer` (a local workload) to
/// `target`.
pub async fn establish(
    ctx: &ProxyContext,
    peer: SocketAddr,
    target: SocketAddr,
) -> Result<Established, Refusal> {
    // The source first: a connection that is no local workload's is refused
    // at once, before any work (an on-demand lookup) on its behalf.
    let source = ctx.outbound_source(&ctx.mesh.read(), peer.ip());
    let Some(source) = source else {
        warn!(src.addr = %peer, dst.addr = %target, pod = ctx.pod_uid.as_deref(),
            "outbound connection from an address that is no local workload (under in-pod capture: not the capturing pod's own); refusing");
        ctx.telemetry
            .refused(Direction::Outbound, RefusalReason::UnknownSource);
        return Err(Refusal::NotAllowed);
    };
    ctx.mesh.lookup(target.ip()).await;
    let route = ctx.mesh.read().route(&source, target);
    let route = match route {
        Ok(route) => route,
        Err(error) => {
            info!(src.workload = %source.name, src.namespace = %source.namespace, dst.addr = %target, %error, "no route; refusing");
            ctx.telemetry
                .refused(Direction::Outbound, RefusalReason::NoRoute);
            return Err(Refusal::NotAllowed);
        }
    };
    let unreachable = |what: &str, error: &dyn std::fmt::Display| {
        info!(src.workload = %source.name, dst.addr = %target, %error, "{what}");
        ctx.telemetry
            .refused(Direction::Outbound, RefusalReason::UpstreamUnreachable);
        Refusal::Unreachable
    };
    match route {
        Route::Passthrough(addr) => {
            debug!(src.workload = %source.name, dst.addr = %addr, "passthrough: not a mesh destination");
            plain_tcp(ctx, peer, &source, addr, None, None)
                .await
                .map_err(|e| unreachable("passthrough connect failed", &e))
        }
        Route::Upstream(up) => match &up.transport {
            Transport::Tcp => plain_tcp(
                ctx,
                peer,
                &source,
                up.connect_to,
                up.destination_service.clone(),
                Some(up.peer.clone()),
            )
            .await
            .map_err(|e| unreachable("connect failed", &e)),
            Transport::Hbone {
                authority,
                expected_identities,
            } => {
                let cert = ctx
                    .certificate(&source.identity, Direction::Outbound)
                    .await
                    .ok_or(Refusal::Unreachable)?;
                let key = PoolKey::new(
                    source.identity.clone(),
                    expected_identities.clone(),
                    up.connect_to,
                );
                let source_ip = source
                    .addresses
                    .iter()
                    .copied()
                    .find(|ip| ip.is_ipv4() == up.connect_to.ip().is_ipv4());
                let tunnel = ctx
                    .pool
                    .connect(&key, &cert, source_ip, *authority)
                    .await
                    .map_err(|e| unreachable("HBONE connect failed", &e))?;
                debug!(
                    src.workload = %source.name,
                    dst.hbone_addr = %authority,
                    via = %up.connect_to,
                    waypoint = up.via_waypoint,
                    new_connection = tunnel.new_connection,
                    "proxying over HBONE"
                );
                let record = ctx.telemetry.open(Connection {
                    direction: Direction::Outbound,
                    src_addr: peer,
                    src_workload: Some(source.clone()),
                    src_identity: Some(source.identity.clone()),
                    dst_addr: up.connect_to,
                    hbone_addr: Some(*authority),
                    dst_service: up.destination_service.clone(),
                    dst_identity: Some(up.peer.identity.clone()),
                    dst_workload: Some(up.peer.clone()),
                    security: Security::MutualTls,
                });
                Ok(Established {
                    upstream: Upstream::Hbone(tunnel.io, tunnel.guard),
                    record,
                })
            }
        },
    }
}

/// Plain TCP out of `source`'s pod: to a workload outside HBONE, or out of
/// the mesh.
async fn plain_tcp(
    ctx: &ProxyContext,
    peer: SocketAddr,
    source: &Arc<Workload>,
    addr: SocketAddr,
    dst_service: Option<ServiceInfo>,
    dst_workload: Option<Arc<Workload>>,
) -> std::io::Result<Established> {
    let io = ctx.connect(addr, None).await?;
    let record = ctx.telemetry.open(Connection {
        direction: Direction::Outbound,
        src_addr: peer,
        src_workload: Some(source.clone()),
        src_identity: None,
        dst_addr: addr,
        hbone_addr: None,
        dst_service,
        dst_workload,
        dst_identity: None,
        security: Security::Plaintext,
    });
    Ok(Established {
        upstream: Upstream::Tcp(io),
        record,
    })
}
