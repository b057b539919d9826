//! The REST API on port 15014: certificates with curl, and (as the model
//! grows) inspection of what the control plane serves. JSON everywhere
//! except the PEM endpoints; errors are `{"error": code, "message": text}`.

mod certificates;
mod error;
mod mesh;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
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
}

/// The OpenAPI document, kept beside the code it describes.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(openapi))
        .route("/api/v1/ca/root", get(certificates::root))
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
        .route("/api/v1/status", get(mesh::status))
        .route("/api/v1/dataplanes", get(dataplanes))
        .fallback(|| async { ApiError::not_found("no such endpoint; see /api/openapi.json") })
        .with_state(state)
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
