//! Inbound HBONE (15008): mutual TLS with the destination workload's
//! certificate, then HTTP/2 CONNECT streams, each authorized and forwarded to
//! the local application.
//!
//! There is no SNI: the certificate is chosen by the address the connection
//! arrived at (with TPROXY, the pod's own IP). A CONNECT must name a local
//! workload served under that same identity; anything else is refused and
//! logged as a possible attack, because a well-behaved peer never sends it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use meshbox_certs::SpiffeId;
use parking_lot::Mutex;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::connect_head::{ConnectHeadError, connect_target};
use super::relay::tcp_to_hbone;
use super::socket::canonical;
use super::tunnel::{self, HboneStream, ReadAhead};
use super::{ProxyContext, error_text};
use crate::authz::authorize;
use crate::identity::WorkloadCertificate;
use crate::state::ConnectionInfo;
use crate::telemetry::{Connection, ConnectionRecord, Direction, RefusalReason, Security};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// CONNECT streams per connection; matches the client pool's default.
const MAX_STREAMS: u32 = 100;

/// TLS server configs per identity, rebuilt when the certificate rotates.
#[derive(Default)]
pub(crate) struct ServerConfigs {
    by_identity: Mutex<HashMap<SpiffeId, (String, Arc<ServerConfig>)>>,
}

impl ServerConfigs {
    fn get(
        &self,
        cert: &WorkloadCertificate,
        trust_domain: &str,
    ) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut map = self.by_identity.lock();
        if let Some((serial, config)) = map.get(&cert.identity)
            && *serial == cert.serial
        {
            return Ok(config.clone());
        }
        let config = Arc::new(meshbox_certs::tls::workload_server_config(
            cert.chain.clone(),
            cert.private_key(),
            &cert.roots,
            trust_domain,
        )?);
        map.insert(cert.identity.clone(), (cert.serial.clone(), config.clone()));
        Ok(config)
    }
}

/// What is known of an accepted HBONE connection.
struct Peer {
    addr: SocketAddr,
    /// Where the connection arrived (the destination pod's IP under TPROXY).
    local: SocketAddr,
    identity: SpiffeId,
    /// The identity this connection was served with.
    served: SpiffeId,
}

pub async fn handle(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    let Ok(local) = stream.local_addr().map(canonical) else {
        return;
    };
    let served = {
        let state = ctx.mesh.read();
        ctx.served_identity(&state, local.ip())
    };
    let Some(served) = served else {
        warn!(src.addr = %peer, dst.addr = %local, "inbound HBONE connection to an address that is no local workload; closing");
        ctx.telemetry
            .refused(Direction::Inbound, RefusalReason::UnknownDestination);
        return;
    };
    let Some(cert) = ctx.certificate(&served, Direction::Inbound).await else {
        return;
    };
    let config = match ctx.server_configs.get(&cert, &ctx.trust_domain) {
        Ok(c) => c,
        Err(error) => {
            warn!(identity = %served, %error, "unusable certificate for inbound HBONE");
            return;
        }
    };
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsAcceptor::from(config).accept(ReadAhead::new(stream)),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            // Plaintext to 15008, an untrusted or expired certificate, a
            // foreign trust domain: all end here.
            warn!(src.addr = %peer, dst.addr = %local, %error, "inbound TLS handshake refused");
            ctx.telemetry
                .refused(Direction::Inbound, RefusalReason::TlsHandshake);
            return;
        }
        Err(_) => {
            debug!(src.addr = %peer, "inbound TLS handshake timed out");
            ctx.telemetry
                .refused(Direction::Inbound, RefusalReason::TlsHandshake);
            return;
        }
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(meshbox_certs::tls::spiffe_id_of);
    let Some(identity) = identity else {
        // The verifier requires one; never serve without it.
        return;
    };
    let conn = Arc::new(Peer {
        addr: peer,
        local,
        identity,
        served,
    });
    let handshake = tunnel::server()
        .max_concurrent_streams(MAX_STREAMS)
        .handshake::<_, Bytes>(tls);
    let mut connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            debug!(src.addr = %peer, %error, "inbound HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            debug!(src.addr = %peer, "inbound HTTP/2 handshake timed out");
            return;
        }
    };
    let keepalive = tunnel::keepalive(connection.ping_pong());
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    ctx.tasks.spawn(serve_connect(ctx.clone(), conn.clone(), request, respond));
                }
                Some(Err(error)) => {
                    debug!(src.addr = %peer, %error, "inbound HBONE connection ended");
                    return;
                }
                // Closed, or drained after GOAWAY.
                None => return,
            },
            () = &mut keepalive => {
                debug!(src.addr = %peer, "inbound HBONE peer stopped answering PINGs; closing");
                return;
            }
            () = ctx.shutdown.cancelled(), if !draining => {
                // GOAWAY: open streams finish, new ones go elsewhere.
                connection.graceful_shutdown();
                draining = true;
            }
        }
    }
}

fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}

/// Answers a refused CONNECT; the stream ends with the answer.
fn refuse(mut respond: SendResponse<Bytes>, code: StatusCode) {
    // Fails only if the peer already reset the stream.
    let _ = respond.send_response(status(code), true);
}

/// Serves one CONNECT stream: checks and authorizes it, connects the
/// application, then relays until both sides are done.
///
/// The task keeps its future's largest state, and the captured arguments
/// besides, for as long as the connection lives. So this is a plain function,
/// not an `async fn` (which would hold its arguments twice), and checking and
/// connecting (large, short-lived) run in a boxed future of their own that
/// takes the request and the response handle with it.
fn serve_connect(
    ctx: Arc<ProxyContext>,
    peer: Arc<Peer>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> impl Future<Output = ()> + Send {
    let accepting = Box::pin(accept_connect(ctx, peer, req, respond));
    async move {
        let Some(Accepted {
            mut app,
            mut tunnel,
            record,
        }) = accepting.await
        else {
            return;
        };
        let relayed = tcp_to_hbone(&mut app, &mut tunnel).await;
        // Bytes from the client (tunnel → app) first, as the access log has it.
        record.finish(
            relayed.backward,
            relayed.forward,
            error_text(&relayed.error).as_deref(),
        );
    }
}

/// A CONNECT stream that passed every check, with its application connection.
struct Accepted {
    app: TcpStream,
    tunnel: HboneStream,
    record: ConnectionRecord,
}

/// Everything before the relay: `None` when the stream was refused (the
/// refusal is answered, logged and counted here).
async fn accept_connect(
    ctx: Arc<ProxyContext>,
    peer: Arc<Peer>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<Accepted> {
    let head = connect_target(&req);
    if head == Err(ConnectHeadError::NotConnect) {
        warn!(src.addr = %peer.addr, src.identity = %peer.identity, method = %req.method(), "inbound HBONE request is not CONNECT; refusing");
        ctx.telemetry
            .refused(Direction::Inbound, RefusalReason::NotConnect);
        refuse(respond, StatusCode::METHOD_NOT_ALLOWED);
        return None;
    }
    let Ok(target) = head else {
        warn!(src.addr = %peer.addr, src.identity = %peer.identity, uri = %req.uri(), "inbound CONNECT without an ip:port authority; refusing");
        ctx.telemetry
            .refused(Direction::Inbound, RefusalReason::BadAuthority);
        refuse(respond, StatusCode::BAD_REQUEST);
        return None;
    };
    let (dst, decision) = {
        let state = ctx.mesh.read();
        let Some(dst) = ctx.local_workload(&state, target.ip()) else {
            warn!(src.addr = %peer.addr, src.identity = %peer.identity, authority = %target, "possible attack: CONNECT to an address that is no local workload; refusing");
            ctx.telemetry
                .refused(Direction::Inbound, RefusalReason::NotLocal);
            refuse(respond, StatusCode::FORBIDDEN);
            return None;
        };
        if dst.identity != peer.served {
            warn!(src.addr = %peer.addr, src.identity = %peer.identity, authority = %target, served = %peer.served, dst.identity = %dst.identity,
                "possible attack: CONNECT to a workload other than the one this connection was opened to; refusing");
            ctx.telemetry
                .refused(Direction::Inbound, RefusalReason::IdentityMismatch);
            refuse(respond, StatusCode::FORBIDDEN);
            return None;
        }
        if target.ip() == peer.local.ip() && ctx.own_ports.contains(&target.port()) {
            warn!(src.addr = %peer.addr, authority = %target, "CONNECT to the proxy's own port; refusing");
            ctx.telemetry
                .refused(Direction::Inbound, RefusalReason::ProxyPort);
            refuse(respond, StatusCode::BAD_REQUEST);
            return None;
        }
        let info = ConnectionInfo {
            src_ip: peer.addr.ip(),
            src_identity: Some(peer.identity.clone()),
            dst: target,
        };
        let decision = authorize(&info, &dst, &*state);
        (dst, decision)
    };
    if !decision.is_allowed() {
        info!(
            src.addr = %peer.addr,
            src.identity = %peer.identity,
            dst.addr = %target,
            dst.workload = %dst.name,
            dst.namespace = %dst.namespace,
            reason = ?decision.outcome.reason,
            "connection denied by authorization policy"
        );
        ctx.telemetry
            .refused(Direction::Inbound, RefusalReason::PolicyDenied);
        refuse(respond, StatusCode::UNAUTHORIZED);
        return None;
    }
    let app = match ctx.connect_app(target, peer.addr.ip()).await {
        Ok(app) => app,
        Err(error) => {
            info!(src.identity = %peer.identity, dst.addr = %target, %error, "the application refused the connection");
            ctx.telemetry
                .refused(Direction::Inbound, RefusalReason::AppUnreachable);
            refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
            return None;
        }
    };
    let src_workload = {
        let state = ctx.mesh.read();
        state
            .workload_by_ip(ctx.mesh.network(), peer.addr.ip())
            .cloned()
    };
    let record = ctx.telemetry.open(Connection {
        direction: Direction::Inbound,
        src_addr: peer.addr,
        src_workload,
        src_identity: Some(peer.identity.clone()),
        dst_addr: peer.local,
        hbone_addr: Some(target),
        dst_service: None,
        dst_identity: Some(dst.identity.clone()),
        dst_workload: Some(dst),
        security: Security::MutualTls,
    });
    let send = match respond.send_response(status(StatusCode::OK), false) {
        Ok(send) => send,
        Err(error) => {
            record.finish(0, 0, Some(&error.to_string()));
            return None;
        }
    };
    let tunnel = HboneStream::new(send, req.into_body());
    Some(Accepted {
        app,
        tunnel,
        record,
    })
}
