//! Istio's `PeerAuthentication` (`security.istio.io/v1`, same shape in
//! `v1beta1`), as users write it.
//!
//! Only the shape lives here; what a mode means for which workload is the
//! mesh model's business. Modes and port keys stay strings so one bad value
//! reaches the model (which reports it and fails closed) instead of failing
//! the whole watch or manifest file.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{WorkloadSelector, nullable};

/// `security.istio.io/v1` `PeerAuthentication`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Absent (or without labels): the policy is for the whole namespace,
    /// or the whole mesh in the root namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Port (a string in JSON; YAML may write it as a number) → mode.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MutualTls {
    /// `UNSET` (the default), `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// The same object read through `security.istio.io/v1beta1`, for clusters
/// whose Istio CRD does not serve `v1` yet (Istio before 1.22).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(transparent)]
pub struct PeerAuthenticationV1beta1(pub PeerAuthentication);

impl k8s_openapi::Resource for PeerAuthentication {
    const API_VERSION: &'static str = "security.istio.io/v1";
    const GROUP: &'static str = "security.istio.io";
    const KIND: &'static str = "PeerAuthentication";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "peerauthentications";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::ListableResource for PeerAuthentication {
    const LIST_KIND: &'static str = "PeerAuthenticationList";
}

impl k8s_openapi::Metadata for PeerAuthentication {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl k8s_openapi::Resource for PeerAuthenticationV1beta1 {
    const API_VERSION: &'static str = "security.istio.io/v1beta1";
    const GROUP: &'static str = "security.istio.io";
    const KIND: &'static str = "PeerAuthentication";
    const VERSION: &'static str = "v1beta1";
    const URL_PATH_SEGMENT: &'static str = "peerauthentications";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::ListableResource for PeerAuthenticationV1beta1 {
    const LIST_KIND: &'static str = "PeerAuthenticationList";
}

impl k8s_openapi::Metadata for PeerAuthenticationV1beta1 {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.0.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}
