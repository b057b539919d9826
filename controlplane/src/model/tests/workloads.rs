//! Workloads: enrollment, fields, presence, ownership, and how pod and
//! namespace changes reach exactly the affected workloads.

use meshbox_certs::SpiffeId;
use meshbox_proto::workload::{
    NetworkMode, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
};
use serde_json::json;

use super::*;
use crate::model::{Kind, ObjectKey};

#[test]
fn enrolled_pod_has_every_field() {
    let mut idx = index();
    let p = pod_json(
        "bookinfo",
        "reviews-v1-7d9f8b6c4-x2x7q",
        "10.0.0.5",
        json!({"app": "reviews", "version": "v1", "pod-template-hash": "7d9f8b6c4"}),
    );
    let p = set(p, "/spec/serviceAccountName", json!("bookinfo-reviews"));
    let p = set(
        p,
        "/metadata/ownerReferences",
        json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v1-7d9f8b6c4", "uid": "u1", "controller": true}]),
    );
    let changes = apply_all(&mut idx, vec![ambient_namespace("bookinfo"), pod_from(p)]);
    assert_eq!(
        summary(&changes),
        vec![format!(
            "+{}",
            uid("bookinfo", "reviews-v1-7d9f8b6c4-x2x7q")
        )]
    );

    let want = Workload {
        uid: uid("bookinfo", "reviews-v1-7d9f8b6c4-x2x7q"),
        name: "reviews-v1-7d9f8b6c4-x2x7q".into(),
        namespace: "bookinfo".into(),
        addresses: vec![vec![10, 0, 0, 5]],
        network: String::new(),
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".into(),
        service_account: "bookinfo-reviews".into(),
        node: "node-a".into(),
        canonical_name: "reviews".into(),
        canonical_revision: "v1".into(),
        workload_type: WorkloadType::Deployment as i32,
        workload_name: "reviews-v1".into(),
        status: WorkloadStatus::Healthy as i32,
        cluster_id: "Kubernetes".into(),
        network_mode: NetworkMode::Standard as i32,
        ..Default::default()
    };
    assert_eq!(
        workload(&idx, "bookinfo", "reviews-v1-7d9f8b6c4-x2x7q"),
        Some(want)
    );
}

#[test]
fn mesh_config_shapes_uid_and_identity() {
    let mut idx = MeshIndex::new(MeshConfig {
        cluster_id: "east".into(),
        trust_domain: "example.org".into(),
        cluster_domain: "corp.local".into(),
        root_namespace: "mesh-root".into(),
    });
    idx.apply(service("ns", "svc", "10.96.0.1", json!({"app": "a"})));
    idx.apply(pod("ns", "p", "10.0.0.1", json!({"app": "a"})));
    let w = match idx.address("east//Pod/ns/p").and_then(|a| a.r#type.clone()) {
        Some(address::Type::Workload(w)) => w,
        other => panic!("no workload: {other:?}"),
    };
    assert_eq!(
        (
            w.cluster_id.as_str(),
            w.trust_domain.as_str(),
            w.network.as_str()
        ),
        // The default network: meshbox serves one network only.
        ("east", "example.org", "")
    );
    assert_eq!(
        w.services.keys().collect::<Vec<_>>(),
        vec!["ns/svc.ns.svc.corp.local"]
    );
    assert!(idx.address("ns/svc.ns.svc.corp.local").is_some());
    assert!(idx.has_identity_on_node(
        "node-a",
        &"spiffe://example.org/ns/ns/sa/default".parse().unwrap()
    ));
}

#[test]
fn enrollment_table() {
    struct Case {
        name: &'static str,
        ns_labels: serde_json::Value,
        pod_labels: serde_json::Value,
        host_network: bool,
        sidecar: bool,
        tunnel: TunnelProtocol,
        mode: NetworkMode,
    }
    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    let cases = [
        Case {
            name: "namespace label",
            ns_labels: ambient.clone(),
            pod_labels: json!({}),
            host_network: false,
            sidecar: false,
            tunnel: TunnelProtocol::Hbone,
            mode: NetworkMode::Standard,
        },
        Case {
            name: "pod label",
            ns_labels: json!({}),
            pod_labels: ambient.clone(),
            host_network: false,
            sidecar: false,
            tunnel: TunnelProtocol::Hbone,
            mode: NetworkMode::Standard,
        },
        Case {
            name: "not enrolled still served",
            ns_labels: json!({}),
            pod_labels: json!({}),
            host_network: false,
            sidecar: false,
            tunnel: TunnelProtocol::None,
            mode: NetworkMode::Standard,
        },
        Case {
            name: "pod opts out",
            ns_labels: ambient.clone(),
            pod_labels: json!({"istio.io/dataplane-mode": "none"}),
            host_network: false,
            sidecar: false,
            tunnel: TunnelProtocol::None,
            mode: NetworkMode::Standard,
        },
        Case {
            name: "unknown pod value defers to namespace",
            ns_labels: ambient.clone(),
            pod_labels: json!({"istio.io/dataplane-mode": "sidecar"}),
            host_network: false,
            sidecar: false,
            tunnel: TunnelProtocol::Hbone,
            mode: NetworkMode::Standard,
        },
        Case {
            name: "namespace none",
            ns_labels: json!({"istio.io/dataplane-mode": "none"}),
            pod_labels: json!({}),
            host_network: false,
            sidecar: false,
            tunnel: TunnelProtocol::None,
            mode: NetworkMode::Standard,
        },
        Case {
            name: "host network never captured",
            ns_labels: ambient.clone(),
            pod_labels: ambient.clone(),
            host_network: true,
            sidecar: false,
            tunnel: TunnelProtocol::None,
            mode: NetworkMode::HostNetwork,
        },
        Case {
            name: "sidecar pod never captured",
            ns_labels: ambient.clone(),
            pod_labels: json!({}),
            host_network: false,
            sidecar: true,
            tunnel: TunnelProtocol::None,
            mode: NetworkMode::Standard,
        },
    ];
    for c in cases {
        let mut idx = index();
        idx.apply(namespace("ns", c.ns_labels));
        let mut p = pod_json("ns", "p", "10.0.0.1", c.pod_labels);
        if c.host_network {
            p = set(p, "/spec/hostNetwork", json!(true));
        }
        if c.sidecar {
            p = set(
                p,
                "/metadata/annotations",
                json!({"sidecar.istio.io/status": "{}"}),
            );
        }
        idx.apply(pod_from(p));
        let w = workload(&idx, "ns", "p").unwrap_or_else(|| panic!("{}: no workload", c.name));
        assert_eq!(w.tunnel_protocol, c.tunnel as i32, "{}", c.name);
        assert_eq!(w.network_mode, c.mode as i32, "{}", c.name);
    }
}

#[test]
fn presence_and_health_table() {
    // (case, pod mutation, expected status; None = no workload)
    type Mutate = fn(serde_json::Value) -> serde_json::Value;
    let cases: Vec<(&str, Mutate, Option<WorkloadStatus>)> = vec![
        ("running and ready", |p| p, Some(WorkloadStatus::Healthy)),
        (
            "not ready",
            |p| set(p, "/status/conditions/0/status", json!("False")),
            Some(WorkloadStatus::Unhealthy),
        ),
        (
            "no ready condition",
            |p| {
                set(
                    p,
                    "/status/conditions",
                    json!([{"type": "PodScheduled", "status": "True"}]),
                )
            },
            Some(WorkloadStatus::Unhealthy),
        ),
        (
            "terminating",
            |p| {
                set(
                    p,
                    "/metadata/deletionTimestamp",
                    json!("2024-01-01T00:00:00Z"),
                )
            },
            Some(WorkloadStatus::Unhealthy),
        ),
        (
            "pending",
            |p| set(p, "/status/phase", json!("Pending")),
            None,
        ),
        (
            "succeeded",
            |p| set(p, "/status/phase", json!("Succeeded")),
            None,
        ),
        ("failed", |p| set(p, "/status/phase", json!("Failed")), None),
        (
            "no IP yet",
            |p| unset(unset(p, "/status/podIP"), "/status/podIPs"),
            None,
        ),
        (
            "phase but no conditions",
            |p| unset(p, "/status/conditions"),
            Some(WorkloadStatus::Unhealthy),
        ),
        (
            "manifest pod without phase or conditions",
            |p| unset(unset(p, "/status/phase"), "/status/conditions"),
            Some(WorkloadStatus::Healthy),
        ),
        (
            "manifest pod without phase, not ready",
            |p| {
                unset(
                    set(p, "/status/conditions/0/status", json!("False")),
                    "/status/phase",
                )
            },
            Some(WorkloadStatus::Unhealthy),
        ),
    ];
    for (name, mutate, want) in cases {
        let mut idx = index();
        idx.apply(pod_from(mutate(pod_json("ns", "p", "10.0.0.1", json!({})))));
        let got = workload(&idx, "ns", "p").map(|w| w.status);
        assert_eq!(got, want.map(|s| s as i32), "{name}");
    }
}

#[test]
fn dual_stack_and_invalid_ips() {
    let mut idx = index();
    let p = pod_json("ns", "p", "10.0.0.1", json!({}));
    let p = set(
        p,
        "/status/podIPs",
        json!([{"ip": "10.0.0.1"}, {"ip": "fd00::1"}, {"ip": "bogus"}]),
    );
    idx.apply(pod_from(p));
    let w = workload(&idx, "ns", "p").expect("workload");
    let mut v6 = vec![0xfd, 0];
    v6.extend([0u8; 13]);
    v6.push(1);
    assert_eq!(w.addresses, vec![vec![10, 0, 0, 1], v6]);
    assert_eq!(
        statuses_of(&idx, Kind::Pod, "ns", "p"),
        vec!["status.podIPs: \"bogus\" is not an IP address; ignored".to_string()]
    );

    // A pod whose only IP is garbage has no workload, and says why.
    let q = set(
        pod_json("ns", "q", "nope", json!({})),
        "/status/podIPs",
        json!([{"ip": "nope"}]),
    );
    idx.apply(pod_from(q));
    assert_eq!(workload(&idx, "ns", "q"), None);
    assert_eq!(statuses_of(&idx, Kind::Pod, "ns", "q").len(), 1);
}

#[test]
fn workload_name_and_type_from_owners() {
    let owner = |kind: &str, name: &str| json!([{"apiVersion": "v1", "kind": kind, "name": name, "uid": "u", "controller": true}]);
    let cases = [
        (
            "deployment",
            owner("ReplicaSet", "web-5f6b9c7d8"),
            json!({"pod-template-hash": "5f6b9c7d8"}),
            "web",
            WorkloadType::Deployment,
        ),
        (
            "deployment without hash label",
            owner("ReplicaSet", "web-5f6b9c7d8"),
            json!({}),
            "web",
            WorkloadType::Deployment,
        ),
        (
            "bare replicaset",
            owner("ReplicaSet", "frontend"),
            json!({}),
            "frontend",
            WorkloadType::Pod,
        ),
        (
            "job",
            owner("Job", "migrate"),
            json!({}),
            "migrate",
            WorkloadType::Job,
        ),
        (
            "cronjob",
            owner("Job", "backup-28734120"),
            json!({}),
            "backup",
            WorkloadType::Cronjob,
        ),
        (
            "statefulset",
            owner("StatefulSet", "db"),
            json!({}),
            "db",
            WorkloadType::Pod,
        ),
        ("no owner", json!(null), json!({}), "p", WorkloadType::Pod),
    ];
    for (name, owners, labels, want_name, want_type) in cases {
        let mut idx = index();
        let p = set(
            pod_json("ns", "p", "10.0.0.1", labels),
            "/metadata/ownerReferences",
            owners,
        );
        idx.apply(pod_from(p));
        let w = workload(&idx, "ns", "p").expect("workload");
        assert_eq!(
            (w.workload_name.as_str(), w.workload_type),
            (want_name, want_type as i32),
            "{name}"
        );
        // Canonical name falls back to the workload name, revision to latest.
        assert_eq!(
            (w.canonical_name.as_str(), w.canonical_revision.as_str()),
            (want_name, "latest"),
            "{name}"
        );
    }
}

#[test]
fn pod_ip_change_updates_only_that_workload_and_ip_lookup() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service("ns", "svc", "10.96.0.1", json!({"app": "a"})),
            pod("ns", "a1", "10.0.0.1", json!({"app": "a"})),
            pod("ns", "a2", "10.0.0.2", json!({"app": "a"})),
        ],
    );
    let changes = idx.apply(pod("ns", "a1", "10.0.0.9", json!({"app": "a"})));
    assert_eq!(summary(&changes), vec![format!("+{}", uid("ns", "a1"))]);
    assert_eq!(
        workload(&idx, "ns", "a1").expect("a1").addresses,
        vec![vec![10, 0, 0, 9]]
    );
    assert!(idx.lookup_ip("10.0.0.1".parse().expect("ip")).is_empty());
    assert_eq!(
        idx.lookup_ip("10.0.0.9".parse().expect("ip")),
        vec![uid("ns", "a1")]
    );
}

#[test]
fn pod_moving_nodes_updates_node_and_identity() {
    let mut idx = index();
    idx.apply(pod("ns", "p", "10.0.0.1", json!({})));
    let id = &"spiffe://cluster.local/ns/ns/sa/default"
        .parse::<SpiffeId>()
        .unwrap();
    assert!(idx.has_identity_on_node("node-a", id));

    let moved = set(
        pod_json("ns", "p", "10.0.0.1", json!({})),
        "/spec/nodeName",
        json!("node-b"),
    );
    let changes = idx.apply(pod_from(moved));
    assert_eq!(summary(&changes), vec![format!("+{}", uid("ns", "p"))]);
    assert_eq!(workload(&idx, "ns", "p").expect("p").node, "node-b");
    assert!(!idx.has_identity_on_node("node-a", id));
    assert!(idx.has_identity_on_node("node-b", id));
}

#[test]
fn removing_namespace_label_unenrolls_only_pods_relying_on_it() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            ambient_namespace("ns"),
            service("ns", "svc", "10.96.0.1", json!({"app": "a"})),
            pod("ns", "inherits", "10.0.0.1", json!({"app": "a"})),
            pod(
                "ns",
                "own-label",
                "10.0.0.2",
                json!({"app": "a", "istio.io/dataplane-mode": "ambient"}),
            ),
            pod("other", "elsewhere", "10.0.0.3", json!({})),
        ],
    );
    let changes = idx.apply(namespace("ns", json!({})));
    assert_eq!(
        summary(&changes),
        vec![format!("+{}", uid("ns", "inherits"))]
    );
    let tunnel =
        |idx: &MeshIndex, name: &str| workload(idx, "ns", name).expect(name).tunnel_protocol;
    assert_eq!(tunnel(&idx, "inherits"), TunnelProtocol::None as i32);
    assert_eq!(tunnel(&idx, "own-label"), TunnelProtocol::Hbone as i32);

    // Deleting the namespace object reads as "no labels" too.
    idx.apply(ambient_namespace("ns"));
    assert_eq!(tunnel(&idx, "inherits"), TunnelProtocol::Hbone as i32);
    let changes = idx.delete(ObjectKey::namespace("ns"));
    assert_eq!(
        summary(&changes),
        vec![format!("+{}", uid("ns", "inherits"))]
    );
    assert_eq!(tunnel(&idx, "inherits"), TunnelProtocol::None as i32);
}

#[test]
fn pod_opt_out_and_back() {
    let mut idx = index();
    idx.apply(ambient_namespace("ns"));
    idx.apply(pod(
        "ns",
        "p",
        "10.0.0.1",
        json!({"istio.io/dataplane-mode": "none"}),
    ));
    assert_eq!(
        workload(&idx, "ns", "p").expect("p").tunnel_protocol,
        TunnelProtocol::None as i32
    );
    let changes = idx.apply(pod("ns", "p", "10.0.0.1", json!({})));
    assert_eq!(summary(&changes), vec![format!("+{}", uid("ns", "p"))]);
    assert_eq!(
        workload(&idx, "ns", "p").expect("p").tunnel_protocol,
        TunnelProtocol::Hbone as i32
    );
}

#[test]
fn pod_deleted_or_stopped_removes_workload() {
    let mut idx = index();
    idx.apply(pod("ns", "p", "10.0.0.1", json!({})));
    let changes = idx.apply(pod_from(set(
        pod_json("ns", "p", "10.0.0.1", json!({})),
        "/status/phase",
        json!("Succeeded"),
    )));
    assert_eq!(summary(&changes), vec![format!("-{}", uid("ns", "p"))]);
    idx.apply(pod("ns", "p", "10.0.0.1", json!({})));
    let changes = idx.delete(ObjectKey::pod("ns", "p"));
    assert_eq!(summary(&changes), vec![format!("-{}", uid("ns", "p"))]);
    assert!(idx.addresses().next().is_none());
}

#[test]
fn identity_on_node_counts_every_live_scheduled_pod() {
    let mut idx = index();
    let with = |name: &str, node: &str, sa: &str, phase: &str, ip: Option<&str>| {
        let mut p = pod_json("ns", name, ip.unwrap_or(""), json!({}));
        p = set(p, "/spec/nodeName", json!(node));
        p = set(p, "/spec/serviceAccountName", json!(sa));
        p = set(p, "/status/phase", json!(phase));
        if ip.is_none() {
            p = unset(unset(p, "/status/podIP"), "/status/podIPs");
        }
        pod_from(p)
    };
    apply_all(
        &mut idx,
        vec![
            with("running", "node-a", "web", "Running", Some("10.0.0.1")),
            // Starting pods have no IP yet but need their certificate.
            with("starting", "node-b", "api", "Pending", None),
            with("done", "node-c", "batch", "Succeeded", Some("10.0.0.3")),
            with("twin-1", "node-d", "twin", "Running", Some("10.0.0.4")),
            with("twin-2", "node-d", "twin", "Running", Some("10.0.0.5")),
            // Not enrolled, still a pod on that node with that identity.
            with("plain", "node-e", "plain", "Running", Some("10.0.0.6")),
        ],
    );
    let id = |sa: &str| SpiffeId::new("cluster.local", "ns", sa).unwrap();
    let cases = [
        ("node-a", "web", true),
        ("node-b", "web", false),
        ("node-b", "api", true),
        ("node-c", "batch", false),
        ("node-d", "twin", true),
        ("node-e", "plain", true),
        ("node-z", "web", false),
    ];
    for (node, sa, want) in cases {
        assert_eq!(idx.has_identity_on_node(node, &id(sa)), want, "{node} {sa}");
    }
    idx.delete(ObjectKey::pod("ns", "twin-1"));
    assert!(idx.has_identity_on_node("node-d", &id("twin")));
    idx.delete(ObjectKey::pod("ns", "twin-2"));
    assert!(!idx.has_identity_on_node("node-d", &id("twin")));
    // Another trust domain is another identity.
    assert!(!idx.has_identity_on_node(
        "node-a",
        &"spiffe://other.domain/ns/ns/sa/web".parse().unwrap()
    ));
}

#[test]
fn pod_status_churn_is_a_no_op() {
    let mut idx = index();
    let p = pod_json("ns", "p", "10.0.0.1", json!({"app": "a"}));
    idx.apply(pod_from(p.clone()));
    let churned = set(p.clone(), "/metadata/resourceVersion", json!("42"));
    let churned = set(churned, "/status/startTime", json!("2024-01-01T00:00:00Z"));
    let churned = set(
        churned,
        "/status/containerStatuses",
        json!([{"name": "app", "image": "x", "imageID": "y", "ready": true, "restartCount": 3}]),
    );
    assert!(idx.apply(pod_from(churned)).is_empty());
    assert!(idx.apply(pod_from(p)).is_empty());
}
