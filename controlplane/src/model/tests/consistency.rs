//! Property test of the incremental machinery (proptest, so a failure
//! shrinks to a short sequence): after any sequence of applies, deletes and
//! relists, the index must equal one built from scratch from the same
//! objects, and the reported changes, replayed, must reproduce it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use meshbox_certs::SpiffeId;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::model::ObjectKey;

/// xorshift64*: turns one seed into one object's many small choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const NAMESPACES: [&str; 3] = ["ns0", "ns1", "istio-system"];
const IPS: [&str; 8] = [
    "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "fd00::7", "10.0.0.8",
];
const NODES: [&str; 3] = ["n0", "n1", "n2"];

fn labels(rng: &mut Rng) -> Value {
    let mut m = serde_json::Map::new();
    if rng.chance(80) {
        m.insert("app".into(), json!(rng.pick(&["a", "b", "c"])));
    }
    if rng.chance(40) {
        m.insert("tier".into(), json!(rng.pick(&["x", "y"])));
    }
    if rng.chance(25) {
        m.insert(
            "istio.io/dataplane-mode".into(),
            json!(rng.pick(&["ambient", "none"])),
        );
    }
    if rng.chance(25) {
        m.insert(
            "istio.io/use-waypoint".into(),
            json!(rng.pick(&["wp0", "wp1", "none", "ghost"])),
        );
        if rng.chance(30) {
            m.insert("istio.io/use-waypoint-namespace".into(), json!("ns0"));
        }
    }
    Value::Object(m)
}

fn selector(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 => json!(null),
        1 => json!({"app": rng.pick(&["a", "b", "c"])}),
        2 => json!({"app": rng.pick(&["a", "b"]), "tier": rng.pick(&["x", "y"])}),
        _ => json!({"tier": rng.pick(&["x", "y"])}),
    }
}

fn random_object(rng: &mut Rng) -> Object {
    let ns = rng.pick(&NAMESPACES);
    match rng.below(9) {
        0 => namespace(ns, labels(rng)),
        1 | 2 => {
            let name = format!("p{}", rng.below(6));
            let mut p = pod_json(ns, &name, rng.pick(&IPS), labels(rng));
            p = set(p, "/spec/nodeName", json!(rng.pick(&NODES)));
            p = set(
                p,
                "/spec/serviceAccountName",
                json!(rng.pick(&["sa0", "sa1"])),
            );
            if rng.chance(15) {
                p = set(
                    p,
                    "/status/phase",
                    json!(rng.pick(&["Pending", "Succeeded"])),
                );
            }
            if rng.chance(15) {
                p = set(p, "/status/conditions/0/status", json!("False"));
            }
            if rng.chance(10) {
                p = set(p, "/spec/hostNetwork", json!(true));
            }
            if rng.chance(20) {
                p = set(p, "/spec/containers/0/ports/0/name", json!("other"));
            }
            if rng.chance(20) {
                // Workloads behind a waypoint (when wp0 serves workloads)
                // exercise what policies send to waypoints.
                p = set(p, "/metadata/labels/istio.io~1use-waypoint", json!("wp0"));
            }
            pod_from(p)
        }
        3 => {
            let name = rng.pick(&["s0", "s1", "s2", "wp0"]);
            let target = rng.pick(&[json!(8080), json!("http-web"), json!(null)]);
            let s = service_json(
                ns,
                name,
                rng.pick(&["10.96.0.1", "10.96.0.2", "None"]),
                selector(rng),
                json!([{"name": "http", "port": 80, "targetPort": target}]),
            );
            service_from(set(s, "/metadata/labels", labels(rng)))
        }
        4 => {
            let svc = rng.pick(&["s0", "s1", "s2"]);
            let mut eps = Vec::new();
            for _ in 0..rng.below(3) {
                if rng.chance(50) {
                    eps.push(json!({"addresses": [rng.pick(&IPS)]}));
                } else {
                    eps.push(json!({"addresses": ["10.9.9.9"], "targetRef": {"kind": "Pod", "name": format!("p{}", rng.below(6))}}));
                }
            }
            slice(
                ns,
                &format!("{svc}-{}", rng.below(2)),
                svc,
                json!(eps),
                json!([{"name": "http", "port": 9000 + rng.below(2)}]),
            )
        }
        5 => {
            let name = rng.pick(&["wp0", "wp1"]);
            let mut gw = waypoint_json(
                ns,
                name,
                json!({"istio.io/waypoint-for": rng.pick(&["service", "workload", "all", "all", "none"])}),
            );
            if rng.chance(20) {
                gw = set(gw, "/spec/gatewayClassName", json!("other"));
            }
            if rng.chance(40) {
                gw = set(
                    gw,
                    "/spec/listeners/0/allowedRoutes",
                    json!({"namespaces": {"from": rng.pick(&["All", "Same"])}}),
                );
            }
            if rng.chance(60) {
                gw = set(gw, "/status/addresses", json!([{"value": "10.96.9.9"}]));
            }
            gateway_from(gw)
        }
        6 => {
            let name = rng.pick(&["pa0", "pa1"]);
            let modes = ["UNSET", "STRICT", "PERMISSIVE", "DISABLE", "bogus"];
            let mut spec = serde_json::Map::new();
            if rng.chance(50) {
                spec.insert("selector".into(), json!({"matchLabels": selector(rng)}));
            }
            spec.insert("mtls".into(), json!({"mode": rng.pick(&modes)}));
            if rng.chance(50) {
                let mut ports = serde_json::Map::new();
                for port in ["8080", "9090", "http"] {
                    if rng.chance(50) {
                        ports.insert(port.into(), json!({"mode": rng.pick(&modes)}));
                    }
                }
                spec.insert("portLevelMtls".into(), Value::Object(ports));
            }
            let mut pa = json!({"metadata": {"name": name, "namespace": ns}, "spec": spec});
            if rng.chance(70) {
                pa = set(
                    pa,
                    "/metadata/creationTimestamp",
                    json!(format!("2024-01-0{}T00:00:00Z", 1 + rng.below(3))),
                );
            }
            peer_auth_from(pa)
        }
        7 => {
            let mut parent =
                json!({"group": "", "kind": "Service", "name": rng.pick(&["s0", "s1", "wp0"])});
            if rng.chance(30) {
                parent["namespace"] = json!(rng.pick(&NAMESPACES));
            }
            let backends: Vec<Value> = (0..rng.below(3))
                .map(|_| {
                    json!({
                        "name": rng.pick(&["s0", "s1", "s2", "gone"]),
                        "port": rng.pick(&[80, 81]),
                        "weight": rng.below(3),
                    })
                })
                .collect();
            let path = rng.pick(&[json!("/"), json!("/api"), json!("(")]);
            let kind = rng.pick(&["PathPrefix", "RegularExpression"]);
            Object::HttpRoute(from(json!({
                "metadata": {"name": rng.pick(&["r0", "r1"]), "namespace": ns},
                "spec": {
                    "parentRefs": [parent],
                    "rules": [{
                        "matches": [{"path": {"type": kind, "value": path}}],
                        "backendRefs": backends
                    }]
                }
            })))
        }
        _ => {
            let name = rng.pick(&["pol0", "pol1", "pol2"]);
            let mut spec = serde_json::Map::new();
            if rng.chance(50) {
                spec.insert("selector".into(), json!({"matchLabels": selector(rng)}));
            }
            spec.insert(
                "action".into(),
                json!(rng.pick(&["ALLOW", "DENY", "CUSTOM", "AUDIT"])),
            );
            let choices = [
                json!(null),
                json!([{}]),
                json!([{"from": [{"source": {"namespaces": ["ns0"]}}], "to": [{"operation": {"ports": ["80"], "methods": ["GET"]}}]}]),
                json!([{"when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}]}]),
            ];
            // Rules with HTTP attributes half the time: on workloads with
            // a waypoint they are what the waypoint takes over.
            let rules = if rng.chance(50) {
                choices[2].clone()
            } else {
                rng.pick(&choices)
            };
            spec.insert("rules".into(), rules);
            if rng.chance(30) {
                let service = rng.pick(&["s0", "s1"]);
                let target = rng.pick(&[
                    json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "wp0"}),
                    json!({"group": "gateway.networking.k8s.io", "kind": "GatewayClass", "name": "istio-waypoint"}),
                    json!({"group": "", "kind": "Service", "name": service}),
                ]);
                spec.insert("targetRefs".into(), json!([target]));
            }
            policy(ns, name, Value::Object(spec))
        }
    }
}

type Snapshot = (
    BTreeMap<String, Arc<meshbox_proto::workload::Address>>,
    BTreeMap<String, Arc<meshbox_proto::security::Authorization>>,
    BTreeMap<String, Arc<meshbox_proto::meshbox::WaypointPolicy>>,
    BTreeMap<String, Arc<meshbox_proto::meshbox::WaypointRoute>>,
);

fn snapshot(idx: &MeshIndex) -> Snapshot {
    (
        idx.addresses()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        idx.authorizations()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        idx.waypoint_policies()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        idx.waypoint_routes()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

/// Replays one change map onto a mirror of what is served.
fn replay<T>(mirror: &mut BTreeMap<String, Arc<T>>, changes: BTreeMap<String, Option<Arc<T>>>) {
    for (k, v) in changes {
        match v {
            Some(v) => mirror.insert(k, v),
            None => mirror.remove(&k),
        };
    }
}

fn assert_same_as_fresh(idx: &MeshIndex, world: &BTreeMap<ObjectKey, Object>, context: &str) {
    let mut fresh = index();
    fresh.replace_all(world.values().cloned().collect());
    let (a, b) = (snapshot(idx), snapshot(&fresh));
    for (k, v) in &b.0 {
        assert_eq!(a.0.get(k), Some(v), "{context}: address {k}");
    }
    assert_eq!(
        a.0.keys().collect::<Vec<_>>(),
        b.0.keys().collect::<Vec<_>>(),
        "{context}: address names"
    );
    assert_eq!(a.1, b.1, "{context}: authorizations");
    assert_eq!(a.2, b.2, "{context}: waypoint policies");
    assert_eq!(a.3, b.3, "{context}: waypoint routes");
    assert_eq!(idx.statuses(), fresh.statuses(), "{context}: statuses");
    assert_eq!(idx.waypoints(), fresh.waypoints(), "{context}: waypoints");
    assert_eq!(idx.routes(), fresh.routes(), "{context}: routes");
    for ns in NAMESPACES {
        for svc in ["s0", "s1", "wp0"] {
            assert_eq!(
                idx.service_routes(ns, svc),
                fresh.service_routes(ns, svc),
                "{context}: routes of {ns}/{svc}"
            );
        }
    }
    for ip in IPS.iter().chain(&["10.96.0.1", "10.96.0.2"]) {
        let ip: IpAddr = ip.parse().expect("ip");
        assert_eq!(
            idx.lookup_ip(ip),
            fresh.lookup_ip(ip),
            "{context}: lookup {ip}"
        );
    }
    for node in NODES {
        for ns in NAMESPACES {
            for sa in ["sa0", "sa1"] {
                let id = SpiffeId::new("cluster.local", ns, sa).expect("identity");
                assert_eq!(
                    idx.has_identity_on_node(node, &id),
                    fresh.has_identity_on_node(node, &id),
                    "{context}: identity {node} {id}"
                );
            }
        }
    }
}

/// One change the model ingests. Objects come from [`random_object`] with
/// a seed, so a shrunk failure names a short sequence of small seeds.
#[derive(Clone, Debug)]
enum Op {
    /// Add or update the object the seed makes.
    Apply(u64),
    /// Delete the object at this position of the world (in key order).
    Delete(prop::sample::Index),
    /// A relist: the world becomes exactly the objects these seeds make.
    Relist(Vec<u64>),
}

fn object_from(seed: u64) -> Object {
    random_object(&mut Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => any::<u64>().prop_map(Op::Apply),
        3 => any::<prop::sample::Index>().prop_map(Op::Delete),
        1 => prop::collection::vec(any::<u64>(), 0..16).prop_map(Op::Relist),
    ]
}

proptest! {
    // Each case replays up to 150 changes with a full rebuild every 40:
    // 128 cases keep the test to a few seconds in a debug build.
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// After any sequence of applies, deletes and relists, the index equals
    /// one built from scratch from the same objects, the changes it reported,
    /// replayed, reproduce what it serves, and relisting the same world
    /// changes nothing.
    #[test]
    fn incremental_equals_fresh_build(ops in prop::collection::vec(op(), 1..150)) {
        let mut idx = index();
        let mut world: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        let mut mirror = snapshot(&idx);
        for (step, op) in ops.iter().enumerate() {
            let changes = match op {
                Op::Apply(seed) => {
                    let obj = object_from(*seed);
                    world.insert(obj.key().expect("named"), obj.clone());
                    idx.apply(obj)
                }
                Op::Delete(at) => {
                    let Some(key) = world.keys().nth(at.index(world.len().max(1))).cloned() else {
                        continue;
                    };
                    world.remove(&key);
                    idx.delete(key)
                }
                Op::Relist(seeds) => {
                    world = seeds
                        .iter()
                        .map(|seed| {
                            let obj = object_from(*seed);
                            (obj.key().expect("named"), obj)
                        })
                        .collect();
                    idx.replace_all(world.values().cloned().collect())
                }
            };
            replay(&mut mirror.0, changes.addresses);
            replay(&mut mirror.1, changes.authorizations);
            replay(&mut mirror.2, changes.waypoint_policies);
            replay(&mut mirror.3, changes.waypoint_routes);
            let context = format!("step {step} ({op:?})");
            assert_eq!(mirror, snapshot(&idx), "{context}: replayed changes");
            if step % 40 == 39 {
                assert_same_as_fresh(&idx, &world, &context);
            }
        }
        assert_same_as_fresh(&idx, &world, "end");
        let relist = idx.replace_all(world.values().cloned().collect());
        assert!(relist.is_empty(), "relist changed {:?}", summary(&relist));
    }
}
