//! The meshbox waypoint: the L7 proxy that sits in front of the services and
//! workloads that opt in with `istio.io/use-waypoint` (issue 16). Its job is
//! what the node dataplane does not do: terminate HBONE on 15008 with the
//! waypoint's own identity, parse the HTTP inside, enforce L7
//! `AuthorizationPolicy`, route by `HTTPRoute`, and send each request on over
//! HBONE to the chosen endpoint.
//!
//! Boundaries: the waypoint is a sibling of the dataplane, not a copy of it.
//! Identity (certificates), the xDS client, the HBONE pool and telemetry are
//! meshbox-dataplane's and are to be used from there as a library when the
//! serving parts arrive; this crate adds only what is L7. Built so far: the
//! authorization engine ([`authz`]), which is pure (no I/O, no clock, no
//! locks) and takes its own input types, so the proxy, the control plane's
//! status reporting and the tests all drive the same code. The `waypoint`
//! binary does not serve traffic yet.

pub mod authz;
