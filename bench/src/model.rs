//! The control plane's mesh model at scale: a full build from scratch, then
//! incremental pod updates (relabel + move node + new IP: the costliest kind),
//! with the memory the model holds. One line per size, so growth shows.

use std::time::{Duration, Instant};

use meshbox_controlplane::model::{MeshConfig, MeshIndex, Object};
use serde_json::{Value, json};

use crate::report::Section;

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Pod counts to measure (services = pods / 5, policies = pods / 20).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pods: Vec<usize>,
    /// Incremental updates measured per size.
    #[arg(long, default_value_t = 1000)]
    updates: usize,
}

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("generated objects are valid")
}

fn pod(ns: &str, n: usize, ip: &str, app: usize, node: &str) -> Object {
    Object::Pod(from(json!({
        "metadata": {
            "name": format!("pod{n}"), "namespace": ns,
            "labels": {"app": format!("app{app}"), "version": "v1", "pod-template-hash": "5f6b9c7d8"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("app{app}-5f6b9c7d8"), "uid": "u", "controller": true}]
        },
        "spec": {"nodeName": node, "serviceAccountName": format!("app{app}"),
            "containers": [{"name": "app", "ports": [{"name": "http-web", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}
    })))
}

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 1 + i / 62_500, (i / 250) % 250, i % 250 + 1)
}

/// 200 pods, 40 services and 10 policies per namespace, one waypoint each.
fn world(pods: usize) -> Vec<Object> {
    let namespaces = pods.div_ceil(200);
    let mut objs = Vec::new();
    for n in 0..namespaces {
        let ns = format!("ns{n}");
        objs.push(Object::Namespace(from(json!({"metadata": {"name": ns,
            "labels": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}}}))));
        objs.push(Object::Gateway(from(
            json!({"metadata": {"name": "wp", "namespace": ns},
            "spec": {"gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
        )));
        for s in 0..40 {
            let vip = format!("10.96.{}.{}", (n * 40 + s) / 250, (n * 40 + s) % 250 + 1);
            objs.push(Object::Service(from(json!({"metadata": {"name": format!("svc{s}"), "namespace": ns},
                "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": format!("app{s}")},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http-web"}]}}))));
        }
        for p in 0..10 {
            let spec = if p == 0 {
                json!({"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": [ns.clone()]}}]}]})
            } else {
                json!({"selector": {"matchLabels": {"app": format!("app{p}")}},
                    "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]})
            };
            objs.push(Object::AuthorizationPolicy(from(
                json!({"metadata": {"name": format!("pol{p}"), "namespace": ns}, "spec": spec}),
            )));
        }
        for p in 0..200.min(pods - n * 200) {
            objs.push(pod(
                &ns,
                p,
                &ip(n * 200 + p),
                p % 40,
                &format!("node{}", p % 20),
            ));
        }
    }
    objs
}

pub fn run(args: ModelArgs) -> Section {
    let mut section = Section::new("Mesh model");
    section.notes.push(format!(
        "per size: services = pods/5, policies = pods/20, one waypoint per 200 pods; {} incremental updates, each a pod relabel + node move + new IP",
        args.updates
    ));
    section
        .notes
        .push("memory = process RSS growth while the model is held (an upper bound)".into());
    for &pods in &args.pods {
        let objs = world(pods);
        let rss_before = crate::proc::rss_kib(None);
        let started = Instant::now();
        let mut index = MeshIndex::new(MeshConfig::default());
        let _ = index.replace_all(objs);
        let build = started.elapsed();
        let rss_model = crate::proc::rss_kib(None).saturating_sub(rss_before);

        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as usize
        };
        let namespaces = pods.div_ceil(200);
        let mut times: Vec<Duration> = Vec::with_capacity(args.updates);
        for i in 0..args.updates {
            let n = next() % namespaces;
            let p = next() % 200.min(pods - n * 200);
            let update = pod(
                &format!("ns{n}"),
                p,
                &format!("10.200.{}.{}", (i / 250) % 250, i % 250 + 1),
                next() % 40,
                &format!("node{}", next() % 20),
            );
            let t = Instant::now();
            let _ = index.apply(update);
            times.push(t.elapsed());
        }
        times.sort();
        let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
        section.row(
            &format!("{pods} pods: full build"),
            build.as_secs_f64() * 1e3,
            "ms",
        );
        section.row(&format!("{pods} pods: update p50"), pct(0.50), "µs");
        section.row(&format!("{pods} pods: update p99"), pct(0.99), "µs");
        section.row(
            &format!("{pods} pods: model memory"),
            rss_model as f64 / 1024.0,
            "MiB",
        );
        drop(index);
    }
    section
}
