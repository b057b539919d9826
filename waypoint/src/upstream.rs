//! Requests leave the waypoint over HBONE, with the waypoint's identity, to
//! the endpoint routing chose: hyper's pooled client on a connector that
//! opens one HBONE CONNECT stream (on the dataplane's connection pool) per
//! upstream HTTP connection, checking that the far end presents the
//! endpoint's identity. HTTP/1.1 connections are kept alive and reused;
//! HTTP/2 ones carry many requests each.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshbox_certs::SpiffeId;
use meshbox_dataplane::identity::CertificateManager;
use meshbox_dataplane::mesh::Mesh;
use meshbox_dataplane::proxy::pool::{Pool, PoolKey, StreamGuard};
use meshbox_dataplane::proxy::socket::Sockets;
use meshbox_dataplane::proxy::tunnel::HboneStream;
use meshbox_dataplane::state::{HBONE_PORT, Protocol};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A request or response body as the waypoint passes it on.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long an upstream connection may take (TCP, TLS, CONNECT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle upstream HTTP connections are kept this long for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An upstream connection: an HBONE stream, or plain TCP to an endpoint
/// that is not in the mesh.
pub enum UpstreamIo {
    Hbone {
        io: HboneStream,
        /// Holds the stream's place on its pooled HBONE connection.
        _guard: StreamGuard,
    },
    Tcp(TcpStream),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hbone { io, .. } => Pin::new(io).poll_read(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Hbone { io, .. } => Pin::new(io).poll_write(cx, data),
            Self::Tcp(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hbone { io, .. } => Pin::new(io).poll_flush(cx),
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hbone { io, .. } => Pin::new(io).poll_shutdown(cx),
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Opens upstream connections for hyper's client. The URI's authority is
/// the endpoint's `ip:port` as routing chose it.
#[derive(Clone)]
pub struct HboneConnector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    mesh: Arc<Mesh>,
    certs: Arc<CertificateManager>,
    identity: SpiffeId,
    pool: Pool,
    sockets: Sockets,
}

impl HboneConnector {
    pub fn new(
        mesh: Arc<Mesh>,
        certs: Arc<CertificateManager>,
        identity: SpiffeId,
        pool: Pool,
        sockets: Sockets,
    ) -> Self {
        Self {
            inner: Arc::new(ConnectorInner {
                mesh,
                certs,
                identity,
                pool,
                sockets,
            }),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }
}

fn io_error(kind: io::ErrorKind, message: impl Into<String>) -> io::Error {
    io::Error::new(kind, message.into())
}

impl ConnectorInner {
    async fn connect(&self, uri: Uri) -> io::Result<UpstreamIo> {
        let addr: SocketAddr = uri
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or_else(|| io_error(io::ErrorKind::InvalidInput, format!("bad upstream {uri}")))?;
        // The endpoint's identity and protocol, as the mesh knows it now:
        // nothing is dialed that the mesh does not know (fail closed).
        let (identity, protocol) = {
            let state = self.mesh.read();
            let w = state
                .workload_by_ip(self.mesh.network(), addr.ip())
                .ok_or_else(|| {
                    io_error(
                        io::ErrorKind::NotFound,
                        format!("{} is no mesh workload", addr.ip()),
                    )
                })?;
            (w.identity.clone(), w.protocol)
        };
        match protocol {
            Protocol::Tcp => Ok(UpstreamIo::Tcp(self.sockets.connect(addr, None).await?)),
            Protocol::Hbone => {
                let cert = self
                    .certs
                    .get(&self.identity)
                    .await
                    .map_err(|e| io_error(io::ErrorKind::PermissionDenied, e.to_string()))?;
                let key = PoolKey::new(
                    self.identity.clone(),
                    vec![identity],
                    SocketAddr::new(addr.ip(), HBONE_PORT),
                );
                let tunnel = self
                    .pool
                    .connect(&key, &cert, None, addr)
                    .await
                    .map_err(|e| io_error(io::ErrorKind::ConnectionRefused, e.to_string()))?;
                Ok(UpstreamIo::Hbone {
                    io: tunnel.io,
                    _guard: tunnel.guard,
                })
            }
        }
    }
}

impl tower::Service<Uri> for HboneConnector {
    type Response = TokioIo<UpstreamIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, inner.connect(uri)).await {
                Ok(result) => result.map(TokioIo::new),
                Err(_) => Err(io_error(
                    io::ErrorKind::TimedOut,
                    "upstream connect timed out",
                )),
            }
        })
    }
}

/// The two upstream clients: requests go upstream in the protocol they
/// came in (HTTP/2 by prior knowledge to an endpoint whose client spoke it).
#[derive(Clone)]
pub struct Upstreams {
    pub http1: Client<HboneConnector, Body>,
    pub http2: Client<HboneConnector, Body>,
    /// For streams that are not HTTP.
    pub connector: HboneConnector,
}

impl Upstreams {
    pub fn new(connector: HboneConnector) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(IDLE_TIMEOUT)
            // The client's own Host (or :authority) goes upstream unchanged.
            .set_host(false);
        let http1 = builder.build(connector.clone());
        builder.http2_only(true);
        let http2 = builder.build(connector.clone());
        Self {
            http1,
            http2,
            connector,
        }
    }
}
