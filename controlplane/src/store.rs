//! The shared, current mesh model and what its sources reported.
//!
//! Sources write through [`MeshStore`]; readers (the REST API, the CA's
//! node check, the xDS server) take a short read lock and copy out what they
//! need. No lock is ever held across I/O.

use std::sync::{Arc, RwLock};

use meshbox_certs::SpiffeId;
use tokio::sync::watch;

use crate::ca::NodeRoster;
use crate::model::{Changes, Kind, MeshConfig, MeshIndex, Object, ObjectKey};
use crate::source::manifests::ManifestError;

pub struct MeshStore {
    index: RwLock<MeshIndex>,
    source_errors: RwLock<Vec<ManifestError>>,
    /// Bumped after every change that altered a derived resource; the
    /// receivers learn *that* something changed and ask for *what*.
    changed: watch::Sender<(u64, Arc<Changes>)>,
}

impl MeshStore {
    pub fn new(config: MeshConfig) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::new(MeshIndex::new(config)),
            source_errors: RwLock::new(Vec::new()),
            changed: watch::channel((0, Arc::new(Changes::default()))).0,
        })
    }

    pub fn replace_all(&self, objects: Vec<Object>) -> Arc<Changes> {
        self.write(|index| index.replace_all(objects))
    }

    /// Makes `objects` all the objects of `kind` (a watcher's relist).
    pub fn replace_kind(&self, kind: Kind, objects: Vec<Object>) -> Arc<Changes> {
        self.write(|index| index.replace_kind(kind, objects))
    }

    pub fn apply(&self, object: Object) -> Arc<Changes> {
        self.write(|index| index.apply(object))
    }

    pub fn delete(&self, key: ObjectKey) -> Arc<Changes> {
        self.write(|index| index.delete(key))
    }

    fn write(&self, f: impl FnOnce(&mut MeshIndex) -> Changes) -> Arc<Changes> {
        let changes = {
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            Arc::new(f(&mut index))
        };
        if !changes.is_empty() {
            self.changed.send_modify(|(generation, last)| {
                *generation += 1;
                *last = changes.clone();
            });
        }
        changes
    }

    /// Runs `f` under a read lock; keep it short and free of I/O.
    pub fn read<R>(&self, f: impl FnOnce(&MeshIndex) -> R) -> R {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        f(&index)
    }

    pub fn subscribe(&self) -> watch::Receiver<(u64, Arc<Changes>)> {
        self.changed.subscribe()
    }

    pub fn set_source_errors(&self, errors: Vec<ManifestError>) {
        *self
            .source_errors
            .write()
            .unwrap_or_else(|p| p.into_inner()) = errors;
    }

    pub fn source_errors(&self) -> Vec<ManifestError> {
        self.source_errors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl NodeRoster for MeshStore {
    fn has_identity_on_node(&self, node: &str, identity: &SpiffeId) -> bool {
        let identity = identity.to_string();
        self.read(|index| index.has_identity_on_node(node, &identity))
    }
}
