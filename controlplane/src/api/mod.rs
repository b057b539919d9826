//! The REST API on port 15014: certificates with curl, and (as the model
//! grows) inspection of what the control plane serves. JSON everywhere
//! except the PEM endpoints; errors are `{"error": code, "message": text}`.

mod certificates;
mod error;
mod mesh;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::auth::Authenticator;
use crate::ca::CertificateIssuer;
use crate::metrics::Metrics;
use crate::store::MeshStore;
pub use error::ApiError;

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub issuer: Arc<CertificateIssuer>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    /// True once every source has delivered its first state.
    pub ready: Arc<AtomicBool>,
    pub store: Arc<MeshStore>,
    pub xds: Arc<crate::xds::XdsServer>,
    /// Pod capture state reported by node dataplanes.
    pub capture: Arc<crate::capture::CaptureReports>,
    pub options: ApiOptions,
}

/// Limits and access rules of the REST API.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// Longest a request body may take to arrive once its handler starts
    /// reading it (after the caller is authenticated).
    pub body_read_timeout: Duration,
    /// Whether the read-only inspection endpoints (workloads, services,
    /// policies, waypoints, routes, status, dataplanes, recent issuances) need a
    /// valid bearer token. Health, readiness, metrics, the OpenAPI document
    /// and the CA root stay open either way: probes and Prometheus carry no
    /// token, and the root is public by nature.
    pub require_token_for_reads: bool,
}

/// The OpenAPI document, kept beside the code it describes.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

pub fn router(state: ApiState) -> Router {
    let inspection = Router::new()
        .route(
            "/api/v1/certificates",
            get(certificates::recent).post(certificates::issue),
        )
        .route("/api/v1/workloads", get(mesh::list_workloads))
        .route(
            "/api/v1/workloads/{namespace}/{name}",
            get(mesh::get_workload),
        )
        .route("/api/v1/services", get(mesh::list_services))
        .route(
            "/api/v1/services/{namespace}/{name}",
            get(mesh::get_service),
        )
        .route("/api/v1/policies", get(mesh::list_policies))
        .route("/api/v1/waypoints", get(mesh::list_waypoints))
        .route("/api/v1/routes", get(mesh::list_routes))
        .route("/api/v1/status", get(mesh::status))
        .route("/api/v1/dataplanes", get(dataplanes))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            gate_reads,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(openapi))
        .route("/api/v1/ca/root", get(certificates::root))
        .merge(inspection)
        .fallback(|| async { ApiError::not_found("no such endpoint; see /api/openapi.json") })
        .with_state(state)
}

/// With `require_token_for_reads`, refuses an inspection request without a
/// valid token before its handler runs. `POST /api/v1/certificates` passes:
/// it authenticates its caller itself (and needs the caller, not just a yes).
async fn gate_reads(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if state.options.require_token_for_reads && request.method() != Method::POST {
        // A header that is not ASCII is no credential at all.
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or_default());
        if let Err(e) = state.auth.authenticate_header(authorization).await {
            state.metrics.limits.request_refused("unauthenticated_read");
            tracing::debug!(path = request.uri().path(), error = %e, "inspection request refused");
            return ApiError::from(e).into_response();
        }
    }
    next.run(request).await
}

async fn readyz(State(state): State<ApiState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (axum::http::StatusCode::OK, "ready\n")
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first state from every source\n",
        )
    }
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// An xDS stream, with its node's capture report when it sent one.
#[derive(serde::Serialize)]
struct DataplaneView {
    #[serde(flatten)]
    connection: crate::xds::ConnectionInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    capture: Option<crate::capture::NodeCaptureView>,
}

async fn dataplanes(State(state): State<ApiState>) -> impl IntoResponse {
    let views: Vec<DataplaneView> = state
        .xds
        .connections()
        .into_iter()
        .map(|connection| DataplaneView {
            capture: connection
                .node
                .as_deref()
                .and_then(|node| state.capture.get(node)),
            connection,
        })
        .collect();
    axum::Json(views)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}
