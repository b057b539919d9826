//! Namespaces: their labels enroll pods (`istio.io/dataplane-mode`) and pick
//! a default waypoint (`istio.io/use-waypoint`) for everything inside.

use k8s_openapi::api::core::v1::Namespace;

use super::selector::Labels;
use super::{Dependent, Key, MeshIndex, ObjectKey};

#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct NamespaceState {
    pub(super) labels: Labels,
}

impl MeshIndex {
    pub(super) fn ingest_namespace(&mut self, name: &str, ns: &Namespace) {
        let state = NamespaceState {
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        };
        if self.namespaces.get(name) == Some(&state) {
            return;
        }
        self.namespaces.insert(name.to_string(), state);
        self.namespace_changed(name);
    }

    pub(super) fn remove_namespace(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.namespace_changed(name);
        }
    }

    fn namespace_changed(&mut self, name: &str) {
        // Enrollment, the default waypoint and admission by waypoints that
        // select namespaces by label all hang on these labels, for every pod
        // and service in the namespace.
        if let Some(pods) = self.pods_by_ns.get(name) {
            self.dirty
                .pods
                .extend(pods.iter().map(|p| Key::new(name, p)));
        }
        if let Some(services) = self.services_by_ns.get(name) {
            self.dirty
                .services
                .extend(services.iter().map(|s| Key::new(name, s)));
        }
        self.dirty.namespaces.insert(name.to_string());
    }

    /// Refreshes the namespace's own status: problems with the waypoint its
    /// label names. (Pods and services report problems with their own
    /// labels; reporting a namespace-wide mistake once per pod would drown
    /// it.)
    pub(super) fn recompute_namespace(&mut self, name: &str) {
        let (dep, problem) = match self.namespace_labels(name) {
            Some(labels) => self.namespace_waypoint_check(name, labels),
            None => (None, None),
        };
        let old = self.namespace_waypoint.remove(name);
        if let Some(dep) = &dep {
            self.namespace_waypoint
                .insert(name.to_string(), dep.clone());
        }
        self.set_waypoint_dependency(Dependent::Namespace(name.to_string()), old, dep.as_ref());
        self.set_status(ObjectKey::namespace(name), problem.into_iter().collect());
    }
}
