//! The `WaypointPolicy` resources this waypoint enforces, compiled, and
//! which of them apply to a request.
//!
//! A policy applies to a request when one of its targets names this
//! waypoint and either names no service and no workload (the Gateway
//! itself: every request), or names the request's service, or names the
//! workload the request is addressed to or was sent to. Workload targets
//! come from `selector` and namespace policies whose L7 rules the control
//! plane moved here; they are decided once the endpoint is chosen.

use meshbox_proto::meshbox as pb;

use crate::authz::{
    ActionSpec, ConditionSpec, OperationSpec, Policy, PolicySpec, RuleSpec, SourceSpec,
};

/// One compiled policy and where it applies at this waypoint.
#[derive(Clone, Debug)]
pub struct Enforced {
    pub policy: Policy,
    /// Every request through the waypoint.
    pub all: bool,
    /// Service resource names (`{namespace}/{hostname}`).
    pub services: Vec<String>,
    /// Workload uids.
    pub workloads: Vec<String>,
}

/// The policies that target this waypoint.
#[derive(Clone, Debug, Default)]
pub struct PolicyTable {
    pub policies: Vec<Enforced>,
    /// Some policy is bound to workloads (decided once per table, not per
    /// request).
    endpoint_bound: bool,
}

impl PolicyTable {
    pub fn build<'a>(
        waypoint: &str,
        resources: impl IntoIterator<Item = &'a pb::WaypointPolicy>,
    ) -> Self {
        let mut policies: Vec<Enforced> = resources
            .into_iter()
            .filter_map(|p| {
                let mine: Vec<&pb::PolicyTarget> = p
                    .targets
                    .iter()
                    .filter(|t| t.waypoint == waypoint)
                    .collect();
                if mine.is_empty() {
                    return None;
                }
                Some(Enforced {
                    policy: Policy::compile(&spec_of(p)),
                    all: mine
                        .iter()
                        .any(|t| t.service.is_empty() && t.workload.is_empty()),
                    services: mine
                        .iter()
                        .filter(|t| !t.service.is_empty())
                        .map(|t| t.service.clone())
                        .collect(),
                    workloads: mine
                        .iter()
                        .filter(|t| !t.workload.is_empty())
                        .map(|t| t.workload.clone())
                        .collect(),
                })
            })
            .collect();
        // Decisions name the first matching policy: keep that stable.
        policies.sort_by_key(|e| e.policy.key());
        let endpoint_bound = policies.iter().any(|e| !e.workloads.is_empty());
        Self {
            policies,
            endpoint_bound,
        }
    }

    /// Policies for a request to `service` (if it was addressed to one) or
    /// to `workload` (if addressed to one), before an endpoint is chosen.
    pub fn for_target<'a>(
        &'a self,
        service: Option<&'a str>,
        workload: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies
            .iter()
            .filter(move |e| {
                e.all
                    || service.is_some_and(|s| e.services.iter().any(|x| x == s))
                    || workload.is_some_and(|w| e.workloads.iter().any(|x| x == w))
            })
            .map(|e| &e.policy)
    }

    /// Policies bound to the chosen endpoint `workload` that
    /// [`PolicyTable::for_target`] did not already include.
    pub fn for_endpoint<'a>(
        &'a self,
        workload: &'a str,
        service: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies
            .iter()
            .filter(move |e| {
                !e.all
                    && !service.is_some_and(|s| e.services.iter().any(|x| x == s))
                    && e.workloads.iter().any(|x| x == workload)
            })
            .map(|e| &e.policy)
    }

    pub fn has_endpoint_policies(&self) -> bool {
        self.endpoint_bound
    }
}

/// The resource as the engine's input. Unknown enum values fail closed: an
/// action the proto does not know is enforced as an ALLOW without rules.
fn spec_of(p: &pb::WaypointPolicy) -> PolicySpec {
    let action = match pb::PolicyAction::try_from(p.action) {
        Ok(pb::PolicyAction::Allow) => ActionSpec::Allow,
        Ok(pb::PolicyAction::Deny) => ActionSpec::Deny,
        Ok(pb::PolicyAction::Audit) => ActionSpec::Audit,
        Ok(pb::PolicyAction::Custom) => ActionSpec::Custom,
        Err(_) => {
            return PolicySpec {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                action: ActionSpec::Allow,
                rules: Vec::new(),
            };
        }
    };
    PolicySpec {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        action,
        rules: p
            .rules
            .iter()
            .map(|r| RuleSpec {
                from: r
                    .from
                    .iter()
                    .map(|s| SourceSpec {
                        principals: s.principals.clone(),
                        not_principals: s.not_principals.clone(),
                        request_principals: s.request_principals.clone(),
                        not_request_principals: s.not_request_principals.clone(),
                        namespaces: s.namespaces.clone(),
                        not_namespaces: s.not_namespaces.clone(),
                        service_accounts: s.service_accounts.clone(),
                        not_service_accounts: s.not_service_accounts.clone(),
                        ip_blocks: s.ip_blocks.clone(),
                        not_ip_blocks: s.not_ip_blocks.clone(),
                        remote_ip_blocks: s.remote_ip_blocks.clone(),
                        not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|o| OperationSpec {
                        hosts: o.hosts.clone(),
                        not_hosts: o.not_hosts.clone(),
                        ports: o.ports.clone(),
                        not_ports: o.not_ports.clone(),
                        methods: o.methods.clone(),
                        not_methods: o.not_methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                    })
                    .collect(),
                when: r
                    .when
                    .iter()
                    .map(|c| ConditionSpec {
                        key: c.key.clone(),
                        values: c.values.clone(),
                        not_values: c.not_values.clone(),
                    })
                    .collect(),
                unrecognized: r.unrecognized.clone(),
            })
            .collect(),
    }
}
