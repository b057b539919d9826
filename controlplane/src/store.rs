//! The shared, current mesh model and what its sources reported.
//!
//! Sources write through [`MeshStore`]; readers (the REST API, the CA's
//! node check, the xDS server) take a short read lock and copy out what they
//! need. No lock is ever held across I/O.

use std::sync::Arc;

use meshbox_certs::SpiffeId;
use meshbox_proto::meshbox::{WaypointPolicy, WaypointRoute};
use meshbox_proto::security::Authorization;
use meshbox_proto::workload::Address;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::ca::NodeRoster;
use crate::model::{Changes, Kind, MeshConfig, MeshIndex, Object, ObjectKey};

/// A manifest file a source could not use, with where and why (standalone
/// mode; shown by `GET /api/v1/status`). Kept here, with the store that
/// holds it, so sources depend on the store and never the other way round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestError {
    pub file: String,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
    pub reason: String,
}

pub struct MeshStore {
    index: RwLock<MeshIndex>,
    source_errors: RwLock<Vec<ManifestError>>,
    /// Every non-empty change, in order, to each subscriber (the xDS
    /// server). Sent under the write lock, so order matches the model's.
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Arc<Changes>>>>,
}

/// Every served resource at one instant.
pub struct Snapshot {
    pub addresses: Vec<(String, Arc<Address>)>,
    pub authorizations: Vec<(String, Arc<Authorization>)>,
    pub waypoint_policies: Vec<(String, Arc<WaypointPolicy>)>,
    pub waypoint_routes: Vec<(String, Arc<WaypointRoute>)>,
}

impl MeshStore {
    pub fn new(config: MeshConfig) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::new(MeshIndex::new(config)),
            source_errors: RwLock::new(Vec::new()),
            subscribers: Mutex::new(Vec::new()),
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
        let mut index = self.index.write();
        let changes = Arc::new(f(&mut index));
        if !changes.is_empty() {
            let mut subscribers = self.subscribers.lock();
            subscribers.retain(|tx| tx.send(changes.clone()).is_ok());
        }
        changes
    }

    /// Runs `f` under a read lock; keep it short and free of I/O.
    pub fn read<R>(&self, f: impl FnOnce(&MeshIndex) -> R) -> R {
        let index = self.index.read();
        f(&index)
    }

    /// The current resources, and every change after them, with nothing
    /// missed or repeated in between.
    pub fn snapshot_and_subscribe(&self) -> (Snapshot, mpsc::UnboundedReceiver<Arc<Changes>>) {
        // The write lock keeps writers out between the copy and the subscription.
        let index = self.index.write();
        let snapshot = Snapshot {
            addresses: index
                .addresses()
                .map(|(n, a)| (n.to_owned(), a.clone()))
                .collect(),
            authorizations: index
                .authorizations()
                .map(|(n, a)| (n.to_owned(), a.clone()))
                .collect(),
            waypoint_policies: index
                .waypoint_policies()
                .map(|(n, p)| (n.to_owned(), p.clone()))
                .collect(),
            waypoint_routes: index
                .waypoint_routes()
                .map(|(n, r)| (n.to_owned(), r.clone()))
                .collect(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.lock().push(tx);
        drop(index);
        (snapshot, rx)
    }

    pub fn set_source_errors(&self, errors: Vec<ManifestError>) {
        *self.source_errors.write() = errors;
    }

    pub fn source_errors(&self) -> Vec<ManifestError> {
        self.source_errors.read().clone()
    }
}

impl NodeRoster for MeshStore {
    fn has_identity_on_node(&self, node: &str, identity: &SpiffeId) -> bool {
        self.read(|index| index.has_identity_on_node(node, identity))
    }
}
