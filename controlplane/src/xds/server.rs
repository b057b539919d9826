//! The xDS server object the control plane owns, and the gRPC service it
//! mounts.
//!
//! [`XdsServer::update`] is the only way resources get in: it encodes them
//! (outside any lock), applies them to the cache under a short write lock,
//! and wakes the streams. [`XdsServer::service`] is the tonic service for
//! `envoy.service.discovery.v3.AggregatedDiscoveryService`; it authenticates
//! each stream before anything is sent and then hands it to its own task
//! ([`super::stream`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use meshbox_proto::meshbox::{WaypointPolicy, WaypointRoute};
use meshbox_proto::security::Authorization;
use meshbox_proto::workload::Address;
use meshbox_proto::xds::DeltaDiscoveryRequest;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, warn};

use super::codec::{AdsCodec, Outbound};
use super::resource::{Encoded, Kind};
use super::shared::Shared;
use super::status::{ConnectionInfo, StreamStatus};
use super::{StreamAuthenticator, XdsOptions, stream};

const SERVICE_NAME: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The Delta ADS server: a cache of encoded resources and the streams that
/// serve it. Cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for XdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsServer")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl XdsServer {
    /// Creates the server and registers its metrics in `registry`.
    pub fn new(
        auth: Arc<dyn StreamAuthenticator>,
        registry: &mut Registry,
        options: XdsOptions,
    ) -> Self {
        Self {
            shared: Arc::new(Shared::new(auth, registry, options)),
        }
    }

    /// Feeds resource changes: `Some` upserts, `None` removes. Address
    /// resources are named by workload uid or `{namespace}/{hostname}`,
    /// Authorization resources by `{namespace}/{name}`.
    ///
    /// Each upsert is encoded exactly once, here; re-feeding identical
    /// content changes nothing and pushes nothing.
    pub fn update(
        &self,
        addresses: impl IntoIterator<Item = (String, Option<Arc<Address>>)>,
        authorizations: impl IntoIterator<Item = (String, Option<Arc<Authorization>>)>,
    ) {
        let mut encodings = 0u64;
        let mut changes: Vec<(Kind, Arc<str>, Option<Arc<Encoded>>)> = Vec::new();
        for (name, address) in addresses {
            let name: Arc<str> = name.into();
            let encoded = address.map(|a| {
                encodings += 1;
                Arc::new(Encoded::address(name.clone(), &a))
            });
            changes.push((Kind::Address, name, encoded));
        }
        for (name, authorization) in authorizations {
            let name: Arc<str> = name.into();
            let encoded = authorization.map(|a| {
                encodings += 1;
                Arc::new(Encoded::authorization(name.clone(), &a))
            });
            changes.push((Kind::Authorization, name, encoded));
        }
        self.apply(changes, encodings);
    }

    /// Feeds waypoint resource changes, as [`XdsServer::update`] does for
    /// the workload API: `WaypointPolicy` and `WaypointRoute` resources,
    /// both named `{namespace}/{name}`. Only clients that subscribe to
    /// these types (waypoints) are sent them.
    pub fn update_waypoints(
        &self,
        policies: impl IntoIterator<Item = (String, Option<Arc<WaypointPolicy>>)>,
        routes: impl IntoIterator<Item = (String, Option<Arc<WaypointRoute>>)>,
    ) {
        let mut encodings = 0u64;
        let mut changes: Vec<(Kind, Arc<str>, Option<Arc<Encoded>>)> = Vec::new();
        for (name, policy) in policies {
            let name: Arc<str> = name.into();
            let encoded = policy.map(|p| {
                encodings += 1;
                Arc::new(Encoded::waypoint(Kind::WaypointPolicy, name.clone(), &*p))
            });
            changes.push((Kind::WaypointPolicy, name, encoded));
        }
        for (name, route) in routes {
            let name: Arc<str> = name.into();
            let encoded = route.map(|r| {
                encodings += 1;
                Arc::new(Encoded::waypoint(Kind::WaypointRoute, name.clone(), &*r))
            });
            changes.push((Kind::WaypointRoute, name, encoded));
        }
        self.apply(changes, encodings);
    }

    /// Applies encoded changes under one short write lock and wakes the
    /// streams if anything changed.
    fn apply(&self, changes: Vec<(Kind, Arc<str>, Option<Arc<Encoded>>)>, encodings: u64) {
        self.shared.metrics.encoded(encodings);
        let generation = {
            let mut cache = self.shared.write_cache();
            let mut changed = false;
            for (kind, name, encoded) in changes {
                changed |= cache.apply(kind, name, encoded);
            }
            changed.then(|| cache.generation())
        };
        if let Some(generation) = generation {
            self.shared.published.send_replace(generation);
        }
    }

    /// Number of resources of each type currently served
    /// (`(addresses, authorizations)`).
    pub fn resource_counts(&self) -> (usize, usize) {
        let cache = self.shared.read_cache();
        (cache.len(Kind::Address), cache.len(Kind::Authorization))
    }

    /// The gRPC service to mount next to the CA service, e.g.
    /// `tonic::service::Routes::new(ca).add_service(xds.service())`.
    pub fn service(&self) -> XdsService {
        XdsService {
            shared: self.shared.clone(),
        }
    }

    /// One entry per open stream, sorted by caller, node and age.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let streams: Vec<Arc<StreamStatus>> = self.shared.streams().values().cloned().collect();
        let mut infos: Vec<(ConnectionInfo, u64)> =
            streams.iter().map(|s| (s.info(), s.id)).collect();
        infos.sort_by(|(a, a_id), (b, b_id)| {
            (&a.caller, &a.node, &a.connected_since, a_id).cmp(&(
                &b.caller,
                &b.node,
                &b.connected_since,
                b_id,
            ))
        });
        infos.into_iter().map(|(info, _)| info).collect()
    }
}

/// The tonic service for `DeltaAggregatedResources`.
///
/// It is written by hand rather than generated (`AggregatedDiscoveryServiceServer`)
/// only to plug in [`AdsCodec`], which writes responses from the cache's
/// shared encodings; it mounts the same way (`Routes::add_service`,
/// `Server::builder().add_service`).
#[derive(Clone)]
pub struct XdsService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for XdsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XdsService")
    }
}

impl NamedService for XdsService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for XdsService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != DELTA_PATH {
            // Only the delta protocol is served (state-of-the-world ADS is
            // not part of Istio's workload API).
            return Box::pin(async move {
                Ok(Status::unimplemented("only DeltaAggregatedResources is served").into_http())
            });
        }
        let shared = self.shared.clone();
        Box::pin(async move {
            let max_request = shared.options.max_request_bytes;
            let mut grpc =
                Grpc::new(AdsCodec).apply_max_message_size_config(Some(max_request), None);
            Ok(grpc.streaming(DeltaMethod { shared }, req).await)
        })
    }
}

/// The method handler tonic's `Grpc::streaming` calls.
struct DeltaMethod {
    shared: Arc<Shared>,
}

type ResponseStream = ReceiverStream<Result<Outbound, Status>>;

impl Service<Request<Streaming<DeltaDiscoveryRequest>>> for DeltaMethod {
    type Response = Response<ResponseStream>;
    type Error = Status;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(open_stream(shared, request))
    }
}

/// Authenticates a new stream and starts its task. An unauthenticated
/// stream is refused here, before any response is sent.
async fn open_stream(
    shared: Arc<Shared>,
    request: Request<Streaming<DeltaDiscoveryRequest>>,
) -> Result<Response<ResponseStream>, Status> {
    let remote = request.remote_addr();
    // A non-ASCII header is no credential at all.
    let authorization = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let peer = match shared.auth.authenticate(authorization).await {
        Ok(peer) => peer,
        Err(status) => {
            shared.metrics.stream_refused(match status.code() {
                tonic::Code::Unauthenticated => "unauthenticated",
                tonic::Code::PermissionDenied => "permission_denied",
                _ => "auth_error",
            });
            warn!(
                remote = ?remote,
                code = ?status.code(),
                error = status.message(),
                "xDS stream refused"
            );
            return Err(status);
        }
    };
    if !shared.acquire_stream(&peer.caller) {
        shared.metrics.stream_refused("too_many_streams");
        let max = shared.options.max_streams_per_caller;
        warn!(
            remote = ?remote,
            caller = peer.caller,
            max,
            "xDS stream refused: the caller has the most streams allowed open"
        );
        return Err(Status::resource_exhausted(format!(
            "{} already has {max} xDS streams open, the most one caller may have; close one first",
            peer.caller
        )));
    }
    let id = shared.next_stream.fetch_add(1, Ordering::Relaxed);
    let status = Arc::new(StreamStatus::new(
        id,
        peer.clone(),
        remote.map(|r| r.to_string()),
    ));
    shared.streams().insert(id, status.clone());
    shared.metrics.stream_opened();
    // Created before the task so the entry is removed even if the task
    // never runs.
    let registration = Registration {
        shared: shared.clone(),
        id,
        caller: peer.caller.clone(),
    };
    let (tx, rx) = mpsc::channel(shared.options.client_queue_depth.max(1));
    let span = tracing::info_span!(
        "xds_stream",
        stream = id,
        caller = peer.caller,
        node = peer.node.as_deref().unwrap_or("")
    );
    let requests = request.into_inner();
    let task_shared = shared.clone();
    tokio::spawn(
        async move {
            let _registration = registration;
            info!(remote = ?remote, "xDS stream opened");
            stream::run(task_shared, status, requests, tx).await;
            info!("xDS stream closed");
        }
        .instrument(span),
    );
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// Removes a stream from the status list, the gauge and its caller's count,
/// however its task ends.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
    caller: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.streams().remove(&self.id);
        self.shared.release_stream(&self.caller);
        self.shared.metrics.stream_closed();
    }
}
