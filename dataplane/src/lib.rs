//! The meshbox dataplane (a "mini ztunnel").
//!
//! It carries meshed workloads' TCP traffic over HBONE (mutual TLS + HTTP/2
//! CONNECT) with L4 authorization, with state from the control plane's
//! workload xDS and certificates from its CA. Boundaries: it does not
//! install capture rules (that is the node agent's job); it serves the
//! listeners that those rules redirect to.
//!
//! - [`config`]: flags and Istio's environment names, checked as a whole;
//! - [`app`]: wiring and graceful drain;
//! - [`xds`]: the Delta ADS client that keeps the mesh state current;
//! - [`state`]: that state indexed for the proxy, and destination selection
//!   (workload, service VIP to endpoint, waypoint, passthrough);
//! - [`mesh`]: the state behind its lock, fed from xDS, with on-demand
//!   lookups;
//! - [`identity`]: workload keys and certificates from the CA, cached per
//!   identity and renewed at half-life;
//! - [`authz`]: L4 authorization with Istio's semantics;
//! - [`proxy`]: the outbound, inbound HBONE and inbound plaintext
//!   listeners, the HBONE connection pool and socket options;
//! - [`inpod`]: node mode's capture — rules and listeners inside each
//!   enrolled pod's network namespace;
//! - [`netns`]: network namespaces (open, run code inside, find by IP),
//!   used by [`proxy`]'s sockets and by [`inpod`];
//! - [`telemetry`]: access logs and Istio's `istio_tcp_*` metrics;
//! - [`token`]: the bearer-token file shown to the control plane;
//! - [`process`]: logging, limits and signals of a proxy process (the
//!   waypoint's too);
//! - [`admin`]: `/config_dump`, `/metrics`, `/healthz/ready`.

pub mod admin;
pub mod app;
pub mod authz;
pub mod config;
pub mod identity;
pub mod inpod;
pub mod mesh;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod state;
pub mod telemetry;
pub mod token;
pub mod xds;
