//! The meshbox control plane (a "mini istiod").
//!
//! It turns what users declare (Kubernetes objects from a cluster, or the same
//! YAML from a folder) into the state each node proxy needs, and serves it:
//! - [`model`]: the mesh model, a pure index from Kubernetes objects ([`k8s`]
//!   holds the CRD types) to Istio's workload-API resources;
//! - [`source`]: what feeds the model (a manifest folder or Kubernetes
//!   watchers), through the shared [`store`];
//! - [`cluster`]: what the control plane keeps in the cluster (its CA
//!   Secret, the root-certificate ConfigMaps);
//! - [`route_status`]: HTTPRoute status written back to Kubernetes, from
//!   the model's checks;
//! - [`xds`]: the Delta ADS server streaming workload and authorization
//!   resources to dataplanes (ours or Istio's ztunnel);
//! - [`ca`]: the certificate authority service (Istio's `CreateCertificate`
//!   over gRPC, and `POST /api/v1/certificates` for curl);
//! - [`auth`]: bearer tokens, minted locally or checked with TokenReview;
//! - [`api`]: the REST API on 15014;
//! - [`serving`]: the TLS listeners and their self-renewing certificate;
//! - [`limits`]: what a client may hold before it is authenticated
//!   (connections per peer, header and body read time);
//! - [`run`]: wiring all of it together for `controlplane run`.
//!
//! Everything cryptographic lives in the `meshbox-certs` crate; this crate
//! decides *who* gets *what*.

pub mod api;
pub mod auth;
pub mod ca;
pub mod capture;
pub mod cluster;
#[doc(hidden)]
pub mod fuzzing;
pub mod k8s;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod route_status;
pub mod run;
pub mod serving;
pub mod source;
pub mod store;
pub mod xds;
