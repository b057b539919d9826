//! The meshbox dataplane (a "mini ztunnel").
//!
//! It carries meshed pods' TCP traffic over HBONE (mutual TLS + HTTP/2
//! CONNECT) with L4 authorization. This crate is being built module by
//! module; what exists today:
//! - [`identity`]: workload keys and certificates from the CA, cached per
//!   identity and renewed at half-life;
//! - [`xds`]: the Delta ADS client that keeps the mesh state current;
//! - [`state`]: that state indexed for the proxy, and destination selection
//!   (workload, service VIP to endpoint, waypoint, passthrough);
//! - [`authz`]: L4 authorization with Istio's semantics.

pub mod authz;
pub mod identity;
pub mod state;
pub mod xds;
