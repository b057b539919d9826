//! The state the server handle, the gRPC service and every stream task
//! share. It sits below both `server` (which creates it and opens streams)
//! and `stream` (which serves one), so the two do not import each other for
//! it: `server` starts `stream`, and `stream` knows nothing of `server`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::cache::Cache;
use super::delta::Limits;
use super::metrics::XdsMetrics;
use super::status::StreamStatus;
use super::{StreamAuthenticator, XdsOptions};

/// State shared by the server handle, the gRPC service and every stream.
pub(crate) struct Shared {
    cache: RwLock<Cache>,
    /// The cache generation after the latest change; streams watch it.
    pub published: watch::Sender<u64>,
    pub metrics: XdsMetrics,
    pub options: XdsOptions,
    pub limits: Limits,
    pub auth: Arc<dyn StreamAuthenticator>,
    streams: Mutex<BTreeMap<u64, Arc<StreamStatus>>>,
    /// Open streams per caller key; callers with none are not kept.
    per_caller: Mutex<HashMap<String, usize>>,
    pub next_stream: AtomicU64,
}

impl Shared {
    /// Registers the server's metrics in `registry`.
    pub(crate) fn new(
        auth: Arc<dyn StreamAuthenticator>,
        registry: &mut Registry,
        options: XdsOptions,
    ) -> Self {
        let limits = Limits {
            max_names_per_request: options.max_names_per_request,
            max_name_len: options.max_name_len,
            max_subscriptions: options.max_subscriptions,
            max_initial_resource_versions: options.max_initial_resource_versions,
        };
        Self {
            cache: RwLock::new(Cache::new(options.change_log_capacity)),
            published: watch::channel(0).0,
            metrics: XdsMetrics::register(registry),
            options,
            limits,
            auth,
            streams: Mutex::new(BTreeMap::new()),
            per_caller: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
        }
    }

    /// Read access to the cache. Keep it short: never across an await.
    pub(crate) fn read_cache(&self) -> RwLockReadGuard<'_, Cache> {
        self.cache.read()
    }

    /// Write access to the cache, for `XdsServer::update` only.
    pub(crate) fn write_cache(&self) -> RwLockWriteGuard<'_, Cache> {
        self.cache.write()
    }

    /// Counts one more stream for `caller`; false (and nothing counted)
    /// when it already has `max_streams_per_caller`. Every `true` must be
    /// matched by one [`Self::release_stream`].
    pub(crate) fn acquire_stream(&self, caller: &str) -> bool {
        let mut per_caller = self.per_caller.lock();
        if let Some(open) = per_caller.get_mut(caller) {
            if *open >= self.options.max_streams_per_caller {
                return false;
            }
            *open += 1;
            return true;
        }
        if self.options.max_streams_per_caller == 0 {
            return false;
        }
        per_caller.insert(caller.to_owned(), 1);
        true
    }

    pub(crate) fn release_stream(&self, caller: &str) {
        let mut per_caller = self.per_caller.lock();
        if let Some(open) = per_caller.get_mut(caller) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                per_caller.remove(caller);
            }
        }
    }

    /// The open streams, by id.
    pub(crate) fn streams(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<StreamStatus>>> {
        self.streams.lock()
    }
}
