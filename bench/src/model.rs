//! The control plane's mesh model at scale: a full build from scratch, then
//! incremental pod updates (relabel + move node + new IP: the costliest
//! kind), with the heap the model holds and the allocations an update
//! makes. One line per size, so growth shows.

use std::time::{Duration, Instant};

use meshbox_controlplane::model::{MeshConfig, MeshIndex, Object};
use serde_json::{Value, json};

use crate::chart::{Chart, Series};
use crate::numbers::num;
use crate::section::{Section, Table};
use crate::stats::{percentile, us};

pub const NAME: &str = "Control plane: mesh model";

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Small sizes (1 000 and 4 000 pods, 200 updates), for CI.
    #[arg(long)]
    pub quick: bool,
    /// Pod counts to measure (services = pods / 5, policies = pods / 20);
    /// default 1000,10000,50000,100000, the last being issue 13's target
    /// size (--quick 1000,4000).
    #[arg(long, value_delimiter = ',')]
    pods: Vec<usize>,
    /// Incremental updates measured per size (default 1 000; --quick 200).
    #[arg(long)]
    updates: Option<usize>,
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

/// The figures of one size.
struct Size {
    pods: usize,
    build: Duration,
    update_p50_us: f64,
    update_p99_us: f64,
    allocations_per_update: f64,
    heap_bytes: f64,
}

fn measure(pods: usize, updates: usize) -> Size {
    let before = crate::alloc::live_bytes();
    let objs = world(pods);
    let started = Instant::now();
    let mut index = MeshIndex::new(MeshConfig::default());
    let _ = index.replace_all(objs);
    let build = started.elapsed();
    // The objects were moved into the build: whatever of them is still
    // live is part of what the model holds.
    let heap_bytes = (crate::alloc::live_bytes() - before) as f64;

    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as usize
    };
    let namespaces = pods.div_ceil(200);
    let mut times = Vec::with_capacity(updates);
    let mut allocations = 0;
    for i in 0..updates {
        let n = next() % namespaces;
        let p = next() % 200.min(pods - n * 200);
        let update = pod(
            &format!("ns{n}"),
            p,
            &format!("10.200.{}.{}", (i / 250) % 250, i % 250 + 1),
            next() % 40,
            &format!("node{}", next() % 20),
        );
        let a = crate::alloc::allocations();
        let t = Instant::now();
        let _ = index.apply(update);
        times.push(us(t.elapsed()));
        allocations += crate::alloc::allocations() - a;
    }
    drop(index);
    Size {
        pods,
        build,
        update_p50_us: percentile(&times, 0.50),
        update_p99_us: percentile(&times, 0.99),
        allocations_per_update: allocations as f64 / updates.max(1) as f64,
        heap_bytes,
    }
}

pub fn run(args: ModelArgs) -> anyhow::Result<Section> {
    let sizes = if !args.pods.is_empty() {
        args.pods.clone()
    } else if args.quick {
        vec![1_000, 4_000]
    } else {
        vec![1_000, 10_000, 50_000, 100_000]
    };
    let updates = args.updates.unwrap_or(if args.quick { 200 } else { 1_000 });
    anyhow::ensure!(sizes.iter().all(|&p| p > 0), "pod counts must be positive");

    let mut section = Section::new("model", NAME);
    section.note(format!(
        "per size: services = pods/5, policies = pods/20, one waypoint per 200 pods; {updates} \
         incremental updates, each a pod relabel + node move + new IP"
    ));
    section.note(
        "memory = live heap held by the model after the build (counted by the benchmark's \
         allocator: exact, and the same on any machine); allocations = heap allocations per update",
    );
    let mut table = Table {
        title: String::new(),
        columns: [
            "pods",
            "services",
            "policies",
            "full build",
            "build per pod",
            "update p50",
            "update p99",
            "allocations per update",
            "heap",
            "heap per pod",
        ]
        .map(String::from)
        .to_vec(),
        rows: vec![],
    };
    let mut results = vec![];
    for &pods in &sizes {
        eprintln!("==> model: {pods} pods");
        let size = measure(pods, updates);
        let p = format!("p{pods}");
        let build_ms = size.build.as_secs_f64() * 1e3;
        section.table_row(
            &format!("{p}_build_ms"),
            &format!("{pods} pods: full build"),
            build_ms,
            "ms",
        );
        section.table_row(
            &format!("{p}_update_p50_us"),
            &format!("{pods} pods: update p50"),
            size.update_p50_us,
            "µs",
        );
        section.table_row(
            &format!("{p}_update_p99_us"),
            &format!("{pods} pods: update p99"),
            size.update_p99_us,
            "µs",
        );
        section.table_row(
            &format!("{p}_update_allocations"),
            &format!("{pods} pods: allocations per update"),
            size.allocations_per_update,
            "",
        );
        section.table_row(
            &format!("{p}_heap_mib"),
            &format!("{pods} pods: model heap"),
            size.heap_bytes / (1024.0 * 1024.0),
            "MiB",
        );
        section.table_row(
            &format!("{p}_heap_per_pod"),
            &format!("{pods} pods: heap per pod"),
            size.heap_bytes / pods as f64,
            "B",
        );
        table.rows.push(vec![
            num(pods as f64),
            num((pods / 5) as f64),
            num((pods / 20) as f64),
            format!("{} ms", num(build_ms)),
            format!("{} µs", num(build_ms * 1e3 / pods as f64)),
            format!("{} µs", num(size.update_p50_us)),
            format!("{} µs", num(size.update_p99_us)),
            num(size.allocations_per_update),
            format!("{} MiB", num(size.heap_bytes / (1024.0 * 1024.0))),
            format!("{} B", num(size.heap_bytes / pods as f64)),
        ]);
        results.push(size);
    }
    section.tables.push(table);

    // Growth from the smallest to the largest size, machine-independent
    // where it can be (heap, allocations): what CI checks.
    let (first, last) = (&results[0], &results[results.len() - 1]);
    let per_pod = |s: &Size| s.heap_bytes / s.pods as f64;
    section.table_row(
        "heap_per_pod_largest",
        "heap per pod at the largest size",
        per_pod(last),
        "B",
    );
    section.table_row(
        "heap_per_pod_growth",
        "heap per pod, largest size / smallest",
        per_pod(last) / per_pod(first),
        "",
    );
    section.table_row(
        "update_allocations_largest",
        "allocations per update at the largest size",
        last.allocations_per_update,
        "",
    );
    section.table_row(
        "update_allocations_growth",
        "allocations per update, largest size / smallest",
        last.allocations_per_update / first.allocations_per_update.max(1.0),
        "",
    );
    section.note(format!(
        "From {} to {} pods ({}×): full build {}×, heap {}×, update p99 {}×, allocations per update {}×.",
        num(first.pods as f64),
        num(last.pods as f64),
        num(last.pods as f64 / first.pods as f64),
        num(last.build.as_secs_f64() / first.build.as_secs_f64()),
        num(last.heap_bytes / first.heap_bytes),
        num(last.update_p99_us / first.update_p99_us),
        num(last.allocations_per_update / first.allocations_per_update.max(1.0)),
    ));

    // Each figure relative to the smallest size, next to "linear": a line
    // along the grey one grows linearly, a flat one does not grow.
    let relative = |f: &dyn Fn(&Size) -> f64| -> Vec<(f64, f64)> {
        results
            .iter()
            .map(|s| (s.pods as f64, f(s) / f(first)))
            .collect()
    };
    section.charts.push(Chart::lines(
        "model-scaling.svg",
        "Mesh model: cost relative to the smallest size",
        "pods",
        &format!("× the figure at {} pods", num(first.pods as f64)),
        vec![
            Series::reference("linear (× pods)", relative(&|s| s.pods as f64)),
            Series::new("full build time", relative(&|s| s.build.as_secs_f64())),
            Series::new("heap", relative(&|s| s.heap_bytes)),
            Series::new("update p99", relative(&|s| s.update_p99_us)),
            Series::new(
                "allocations per update",
                relative(&|s| s.allocations_per_update),
            ),
        ],
    ));
    let absolute = |file: &str, title: &str, unit: &str, f: &dyn Fn(&Size) -> f64| {
        let points: Vec<(f64, f64)> = results.iter().map(|s| (s.pods as f64, f(s))).collect();
        let (p0, v0) = (first.pods as f64, f(first));
        Chart::lines(
            file,
            title,
            "pods",
            unit,
            vec![
                Series::new(title, points.clone()),
                Series::reference(
                    &format!("linear from {} pods", num(p0)),
                    points.iter().map(|(p, _)| (*p, v0 * p / p0)).collect(),
                ),
            ],
        )
    };
    section.charts.push(absolute(
        "model-build.svg",
        "Mesh model: full build time",
        "ms",
        &|s| s.build.as_secs_f64() * 1e3,
    ));
    section.charts.push(absolute(
        "model-heap.svg",
        "Mesh model: heap held",
        "MiB",
        &|s| s.heap_bytes / (1024.0 * 1024.0),
    ));
    Ok(section)
}
