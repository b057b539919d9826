//! Delta ADS conformance of the xDS server, wired as `controlplane run`
//! wires it: over TLS on 127.0.0.1 with the serving certificate from our
//! CA, streams authenticated with real node tokens by the real
//! `LocalTokens`; driven by our client library or by raw tonic streams.
//! Only `plaintext_port_serves_the_same_xds_and_still_requires_a_token`
//! runs without TLS.

#[path = "xds_common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshbox_controlplane::auth::local::LocalTokens;
use meshbox_controlplane::xds::XdsOptions;
use meshbox_dataplane::xds::{Answer, ResourceType, Validator, XdsClient, XdsState};
use meshbox_proto::google::rpc::Status as RpcStatus;
use meshbox_proto::workload::{Address, address};
use meshbox_proto::xds::DeltaDiscoveryRequest;
use prost::Message;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig};

/// How long a silence check listens. The tests that check for silence run
/// on tokio's paused clock: virtual time only moves when the server and the
/// client are both idle, so "nothing in 250 ms" means "nothing the server
/// would ever send on its own", however slow the machine, not "nothing
/// that happened to be fast enough".
const SHORT: Duration = Duration::from_millis(250);

fn tag_of(a: &Address) -> String {
    match &a.r#type {
        Some(address::Type::Workload(w)) => w.canonical_revision.clone(),
        _ => String::new(),
    }
}

fn decode_tag(r: &meshbox_proto::xds::Resource) -> String {
    let any = r.resource.as_ref().unwrap();
    tag_of(&Address::decode(any.value.as_slice()).unwrap())
}

#[tokio::test]
async fn initial_wildcard_sync_of_both_types() {
    let h = Harness::start().await;
    let (svc_name, svc) = service("reviews", [10, 96, 0, 1]);
    h.server.update(
        [
            (uid("a"), Some(workload("a", [10, 0, 0, 1], "v1"))),
            (uid("b"), Some(workload("b", [10, 0, 0, 2], "v1"))),
            (svc_name.clone(), Some(svc.clone())),
        ],
        [policy("deny-80", 80), policy("deny-81", 81)],
    );
    let client = h.client();
    wait_state(&client, "both types synced", |s| {
        s.is_synced() && s.addresses.len() == 3 && s.authorizations.len() == 2
    })
    .await;
    let state = client.state().borrow().clone();
    assert_eq!(
        *state.addresses[&uid("a")].resource,
        *workload("a", [10, 0, 0, 1], "v1")
    );
    assert_eq!(*state.addresses[&svc_name].resource, *svc);
    let (name, expected) = policy("deny-81", 81);
    assert_eq!(*state.authorizations[&name].resource, *expected.unwrap());
    // Versions are per resource and differ between resources.
    assert_ne!(
        state.addresses[&uid("a")].version,
        state.addresses[&uid("b")].version
    );

    // A server with nothing still answers, so a client knows it is in sync.
    let empty = Harness::start().await;
    let client = empty.client();
    wait_state(&client, "empty sync", |s| s.is_synced()).await;
}

#[tokio::test(start_paused = true)]
async fn add_update_remove_are_sent_as_deltas() {
    let h = Harness::start().await;
    h.put_workloads([
        (uid("a"), workload("a", [10, 0, 0, 1], "v1")),
        (uid("b"), workload("b", [10, 0, 0, 2], "v1")),
    ]);
    let mut s = h.stream().await;
    s.send(wildcard(ADDRESS)).await;
    let r = s.recv().await;
    assert_eq!(r.type_url, ADDRESS);
    assert_eq!(sorted_names(&r), vec![uid("a"), uid("b")]);
    assert!(r.removed_resources.is_empty());
    assert!(!r.nonce.is_empty());
    let first_version = r.resources[0].version.clone();
    s.ack(&r).await;

    // Feeding identical content is not a change.
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    s.expect_silence(SHORT).await;

    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v2"))]);
    let r = s.recv().await;
    assert_eq!(
        sorted_names(&r),
        vec![uid("a")],
        "only the changed resource"
    );
    assert_eq!(decode_tag(&r.resources[0]), "v2");
    assert!(r.resources.iter().all(|x| x.version != first_version));
    s.ack(&r).await;

    h.put_workloads([(uid("c"), workload("c", [10, 0, 0, 3], "v1"))]);
    let r = s.recv().await;
    assert_eq!(sorted_names(&r), vec![uid("c")]);
    s.ack(&r).await;

    h.remove_addresses(&[&uid("b")]);
    let r = s.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, vec![uid("b")]);
    s.ack(&r).await;
    s.expect_silence(SHORT).await;
}

#[tokio::test(start_paused = true)]
async fn nacked_version_is_not_resent_until_it_changes() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    let mut s = h.stream().await;
    s.send(wildcard(ADDRESS)).await;
    let r = s.recv().await;
    s.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        response_nonce: r.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "a: unsupported tunnel protocol".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    // Asking for it again does not bring the rejected version back.
    s.send(subscribe(ADDRESS, &[&uid("a")])).await;
    s.expect_silence(SHORT).await;
    assert_eq!(
        h.metric(
            "meshbox_xds_nacks_total",
            &format!("type_url=\"{ADDRESS}\"")
        ),
        1.0
    );
    let infos = h.server.connections();
    let address = infos[0]
        .types
        .iter()
        .find(|t| t.type_url == ADDRESS)
        .unwrap();
    let nack = address.last_nack.as_ref().expect("NACK recorded");
    assert!(nack.message.contains("unsupported tunnel protocol"));
    assert_eq!(nack.version, r.system_version_info);

    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v2"))]);
    let r = s.recv().await;
    assert_eq!(sorted_names(&r), vec![uid("a")]);
    assert_eq!(decode_tag(&r.resources[0]), "v2");
}

#[tokio::test]
async fn client_nacks_what_its_validator_rejects() {
    let h = Harness::start().await;
    h.put_workloads([
        (uid("a"), workload("a", [10, 0, 0, 1], "ok")),
        (uid("b"), workload("b", [10, 0, 0, 2], "bad")),
    ]);
    let mut options = h.client_options();
    let validator: Validator = Arc::new(|_, resource| match resource {
        meshbox_dataplane::xds::ResourceRef::Address(a) if tag_of(a) == "bad" => {
            Err("tag 'bad' is not allowed".into())
        }
        _ => Ok(()),
    });
    options.validator = Some(validator);
    let client = XdsClient::start(h.channel(), options);
    wait_state(&client, "a accepted, b rejected", |s| {
        s.is_synced() && s.addresses.contains_key(&uid("a")) && s.nacks == 1
    })
    .await;
    assert!(!client.state().borrow().addresses.contains_key(&uid("b")));
    wait_until("server counted the NACK", || {
        h.metric("meshbox_xds_nacks_total", "") == 1.0
    })
    .await;
    h.put_workloads([(uid("b"), workload("b", [10, 0, 0, 2], "fixed"))]);
    wait_state(&client, "fixed b accepted", |s| {
        s.addresses
            .get(&uid("b"))
            .is_some_and(|r| tag_of(&r.resource) == "fixed")
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn reconnect_with_initial_versions_gets_only_changes() {
    let h = Harness::start().await;
    h.put_workloads([
        (uid("a"), workload("a", [10, 0, 0, 1], "v1")),
        (uid("b"), workload("b", [10, 0, 0, 2], "v1")),
        (uid("c"), workload("c", [10, 0, 0, 3], "v1")),
    ]);
    let mut s = h.stream().await;
    s.send(wildcard(ADDRESS)).await;
    let r = s.recv().await;
    let mut held: HashMap<String, String> = r
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(s);

    h.put_workloads([
        (uid("a"), workload("a", [10, 0, 0, 1], "v2")),
        (uid("d"), workload("d", [10, 0, 0, 4], "v1")),
    ]);
    h.remove_addresses(&[&uid("b")]);
    held.insert("ghost".into(), "0123".into());

    let mut s = h.stream().await;
    let mut first = wildcard(ADDRESS);
    first.initial_resource_versions = held;
    s.send(first).await;
    let r = s.recv().await;
    assert_eq!(sorted_names(&r), vec![uid("a"), uid("d")]);
    assert_eq!(sorted_removed(&r), vec![uid("b"), "ghost".to_string()]);
    s.expect_silence(SHORT).await;
}

#[tokio::test]
async fn client_library_reconnects_and_receives_only_what_changed() {
    let h = Harness::start().await;
    h.put_workloads((0..50).map(|i| {
        let name = format!("w{i}");
        (uid(&name), workload(&name, [10, 1, 0, i as u8], "v1"))
    }));
    let proxy = Proxy::start(h.addr).await;
    let client = XdsClient::start(
        h.endpoint_via(proxy.addr).connect_lazy(),
        h.client_options(),
    );
    wait_state(&client, "first sync", |s| {
        s.is_synced() && s.addresses.len() == 50
    })
    .await;
    let sent_before = h.metric("meshbox_xds_resources_sent_total", "");

    proxy.sever();
    wait_until("server saw the stream end", || {
        h.server.connections().is_empty()
    })
    .await;
    h.put_workloads([(uid("w7"), workload("w7", [10, 1, 0, 7], "v2"))]);
    h.remove_addresses(&[&uid("w8")]);

    wait_state(&client, "second stream in sync", |s| {
        s.streams >= 2
            && s.is_synced()
            && s.addresses.len() == 49
            && s.addresses
                .get(&uid("w7"))
                .is_some_and(|r| tag_of(&r.resource) == "v2")
    })
    .await;
    let sent_after = h.metric("meshbox_xds_resources_sent_total", "");
    assert_eq!(sent_after - sent_before, 1.0, "only w7 was sent again");
}

#[tokio::test]
async fn on_demand_by_name_and_ip_with_not_found_and_unsubscribe() {
    let h = Harness::start().await;
    let (svc_name, svc) = service("reviews", [10, 96, 0, 1]);
    h.put_workloads([
        (uid("a"), workload("a", [10, 0, 0, 1], "v1")),
        (uid("b"), workload("b", [10, 0, 0, 2], "v1")),
        (svc_name.clone(), svc),
    ]);
    // On another node than the workloads: an on-demand client also gets
    // its own node's workloads (see the test after the next).
    let mut options = h.client_options_on("worker-2");
    options.wildcard = vec![ResourceType::Authorization];
    let client = XdsClient::start(h.channel(), options);
    wait_state(&client, "synced, nothing on demand yet", |s| {
        s.is_synced() && s.addresses.is_empty()
    })
    .await;

    let demand = |name: String| {
        let client = client.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(5),
                client.demand(ResourceType::Address, name),
            )
            .await
            .expect("answered in time")
            .expect("client running")
        }
    };
    assert_eq!(demand(uid("a")).await, Answer::Found(vec![uid("a")]));
    assert_eq!(
        demand("/10.0.0.2".into()).await,
        Answer::Found(vec![uid("b")])
    );
    assert_eq!(
        demand("/10.96.0.1".into()).await,
        Answer::Found(vec![svc_name.clone()])
    );
    assert_eq!(
        demand("default/nope.default.svc.cluster.local".into()).await,
        Answer::NotFound
    );
    assert_eq!(demand("/10.9.9.9".into()).await, Answer::NotFound);
    {
        let state = client.state().borrow().clone();
        assert_eq!(state.addresses.len(), 3);
        assert_eq!(
            state.addresses[&uid("b")].aliases,
            vec!["/10.0.0.2".to_string()]
        );
    }

    // Subscribed names follow changes; others are not sent.
    h.put_workloads([
        (uid("c"), workload("c", [10, 0, 0, 3], "v1")),
        (uid("a"), workload("a", [10, 0, 0, 1], "v2")),
    ]);
    wait_state(&client, "a updated", |s| {
        s.addresses
            .get(&uid("a"))
            .is_some_and(|r| tag_of(&r.resource) == "v2")
    })
    .await;
    // A new workload at a looked-up IP is sent as well.
    h.put_workloads([(uid("b2"), workload("b2", [10, 0, 0, 2], "v1"))]);
    wait_state(&client, "b2 at the looked-up IP", |s| {
        s.addresses.contains_key(&uid("b2"))
    })
    .await;
    assert!(!client.state().borrow().addresses.contains_key(&uid("c")));

    client
        .unsubscribe(ResourceType::Address, vec![uid("a"), "/10.0.0.2".into()])
        .await
        .unwrap();
    wait_state(&client, "a, b, b2 dropped", |s| {
        !s.addresses.contains_key(&uid("a"))
            && !s.addresses.contains_key(&uid("b"))
            && !s.addresses.contains_key(&uid("b2"))
    })
    .await;
    let sent = h.metric("meshbox_xds_resources_sent_total", "");
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v3"))]);
    // A barrier instead of a pause: then change the service the client is
    // still subscribed to, and wait until it has that. The server handles
    // changes in order, so had it sent `a`, it would have done so by now.
    let (_, svc) = service("reviews", [10, 96, 0, 1]);
    let mut changed = (*svc).clone();
    if let Some(address::Type::Service(s)) = changed.r#type.as_mut() {
        s.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/barrier".into()];
    }
    h.put_workloads([(svc_name.clone(), Arc::new(changed))]);
    wait_state(&client, "the service change arrived", |s| {
        s.addresses.get(&svc_name).is_some_and(|r| {
            matches!(&r.resource.r#type, Some(address::Type::Service(s)) if !s.subject_alt_names.is_empty())
        })
    })
    .await;
    assert_eq!(
        h.metric("meshbox_xds_resources_sent_total", "") - sent,
        1.0,
        "only the service was sent, nothing for the unsubscribed name"
    );
}

#[tokio::test]
async fn ztunnel_style_ip_lookup_on_a_raw_stream() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    // A client on another node than the workload.
    let mut s = h.stream_as("worker-2").await;
    // ztunnel with XDS_ON_DEMAND: subscribe and unsubscribe "*" together.
    let mut first = wildcard(ADDRESS);
    first.node = Some(meshbox_dataplane::xds::node(
        "raw-test",
        [("NODE_NAME", "worker-2")],
    ));
    first.resource_names_subscribe = vec!["*".into()];
    first.resource_names_unsubscribe = vec!["*".into()];
    s.send(first).await;
    let r = s.recv().await;
    assert!(r.resources.is_empty() && r.removed_resources.is_empty());
    s.ack(&r).await;
    s.send(subscribe(ADDRESS, &["/10.0.0.1", "/10.0.0.9"]))
        .await;
    let r = s.recv().await;
    assert_eq!(sorted_names(&r), vec![uid("a")]);
    assert_eq!(r.resources[0].aliases, vec!["/10.0.0.1"]);
    assert_eq!(r.removed_resources, vec!["/10.0.0.9"]);
}

/// What Istio's control plane adds to an on-demand subscription, and a
/// stock ztunnel relies on: in dedicated mode it waits for its own workload
/// without asking for it, and it finds a service's endpoints through the
/// workloads that list the service. Found with a real ztunnel
/// (`XDS_ON_DEMAND=true`), which otherwise timed out "waiting for workload".
#[tokio::test(start_paused = true)]
async fn on_demand_gets_node_local_workloads_and_service_endpoints() {
    let h = Harness::start().await;
    let (svc_name, svc) = service("ratings", [10, 96, 0, 13]);
    let mine = workload("mine", [10, 0, 0, 1], "v1");
    let ep = workload("ep", [10, 0, 0, 2], "v1");
    let other = workload("other", [10, 0, 0, 3], "v1");
    h.put_workloads([
        (uid("mine"), placed(&mine, "worker-1", &[])),
        (uid("ep"), placed(&ep, "worker-2", &[&svc_name])),
        (uid("other"), placed(&other, "worker-2", &[])),
        (svc_name.clone(), svc),
    ]);
    let mut s = h.stream().await;
    let mut first = wildcard(ADDRESS);
    first.resource_names_subscribe = vec!["*".into()];
    first.resource_names_unsubscribe = vec!["*".into()];
    s.send(first).await;
    let r = s.recv().await;
    assert_eq!(
        sorted_names(&r),
        vec![uid("mine")],
        "its own node's workloads"
    );
    s.ack(&r).await;

    // Looking up the VIP answers with the service and its endpoints.
    s.send(subscribe(ADDRESS, &["/10.96.0.13"])).await;
    let r = s.recv().await;
    let mut expected = vec![svc_name.clone(), uid("ep")];
    expected.sort();
    assert_eq!(sorted_names(&r), expected);
    s.ack(&r).await;

    // A pod scheduled on this node later, and a new endpoint, are pushed;
    // a pod elsewhere is not.
    let mine2 = workload("mine2", [10, 0, 0, 4], "v1");
    let ep2 = workload("ep2", [10, 0, 0, 5], "v1");
    let other2 = workload("other2", [10, 0, 0, 6], "v1");
    h.put_workloads([
        (uid("mine2"), placed(&mine2, "worker-1", &[])),
        (uid("ep2"), placed(&ep2, "worker-3", &[&svc_name])),
        (uid("other2"), placed(&other2, "worker-3", &[])),
    ]);
    let r = s.recv().await;
    let mut expected = vec![uid("mine2"), uid("ep2")];
    expected.sort();
    assert_eq!(sorted_names(&r), expected);
    s.ack(&r).await;
    s.expect_silence(SHORT).await;
}

#[tokio::test(start_paused = true)]
async fn unknown_type_url_is_ignored() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    let mut s = h.stream().await;
    s.send(wildcard(
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    ))
    .await;
    s.expect_silence(SHORT).await;
    s.send(wildcard(ADDRESS)).await;
    let r = s.recv().await;
    assert_eq!(sorted_names(&r), vec![uid("a")]);
    assert_eq!(
        h.metric(
            "meshbox_xds_requests_ignored_total",
            "reason=\"unknown_type\""
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn request_with_unknown_nonce_is_ignored() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    let mut s = h.stream().await;
    s.send(wildcard(ADDRESS)).await;
    let r = s.recv().await;
    s.ack(&r).await;
    for nonce in ["bogus", "999999"] {
        let mut request = subscribe(ADDRESS, &["default/not-there"]);
        request.response_nonce = nonce.into();
        s.send(request).await;
    }
    s.expect_silence(SHORT).await;
    assert_eq!(
        h.metric(
            "meshbox_xds_requests_ignored_total",
            "reason=\"unknown_nonce\""
        ),
        2.0
    );
    // The stream is fine.
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v2"))]);
    assert_eq!(sorted_names(&s.recv().await), vec![uid("a")]);
}

#[tokio::test]
async fn garbage_names_end_the_stream_with_invalid_argument() {
    let h = Harness::start().await;
    let long = "n".repeat(5000);
    for (name, why) in [
        ("bad name", "whitespace"),
        ("bell\u{7}", "control"),
        ("", "empty"),
        (long.as_str(), "too long"),
    ] {
        let mut s = h.stream().await;
        s.send(wildcard(ADDRESS)).await;
        s.recv().await;
        s.send(subscribe(ADDRESS, &[name])).await;
        let status = s.recv_error().await;
        assert_eq!(status.code(), Code::InvalidArgument, "{why}");
        assert!(
            status.message().contains(why),
            "{why}: {}",
            status.message()
        );
    }
    // Empty type_url on an ADS stream.
    let mut s = h.stream().await;
    s.send(wildcard("")).await;
    assert_eq!(s.recv_error().await.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn huge_subscribe_list_is_refused() {
    let h = Harness::start().await;
    let names: Vec<String> = (0..10_001).map(|i| format!("default/svc-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();

    // At the bound: accepted, every name answered "not found".
    let mut s = h.stream().await;
    s.send(subscribe(ADDRESS, &names[..10_000])).await;
    let mut not_found = 0;
    while not_found < 10_000 {
        let r = s.recv().await;
        assert!(r.resources.is_empty());
        not_found += r.removed_resources.len();
    }
    assert_eq!(not_found, 10_000);

    let mut s = h.stream().await;
    s.send(subscribe(ADDRESS, &names)).await;
    let status = s.recv_error().await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("at most 10000"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn too_many_initial_resource_versions_are_refused() {
    let h = Harness::with_options(XdsOptions {
        max_initial_resource_versions: 3,
        ..XdsOptions::default()
    })
    .await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    let held = |n: usize| -> HashMap<String, String> {
        (0..n)
            .map(|i| (uid(&format!("w{i}")), "v".to_string()))
            .collect()
    };
    let mut s = h.stream().await;
    let mut at_bound = wildcard(ADDRESS);
    at_bound.initial_resource_versions = held(3);
    s.send(at_bound).await;
    let r = s.recv().await;
    assert_eq!(r.removed_resources.len(), 3, "what it held is gone");

    let mut s = h.stream().await;
    let mut over = wildcard(ADDRESS);
    over.initial_resource_versions = held(4);
    s.send(over).await;
    let status = s.recv_error().await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("lists 4 resources; at most 3"),
        "{}",
        status.message()
    );
}

/// A leaked node token cannot make the server keep unbounded streams: past
/// the per-caller cap (the default, as `controlplane run` uses it) streams
/// are refused before any state is kept, other callers are unaffected, and
/// a closed stream makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_cannot_open_unbounded_streams() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    let token = h.token();
    let channel = h.channel();
    let mut open = Vec::new();
    let refused = loop {
        match RawStream::open(channel.clone(), Some(&token)).await {
            Ok(stream) => open.push(stream),
            Err(status) => break status,
        }
        assert!(open.len() < 1000, "1000 streams accepted from one caller");
    };
    let max = meshbox_controlplane::xds::DEFAULT_MAX_STREAMS_PER_CALLER;
    assert_eq!(open.len(), max);
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        refused.message(),
        format!(
            "node:{NODE} already has {max} xDS streams open, the most one caller may have; close one first"
        )
    );
    assert_eq!(h.metric("meshbox_xds_connected_clients", ""), max as f64);
    assert_eq!(
        h.metric(
            "meshbox_xds_streams_refused_total",
            "reason=\"too_many_streams\""
        ),
        1.0
    );
    // Another node, on the same connection, is served.
    let mut other = RawStream::open(channel.clone(), Some(&h.token_for_node("worker-2")))
        .await
        .unwrap();
    other.send(wildcard(ADDRESS)).await;
    assert_eq!(other.recv().await.resources.len(), 1);
    // Closing one of the first caller's streams gives its place back.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match RawStream::open(channel.clone(), Some(&token)).await {
            Ok(_) => break,
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("no room after a stream closed: {status:?}"),
        }
    }
}

/// Every way a token can fail, through the real verifier behind the real
/// `XdsAuth`: each stream refused with its own status and message, before
/// anything is sent.
#[tokio::test]
async fn unauthenticated_streams_are_refused_before_anything_is_sent() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    // Signed by another control plane's key.
    let forged = Stranger::create()
        .tokens
        .mint_for_node(NODE, Duration::from_secs(3600))
        .unwrap();
    // A workload token signed with this control plane's own key, but for
    // another trust domain (one minted before a --trust-domain change).
    let other_domain = LocalTokens::load_or_create(h.state_dir(), "other.example")
        .unwrap()
        .mint_for_identity(
            &"spiffe://other.example/ns/default/sa/default"
                .parse()
                .unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let cases = [
        (
            None,
            Code::Unauthenticated,
            "no bearer token: send 'Authorization: Bearer <token>'",
        ),
        (
            Some("someone-else".to_owned()),
            Code::Unauthenticated,
            "malformed token: not a JWT",
        ),
        (
            Some(forged.clone()),
            Code::Unauthenticated,
            "the token is not valid for this control plane",
        ),
        (
            Some(h.expired_token_for_node(NODE)),
            Code::Unauthenticated,
            "the token has expired: mint a new one",
        ),
        (
            Some(other_domain),
            Code::PermissionDenied,
            "the token's identity is not allowed here: \
             spiffe://other.example/ns/default/sa/default is not in trust domain cluster.local",
        ),
    ];
    for (token, code, message) in cases {
        let status = match RawStream::open(h.channel(), token.as_deref()).await {
            Err(status) => status,
            Ok(_) => panic!("stream with {token:?} was accepted"),
        };
        assert_eq!(status.code(), code, "{token:?}: {status:?}");
        assert_eq!(status.message(), message, "{token:?}");
    }
    assert_eq!(
        h.metric(
            "meshbox_xds_streams_refused_total",
            "reason=\"unauthenticated\""
        ),
        4.0
    );
    assert_eq!(
        h.metric(
            "meshbox_xds_streams_refused_total",
            "reason=\"permission_denied\""
        ),
        1.0
    );
    assert_eq!(h.metric("meshbox_xds_resources_sent_total", ""), 0.0);
    assert!(h.server.connections().is_empty());

    let client = XdsClient::start(h.channel(), client_options(&forged));
    wait_state(&client, "client reports the refusal", |s| {
        !s.connected
            && s.last_error.as_deref().is_some_and(|e| {
                e.starts_with("opening the xDS stream failed")
                    && e.contains(Code::Unauthenticated.description())
                    && e.contains("the token is not valid for this control plane")
            })
    })
    .await;
    assert!(client.state().borrow().addresses.is_empty());
    assert!(h.server.connections().is_empty());
}

/// The rustls error somewhere in `err`'s chain of causes.
fn rustls_error(err: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found.clone());
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found.clone());
        }
        next = e.source();
    }
    None
}

/// The gRPC port serves the certificate our CA issued, and a client checks
/// it as the dataplane does: it must chain to the root the client was
/// given and name the address dialled. A client that cannot check it never
/// reaches the xDS server.
#[tokio::test]
async fn clients_verify_the_serving_certificate() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);

    // Trusting another control plane's root. It has the same name as ours
    // (same trust domain), so the client finds it as the issuer and then
    // the signature does not verify.
    let stranger = Stranger::create();
    let err = tls_endpoint(h.addr, &stranger.root_pem)
        .connect()
        .await
        .expect_err("a foreign root verified our certificate");
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadSignature
            ))
        ),
        "{err:?}"
    );

    // Our root, but a name the certificate does not carry.
    let err = h
        .endpoint()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&h.root_pem))
                .domain_name("meshbox-controlplane.elsewhere.svc"),
        )
        .unwrap()
        .connect()
        .await
        .expect_err("a name not in the certificate was accepted");
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{err:?}"
    );

    // Our client library with the foreign root and a valid token: it
    // reports the failure and the server never sees a stream.
    let client = XdsClient::start(
        tls_endpoint(h.addr, &stranger.root_pem).connect_lazy(),
        h.client_options(),
    );
    wait_state(&client, "client reports the failed connection", |s| {
        !s.connected && s.last_error.is_some()
    })
    .await;
    assert!(client.state().borrow().addresses.is_empty());
    assert!(h.server.connections().is_empty());
    assert_eq!(h.metric("meshbox_xds_streams_refused_total", ""), 0.0);

    // With our root it syncs: the certificate names 127.0.0.1 and the
    // in-cluster Service names.
    let client = h.client();
    wait_state(&client, "synced over TLS", |s| {
        s.is_synced() && s.addresses.contains_key(&uid("a"))
    })
    .await;
}

/// The development-only plaintext port (`--xds-plaintext-addr`), the one
/// case without TLS, because plaintext is what is under test: it serves the
/// same xDS, a token is as required there as over TLS, and the TLS port
/// does not fall back to plaintext.
#[tokio::test]
async fn plaintext_port_serves_the_same_xds_and_still_requires_a_token() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    let plain = h.serve_plaintext().await;

    let status = match RawStream::open(plaintext_channel(plain), None).await {
        Err(status) => status,
        Ok(_) => panic!("a stream without a token was accepted on the plaintext port"),
    };
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        status.message(),
        "no bearer token: send 'Authorization: Bearer <token>'"
    );

    let client = XdsClient::start(plaintext_channel(plain), h.client_options());
    wait_state(&client, "synced over plaintext", |s| {
        s.is_synced() && s.addresses.contains_key(&uid("a"))
    })
    .await;
    let infos = h.server.connections();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].caller, "node:worker-1");
    drop(client);
    wait_until("plaintext stream gone", || {
        h.server.connections().is_empty()
    })
    .await;

    // Plaintext to the TLS port, even with a valid token, gets no stream:
    // the handshake fails and the connection is closed, which the client
    // sees as a transport error (Unknown, or Unavailable if the close
    // arrives before the request is under way).
    let refused = RawStream::open(plaintext_channel(h.addr), Some(&h.token())).await;
    let status = refused.err().expect("the TLS port answered plaintext");
    assert!(
        matches!(status.code(), Code::Unknown | Code::Unavailable),
        "{status:?}"
    );
    assert!(h.server.connections().is_empty());
    assert_eq!(
        h.metric("meshbox_xds_streams_refused_total", ""),
        1.0,
        "only the tokenless plaintext stream reached the server"
    );
}

#[tokio::test]
async fn connections_report_node_and_versions() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    let client = h.client();
    wait_state(&client, "synced", |s| s.is_synced()).await;
    wait_until("both types ACKed", || {
        let infos = h.server.connections();
        infos.len() == 1
            && infos[0].types.len() == 2
            && infos[0].types.iter().all(|t| {
                t.last_acked_version.is_some() && t.last_acked_version == t.last_sent_version
            })
    })
    .await;
    let infos = h.server.connections();
    let info = &infos[0];
    assert_eq!(info.caller, "node:worker-1");
    assert_eq!(info.node.as_deref(), Some("worker-1"));
    assert!(info.node_id.as_deref().unwrap().starts_with("ztunnel~"));
    let remote: std::net::SocketAddr = info.remote_addr.as_deref().unwrap().parse().unwrap();
    assert!(
        remote.ip().is_loopback() && remote.port() != h.addr.port(),
        "{remote}"
    );
    let address = info.types.iter().find(|t| t.type_url == ADDRESS).unwrap();
    assert!(address.wildcard);
    assert_eq!(address.resources, 1);
    assert!(address.last_nack.is_none());
    let json = serde_json::to_value(&infos).unwrap();
    let since = json[0]["connectedSince"].as_str().unwrap();
    assert!(since.contains('T') && since.ends_with('Z'), "{since}");
    assert_eq!(json[0]["types"][0]["typeUrl"], ADDRESS);
    assert_eq!(h.metric("meshbox_xds_connected_clients", ""), 1.0);
    drop(client);
    wait_until("stream gone", || h.server.connections().is_empty()).await;
    assert_eq!(h.metric("meshbox_xds_connected_clients", ""), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_converge_after_a_burst_and_share_encodings() {
    let h = Harness::start().await;
    let mut expected: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut upserts = 0u64;
    let initial: Vec<(String, Arc<Address>)> = (0..200)
        .map(|i| {
            let name = format!("w{i}");
            expected.insert(uid(&name), Some("v0".into()));
            upserts += 1;
            (uid(&name), workload(&name, ip(i), "v0"))
        })
        .collect();
    h.put_workloads(initial);
    let clients: Vec<XdsClient> = (0..50)
        .map(|i| {
            // Each its own TLS connection and its own node token.
            let token = h.token_for_node(&format!("worker-{i}"));
            XdsClient::start(h.channel(), client_options(&token))
        })
        .collect();
    for c in &clients {
        wait_state(c, "initial sync", |s| {
            s.is_synced() && s.addresses.len() == 200
        })
        .await;
    }
    // Fifty streams, each known by the node its token names.
    let nodes: BTreeSet<Option<String>> =
        h.server.connections().into_iter().map(|c| c.node).collect();
    let want: BTreeSet<Option<String>> = (0..50).map(|i| Some(format!("worker-{i}"))).collect();
    assert_eq!(nodes, want);
    let pushes_before = h.metric(
        "meshbox_xds_pushes_total",
        &format!("type_url=\"{ADDRESS}\""),
    );

    // 1 000 changes, one update call each: upserts, new names, removals.
    for i in 0..1000usize {
        let name = format!("w{}", i % 300);
        if i % 7 == 3 {
            h.remove_addresses(&[&uid(&name)]);
            expected.insert(uid(&name), None);
        } else {
            let tag = format!("r{i}");
            h.put_workloads([(uid(&name), workload(&name, ip(i % 300), &tag))]);
            expected.insert(uid(&name), Some(tag));
            upserts += 1;
        }
    }
    let expected: BTreeMap<String, String> = expected
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    let started = Instant::now();
    for c in &clients {
        wait_state(c, "converged", |s| tags(s) == expected).await;
    }
    let converged_in = started.elapsed();
    let first = clients[0].state().borrow().versions(ResourceType::Address);
    for c in &clients[1..] {
        assert_eq!(c.state().borrow().versions(ResourceType::Address), first);
    }
    assert_eq!(
        h.metric("meshbox_xds_resource_encodings_total", ""),
        upserts as f64,
        "each update encoded once, not once per client"
    );
    let pushes = h.metric(
        "meshbox_xds_pushes_total",
        &format!("type_url=\"{ADDRESS}\""),
    ) - pushes_before;
    // Without coalescing this would be 50 000.
    assert!(pushes < 50.0 * 100.0, "{pushes} pushes for 1000 changes");
    eprintln!("50 clients converged {converged_in:?} after the burst, {pushes} pushes");
}

fn ip(i: usize) -> [u8; 4] {
    [10, 2, (i / 256) as u8, (i % 256) as u8]
}

fn tags(s: &XdsState) -> BTreeMap<String, String> {
    s.addresses
        .iter()
        .map(|(n, r)| (n.clone(), tag_of(&r.resource)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_neither_blocks_others_nor_accumulates_updates() {
    let options = XdsOptions {
        client_queue_depth: 1,
        change_log_capacity: 256,
        max_response_bytes: 64 * 1024,
        ..XdsOptions::default()
    };
    let h = Harness::with_options(options).await;
    const N: usize = 100;
    const ROUNDS: usize = 30;
    let round = |r: usize| {
        (0..N).map(move |i| {
            let name = format!("w{i}");
            (
                uid(&name),
                big_workload(&name, ip(i), &format!("r{r}"), 8 * 1024),
            )
        })
    };
    h.put_workloads(round(0));
    let all_names: Vec<String> = (0..N).map(|i| uid(&format!("w{i}"))).collect();
    let all_names: Vec<&str> = all_names.iter().map(String::as_str).collect();

    // Two clients that subscribe and then stop reading (one wildcard, one
    // naming every resource), with a small HTTP/2 window so the server
    // notices quickly.
    let slow_channel = || {
        h.endpoint()
            .initial_stream_window_size(64 * 1024)
            .initial_connection_window_size(64 * 1024)
            .connect_lazy()
    };
    let mut slow_wildcard =
        RawStream::open(slow_channel(), Some(&h.token_for_node("slow-wildcard")))
            .await
            .unwrap();
    slow_wildcard.send(wildcard(ADDRESS)).await;
    let mut slow_named = RawStream::open(slow_channel(), Some(&h.token_for_node("slow-named")))
        .await
        .unwrap();
    slow_named.send(subscribe(ADDRESS, &all_names)).await;

    let fast = h.client();
    wait_state(&fast, "fast initial sync", |s| s.addresses.len() == N).await;
    let mut callers: Vec<String> = h
        .server
        .connections()
        .into_iter()
        .map(|c| c.caller)
        .collect();
    callers.sort();
    assert_eq!(
        callers,
        ["node:slow-named", "node:slow-wildcard", "node:worker-1"]
    );
    // The fast client follows every round while the slow ones read
    // nothing at all: were it held back by them, it would never get there
    // and wait_state would fail. How fast it follows is not under test (a
    // loaded machine is slower, not wrong).
    for r in 1..=ROUNDS {
        h.put_workloads(round(r));
        let want = format!("r{r}");
        wait_state(&fast, "fast client follows", |s| {
            s.addresses.len() == N && s.addresses.values().all(|a| tag_of(&a.resource) == want)
        })
        .await;
    }

    // What the slow streams have pending is a set of names, not a list
    // of updates.
    for info in h.server.connections() {
        for t in &info.types {
            assert!(t.pending <= N && t.resources <= N, "{info:?}");
        }
    }
    let want = format!("r{ROUNDS}");
    let up_to_date =
        |held: &HashMap<String, String>| held.len() == N && held.values().all(|t| *t == want);

    // The named one reads again and gets the latest state of what
    // changed, once.
    let mut held: HashMap<String, String> = HashMap::new();
    let mut received = 0usize;
    while !up_to_date(&held) {
        let r = slow_named.recv().await;
        received += r.resources.len();
        for resource in &r.resources {
            held.insert(resource.name.clone(), decode_tag(resource));
        }
        slow_named.ack(&r).await;
    }
    assert!(
        received < 4 * N,
        "named slow client got {received} resources for {} updates",
        N * (ROUNDS + 1)
    );
    assert!(h.metric("meshbox_xds_fell_behind_total", "action=\"resync\"") >= 1.0);

    // The wildcard one cannot know what was deleted meanwhile, so its
    // stream is restarted; with initial_resource_versions it is then sent
    // only what it lacks.
    let mut versions: HashMap<String, String> = HashMap::new();
    let mut received = 0usize;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(5), slow_wildcard.rx.message()).await {
            Ok(Ok(Some(r))) => {
                received += r.resources.len();
                for resource in &r.resources {
                    versions.insert(resource.name.clone(), resource.version.clone());
                }
            }
            Ok(Err(status)) => break status,
            other => panic!("expected responses then an error, got {other:?}"),
        }
    };
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("reconnect"),
        "{}",
        status.message()
    );
    assert_eq!(
        h.metric("meshbox_xds_fell_behind_total", "action=\"reconnect\""),
        1.0
    );
    let mut again = h.stream_as("slow-wildcard").await;
    let mut first = wildcard(ADDRESS);
    first.initial_resource_versions = versions.into_iter().collect();
    again.send(first).await;
    let mut held: HashMap<String, String> = HashMap::new();
    while held.len() < N {
        let r = again.recv().await;
        received += r.resources.len();
        assert!(r.removed_resources.is_empty());
        for resource in &r.resources {
            held.insert(resource.name.clone(), decode_tag(resource));
        }
        again.ack(&r).await;
    }
    assert!(up_to_date(&held));
    eprintln!("wildcard slow client: {received} resources in all");
    assert!(
        received < 4 * N,
        "wildcard slow client got {received} resources for {} updates",
        N * (ROUNDS + 1)
    );
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// On the paused clock the 5 ms gaps and the 100 ms debounce are exact:
// virtual time does not move while the test or the server is busy, so a
// stall cannot split the burst.
#[tokio::test(start_paused = true)]
async fn a_burst_of_updates_becomes_one_push() {
    let options = XdsOptions {
        debounce: Duration::from_millis(100),
        debounce_max: Duration::from_secs(1),
        ..XdsOptions::default()
    };
    let h = Harness::with_options(options).await;
    let mut s = h.stream().await;
    s.send(wildcard(ADDRESS)).await;
    let r = s.recv().await;
    assert!(r.resources.is_empty());
    s.ack(&r).await;
    for burst in 0..2 {
        for i in 0..20 {
            let name = format!("w{i}");
            h.put_workloads([(uid(&name), workload(&name, ip(i), &format!("b{burst}")))]);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = s.recv().await;
        assert_eq!(r.resources.len(), 20, "burst {burst} in one response");
        assert!(
            r.resources
                .iter()
                .all(|x| decode_tag(x) == format!("b{burst}"))
        );
        s.ack(&r).await;
        s.expect_silence(Duration::from_millis(200)).await;
    }
}

// ---- meshbox.v1 waypoint types ----

const WAYPOINT_POLICY: &str = meshbox_proto::WAYPOINT_POLICY_TYPE_URL;
const WAYPOINT_ROUTE: &str = meshbox_proto::WAYPOINT_ROUTE_TYPE_URL;

type WaypointPolicy = meshbox_proto::meshbox::WaypointPolicy;
type WaypointRoute = meshbox_proto::meshbox::WaypointRoute;

fn wp_route(name: &str, backend: &str) -> (String, Option<Arc<WaypointRoute>>) {
    use meshbox_proto::meshbox::{RouteBackend, RouteParent, RouteRule};
    let route = WaypointRoute {
        name: name.into(),
        namespace: "app".into(),
        parents: vec![RouteParent {
            waypoint: "app/wp".into(),
            service: "app/web.app.svc.cluster.local".into(),
            ..Default::default()
        }],
        rules: vec![RouteRule {
            backends: vec![RouteBackend {
                service: format!("app/{backend}.app.svc.cluster.local"),
                port: 80,
                weight: 1,
                error: String::new(),
            }],
            ..Default::default()
        }],
        created: 0,
    };
    (format!("app/{name}"), Some(Arc::new(route)))
}

fn wp_policy(name: &str, method: &str) -> (String, Option<Arc<WaypointPolicy>>) {
    use meshbox_proto::meshbox::{PolicyOperation, PolicyRule, PolicyTarget};
    let policy = WaypointPolicy {
        name: name.into(),
        namespace: "app".into(),
        targets: vec![PolicyTarget {
            waypoint: "app/wp".into(),
            ..Default::default()
        }],
        action: 0,
        rules: vec![PolicyRule {
            to: vec![PolicyOperation {
                methods: vec![method.into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    (format!("app/{name}"), Some(Arc::new(policy)))
}

/// A first request as a waypoint sends it: its node names its Gateway.
fn waypoint_wildcard(type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(meshbox_dataplane::xds::node(
            "waypoint~app/wp~wp-7d9f",
            [("WAYPOINT", "app/wp"), ("NAMESPACE", "app")],
        )),
        type_url: type_url.into(),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn waypoint_routes_are_sent_as_deltas_and_a_route_change_sends_exactly_that_route() {
    let h = Harness::start().await;
    h.server
        .update_waypoints([], [wp_route("split", "v1"), wp_route("canary", "v1")]);
    let mut s = h.stream().await;
    s.send(waypoint_wildcard(WAYPOINT_ROUTE)).await;
    let r = s.recv().await;
    assert_eq!(r.type_url, WAYPOINT_ROUTE);
    assert_eq!(sorted_names(&r), vec!["app/canary", "app/split"]);
    let any = r.resources[0].resource.as_ref().unwrap();
    assert_eq!(any.type_url, WAYPOINT_ROUTE);
    let decoded = WaypointRoute::decode(any.value.as_slice()).unwrap();
    assert_eq!(decoded.parents[0].waypoint, "app/wp");
    let versions: BTreeMap<String, String> = r
        .resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect();
    s.ack(&r).await;

    // The same content again is no change.
    h.server.update_waypoints([], [wp_route("split", "v1")]);
    s.expect_silence(SHORT).await;

    h.server.update_waypoints([], [wp_route("split", "v2")]);
    let r = s.recv().await;
    assert_eq!(
        sorted_names(&r),
        vec!["app/split"],
        "only the changed route"
    );
    assert_ne!(r.resources[0].version, versions["app/split"]);
    let decoded =
        WaypointRoute::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(
        decoded.rules[0].backends[0].service,
        "app/v2.app.svc.cluster.local"
    );
    s.ack(&r).await;

    h.server
        .update_waypoints([], [("app/canary".to_string(), None)]);
    let r = s.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, vec!["app/canary"]);
    s.ack(&r).await;
    // Policies were never asked for on this stream.
    h.server
        .update_waypoints([wp_policy("get-only", "GET")], []);
    s.expect_silence(SHORT).await;

    // The stream shows up as the waypoint's proxy.
    let infos = h.server.connections();
    assert_eq!(infos[0].waypoint.as_deref(), Some("app/wp"));
    assert_eq!(infos[0].node_id.as_deref(), Some("waypoint~app/wp~wp-7d9f"));
}

#[tokio::test(start_paused = true)]
async fn waypoint_policies_by_name_and_node_proxies_never_get_waypoint_types() {
    let h = Harness::start().await;
    h.put_workloads([(uid("a"), workload("a", [10, 0, 0, 1], "v1"))]);
    h.server.update_waypoints(
        [wp_policy("get-only", "GET"), wp_policy("no-post", "POST")],
        [wp_route("split", "v1")],
    );
    // A node proxy: the workload API only.
    let mut node = h.stream().await;
    node.send(wildcard(ADDRESS)).await;
    let r = node.recv().await;
    assert_eq!(sorted_names(&r), vec![uid("a")]);
    node.ack(&r).await;

    // A waypoint asking for one policy by name gets that one.
    let mut s = h.stream().await;
    let mut first = waypoint_wildcard(WAYPOINT_POLICY);
    first.resource_names_subscribe = vec!["app/no-post".into()];
    s.send(first).await;
    let r = s.recv().await;
    assert_eq!(sorted_names(&r), vec!["app/no-post"]);
    let decoded =
        WaypointPolicy::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(decoded.rules[0].to[0].methods, ["POST"]);
    s.ack(&r).await;
    // A change to the other policy is not for it; one to its own is.
    h.server
        .update_waypoints([wp_policy("get-only", "HEAD")], []);
    s.expect_silence(SHORT).await;
    h.server
        .update_waypoints([wp_policy("no-post", "PUT")], [wp_route("split", "v2")]);
    let r = s.recv().await;
    assert_eq!(r.type_url, WAYPOINT_POLICY);
    assert_eq!(sorted_names(&r), vec!["app/no-post"]);
    s.ack(&r).await;
    s.expect_silence(SHORT).await;

    // The node proxy heard none of it.
    node.expect_silence(SHORT).await;
}

#[tokio::test(start_paused = true)]
async fn a_nacked_waypoint_policy_is_not_resent_until_it_changes() {
    let h = Harness::start().await;
    h.server
        .update_waypoints([wp_policy("get-only", "GET")], []);
    let mut s = h.stream().await;
    s.send(waypoint_wildcard(WAYPOINT_POLICY)).await;
    let r = s.recv().await;
    assert_eq!(sorted_names(&r), vec!["app/get-only"]);
    s.send(DeltaDiscoveryRequest {
        type_url: WAYPOINT_POLICY.into(),
        response_nonce: r.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "app/get-only: unknown condition key".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    s.send(subscribe(WAYPOINT_POLICY, &["app/get-only"])).await;
    s.expect_silence(SHORT).await;
    assert_eq!(
        h.metric(
            "meshbox_xds_nacks_total",
            &format!("type_url=\"{WAYPOINT_POLICY}\"")
        ),
        1.0
    );
    let infos = h.server.connections();
    let info = infos[0]
        .types
        .iter()
        .find(|t| t.type_url == WAYPOINT_POLICY)
        .unwrap();
    let nack = info.last_nack.as_ref().expect("NACK recorded");
    assert!(nack.message.contains("unknown condition key"));

    h.server
        .update_waypoints([wp_policy("get-only", "HEAD")], []);
    let r = s.recv().await;
    assert_eq!(sorted_names(&r), vec!["app/get-only"]);
}
