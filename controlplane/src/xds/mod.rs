//! The workload xDS server: Envoy's Delta ADS
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`)
//! serving Istio's ambient types `istio.workload.Address` and
//! `istio.security.Authorization`, so our dataplane and a stock Istio
//! ztunnel can both follow the mesh, and meshbox's own
//! `meshbox.v1.WaypointPolicy` and `meshbox.v1.WaypointRoute` for waypoints.
//! Every type follows the same protocol; a type is only sent on a stream
//! that asked for it, so node proxies (which never ask for the waypoint
//! types) never get them, and any authenticated client may.
//!
//! Boundaries: this module receives already-translated resources through
//! [`XdsServer::update`] (the model and its translation live elsewhere),
//! authenticates streams through a [`StreamAuthenticator`] it is given (token
//! checking lives in `auth`), and exposes a tonic service to mount on the
//! control plane's gRPC port plus [`XdsServer::connections`] for the REST
//! API. It owns the protocol: subscriptions (wildcard and on-demand,
//! including lookups by IP), per-resource versions, nonces, ACK/NACK,
//! reconnects with `initial_resource_versions`, coalescing and flow control.
//!
//! Layout:
//! - [`resource`]: encoding each resource once, versions, IPs;
//! - [`cache`]: the encoded resources, IP index and bounded change log;
//! - [`delta`]: per-stream, per-type protocol state (pure);
//! - [`stream`]: the task serving one stream;
//! - [`codec`]: the wire codec that splices shared encodings into responses;
//! - [`shared`]: the state the server and every stream share;
//! - [`server`]: [`XdsServer`] and its gRPC service;
//! - [`status`]: what `GET /api/v1/dataplanes` shows;
//! - [`metrics`]: Prometheus metrics.

mod cache;
mod codec;
mod delta;
#[doc(hidden)]
pub mod fuzzing;
mod metrics;
mod resource;
mod server;
mod shared;
mod status;
mod stream;

use std::time::Duration;

pub use server::{XdsServer, XdsService};
pub use status::{ConnectionInfo, NackInfo, TypeInfo};

/// At most `max` bytes of `s`, cut at a character boundary. Bounds
/// client-supplied text before it is stored or shown.
pub(crate) fn shorten(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Who is on the other end of a stream, as the caller's authentication
/// decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// A stable name for logs and the status API, e.g. `node:worker-1` or
    /// a SPIFFE ID.
    pub caller: String,
    /// The node the caller proxies for, when its credential says so.
    pub node: Option<String>,
}

/// Authenticates a stream from its gRPC metadata, before anything is sent.
#[tonic::async_trait]
pub trait StreamAuthenticator: Send + Sync + 'static {
    /// `authorization` is the gRPC `authorization` metadata value, if any
    /// (and if it is ASCII). An error ends the stream with that status.
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Peer, tonic::Status>;
}

/// [`XdsOptions::max_streams_per_caller`]'s default. A node proxy needs one
/// stream, plus a few while a reconnect overlaps a stream the server has not
/// yet seen die; a workload identity is shared by every replica running a
/// dedicated-mode dataplane. 64 covers both and still stops one leaked token
/// from opening thousands.
pub const DEFAULT_MAX_STREAMS_PER_CALLER: usize = 64;

/// Tuning of the server. The defaults suit a mesh of tens of thousands of
/// resources and hundreds of clients.
#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// Quiet period after a change before clients are pushed to; further
    /// changes within it extend it (up to `debounce_max`), so a burst
    /// becomes one push.
    pub debounce: Duration,
    /// Longest a change waits for a burst to end.
    pub debounce_max: Duration,
    /// Responses queued per client beyond the one being written. When the
    /// queue is full nothing more is built for that client; its pending
    /// changes collapse into "latest state of what changed".
    pub client_queue_depth: usize,
    /// A push larger than this is split into several responses, which
    /// bounds the memory a client's queue and write buffer can hold.
    pub max_response_bytes: usize,
    /// Changes remembered for clients that are behind (at least twice the
    /// number of resources is always kept). A stream further behind than
    /// that is reconciled in full if it subscribed by name; a wildcard
    /// stream, which keeps no per-resource record, is ended with
    /// `UNAVAILABLE` so the client reconnects and reports what it holds.
    pub change_log_capacity: usize,
    /// Most names in one request's subscribe (or unsubscribe) list.
    pub max_names_per_request: usize,
    /// Longest resource name accepted.
    pub max_name_len: usize,
    /// Most names one stream may have subscribed per type.
    pub max_subscriptions: usize,
    /// Largest request message accepted (a reconnecting client lists every
    /// resource it holds in `initial_resource_versions`).
    pub max_request_bytes: usize,
    /// Most entries in one request's `initial_resource_versions` (a
    /// reconnecting client lists every resource it holds there).
    pub max_initial_resource_versions: usize,
    /// Most streams one authenticated caller may have open at once; more are
    /// refused with `RESOURCE_EXHAUSTED` before any state is kept for them.
    pub max_streams_per_caller: usize,
}

impl Default for XdsOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(10),
            debounce_max: Duration::from_millis(50),
            client_queue_depth: 2,
            max_response_bytes: 128 * 1024,
            change_log_capacity: 65_536,
            max_names_per_request: 10_000,
            max_name_len: 1024,
            max_subscriptions: 100_000,
            max_request_bytes: 32 * 1024 * 1024,
            // As many as one stream may subscribe to by name.
            max_initial_resource_versions: 100_000,
            max_streams_per_caller: DEFAULT_MAX_STREAMS_PER_CALLER,
        }
    }
}
