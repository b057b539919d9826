//! Requests leave the waypoint over HBONE, with the waypoint's identity, to
//! the endpoint routing chose: hyper's pooled client on a connector that
//! opens one HBONE CONNECT stream (on the dataplane's connection pool) per
//! upstream HTTP connection, checking that the far end presents the
//! endpoint's identity. HTTP/1.1 connections are kept alive and reused;
//! HTTP/2 ones carry many requests each.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshbox_certs::SpiffeId;
use meshbox_dataplane::identity::CertificateManager;
use meshbox_dataplane::mesh::Mesh;
use meshbox_dataplane::proxy::pool::{Pool, PoolKey, StreamGuard};
use meshbox_dataplane::proxy::socket::Sockets;
use meshbox_dataplane::proxy::tunnel::HboneStream;
use meshbox_dataplane::state::{HBONE_PORT, Protocol};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower::Service;

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

/// The upstream clients: requests go upstream in the protocol they came in
/// (HTTP/2 by prior knowledge to an endpoint whose client spoke it).
#[derive(Clone)]
pub struct Upstreams {
    /// HTTP/1.1: hyper's pool, keyed by the URI's authority, which is the
    /// endpoint's address; the client's own `Host` header goes unchanged.
    pub http1: Client<HboneConnector, Body>,
    pub http2: Http2Pool,
    /// For streams that are not HTTP.
    pub connector: HboneConnector,
}

impl Upstreams {
    pub fn new(connector: HboneConnector) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(IDLE_TIMEOUT).set_host(false);
        Self {
            http1: builder.build(connector.clone()),
            http2: Http2Pool::new(connector.clone()),
            connector,
        }
    }
}

/// HTTP/2 upstream connections, one per endpoint, each carrying many
/// requests. Its own rather than hyper's pooled client, whose pool is keyed
/// by the URI's authority: an HTTP/2 request's `:authority` must be the
/// client's (RFC 9113 §8.3.1; a `Host` next to it is refused by servers
/// such as nginx), while the connection is the endpoint's.
#[derive(Clone)]
pub struct Http2Pool {
    connector: HboneConnector,
    conns: Arc<parking_lot::Mutex<HashMap<SocketAddr, Http2Conn>>>,
}

struct Http2Conn {
    sender: hyper::client::conn::http2::SendRequest<Body>,
    last_used: Instant,
}

/// Why an upstream request failed before a response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("HTTP/2 with {0}: {1}")]
    Http(SocketAddr, hyper::Error),
}

impl Http2Pool {
    fn new(connector: HboneConnector) -> Self {
        Self {
            connector,
            conns: Arc::default(),
        }
    }

    /// Sends `request` (its URI carries the client's authority) to
    /// `endpoint`, on the endpoint's connection, dialing one if there is
    /// none or it has closed.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        request: Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        let mut sender = self.sender(endpoint).await?;
        sender
            .ready()
            .await
            .map_err(|e| UpstreamError::Http(endpoint, e))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::Http(endpoint, e))
    }

    async fn sender(
        &self,
        endpoint: SocketAddr,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, UpstreamError> {
        {
            let mut conns = self.conns.lock();
            if let Some(conn) = conns.get_mut(&endpoint)
                && !conn.sender.is_closed()
            {
                conn.last_used = Instant::now();
                return Ok(conn.sender.clone());
            }
        }
        let uri = Uri::builder()
            .scheme("http")
            .authority(endpoint.to_string())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::Connect(endpoint, io::Error::other(e)))?;
        let io = self
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(|e| UpstreamError::Connect(endpoint, e))?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(IDLE_TIMEOUT / 2)
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Http(endpoint, e))?;
        tokio::spawn(conn);
        let mut conns = self.conns.lock();
        // Dropping the last sender of a connection closes it: idle and
        // closed ones go when a new one is made.
        conns.retain(|_, c| !c.sender.is_closed() && c.last_used.elapsed() < IDLE_TIMEOUT);
        conns.insert(
            endpoint,
            Http2Conn {
                sender: sender.clone(),
                last_used: Instant::now(),
            },
        );
        Ok(sender)
    }
}
