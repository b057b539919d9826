//! Inbound plaintext (15006): TCP that the capture rules TPROXY'd to the
//! proxy because it arrived without HBONE. The same authorization applies,
//! with no peer identity, so a policy that requires one denies it.
//!
//! Under TPROXY the accepted socket's local address is the original
//! destination. A connection that arrives at the listener's own address was
//! not redirected (someone dialed 15006 directly) and is refused: there is
//! no application port to forward it to.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::relay::tcp_to_tcp;
use super::socket::canonical;
use super::{ProxyContext, error_text};
use crate::authz::authorize;
use crate::state::ConnectionInfo;
use crate::telemetry::{Connection, Direction, RefusalReason, Security};

pub async fn handle(
    ctx: Arc<ProxyContext>,
    mut stream: TcpStream,
    peer: SocketAddr,
    listener: Option<SocketAddr>,
) {
    let Ok(target) = stream.local_addr().map(canonical) else {
        return;
    };
    if Some(target.port()) == listener.map(|l| l.port()) || ctx.own_ports.contains(&target.port()) {
        warn!(src.addr = %peer, dst.addr = %target, "plaintext connection to the proxy's own port (not redirected by the capture rules); refusing");
        ctx.telemetry
            .refused(Direction::Inbound, RefusalReason::NotRedirected);
        return;
    }
    let (dst, decision) = {
        let state = ctx.mesh.read();
        let Some(dst) = ctx.local_workload(&state, target.ip()) else {
            warn!(src.addr = %peer, dst.addr = %target, "plaintext connection to an address that is no local workload; refusing");
            ctx.telemetry
                .refused(Direction::Inbound, RefusalReason::NotLocal);
            return;
        };
        let info = ConnectionInfo {
            src_ip: peer.ip(),
            src_identity: None,
            dst: target,
        };
        let decision = authorize(&info, &dst, &*state);
        (dst, decision)
    };
    if !decision.is_allowed() {
        info!(
            src.addr = %peer,
            dst.addr = %target,
            dst.workload = %dst.name,
            dst.namespace = %dst.namespace,
            reason = ?decision.outcome.reason,
            "plaintext connection denied by authorization policy"
        );
        ctx.telemetry
            .refused(Direction::Inbound, RefusalReason::PolicyDenied);
        return;
    }
    let mut app = match ctx.connect_app(target, peer.ip()).await {
        Ok(app) => app,
        Err(error) => {
            info!(dst.addr = %target, %error, "the application refused the connection");
            ctx.telemetry
                .refused(Direction::Inbound, RefusalReason::AppUnreachable);
            return;
        }
    };
    let src_workload = {
        let state = ctx.mesh.read();
        state.workload_by_ip(ctx.mesh.network(), peer.ip()).cloned()
    };
    let record = ctx.telemetry.open(Connection {
        direction: Direction::Inbound,
        src_addr: peer,
        src_workload,
        src_identity: None,
        dst_addr: target,
        hbone_addr: None,
        dst_service: None,
        dst_identity: Some(dst.identity.clone()),
        dst_workload: Some(dst),
        security: Security::Plaintext,
    });
    let relayed = tcp_to_tcp(&mut stream, &mut app).await;
    record.finish(
        relayed.forward,
        relayed.backward,
        error_text(&relayed.error).as_deref(),
    );
}
