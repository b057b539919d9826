//! Istio's `AuthorizationPolicy` (`security.istio.io/v1`), as users write it.
//!
//! Only the shape lives here; what each field means for a node proxy is
//! decided by the mesh model's policy translation (this module depends on
//! nothing in the model).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{OtherFields, nullable};

/// `security.istio.io/v1` `AuthorizationPolicy`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Absent: the policy applies to the whole namespace (or mesh, in the
    /// root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub target_refs: Vec<PolicyTargetReference>,
    /// `ALLOW` (the default when absent), `DENY`, `AUDIT` or `CUSTOM`. Kept as
    /// a string so an unknown value reaches the model (which reports it)
    /// instead of failing the whole watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub rules: Vec<Rule>,
    /// Fields meshbox does not know (a newer Istio's): reported, and they
    /// make every rule fail closed.
    #[serde(flatten)]
    pub other: OtherFields,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    #[serde(default)]
    pub name: String,
}

/// One rule: it matches when every `from`, `to` and `when` part matches.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub from: Vec<RuleFrom>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub to: Vec<RuleTo>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub when: Vec<Condition>,
    #[serde(flatten)]
    pub other: OtherFields,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(flatten)]
    pub other: OtherFields,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    #[serde(flatten)]
    pub other: OtherFields,
}

macro_rules! string_lists {
    ($(#[$meta:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            $(
                #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
                pub $field: Vec<String>,
            )*
            /// Fields meshbox does not know: they fail the rule closed.
            #[serde(flatten)]
            pub other: OtherFields,
        }
    };
}

string_lists!(
    /// Who the connection comes from.
    Source {
        principals,
        not_principals,
        request_principals,
        not_request_principals,
        namespaces,
        not_namespaces,
        service_accounts,
        not_service_accounts,
        ip_blocks,
        not_ip_blocks,
        remote_ip_blocks,
        not_remote_ip_blocks,
    }
);

string_lists!(
    /// What the connection is for.
    Operation {
        hosts,
        not_hosts,
        ports,
        not_ports,
        methods,
        not_methods,
        paths,
        not_paths,
    }
);

/// A `when` condition: `key` must have one of `values` and none of
/// `notValues`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(default)]
    pub key: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_values: Vec<String>,
    #[serde(flatten)]
    pub other: OtherFields,
}

impl k8s_openapi::Resource for AuthorizationPolicy {
    const API_VERSION: &'static str = "security.istio.io/v1";
    const GROUP: &'static str = "security.istio.io";
    const KIND: &'static str = "AuthorizationPolicy";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "authorizationpolicies";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::ListableResource for AuthorizationPolicy {
    const LIST_KIND: &'static str = "AuthorizationPolicyList";
}

impl k8s_openapi::Metadata for AuthorizationPolicy {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
