//! The meshbox waypoint: the L7 proxy in front of the Services and
//! workloads that opt in with `istio.io/use-waypoint`. It terminates HBONE
//! on 15008 with the waypoint's own identity, parses the HTTP inside,
//! enforces L7 `AuthorizationPolicy`, routes by `HTTPRoute`, and sends each
//! request on over HBONE to the chosen endpoint.
//!
//! Boundaries: a sibling of the dataplane, not a copy. Identity
//! (certificates), the xDS client, mesh state and endpoint selection, the
//! HBONE pool and tunnel, and the process edges are meshbox-dataplane's,
//! used as a library; this crate adds only what is L7.
//!
//! - [`config`]: flags and environment;
//! - [`app`]: wiring, the L7 tables rebuilt from xDS, drain;
//! - [`inbound`]: 15008, TLS, CONNECT, and HTTP/1.1 or HTTP/2 inside;
//! - [`sniff`]: is a stream HTTP?;
//! - [`proxy`]: one request: authorize, route, pick, forward, retry;
//! - [`tcp`]: a stream that is not HTTP (L4 policy only);
//! - [`authz`]: the L7 authorization engine (pure);
//! - [`policies`]: which `WaypointPolicy` resources apply where;
//! - [`routes`]: `WaypointRoute` resources compiled into per-Service tables
//!   (pure);
//! - [`upstream`]: hyper's pooled clients over HBONE;
//! - [`telemetry`]: access log and Istio's HTTP metrics;
//! - [`admin`]: `/config_dump`, `/metrics`, `/healthz/ready`;
//! - [`fuzzing`]: the fuzz target's entry point (stream detection and the
//!   control plane's resources).

pub mod admin;
pub mod app;
pub mod authz;
pub mod config;
pub mod fuzzing;
pub mod inbound;
pub mod policies;
pub mod proxy;
pub mod routes;
pub mod sniff;
pub mod tcp;
pub mod telemetry;
pub mod upstream;
