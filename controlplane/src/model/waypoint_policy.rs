//! AuthorizationPolicies as waypoints enforce them: the
//! `meshbox.v1.WaypointPolicy` resources, and what changes for node proxies
//! when a waypoint takes over a policy's HTTP rules.
//!
//! Which policies apply at a waypoint (Istio's rules for `targetRefs`):
//! - `targetRefs` (or the older `targetRef`) to a `Gateway`
//!   (`gateway.networking.k8s.io`) of a waypoint class in the policy's own
//!   namespace: every request through that waypoint → target
//!   `{waypoint: "ns/gw"}`.
//! - to a `GatewayClass` of a waypoint class, from the root namespace only:
//!   every waypoint of that class.
//! - to a `Service` (group `""` or `core`) in the policy's namespace that
//!   uses a waypoint: requests for that Service through its waypoint →
//!   `{waypoint, service: "{ns}/{hostname}"}`.
//! - A ref to another namespace, to a `ServiceEntry` (meshbox reads none) or
//!   to anything else, and a ref that resolves to nothing (the Gateway or
//!   Service does not exist, is not a waypoint, has no waypoint) gives no
//!   target and is reported in the policy's status. A policy whose refs
//!   all resolve to nothing is not sent at all.
//! - `selector` policies do not apply at a waypoint as written (Istio: a
//!   waypoint ignores them); the one exception is below.
//!
//! The rules go as written: `from`/`to`/`when` are copied field by field,
//! patterns untouched, and the waypoint checks them (an invalid value fails
//! closed there). A field the control plane parsed but the wire type has
//! no place for (a newer Istio's field, at any level) is listed in the
//! rule's `unrecognized`, with its path, so the waypoint fails the rule
//! closed. The action goes as written (`ALLOW`, `DENY`, `AUDIT`, `CUSTOM`);
//! an unknown action is sent as an `ALLOW` without rules, which denies
//! every request the policy applies to, and reported. A dry-run policy
//! (`istio.io/dry-run`) is sent as `AUDIT`: it must not change a decision.
//!
//! Selector and namespace-wide policies with HTTP rules, on workloads with
//! a waypoint. Node proxies cannot enforce HTTP attributes: an `ALLOW` rule
//! using them is left out and a `DENY` rule using them is reduced to its
//! L4 part (see the policy module). When such a policy (scope `NAMESPACE`
//! or `WORKLOAD_SELECTOR`; mesh-wide ones are not) applies to workloads that
//! use a waypoint for workload traffic (`istio.io/use-waypoint` to a
//! waypoint with `istio.io/waypoint-for: workload` or `all`), the control
//! plane stops cutting it for the traffic that waypoint carries:
//! - it is also sent as a `WaypointPolicy`, with a target
//!   `{waypoint, workload: uid}` for each such workload, and
//!   `{waypoint, service}` for each Service whose waypoint that is and that
//!   has an endpoint the policy applies to (so a request the waypoint
//!   carries to such an endpoint is always judged there);
//! - the `Authorization` node proxies get changes, per affected waypoint
//!   identity (`{trust domain}/ns/{gateway ns}/sa/{gateway name}`, the
//!   identity the waypoint connects with): an `ALLOW` gains one rule
//!   admitting those principals (the waypoint has enforced the HTTP rules
//!   in full); in a `DENY`, each rule reduced to L4 gains a clause
//!   `notPrincipals: [those principals]`, so traffic through the waypoint
//!   is judged there, precisely, while traffic that bypasses the waypoint
//!   is still denied broadly (fail closed).
//!
//! Both are said in the policy's status, and `/api/v1/policies` shows where
//! each policy is enforced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use meshbox_proto::meshbox as pb;
use meshbox_proto::security::{
    Authorization, Clause, Match, Rule, StringMatch, string_match::MatchType,
};

use super::policy::{ALLOW_ALL_CUT, Listing};
use super::{Key, MeshIndex, ObjectKey, index_insert, index_remove};
use crate::k8s::{self, AuthorizationPolicy};

const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// What a `targetRef` names, once checked on its own.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TargetRef {
    Gateway(Key),
    GatewayClass(String),
    Service(Key),
}

/// The waypoint's side of one policy, as far as the policy alone decides.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct WaypointSpec {
    action: pb::PolicyAction,
    rules: Vec<pb::PolicyRule>,
    /// Written with `targetRef(s)`, usable or not: then only waypoints
    /// enforce it.
    targeted: bool,
    /// `spec.action` as written (`ALLOW` when absent), for people.
    written_action: String,
    /// Empty for selector and namespace-wide policies.
    pub(super) refs: Vec<TargetRef>,
    /// Problems with the refs and the action (targetRef policies only:
    /// the node-proxy translation reports the rest).
    messages: Vec<String>,
}

impl WaypointSpec {
    pub(super) fn from_policy(policy: &AuthorizationPolicy, ns: &str, root_ns: &str) -> Self {
        let spec = &policy.spec;
        let mut messages = Vec::new();
        let dry_run = policy
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DRY_RUN_ANNOTATION))
            .is_some_and(|v| v == "true");
        let (action, keep_rules) = match spec.action.as_deref() {
            None | Some("") | Some("ALLOW") => (pb::PolicyAction::Allow, true),
            Some("DENY") => (pb::PolicyAction::Deny, true),
            Some("AUDIT") => (pb::PolicyAction::Audit, true),
            Some("CUSTOM") => {
                messages.push(
                    "CUSTOM: meshbox has no external authorizer; waypoints enforce it as a DENY of what its rules select"
                        .to_string(),
                );
                (pb::PolicyAction::Custom, true)
            }
            Some(other) => {
                messages.push(format!(
                    "action {other:?} is not ALLOW, DENY, AUDIT or CUSTOM; failing closed: waypoints deny every request this policy applies to"
                ));
                (pb::PolicyAction::Allow, false)
            }
        };
        let action = if dry_run && keep_rules {
            messages.push(
                "dry-run (istio.io/dry-run): waypoints get it as AUDIT, which never changes a decision"
                    .to_string(),
            );
            pb::PolicyAction::Audit
        } else {
            action
        };
        let spec_unknown: Vec<String> = spec.other.keys().map(|f| format!("spec.{f}")).collect();
        let rules = if keep_rules {
            spec.rules
                .iter()
                .map(|r| waypoint_rule(r, &spec_unknown))
                .collect()
        } else {
            Vec::new()
        };

        let written: Vec<&k8s::PolicyTargetReference> = spec
            .target_ref
            .iter()
            .chain(spec.target_refs.iter())
            .collect();
        if !written.is_empty()
            && spec
                .selector
                .as_ref()
                .is_some_and(|s| !s.match_labels.is_empty())
        {
            messages.push(
                "both selector and targetRefs are set (Istio refuses that); the selector is ignored"
                    .to_string(),
            );
        }
        let mut refs = Vec::new();
        for (i, r) in written.iter().enumerate() {
            match target_ref(r, ns, root_ns) {
                Ok(t) => {
                    if !refs.contains(&t) {
                        refs.push(t);
                    }
                }
                Err(why) => messages.push(format!("targetRefs[{i}]: {why}; no target")),
            }
        }
        if !written.is_empty() && refs.is_empty() {
            messages.push("no targetRef can be used: no waypoint enforces this policy".to_string());
        }
        Self {
            action,
            rules,
            targeted: !written.is_empty(),
            written_action: spec
                .action
                .clone()
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| "ALLOW".to_string()),
            refs,
            messages,
        }
    }
}

fn target_ref(
    r: &k8s::PolicyTargetReference,
    ns: &str,
    root_ns: &str,
) -> Result<TargetRef, String> {
    let what = format!("{} {:?} (group {:?})", r.kind, r.name, r.group);
    if let Some(other) = r.namespace.as_deref().filter(|n| !n.is_empty() && *n != ns) {
        return Err(format!(
            "{what} is in namespace {other}; a targetRef must name an object in the policy's own namespace"
        ));
    }
    if r.name.is_empty() {
        return Err(format!("{what} has no name"));
    }
    match (r.group.as_str(), r.kind.as_str()) {
        (GATEWAY_GROUP, "Gateway") => Ok(TargetRef::Gateway(Key::new(ns, &r.name))),
        (GATEWAY_GROUP, "GatewayClass") => {
            if ns == root_ns {
                Ok(TargetRef::GatewayClass(r.name.clone()))
            } else {
                Err(format!(
                    "{what}: a policy bound to a GatewayClass must be in the root namespace ({root_ns})"
                ))
            }
        }
        ("" | "core", "Service") => Ok(TargetRef::Service(Key::new(ns, &r.name))),
        ("networking.istio.io", "ServiceEntry") => Err(format!(
            "{what}: meshbox does not read ServiceEntry objects"
        )),
        _ => Err(format!(
            "{what} is not a kind a waypoint policy can target (Gateway, GatewayClass, Service)"
        )),
    }
}

/// One rule as written, plus the paths of fields the wire type cannot
/// carry.
fn waypoint_rule(rule: &k8s::Rule, spec_unknown: &[String]) -> pb::PolicyRule {
    let mut unrecognized: Vec<String> = spec_unknown.to_vec();
    unrecognized.extend(rule.other.keys().cloned());
    let mut from = Vec::new();
    for (i, f) in rule.from.iter().enumerate() {
        unrecognized.extend(f.other.keys().map(|k| format!("from[{i}].{k}")));
        let s = f.source.clone().unwrap_or_default();
        unrecognized.extend(s.other.keys().map(|k| format!("from[{i}].source.{k}")));
        from.push(pb::PolicySource {
            principals: s.principals,
            not_principals: s.not_principals,
            request_principals: s.request_principals,
            not_request_principals: s.not_request_principals,
            namespaces: s.namespaces,
            not_namespaces: s.not_namespaces,
            service_accounts: s.service_accounts,
            not_service_accounts: s.not_service_accounts,
            ip_blocks: s.ip_blocks,
            not_ip_blocks: s.not_ip_blocks,
            remote_ip_blocks: s.remote_ip_blocks,
            not_remote_ip_blocks: s.not_remote_ip_blocks,
        });
    }
    let mut to = Vec::new();
    for (i, t) in rule.to.iter().enumerate() {
        unrecognized.extend(t.other.keys().map(|k| format!("to[{i}].{k}")));
        let o = t.operation.clone().unwrap_or_default();
        unrecognized.extend(o.other.keys().map(|k| format!("to[{i}].operation.{k}")));
        to.push(pb::PolicyOperation {
            hosts: o.hosts,
            not_hosts: o.not_hosts,
            ports: o.ports,
            not_ports: o.not_ports,
            methods: o.methods,
            not_methods: o.not_methods,
            paths: o.paths,
            not_paths: o.not_paths,
        });
    }
    let mut when = Vec::new();
    for (i, c) in rule.when.iter().enumerate() {
        unrecognized.extend(c.other.keys().map(|k| format!("when[{i}].{k}")));
        when.push(pb::PolicyCondition {
            key: c.key.clone(),
            values: c.values.clone(),
            not_values: c.not_values.clone(),
        });
    }
    pb::PolicyRule {
        from,
        to,
        when,
        unrecognized,
    }
}

/// `{trust domain}/ns/{ns}/sa/{name}`: the identity a waypoint's Gateway
/// runs as (its service account is the Gateway's name), as policies write
/// principals.
fn waypoint_principal(trust_domain: &str, gateway: &Key) -> String {
    format!("{trust_domain}/ns/{}/sa/{}", gateway.ns, gateway.name)
}

fn exact(v: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Exact(v.to_string())),
    }
}

/// The node proxies' Authorization once the waypoints with `principals`
/// enforce the policy's HTTP rules (see the module docs).
fn lift(auth: &mut Authorization, principals: &[String], reduced_deny_rules: &[usize]) {
    let matches = |not: bool| {
        let list: Vec<StringMatch> = principals.iter().map(|p| exact(p)).collect();
        let m = if not {
            Match {
                not_principals: list,
                ..Default::default()
            }
        } else {
            Match {
                principals: list,
                ..Default::default()
            }
        };
        Clause { matches: vec![m] }
    };
    match meshbox_proto::security::Action::try_from(auth.action) {
        Ok(meshbox_proto::security::Action::Allow) => auth.rules.push(Rule {
            clauses: vec![matches(false)],
        }),
        Ok(meshbox_proto::security::Action::Deny) => {
            for &i in reduced_deny_rules {
                if let Some(rule) = auth.rules.get_mut(i) {
                    rule.clauses.push(matches(true));
                }
            }
        }
        _ => {}
    }
}

/// One policy's outputs.
struct Derived {
    authorization: Option<Authorization>,
    waypoint_policy: Option<pb::WaypointPolicy>,
    messages: Vec<String>,
}

impl MeshIndex {
    pub(super) fn index_policy_targets(&mut self, key: &Key, spec: &WaypointSpec) {
        for r in &spec.refs {
            match r {
                TargetRef::Gateway(g) => {
                    index_insert(&mut self.policies_by_gateway, g, key.clone())
                }
                TargetRef::Service(s) => {
                    index_insert(&mut self.policies_by_service, s, key.clone())
                }
                TargetRef::GatewayClass(_) => {
                    self.class_policies.insert(key.clone());
                }
            }
        }
    }

    pub(super) fn unindex_policy_targets(&mut self, key: &Key, spec: &WaypointSpec) {
        for r in &spec.refs {
            match r {
                TargetRef::Gateway(g) => index_remove(&mut self.policies_by_gateway, g, key),
                TargetRef::Service(s) => index_remove(&mut self.policies_by_service, s, key),
                TargetRef::GatewayClass(_) => {
                    self.class_policies.remove(key);
                }
            }
        }
    }

    /// Marks the policies whose waypoint targets a Gateway's change can
    /// move.
    pub(super) fn mark_gateway_policies(&mut self, gateway: &Key) {
        let marked: Vec<Key> = self
            .policies_by_gateway
            .get(gateway)
            .into_iter()
            .flatten()
            .chain(self.class_policies.iter())
            .cloned()
            .collect();
        self.dirty.policies.extend(marked);
    }

    /// Marks the policies a Service's rebuild can change: those that target
    /// it, and, when its waypoint changed, those that apply to its
    /// endpoints (their waypoint targets name the Service).
    pub(super) fn mark_service_policies(&mut self, service: &Key, waypoint_changed: bool) {
        let mut marked: Vec<Key> = self
            .policies_by_service
            .get(service)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        if waypoint_changed {
            for member in self.service_members.get(service).into_iter().flatten() {
                if let Some(d) = self.pod_derived.get(member) {
                    marked.extend(d.policies.iter().cloned());
                }
            }
        }
        self.dirty.policies.extend(marked);
    }

    /// Rebuilds what one policy sends to node proxies and waypoints, and
    /// its status.
    pub(super) fn recompute_policy(&mut self, key: &Key) {
        let name = key.slash_name();
        let status_key = ObjectKey::authorization_policy(&key.ns, &key.name);
        let derived = self.derive_policy(key);
        let Some(derived) = derived else {
            self.put_authorization(name.clone(), None);
            self.put_waypoint_policy(name, None);
            self.set_status(status_key, Vec::new());
            return;
        };
        self.put_authorization(name.clone(), derived.authorization);
        self.put_waypoint_policy(name, derived.waypoint_policy);
        self.set_status(status_key, derived.messages);
    }

    fn derive_policy(&self, key: &Key) -> Option<Derived> {
        let state = self.policies.get(key)?;
        let mut messages = state.translated.messages.clone();
        let mut authorization = state.translated.authorization.clone();
        // (waypoint, service, workload)
        let mut targets: BTreeSet<(String, String, String)> = BTreeSet::new();
        if state.waypoint.targeted {
            messages.extend(state.waypoint.messages.iter().cloned());
            for r in &state.waypoint.refs {
                self.resolve_target(r, &mut targets, &mut messages);
            }
        } else if state.translated.has_http_rules
            && matches!(state.listing(), Listing::Namespace | Listing::Selector(_))
            && let Some(auth) = authorization.as_mut()
        {
            let waypoints = self.lifted_targets(key, &mut targets);
            if !waypoints.is_empty() {
                let principals: Vec<String> = waypoints
                    .iter()
                    .map(|g| waypoint_principal(&self.config.trust_domain, g))
                    .collect();
                lift(auth, &principals, &state.translated.reduced_deny_rules);
                for m in messages.iter_mut().filter(|m| *m == ALLOW_ALL_CUT) {
                    *m = "no rule of this ALLOW policy can be enforced by node proxies: they admit only traffic its waypoint has checked (below)".to_string();
                }
                let names: Vec<String> = waypoints.iter().map(Key::slash_name).collect();
                let what = if state.waypoint.action == pb::PolicyAction::Deny {
                    "node proxies do not apply the rules reduced to L4 to traffic from that waypoint's identity, and still deny traffic that bypasses it broadly"
                } else {
                    "node proxies admit traffic from that waypoint's identity (it has enforced the HTTP rules), and still apply the other rules to traffic that bypasses it"
                };
                messages.push(format!(
                    "waypoint {} carries workload traffic for {} workload(s) this policy applies to: it enforces the policy in full, HTTP rules included, for them; {what} ({})",
                    names.join(", "),
                    targets.iter().filter(|t| !t.2.is_empty()).count(),
                    principals.join(", "),
                ));
            }
        }
        let waypoint_policy = (!targets.is_empty()).then(|| pb::WaypointPolicy {
            name: key.name.clone(),
            namespace: key.ns.clone(),
            targets: targets
                .into_iter()
                .map(|(waypoint, service, workload)| pb::PolicyTarget {
                    waypoint,
                    service,
                    workload,
                })
                .collect(),
            action: state.waypoint.action as i32,
            rules: state.waypoint.rules.clone(),
        });
        Some(Derived {
            authorization,
            waypoint_policy,
            messages,
        })
    }

    fn resolve_target(
        &self,
        r: &TargetRef,
        targets: &mut BTreeSet<(String, String, String)>,
        messages: &mut Vec<String>,
    ) {
        match r {
            TargetRef::Gateway(g) => {
                if self.is_waypoint(g) {
                    targets.insert((g.slash_name(), String::new(), String::new()));
                } else if self.gateways.contains_key(g) {
                    messages.push(format!(
                        "targetRef Gateway {g} is not of a waypoint class; no waypoint enforces the policy there"
                    ));
                } else {
                    messages.push(format!(
                        "targetRef Gateway {g} not found; no waypoint enforces the policy there"
                    ));
                }
            }
            TargetRef::GatewayClass(class) => {
                let mut found = false;
                for (g, _) in self
                    .gateways
                    .iter()
                    .filter(|(k, gw)| gw.is_waypoint_of_class(class) && self.is_waypoint(k))
                {
                    found = true;
                    targets.insert((g.slash_name(), String::new(), String::new()));
                }
                if !found {
                    messages.push(format!(
                        "targetRef GatewayClass {class}: no waypoint of that class; nothing enforces the policy there"
                    ));
                }
            }
            TargetRef::Service(s) => {
                if !self.services.contains_key(s) {
                    messages.push(format!(
                        "targetRef Service {s} not found; nothing enforces the policy there"
                    ));
                } else if let Some(g) = self.waypoint_of_service(s) {
                    targets.insert((g.slash_name(), self.service_resource_name(s), String::new()));
                } else {
                    messages.push(format!(
                        "targetRef Service {s} has no waypoint: only a waypoint enforces a targetRef policy, so nothing enforces it there"
                    ));
                }
            }
        }
    }

    /// The waypoint targets of a selector or namespace-wide policy (see the
    /// module docs); returns the waypoints involved.
    fn lifted_targets(
        &self,
        key: &Key,
        targets: &mut BTreeSet<(String, String, String)>,
    ) -> BTreeSet<Key> {
        let mut waypoints = BTreeSet::new();
        let members = self.policy_members.get(key);
        for member in members.into_iter().flatten() {
            if let Some(g) = self
                .pod_derived
                .get(member)
                .and_then(|d| d.workload_waypoint.as_ref())
            {
                targets.insert((g.slash_name(), String::new(), self.workload_uid(member)));
                waypoints.insert(g.clone());
            }
        }
        if waypoints.is_empty() {
            return waypoints;
        }
        let mut services: BTreeSet<&Key> = BTreeSet::new();
        for member in members.into_iter().flatten() {
            if let Some(d) = self.pod_derived.get(member) {
                services.extend(d.services.iter());
            }
        }
        for s in services {
            if let Some(g) = self.waypoint_of_service(s)
                && waypoints.contains(g)
            {
                targets.insert((g.slash_name(), self.service_resource_name(s), String::new()));
            }
        }
        waypoints
    }

    /// Every served `WaypointPolicy`, sorted by resource name.
    pub fn waypoint_policies(&self) -> impl Iterator<Item = (&str, &Arc<pb::WaypointPolicy>)> {
        self.waypoint_policies.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn waypoint_policy(&self, name: &str) -> Option<Arc<pb::WaypointPolicy>> {
        self.waypoint_policies.get(name).cloned()
    }

    /// Where the policy named `{namespace}/{name}` is enforced: `node
    /// proxies` when they get it, `waypoint ns/gw` for each waypoint that
    /// does.
    pub fn policy_enforcement(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.authorizations.contains_key(name) {
            out.push("node proxies".to_string());
        }
        if let Some(p) = self.waypoint_policies.get(name) {
            let waypoints: BTreeSet<&str> = p.targets.iter().map(|t| t.waypoint.as_str()).collect();
            out.extend(waypoints.into_iter().map(|w| format!("waypoint {w}")));
        }
        out
    }

    /// AuthorizationPolicies nothing enforces (AUDIT or CUSTOM without a
    /// waypoint, targetRefs that resolve to nothing), as `(namespace, name,
    /// action as written)`, sorted; `/api/v1/status` says why.
    pub fn unenforced_policies(&self) -> Vec<(String, String, String)> {
        let mut out: Vec<(String, String, String)> = self
            .policies
            .iter()
            .filter(|(key, _)| {
                let name = key.slash_name();
                !self.authorizations.contains_key(&name)
                    && !self.waypoint_policies.contains_key(&name)
            })
            .map(|(key, state)| {
                (
                    key.ns.clone(),
                    key.name.clone(),
                    state.waypoint.written_action.clone(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Waypoint → the WaypointPolicies and WaypointRoutes naming it.
    pub(super) fn waypoint_config_names(&self) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
        let mut out: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for (name, p) in &self.waypoint_policies {
            let waypoints: BTreeSet<&str> = p.targets.iter().map(|t| t.waypoint.as_str()).collect();
            for w in waypoints {
                out.entry(w.to_string()).or_default().0.push(name.clone());
            }
        }
        for (name, r) in &self.waypoint_routes {
            let waypoints: BTreeSet<&str> = r.parents.iter().map(|p| p.waypoint.as_str()).collect();
            for w in waypoints {
                out.entry(w.to_string()).or_default().1.push(name.clone());
            }
        }
        out
    }
}
