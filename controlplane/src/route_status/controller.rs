//! Kubernetes mode's route status writer: keeps each HTTPRoute's
//! `status.parents` entries of [`CONTROLLER_NAME`] saying what meshbox makes
//! of the route (see [`route_status`](super)).
//!
//! - Server-side apply to the status subresource with the waypoint
//!   controller's field manager, forced, and only when the status differs:
//!   a status write wakes every watcher of HTTPRoutes, the model's included.
//! - `status.parents` is an atomic list, so it is written whole (other
//!   controllers' entries as read) with the resourceVersion it was computed
//!   from as a precondition; a conflict is retried on the newer route.
//! - The route is checked as the controller's own watch delivers it, so the
//!   status describes the generation it stamps; Services and waypoints come
//!   from the mesh model. Each route is looked at again when the model's
//!   Services change (one pass per burst), and every [`RESYNC`] anyway.
//! - Starts once every model watcher has listed (before that, Services that
//!   exist would be reported missing) and while the Gateway API CRDs are
//!   absent, waits for them, as the waypoint controller does.
//! - A status that cannot be written is logged and retried; the control
//!   plane carries on. Every replica writes the same status (transition
//!   times are kept while a condition holds), so they agree without an
//!   election.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use meshbox_proto::workload::address;
use tokio::sync::mpsc;

use super::{CONTROLLER_NAME, desired_status, status_apply_body};
use crate::k8s::HttpRoute;
use crate::k8s::waypoint_controller::now;
use crate::k8s::waypoint_deployer::FIELD_MANAGER;
use crate::model::Changes;
use crate::store::MeshStore;

/// How often a route is checked again with no change seen.
const RESYNC: Duration = Duration::from_secs(60);
/// Retry delay after a failed write.
const RETRY: Duration = Duration::from_secs(15);
/// Retry delay when the write was refused (RBAC): an operator has to act.
const RETRY_FORBIDDEN: Duration = Duration::from_secs(300);
/// How long a burst of model changes (a relist, a rollout) is gathered
/// into one pass over the routes.
const COALESCE: Duration = Duration::from_secs(1);
/// How often absent Gateway API CRDs are looked for again.
const CRD_RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[error("writing the status of HTTPRoute {namespace}/{name}: {source}")]
pub struct StatusError {
    namespace: String,
    name: String,
    #[source]
    source: kube::Error,
}

impl StatusError {
    fn code(&self) -> Option<u16> {
        match &self.source {
            kube::Error::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Resolves once the model holds a complete first listing.
pub type Synced = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Context {
    client: kube::Client,
    store: Arc<MeshStore>,
}

/// Starts the writer in the background, once `synced` resolves.
pub fn start(client: kube::Client, store: Arc<MeshStore>, synced: Synced) {
    tokio::spawn(run(Arc::new(Context { client, store }), synced));
}

async fn run(context: Arc<Context>, synced: Synced) {
    synced.await;
    let routes: Api<HttpRoute> = Api::all(context.client.clone());
    let mut announced = false;
    loop {
        match routes.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                if !announced {
                    tracing::warn!(
                        "Gateway API CRDs not installed; HTTPRoute status will be written once they are"
                    );
                    announced = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "probing the HTTPRoute CRD failed"),
        }
        tokio::time::sleep(CRD_RECHECK).await;
    }
    tracing::info!(controller = CONTROLLER_NAME, "writing HTTPRoute status");
    let (_, changes) = context.store.snapshot_and_subscribe();
    Controller::new(routes, watcher::Config::default())
        .reconcile_all_on(service_changes(changes))
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "route status event");
            }
        })
        .await;
}

/// One item per burst of model changes that touch a Service (existence,
/// ports, waypoint: what a route's status reads). Workload churn is
/// skipped; it changes no route's status.
fn service_changes(changes: mpsc::UnboundedReceiver<Arc<Changes>>) -> impl Stream<Item = ()> {
    futures_util::stream::unfold(changes, |mut changes| async move {
        loop {
            let batch = changes.recv().await?;
            if touches_services(&batch) {
                break;
            }
        }
        tokio::time::sleep(COALESCE).await;
        // The pass that follows sees all of these.
        while changes.try_recv().is_ok() {}
        Some(((), changes))
    })
}

fn touches_services(changes: &Changes) -> bool {
    changes
        .addresses
        .iter()
        .any(|(name, address)| match address {
            Some(a) => matches!(a.r#type, Some(address::Type::Service(_))),
            // Gone: a workload's name is `{cluster}//Pod/...`, a Service's
            // `{namespace}/{hostname}`.
            None => !name.contains("//"),
        })
}

fn error_policy(route: Arc<HttpRoute>, error: &StatusError, _: Arc<Context>) -> Action {
    let route = format!(
        "{}/{}",
        route.metadata.namespace.as_deref().unwrap_or_default(),
        route.metadata.name.as_deref().unwrap_or_default()
    );
    match error.code() {
        // A newer route is on its way through the watch.
        Some(409) => {
            tracing::debug!(%route, "route changed while its status was written; again on the newer one");
            Action::requeue(Duration::from_secs(1))
        }
        Some(403) => {
            tracing::warn!(%route, error = %error, retry_in = ?RETRY_FORBIDDEN, "not allowed to write HTTPRoute status (the control plane needs patch on httproutes/status)");
            Action::requeue(RETRY_FORBIDDEN)
        }
        _ => {
            tracing::warn!(%route, error = %error, retry_in = ?RETRY, "writing HTTPRoute status failed");
            Action::requeue(RETRY)
        }
    }
}

async fn reconcile(route: Arc<HttpRoute>, context: Arc<Context>) -> Result<Action, StatusError> {
    let (Some(namespace), Some(name)) = (
        route.metadata.namespace.as_deref(),
        route.metadata.name.as_deref(),
    ) else {
        return Ok(Action::await_change());
    };
    if route.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let desired = context
        .store
        .read(|index| desired_status(&route, index, &now()));
    if route.status.clone().unwrap_or_default() == desired {
        return Ok(Action::requeue(RESYNC));
    }
    let api: Api<HttpRoute> = Api::namespaced(context.client.clone(), namespace);
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(status_apply_body(&route, &desired)),
    )
    .await
    .map_err(|source| StatusError {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    })?;
    tracing::debug!(route = %format!("{namespace}/{name}"), "HTTPRoute status written");
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MeshConfig, Object};
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};

    type Seen = Vec<(Method, String, String, Value)>;

    const STATUS_PATH: &str =
        "/apis/gateway.networking.k8s.io/v1/namespaces/app/httproutes/split/status";

    fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).expect("test object must deserialize")
    }

    fn service(name: &str, vip: &str) -> Object {
        Object::Service(from(json!({
            "metadata": {"name": name, "namespace": "app"},
            "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80}]},
        })))
    }

    /// A store with Services `web` and `v1` in namespace `app` (no `v2`).
    fn store() -> Arc<MeshStore> {
        let store = MeshStore::new(MeshConfig::default());
        store.apply(service("web", "10.96.0.1"));
        store.apply(service("v1", "10.96.0.2"));
        store
    }

    fn route_json() -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "split", "namespace": "app", "uid": "r-1", "generation": 2, "resourceVersion": "41"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [{"backendRefs": [{"name": "v1", "port": 80, "weight": 90}, {"name": "v2", "port": 80, "weight": 10}]}],
            },
        })
    }

    fn context(
        service: tower_test::mock::Mock<Request<Body>, Response<Body>>,
        store: Arc<MeshStore>,
    ) -> Arc<Context> {
        Arc::new(Context {
            client: kube::Client::new(service, "default"),
            store,
        })
    }

    fn ok(body: &Value) -> Response<Body> {
        Response::builder()
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    /// Records every request as (method, path, query, body) and answers
    /// with `answer(body)`.
    async fn serve(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        answer: fn(&Value) -> Response<Body>,
    ) -> Seen {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            let body = request.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            send.send_response(answer(&body));
            seen.push((method, path, query, body));
        }
        seen
    }

    fn ours(body: &Value) -> &Value {
        body["status"]["parents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["controllerName"] == CONTROLLER_NAME)
            .unwrap_or_else(|| panic!("an entry of ours in {body}"))
    }

    fn condition<'a>(entry: &'a Value, type_: &str) -> &'a Value {
        entry["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("{type_} in {entry}"))
    }

    #[tokio::test]
    async fn a_route_gets_its_status_applied_to_the_status_subresource() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve(handle, ok));
        let route: HttpRoute = from(route_json());
        let action = reconcile(Arc::new(route), context(service, store()))
            .await
            .expect("written");
        assert_eq!(action, Action::requeue(RESYNC));
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let (method, path, query, body) = &seen[0];
        assert_eq!((method, path.as_str()), (&Method::PATCH, STATUS_PATH));
        assert!(
            query.contains(&format!("fieldManager={FIELD_MANAGER}")),
            "{query}"
        );
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(body["metadata"]["resourceVersion"], "41");
        assert!(body.get("spec").is_none(), "status only: {body}");
        let entry = ours(body);
        assert_eq!(
            entry["parentRef"],
            json!({"group": "", "kind": "Service", "name": "web"})
        );
        let refs = condition(entry, "ResolvedRefs");
        assert_eq!(
            (&refs["status"], &refs["reason"]),
            (&json!("False"), &json!("BackendNotFound"))
        );
        assert!(
            refs["message"]
                .as_str()
                .unwrap()
                .contains("app/v2: backend not found"),
            "{refs}"
        );
        assert_eq!(refs["observedGeneration"], 2);
    }

    #[tokio::test]
    async fn a_status_that_already_says_it_is_not_written_again() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve(handle, ok));
        let store = store();
        let mut route: HttpRoute = from(route_json());
        route.status =
            Some(store.read(|index| desired_status(&route, index, "2026-01-01T00:00:00Z")));
        reconcile(Arc::new(route), context(service, store))
            .await
            .expect("reconciled");
        assert!(server.await.unwrap().is_empty());
    }

    /// A failed write is an error for the error policy, which retries it
    /// (sooner after a conflict, later when RBAC refuses it); nothing
    /// panics and nothing else is attempted.
    #[tokio::test]
    async fn a_failed_write_is_retried_later() {
        fn failure(code: u16) -> Response<Body> {
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "no", "reason": "Failure", "code": code
            });
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                .unwrap()
        }
        type Answer = fn(&Value) -> Response<Body>;
        let answers: [(Answer, Duration); 3] = [
            (|_| failure(403), RETRY_FORBIDDEN),
            (|_| failure(409), Duration::from_secs(1)),
            (|_| failure(500), RETRY),
        ];
        for (answer, retry_in) in answers {
            let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let server = tokio::spawn(serve(handle, answer));
            let route = Arc::new(from::<HttpRoute>(route_json()));
            let context = context(service, store());
            let error = reconcile(route.clone(), context.clone())
                .await
                .expect_err("a failed write fails the reconcile");
            assert!(error.to_string().contains("HTTPRoute app/split"), "{error}");
            assert_eq!(
                error_policy(route, &error, context),
                Action::requeue(retry_in),
                "{error}"
            );
            assert_eq!(server.await.unwrap().len(), 1);
        }
    }

    /// What the model reports as changed: a pod coming or going wakes
    /// nothing; a Service coming, changing or going does.
    #[test]
    fn only_service_changes_wake_the_writer() {
        let store = store();
        let pod: Object = Object::Pod(from(json!({
            "metadata": {"name": "a", "namespace": "app", "uid": "a"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]},
        })));
        let key = pod.key().unwrap();
        let added = store.apply(pod);
        assert!(!added.is_empty());
        assert!(!touches_services(&added), "{added:?}");
        let removed = store.delete(key);
        assert!(!removed.is_empty());
        assert!(!touches_services(&removed), "{removed:?}");

        let added = store.apply(service("v2", "10.96.0.3"));
        assert!(touches_services(&added), "{added:?}");
        let changed = store.apply(Object::Service(from(json!({
            "metadata": {"name": "v2", "namespace": "app"},
            "spec": {"clusterIP": "10.96.0.3", "clusterIPs": ["10.96.0.3"], "selector": {"app": "v2"},
                     "ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9000}]},
        }))));
        assert!(touches_services(&changed), "{changed:?}");
        let removed = store.delete(crate::model::ObjectKey::service("app", "v2"));
        assert!(touches_services(&removed), "{removed:?}");
    }

    /// The whole writer against a mock API server: after the model's first
    /// listing it lists HTTPRoutes and writes the listed route's status;
    /// when the missing backend Service appears in the model, the route's
    /// status is written again, resolved.
    #[tokio::test]
    async fn the_writer_follows_the_routes_and_the_model() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let store = store();
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel::<()>();
        start(
            kube::Client::new(mock, "default"),
            store.clone(),
            Box::pin(async move {
                let _ = synced_rx.await;
            }),
        );
        // Nothing before the model has listed.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), handle.next_request())
                .await
                .is_err(),
            "a request before the model was synced"
        );
        synced_tx.send(()).unwrap();
        let list = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRouteList",
            "metadata": {"resourceVersion": "50"},
            "items": [route_json()],
        });
        let mut held = Vec::new();
        let mut written = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while written.len() < 2 {
            let (request, send) = tokio::time::timeout_at(deadline, handle.next_request())
                .await
                .expect("the writer made its requests in time")
                .expect("a request");
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            match method {
                // Held open, so nothing relists.
                Method::GET if query.contains("watch=true") => held.push(send),
                Method::GET if path == "/apis/gateway.networking.k8s.io/v1/httproutes" => {
                    send.send_response(ok(&list))
                }
                Method::PATCH if path == STATUS_PATH => {
                    let body = request.into_body().collect_bytes().await.unwrap();
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    send.send_response(ok(&body));
                    written.push(body);
                    if written.len() == 1 {
                        store.apply(service("v2", "10.96.0.3"));
                    }
                }
                other => panic!("unexpected {other} {path}?{query}"),
            }
        }
        let first = condition(ours(&written[0]), "ResolvedRefs");
        assert_eq!(first["status"], "False");
        let second = condition(ours(&written[1]), "ResolvedRefs");
        assert_eq!(
            (&second["status"], &second["reason"]),
            (&json!("True"), &json!("ResolvedRefs"))
        );
    }
}
