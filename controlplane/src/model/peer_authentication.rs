//! PeerAuthentications, converted into the `Authorization` resources node
//! proxies enforce, the way istiod converts them for ztunnel:
//!
//! - Levels: mesh (root namespace, no selector), namespace (no selector)
//!   and workload (a selector with labels, outside the root namespace —
//!   istiod ignores selector policies in the root namespace for ambient
//!   workloads, and so do we). At each level the oldest policy
//!   (`creationTimestamp`, then namespace/name) wins.
//! - The inherited mode: the namespace policy's mode unless it is UNSET,
//!   else the mesh policy's; STRICT or not. A workload policy's STRICT
//!   makes it STRICT, PERMISSIVE or DISABLE make it not, UNSET inherits.
//! - A STRICT workload lists `{root}/istio_converted_static_strict`: DENY
//!   every connection without a peer identity.
//! - A workload policy with `portLevelMtls` becomes
//!   `{ns}/converted_peer_authentication_{name}` (DENY, WORKLOAD_SELECTOR):
//!   when its effective mode is STRICT and some ports are PERMISSIVE or
//!   DISABLE, one rule "no peer identity AND the port is none of those"
//!   (listed instead of the static policy); when it is not STRICT and some
//!   ports are STRICT, one rule per such port, "no peer identity AND this
//!   port". A workload that the policy governs lists it.
//!
//! Where istiod's two halves (what the workload lists, what the converted
//! policy holds) disagree about the inherited mode, this module uses the
//! one effective mode for both, so a listed policy always exists and says
//! what the PeerAuthentication says. See the README for the cases.
//!
//! Bad input fails closed: a mode that is not one of the four is STRICT; a
//! `portLevelMtls` entry that names no port (or sits on a policy without a
//! selector, which Istio refuses) cannot be applied per port, so when it
//! asks for STRICT the whole policy is STRICT. Each is reported.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use meshbox_proto::security::{
    Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match::MatchType,
};

use super::selector::{Labels, selects};
use super::{Key, MeshIndex, ObjectKey, concat, index_insert, index_remove};
use crate::k8s::{MutualTls, PeerAuthentication};

/// Name of the shared DENY-without-identity policy, in the root namespace.
/// `_` cannot appear in a Kubernetes name, so it never collides with a
/// user's AuthorizationPolicy.
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
/// Prefix of a converted workload PeerAuthentication's policy name.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    /// A value that is none of the four is an error holding it.
    fn parse(mode: Option<&MutualTls>) -> Result<Self, String> {
        match mode.and_then(|m| m.mode.as_deref()) {
            None | Some("") | Some("UNSET") => Ok(Self::Unset),
            Some("DISABLE") => Ok(Self::Disable),
            Some("PERMISSIVE") => Ok(Self::Permissive),
            Some("STRICT") => Ok(Self::Strict),
            Some(other) => Err(other.to_string()),
        }
    }

    fn is_exempt(self) -> bool {
        matches!(self, Self::Permissive | Self::Disable)
    }
}

/// One PeerAuthentication, reduced to what the conversion reads.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PeerAuthState {
    /// `None` (a manifest without a timestamp) counts as newest.
    created: Option<Time>,
    /// Non-empty labels; `None` for a namespace or mesh policy.
    selector: Option<Labels>,
    mode: MtlsMode,
    /// Valid ports only.
    ports: BTreeMap<u32, MtlsMode>,
    messages: Vec<String>,
}

impl PeerAuthState {
    fn from_object(pa: &PeerAuthentication, in_root: bool) -> Self {
        let spec = &pa.spec;
        let mut messages = Vec::new();
        let selector = spec
            .selector
            .as_ref()
            .map(|s| &s.match_labels)
            .filter(|l| !l.is_empty())
            .cloned();
        let mut mode = match MtlsMode::parse(spec.mtls.as_ref()) {
            Ok(m) => m,
            Err(bad) => {
                messages.push(format!(
                    "mtls.mode {bad:?} is not UNSET, DISABLE, PERMISSIVE or STRICT; treated as STRICT (fail closed) until fixed"
                ));
                MtlsMode::Strict
            }
        };
        // Port settings that cannot be applied per port; when one asks for
        // STRICT, only a STRICT policy honours it.
        let mut unplaceable_strict = Vec::new();
        let mut ports = BTreeMap::new();
        for (key, setting) in &spec.port_level_mtls {
            let port_mode = match MtlsMode::parse(Some(setting)) {
                Ok(m) => m,
                Err(bad) => {
                    messages.push(format!(
                        "portLevelMtls[{key}].mode {bad:?} is not UNSET, DISABLE, PERMISSIVE or STRICT; treated as STRICT (fail closed) until fixed"
                    ));
                    MtlsMode::Strict
                }
            };
            match key.trim().parse::<u64>() {
                Ok(port) if (1..=65535).contains(&port) => {
                    if selector.is_some() {
                        ports.insert(port as u32, port_mode);
                    } else if port_mode == MtlsMode::Strict {
                        unplaceable_strict.push(key.clone());
                    }
                }
                // No connection can reach such a port: ignoring it opens
                // nothing.
                Ok(_) => messages.push(format!(
                    "portLevelMtls key {key:?} is not a port (1-65535); ignored"
                )),
                Err(_) => {
                    if port_mode == MtlsMode::Strict {
                        unplaceable_strict.push(key.clone());
                    }
                    messages.push(format!(
                        "portLevelMtls key {key:?} is not a port number (1-65535); ignored"
                    ));
                }
            }
        }
        if selector.is_none() && !spec.port_level_mtls.is_empty() {
            messages.push(
                "portLevelMtls needs a workload selector (Istio refuses this object); port settings ignored"
                    .to_string(),
            );
        }
        if !unplaceable_strict.is_empty() && mode != MtlsMode::Strict {
            messages.push(format!(
                "STRICT asked for on {} cannot be applied per port, so the whole policy is treated as STRICT (fail closed) until fixed",
                unplaceable_strict.join(", ")
            ));
            mode = MtlsMode::Strict;
        }
        if in_root && selector.is_some() {
            messages.push(
                "a workload selector in the root namespace is ignored for ambient workloads (as istiod does); use the workloads' own namespace"
                    .to_string(),
            );
        }
        Self {
            created: pa.metadata.creation_timestamp.clone(),
            selector,
            mode,
            ports,
            messages,
        }
    }

    /// Whether this policy wins over `other` at the same level.
    fn older_than(&self, key: &Key, other: &PeerAuthState, other_key: &Key) -> bool {
        let rank = |s: &PeerAuthState| (s.created.is_none(), s.created.clone());
        (rank(self), key) < (rank(other), other_key)
    }
}

/// The mode a workload inherits from its mesh and namespace policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Inherited {
    strict: bool,
}

impl MeshIndex {
    pub(super) fn ingest_peer_authentication(&mut self, key: Key, pa: &PeerAuthentication) {
        let in_root = key.ns == self.config.root_namespace;
        let state = PeerAuthState::from_object(pa, in_root);
        if self.peer_auths.get(&key) == Some(&state) {
            return;
        }
        let messages = state.messages.clone();
        if self.peer_auths.insert(key.clone(), state).is_none() {
            index_insert(&mut self.peer_auths_by_ns, &key.ns, key.name.clone());
        }
        self.set_status(ObjectKey::peer_authentication(&key.ns, &key.name), messages);
        self.peer_auth_changed(&key);
    }

    pub(super) fn remove_peer_authentication(&mut self, key: &Key) {
        if self.peer_auths.remove(key).is_none() {
            return;
        }
        index_remove(&mut self.peer_auths_by_ns, &key.ns, &key.name);
        self.set_status(
            ObjectKey::peer_authentication(&key.ns, &key.name),
            Vec::new(),
        );
        self.put_authorization(converted_name(key), None);
        self.peer_auth_changed(key);
    }

    /// Rebuilds what a change of the PeerAuthentication `key` can affect:
    /// the converted policies and the workloads of its namespace, or of the
    /// whole mesh for the root namespace.
    fn peer_auth_changed(&mut self, key: &Key) {
        let root = self.config.root_namespace.clone();
        let namespaces: Vec<String> = if key.ns == root {
            self.peer_auths_by_ns.keys().cloned().collect()
        } else {
            vec![key.ns.clone()]
        };
        for ns in &namespaces {
            self.recompute_conversions(ns);
        }
        if key.ns == root {
            self.dirty.pods.extend(self.pods.keys().cloned());
        } else if let Some(names) = self.pods_by_ns.get(&key.ns) {
            let pods: Vec<Key> = names.iter().map(|n| Key::new(&key.ns, n)).collect();
            self.dirty.pods.extend(pods);
        }
        // Served while any PeerAuthentication exists, as istiod does, so it
        // is there by the time a workload lists it.
        let static_strict = (!self.peer_auths.is_empty()).then(|| static_strict(&root));
        self.put_authorization(concat(&[&root, "/", STATIC_STRICT_POLICY]), static_strict);
    }

    fn recompute_conversions(&mut self, ns: &str) {
        let names: Vec<String> = self
            .peer_auths_by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let inherited = self.inherited(ns);
        for name in names {
            let key = Key::new(ns, &name);
            let converted = self
                .peer_auths
                .get(&key)
                .and_then(|pa| self.convert(&key, pa, inherited));
            self.put_authorization(converted_name(&key), converted);
        }
    }

    /// The oldest policy of `ns` that `filter` accepts.
    fn oldest_peer_auth(
        &self,
        ns: &str,
        filter: impl Fn(&PeerAuthState) -> bool,
    ) -> Option<(Key, &PeerAuthState)> {
        let mut best: Option<(Key, &PeerAuthState)> = None;
        for name in self.peer_auths_by_ns.get(ns).into_iter().flatten() {
            let key = Key::new(ns, name);
            let Some(pa) = self.peer_auths.get(&key).filter(|pa| filter(pa)) else {
                continue;
            };
            if best
                .as_ref()
                .is_none_or(|(bk, bpa)| pa.older_than(&key, bpa, bk))
            {
                best = Some((key, pa));
            }
        }
        best
    }

    fn inherited(&self, ns: &str) -> Inherited {
        let root = self.config.root_namespace.as_str();
        let level_mode = |ns: &str| {
            self.oldest_peer_auth(ns, |pa| pa.selector.is_none())
                .map(|(_, pa)| pa.mode)
        };
        let mesh = level_mode(root);
        let namespace = if ns == root { None } else { level_mode(ns) };
        let mode = match namespace {
            Some(m) if m != MtlsMode::Unset => Some(m),
            _ => mesh,
        };
        Inherited {
            strict: mode == Some(MtlsMode::Strict),
        }
    }

    /// The workload policy `key`'s converted form, if it needs one.
    fn convert(
        &self,
        key: &Key,
        pa: &PeerAuthState,
        inherited: Inherited,
    ) -> Option<Authorization> {
        if pa.selector.is_none() || key.ns == self.config.root_namespace || pa.ports.is_empty() {
            return None;
        }
        let top_strict = match pa.mode {
            MtlsMode::Strict => true,
            MtlsMode::Unset => inherited.strict,
            MtlsMode::Permissive | MtlsMode::Disable => false,
        };
        let rules = if top_strict {
            let exempt: Vec<u32> = pa
                .ports
                .iter()
                .filter(|(_, m)| m.is_exempt())
                .map(|(p, _)| *p)
                .collect();
            if exempt.is_empty() {
                return None;
            }
            // The identity requirement comes first when the policy itself
            // says STRICT and last when STRICT is inherited — both when
            // both hold. The repeat changes nothing but keeps the resource
            // byte-identical to istiod's.
            let mut clauses = Vec::new();
            if pa.mode == MtlsMode::Strict {
                clauses.push(one_match(no_identity()));
            }
            clauses.extend(exempt.into_iter().map(|port| {
                one_match(Match {
                    not_destination_ports: vec![port],
                    ..Default::default()
                })
            }));
            if inherited.strict {
                clauses.push(one_match(no_identity()));
            }
            vec![Rule { clauses }]
        } else {
            let rules: Vec<Rule> = pa
                .ports
                .iter()
                .filter(|(_, m)| **m == MtlsMode::Strict)
                .map(|(port, _)| Rule {
                    clauses: vec![one_match(Match {
                        destination_ports: vec![*port],
                        ..no_identity()
                    })],
                })
                .collect();
            if rules.is_empty() {
                return None;
            }
            rules
        };
        Some(Authorization {
            name: concat(&[CONVERTED_PREFIX, &key.name]),
            namespace: key.ns.clone(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules,
            dry_run: false,
            extensions: Vec::new(),
        })
    }

    /// The PeerAuthentication-derived policies a workload in `ns` with
    /// `labels` lists, as `{namespace}/{name}`.
    pub(super) fn peer_auth_policies(&self, ns: &str, labels: &Labels) -> Vec<String> {
        if self.peer_auths.is_empty() {
            return Vec::new();
        }
        let root = self.config.root_namespace.as_str();
        let inherited = self.inherited(ns);
        let static_name = || concat(&[root, "/", STATIC_STRICT_POLICY]);
        let workload = if ns == root {
            None
        } else {
            self.oldest_peer_auth(ns, |pa| {
                pa.selector.as_ref().is_some_and(|s| selects(s, labels))
            })
        };
        let Some((key, pa)) = workload else {
            return if inherited.strict {
                vec![static_name()]
            } else {
                Vec::new()
            };
        };
        let top_strict = match pa.mode {
            MtlsMode::Strict => true,
            MtlsMode::Unset => inherited.strict,
            MtlsMode::Permissive | MtlsMode::Disable => false,
        };
        // The converted policy, when there is one, carries everything
        // (it includes the identity requirement when STRICT).
        if self.convert(&key, pa, inherited).is_some() {
            vec![converted_name(&key)]
        } else if top_strict {
            vec![static_name()]
        } else {
            Vec::new()
        }
    }

    /// Which PeerAuthentications a served policy was converted from: the
    /// workload policy of a converted one; for the static STRICT policy,
    /// every PeerAuthentication whose mode is STRICT. Empty for
    /// AuthorizationPolicies.
    pub fn peer_authentication_origins(&self, policy: &str) -> Vec<ObjectKey> {
        let Some((ns, name)) = policy.split_once('/') else {
            return Vec::new();
        };
        if ns == self.config.root_namespace && name == STATIC_STRICT_POLICY {
            let mut out: BTreeSet<ObjectKey> = BTreeSet::new();
            for (key, pa) in &self.peer_auths {
                let ignored = pa.selector.is_some() && key.ns == self.config.root_namespace;
                if pa.mode == MtlsMode::Strict && !ignored {
                    out.insert(ObjectKey::peer_authentication(&key.ns, &key.name));
                }
            }
            return out.into_iter().collect();
        }
        match name.strip_prefix(CONVERTED_PREFIX) {
            Some(pa) if self.peer_auths.contains_key(&Key::new(ns, pa)) => {
                vec![ObjectKey::peer_authentication(ns, pa)]
            }
            _ => Vec::new(),
        }
    }
}

fn converted_name(key: &Key) -> String {
    concat(&[&key.ns, "/", CONVERTED_PREFIX, &key.name])
}

fn no_identity() -> Match {
    Match {
        not_principals: vec![StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        ..Default::default()
    }
}

fn one_match(m: Match) -> Clause {
    Clause { matches: vec![m] }
}

fn static_strict(root: &str) -> Authorization {
    Authorization {
        name: STATIC_STRICT_POLICY.to_string(),
        namespace: root.to_string(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![one_match(no_identity())],
        }],
        dry_run: false,
        extensions: Vec::new(),
    }
}
