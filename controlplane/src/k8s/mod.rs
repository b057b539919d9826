//! Kubernetes API types that meshbox reads but `k8s-openapi` does not ship:
//! Istio's `security.istio.io/v1` `AuthorizationPolicy` and
//! `PeerAuthentication` (also read as `v1beta1`) and Gateway API's
//! `gateway.networking.k8s.io/v1` `Gateway` and `HTTPRoute`.
//!
//! They are plain serde structs holding only the fields the control plane
//! uses; unknown fields are ignored so newer CRD versions still parse. Each
//! implements `k8s_openapi::Resource`/`Metadata` by hand so `kube::Api` can
//! watch them without pulling `kube`'s derive machinery into this module.
//!
//! Also the waypoint controller of Kubernetes mode: [`waypoint_deployer`]
//! (pure: a waypoint Gateway in, the ServiceAccount, Service and Deployment
//! that run meshbox's waypoint for it and the Gateway's status out) and
//! [`waypoint_controller`] (applies them, with kube-runtime). The HTTPRoute
//! status writer reads the model, so it is a module of its own
//! (`route_status`, at the crate root), above both.

mod authorization_policy;
mod gateway;
mod http_route;
mod peer_authentication;
pub mod waypoint_controller;
pub mod waypoint_deployer;

pub use authorization_policy::{
    AuthorizationPolicy, AuthorizationPolicySpec, Condition, ExtensionProvider, Operation,
    PolicyTargetReference, Rule, RuleFrom, RuleTo, Source, WorkloadSelector,
};
pub use gateway::{
    AllowedRoutes, Gateway, GatewaySpec, GatewaySpecAddress, GatewayStatus, GatewayStatusAddress,
    Listener, RouteGroupKind, RouteNamespaces,
};
pub use http_route::{
    HttpBackendRef, HttpHeader, HttpHeaderFilter, HttpPathMatch, HttpRoute, HttpRouteFilter,
    HttpRouteMatch, HttpRouteRule, HttpRouteSpec, HttpRouteStatus, HttpRouteTimeouts,
    HttpValueMatch, OtherFields, ParentReference, RouteCondition, RouteParentStatus,
};
pub use peer_authentication::{
    MutualTls, PeerAuthentication, PeerAuthenticationSpec, PeerAuthenticationV1beta1,
};

use serde::{Deserialize, Deserializer};

/// Reads an explicit `null` (e.g. a YAML key with no value) as the type's
/// default: hand-written manifests often contain `rules:` or `ports:` with
/// nothing under them, and refusing the whole object for that helps nobody.
pub(crate) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}
