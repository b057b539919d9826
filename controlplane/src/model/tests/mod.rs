//! Model tests: feed Kubernetes objects (built from JSON, as they would
//! arrive from the API server or a manifest), assert the derived resources,
//! the reported changes and the statuses.

mod consistency;
mod index;
mod peer_authentication;
mod policies;
mod routes;
mod services;
mod waypoint_config;
mod waypoints;
mod workloads;

use meshbox_proto::security::Authorization;
use meshbox_proto::workload::{Service as XdsService, Workload, address};
use serde_json::{Value, json};

use super::{Changes, MeshConfig, MeshIndex, Object, ObjectStatus};

pub(super) fn index() -> MeshIndex {
    MeshIndex::new(MeshConfig::default())
}

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("test object must deserialize")
}

/// Sets `pointer` in `v`, creating objects on the way.
pub(super) fn set(mut v: Value, pointer: &str, value: Value) -> Value {
    let mut cur = &mut v;
    let parts: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            match cur {
                Value::Array(a) => a[part.parse::<usize>().expect("array index")] = value,
                other => {
                    if !other.is_object() {
                        *other = json!({});
                    }
                    other[part.as_str()] = value;
                }
            }
            break;
        }
        cur = match cur {
            Value::Array(a) => &mut a[part.parse::<usize>().expect("array index")],
            other => {
                if !other.is_object() {
                    *other = json!({});
                }
                let map = other.as_object_mut().expect("object");
                map.entry(part.clone()).or_insert(json!({}))
            }
        };
    }
    v
}

/// Removes `pointer` from `v`.
pub(super) fn unset(mut v: Value, pointer: &str) -> Value {
    let (parent, last) = pointer.rsplit_once('/').expect("pointer");
    let last = last.replace("~1", "/").replace("~0", "~");
    if let Some(Value::Object(m)) = v.pointer_mut(parent) {
        m.remove(&last);
    }
    v
}

pub(super) fn namespace(name: &str, labels: Value) -> Object {
    Object::Namespace(from(json!({"metadata": {"name": name, "labels": labels}})))
}

pub(super) fn ambient_namespace(name: &str) -> Object {
    namespace(name, json!({"istio.io/dataplane-mode": "ambient"}))
}

/// A Running, Ready pod on node-a with container port `http-web` 8080.
pub(super) fn pod_json(ns: &str, name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "app", "ports": [{"name": "http-web", "containerPort": 8080}]}]
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

pub(super) fn pod(ns: &str, name: &str, ip: &str, labels: Value) -> Object {
    pod_from(pod_json(ns, name, ip, labels))
}

pub(super) fn pod_from(v: Value) -> Object {
    Object::Pod(from(v))
}

pub(super) fn service_json(
    ns: &str,
    name: &str,
    vip: &str,
    selector: Value,
    ports: Value,
) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": selector, "ports": ports}
    })
}

pub(super) fn service(ns: &str, name: &str, vip: &str, selector: Value) -> Object {
    service_from(service_json(
        ns,
        name,
        vip,
        selector,
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
    ))
}

pub(super) fn service_from(v: Value) -> Object {
    Object::Service(from(v))
}

pub(super) fn slice(ns: &str, name: &str, service: &str, endpoints: Value, ports: Value) -> Object {
    Object::EndpointSlice(from(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports
    })))
}

pub(super) fn waypoint_json(ns: &str, name: &str, labels: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
        }
    })
}

/// A waypoint Gateway plus the Service that fronts it.
pub(super) fn waypoint(ns: &str, name: &str, labels: Value, vip: &str) -> Vec<Object> {
    vec![
        gateway_from(waypoint_json(ns, name, labels)),
        service_from(set(
            service_json(
                ns,
                name,
                vip,
                json!({"gateway.networking.k8s.io/gateway-name": name}),
                json!([{"name": "mesh", "port": 15008}]),
            ),
            "/metadata/labels",
            json!({"gateway.networking.k8s.io/gateway-name": name}),
        )),
    ]
}

pub(super) fn gateway_from(v: Value) -> Object {
    Object::Gateway(from(v))
}

pub(super) fn policy(ns: &str, name: &str, spec: Value) -> Object {
    Object::AuthorizationPolicy(policy_obj(ns, name, spec))
}

pub(super) fn policy_obj(ns: &str, name: &str, spec: Value) -> crate::k8s::AuthorizationPolicy {
    from(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
}

pub(super) fn peer_auth_from(v: Value) -> Object {
    Object::PeerAuthentication(from(v))
}

pub(super) fn apply_all(idx: &mut MeshIndex, objs: Vec<Object>) -> Changes {
    let mut all = Changes::default();
    for o in objs {
        let c = idx.apply(o);
        all.addresses.extend(c.addresses);
        all.authorizations.extend(c.authorizations);
        all.waypoint_policies.extend(c.waypoint_policies);
        all.waypoint_routes.extend(c.waypoint_routes);
    }
    all
}

pub(super) fn uid(ns: &str, name: &str) -> String {
    format!("Kubernetes//Pod/{ns}/{name}")
}

pub(super) fn svc_name(ns: &str, name: &str) -> String {
    format!("{ns}/{name}.{ns}.svc.cluster.local")
}

pub(super) fn workload(idx: &MeshIndex, ns: &str, name: &str) -> Option<Workload> {
    match idx.address(&uid(ns, name))?.r#type.clone()? {
        address::Type::Workload(w) => Some(w),
        address::Type::Service(_) => panic!("{ns}/{name} is a service"),
    }
}

pub(super) fn xds_service(idx: &MeshIndex, ns: &str, name: &str) -> Option<XdsService> {
    match idx.address(&svc_name(ns, name))?.r#type.clone()? {
        address::Type::Service(s) => Some(s),
        address::Type::Workload(_) => panic!("{ns}/{name} is a workload"),
    }
}

pub(super) fn authorization(idx: &MeshIndex, ns: &str, name: &str) -> Option<Authorization> {
    idx.authorization(&format!("{ns}/{name}"))
        .map(|a| (*a).clone())
}

/// Changes as sorted lines: `+name` upserted, `-name` removed, with
/// authorizations prefixed `authz:`.
pub(super) fn summary(c: &Changes) -> Vec<String> {
    let mut out: Vec<String> = c
        .addresses
        .iter()
        .map(|(k, v)| format!("{}{k}", if v.is_some() { "+" } else { "-" }))
        .chain(
            c.authorizations
                .iter()
                .map(|(k, v)| format!("{}authz:{k}", if v.is_some() { "+" } else { "-" })),
        )
        .collect();
    out.sort();
    out
}

pub(super) fn statuses_of(idx: &MeshIndex, kind: super::Kind, ns: &str, name: &str) -> Vec<String> {
    idx.statuses()
        .into_iter()
        .filter(|s: &ObjectStatus| s.kind == kind && s.namespace == ns && s.name == name)
        .map(|s| s.message)
        .collect()
}

/// The `services` map of a workload as sorted `(key, [(service_port, target_port)])`.
pub(super) fn service_ports(w: &Workload) -> Vec<(String, Vec<(u32, u32)>)> {
    let mut out: Vec<(String, Vec<(u32, u32)>)> = w
        .services
        .iter()
        .map(|(k, pl)| {
            (
                k.clone(),
                pl.ports
                    .iter()
                    .map(|p| (p.service_port, p.target_port))
                    .collect(),
            )
        })
        .collect();
    out.sort();
    out
}
