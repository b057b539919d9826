//! Inbound HBONE on 15008: mutual TLS with the waypoint's own identity,
//! HTTP/2 CONNECT streams to a Service VIP:port or workload IP:port that
//! uses this waypoint, and inside each stream HTTP/1.1 or HTTP/2 (detected),
//! served request by request by [`crate::proxy`]; anything else is proxied
//! as TCP with L4 policy only.
//!
//! Limits on the client's HTTP: a header block over `max_header_bytes` is
//! answered 431; HTTP/1.1 headers must arrive within `header_read_timeout`;
//! HTTP/2 resets are capped (the rapid-reset pattern closes the offending
//! connection, others are unaffected).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use meshbox_certs::SpiffeId;
use meshbox_dataplane::proxy::connect_head::connect_target;
use meshbox_dataplane::proxy::socket::canonical;
use meshbox_dataplane::proxy::tunnel::{self, HboneStream, ReadAhead};
use parking_lot::Mutex;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::proxy::{self, Destination, Tunnel, Waypoint};
use crate::sniff::{Detected, Prefixed, detect};
use crate::tcp;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// CONNECT streams per client connection.
const MAX_STREAMS: u32 = 100;
/// How long a client may stay silent before its stream counts as TCP.
const DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 streams a client may reset before we answer them: hyper's cap on
/// pending resets (the rapid-reset mitigation).
const MAX_PENDING_RESETS: usize = 20;
/// Streams in one inner HTTP/2 connection.
const MAX_HTTP2_STREAMS: u32 = 100;

/// The TLS config for the waypoint's current certificate.
#[derive(Default)]
pub struct ServerTls {
    current: Mutex<Option<(String, Arc<ServerConfig>)>>,
}

impl ServerTls {
    async fn config(&self, wp: &Waypoint) -> Option<Arc<ServerConfig>> {
        let cert = match tokio::time::timeout(HANDSHAKE_TIMEOUT, wp.certs.get(&wp.identity)).await {
            Ok(Ok(cert)) => cert,
            Ok(Err(error)) => {
                warn!(identity = %wp.identity, %error, "no certificate; refusing inbound HBONE");
                return None;
            }
            Err(_) => {
                warn!(identity = %wp.identity, "timed out waiting for a certificate; refusing");
                return None;
            }
        };
        let mut current = self.current.lock();
        if let Some((serial, config)) = current.as_ref()
            && *serial == cert.serial
        {
            return Some(config.clone());
        }
        match meshbox_certs::tls::workload_server_config(
            cert.chain.clone(),
            cert.private_key(),
            &cert.roots,
            &wp.trust_domain,
        ) {
            Ok(config) => {
                let config = Arc::new(config);
                *current = Some((cert.serial.clone(), config.clone()));
                Some(config)
            }
            Err(error) => {
                warn!(%error, "unusable certificate for inbound HBONE");
                None
            }
        }
    }
}

/// Accepts HBONE connections until shutdown.
pub async fn serve(listener: TcpListener, wp: Arc<Waypoint>, tls: Arc<ServerTls>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    wp.tasks.spawn(connection(wp.clone(), tls.clone(), stream, canonical(peer)));
                }
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = wp.shutdown.cancelled() => return,
        }
    }
}

async fn connection(wp: Arc<Waypoint>, tls: Arc<ServerTls>, stream: TcpStream, peer: SocketAddr) {
    let Some(config) = tls.config(&wp).await else {
        return;
    };
    let tls_stream = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsAcceptor::from(config).accept(ReadAhead::new(stream)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            // No certificate, an untrusted one, another trust domain,
            // plaintext: all end here.
            warn!(src.addr = %peer, %error, "inbound TLS handshake refused");
            return;
        }
        Err(_) => {
            debug!(src.addr = %peer, "inbound TLS handshake timed out");
            return;
        }
    };
    let Some(identity) = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(meshbox_certs::tls::spiffe_id_of)
    else {
        return;
    };
    let handshake = tunnel::server()
        .max_concurrent_streams(MAX_STREAMS)
        .handshake::<_, Bytes>(tls_stream);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        _ => {
            debug!(src.addr = %peer, "inbound HTTP/2 handshake failed");
            return;
        }
    };
    let keepalive = tunnel::keepalive(conn.ping_pong());
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    wp.tasks.spawn(connect(wp.clone(), identity.clone(), peer, request, respond));
                }
                Some(Err(error)) => {
                    debug!(src.addr = %peer, %error, "inbound HBONE connection ended");
                    return;
                }
                None => return,
            },
            () = &mut keepalive => return,
            () = wp.shutdown.cancelled(), if !draining => {
                conn.graceful_shutdown();
                draining = true;
            }
        }
    }
}

fn refuse(mut respond: SendResponse<Bytes>, code: StatusCode) {
    let mut r = Response::new(());
    *r.status_mut() = code;
    let _ = respond.send_response(r, true);
}

/// One CONNECT stream: check what it is for, then serve what it carries.
async fn connect(
    wp: Arc<Waypoint>,
    identity: SpiffeId,
    peer: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let target = match connect_target(&request) {
        Ok(t) => t,
        Err(error) => {
            debug!(src.addr = %peer, %error, "bad CONNECT");
            refuse(respond, StatusCode::BAD_REQUEST);
            return;
        }
    };
    let Some(destination) = wp.destination(target, identity.namespace()) else {
        warn!(
            src.addr = %peer, src.identity = %identity, dst.addr = %target,
            "possible attack: CONNECT to an address that does not use this waypoint; refused"
        );
        refuse(respond, StatusCode::FORBIDDEN);
        return;
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut io = HboneStream::new(send, request.into_body());
    let (prefix, detected) = match detect(&mut io, DETECT_TIMEOUT).await {
        Ok(d) => d,
        Err(_) => return,
    };
    let source_workload = {
        let state = wp.mesh.read();
        state.workload_by_ip(wp.mesh.network(), peer.ip()).cloned()
    };
    let tunnel = Arc::new(Tunnel {
        peer_identity: identity,
        peer_addr: peer,
        source_workload,
        target,
        destination,
        metrics: Default::default(),
    });
    let io = Prefixed::new(prefix, io);
    match detected {
        Detected::Http => serve_http(wp, tunnel, io).await,
        Detected::Tcp => tcp::proxy(wp, tunnel, io).await,
    }
}

async fn serve_http(wp: Arc<Waypoint>, tunnel: Arc<Tunnel>, io: Prefixed<HboneStream>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(wp.limits.header_read_timeout)
        .max_buf_size(wp.limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(wp.limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_HTTP2_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_PENDING_RESETS);
    let service_wp = wp.clone();
    let service_tunnel = tunnel.clone();
    let service = hyper::service::service_fn(move |req| {
        let wp = service_wp.clone();
        let tunnel = service_tunnel.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy::handle(wp, tunnel, req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                debug!(src.addr = %tunnel.peer_addr, %error, "HTTP connection ended with an error");
            }
        }
        () = wp.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    if let Destination::Service { key, .. } = &tunnel.destination {
        debug!(service = %key, "HTTP tunnel closed");
    }
}
