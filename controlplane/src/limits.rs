//! Limits that apply before the control plane does any work for a client:
//! how many connections one source address may hold open, how long request
//! headers and bodies may take to arrive, and the counters of what these
//! limits refused.
//!
//! They sit in front of authentication on purpose: a client that has not
//! proven who it is must not be able to make the control plane hold memory,
//! tasks or file descriptors for long.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// `--max-connections-per-peer`'s default. A node's dataplane holds a few
/// connections (xDS, CA, capture reports) and a person with curl one or two;
/// 64 leaves room for reconnects overlapping old connections and for several
/// clients behind one address, and still stops one address from exhausting
/// the process's file descriptors.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 64;
/// `--header-read-timeout`'s default (also used by [`ConnectionLimits::unlimited`]):
/// a legitimate client sends its request headers in one go; a slowloris
/// client trickles them.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reason: &'static str,
}

/// Counters of what the limits refused. Labels are fixed strings; no address
/// a client connects from becomes a label value.
#[derive(Clone, Debug, Default)]
pub struct LimitMetrics {
    connections_refused: Family<ConnectionLabels, Counter>,
    requests_refused: Family<RequestLabels, Counter>,
    grpc_refused: Family<RequestLabels, Counter>,
}

impl LimitMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "meshbox_connections_refused",
            "Connections closed at accept, before any TLS or HTTP work, by listener and reason",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "meshbox_rest_requests_refused",
            "REST requests refused by a limit before their handler ran to the end, by reason",
            metrics.requests_refused.clone(),
        );
        registry.register(
            "meshbox_grpc_requests_refused",
            "Unary gRPC calls (CA, capture reports, enrollment) refused before their message was read, by reason",
            metrics.grpc_refused.clone(),
        );
        metrics
    }

    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ConnectionLabels { listener, reason })
            .inc();
    }

    pub fn grpc_refused(&self, reason: &'static str) {
        self.grpc_refused
            .get_or_create(&RequestLabels { reason })
            .inc();
    }

    pub fn request_refused(&self, reason: &'static str) {
        self.requests_refused
            .get_or_create(&RequestLabels { reason })
            .inc();
    }
}

/// The limits of one listener.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// The listener's name in metrics and logs (`grpc`, `rest`, `plaintext`).
    pub listener: &'static str,
    /// Most connections one source IP may hold open at once.
    pub max_per_peer: usize,
    /// Longest an HTTP/1 client may take to send a request's headers.
    pub header_read_timeout: Duration,
    pub metrics: LimitMetrics,
}

impl ConnectionLimits {
    /// No cap on connections (for embedding the listeners in tests and
    /// benchmarks that open many connections from one address).
    pub fn unlimited(listener: &'static str) -> Self {
        Self {
            listener,
            max_per_peer: usize::MAX,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            metrics: LimitMetrics::default(),
        }
    }
}

/// Open connections per source IP, for one listener.
#[derive(Debug)]
pub struct PeerConnections {
    max_per_peer: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PeerConnections {
    pub fn new(max_per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            max_per_peer,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, held until the returned
    /// guard is dropped; `None` when `ip` already holds the maximum.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock();
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max_per_peer {
            if *count == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            owner: self.clone(),
            ip,
        })
    }

    /// Connections `ip` holds open now.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.open
            .lock()
            .get(&ip.to_canonical())
            .copied()
            .unwrap_or(0)
    }
}

/// One open connection's place in [`PeerConnections`].
#[derive(Debug)]
pub struct PeerSlot {
    owner: Arc<PeerConnections>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            // Forget addresses with nothing open, so the map is bounded by
            // the connections open now, not by every address ever seen.
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A unary gRPC service behind two checks made before its message is read:
/// the caller's token, from the headers (tonic would read and decode the
/// whole message, up to its size limit, before the handler could refuse
/// it), and a deadline for the message to arrive. The service still
/// authenticates the caller itself (it needs the caller, not a yes); a
/// second check costs an HMAC locally, and nothing in Kubernetes mode,
/// where reviews are cached.
#[derive(Clone)]
pub struct AuthFirst<S> {
    inner: S,
    auth: Arc<crate::auth::Authenticator>,
    body_read_timeout: Duration,
    metrics: LimitMetrics,
}

impl<S> AuthFirst<S> {
    pub fn new(
        inner: S,
        auth: Arc<crate::auth::Authenticator>,
        body_read_timeout: Duration,
        metrics: LimitMetrics,
    ) -> Self {
        Self {
            inner,
            auth,
            body_read_timeout,
            metrics,
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for AuthFirst<S> {
    const NAME: &'static str = S::NAME;
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<B>> for AuthFirst<S>
where
    S: tower::Service<
            http::Request<DeadlineBody<B>>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone is the one that is not ready yet; the ready one serves
        // this call (tower's rule for services called from a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let metrics = self.metrics.clone();
        let timeout = self.body_read_timeout;
        Box::pin(async move {
            // A header that is not ASCII is no credential at all.
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            if let Err(e) = auth.authenticate_header(header.as_deref()).await {
                metrics.grpc_refused("unauthenticated");
                return Ok(crate::ca::grpc::auth_status(e).into_http());
            }
            let request = request.map(|body| DeadlineBody::new(body, timeout, metrics));
            inner.call(request).await
        })
    }
}

/// A request body that fails once `timeout` has passed before it ended.
pub struct DeadlineBody<B> {
    inner: Pin<Box<B>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    metrics: LimitMetrics,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, timeout: Duration, metrics: LimitMetrics) -> Self {
        Self {
            inner: Box::pin(inner),
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            metrics,
        }
    }
}

/// The error a [`DeadlineBody`] ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request message did not arrive within {}", humantime::format_duration(*.0))]
pub struct BodyTimedOut(Duration);

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = self.inner.as_mut().poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.metrics.grpc_refused("body_timeout");
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(self.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_capped_and_its_slots_come_back() {
        let peers = PeerConnections::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = peers.try_acquire(a).unwrap();
        let _second = peers.try_acquire(a).unwrap();
        assert!(peers.try_acquire(a).is_none(), "a third from a is refused");
        assert!(peers.try_acquire(b).is_some(), "another peer is unaffected");
        // The IPv4-mapped spelling of a is the same peer.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(peers.try_acquire(mapped).is_none());
        drop(first);
        assert_eq!(peers.open_from(a), 1);
        assert!(peers.try_acquire(mapped).is_some());
    }

    #[test]
    fn forgotten_when_nothing_is_open() {
        let peers = PeerConnections::new(1);
        let a: IpAddr = [10, 0, 0, 1].into();
        drop(peers.try_acquire(a).unwrap());
        assert!(peers.open.lock().is_empty());
        let zero = PeerConnections::new(0);
        assert!(zero.try_acquire(a).is_none());
        assert!(zero.open.lock().is_empty());
    }
}
