//! Kubernetes mode's source: kube-runtime watchers for every kind the model
//! reads, feeding [`MeshStore`].
//!
//! Watchers relist and back off on their own after errors; a relist is
//! applied as "these are now all the objects of this kind", so deletions
//! missed while disconnected are caught. The Gateway API (Gateway,
//! HTTPRoute) and Istio's AuthorizationPolicy and PeerAuthentication CRDs
//! are optional: while one is not installed its watcher is parked (checked
//! again every minute) and everything else works. PeerAuthentication is read as `v1`, or as
//! `v1beta1` where the installed CRD does not serve `v1` (Istio before 1.22).

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

use crate::k8s::{
    AuthorizationPolicy, Gateway, HttpRoute, PeerAuthentication, PeerAuthenticationV1beta1,
};
use crate::model::{Kind, Object};
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
    let sync = InitialSync::new(8);
    spawn_watch::<Namespace>(
        client.clone(),
        store.clone(),
        sync.clone(),
        false,
        Kind::Namespace,
        Object::Namespace,
    );
    spawn_watch::<Pod>(
        client.clone(),
        store.clone(),
        sync.clone(),
        false,
        Kind::Pod,
        Object::Pod,
    );
    spawn_watch::<Service>(
        client.clone(),
        store.clone(),
        sync.clone(),
        false,
        Kind::Service,
        Object::Service,
    );
    spawn_watch::<EndpointSlice>(
        client.clone(),
        store.clone(),
        sync.clone(),
        false,
        Kind::EndpointSlice,
        Object::EndpointSlice,
    );
    spawn_watch::<Gateway>(
        client.clone(),
        store.clone(),
        sync.clone(),
        true,
        Kind::Gateway,
        Object::Gateway,
    );
    spawn_watch::<HttpRoute>(
        client.clone(),
        store.clone(),
        sync.clone(),
        true,
        Kind::HttpRoute,
        Object::HttpRoute,
    );
    spawn_watch::<AuthorizationPolicy>(
        client.clone(),
        store.clone(),
        sync.clone(),
        true,
        Kind::AuthorizationPolicy,
        Object::AuthorizationPolicy,
    );
    spawn_peer_authentication_watch(client, store, sync.clone());
    sync
}

/// Whether a CRD's list endpoint answers.
enum Probe {
    Installed,
    Absent,
    Failed,
}

async fn probe<K>(api: &Api<K>, kind: &str) -> Probe
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Probe::Installed,
        Err(kube::Error::Api(e)) if e.code == 404 => Probe::Absent,
        Err(e) => {
            tracing::warn!(%kind, error = %e, "probing the CRD failed");
            Probe::Failed
        }
    }
}

/// Like an optional [`spawn_watch`], trying `v1` first and then `v1beta1`.
fn spawn_peer_authentication_watch(client: kube::Client, store: Arc<MeshStore>, sync: InitialSync) {
    tokio::spawn(async move {
        let v1: Api<PeerAuthentication> = Api::all(client.clone());
        let v1beta1: Api<PeerAuthenticationV1beta1> = Api::all(client);
        let kind = "PeerAuthentication".to_string();
        let mut first_sync = Some(sync);
        loop {
            let newer = probe(&v1, &kind).await;
            // v1beta1 only matters where v1 is not served.
            let older = match newer {
                Probe::Absent => probe(&v1beta1, &kind).await,
                _ => Probe::Failed,
            };
            match (newer, older) {
                (Probe::Installed, _) => {
                    tracing::info!(%kind, version = "v1", "watching");
                    watch(
                        v1,
                        kind,
                        store,
                        first_sync,
                        Kind::PeerAuthentication,
                        Object::PeerAuthentication,
                    )
                    .await;
                    return;
                }
                (Probe::Absent, Probe::Installed) => {
                    tracing::info!(%kind, version = "v1beta1", "watching");
                    watch(
                        v1beta1,
                        kind,
                        store,
                        first_sync,
                        Kind::PeerAuthentication,
                        |o| Object::PeerAuthentication(o.0),
                    )
                    .await;
                    return;
                }
                (Probe::Absent, Probe::Absent) => {
                    if let Some(sync) = first_sync.take() {
                        tracing::warn!(%kind, "CRD not installed; carrying on without it");
                        // An absent CRD counts as synced: there is nothing to list.
                        sync.done();
                    }
                }
                _ => {}
            }
            tokio::time::sleep(CRD_RECHECK).await;
        }
    });
}

fn spawn_watch<K>(
    client: kube::Client,
    store: Arc<MeshStore>,
    sync: InitialSync,
    optional: bool,
    model_kind: Kind,
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
            watch(api, kind, store, first_sync, model_kind, wrap).await;
        } else {
            watch(api, kind, store, Some(sync), model_kind, wrap).await;
        }
    });
}

async fn watch<K>(
    api: Api<K>,
    kind: String,
    store: Arc<MeshStore>,
    mut first_sync: Option<InitialSync>,
    model_kind: Kind,
    wrap: fn(K) -> Object,
) where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let mut state = KindState::new(model_kind);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                let event = match event {
                    Event::Apply(o) => Event::Apply(wrap(o)),
                    Event::Delete(o) => Event::Delete(wrap(o)),
                    Event::Init => Event::Init,
                    Event::InitApply(o) => Event::InitApply(wrap(o)),
                    Event::InitDone => Event::InitDone,
                };
                if state.handle(event, &store) {
                    tracing::info!(%kind, "listed");
                    if let Some(sync) = first_sync.take() {
                        sync.done();
                    }
                }
            }
            Err(e) => tracing::warn!(%kind, error = %e, "watch error; retrying with backoff"),
        }
    }
}

/// A watcher's relist in progress: applied whole when it completes, so
/// objects deleted while the watch was down disappear.
struct KindState {
    kind: Kind,
    relist: Vec<Object>,
}

impl KindState {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            relist: Vec::new(),
        }
    }

    /// Applies one watch event to the store. Returns true when a complete
    /// listing has just been applied.
    fn handle(&mut self, event: Event<Object>, store: &MeshStore) -> bool {
        match event {
            Event::Apply(obj) => {
                store.apply(obj);
            }
            Event::Delete(obj) => {
                if let Some(key) = obj.key() {
                    store.delete(key);
                }
            }
            Event::Init => self.relist.clear(),
            Event::InitApply(obj) => self.relist.push(obj),
            Event::InitDone => {
                store.replace_kind(self.kind, std::mem::take(&mut self.relist));
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MeshConfig;

    fn namespace(name: &str) -> Object {
        Object::Namespace(
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap(),
        )
    }

    fn pod(name: &str, ip: &str) -> Object {
        Object::Pod(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop", "uid": name},
                "spec": {"nodeName": "n1", "containers": []},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            }))
            .unwrap(),
        )
    }

    fn workload_names(store: &MeshStore) -> Vec<String> {
        store.read(|index| index.addresses().map(|(name, _)| name.to_owned()).collect())
    }

    #[test]
    fn watch_events_and_relists_keep_the_store_exact() {
        let store = MeshStore::new(MeshConfig::default());
        let mut state = KindState::new(Kind::Pod);
        assert!(!state.handle(Event::Init, &store));
        assert!(!state.handle(Event::InitApply(pod("a", "10.0.0.1")), &store));
        assert!(!state.handle(Event::InitApply(pod("b", "10.0.0.2")), &store));
        assert!(workload_names(&store).is_empty(), "nothing before InitDone");
        assert!(state.handle(Event::InitDone, &store));
        assert_eq!(
            workload_names(&store),
            ["Kubernetes//Pod/shop/a", "Kubernetes//Pod/shop/b"]
        );

        state.handle(Event::Apply(pod("c", "10.0.0.3")), &store);
        state.handle(Event::Delete(pod("a", "10.0.0.1")), &store);
        assert_eq!(
            workload_names(&store),
            ["Kubernetes//Pod/shop/b", "Kubernetes//Pod/shop/c"]
        );

        // The watch broke; meanwhile b was deleted. The relist removes it.
        state.handle(Event::Init, &store);
        state.handle(Event::InitApply(pod("c", "10.0.0.3")), &store);
        assert!(state.handle(Event::InitDone, &store));
        assert_eq!(workload_names(&store), ["Kubernetes//Pod/shop/c"]);

        // Another kind's watcher never deletes pods.
        let mut namespaces = KindState::new(Kind::Namespace);
        namespaces.handle(Event::Init, &store);
        namespaces.handle(Event::InitApply(namespace("shop")), &store);
        namespaces.handle(Event::InitDone, &store);
        assert_eq!(workload_names(&store), ["Kubernetes//Pod/shop/c"]);
    }
}
