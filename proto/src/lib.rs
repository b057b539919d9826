//! Wire types of meshbox, generated from our own `.proto` files in `proto/`.
//!
//! The packages, message names and field numbers follow Istio's published
//! ambient APIs (the workload and authorization xDS resources, the CA service)
//! and Envoy's delta xDS protocol, so a stock Istio ztunnel and meshbox can talk
//! to each other. `capture.proto` and `waypoint.proto` are meshbox's own
//! additions: node dataplanes report which pods they captured, and waypoints
//! get their L7 policies and routes. This crate holds types only: no
//! behaviour lives here.

#![allow(clippy::all, missing_docs)]

pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod ca {
        tonic::include_proto!("istio.v1.auth");
    }
}

/// meshbox's own API: node dataplanes report pod capture state
/// (`capture.proto`), and waypoints get their L7 policies and routes
/// (`waypoint.proto`).
pub mod meshbox {
    tonic::include_proto!("meshbox.v1");
}

pub use envoy::service::discovery::v3 as xds;
pub use istio::ca;
pub use istio::security;
pub use istio::workload;

/// Type URL of the `istio.workload.Address` xDS resource.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of the `istio.security.Authorization` xDS resource.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// Type URL of the `meshbox.v1.WaypointPolicy` xDS resource (waypoints only).
pub const WAYPOINT_POLICY_TYPE_URL: &str = "type.googleapis.com/meshbox.v1.WaypointPolicy";
/// Type URL of the `meshbox.v1.WaypointRoute` xDS resource (waypoints only).
pub const WAYPOINT_ROUTE_TYPE_URL: &str = "type.googleapis.com/meshbox.v1.WaypointRoute";
