//! Our dataplane's xDS client against the real `controlplane run` binary on a
//! manifest folder, over TLS with a node token, as a deployment would run it.

mod support;

use std::time::{Duration, Instant};

use meshbox_dataplane::xds::{ClientOptions, Credentials, XdsClient, XdsState, node};
use support::*;

async fn wait_for(client: &XdsClient, what: &str, check: impl Fn(&XdsState) -> bool) -> XdsState {
    let mut state = client.state();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        {
            let now = state.borrow_and_update();
            if check(&now) {
                return now.clone();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            tokio::time::timeout(left, state.changed()).await.is_ok(),
            "timed out waiting for {what}"
        );
    }
}

/// A dataplane's xDS client for node-1 (the node four of the example pods
/// run on), over TLS with a node token.
fn node_1_client(cp: &ControlPlane) -> XdsClient {
    let channel = grpc_channel(cp).connect_lazy();
    let options = ClientOptions::new(
        Credentials::Bearer(cp.token_for_node("node-1")),
        node("meshbox-dataplane~node-1", [("NODE_NAME", "node-1")]),
    );
    XdsClient::start(channel, options)
}

#[tokio::test]
async fn a_dataplane_syncs_over_tls_and_follows_folder_edits() {
    meshbox_certs::install_crypto_provider();
    let cp = start_bookinfo();
    let client = node_1_client(&cp);

    let state = wait_for(&client, "the initial sync", |s| s.is_synced()).await;
    let reviews = "Kubernetes//Pod/bookinfo/reviews-v1-5b8f6c7d9-p7r4s";
    assert!(
        state.addresses.contains_key(reviews),
        "{:?}",
        state.addresses.keys()
    );
    assert!(
        state
            .addresses
            .contains_key("bookinfo/reviews.bookinfo.svc.cluster.local")
    );
    assert!(
        state
            .authorizations
            .contains_key("bookinfo/reviews-from-productpage")
    );

    // The control plane lists this stream, by node.
    let (status, body) = curl(&cp, &[], "/api/v1/dataplanes");
    assert_eq!(status, 200);
    let dataplanes: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dataplanes[0]["node"], "node-1", "{dataplanes:#}");
    // The peer's real socket address, though TLS is terminated in front of
    // tonic.
    let remote: std::net::SocketAddr = dataplanes[0]["remoteAddr"]
        .as_str()
        .unwrap_or_else(|| panic!("no remoteAddr: {dataplanes:#}"))
        .parse()
        .unwrap();
    assert!(remote.ip().is_loopback(), "{remote}");
    assert_ne!(remote.port(), 0);
    assert_ne!(remote.port(), cp.grpc.port(), "{remote} is our own address");

    // Delete a policy from the folder: the dataplane loses it.
    let policies = cp.config.join("policies.yaml");
    let text = std::fs::read_to_string(&policies).unwrap();
    let without: Vec<&str> = text
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: ratings-from-reviews"))
        .collect();
    std::fs::write(&policies, without.join("\n---\n")).unwrap();
    wait_for(&client, "the policy removal", |s| {
        !s.authorizations
            .contains_key("bookinfo/ratings-from-reviews")
            && s.authorizations
                .contains_key("bookinfo/reviews-from-productpage")
    })
    .await;

    // A stream without a token is refused.
    let channel = grpc_channel(&cp).connect().await.unwrap();
    let mut raw =
        meshbox_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(channel);
    let request = meshbox_proto::xds::DeltaDiscoveryRequest {
        type_url: meshbox_proto::ADDRESS_TYPE_URL.into(),
        ..Default::default()
    };
    let refused = raw
        .delta_aggregated_resources(tokio_stream::iter(vec![request]))
        .await;
    let status = match refused {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            match stream.message().await {
                Err(status) => status,
                Ok(m) => panic!("unauthenticated stream got {m:?}"),
            }
        }
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.message(),
        "no bearer token: send 'Authorization: Bearer <token>'"
    );
}

fn listed_policies(state: &XdsState, uid: &str) -> Vec<String> {
    match state
        .addresses
        .get(uid)
        .and_then(|a| a.resource.r#type.clone())
    {
        Some(meshbox_proto::workload::address::Type::Workload(w)) => w.authorization_policies,
        _ => Vec::new(),
    }
}

/// A PeerAuthentication written into the folder reaches a dataplane as
/// istiod's converted form: the Workloads list it and the Authorization
/// resources arrive with them; edits and removal follow as deltas.
#[tokio::test]
async fn peer_authentications_reach_the_dataplane_as_converted_policies() {
    use meshbox_proto::security::{Action, Scope};

    meshbox_certs::install_crypto_provider();
    let cp = start_bookinfo();
    let client = node_1_client(&cp);
    let reviews = "Kubernetes//Pod/bookinfo/reviews-v1-5b8f6c7d9-p7r4s";
    let state = wait_for(&client, "the initial sync", |s| s.is_synced()).await;
    assert_eq!(
        listed_policies(&state, reviews),
        ["bookinfo/reviews-from-productpage"]
    );
    let strict = "istio-system/istio_converted_static_strict";
    let converted = "bookinfo/converted_peer_authentication_reviews-ports";

    // Namespace-wide STRICT: every bookinfo workload lists the static policy.
    let file = cp.config.join("peer-authentication.yaml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: bookinfo}\nspec: {mtls: {mode: STRICT}}\n",
    )
    .unwrap();
    let state = wait_for(&client, "the static STRICT policy", |s| {
        listed_policies(s, reviews).contains(&strict.to_string())
            && s.authorizations.contains_key(strict)
    })
    .await;
    assert_eq!(
        listed_policies(&state, reviews),
        ["bookinfo/reviews-from-productpage", strict]
    );
    let static_policy = &state.authorizations[strict].resource;
    assert_eq!(static_policy.action, Action::Deny as i32);
    assert_eq!(static_policy.scope, Scope::WorkloadSelector as i32);
    assert_eq!(static_policy.rules.len(), 1);

    // A workload policy exempting a port: reviews lists its converted form
    // instead.
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: bookinfo}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: reviews-ports, namespace: bookinfo}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  portLevelMtls:\n    9080: {mode: PERMISSIVE}\n",
    )
    .unwrap();
    let state = wait_for(&client, "the converted workload policy", |s| {
        listed_policies(s, reviews).contains(&converted.to_string())
            && s.authorizations.contains_key(converted)
    })
    .await;
    assert_eq!(
        listed_policies(&state, reviews),
        [converted, "bookinfo/reviews-from-productpage"]
    );
    let port_policy = &state.authorizations[converted].resource;
    assert_eq!(port_policy.action, Action::Deny as i32);
    assert_eq!(port_policy.rules.len(), 1);
    assert_eq!(
        port_policy.rules[0].clauses[0].matches[0].not_destination_ports,
        [9080]
    );

    // The REST API names where the converted policies came from.
    let (status, body) = curl(&cp, &[], "/api/v1/policies");
    assert_eq!(status, 200);
    let policies: serde_json::Value = serde_json::from_str(&body).unwrap();
    let by_name = |name: &str| {
        policies
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {policies:#}"))
    };
    let p = by_name("converted_peer_authentication_reviews-ports");
    assert_eq!(
        p["convertedFrom"],
        serde_json::json!([{"kind": "PeerAuthentication", "namespace": "bookinfo", "name": "reviews-ports"}])
    );
    assert_eq!(
        p["rules"][0][0][0]["notDestinationPorts"],
        serde_json::json!([9080])
    );
    assert!(
        by_name("reviews-from-productpage")
            .get("convertedFrom")
            .is_none()
    );

    // Removing the file removes every trace.
    std::fs::remove_file(&file).unwrap();
    let state = wait_for(&client, "the removal", |s| {
        !s.authorizations.contains_key(strict)
            && !s.authorizations.contains_key(converted)
            && listed_policies(s, reviews) == ["bookinfo/reviews-from-productpage"]
    })
    .await;
    assert_eq!(
        listed_policies(&state, reviews),
        ["bookinfo/reviews-from-productpage"]
    );
}

const WAYPOINT_CONFIG: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-split, namespace: bookinfo}
spec:
  parentRefs:
  - {group: \"\", kind: Service, name: reviews, port: 9080}
  rules:
  - backendRefs:
    - {name: reviews, port: 9080, weight: 90}
    - {name: reviews-v9, port: 9080, weight: 10}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get-only, namespace: bookinfo}
spec:
  targetRefs:
  - {group: \"\", kind: Service, name: reviews}
  rules:
  - to:
    - operation: {methods: [GET]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bound-to-nothing, namespace: bookinfo}
spec:
  targetRefs:
  - {group: \"\", kind: Service, name: nope}
  action: DENY
";

/// The next response on `rx`, which must be of `type_url`.
async fn next_of(
    rx: &mut tonic::Streaming<meshbox_proto::xds::DeltaDiscoveryResponse>,
    type_url: &str,
) -> meshbox_proto::xds::DeltaDiscoveryResponse {
    let r = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("a response in time")
        .expect("the stream stays up")
        .expect("a message");
    assert_eq!(r.type_url, type_url, "{r:?}");
    r
}

#[tokio::test]
async fn a_waypoint_gets_its_routes_and_policies_from_the_folder_and_is_listed() {
    use meshbox_proto::meshbox::{WaypointPolicy, WaypointRoute};
    use meshbox_proto::xds::DeltaDiscoveryRequest;
    use prost::Message;

    meshbox_certs::install_crypto_provider();
    if !have_tool("curl") {
        return;
    }
    let mut files = example_manifests();
    files.push(("waypoint-config.yaml".into(), WAYPOINT_CONFIG.into()));
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_str()))
        .collect();
    let cp = ControlPlane::start(&refs, &[]);

    // A waypoint's stream: its own identity, its Gateway in the node.
    let identity = "spiffe://cluster.local/ns/bookinfo/sa/reviews-waypoint";
    let token = cp.token_for_identity(identity);
    let channel = grpc_channel(&cp).connect().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut responses = meshbox_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(request)
        .await
        .unwrap()
        .into_inner();
    let first = |type_url: &str| DeltaDiscoveryRequest {
        node: Some(node(
            "waypoint~bookinfo/reviews-waypoint~reviews-waypoint-6c9d",
            [("WAYPOINT", "bookinfo/reviews-waypoint")],
        )),
        type_url: type_url.into(),
        ..Default::default()
    };
    tx.send(first(meshbox_proto::WAYPOINT_ROUTE_TYPE_URL))
        .await
        .unwrap();

    let r = next_of(&mut responses, meshbox_proto::WAYPOINT_ROUTE_TYPE_URL).await;
    assert_eq!(r.resources.len(), 1, "{r:?}");
    let route =
        WaypointRoute::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(r.resources[0].name, "bookinfo/reviews-split");
    assert_eq!(route.parents[0].waypoint, "bookinfo/reviews-waypoint");
    assert_eq!(
        route.parents[0].service,
        "bookinfo/reviews.bookinfo.svc.cluster.local"
    );
    assert_eq!(route.rules[0].backends[1].error, "backend not found");
    let ack = |r: &meshbox_proto::xds::DeltaDiscoveryResponse| DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    };
    tx.send(ack(&r)).await.unwrap();

    // One type at a time, so no response is skipped while waiting.
    tx.send(first(meshbox_proto::WAYPOINT_POLICY_TYPE_URL))
        .await
        .unwrap();
    let p = next_of(&mut responses, meshbox_proto::WAYPOINT_POLICY_TYPE_URL).await;
    let policy =
        WaypointPolicy::decode(p.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(p.resources[0].name, "bookinfo/reviews-get-only");
    assert_eq!(policy.targets[0].waypoint, "bookinfo/reviews-waypoint");
    assert_eq!(policy.rules[0].to[0].methods, ["GET"]);
    tx.send(ack(&p)).await.unwrap();

    // The REST API: where the policy is enforced, and the waypoint with
    // what it enforces and who serves it.
    let (status, body) = curl(&cp, &[], "/api/v1/policies");
    assert_eq!(status, 200);
    let policies: serde_json::Value = serde_json::from_str(&body).unwrap();
    let by_name = |n: &str| {
        policies
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} missing from {policies:#}"))
    };
    assert_eq!(
        by_name("reviews-get-only")["enforcedBy"],
        serde_json::json!(["waypoint bookinfo/reviews-waypoint"])
    );
    assert_eq!(
        by_name("reviews-from-productpage")["enforcedBy"],
        serde_json::json!(["node proxies"])
    );
    let lost = by_name("bound-to-nothing");
    assert_eq!(lost["enforcedBy"], serde_json::json!([]));
    assert_eq!(lost["scope"], "NONE");
    assert_eq!(lost["action"], "DENY");
    let (status, body) = curl(&cp, &[], "/api/v1/waypoints");
    assert_eq!(status, 200);
    let waypoints: serde_json::Value = serde_json::from_str(&body).unwrap();
    let w = &waypoints[0];
    assert_eq!(w["name"], "reviews-waypoint");
    assert_eq!(w["routes"], serde_json::json!(["bookinfo/reviews-split"]));
    assert_eq!(
        w["policies"],
        serde_json::json!(["bookinfo/reviews-get-only"])
    );
    assert_eq!(w["proxies"].as_array().unwrap().len(), 1, "{w:#}");
    assert_eq!(
        w["proxies"][0]["nodeId"],
        "waypoint~bookinfo/reviews-waypoint~reviews-waypoint-6c9d"
    );
    assert_eq!(w["proxies"][0]["identity"], identity);
    assert!(w["proxies"][0]["connectedSince"].is_string());

    // An edit to the route in the folder: exactly that route is sent again.
    std::fs::write(
        cp.config.join("waypoint-config.yaml"),
        WAYPOINT_CONFIG.replace("weight: 10", "weight: 20"),
    )
    .unwrap();
    let r = next_of(&mut responses, meshbox_proto::WAYPOINT_ROUTE_TYPE_URL).await;
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "bookinfo/reviews-split");
    let route =
        WaypointRoute::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(route.rules[0].backends[1].weight, 20);
}
