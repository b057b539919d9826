//! An `AuthorizationPolicy` as written: Istio's fields, values still strings.
//!
//! Whatever reaches the waypoint (our xDS resource, a manifest) is turned
//! into these types first; [`super::Policy::compile`] then validates and
//! compiles them. A field the source knew but these types have no place for
//! goes into [`RuleSpec::unrecognized`], so it fails closed instead of being
//! dropped.

/// `spec.action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActionSpec {
    /// Istio's default when `action` is not set.
    #[default]
    Allow,
    Deny,
    /// Unsupported; it never changes a decision in Istio either, so it is
    /// reported and otherwise ignored.
    Audit,
    /// Unsupported (no external authorizer): enforced as a DENY of the
    /// requests its rules select.
    Custom,
}

/// One `AuthorizationPolicy`, already known to apply to the waypoint's
/// target (which policies apply is the caller's business).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySpec {
    pub namespace: String,
    pub name: String,
    pub action: ActionSpec,
    pub rules: Vec<RuleSpec>,
}

/// One entry of `spec.rules`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSpec {
    /// `from[].source`.
    pub from: Vec<SourceSpec>,
    /// `to[].operation`.
    pub to: Vec<OperationSpec>,
    pub when: Vec<ConditionSpec>,
    /// Names of fields that were set in the source but that these types do
    /// not carry (e.g. a field from a newer Istio API). Each one makes the
    /// rule unsupported.
    pub unrecognized: Vec<String>,
}

/// `from[].source`. Principals are written without `spiffe://`
/// (`cluster.local/ns/x/sa/y`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceSpec {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    /// Unsupported (no JWT authentication at the waypoint).
    pub request_principals: Vec<String>,
    /// Unsupported.
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    /// Unsupported (Istio 1.23's `ns/sa` form).
    pub service_accounts: Vec<String>,
    /// Unsupported.
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    /// Matched against the source address, like `ip_blocks`: the waypoint
    /// trusts no X-Forwarded-For, so the remote address is the peer's.
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to[].operation`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperationSpec {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// One entry of `when`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConditionSpec {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}
