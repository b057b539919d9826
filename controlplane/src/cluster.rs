//! What the control plane keeps *in* the cluster in Kubernetes mode: its CA
//! (a Secret in its own namespace, so every replica and restart signs with
//! the same root) and the root certificate published as ConfigMap
//! `istio-ca-root-cert`, where Istio tooling looks: in each enrolled
//! namespace, and in the control plane's own namespace, whose node proxies
//! mount it to trust the control plane (as Istio's ztunnel does in
//! `istio-system`). The waypoint controller also publishes it into each
//! waypoint Gateway's namespace, where the waypoint pods mount it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use meshbox_certs::ca::{CaPolicy, CertificateAuthority};

/// Istio's name for a user-supplied CA Secret; used when present.
const PLUGGED_CA_SECRET: &str = "cacerts";
/// Where meshbox keeps the root it made itself.
const SELF_SIGNED_CA_SECRET: &str = "meshbox-ca";
/// The ConfigMap Istio's tooling reads the root from.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";
const FIELD_MANAGER: &str = "meshbox-controlplane";
const ENROLL_LABEL: &str = "istio.io/dataplane-mode";
/// How often every published ConfigMap is re-applied, undoing hand edits.
const RESYNC: Duration = Duration::from_secs(300);

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// The CA from Secret `cacerts` (Istio's layout) if present, else from
/// Secret `meshbox-ca`, created on first start.
pub async fn load_or_create_ca(
    client: kube::Client,
    namespace: &str,
    policy: CaPolicy,
) -> anyhow::Result<CertificateAuthority> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(plugged) = secrets.get_opt(PLUGGED_CA_SECRET).await? {
        let data = plugged.data.unwrap_or_default();
        if let (Some(cert), Some(key), Some(root)) = (
            text(&data, "ca-cert.pem"),
            text(&data, "ca-key.pem"),
            text(&data, "root-cert.pem"),
        ) {
            let chain = text(&data, "cert-chain.pem").unwrap_or_default();
            tracing::info!(secret = PLUGGED_CA_SECRET, "using the plugged-in CA");
            return Ok(CertificateAuthority::from_cacerts_pem(
                &cert, &key, &chain, &root, policy,
            )?);
        }
        anyhow::bail!(
            "Secret {namespace}/{PLUGGED_CA_SECRET} lacks ca-cert.pem, ca-key.pem or root-cert.pem"
        );
    }
    loop {
        if let Some(existing) = secrets.get_opt(SELF_SIGNED_CA_SECRET).await? {
            let data = existing.data.unwrap_or_default();
            let (Some(cert), Some(key)) =
                (text(&data, "root-cert.pem"), text(&data, "root-key.pem"))
            else {
                anyhow::bail!(
                    "Secret {namespace}/{SELF_SIGNED_CA_SECRET} lacks root-cert.pem or root-key.pem"
                );
            };
            return Ok(CertificateAuthority::from_root_pem(&cert, &key, policy)?);
        }
        let (ca, cert, key) = CertificateAuthority::create_root(policy.clone())?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(SELF_SIGNED_CA_SECRET.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                ("root-cert.pem".into(), ByteString(cert.into_bytes())),
                ("root-key.pem".into(), ByteString(key.into_bytes())),
            ])),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = SELF_SIGNED_CA_SECRET, "created a new root CA");
                return Ok(ca);
            }
            // Another replica won the race: use its root.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn enrolled(ns: &Namespace) -> bool {
    ns.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ENROLL_LABEL))
        .is_some_and(|v| v == "ambient")
}

/// Whether `ns` gets the root ConfigMap: enrolled namespaces, and the
/// control plane's own (`own`) whatever its labels, because the node
/// proxies running there need the root before they can reach us.
fn wants_root(ns: &Namespace, own: &str) -> bool {
    enrolled(ns) || ns.metadata.name.as_deref() == Some(own)
}

/// Keeps `istio-ca-root-cert` in every enrolled namespace and in
/// `own_namespace`.
pub fn publish_root_configmaps(client: kube::Client, root_pem: String, own_namespace: String) {
    let root_pem = Arc::new(root_pem);
    tokio::spawn(async move {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let mut events = watcher::watcher(namespaces, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut resync = tokio::time::interval(RESYNC);
        let mut enrolled_names: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                event = events.next() => {
                    let Some(event) = event else { return };
                    match event {
                        Ok(Event::Apply(ns)) | Ok(Event::InitApply(ns)) if wants_root(&ns, &own_namespace) => {
                            if let Some(name) = ns.metadata.name {
                                publish_root(&client, &name, &root_pem).await;
                                if !enrolled_names.contains(&name) {
                                    enrolled_names.push(name);
                                }
                            }
                        }
                        Ok(Event::Apply(ns)) | Ok(Event::Delete(ns)) => {
                            if let Some(name) = ns.metadata.name {
                                enrolled_names.retain(|n| n != &name);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "namespace watch error; retrying"),
                    }
                }
                _ = resync.tick() => {
                    for name in &enrolled_names {
                        publish_root(&client, name, &root_pem).await;
                    }
                }
            }
        }
    });
}

pub(crate) async fn publish_root(client: &kube::Client, namespace: &str, root_pem: &str) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".into(),
                "meshbox".into(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            ROOT_CONFIGMAP_KEY.into(),
            root_pem.to_owned(),
        )])),
        ..Default::default()
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(ROOT_CONFIGMAP, &params, &Patch::Apply(&cm)).await {
        Ok(_) => tracing::debug!(%namespace, "published the root certificate"),
        Err(e) => tracing::warn!(%namespace, error = %e, "publishing the root certificate failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    #[tokio::test]
    async fn publishes_the_root_with_server_side_apply() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a request");
            assert_eq!(request.method(), http::Method::PATCH);
            assert_eq!(
                request.uri().path(),
                "/api/v1/namespaces/shop/configmaps/istio-ca-root-cert"
            );
            assert!(
                request
                    .uri()
                    .query()
                    .unwrap_or_default()
                    .contains("fieldManager=meshbox-controlplane")
            );
            let body = request.into_body().collect_bytes().await.unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(sent["data"]["root-cert.pem"], "ROOT PEM");
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&sent).unwrap()))
                    .unwrap(),
            );
        });
        publish_root(&client, "shop", "ROOT PEM").await;
        server.await.unwrap();
    }

    /// The control plane's own namespace gets the root although it is not
    /// enrolled (its node proxies mount it); other unenrolled namespaces
    /// do not.
    #[tokio::test]
    async fn publishes_to_enrolled_namespaces_and_its_own() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        publish_root_configmaps(client, "ROOT PEM".into(), "meshbox-system".into());
        let namespace = |name: &str, labels: serde_json::Value| serde_json::json!({"metadata": {"name": name, "labels": labels}});
        let list = serde_json::json!({
            "apiVersion": "v1",
            "kind": "NamespaceList",
            "metadata": {"resourceVersion": "1"},
            "items": [
                namespace("meshbox-system", serde_json::json!({})),
                namespace("other", serde_json::json!({"istio.io/dataplane-mode": "none"})),
                namespace("shop", serde_json::json!({"istio.io/dataplane-mode": "ambient"})),
            ],
        });
        let mut patched = Vec::new();
        // Watch requests are left unanswered (held open) so the watcher
        // waits instead of relisting.
        let mut held = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let shop = "/api/v1/namespaces/shop/configmaps/istio-ca-root-cert";
        while !patched.iter().any(|p| p == shop) {
            let (request, send) = tokio::time::timeout_at(deadline, handle.next_request())
                .await
                .expect("the publisher made its requests in time")
                .expect("a request");
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            match *request.method() {
                http::Method::GET if path == "/api/v1/namespaces" && !query.contains("watch") => {
                    send.send_response(
                        Response::builder()
                            .body(Body::from(serde_json::to_vec(&list).unwrap()))
                            .unwrap(),
                    );
                }
                http::Method::GET => held.push(send),
                http::Method::PATCH => {
                    let body = request.into_body().collect_bytes().await.unwrap();
                    let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(sent["data"]["root-cert.pem"], "ROOT PEM");
                    patched.push(path);
                    send.send_response(
                        Response::builder()
                            .body(Body::from(serde_json::to_vec(&sent).unwrap()))
                            .unwrap(),
                    );
                }
                ref other => panic!("unexpected {other} {path}"),
            }
        }
        // Namespaces are handled in list order, so "other" (listed before
        // shop) was skipped, not still pending. The periodic re-publish may
        // repeat a namespace; only which ones counts.
        patched.sort();
        patched.dedup();
        assert_eq!(
            patched,
            [
                "/api/v1/namespaces/meshbox-system/configmaps/istio-ca-root-cert",
                shop,
            ]
        );
    }
}
