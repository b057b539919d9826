//! Kubernetes mode's source: kube-runtime watchers for every kind the model
//! reads, feeding [`MeshStore`].
//!
//! Watchers relist and back off on their own after errors; a relist is
//! applied as "these are now all the objects of this kind", so deletions
//! missed while disconnected are caught. The Gateway API and Istio's
//! AuthorizationPolicy CRDs are optional: while one is not installed its
//! watcher is parked (checked again every minute) and everything else works.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;

use crate::k8s::{AuthorizationPolicy, Gateway};
use crate::model::{Object, ObjectKey};
use crate::store::MeshStore;

/// How often an absent optional CRD is looked for again.
const CRD_RECHECK: Duration = Duration::from_secs(60);

/// Counts watchers that have not finished their first listing; the source is
/// ready when it reaches zero.
#[derive(Clone)]
pub struct InitialSync(Arc<AtomicUsize>, Arc<tokio::sync::Notify>);

impl InitialSync {
    fn new(n: usize) -> Self {
        Self(
            Arc::new(AtomicUsize::new(n)),
            Arc::new(tokio::sync::Notify::new()),
        )
    }

    fn done(&self) {
        if self.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.1.notify_waiters();
        }
    }

    /// Waits until every watcher has listed once.
    pub async fn wait(&self) {
        loop {
            let notified = self.1.notified();
            if self.0.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Starts a watcher per kind. Returns a handle that completes once every
/// watcher has delivered its first complete listing.
pub fn start(client: kube::Client, store: Arc<MeshStore>) -> InitialSync {
    let sync = InitialSync::new(6);
    spawn_watch::<Namespace>(
        client.clone(),
        store.clone(),
        sync.clone(),
        false,
        Object::Namespace,
    );
    spawn_watch::<Pod>(
        client.clone(),
        store.clone(),
        sync.clone(),
        false,
        Object::Pod,
    );
    spawn_watch::<Service>(
        client.clone(),
        store.clone(),
        sync.clone(),
        false,
        Object::Service,
    );
    spawn_watch::<EndpointSlice>(
        client.clone(),
        store.clone(),
        sync.clone(),
        false,
        Object::EndpointSlice,
    );
    spawn_watch::<Gateway>(
        client.clone(),
        store.clone(),
        sync.clone(),
        true,
        Object::Gateway,
    );
    spawn_watch::<AuthorizationPolicy>(
        client,
        store,
        sync.clone(),
        true,
        Object::AuthorizationPolicy,
    );
    sync
}

fn spawn_watch<K>(
    client: kube::Client,
    store: Arc<MeshStore>,
    sync: InitialSync,
    optional: bool,
    wrap: fn(K) -> Object,
) where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let api: Api<K> = Api::all(client);
        let kind = K::kind(&()).into_owned();
        if optional {
            let mut announced = false;
            loop {
                match api.list(&ListParams::default().limit(1)).await {
                    Ok(_) => break,
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        if !announced {
                            tracing::warn!(%kind, "CRD not installed; carrying on without it");
                            // An absent CRD counts as synced: there is nothing to list.
                            sync.done();
                            announced = true;
                        }
                    }
                    Err(e) => tracing::warn!(%kind, error = %e, "probing the CRD failed"),
                }
                tokio::time::sleep(CRD_RECHECK).await;
            }
            if announced {
                tracing::info!(%kind, "CRD installed; watching it");
            }
            // Once announced absent, the first sync was already counted.
            let first_sync = (!announced).then_some(sync);
            watch(api, kind, store, first_sync, wrap).await;
        } else {
            watch(api, kind, store, Some(sync), wrap).await;
        }
    });
}

async fn watch<K>(
    api: Api<K>,
    kind: String,
    store: Arc<MeshStore>,
    mut first_sync: Option<InitialSync>,
    wrap: fn(K) -> Object,
) where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let mut known: HashSet<ObjectKey> = HashSet::new();
    let mut relist: Vec<Object> = Vec::new();
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(obj)) => {
                let obj = wrap(obj);
                if let Some(key) = obj.key() {
                    known.insert(key);
                }
                store.apply(obj);
            }
            Ok(Event::Delete(obj)) => {
                if let Some(key) = wrap(obj).key() {
                    known.remove(&key);
                    store.delete(key);
                }
            }
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitApply(obj)) => relist.push(wrap(obj)),
            Ok(Event::InitDone) => {
                let fresh: HashSet<ObjectKey> = relist.iter().filter_map(Object::key).collect();
                for stale in known.difference(&fresh) {
                    store.delete(stale.clone());
                }
                for obj in relist.drain(..) {
                    store.apply(obj);
                }
                known = fresh;
                tracing::info!(%kind, objects = known.len(), "listed");
                if let Some(sync) = first_sync.take() {
                    sync.done();
                }
            }
            Err(e) => tracing::warn!(%kind, error = %e, "watch error; retrying with backoff"),
        }
    }
}
