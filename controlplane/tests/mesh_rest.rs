//! The mesh as the REST API shows it, from the example manifest folder, and
//! how it follows edits to that folder.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

fn get(cp: &ControlPlane, path: &str) -> Value {
    let (status, body) = curl(cp, &[], path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `path` until `check` holds (the folder is re-read within a second).
/// The deadline only ends a hang: a loaded machine may take several seconds.
fn eventually(cp: &ControlPlane, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get(cp, path);
        if check(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {path} never got there: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_example_folder_shows_workloads_services_waypoints_and_policies() {
    if !have_tool("curl") {
        return;
    }
    let cp = start_bookinfo();

    let workloads = get(&cp, "/api/v1/workloads?namespace=bookinfo");
    let names: Vec<&str> = workloads
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("productpage-v1")),
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.starts_with("reviews-v")).count(),
        2
    );

    let reviews = get(&cp, "/api/v1/workloads/bookinfo/reviews-v1-5b8f6c7d9-p7r4s");
    assert_eq!(
        reviews["identity"],
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    );
    assert_eq!(reviews["node"], "node-1");
    assert_eq!(reviews["addresses"][0], "10.244.1.11");
    assert_eq!(reviews["protocol"], "HBONE");
    assert_eq!(reviews["status"], "Healthy");
    assert_eq!(reviews["workloadName"], "reviews-v1");
    assert_eq!(reviews["canonicalName"], "reviews");
    assert_eq!(reviews["canonicalRevision"], "v1");
    assert_eq!(
        reviews["services"]["bookinfo/reviews.bookinfo.svc.cluster.local"][0]["targetPort"], 9080,
        "named targetPort resolved: {reviews:#}"
    );
    assert_eq!(
        reviews["authorizationPolicies"],
        serde_json::json!(["bookinfo/reviews-from-productpage"])
    );

    // The out-of-mesh client is known, but not captured.
    let sleep = &get(&cp, "/api/v1/workloads?namespace=legacy")[0];
    assert_eq!(sleep["protocol"], "NONE");

    let reviews_svc = get(&cp, "/api/v1/services/bookinfo/reviews");
    assert_eq!(
        reviews_svc["hostname"],
        "reviews.bookinfo.svc.cluster.local"
    );
    assert_eq!(reviews_svc["vips"][0], "10.96.0.12");
    assert_eq!(reviews_svc["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(
        reviews_svc["waypoint"]["hostname"],
        "bookinfo/reviews-waypoint.bookinfo.svc.cluster.local"
    );
    assert_eq!(reviews_svc["waypoint"]["hboneMtlsPort"], 15008);
    let details_svc = get(&cp, "/api/v1/services/bookinfo/details");
    assert!(details_svc["waypoint"].is_null());

    let waypoints = get(&cp, "/api/v1/waypoints");
    assert_eq!(waypoints[0]["name"], "reviews-waypoint");

    let policies = get(&cp, "/api/v1/policies");
    let by_name = |n: &str| {
        policies
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} missing from {policies:#}"))
    };
    assert_eq!(by_name("details-deny-legacy")["action"], "DENY");
    let allow = by_name("reviews-from-productpage");
    assert_eq!(allow["action"], "ALLOW");
    assert_eq!(allow["scope"], "WORKLOAD_SELECTOR");
    let text = allow.to_string();
    assert!(
        text.contains("cluster.local/ns/bookinfo/sa/bookinfo-productpage"),
        "{text}"
    );
    assert!(text.contains("9080"), "{text}");

    // Unknown objects are a JSON 404.
    let (status, body) = curl(&cp, &[], "/api/v1/workloads/bookinfo/nope");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not_found"));
}

#[test]
fn edits_to_the_folder_are_served_and_broken_files_keep_the_last_good_state() {
    if !have_tool("curl") {
        return;
    }
    let cp = start_bookinfo();
    let policies = cp.config.join("policies.yaml");
    let original = std::fs::read_to_string(&policies).unwrap();
    let policy_names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };

    // Edit: add a policy.
    let extra = "\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all-ratings\n  namespace: bookinfo\nspec:\n  selector:\n    matchLabels: {app: ratings}\n  action: DENY\n  rules: [{}]\n";
    std::fs::write(&policies, format!("{original}{extra}")).unwrap();
    let started = Instant::now();
    eventually(&cp, "/api/v1/policies", "added policy", |v| {
        policy_names(v).contains(&"deny-all-ratings".to_owned())
    });
    eprintln!("edit served after {:?}", started.elapsed());

    // Break: the file no longer parses. The last good state stays, the error
    // is reported with file and document.
    std::fs::write(
        &policies,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: [oops\n",
    )
    .unwrap();
    let status = eventually(&cp, "/api/v1/status", "reported error", |v| {
        !v["files"].as_array().unwrap().is_empty()
    });
    assert_eq!(status["files"][0]["file"], "policies.yaml");
    assert_eq!(status["files"][0]["document"], 0);
    assert!(policy_names(&get(&cp, "/api/v1/policies")).contains(&"deny-all-ratings".to_owned()));

    // Fix: back to the original; the extra policy is gone, the error cleared.
    std::fs::write(&policies, &original).unwrap();
    eventually(&cp, "/api/v1/policies", "fixed file", |v| {
        !policy_names(v).contains(&"deny-all-ratings".to_owned()) && policy_names(v).len() == 3
    });
    let status = get(&cp, "/api/v1/status");
    assert!(status["files"].as_array().unwrap().is_empty(), "{status:#}");

    // A pod moves node: the workload follows.
    let pods = cp.config.join("pods.yaml");
    let text = std::fs::read_to_string(&pods).unwrap();
    let moved = text.replacen("nodeName: node-1", "nodeName: node-9", 1);
    std::fs::write(&pods, moved).unwrap();
    eventually(
        &cp,
        "/api/v1/workloads/bookinfo/productpage-v1-6f9c7d8b5-k2x9p",
        "moved pod",
        |v| v["node"] == "node-9",
    );
}

/// A 90/10 split of `reviews` (which has a waypoint in the example), one
/// backend that does not exist and one filter meshbox does not support.
const REVIEWS_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews-split
  namespace: bookinfo
spec:
  parentRefs:
  - group: \"\"
    kind: Service
    name: reviews
    port: 9080
  rules:
  - matches:
    - path: {type: PathPrefix, value: /reviews}
      headers:
      - {name: X-Canary, value: \"yes\"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Routed-By, value: meshbox}]
    backendRefs:
    - {name: reviews, port: 9080, weight: 90}
    - {name: reviews-v9, port: 9080, weight: 10}
    timeouts: {request: 10s}
  - matches:
    - path: {type: Exact, value: /old}
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}}
    backendRefs:
    - {name: reviews, port: 9080}
";

#[test]
fn an_http_route_in_the_folder_is_shown_checked_with_its_problems() {
    if !have_tool("curl") {
        return;
    }
    let mut files = example_manifests();
    files.push(("routes.yaml".to_owned(), REVIEWS_ROUTE.to_owned()));
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_str()))
        .collect();
    let cp = ControlPlane::start(&refs, &[]);

    let routes = get(&cp, "/api/v1/routes");
    assert_eq!(routes.as_array().unwrap().len(), 1, "{routes:#}");
    let route = &routes[0];
    assert_eq!(route["namespace"], "bookinfo");
    assert_eq!(route["name"], "reviews-split");
    assert_eq!(
        route["parents"],
        serde_json::json!([{
            "namespace": "bookinfo", "name": "reviews", "port": 9080,
            "consumer": false, "found": true, "waypoint": "bookinfo/reviews-waypoint"
        }])
    );
    let split = &route["rules"][0];
    assert_eq!(split["outcome"], "route");
    assert_eq!(split["matches"][0]["path"]["value"], "/reviews");
    assert_eq!(split["matches"][0]["headers"][0]["name"], "x-canary");
    assert_eq!(
        split["requestHeaderModifier"]["set"][0],
        serde_json::json!({"name": "x-routed-by", "value": "meshbox"})
    );
    assert_eq!(split["timeouts"]["requestMs"], 10_000);
    assert_eq!(split["backends"][0]["weight"], 90);
    assert!(split["backends"][0].get("error").is_none(), "{split:#}");
    assert_eq!(split["backends"][1]["weight"], 10);
    assert_eq!(split["backends"][1]["error"], "backend not found");
    assert_eq!(route["rules"][1]["outcome"], "answer500");

    // The same problems are in /status, with the route named.
    let status = get(&cp, "/api/v1/status");
    let route_problems: Vec<&str> = status["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "HTTPRoute" && o["name"] == "reviews-split")
        .map(|o| o["message"].as_str().unwrap())
        .collect();
    assert_eq!(route_problems.len(), 2, "{status:#}");
    assert!(
        route_problems
            .iter()
            .any(|m| m.contains("bookinfo/reviews-v9: backend not found")),
        "{route_problems:?}"
    );
    assert!(
        route_problems
            .iter()
            .any(|m| m.contains("\"RequestRedirect\" is not supported")),
        "{route_problems:?}"
    );

    // The namespace filter, and removal with the file.
    assert_eq!(
        get(&cp, "/api/v1/routes?namespace=legacy"),
        serde_json::json!([])
    );
    std::fs::remove_file(cp.config.join("routes.yaml")).unwrap();
    eventually(&cp, "/api/v1/routes", "removed route", |v| {
        v.as_array().unwrap().is_empty()
    });
}

#[test]
fn run_without_a_cluster_or_folder_says_how_to_run_standalone() {
    let state = temp_dir("nocluster");
    let out = std::process::Command::new(BIN)
        .args(["run", "--state-dir"])
        .arg(state.path())
        .env_remove("KUBECONFIG")
        .env("HOME", state.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Kubernetes cluster is reachable"), "{err}");
    assert!(err.contains("--config-dir"), "{err}");
}
