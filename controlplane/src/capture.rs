//! Pod capture state as node dataplanes report it (`meshbox.v1`
//! `CaptureStatusService/Report`, on the gRPC port beside xDS and the CA).
//!
//! A report is a node's whole current state and replaces its previous one.
//! Only node callers may report, and only about workloads the model has
//! scheduled on that same node: a node cannot claim (or hide) another
//! node's pods. Everything a client sends is bounded before it is kept.
//! `GET /api/v1/dataplanes` joins these reports to the xDS streams by node.
//!
//! Beside it, `EnrollmentService/Lookup` answers the node agent's question
//! when the CNI plugin reports a new sandbox: is this pod in the mesh? The
//! pod has no IP yet, so it is no workload in xDS; the model knows it
//! anyway from its spec and labels.

use std::collections::HashMap;
use std::sync::Arc;

use meshbox_proto::istio::workload::address;
use meshbox_proto::meshbox::capture_status_service_server::{
    CaptureStatusService, CaptureStatusServiceServer,
};
use meshbox_proto::meshbox::enrollment_service_server::{
    EnrollmentService, EnrollmentServiceServer,
};
use meshbox_proto::meshbox::{
    CaptureReport, CaptureReportResponse, EnrollmentRequest, EnrollmentResponse,
};
use parking_lot::Mutex;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, Caller};
use crate::store::MeshStore;

/// At most this many pods per report (a node runs a few hundred at most).
const MAX_PODS: usize = 5_000;
/// Longest text kept from a report (uid, netns path, error).
const MAX_TEXT: usize = 512;
const MAX_IPS: usize = 8;

/// One pod's capture state, as shown by the REST API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCaptureView {
    pub uid: String,
    /// `captured` or `pending`.
    pub state: String,
    pub ips: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A node's last report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCaptureView {
    /// RFC 3339.
    pub reported_at: String,
    pub captured: usize,
    pub pending: usize,
    pub pods: Vec<PodCaptureView>,
}

/// The latest report of every node.
#[derive(Debug, Default)]
pub struct CaptureReports {
    by_node: Mutex<HashMap<String, NodeCaptureView>>,
}

impl CaptureReports {
    pub fn get(&self, node: &str) -> Option<NodeCaptureView> {
        self.by_node.lock().get(node).cloned()
    }

    /// Keeps `report` as `node`'s state, minus pods the model does not
    /// schedule on `node`; returns (accepted, rejected).
    pub fn record(
        &self,
        node: &str,
        report: CaptureReport,
        store: &MeshStore,
    ) -> Result<(u32, u32), Status> {
        if report.pods.len() > MAX_PODS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_PODS} pods per report"
            )));
        }
        let total = report.pods.len();
        let pods: Vec<PodCaptureView> = store.read(|index| {
            report
                .pods
                .into_iter()
                .filter(|p| matches!(p.state.as_str(), "captured" | "pending"))
                .filter(|p| {
                    index.address(&p.uid).is_some_and(|a| match &a.r#type {
                        Some(address::Type::Workload(w)) => w.node == node,
                        _ => false,
                    })
                })
                .map(|p| PodCaptureView {
                    uid: p.uid,
                    state: p.state,
                    ips: p
                        .ips
                        .into_iter()
                        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
                        .take(MAX_IPS)
                        .collect(),
                    netns: Some(shorten(p.netns)).filter(|s| !s.is_empty()),
                    error: Some(shorten(p.error)).filter(|s| !s.is_empty()),
                })
                .collect()
        });
        let accepted = pods.len();
        let now = OffsetDateTime::now_utc();
        let view = NodeCaptureView {
            reported_at: now
                .format(&Rfc3339)
                .unwrap_or_else(|_| now.unix_timestamp().to_string()),
            captured: pods.iter().filter(|p| p.state == "captured").count(),
            pending: pods.iter().filter(|p| p.state == "pending").count(),
            pods,
        };
        self.by_node.lock().insert(node.to_owned(), view);
        Ok((accepted as u32, (total - accepted) as u32))
    }
}

fn shorten(s: String) -> String {
    crate::xds::shorten(&s, MAX_TEXT).to_owned()
}

/// The gRPC service.
pub struct CaptureGrpc {
    reports: Arc<CaptureReports>,
    auth: Arc<Authenticator>,
    store: Arc<MeshStore>,
}

impl CaptureGrpc {
    pub fn server(
        reports: Arc<CaptureReports>,
        auth: Arc<Authenticator>,
        store: Arc<MeshStore>,
    ) -> CaptureStatusServiceServer<Self> {
        CaptureStatusServiceServer::new(Self {
            reports,
            auth,
            store,
        })
        .max_decoding_message_size(4 << 20)
    }
}

#[tonic::async_trait]
impl CaptureStatusService for CaptureGrpc {
    async fn report(
        &self,
        request: Request<CaptureReport>,
    ) -> Result<Response<CaptureReportResponse>, Status> {
        let node = node_caller(&self.auth, &request).await?;
        let (accepted, rejected) = self
            .reports
            .record(&node, request.into_inner(), &self.store)?;
        if rejected > 0 {
            tracing::warn!(
                node,
                rejected,
                "capture report named pods not scheduled on the reporting node; left out"
            );
        }
        Ok(Response::new(CaptureReportResponse { accepted, rejected }))
    }
}

/// The node caller behind a request's bearer token.
async fn node_caller<T>(auth: &Authenticator, request: &Request<T>) -> Result<String, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    match auth
        .authenticate_header(header.as_deref())
        .await
        .map_err(crate::ca::grpc::auth_status)?
    {
        Caller::Node { node } => Ok(node),
        Caller::Workload(_) => Err(Status::permission_denied(
            "only node proxies may use this service",
        )),
    }
}

/// Answers whether a pod is enrolled; see the module documentation.
pub struct EnrollmentGrpc {
    auth: Arc<Authenticator>,
    store: Arc<MeshStore>,
}

impl EnrollmentGrpc {
    pub fn server(
        auth: Arc<Authenticator>,
        store: Arc<MeshStore>,
    ) -> EnrollmentServiceServer<Self> {
        EnrollmentServiceServer::new(Self { auth, store }).max_decoding_message_size(4096)
    }
}

/// The answer for `node`: pods on other nodes are reported unknown, so a
/// node learns nothing about the rest of the cluster.
pub fn lookup(store: &MeshStore, node: &str, namespace: &str, name: &str) -> EnrollmentResponse {
    store.read(|index| match index.pod_enrollment(namespace, name) {
        Some((pod_node, enrolled)) if pod_node == node => EnrollmentResponse {
            known: true,
            enrolled,
        },
        _ => EnrollmentResponse {
            known: false,
            enrolled: false,
        },
    })
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentGrpc {
    async fn lookup(
        &self,
        request: Request<EnrollmentRequest>,
    ) -> Result<Response<EnrollmentResponse>, Status> {
        let node = node_caller(&self.auth, &request).await?;
        let req = request.into_inner();
        Ok(Response::new(lookup(
            &self.store,
            &node,
            &req.namespace,
            &req.name,
        )))
    }
}

#[cfg(test)]
mod tests {
    use meshbox_proto::meshbox::PodCapture;

    use super::*;
    use crate::model::MeshConfig;
    use crate::source::manifests::parse_manifest;

    const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.1.0.5, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: db, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.1.0.6, conditions: [{type: Ready, status: "True"}]}
"#;

    fn store() -> Arc<MeshStore> {
        let store = MeshStore::new(MeshConfig::default());
        store.replace_all(parse_manifest(PODS).unwrap().objects);
        store
    }

    fn pod(uid: &str, state: &str) -> PodCapture {
        PodCapture {
            uid: uid.into(),
            state: state.into(),
            ips: vec!["10.1.0.5".into(), "not an ip".into()],
            netns: "/var/run/netns/x".into(),
            error: "e".repeat(10_000),
        }
    }

    #[test]
    fn a_node_reports_only_its_own_pods_and_each_report_replaces_the_last() {
        let store = store();
        let reports = CaptureReports::default();
        let (accepted, rejected) = reports
            .record(
                "node-a",
                CaptureReport {
                    pods: vec![
                        pod("Kubernetes//Pod/shop/web", "captured"),
                        // Another node's pod, an unknown one, a bad state.
                        pod("Kubernetes//Pod/shop/db", "captured"),
                        pod("Kubernetes//Pod/shop/ghost", "captured"),
                        pod("Kubernetes//Pod/shop/web", "owned"),
                    ],
                },
                &store,
            )
            .unwrap();
        assert_eq!((accepted, rejected), (1, 3));
        let view = reports.get("node-a").unwrap();
        assert_eq!(view.captured, 1);
        assert_eq!(view.pods[0].uid, "Kubernetes//Pod/shop/web");
        assert_eq!(view.pods[0].ips, ["10.1.0.5"], "malformed IPs dropped");
        assert!(view.pods[0].error.as_ref().unwrap().len() <= MAX_TEXT);
        assert!(
            reports.get("node-b").is_none(),
            "nothing recorded for node-b"
        );

        reports
            .record("node-a", CaptureReport { pods: vec![] }, &store)
            .unwrap();
        assert!(reports.get("node-a").unwrap().pods.is_empty());
    }

    #[test]
    fn enrollment_is_known_before_the_pod_has_an_ip_and_only_on_its_node() {
        let store = store();
        store.replace_all(
            parse_manifest(&format!(
                "{PODS}---
apiVersion: v1
kind: Pod
metadata: {{name: starting, namespace: shop}}
spec: {{nodeName: node-a, serviceAccountName: web, containers: [{{name: app, image: x}}]}}
status: {{phase: Pending}}
---
apiVersion: v1
kind: Pod
metadata: {{name: opted-out, namespace: shop, labels: {{istio.io/dataplane-mode: none}}}}
spec: {{nodeName: node-a, containers: [{{name: app, image: x}}]}}
status: {{phase: Pending}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: plain}}
---
apiVersion: v1
kind: Pod
metadata: {{name: other, namespace: plain}}
spec: {{nodeName: node-a, containers: [{{name: app, image: x}}]}}
"
            ))
            .unwrap()
            .objects,
        );
        let ask = |node: &str, ns: &str, name: &str| {
            let r = lookup(&store, node, ns, name);
            (r.known, r.enrolled)
        };
        assert_eq!(ask("node-a", "shop", "starting"), (true, true));
        assert_eq!(ask("node-a", "shop", "opted-out"), (true, false));
        assert_eq!(ask("node-a", "plain", "other"), (true, false));
        // Another node's pod, or one not scheduled yet: unknown.
        assert_eq!(ask("node-b", "shop", "starting"), (false, false));
        assert_eq!(ask("node-a", "shop", "db"), (false, false));
        assert_eq!(ask("node-a", "shop", "nope"), (false, false));
    }

    #[test]
    fn an_oversized_report_is_refused_and_the_last_one_kept() {
        let store = store();
        let reports = CaptureReports::default();
        reports
            .record(
                "node-a",
                CaptureReport {
                    pods: vec![pod("Kubernetes//Pod/shop/web", "pending")],
                },
                &store,
            )
            .unwrap();
        let huge = CaptureReport {
            pods: (0..MAX_PODS + 1)
                .map(|_| pod("Kubernetes//Pod/shop/web", "captured"))
                .collect(),
        };
        assert!(reports.record("node-a", huge, &store).is_err());
        assert_eq!(reports.get("node-a").unwrap().pending, 1);
    }
}
