//! Kubernetes mode's waypoint controller: for every Gateway of a waypoint
//! class, applies what [`waypoint_deployer`](super::waypoint_deployer)
//! renders (ServiceAccount, Service, Deployment, all owned by the Gateway)
//! and writes the Gateway's status.
//!
//! - Server-side apply with one field manager, forced: applying the same
//!   objects again is a no-op, and a hand edit of a field we set is undone
//!   at the next reconcile. Fields we do not set (replicas, for one) stay
//!   the user's.
//! - Reconciles on any change to a Gateway or to an object it owns (a
//!   Deployment becoming available is one), and every [`RESYNC`] anyway.
//! - An object already under the waypoint's name that this controller did
//!   not make for this Gateway (a user's Service called like it, say) is
//!   never taken over: the Gateway is refused in its status instead.
//! - A Gateway moved to another class after this controller deployed for it
//!   (it wrote the status, as `managedFields` records) loses what was
//!   deployed and the status fields written.
//! - Deletion is Kubernetes' garbage collector's: everything carries an
//!   owner reference to the Gateway. A Gateway being deleted gets nothing
//!   applied, and a deleted one is no longer in the controller's cache, so
//!   nothing is re-created.
//! - Every replica of the control plane runs it; they apply identical
//!   objects and status (transition times are kept while a condition holds),
//!   so they agree without an election.
//! - While the Gateway API CRDs are absent, it waits for them (checked every
//!   minute), as the model's watchers do.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Gateway;
use super::waypoint_deployer::{
    FIELD_MANAGER, GATEWAY_NAME_LABEL, MANAGED_BY, MANAGED_BY_LABEL, Plan, WaypointObjects,
    WaypointSettings, deployed_status, foreign_object, invalid_status, observe, plan,
    status_apply_body,
};

/// How often a waypoint is applied again with no change seen (drift a watch
/// missed, the root ConfigMap in its namespace).
const RESYNC: Duration = Duration::from_secs(300);
/// Retry delay after a failed reconcile.
const RETRY: Duration = Duration::from_secs(15);
/// How often a Gateway refused because of an object in the way is looked
/// at again (deleting that object causes no event this controller sees).
const RECHECK_REFUSED: Duration = Duration::from_secs(60);
/// How often absent Gateway API CRDs are looked for again.
const CRD_RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("applying {kind} {namespace}/{name}: {source}")]
    Apply {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading {kind} {namespace}/{name}: {source}")]
    Read {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What every reconcile needs.
pub struct Context {
    client: kube::Client,
    settings: WaypointSettings,
    /// The mesh root, published as `istio-ca-root-cert` into each waypoint's
    /// namespace (the waypoint mounts it), enrolled or not.
    root_pem: String,
}

impl Context {
    pub fn new(client: kube::Client, settings: WaypointSettings, root_pem: String) -> Self {
        Self {
            client,
            settings,
            root_pem,
        }
    }
}

/// Starts the controller in the background.
pub fn start(context: Context) {
    tokio::spawn(run(Arc::new(context)));
}

async fn run(context: Arc<Context>) {
    let gateways: Api<Gateway> = Api::all(context.client.clone());
    let mut announced = false;
    loop {
        match gateways.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                if !announced {
                    tracing::warn!(
                        "Gateway API CRDs not installed; waypoints will be deployed once they are"
                    );
                    announced = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "probing the Gateway CRD failed"),
        }
        tokio::time::sleep(CRD_RECHECK).await;
    }
    tracing::info!("deploying waypoints for Gateways of class istio-waypoint and meshbox-waypoint");
    // Only what this controller deployed: a cluster's every Deployment,
    // Service and ServiceAccount would be a large cache for nothing.
    let owned = watcher::Config::default().labels(&format!(
        "{MANAGED_BY_LABEL}={MANAGED_BY},{GATEWAY_NAME_LABEL}"
    ));
    let client = context.client.clone();
    Controller::new(gateways, watcher::Config::default())
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<ServiceAccount>::all(client), owned)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "waypoint controller event");
            }
        })
        .await;
}

fn error_policy(gateway: Arc<Gateway>, error: &ReconcileError, _: Arc<Context>) -> Action {
    tracing::warn!(
        gateway = %gateway_ref(&gateway),
        error = %error,
        retry_in = ?RETRY,
        "deploying the waypoint failed"
    );
    Action::requeue(RETRY)
}

fn gateway_ref(gateway: &Gateway) -> String {
    format!(
        "{}/{}",
        gateway.metadata.namespace.as_deref().unwrap_or_default(),
        gateway.metadata.name.as_deref().unwrap_or_default()
    )
}

pub(crate) fn now() -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

async fn apply<K>(api: &Api<K>, namespace: &str, object: &K) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| ReconcileError::Apply {
        kind: <K as k8s_openapi::Resource>::KIND,
        namespace: namespace.to_owned(),
        name,
        source,
    })
}

async fn apply_status(
    context: &Context,
    namespace: &str,
    name: &str,
    status: &super::GatewayStatus,
) -> Result<(), ReconcileError> {
    let api: Api<Gateway> = Api::namespaced(context.client.clone(), namespace);
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(status_apply_body(name, status)),
    )
    .await
    .map(|_| ())
    .map_err(|source| ReconcileError::Apply {
        kind: "Gateway status",
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    })
}

async fn reconcile(gateway: Arc<Gateway>, context: Arc<Context>) -> Result<Action, ReconcileError> {
    match plan(&gateway, &context.settings) {
        Plan::Ignore | Plan::Deleting => Ok(Action::await_change()),
        Plan::Unusable(why) => {
            tracing::warn!(gateway = %gateway_ref(&gateway), problem = why, "skipping a waypoint Gateway");
            Ok(Action::await_change())
        }
        Plan::Invalid { reason, message } => {
            let (namespace, name) = names(&gateway);
            tracing::warn!(gateway = %gateway_ref(&gateway), %message, "cannot deploy the waypoint");
            let status = invalid_status(&gateway, reason, &message, &now());
            apply_status(&context, namespace, name, &status).await?;
            Ok(Action::await_change())
        }
        Plan::Deploy(objects) => deploy(&gateway, &context, &objects).await,
        Plan::Release => release(&gateway, &context).await,
    }
}

/// Name and namespace, which [`plan`] has checked before anything is applied.
fn names(gateway: &Gateway) -> (&str, &str) {
    (
        gateway.metadata.namespace.as_deref().unwrap_or_default(),
        gateway.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Why the object of kind `K` under the waypoint's name must not be
/// applied, if it exists and is not ours (see [`foreign_object`]).
async fn refusal<K>(api: &Api<K>, gateway: &Gateway) -> Result<Option<String>, ReconcileError>
where
    K: Resource<DynamicType = ()> + k8s_openapi::Resource + Clone + Debug + DeserializeOwned,
{
    let (namespace, name) = names(gateway);
    let kind = <K as k8s_openapi::Resource>::KIND;
    match api.get_metadata_opt(name).await {
        Ok(None) => Ok(None),
        Ok(Some(existing)) => Ok(foreign_object(kind, &existing.metadata, gateway)),
        Err(source) => Err(ReconcileError::Read {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        }),
    }
}

/// Deletes the object of kind `K` under the Gateway's name if this
/// controller made it for this Gateway (and it is still the same object).
async fn delete_if_ours<K>(api: &Api<K>, gateway: &Gateway) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = ()> + k8s_openapi::Resource + Clone + Debug + DeserializeOwned,
{
    let (namespace, name) = names(gateway);
    let kind = <K as k8s_openapi::Resource>::KIND;
    let error = |source| ReconcileError::Apply {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let Some(existing) = api.get_metadata_opt(name).await.map_err(error)? else {
        return Ok(());
    };
    if foreign_object(kind, &existing.metadata, gateway).is_some() {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(name, &params).await {
        Ok(_) => {
            tracing::info!(gateway = %gateway_ref(gateway), %kind, "deleted: the Gateway is no longer a waypoint");
            Ok(())
        }
        // Gone already, or replaced by another object since the read.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(error(e)),
    }
}

/// Undoes [`deploy`] for a Gateway moved to another class: deletes what it
/// deployed and gives up the status fields it wrote (an apply of nothing
/// drops them, unless the new controller holds them too).
async fn release(gateway: &Gateway, context: &Context) -> Result<Action, ReconcileError> {
    let (namespace, name) = names(gateway);
    let client = &context.client;
    delete_if_ours(
        &Api::<Deployment>::namespaced(client.clone(), namespace),
        gateway,
    )
    .await?;
    delete_if_ours(
        &Api::<Service>::namespaced(client.clone(), namespace),
        gateway,
    )
    .await?;
    delete_if_ours(
        &Api::<ServiceAccount>::namespaced(client.clone(), namespace),
        gateway,
    )
    .await?;
    let api: Api<Gateway> = Api::namespaced(client.clone(), namespace);
    let nothing = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name},
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(nothing),
    )
    .await
    .map_err(|source| ReconcileError::Apply {
        kind: "Gateway status",
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    })?;
    tracing::info!(gateway = %gateway_ref(gateway), "released: no longer of a waypoint class");
    Ok(Action::await_change())
}

async fn deploy(
    gateway: &Gateway,
    context: &Context,
    objects: &WaypointObjects,
) -> Result<Action, ReconcileError> {
    let (namespace, name) = names(gateway);
    let client = &context.client;
    let service_accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    let services = Api::<Service>::namespaced(client.clone(), namespace);
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let refused = match refusal(&service_accounts, gateway).await? {
        Some(why) => Some(why),
        None => match refusal(&services, gateway).await? {
            Some(why) => Some(why),
            None => refusal(&deployments, gateway).await?,
        },
    };
    if let Some(message) = refused {
        tracing::warn!(gateway = %gateway_ref(gateway), %message, "not deploying the waypoint");
        let status = invalid_status(gateway, "Invalid", &message, &now());
        if gateway.status.as_ref() != Some(&status) {
            apply_status(context, namespace, name, &status).await?;
        }
        return Ok(Action::requeue(RECHECK_REFUSED));
    }
    crate::cluster::publish_root(client, namespace, &context.root_pem).await;
    apply(&service_accounts, namespace, &objects.service_account).await?;
    let service = apply(&services, namespace, &objects.service).await?;
    let deployment = apply(&deployments, namespace, &objects.deployment).await?;
    let observed = observe(&service, &deployment);
    let status = deployed_status(gateway, &observed, &context.settings, &now());
    // Unchanged status is not sent: a Gateway's status write wakes every
    // watcher of Gateways (the model's included).
    if gateway.status.as_ref() != Some(&status) {
        apply_status(context, namespace, name, &status).await?;
    }
    tracing::debug!(
        gateway = %gateway_ref(gateway),
        available_replicas = observed.available_replicas,
        "waypoint applied"
    );
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};

    fn settings() -> WaypointSettings {
        WaypointSettings {
            image: "meshbox/waypoint:dev".into(),
            xds_address: "https://meshbox-controlplane.meshbox-system.svc:15012".into(),
            token_audience: "istio-ca".into(),
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
        }
    }

    fn gateway(class: &str) -> Gateway {
        serde_json::from_value(json!({
            "metadata": {"name": "wp", "namespace": "shop", "uid": "u-1", "generation": 1},
            "spec": {"gatewayClassName": class},
        }))
        .unwrap()
    }

    fn not_found() -> Response<Body> {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "not found", "reason": "NotFound", "code": 404
        });
        Response::builder()
            .status(404)
            .body(Body::from(serde_json::to_vec(&status).unwrap()))
            .unwrap()
    }

    /// Serves the mock API server: a GET finds nothing (the first deploy);
    /// every apply is answered with the applied object plus what the
    /// cluster would add (a cluster IP, an available replica); the patches
    /// are recorded as (method, path, field manager, body).
    async fn serve(
        handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    ) -> Vec<(Method, String, String, Value)> {
        serve_with(handle, Value::Null).await
    }

    /// Like [`serve`], but a GET of `existing`'s path answers its metadata.
    async fn serve_with(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        existing: Value,
    ) -> Vec<(Method, String, String, Value)> {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            if method == Method::GET {
                if existing["path"] == path.as_str() {
                    let meta = json!({
                        "apiVersion": "meta.k8s.io/v1",
                        "kind": "PartialObjectMetadata",
                        "metadata": existing["metadata"],
                    });
                    send.send_response(
                        Response::builder()
                            .body(Body::from(serde_json::to_vec(&meta).unwrap()))
                            .unwrap(),
                    );
                } else {
                    send.send_response(not_found());
                }
                continue;
            }
            let manager = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldManager="))
                .unwrap_or_default()
                .to_owned();
            assert!(query.contains("force=true"), "{path}: a forced apply");
            let body = request.into_body().collect_bytes().await.unwrap();
            let mut object: Value = serde_json::from_slice(&body).unwrap();
            seen.push((method, path.clone(), manager, object.clone()));
            if path.ends_with("/services/wp") {
                object["spec"]["clusterIP"] = json!("10.96.0.20");
                object["spec"]["clusterIPs"] = json!(["10.96.0.20"]);
            }
            if path.ends_with("/deployments/wp") {
                object["status"] = json!({"availableReplicas": 1});
            }
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&object).unwrap()))
                    .unwrap(),
            );
        }
        seen
    }

    fn context(service: tower_test::mock::Mock<Request<Body>, Response<Body>>) -> Arc<Context> {
        Arc::new(Context::new(
            kube::Client::new(service, "default"),
            settings(),
            "ROOT PEM".into(),
        ))
    }

    #[tokio::test]
    async fn a_waypoint_gateway_gets_its_objects_applied_then_its_status() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve(handle));
        let action = reconcile(Arc::new(gateway("istio-waypoint")), context(service))
            .await
            .expect("reconciled");
        assert_eq!(action, Action::requeue(RESYNC));
        let seen = server.await.unwrap();
        let paths: Vec<&str> = seen.iter().map(|(_, p, _, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/api/v1/namespaces/shop/configmaps/istio-ca-root-cert",
                "/api/v1/namespaces/shop/serviceaccounts/wp",
                "/api/v1/namespaces/shop/services/wp",
                "/apis/apps/v1/namespaces/shop/deployments/wp",
                "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/wp/status",
            ]
        );
        for (method, path, manager, _) in &seen[1..] {
            assert_eq!(method, Method::PATCH, "{path}");
            assert_eq!(manager, FIELD_MANAGER, "{path}");
        }
        assert_eq!(seen[0].3["data"]["root-cert.pem"], "ROOT PEM");
        assert_eq!(seen[3].3["kind"], "Deployment");
        assert_eq!(
            seen[3].3["spec"]["template"]["spec"]["containers"][0]["image"],
            "meshbox/waypoint:dev"
        );
        let status = &seen[4].3["status"];
        assert_eq!(
            status["addresses"],
            json!([{"type": "IPAddress", "value": "10.96.0.20"}])
        );
        let programmed = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Programmed")
            .unwrap();
        assert_eq!(programmed["status"], "True");
    }

    /// A Gateway whose status already says what the apply found gets no
    /// status write (which would wake every Gateway watcher again).
    #[tokio::test]
    async fn an_unchanged_status_is_not_written_again() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve(handle));
        let mut gw = gateway("meshbox-waypoint");
        let observed = crate::k8s::waypoint_deployer::Observed {
            cluster_ips: vec!["10.96.0.20".into()],
            available_replicas: 1,
        };
        gw.status = Some(deployed_status(
            &gw,
            &observed,
            &settings(),
            "2026-01-01T00:00:00Z",
        ));
        reconcile(Arc::new(gw), context(service))
            .await
            .expect("reconciled");
        let seen = server.await.unwrap();
        assert!(
            seen.iter()
                .all(|(_, path, _, _)| !path.ends_with("/status")),
            "{seen:?}"
        );
        assert_eq!(seen.len(), 4);
    }

    /// A Service the user made under the waypoint's name is neither
    /// rewritten nor adopted: nothing is applied, and the status says why.
    #[tokio::test]
    async fn an_existing_object_that_is_not_ours_is_left_alone() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve_with(
            handle,
            json!({
                "path": "/api/v1/namespaces/shop/services/wp",
                "metadata": {"name": "wp", "namespace": "shop", "labels": {"app": "wp"}},
            }),
        ));
        let action = reconcile(Arc::new(gateway("istio-waypoint")), context(service))
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(RECHECK_REFUSED));
        let seen = server.await.unwrap();
        let paths: Vec<&str> = seen.iter().map(|(_, p, _, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/wp/status"]
        );
        let accepted = &seen[0].3["status"]["conditions"][0];
        assert_eq!(accepted["status"], "False");
        assert!(
            accepted["message"]
                .as_str()
                .unwrap_or_default()
                .contains("Service shop/wp already exists"),
            "{accepted}"
        );
    }

    /// The whole controller against a mock API server: it waits for the
    /// Gateway CRD, lists Gateways and, by label, only the objects it made,
    /// and reconciles a listed waypoint Gateway (and not the other class).
    #[tokio::test]
    async fn the_controller_deploys_a_listed_waypoint_gateway_only() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        start(Context::new(
            kube::Client::new(service, "default"),
            settings(),
            "ROOT PEM".into(),
        ));
        let gateways = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayList",
            "metadata": {"resourceVersion": "7"},
            "items": [
                {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                 "metadata": {"name": "ingress", "namespace": "shop", "uid": "u-0", "resourceVersion": "5"},
                 "spec": {"gatewayClassName": "istio", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}},
                {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                 "metadata": {"name": "wp", "namespace": "shop", "uid": "u-1", "resourceVersion": "6", "generation": 1},
                 "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
            ],
        });
        let empty_metadata_list = json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": "7"},
            "items": [],
        });
        let ok = |body: &Value| {
            Response::builder()
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap()
        };
        // Watches are held open (never answered) so nothing relists.
        let mut held = Vec::new();
        let mut owned_selectors = Vec::new();
        let mut patched = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let status = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/wp/status";
        while !patched.iter().any(|p| p == status) {
            let (request, send) = tokio::time::timeout_at(deadline, handle.next_request())
                .await
                .expect("the controller made its requests in time")
                .expect("a request");
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            match method {
                Method::GET if query.contains("watch=true") => held.push(send),
                Method::GET if path == "/apis/gateway.networking.k8s.io/v1/gateways" => {
                    send.send_response(ok(&gateways))
                }
                Method::GET
                    if [
                        "/apis/apps/v1/deployments",
                        "/api/v1/services",
                        "/api/v1/serviceaccounts",
                    ]
                    .contains(&path.as_str()) =>
                {
                    owned_selectors.push(query.clone());
                    send.send_response(ok(&empty_metadata_list));
                }
                // The takeover check: nothing exists yet.
                Method::GET => send.send_response(not_found()),
                Method::PATCH => {
                    let body = request.into_body().collect_bytes().await.unwrap();
                    patched.push(path);
                    send.send_response(Response::builder().body(Body::from(body)).unwrap());
                }
                other => panic!("unexpected {other} {path}"),
            }
        }
        assert_eq!(owned_selectors.len(), 3, "{owned_selectors:?}");
        for query in &owned_selectors {
            assert!(
                query.contains(
                    "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dmeshbox%2Cgateway.networking.k8s.io%2Fgateway-name"
                ),
                "{query}"
            );
        }
        assert!(
            patched
                .iter()
                .all(|p| p.contains("/namespaces/shop/") && !p.contains("ingress")),
            "{patched:?}"
        );
        for object in ["serviceaccounts/wp", "services/wp", "deployments/wp"] {
            assert!(
                patched.iter().any(|p| p.ends_with(object)),
                "{object}: {patched:?}"
            );
        }
    }

    /// A Gateway that moved from istio-waypoint to another class: what was
    /// deployed for it goes (a user's object of the same name stays), and
    /// the status it was given is withdrawn.
    #[tokio::test]
    async fn a_gateway_moved_to_another_class_loses_its_waypoint() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let gw: Gateway = serde_json::from_value(json!({
            "metadata": {"name": "wp", "namespace": "shop", "uid": "u-1",
                         "managedFields": [{"manager": FIELD_MANAGER, "operation": "Apply", "subresource": "status"}]},
            "spec": {"gatewayClassName": "istio"},
        }))
        .unwrap();
        let ours = deployed_objects_metadata(&gw);
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let body = request.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let response = match (&method, path.as_str()) {
                    // Ours: the Deployment. A user's: the Service. None: the ServiceAccount.
                    (&Method::GET, "/apis/apps/v1/namespaces/shop/deployments/wp") => json!({
                        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": ours,
                    }),
                    (&Method::GET, "/api/v1/namespaces/shop/services/wp") => json!({
                        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                        "metadata": {"name": "wp", "namespace": "shop", "uid": "user-svc"},
                    }),
                    (&Method::GET, _) => {
                        send.send_response(not_found());
                        continue;
                    }
                    (&Method::DELETE, _) => {
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})
                    }
                    _ => body.clone(),
                };
                seen.push((method, path, body));
                send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&response).unwrap()))
                        .unwrap(),
                );
            }
            seen
        });
        let action = reconcile(Arc::new(gw), context(service)).await.unwrap();
        assert_eq!(action, Action::await_change());
        let seen = server.await.unwrap();
        let writes: Vec<(Method, &str)> = seen
            .iter()
            .filter(|(m, _, _)| m != Method::GET)
            .map(|(m, p, _)| (m.clone(), p.as_str()))
            .collect();
        assert_eq!(
            writes,
            [
                (
                    Method::DELETE,
                    "/apis/apps/v1/namespaces/shop/deployments/wp"
                ),
                (
                    Method::PATCH,
                    "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/wp/status"
                ),
            ]
        );
        let delete = &seen.iter().find(|(m, _, _)| m == Method::DELETE).unwrap().2;
        assert_eq!(delete["preconditions"]["uid"], "deployment-uid");
        let status_apply = &seen.last().unwrap().2;
        assert!(status_apply.get("status").is_none(), "{status_apply}");
    }

    /// The metadata the controller gives a Deployment for `gw`, as the API
    /// server would return it (with a uid).
    fn deployed_objects_metadata(gw: &Gateway) -> Value {
        let mut as_waypoint = gw.clone();
        as_waypoint.spec.gateway_class_name = "istio-waypoint".into();
        let Plan::Deploy(objects) = plan(&as_waypoint, &settings()) else {
            panic!("a deployment");
        };
        let mut meta = serde_json::to_value(&objects.deployment.metadata).unwrap();
        meta["uid"] = json!("deployment-uid");
        meta
    }

    #[tokio::test]
    async fn other_classes_and_deleted_gateways_cause_no_request() {
        for gw in [gateway("istio"), {
            let mut gw = gateway("istio-waypoint");
            gw.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
            gw
        }] {
            let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let server = tokio::spawn(serve(handle));
            let action = reconcile(Arc::new(gw), context(service)).await.unwrap();
            assert_eq!(action, Action::await_change());
            assert!(server.await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn an_invalid_name_gets_only_a_status_saying_why() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve(handle));
        let gw: Gateway = serde_json::from_value(json!({
            "metadata": {"name": "my.waypoint", "namespace": "shop", "uid": "u-1"},
            "spec": {"gatewayClassName": "istio-waypoint"},
        }))
        .unwrap();
        reconcile(Arc::new(gw), context(service)).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].1,
            "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/my.waypoint/status"
        );
        assert_eq!(seen[0].3["status"]["conditions"][0]["status"], "False");
        assert_eq!(seen[0].3["status"]["conditions"][0]["reason"], "Invalid");
    }

    /// A refused apply is an error (retried by the error policy), and the
    /// status is not written as if it had worked.
    #[tokio::test]
    async fn a_refused_apply_is_an_error_and_writes_no_status() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut paths = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                if request.method() == Method::GET {
                    send.send_response(not_found());
                    continue;
                }
                paths.push(request.uri().path().to_owned());
                let forbidden = json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "forbidden", "reason": "Forbidden", "code": 403
                });
                send.send_response(
                    Response::builder()
                        .status(403)
                        .body(Body::from(serde_json::to_vec(&forbidden).unwrap()))
                        .unwrap(),
                );
            }
            paths
        });
        let error = reconcile(Arc::new(gateway("istio-waypoint")), context(service))
            .await
            .expect_err("a refused apply fails the reconcile");
        assert!(
            error.to_string().contains("ServiceAccount shop/wp"),
            "{error}"
        );
        let paths = server.await.unwrap();
        assert!(paths.iter().all(|p| !p.ends_with("/status")), "{paths:?}");
    }
}
