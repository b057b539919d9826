//! Per-request telemetry: one access-log line per request, and Istio's
//! standard HTTP metrics with Istio's label names and `reporter="waypoint"`,
//! so Istio's dashboards work unchanged.
//!
//! A request is recorded exactly once, when its response body ends or is
//! dropped (a client that goes away mid-response is still counted), through
//! [`Metered`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use meshbox_certs::SpiffeId;
use meshbox_dataplane::state::{ServiceInfo, Workload};
use meshbox_dataplane::telemetry::{PeerLabels, UNKNOWN};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::info;

use crate::upstream::Body;

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for the byte-size histograms (powers of ten).
const BYTES_BUCKETS: [f64; 9] = [
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
];

/// Istio's standard HTTP metric labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reporter: &'static str,
    #[prometheus(flatten)]
    peers: PeerLabels,
    request_protocol: &'static str,
    response_code: u16,
    grpc_response_status: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// The waypoint's HTTP metrics.
#[derive(Clone)]
pub struct Telemetry {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
}

impl Telemetry {
    pub fn register(registry: &mut Registry) -> Self {
        let t = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            request_bytes: Family::new_with_constructor(|| Histogram::new(BYTES_BUCKETS)),
            response_bytes: Family::new_with_constructor(|| Histogram::new(BYTES_BUCKETS)),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_requests",
            "Requests through the waypoint",
            t.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, first byte in to last byte out",
            t.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request size: headers and body",
            t.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response size: headers and body",
            t.response_bytes.clone(),
        );
        t
    }
}

/// The metric handles of one label set (prometheus-client's counters and
/// histograms are shared handles: a clone updates the same series).
#[derive(Clone)]
struct Handles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// The label sets one client connection has used, with their handles: the
/// source, its identity and the Service asked for are the connection's, so
/// a request differs only by endpoint, code and flags, and finds its series
/// without building and hashing Istio's 25 labels four times.
#[derive(Default)]
pub struct HandleCache {
    entries: parking_lot::Mutex<Vec<CachedHandles>>,
}

struct CachedHandles {
    /// Held, not just compared by address: a workload's allocation cannot
    /// be reused for another while its entry lives.
    workload: Option<Arc<Workload>>,
    status: u16,
    flags: &'static str,
    handles: Handles,
}

/// Label sets kept per connection; a connection spread over more
/// endpoints and codes than this builds the labels again for the rest.
const CACHED_LABEL_SETS: usize = 16;

/// What is known of a request by the time it is answered.
pub struct RequestRecord {
    pub telemetry: Telemetry,
    /// The client connection's cache.
    pub cache: Arc<HandleCache>,
    pub start: Instant,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    pub source_identity: Option<SpiffeId>,
    pub source_workload: Option<Arc<Workload>>,
    pub destination_service: Option<ServiceInfo>,
    pub destination_workload: Option<Arc<Workload>>,
    pub upstream: Option<std::net::SocketAddr>,
    pub status: u16,
    /// Envoy's response flags: `-`, `UH` (no healthy upstream), `UF`
    /// (upstream connection failure), `UT` (timeout), `NR` (no route).
    pub flags: &'static str,
    /// The deciding policy or route, for the log line.
    pub detail: Option<String>,
    /// Request headers and body as received.
    pub request_bytes: u64,
    /// Response headers; the body is added as it passes.
    pub response_bytes: u64,
}

impl RequestRecord {
    /// This request's series, from the connection's cache or made now.
    fn handles(&self, destination_identity: Option<&SpiffeId>) -> Handles {
        let same_workload = |w: &Option<Arc<Workload>>| match (w, &self.destination_workload) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        let mut entries = self.cache.entries.lock();
        if let Some(hit) = entries.iter().find(|e| {
            e.status == self.status && e.flags == self.flags && same_workload(&e.workload)
        }) {
            return hit.handles.clone();
        }
        let labels = RequestLabels {
            reporter: "waypoint",
            peers: PeerLabels::new(
                self.source_workload.as_deref(),
                self.source_identity.as_ref(),
                self.destination_service.as_ref(),
                self.destination_workload.as_deref(),
                destination_identity,
            ),
            request_protocol: self.protocol,
            response_code: self.status,
            grpc_response_status: "",
            response_flags: self.flags,
            connection_security_policy: "mutual_tls",
        };
        let t = &self.telemetry;
        let handles = Handles {
            requests: t.requests.get_or_create(&labels).clone(),
            duration: t.duration.get_or_create(&labels).clone(),
            request_bytes: t.request_bytes.get_or_create(&labels).clone(),
            response_bytes: t.response_bytes.get_or_create(&labels).clone(),
        };
        if entries.len() == CACHED_LABEL_SETS {
            entries.remove(0);
        }
        entries.push(CachedHandles {
            workload: self.destination_workload.clone(),
            status: self.status,
            flags: self.flags,
            handles: handles.clone(),
        });
        handles
    }

    fn finish(&self) {
        let principal = |id: Option<&SpiffeId>| {
            id.map(|i| i.to_string())
                .unwrap_or_else(|| UNKNOWN.to_owned())
        };
        let destination_identity = self.destination_workload.as_deref().map(|w| &w.identity);
        let elapsed = self.start.elapsed();
        let handles = self.handles(destination_identity);
        handles.requests.inc();
        handles.duration.observe(elapsed.as_secs_f64() * 1000.0);
        handles.request_bytes.observe(self.request_bytes as f64);
        handles.response_bytes.observe(self.response_bytes as f64);
        info!(
            target: "access",
            method = %self.method,
            path = %self.path,
            authority = %self.authority,
            protocol = %self.protocol,
            response_code = self.status,
            flags = %self.flags,
            duration_ms = elapsed.as_millis() as u64,
            src.identity = %principal(self.source_identity.as_ref()),
            src.workload = %self.source_workload.as_deref().map_or(UNKNOWN, |w| w.name.as_str()),
            dst.service = %self.destination_service.as_ref().map_or(UNKNOWN, |s| s.hostname.as_str()),
            dst.workload = %self.destination_workload.as_deref().map_or(UNKNOWN, |w| w.name.as_str()),
            dst.identity = %principal(destination_identity),
            dst.addr = %self.upstream.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            detail = %self.detail.as_deref().unwrap_or("-"),
            "request"
        );
    }
}

/// A response body that records its request when it ends or is dropped.
pub struct Metered {
    inner: Body,
    record: Option<RequestRecord>,
}

impl Metered {
    pub fn new(inner: Body, record: RequestRecord) -> Self {
        let mut m = Self {
            inner,
            record: Some(record),
        };
        if m.inner.is_end_stream() {
            m.done();
        }
        m
    }

    fn done(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish();
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.done();
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(record)) = (frame.data_ref(), self.record.as_mut()) {
                    record.response_bytes += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.done();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
