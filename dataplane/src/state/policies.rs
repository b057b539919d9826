//! The policies the proxy knows, indexed by key and by the scopes that
//! apply them implicitly (GLOBAL, NAMESPACE), and the lookup
//! `authz` evaluates them through.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tracing::debug;

use super::policy::{Policy, Scope};

/// Access to the policies known to the proxy.
pub trait PolicyLookup {
    /// The policy published under `key` (`{namespace}/{name}`).
    fn policy(&self, key: &str) -> Option<&Policy>;
    /// Every GLOBAL policy and the NAMESPACE policies of `namespace`.
    fn scoped_policies(&self, namespace: &str) -> Vec<&Policy>;
}

/// The policies, by key and by the scopes that apply them implicitly.
#[derive(Debug, Default)]
pub struct PolicyStore {
    by_key: BTreeMap<String, Policy>,
    global: BTreeSet<String>,
    by_namespace: HashMap<String, BTreeSet<String>>,
}

impl PolicyStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the policy under its key.
    pub fn insert(&mut self, policy: Policy) {
        // The scope (or namespace) may have changed: unindex the old one.
        self.remove(&policy.key);
        match policy.scope {
            Scope::Global => {
                self.global.insert(policy.key.clone());
            }
            Scope::Namespace => {
                self.by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .insert(policy.key.clone());
            }
            // Applied only where a workload lists it.
            Scope::WorkloadSelector => {}
        }
        debug!(policy = %policy.key, scope = ?policy.scope, action = ?policy.action, dry_run = policy.dry_run, "policy applied");
        self.by_key.insert(policy.key.clone(), policy);
    }

    pub fn remove(&mut self, key: &str) -> Option<Policy> {
        let old = self.by_key.remove(key)?;
        match old.scope {
            Scope::Global => {
                self.global.remove(key);
            }
            Scope::Namespace => {
                if let Some(set) = self.by_namespace.get_mut(&old.namespace) {
                    set.remove(key);
                    if set.is_empty() {
                        self.by_namespace.remove(&old.namespace);
                    }
                }
            }
            Scope::WorkloadSelector => {}
        }
        debug!(policy = %key, "policy removed");
        Some(old)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

impl PolicyLookup for PolicyStore {
    fn policy(&self, key: &str) -> Option<&Policy> {
        self.by_key.get(key)
    }

    fn scoped_policies(&self, namespace: &str) -> Vec<&Policy> {
        self.global
            .iter()
            .chain(self.by_namespace.get(namespace).into_iter().flatten())
            .filter_map(|k| self.by_key.get(k))
            .collect()
    }
}
