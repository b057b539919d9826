//! What the control plane deploys for a waypoint Gateway in Kubernetes mode,
//! as pure functions: a `Gateway` in, the ServiceAccount, Service and
//! Deployment that run meshbox's waypoint for it out, and the status the
//! Gateway should carry given what the cluster reports back.
//!
//! It mirrors what istiod's gateway controller creates for class
//! `istio-waypoint`, where users can see it: every object is named like the
//! Gateway (so the waypoint's SPIFFE identity is
//! `ns/{namespace}/sa/{gateway}`), carries
//! `gateway.networking.k8s.io/gateway-name` (the Service's selector, and how
//! the model recognises a waypoint's own pods) and is owned by the Gateway
//! (`controller: true`), so Kubernetes' garbage collector removes it with
//! the Gateway. The pods are labelled `istio.io/dataplane-mode: none`: a node
//! dataplane must not capture the proxy it sends traffic to.
//!
//! [`waypoint_controller`](super::waypoint_controller) applies these with
//! server-side apply; nothing here talks to the API server.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext, Service,
    ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::{Gateway, GatewayStatus, GatewayStatusAddress, RouteCondition};
use crate::cluster::ROOT_CONFIGMAP;

/// The Gateway classes whose Gateways get a meshbox waypoint (Istio's name,
/// so Istio's docs and `istioctl waypoint generate` work, and our own).
pub const WAYPOINT_CLASSES: [&str; 2] = ["istio-waypoint", "meshbox-waypoint"];
/// Set on everything deployed for a Gateway; the Service selects on it.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
const GATEWAY_CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";
/// Marks the objects this controller deployed, so its watches of
/// Deployments, Services and ServiceAccounts see only those.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "meshbox";
/// The field manager of every apply (objects and Gateway status).
pub const FIELD_MANAGER: &str = "meshbox-waypoint-controller";

/// The waypoint's HBONE listener (the contract's 15008), its readiness
/// (15021) and metrics (15020) ports.
pub const HBONE_PORT: i32 = 15008;
const READINESS_PORT: i32 = 15021;
const METRICS_PORT: i32 = 15020;
/// Unprivileged user of the waypoint image (deploy/Dockerfile).
const RUN_AS: i64 = 65532;
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const TOKEN_FILE: &str = "istio-token";
const ROOT_CA_DIR: &str = "/var/run/secrets/istio";
const ROOT_CA_FILE: &str = "root-cert.pem";
/// An hour, renewed by the kubelet at 80%; the waypoint re-reads the file
/// on every reconnect.
const TOKEN_LIFETIME_SECONDS: i64 = 3600;

/// What every waypoint Deployment shares, from the control plane's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointSettings {
    /// The waypoint image (`--waypoint-image`).
    pub image: String,
    /// The control plane's xDS (and CA) address as pods reach it, e.g.
    /// `https://meshbox-controlplane.meshbox-system.svc:15012`.
    pub xds_address: String,
    /// The audience the control plane's TokenReview demands
    /// (`--token-audience`).
    pub token_audience: String,
    pub cluster_id: String,
    pub trust_domain: String,
    /// DNS suffix of Service hostnames, for the Hostname status address.
    pub cluster_domain: String,
}

/// The three objects a waypoint Gateway gets.
#[derive(Clone, Debug, PartialEq)]
pub struct WaypointObjects {
    pub service_account: ServiceAccount,
    pub service: Service,
    pub deployment: Deployment,
}

/// What to do with one Gateway.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Not a waypoint class: none of our business.
    Ignore,
    /// No longer of a waypoint class, but this controller wrote its status,
    /// so it may still own a waypoint: remove what it deployed and the
    /// conditions it wrote (the Gateway's new controller reports its own).
    Release,
    /// Being deleted: Kubernetes' garbage collector removes what it owns;
    /// applying now would only race it.
    Deleting,
    /// The Gateway cannot be addressed or owned (no name, namespace or
    /// uid; only a broken API server or test would send one). Logged.
    Unusable(&'static str),
    /// A waypoint Gateway we cannot deploy for; its status says why.
    Invalid {
        reason: &'static str,
        message: String,
    },
    /// Apply these, then report the status.
    Deploy(Box<WaypointObjects>),
}

/// What the cluster reported back after the apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The waypoint Service's `spec.clusterIPs` (empty until assigned).
    pub cluster_ips: Vec<String>,
    /// The Deployment's `status.availableReplicas`.
    pub available_replicas: i32,
}

pub fn is_waypoint_class(gateway: &Gateway) -> bool {
    WAYPOINT_CLASSES.contains(&gateway.spec.gateway_class_name.as_str())
}

/// A DNS-1035 label: what a Service name must be. A Gateway name may be any
/// DNS subdomain (dots, a leading digit, 253 characters); the Service, and
/// the label value carrying the name, cannot.
fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Decides what a Gateway gets.
pub fn plan(gateway: &Gateway, settings: &WaypointSettings) -> Plan {
    if !is_waypoint_class(gateway) {
        let meta = &gateway.metadata;
        let addressable = [&meta.name, &meta.namespace, &meta.uid]
            .iter()
            .all(|field| field.as_deref().is_some_and(|s| !s.is_empty()));
        return if written_by_us(gateway) && addressable && meta.deletion_timestamp.is_none() {
            Plan::Release
        } else {
            Plan::Ignore
        };
    }
    if gateway.metadata.deletion_timestamp.is_some() {
        return Plan::Deleting;
    }
    let meta = &gateway.metadata;
    let (Some(name), Some(namespace), Some(uid)) = (
        meta.name.as_deref().filter(|s| !s.is_empty()),
        meta.namespace.as_deref().filter(|s| !s.is_empty()),
        meta.uid.as_deref().filter(|s| !s.is_empty()),
    ) else {
        return Plan::Unusable("a Gateway without a name, namespace or uid");
    };
    if !is_dns_label(name) {
        return Plan::Invalid {
            reason: "Invalid",
            message: format!(
                "the waypoint's Service, ServiceAccount and Deployment are named like the \
                 Gateway, and {name:?} is not a DNS label (at most 63 characters: lowercase \
                 letters, digits and '-', starting with a letter)"
            ),
        };
    }
    let class = gateway.spec.gateway_class_name.as_str();
    Plan::Deploy(Box::new(WaypointObjects {
        service_account: service_account(name, namespace, uid, class),
        service: service(name, namespace, uid, class),
        deployment: deployment(name, namespace, uid, class, settings),
    }))
}

/// Whether this controller has applied any of the Gateway's fields (its
/// status), as the API server records in `managedFields`.
fn written_by_us(gateway: &Gateway) -> bool {
    gateway
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
}

fn owner(name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        // Not blockOwnerDeletion: where the OwnerReferencesPermissionEnforcement
        // admission plugin runs it needs update on gateways/finalizers, and
        // nothing here depends on the order of deletion.
        block_owner_deletion: None,
    }
}

fn labels(name: &str, class: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GATEWAY_NAME_LABEL.into(), name.into()),
        (GATEWAY_CLASS_LABEL.into(), class.into()),
        (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
    ])
}

fn metadata(name: &str, namespace: &str, uid: &str, class: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        labels: Some(labels(name, class)),
        owner_references: Some(vec![owner(name, uid)]),
        ..ObjectMeta::default()
    }
}

fn service_account(name: &str, namespace: &str, uid: &str, class: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: metadata(name, namespace, uid, class),
        // The waypoint calls no Kubernetes API; its one token is the
        // projected one for the control plane.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

fn service(name: &str, namespace: &str, uid: &str, class: &str) -> Service {
    Service {
        metadata: metadata(name, namespace, uid, class),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(GATEWAY_NAME_LABEL.into(), name.into())])),
            // Istio's waypoint Service: its readiness port, and one port per
            // listener whose appProtocol is the listener's protocol in lower
            // case; a waypoint's one listener is HBONE on 15008, named mesh.
            ports: Some(vec![
                ServicePort {
                    name: Some("status-port".into()),
                    port: READINESS_PORT,
                    protocol: Some("TCP".into()),
                    app_protocol: Some("tcp".into()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("mesh".into()),
                    port: HBONE_PORT,
                    protocol: Some("TCP".into()),
                    app_protocol: Some("hbone".into()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn env_from_field(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
        .collect()
}

fn deployment(
    name: &str,
    namespace: &str,
    uid: &str,
    class: &str,
    settings: &WaypointSettings,
) -> Deployment {
    let root_ca = format!("{ROOT_CA_DIR}/{ROOT_CA_FILE}");
    let mut pod_labels = labels(name, class);
    pod_labels.extend([
        ("istio.io/dataplane-mode".to_owned(), "none".to_owned()),
        ("sidecar.istio.io/inject".to_owned(), "false".to_owned()),
        (
            "service.istio.io/canonical-name".to_owned(),
            name.to_owned(),
        ),
        (
            "service.istio.io/canonical-revision".to_owned(),
            "latest".to_owned(),
        ),
    ]);
    let container = Container {
        name: "waypoint".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec!["run".into()]),
        // The waypoint contract's variables (waypoint run --help).
        env: Some(vec![
            env("XDS_ADDRESS", &settings.xds_address),
            env("CA_ADDRESS", &settings.xds_address),
            env("XDS_ROOT_CA", &root_ca),
            env("CA_ROOT_CA", &root_ca),
            env("AUTH_TOKEN", &format!("{TOKEN_DIR}/{TOKEN_FILE}")),
            env("CLUSTER_ID", &settings.cluster_id),
            env("TRUST_DOMAIN", &settings.trust_domain),
            env("GATEWAY_NAME", name),
            env_from_field("POD_NAMESPACE", "metadata.namespace"),
            env_from_field("POD_NAME", "metadata.name"),
            env_from_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ]),
        ports: Some(vec![
            port("mesh", HBONE_PORT),
            port("metrics", METRICS_PORT),
            port("status-port", READINESS_PORT),
        ]),
        readiness_probe: Some(Probe {
            // 200 once the first xDS state and the waypoint's certificate
            // are in.
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(READINESS_PORT),
                scheme: Some("HTTP".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "100m"), ("memory", "64Mi")])),
            limits: Some(quantities(&[("memory", "1Gi")])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "istio-token".into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "istio-ca-root-cert".into(),
                mount_path: ROOT_CA_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    Deployment {
        metadata: metadata(name, namespace, uid, class),
        spec: DeploymentSpec {
            // No replicas: left to `kubectl scale` or an autoscaler (one
            // by default), which a forced apply would otherwise undo.
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([(GATEWAY_NAME_LABEL.into(), name.into())])),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".into(), "true".into()),
                        ("prometheus.io/port".into(), METRICS_PORT.to_string()),
                        ("prometheus.io/path".into(), "/metrics".into()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.into()),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![
                        Volume {
                            name: "istio-token".into(),
                            projected: Some(ProjectedVolumeSource {
                                sources: Some(vec![VolumeProjection {
                                    // Bound to the pod; the audience the
                                    // control plane's TokenReview demands.
                                    service_account_token: Some(ServiceAccountTokenProjection {
                                        path: TOKEN_FILE.into(),
                                        audience: Some(settings.token_audience.clone()),
                                        expiration_seconds: Some(TOKEN_LIFETIME_SECONDS),
                                        ..ServiceAccountTokenProjection::default()
                                    }),
                                    ..VolumeProjection::default()
                                }]),
                                ..ProjectedVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            // Published into the Gateway's namespace by the
                            // waypoint controller before this is applied.
                            name: "istio-ca-root-cert".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: ROOT_CONFIGMAP.into(),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

/// Why an object that already exists under the waypoint's name must be left
/// alone, or `None` when it is this controller's to apply: it carries our
/// labels for this Gateway and no other controller owns it. A Service, say,
/// that a user made under the same name would otherwise be rewritten to
/// select the waypoint's pods, and deleted by the garbage collector with
/// the Gateway. (One owned by an earlier Gateway of the same name, deleted
/// and created again, is adopted.)
pub fn foreign_object(kind: &str, existing: &ObjectMeta, gateway: &Gateway) -> Option<String> {
    let name = gateway.metadata.name.as_deref().unwrap_or_default();
    let namespace = gateway.metadata.namespace.as_deref().unwrap_or_default();
    let label = |key: &str| existing.labels.as_ref().and_then(|l| l.get(key));
    let ours = label(MANAGED_BY_LABEL).is_some_and(|v| v == MANAGED_BY)
        && label(GATEWAY_NAME_LABEL).is_some_and(|v| v == name);
    let controlled_elsewhere = existing
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller == Some(true))
        .any(|o| {
            !(o.kind == "Gateway"
                && o.api_version.starts_with("gateway.networking.k8s.io/")
                && o.name == name)
        });
    if ours && !controlled_elsewhere {
        return None;
    }
    Some(format!(
        "{kind} {namespace}/{name} already exists and was not made by meshbox for this Gateway; \
         it is left alone and the waypoint is not deployed (rename the Gateway, or delete the \
         {kind})"
    ))
}

/// What the cluster reported in the applied Service and Deployment.
pub fn observe(service: &Service, deployment: &Deployment) -> Observed {
    let spec = service.spec.as_ref();
    let mut cluster_ips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    if cluster_ips.is_empty()
        && let Some(ip) = spec.and_then(|s| s.cluster_ip.clone())
    {
        cluster_ips.push(ip);
    }
    // "None" is a headless Service's marker, not an address.
    cluster_ips.retain(|ip| !ip.is_empty() && ip != "None");
    Observed {
        cluster_ips,
        available_replicas: deployment
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0),
    }
}

/// One condition, keeping its `lastTransitionTime` when its status did not
/// change (so an unchanged status applies as a no-op and wakes nobody).
fn condition(
    gateway: &Gateway,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    now: &str,
) -> RouteCondition {
    let status = if status { "True" } else { "False" };
    let since = gateway
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_owned());
    RouteCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        observed_generation: gateway.metadata.generation,
        last_transition_time: Some(since),
    }
}

/// The status of a deployed waypoint: its address (the Service's cluster
/// IPs, else its DNS name) and `Accepted`/`Programmed`, `Programmed` only
/// once a replica is available.
pub fn deployed_status(
    gateway: &Gateway,
    observed: &Observed,
    settings: &WaypointSettings,
    now: &str,
) -> GatewayStatus {
    let name = gateway.metadata.name.as_deref().unwrap_or_default();
    let namespace = gateway.metadata.namespace.as_deref().unwrap_or_default();
    let addresses = if observed.cluster_ips.is_empty() {
        vec![GatewayStatusAddress {
            type_: Some("Hostname".into()),
            value: format!("{name}.{namespace}.svc.{}", settings.cluster_domain),
        }]
    } else {
        observed
            .cluster_ips
            .iter()
            .map(|ip| GatewayStatusAddress {
                type_: Some("IPAddress".into()),
                value: ip.clone(),
            })
            .collect()
    };
    let accepted = condition(
        gateway,
        "Accepted",
        true,
        "Accepted",
        format!(
            "meshbox deploys the waypoint: Deployment, Service and ServiceAccount {namespace}/{name}"
        ),
        now,
    );
    let programmed = if observed.available_replicas > 0 {
        condition(
            gateway,
            "Programmed",
            true,
            "Programmed",
            format!(
                "Deployment {namespace}/{name} has {} available replica(s)",
                observed.available_replicas
            ),
            now,
        )
    } else {
        condition(
            gateway,
            "Programmed",
            false,
            "Pending",
            format!("waiting for Deployment {namespace}/{name} to have an available replica"),
            now,
        )
    };
    GatewayStatus {
        addresses,
        conditions: vec![accepted, programmed],
    }
}

/// The status of a waypoint Gateway that cannot be deployed: neither
/// accepted nor programmed, and no address.
pub fn invalid_status(gateway: &Gateway, reason: &str, message: &str, now: &str) -> GatewayStatus {
    GatewayStatus {
        addresses: Vec::new(),
        conditions: vec![
            condition(gateway, "Accepted", false, reason, message.to_owned(), now),
            condition(
                gateway,
                "Programmed",
                false,
                reason,
                message.to_owned(),
                now,
            ),
        ],
    }
}

/// The body of a server-side apply of `status` to the Gateway's status
/// subresource: only the fields this controller owns.
pub fn status_apply_body(name: &str, status: &GatewayStatus) -> serde_json::Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name},
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentStatus;

    const NOW: &str = "2026-12-05T18:00:00Z";

    fn settings() -> WaypointSettings {
        WaypointSettings {
            image: "meshbox/waypoint:dev".into(),
            xds_address: "https://meshbox-controlplane.meshbox-system.svc:15012".into(),
            token_audience: "istio-ca".into(),
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
        }
    }

    fn gateway(value: serde_json::Value) -> Gateway {
        serde_json::from_value(value).expect("a Gateway")
    }

    fn waypoint(class: &str) -> Gateway {
        gateway(json!({
            "metadata": {"name": "reviews-waypoint", "namespace": "shop", "uid": "u-1", "generation": 3},
            "spec": {"gatewayClassName": class, "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        }))
    }

    fn deployed(gateway: &Gateway) -> WaypointObjects {
        match plan(gateway, &settings()) {
            Plan::Deploy(objects) => *objects,
            other => panic!("expected a deployment, got {other:?}"),
        }
    }

    fn pod_spec(objects: &WaypointObjects) -> &PodSpec {
        objects
            .deployment
            .spec
            .template
            .spec
            .as_ref()
            .expect("a pod spec")
    }

    /// The container's env as name → literal value or `fieldRef:` path.
    fn env_of(objects: &WaypointObjects) -> BTreeMap<String, String> {
        pod_spec(objects).containers[0]
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|e| {
                let value = match (e.value, e.value_from) {
                    (Some(v), _) => v,
                    (None, Some(from)) => format!(
                        "fieldRef:{}",
                        from.field_ref.map(|f| f.field_path).unwrap_or_default()
                    ),
                    (None, None) => String::new(),
                };
                (e.name, value)
            })
            .collect()
    }

    #[test]
    fn both_waypoint_classes_deploy_and_other_classes_are_ignored() {
        for class in WAYPOINT_CLASSES {
            assert!(
                matches!(plan(&waypoint(class), &settings()), Plan::Deploy(_)),
                "{class}"
            );
        }
        for class in ["istio", "nginx", "", "Istio-Waypoint"] {
            assert_eq!(
                plan(&waypoint(class), &settings()),
                Plan::Ignore,
                "{class:?}"
            );
        }
    }

    /// A Gateway moved to another class is released only when this
    /// controller wrote its status (so may have deployed for it).
    #[test]
    fn a_gateway_moved_to_another_class_is_released_if_we_deployed_for_it() {
        let managed = |manager: &str| json!([{"manager": manager, "operation": "Apply", "apiVersion": "gateway.networking.k8s.io/v1", "subresource": "status"}]);
        let moved = |fields: serde_json::Value| {
            gateway(json!({
                "metadata": {"name": "wp", "namespace": "shop", "uid": "u-1", "managedFields": fields},
                "spec": {"gatewayClassName": "istio"},
            }))
        };
        assert_eq!(
            plan(&moved(managed(FIELD_MANAGER)), &settings()),
            Plan::Release
        );
        assert_eq!(plan(&moved(managed("istiod")), &settings()), Plan::Ignore);
        assert_eq!(plan(&moved(json!([])), &settings()), Plan::Ignore);
        let mut deleting = moved(managed(FIELD_MANAGER));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(plan(&deleting, &settings()), Plan::Ignore);
    }

    #[test]
    fn every_object_is_named_like_the_gateway_and_owned_by_it() {
        let objects = deployed(&waypoint("istio-waypoint"));
        let metas = [
            &objects.service_account.metadata,
            &objects.service.metadata,
            &objects.deployment.metadata,
        ];
        for meta in metas {
            assert_eq!(meta.name.as_deref(), Some("reviews-waypoint"));
            assert_eq!(meta.namespace.as_deref(), Some("shop"));
            let owners = meta.owner_references.as_deref().unwrap_or_default();
            assert_eq!(owners.len(), 1);
            let owner = &owners[0];
            assert_eq!(
                (
                    owner.api_version.as_str(),
                    owner.kind.as_str(),
                    owner.name.as_str(),
                    owner.uid.as_str(),
                    owner.controller
                ),
                (
                    "gateway.networking.k8s.io/v1",
                    "Gateway",
                    "reviews-waypoint",
                    "u-1",
                    Some(true)
                )
            );
            let labels = meta.labels.clone().unwrap_or_default();
            assert_eq!(labels[GATEWAY_NAME_LABEL], "reviews-waypoint");
            assert_eq!(labels[GATEWAY_CLASS_LABEL], "istio-waypoint");
            assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        }
        // The identity the waypoint gets: ns/shop/sa/reviews-waypoint.
        assert_eq!(
            pod_spec(&objects).service_account_name.as_deref(),
            Some("reviews-waypoint")
        );
    }

    #[test]
    fn the_service_selects_the_waypoint_pods_on_hbone_15008() {
        let objects = deployed(&waypoint("meshbox-waypoint"));
        let spec = objects.service.spec.clone().expect("a spec");
        let selector = spec.selector.expect("a selector");
        let template_labels = objects
            .deployment
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .expect("pod labels");
        for (k, v) in &selector {
            assert_eq!(
                template_labels.get(k),
                Some(v),
                "the Service selects the pods"
            );
        }
        let match_labels = objects
            .deployment
            .spec
            .selector
            .match_labels
            .clone()
            .expect("a Deployment selector");
        assert_eq!(match_labels, selector);
        let mesh = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.name.as_deref() == Some("mesh"))
            .expect("a mesh port");
        assert_eq!(mesh.port, 15008);
        assert_eq!(mesh.app_protocol.as_deref(), Some("hbone"));
        // The default target port is the port itself, where the waypoint
        // listens.
        assert_eq!(mesh.target_port, None);
    }

    #[test]
    fn the_pods_are_not_captured_and_run_the_waypoint_with_the_contract_env() {
        let objects = deployed(&waypoint("istio-waypoint"));
        let labels = objects
            .deployment
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .expect("pod labels");
        assert_eq!(labels["istio.io/dataplane-mode"], "none");
        let container = &pod_spec(&objects).containers[0];
        assert_eq!(container.image.as_deref(), Some("meshbox/waypoint:dev"));
        assert_eq!(container.args.as_deref(), Some(&["run".to_owned()][..]));
        let env = env_of(&objects);
        let xds = "https://meshbox-controlplane.meshbox-system.svc:15012";
        let want = [
            ("XDS_ADDRESS", xds),
            ("CA_ADDRESS", xds),
            ("XDS_ROOT_CA", "/var/run/secrets/istio/root-cert.pem"),
            ("CA_ROOT_CA", "/var/run/secrets/istio/root-cert.pem"),
            ("AUTH_TOKEN", "/var/run/secrets/tokens/istio-token"),
            ("CLUSTER_ID", "Kubernetes"),
            ("TRUST_DOMAIN", "cluster.local"),
            ("GATEWAY_NAME", "reviews-waypoint"),
            ("POD_NAMESPACE", "fieldRef:metadata.namespace"),
            ("POD_NAME", "fieldRef:metadata.name"),
            ("SERVICE_ACCOUNT", "fieldRef:spec.serviceAccountName"),
        ];
        assert_eq!(
            env,
            want.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        );
    }

    /// The files the env names exist in the pod: the token (with the
    /// audience the control plane's TokenReview demands) and the root CA.
    #[test]
    fn the_token_and_root_ca_the_env_names_are_mounted() {
        let objects = deployed(&waypoint("istio-waypoint"));
        let spec = pod_spec(&objects);
        let container = &spec.containers[0];
        let mounts = container.volume_mounts.clone().unwrap_or_default();
        let volumes = spec.volumes.clone().unwrap_or_default();
        let volume_at = |dir: &str| {
            let mount = mounts
                .iter()
                .find(|m| m.mount_path == dir)
                .unwrap_or_else(|| panic!("a mount at {dir}"));
            assert_eq!(mount.read_only, Some(true));
            volumes
                .iter()
                .find(|v| v.name == mount.name)
                .unwrap_or_else(|| panic!("the volume {}", mount.name))
                .clone()
        };
        let token = volume_at(TOKEN_DIR);
        let projection = token
            .projected
            .and_then(|p| p.sources)
            .and_then(|s| s.into_iter().next())
            .and_then(|s| s.service_account_token)
            .expect("a projected service-account token");
        assert_eq!(projection.path, "istio-token");
        assert_eq!(projection.audience.as_deref(), Some("istio-ca"));
        let root = volume_at(ROOT_CA_DIR);
        assert_eq!(
            root.config_map.map(|c| c.name).as_deref(),
            Some("istio-ca-root-cert")
        );
        // No other token: the API-access one is not mounted.
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(
            objects.service_account.automount_service_account_token,
            Some(false)
        );
    }

    #[test]
    fn the_pods_are_probed_unprivileged_and_have_requests() {
        let objects = deployed(&waypoint("istio-waypoint"));
        let spec = pod_spec(&objects);
        let container = &spec.containers[0];
        let probe = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP readiness probe");
        assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(probe.port, IntOrString::Int(15021));
        let pod = spec
            .security_context
            .as_ref()
            .expect("a pod securityContext");
        assert_eq!(pod.run_as_non_root, Some(true));
        assert_ne!(pod.run_as_user, Some(0));
        let sc = container
            .security_context
            .as_ref()
            .expect("a securityContext");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        let requests = container
            .resources
            .as_ref()
            .and_then(|r| r.requests.clone())
            .expect("requests");
        assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
        // Scaling is left to the user.
        assert_eq!(objects.deployment.spec.replicas, None);
    }

    #[test]
    fn the_image_is_the_configured_one() {
        let mut s = settings();
        s.image = "registry.example/meshbox/waypoint:0.1.0".into();
        let Plan::Deploy(objects) = plan(&waypoint("istio-waypoint"), &s) else {
            panic!("a deployment");
        };
        assert_eq!(
            pod_spec(&objects).containers[0].image.as_deref(),
            Some("registry.example/meshbox/waypoint:0.1.0")
        );
    }

    #[test]
    fn a_gateway_without_name_namespace_or_uid_is_unusable() {
        for meta in [
            json!({"namespace": "shop", "uid": "u"}),
            json!({"name": "w", "uid": "u"}),
            json!({"name": "w", "namespace": "shop"}),
            json!({"name": "", "namespace": "shop", "uid": "u"}),
            json!({}),
        ] {
            let gw =
                gateway(json!({"metadata": meta, "spec": {"gatewayClassName": "istio-waypoint"}}));
            assert!(
                matches!(plan(&gw, &settings()), Plan::Unusable(_)),
                "{meta}"
            );
        }
    }

    #[test]
    fn a_name_that_cannot_name_a_service_is_refused_in_the_status() {
        for name in ["my.waypoint", "9lives", &"w".repeat(64), "Waypoint", "w-"] {
            let gw = gateway(json!({
                "metadata": {"name": name, "namespace": "shop", "uid": "u", "generation": 2},
                "spec": {"gatewayClassName": "istio-waypoint"},
            }));
            let Plan::Invalid { reason, message } = plan(&gw, &settings()) else {
                panic!("{name} should be refused");
            };
            let status = invalid_status(&gw, reason, &message, NOW);
            assert!(status.addresses.is_empty());
            for c in &status.conditions {
                assert_eq!(
                    (c.status.as_str(), c.reason.as_deref()),
                    ("False", Some("Invalid"))
                );
                assert_eq!(c.observed_generation, Some(2));
            }
        }
        assert!(matches!(
            plan(&waypoint("istio-waypoint"), &settings()),
            Plan::Deploy(_)
        ));
        let longest = "w".repeat(63);
        let gw = gateway(json!({
            "metadata": {"name": longest, "namespace": "shop", "uid": "u"},
            "spec": {"gatewayClassName": "istio-waypoint"},
        }));
        assert!(matches!(plan(&gw, &settings()), Plan::Deploy(_)));
    }

    #[test]
    fn a_gateway_being_deleted_gets_nothing_applied() {
        let mut gw = waypoint("istio-waypoint");
        gw.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(plan(&gw, &settings()), Plan::Deleting);
    }

    fn condition_of<'a>(status: &'a GatewayStatus, type_: &str) -> &'a RouteCondition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("a {type_} condition"))
    }

    #[test]
    fn programmed_once_a_replica_is_available_with_the_service_address() {
        let gw = waypoint("istio-waypoint");
        let pending = deployed_status(
            &gw,
            &Observed {
                cluster_ips: vec!["10.96.0.20".into()],
                available_replicas: 0,
            },
            &settings(),
            NOW,
        );
        let accepted = condition_of(&pending, "Accepted");
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_deref()),
            ("True", Some("Accepted"))
        );
        let programmed = condition_of(&pending, "Programmed");
        assert_eq!(
            (programmed.status.as_str(), programmed.reason.as_deref()),
            ("False", Some("Pending"))
        );
        assert_eq!(programmed.observed_generation, Some(3));
        assert_eq!(
            pending.addresses,
            [GatewayStatusAddress {
                type_: Some("IPAddress".into()),
                value: "10.96.0.20".into()
            }]
        );

        let ready = deployed_status(
            &gw,
            &Observed {
                cluster_ips: vec!["10.96.0.20".into(), "fd00::20".into()],
                available_replicas: 1,
            },
            &settings(),
            NOW,
        );
        let programmed = condition_of(&ready, "Programmed");
        assert_eq!(
            (programmed.status.as_str(), programmed.reason.as_deref()),
            ("True", Some("Programmed"))
        );
        assert_eq!(ready.addresses.len(), 2, "both families");
    }

    #[test]
    fn without_a_cluster_ip_the_address_is_the_service_hostname() {
        let status = deployed_status(
            &waypoint("istio-waypoint"),
            &Observed::default(),
            &settings(),
            NOW,
        );
        assert_eq!(
            status.addresses,
            [GatewayStatusAddress {
                type_: Some("Hostname".into()),
                value: "reviews-waypoint.shop.svc.cluster.local".into()
            }]
        );
    }

    /// An unchanged condition keeps its transition time, so re-applying
    /// the same status is a no-op; a changed one takes the new time.
    #[test]
    fn transition_times_move_only_when_the_status_changes() {
        let mut gw = waypoint("istio-waypoint");
        let observed = Observed {
            cluster_ips: vec!["10.96.0.20".into()],
            available_replicas: 0,
        };
        gw.status = Some(deployed_status(
            &gw,
            &observed,
            &settings(),
            "2026-01-01T00:00:00Z",
        ));
        let again = deployed_status(&gw, &observed, &settings(), NOW);
        assert_eq!(Some(&again), gw.status.as_ref());
        let ready = deployed_status(
            &gw,
            &Observed {
                available_replicas: 1,
                ..observed
            },
            &settings(),
            NOW,
        );
        assert_eq!(
            condition_of(&ready, "Accepted")
                .last_transition_time
                .as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            condition_of(&ready, "Programmed")
                .last_transition_time
                .as_deref(),
            Some(NOW)
        );
    }

    #[test]
    fn observe_reads_cluster_ips_and_available_replicas() {
        let service: Service = serde_json::from_value(json!({
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"]}
        }))
        .unwrap();
        let deployment = Deployment {
            status: Some(DeploymentStatus {
                available_replicas: Some(2),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        };
        assert_eq!(
            observe(&service, &deployment),
            Observed {
                cluster_ips: vec!["10.96.0.20".into(), "fd00::20".into()],
                available_replicas: 2
            }
        );
        // Only the old single field, a headless marker, nothing at all.
        let old: Service =
            serde_json::from_value(json!({"spec": {"clusterIP": "10.96.0.9"}})).unwrap();
        assert_eq!(
            observe(&old, &Deployment::default()).cluster_ips,
            ["10.96.0.9"]
        );
        let headless: Service =
            serde_json::from_value(json!({"spec": {"clusterIP": "None"}})).unwrap();
        assert_eq!(
            observe(&headless, &Deployment::default()),
            Observed::default()
        );
        assert_eq!(
            observe(&Service::default(), &Deployment::default()),
            Observed::default()
        );
    }

    #[test]
    fn the_status_body_is_an_apply_of_the_gateway_status_only() {
        let status = deployed_status(
            &waypoint("istio-waypoint"),
            &Observed::default(),
            &settings(),
            NOW,
        );
        let body = status_apply_body("reviews-waypoint", &status);
        assert_eq!(body["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(body["kind"], "Gateway");
        assert_eq!(body["metadata"], json!({"name": "reviews-waypoint"}));
        assert!(body.get("spec").is_none());
        assert_eq!(body["status"]["conditions"][1]["type"], "Programmed");
        assert_eq!(body["status"]["conditions"][1]["observedGeneration"], 3);
        assert_eq!(body["status"]["conditions"][1]["lastTransitionTime"], NOW);
    }

    #[test]
    fn existing_objects_are_applied_only_when_they_are_this_gateways() {
        let gw = waypoint("istio-waypoint");
        let objects = deployed(&gw);
        // What we applied before (the same Gateway, or one of the same name
        // deleted and created again) is ours to apply again.
        assert_eq!(
            foreign_object("Service", &objects.service.metadata, &gw),
            None
        );
        let mut recreated = objects.deployment.metadata.clone();
        if let Some(owners) = recreated.owner_references.as_mut() {
            owners[0].uid = "an-earlier-uid".into();
        }
        assert_eq!(foreign_object("Deployment", &recreated, &gw), None);

        let user_made: ObjectMeta = serde_json::from_value(json!({
            "name": "reviews-waypoint", "namespace": "shop", "labels": {"app": "reviews"}
        }))
        .unwrap();
        let refusal = foreign_object("Service", &user_made, &gw).expect("refused");
        assert!(
            refusal.contains("Service shop/reviews-waypoint"),
            "{refusal}"
        );
        // Our labels copied onto an object another controller owns.
        let mut other_owner = objects.service_account.metadata.clone();
        other_owner.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "x".into(),
            uid: "x".into(),
            controller: Some(true),
            block_owner_deletion: None,
        }]);
        assert!(foreign_object("ServiceAccount", &other_owner, &gw).is_some());
        // Made by us for another Gateway (a label edited by hand).
        let mut other_gateway = objects.service.metadata.clone();
        if let Some(labels) = other_gateway.labels.as_mut() {
            labels.insert(GATEWAY_NAME_LABEL.into(), "other".into());
        }
        assert!(foreign_object("Service", &other_gateway, &gw).is_some());
    }

    /// deploy/rendered/waypoint.yaml is exactly what the controller applies
    /// for the sample Gateway (deploy/samples/waypoint.yaml) on kind;
    /// deploy/check.sh validates it against the Kubernetes schemas.
    /// `MESHBOX_BLESS=1 cargo test -p meshbox-controlplane --lib rendered`
    /// rewrites it after a deliberate change.
    #[test]
    fn the_rendered_sample_is_the_one_deploy_check_validates() {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let sample = std::fs::read_to_string(deploy.join("samples/waypoint.yaml")).unwrap();
        let mut gw: Gateway = serde_yaml_ng::from_str(&sample).unwrap();
        // Assigned by the API server.
        gw.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
        let objects = deployed(&gw);
        let mut rendered = String::from(
            "# GENERATED by controlplane/src/k8s/waypoint_deployer.rs's tests: what the\n\
             # control plane applies for deploy/samples/waypoint.yaml on kind (uid\n\
             # made up). Not for kubectl apply; deploy/check.sh validates it.\n",
        );
        let docs = [
            serde_yaml_ng::to_string(&objects.service_account).unwrap(),
            serde_yaml_ng::to_string(&objects.service).unwrap(),
            serde_yaml_ng::to_string(&objects.deployment).unwrap(),
        ];
        rendered.push_str(&docs.join("---\n"));
        let path = deploy.join("rendered/waypoint.yaml");
        if std::env::var_os("MESHBOX_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == rendered,
            "{} is out of date: rerun with MESHBOX_BLESS=1 and commit it",
            path.display()
        );
    }

    /// Whatever a Gateway holds, planning and status never panic.
    #[test]
    fn arbitrary_gateways_never_panic() {
        use proptest::prelude::*;
        let name = prop::option::of("[a-zA-Z0-9.\\-_]{0,70}");
        let class = prop::sample::select(vec!["istio-waypoint", "meshbox-waypoint", "istio", ""]);
        proptest!(|(name in name, namespace in prop::option::of("[a-z\\-]{0,5}"), uid in prop::option::of("[a-z0-9\\-]{0,4}"), class in class, generation in prop::option::of(any::<i64>()), ips in prop::collection::vec("[0-9a-f:.]{0,12}", 0..3), replicas in any::<i32>())| {
            let gw = gateway(json!({
                "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation},
                "spec": {"gatewayClassName": class},
            }));
            match plan(&gw, &settings()) {
                Plan::Deploy(objects) => {
                    let observed = Observed { cluster_ips: ips, available_replicas: replicas };
                    let status = deployed_status(&gw, &observed, &settings(), NOW);
                    prop_assert_eq!(status.conditions.len(), 2);
                    prop_assert_eq!(objects.service.metadata.name, gw.metadata.name.clone());
                }
                Plan::Invalid { reason, message } => {
                    let status = invalid_status(&gw, reason, &message, NOW);
                    prop_assert!(status.conditions.iter().all(|c| c.status == "False"));
                }
                Plan::Ignore | Plan::Release | Plan::Unusable(_) | Plan::Deleting => {}
            }
        });
    }
}
