//! The status meshbox gives an `HTTPRoute` in Kubernetes mode, as pure
//! functions: the route and the mesh model in, `status.parents` out.
//! [`controller`] writes it.
//!
//! One entry per parentRef meshbox is responsible for, with
//! [`CONTROLLER_NAME`]:
//! - a Service (GAMMA): `Accepted` (False with `NoMatchingParent` when the
//!   Service or its port does not exist, `UnsupportedValue` for what meshbox
//!   does not attach, such as `sectionName`), `ResolvedRefs` (False with
//!   `InvalidKind`, `RefNotPermitted` or `BackendNotFound` and every unusable
//!   backend when one is), and, as Istio reports for mesh routes,
//!   `ResolvedWaypoints` (False while the Service has no waypoint, so the
//!   route has no effect);
//! - a waypoint Gateway meshbox serves: `Accepted` False
//!   (`NotAllowedByListeners`): meshbox attaches mesh routes to Services.
//!
//! Other refs (Gateways of other classes, other kinds) belong to other
//! implementations and get no entry from meshbox. Entries of other
//! controllers are kept as they are: `status.parents` is an atomic list, so
//! meshbox writes it whole, theirs included.
//!
//! Problems with a rule (an unsupported match or filter, a bad timeout) do
//! not refuse the route: meshbox applies its other rules and fails the
//! rule closed. They are listed in `Accepted`'s message, as
//! `/api/v1/routes` lists them.

pub mod controller;

use std::collections::BTreeSet;

use meshbox_proto::workload::address;
use serde_json::json;

use crate::k8s::{HttpBackendRef, HttpRoute, HttpRouteStatus, ParentReference, RouteCondition};
use crate::k8s::{OtherFields, RouteParentStatus};
use crate::model::{MeshIndex, RouteInfo, RouteParentInfo};

/// Who wrote an entry of `status.parents`. meshbox's own name, not Istio's
/// (`istio.io/gateway-controller`, which istiod writes for mesh routes too):
/// with istiod in the same cluster, two controllers under one name would
/// each take the other's entry for its own and rewrite it forever, and
/// users must be able to tell whose checks an entry reports.
pub const CONTROLLER_NAME: &str = "meshbox.io/mesh-controller";

/// The CRD's limits: entries in `status.parents`, characters in a message.
const MAX_PARENTS: usize = 32;
const MAX_MESSAGE: usize = 32768;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The whole `status` the route should carry: other controllers' entries as
/// they are, then meshbox's, one per parentRef it is responsible for, in
/// `spec.parentRefs` order. `now` stamps conditions whose status changed.
pub fn desired_status(route: &HttpRoute, index: &MeshIndex, now: &str) -> HttpRouteStatus {
    let namespace = route
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let current: &[RouteParentStatus] = route
        .status
        .as_ref()
        .map(|s| s.parents.as_slice())
        .unwrap_or_default();
    let mut parents: Vec<RouteParentStatus> = current
        .iter()
        .filter(|p| p.controller_name != CONTROLLER_NAME)
        .cloned()
        .collect();

    let info = index.check_route(namespace, route);
    let resolved_refs = resolved_refs(route, namespace, &info);
    let rule_problems = rule_problems(&info);
    let mut waypoints: Option<BTreeSet<(String, String)>> = None;
    let mut seen: Vec<&ParentReference> = Vec::new();
    for (i, parent_ref) in route.spec.parent_refs.iter().enumerate() {
        // The same ref twice is one parent.
        if seen.contains(&parent_ref) {
            continue;
        }
        seen.push(parent_ref);
        let parent_ns = parent_ref
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(namespace);
        let group = parent_ref.group.as_deref().unwrap_or(GATEWAY_GROUP);
        let kind = parent_ref.kind.as_deref().unwrap_or("Gateway");
        let verdicts = match (group, kind) {
            ("" | "core", "Service") => service_parent(
                index,
                &info,
                i,
                parent_ref,
                parent_ns,
                namespace,
                &rule_problems,
            ),
            (GATEWAY_GROUP, "Gateway") => {
                let waypoints = waypoints.get_or_insert_with(|| {
                    index
                        .waypoints()
                        .into_iter()
                        .map(|w| (w.namespace, w.name))
                        .collect()
                });
                if !waypoints.contains(&(parent_ns.to_owned(), parent_ref.name.clone())) {
                    continue; // another implementation's Gateway
                }
                vec![Verdict::no(
                    "Accepted",
                    "NotAllowedByListeners",
                    format!(
                        "Gateway {parent_ns}/{} is a waypoint: meshbox applies mesh routes attached to Services (GAMMA), not to a waypoint itself; name the Services that use it in parentRefs",
                        parent_ref.name
                    ),
                )]
            }
            _ => continue,
        };
        let mut verdicts = verdicts;
        verdicts.push(resolved_refs.clone());
        let previous = current
            .iter()
            .find(|p| p.controller_name == CONTROLLER_NAME && &p.parent_ref == parent_ref);
        parents.push(RouteParentStatus {
            parent_ref: parent_ref.clone(),
            controller_name: CONTROLLER_NAME.to_owned(),
            conditions: verdicts
                .into_iter()
                .map(|v| v.condition(previous, route.metadata.generation, now))
                .collect(),
            other: OtherFields::new(),
        });
    }
    parents.truncate(MAX_PARENTS);
    HttpRouteStatus { parents }
}

/// The body of a server-side apply of `status` to the route's status
/// subresource. `parents` is always sent, empty or not (the CRD requires
/// it), and the resourceVersion the status was computed from is a
/// precondition: the list is atomic, so writing it over a newer one would
/// drop another controller's update.
pub fn status_apply_body(route: &HttpRoute, status: &HttpRouteStatus) -> serde_json::Value {
    let mut metadata = json!({"name": route.metadata.name});
    if let Some(ns) = &route.metadata.namespace {
        metadata["namespace"] = json!(ns);
    }
    if let Some(version) = &route.metadata.resource_version {
        metadata["resourceVersion"] = json!(version);
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": metadata,
        "status": {"parents": status.parents},
    })
}

/// One condition before it is stamped.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Verdict {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

impl Verdict {
    fn yes(type_: &'static str, reason: &'static str, message: String) -> Self {
        Self {
            type_,
            status: true,
            reason,
            message,
        }
    }

    fn no(type_: &'static str, reason: &'static str, message: String) -> Self {
        Self {
            type_,
            status: false,
            reason,
            message,
        }
    }

    /// Keeps the previous `lastTransitionTime` while the status holds, so an
    /// unchanged verdict leaves the status as it is and nothing is written.
    fn condition(
        self,
        previous: Option<&RouteParentStatus>,
        generation: Option<i64>,
        now: &str,
    ) -> RouteCondition {
        let status = if self.status { "True" } else { "False" };
        let since = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == self.type_))
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.to_owned());
        RouteCondition {
            type_: self.type_.to_owned(),
            status: status.to_owned(),
            reason: Some(self.reason.to_owned()),
            message: Some(truncate(self.message)),
            observed_generation: generation,
            last_transition_time: Some(since),
        }
    }
}

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

/// `Accepted` and `ResolvedWaypoints` for a Service parentRef (`i` in
/// `spec.parentRefs`).
fn service_parent(
    index: &MeshIndex,
    info: &RouteInfo,
    i: usize,
    parent_ref: &ParentReference,
    parent_ns: &str,
    route_ns: &str,
    rule_problems: &[String],
) -> Vec<Verdict> {
    let service = format!("{parent_ns}/{}", parent_ref.name);
    let port = parent_ref
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    let attached = (parent_ref.section_name.is_none()
        && port.is_some() == parent_ref.port.is_some())
    .then(|| {
        info.parents
            .iter()
            .find(|p| p.namespace == parent_ns && p.name == parent_ref.name && p.port == port)
    })
    .flatten();
    let Some(attached) = attached else {
        // The model refused the ref; it says why under the ref's index.
        let prefix = format!("parentRefs[{i}]: ");
        let why = info
            .problems
            .iter()
            .find_map(|p| p.strip_prefix(&prefix))
            .map_or_else(
                || format!("Service {service}: meshbox does not attach this parentRef"),
                str::to_owned,
            );
        return vec![Verdict::no("Accepted", "UnsupportedValue", why)];
    };
    if !attached.found {
        return vec![Verdict::no(
            "Accepted",
            "NoMatchingParent",
            format!("Service {service} not found"),
        )];
    }
    if let Some(port) = port
        && !service_has_port(index, parent_ns, &parent_ref.name, port)
    {
        return vec![Verdict::no(
            "Accepted",
            "NoMatchingParent",
            format!("Service {service} has no port {port}"),
        )];
    }
    vec![
        accepted(attached, &service, port, route_ns, rule_problems),
        resolved_waypoints(attached, &service),
    ]
}

fn accepted(
    parent: &RouteParentInfo,
    service: &str,
    port: Option<u16>,
    route_ns: &str,
    rule_problems: &[String],
) -> Verdict {
    let on = port.map_or_else(|| service.to_owned(), |p| format!("{service} port {p}"));
    let mut message = if parent.consumer {
        format!(
            "attached to Service {on} as a consumer route: it applies to clients in namespace {route_ns} only"
        )
    } else {
        format!("attached to Service {on}: it applies to every client")
    };
    if parent.waypoint.is_none() {
        message.push_str(&format!(
            ". It has no effect until Service {service} has a waypoint: routes are applied by a waypoint (label the Service or its namespace istio.io/use-waypoint)"
        ));
    }
    if !rule_problems.is_empty() {
        message.push_str(". Problems (the rules concerned fail closed): ");
        message.push_str(&rule_problems.join("; "));
    }
    Verdict::yes("Accepted", "Accepted", message)
}

/// Istio's condition for mesh routes; False (where Istio leaves it True and
/// says so in the message) while nothing applies the route.
fn resolved_waypoints(parent: &RouteParentInfo, service: &str) -> Verdict {
    match &parent.waypoint {
        Some(waypoint) => Verdict::yes(
            "ResolvedWaypoints",
            "ResolvedWaypoints",
            format!("Service {service} uses waypoint {waypoint}, which applies this route"),
        ),
        None => Verdict::no(
            "ResolvedWaypoints",
            "NoWaypoint",
            format!(
                "Service {service} has no waypoint (istio.io/use-waypoint on the Service or its namespace), so this route has no effect"
            ),
        ),
    }
}

/// Whether the Service serves `port`, as its address in the model says.
/// A Service the model serves no address for is given the benefit of the
/// doubt: `Accepted` must not flap on a lookup that says nothing.
fn service_has_port(index: &MeshIndex, namespace: &str, name: &str, port: u16) -> bool {
    let resource = format!(
        "{namespace}/{name}.{namespace}.svc.{}",
        index.config().cluster_domain
    );
    match index.address(&resource).and_then(|a| a.r#type.clone()) {
        Some(address::Type::Service(s)) => {
            s.ports.iter().any(|p| p.service_port == u32::from(port))
        }
        _ => true,
    }
}

/// `ResolvedRefs`, the same for every parent: False with the first
/// unusable backend's reason, and every unusable backend in the message.
fn resolved_refs(route: &HttpRoute, route_ns: &str, info: &RouteInfo) -> Verdict {
    let mut reason = None;
    let mut unusable = Vec::new();
    for (i, rule) in info.rules.iter().enumerate() {
        for (j, backend) in rule.backends.iter().enumerate() {
            let Some(error) = &backend.error else {
                continue;
            };
            let written = route.spec.rules.get(i).and_then(|r| r.backend_refs.get(j));
            reason.get_or_insert_with(|| backend_reason(written, route_ns));
            unusable.push(format!(
                "rules[{i}].backendRefs[{j}] {}/{}: {error}",
                backend.namespace, backend.name
            ));
        }
    }
    match reason {
        None => Verdict::yes(
            "ResolvedRefs",
            "ResolvedRefs",
            "all backendRefs resolved".into(),
        ),
        Some(reason) => Verdict::no(
            "ResolvedRefs",
            reason,
            format!(
                "{}; the share of requests these backends would get is answered 500",
                unusable.join("; ")
            ),
        ),
    }
}

/// Gateway API's reason for an unusable backend, from the ref as written.
fn backend_reason(written: Option<&HttpBackendRef>, route_ns: &str) -> &'static str {
    let Some(b) = written else {
        return "BackendNotFound";
    };
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        "InvalidKind"
    } else if b
        .namespace
        .as_deref()
        .is_some_and(|ns| !ns.is_empty() && ns != route_ns)
    {
        "RefNotPermitted"
    } else if !b.other.is_empty() {
        "UnsupportedValue"
    } else {
        "BackendNotFound"
    }
}

/// What is wrong with the route apart from its parents and backends (those
/// have their own conditions): rule problems and unknown fields.
fn rule_problems(info: &RouteInfo) -> Vec<String> {
    let mut out: Vec<String> = info
        .problems
        .iter()
        .filter(|p| p.starts_with("spec."))
        .cloned()
        .collect();
    for (i, rule) in info.rules.iter().enumerate() {
        for problem in &rule.problems {
            if !problem.starts_with("backendRefs[") {
                out.push(format!("rules[{i}]: {problem}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MeshConfig, Object};
    use serde_json::Value;

    const NOW: &str = "2026-12-05T18:00:00Z";
    const LATER: &str = "2026-12-05T19:00:00Z";

    fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).expect("test object must deserialize")
    }

    fn service(ns: &str, name: &str, vip: &str, labels: Value) -> Object {
        Object::Service(from(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        })))
    }

    /// Namespace `app` with Services `web` (waypoint `wp`), `plain` (no
    /// waypoint), `v1` and `v2`, the waypoint `wp`, and an ingress Gateway
    /// of another class.
    fn mesh() -> MeshIndex {
        let mut index = MeshIndex::new(MeshConfig::default());
        let objects = vec![
            Object::Namespace(from(
                json!({"metadata": {"name": "app", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
            )),
            service(
                "app",
                "web",
                "10.96.0.1",
                json!({"istio.io/use-waypoint": "wp"}),
            ),
            service("app", "plain", "10.96.0.2", json!({})),
            service("app", "v1", "10.96.0.3", json!({})),
            service("app", "v2", "10.96.0.4", json!({})),
            Object::Gateway(from(json!({
                "metadata": {"name": "wp", "namespace": "app"},
                "spec": {"gatewayClassName": "istio-waypoint",
                         "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
            }))),
            Object::Service(from(json!({
                "metadata": {"name": "wp", "namespace": "app",
                             "labels": {"gateway.networking.k8s.io/gateway-name": "wp"}},
                "spec": {"clusterIP": "10.96.0.100", "clusterIPs": ["10.96.0.100"],
                         "selector": {"gateway.networking.k8s.io/gateway-name": "wp"},
                         "ports": [{"name": "mesh", "port": 15008}]},
            }))),
            Object::Gateway(from(json!({
                "metadata": {"name": "ingress", "namespace": "app"},
                "spec": {"gatewayClassName": "istio",
                         "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]},
            }))),
        ];
        for object in objects {
            index.apply(object);
        }
        index
    }

    /// A route in `app` (generation 4) as the API server returns it
    /// (parentRef defaults filled in), splitting over `backends`.
    fn route(parent_refs: Value, backends: Value) -> HttpRoute {
        from(json!({
            "metadata": {"name": "split", "namespace": "app", "generation": 4, "resourceVersion": "77"},
            "spec": {"parentRefs": parent_refs, "rules": [{"backendRefs": backends}]},
        }))
    }

    fn service_ref(name: &str) -> Value {
        json!({"group": "", "kind": "Service", "name": name})
    }

    fn good_backends() -> Value {
        json!([{"name": "v1", "port": 80, "weight": 90}, {"name": "v2", "port": 80, "weight": 10}])
    }

    fn ours(status: &HttpRouteStatus) -> Vec<&RouteParentStatus> {
        status
            .parents
            .iter()
            .filter(|p| p.controller_name == CONTROLLER_NAME)
            .collect()
    }

    fn condition<'a>(parent: &'a RouteParentStatus, type_: &str) -> &'a RouteCondition {
        parent
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("a {type_} condition in {parent:#?}"))
    }

    /// (status, reason) of a condition.
    fn verdict<'a>(parent: &'a RouteParentStatus, type_: &str) -> (&'a str, &'a str) {
        let c = condition(parent, type_);
        (c.status.as_str(), c.reason.as_deref().unwrap_or_default())
    }

    fn message<'a>(parent: &'a RouteParentStatus, type_: &str) -> &'a str {
        condition(parent, type_)
            .message
            .as_deref()
            .unwrap_or_default()
    }

    #[test]
    fn a_route_on_a_service_with_a_waypoint_is_accepted_resolved_and_applied() {
        let index = mesh();
        let route = route(json!([service_ref("web")]), good_backends());
        let status = desired_status(&route, &index, NOW);
        let ours = ours(&status);
        assert_eq!(ours.len(), 1);
        let parent = ours[0];
        assert_eq!(parent.parent_ref, route.spec.parent_refs[0]);
        assert_eq!(verdict(parent, "Accepted"), ("True", "Accepted"));
        assert!(
            message(parent, "Accepted").contains("applies to every client"),
            "{parent:#?}"
        );
        assert_eq!(verdict(parent, "ResolvedRefs"), ("True", "ResolvedRefs"));
        assert_eq!(
            verdict(parent, "ResolvedWaypoints"),
            ("True", "ResolvedWaypoints")
        );
        assert!(message(parent, "ResolvedWaypoints").contains("waypoint app/wp"));
        for c in &parent.conditions {
            assert_eq!(c.observed_generation, Some(4), "{c:?}");
            assert_eq!(c.last_transition_time.as_deref(), Some(NOW), "{c:?}");
        }
    }

    #[test]
    fn unusable_backends_are_named_with_gateway_api_reasons() {
        let index = mesh();
        let cases = [
            (
                json!({"name": "v3", "port": 80}),
                "BackendNotFound",
                "app/v3: backend not found",
            ),
            (
                json!({"name": "v1", "port": 8080}),
                "BackendNotFound",
                "app/v1: Service has no port 8080",
            ),
            (
                json!({"name": "v1", "namespace": "other", "port": 80}),
                "RefNotPermitted",
                "other/v1: a backend in another namespace needs a ReferenceGrant",
            ),
            (
                json!({"group": "example.com", "kind": "Bucket", "name": "b"}),
                "InvalidKind",
                "app/b: backend kind Bucket",
            ),
        ];
        for (bad, reason, text) in cases {
            let route = route(
                json!([service_ref("web")]),
                json!([{"name": "v1", "port": 80}, bad]),
            );
            let status = desired_status(&route, &index, NOW);
            let parent = ours(&status)[0];
            assert_eq!(verdict(parent, "ResolvedRefs"), ("False", reason), "{bad}");
            let said = message(parent, "ResolvedRefs");
            assert!(
                said.contains(&format!("rules[0].backendRefs[1] {text}")),
                "{said}"
            );
            assert!(said.contains("answered 500"), "{said}");
            // The parent itself is fine.
            assert_eq!(verdict(parent, "Accepted"), ("True", "Accepted"), "{bad}");
        }
    }

    #[test]
    fn a_route_on_a_service_without_a_waypoint_says_it_has_no_effect() {
        let index = mesh();
        let route = route(json!([service_ref("plain")]), good_backends());
        let status = desired_status(&route, &index, NOW);
        let parent = ours(&status)[0];
        assert_eq!(verdict(parent, "Accepted"), ("True", "Accepted"));
        assert!(
            message(parent, "Accepted")
                .contains("no effect until Service app/plain has a waypoint"),
            "{parent:#?}"
        );
        assert_eq!(
            verdict(parent, "ResolvedWaypoints"),
            ("False", "NoWaypoint")
        );
    }

    #[test]
    fn parents_meshbox_does_not_attach_are_refused_with_why() {
        let index = mesh();
        let cases = [
            (
                service_ref("gone"),
                "NoMatchingParent",
                "Service app/gone not found",
            ),
            (
                json!({"group": "", "kind": "Service", "name": "web", "port": 8080}),
                "NoMatchingParent",
                "Service app/web has no port 8080",
            ),
            (
                json!({"group": "", "kind": "Service", "name": "web", "sectionName": "http"}),
                "UnsupportedValue",
                "sectionName is not supported",
            ),
            (
                json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "wp"}),
                "NotAllowedByListeners",
                "Gateway app/wp is a waypoint",
            ),
        ];
        for (parent_ref, reason, text) in cases {
            let route = route(json!([parent_ref.clone()]), good_backends());
            let status = desired_status(&route, &index, NOW);
            let ours = ours(&status);
            assert_eq!(ours.len(), 1, "{parent_ref}");
            assert_eq!(
                verdict(ours[0], "Accepted"),
                ("False", reason),
                "{parent_ref}"
            );
            let said = message(ours[0], "Accepted");
            assert!(said.contains(text), "{parent_ref}: {said}");
            assert!(
                ours[0]
                    .conditions
                    .iter()
                    .all(|c| c.type_ != "ResolvedWaypoints"),
                "{parent_ref}"
            );
        }
    }

    /// Refs to other implementations' parents get no entry from meshbox.
    #[test]
    fn gateways_meshbox_does_not_serve_get_no_entry() {
        let index = mesh();
        let route = route(
            json!([
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "elsewhere", "namespace": "edge"},
                {"group": "networking.istio.io", "kind": "ServiceEntry", "name": "ext"},
            ]),
            good_backends(),
        );
        assert_eq!(
            desired_status(&route, &index, NOW),
            HttpRouteStatus::default()
        );
    }

    #[test]
    fn rule_problems_are_listed_in_accepted_without_refusing_the_route() {
        let index = mesh();
        let route: HttpRoute = from(json!({
            "metadata": {"name": "split", "namespace": "app", "generation": 1},
            "spec": {
                "parentRefs": [service_ref("web")],
                "rules": [
                    {"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "x"}}],
                     "backendRefs": [{"name": "v1", "port": 80}]},
                    {"backendRefs": [{"name": "v2", "port": 80}]},
                ],
            },
        }));
        let status = desired_status(&route, &index, NOW);
        let parent = ours(&status)[0];
        assert_eq!(verdict(parent, "Accepted"), ("True", "Accepted"));
        let said = message(parent, "Accepted");
        assert!(
            said.contains("rules[0]: filters[0]: filter type \"URLRewrite\" is not supported"),
            "{said}"
        );
        assert_eq!(verdict(parent, "ResolvedRefs"), ("True", "ResolvedRefs"));
    }

    /// Another controller's entries stay as they are (before ours); ours
    /// for refs no longer in the spec go.
    #[test]
    fn other_controllers_entries_are_kept_and_stale_ones_of_ours_dropped() {
        let index = mesh();
        let mut route = route(
            json!([
                service_ref("web"),
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
            ]),
            good_backends(),
        );
        let theirs: RouteParentStatus = from(json!({
            "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
            "controllerName": "istio.io/gateway-controller",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                            "message": "ok", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "futureField": {"kept": true},
        }));
        let stale: RouteParentStatus = from(json!({
            "parentRef": service_ref("plain"),
            "controllerName": CONTROLLER_NAME,
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "old"}],
        }));
        route.status = Some(HttpRouteStatus {
            parents: vec![stale, theirs.clone()],
        });
        let status = desired_status(&route, &index, NOW);
        assert_eq!(status.parents.len(), 2, "{status:#?}");
        assert_eq!(status.parents[0], theirs);
        assert_eq!(status.parents[1].controller_name, CONTROLLER_NAME);
        assert_eq!(status.parents[1].parent_ref, route.spec.parent_refs[0]);
        let body = status_apply_body(&route, &status);
        assert_eq!(
            body["status"]["parents"][0]["futureField"],
            json!({"kept": true})
        );
    }

    /// Recomputed on an unchanged mesh, the status is what the route
    /// already carries (so nothing is written); a change moves only the
    /// transition time of the condition that changed.
    #[test]
    fn an_unchanged_verdict_keeps_the_status_as_it_is() {
        let mut index = mesh();
        let mut route = route(
            json!([service_ref("web")]),
            json!([{"name": "v3", "port": 80}]),
        );
        route.status = Some(desired_status(&route, &index, NOW));
        assert_eq!(
            Some(desired_status(&route, &index, LATER)),
            route.status,
            "nothing changed, nothing to write"
        );
        index.apply(service("app", "v3", "10.96.0.5", json!({})));
        let fixed = desired_status(&route, &index, LATER);
        let parent = ours(&fixed)[0];
        assert_eq!(verdict(parent, "ResolvedRefs"), ("True", "ResolvedRefs"));
        assert_eq!(
            condition(parent, "ResolvedRefs")
                .last_transition_time
                .as_deref(),
            Some(LATER)
        );
        assert_eq!(
            condition(parent, "Accepted")
                .last_transition_time
                .as_deref(),
            Some(NOW)
        );
    }

    /// The status describes the route given, not the (maybe older) copy
    /// the model holds.
    #[test]
    fn the_route_is_checked_as_given() {
        let mut index = mesh();
        let old = route(
            json!([service_ref("web")]),
            json!([{"name": "v3", "port": 80}]),
        );
        index.apply(Object::HttpRoute(old));
        let mut new = route(json!([service_ref("web")]), good_backends());
        new.metadata.generation = Some(5);
        let status = desired_status(&new, &index, NOW);
        let parent = ours(&status)[0];
        assert_eq!(verdict(parent, "ResolvedRefs"), ("True", "ResolvedRefs"));
        assert_eq!(
            condition(parent, "ResolvedRefs").observed_generation,
            Some(5)
        );
    }

    #[test]
    fn the_apply_body_sends_parents_even_empty_with_the_version_as_precondition() {
        let route = route(json!([]), good_backends());
        let body = status_apply_body(&route, &HttpRouteStatus::default());
        assert_eq!(
            body,
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "split", "namespace": "app", "resourceVersion": "77"},
                "status": {"parents": []},
            })
        );
    }

    #[test]
    fn messages_fit_the_crd() {
        let long = "é".repeat(MAX_MESSAGE);
        let cut = truncate(long);
        assert!(cut.len() <= MAX_MESSAGE);
        assert!(cut.ends_with("..."));
    }

    /// What the CRD demands of every entry meshbox writes, whatever the
    /// route holds: a controllerName of the right form, one to eight
    /// conditions each with a reason of the allowed form, a message and a
    /// transition time; at most 32 entries.
    #[test]
    fn arbitrary_routes_get_entries_the_crd_accepts() {
        use proptest::prelude::*;
        let index = mesh();
        let name = prop::sample::select(vec!["web", "plain", "gone", "v1", "wp", "ingress", ""]);
        let parent = (
            prop::sample::select(vec![None, Some(""), Some("core"), Some("gateway.networking.k8s.io"), Some("x.io")]),
            prop::sample::select(vec![None, Some("Service"), Some("Gateway"), Some("Other")]),
            name.clone(),
            prop::option::of(prop::sample::select(vec![0i64, 80, 8080, 70000])),
            prop::option::of(Just("http")),
        )
            .prop_map(|(group, kind, name, port, section)| {
                json!({"group": group, "kind": kind, "name": name, "port": port, "sectionName": section})
            });
        let backend = (
            name,
            prop::option::of(prop::sample::select(vec![80i64, 8080, -1])),
        )
            .prop_map(|(name, port)| json!({"name": name, "port": port}));
        let reason = regex::Regex::new("^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$").unwrap();
        let controller = regex::Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$").unwrap();
        proptest!(|(parents in prop::collection::vec(parent, 0..40), backends in prop::collection::vec(backend, 0..4))| {
            let route = route(Value::from(parents), Value::from(backends));
            let status = desired_status(&route, &index, NOW);
            prop_assert!(status.parents.len() <= MAX_PARENTS);
            for p in ours(&status) {
                prop_assert!(controller.is_match(&p.controller_name));
                prop_assert!((1..=8).contains(&p.conditions.len()));
                for c in &p.conditions {
                    prop_assert!(reason.is_match(c.reason.as_deref().unwrap_or_default()), "{:?}", c);
                    prop_assert!(c.message.as_deref().is_some_and(|m| m.len() <= MAX_MESSAGE));
                    prop_assert!(c.last_transition_time.is_some());
                    prop_assert!(["True", "False"].contains(&c.status.as_str()));
                }
            }
        });
    }
}
