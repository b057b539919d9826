//! Istio's `CreateCertificate` over gRPC/TLS, as a ztunnel calls it.

mod support;

use meshbox_certs::{SpiffeId, WorkloadKey};
use meshbox_proto::ca::IstioCertificateRequest;
use meshbox_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use prost_types::{Struct, Value, value::Kind};
use support::*;
use tonic::Code;
use tonic::transport::Channel;

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: cart-1
  namespace: shop
  uid: cart-1
  labels: {app: cart}
spec:
  nodeName: node-a
  serviceAccountName: cart
  containers: [{name: cart, image: cart}]
status:
  phase: Running
  podIP: 10.1.0.5
  podIPs: [{ip: 10.1.0.5}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: pay-1
  namespace: shop
  uid: pay-1
  labels: {app: pay}
spec:
  nodeName: node-b
  serviceAccountName: pay
  containers: [{name: pay, image: pay}]
status:
  phase: Running
  podIP: 10.1.0.6
  podIPs: [{ip: 10.1.0.6}]
  conditions: [{type: Ready, status: "True"}]
"#;

const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const PAY: &str = "spiffe://cluster.local/ns/shop/sa/pay";

async fn client(cp: &ControlPlane) -> IstioCertificateServiceClient<Channel> {
    let channel = grpc_channel(cp).connect().await.unwrap();
    IstioCertificateServiceClient::new(channel)
}

fn request(
    csr_for: &str,
    token: Option<&str>,
    impersonate: Option<&str>,
    ttl: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let key = WorkloadKey::generate().unwrap();
    let id: SpiffeId = csr_for.parse().unwrap();
    let metadata = impersonate.map(|who| Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            Value {
                kind: Some(Kind::StringValue(who.to_owned())),
            },
        )]
        .into(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: key.csr_pem(&id).unwrap(),
        validity_duration: ttl,
        metadata,
    });
    if let Some(token) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    req
}

fn leaf_identity(chain: &[String]) -> String {
    let certs = meshbox_certs::pem::parse_certificates(chain[0].as_bytes()).unwrap();
    meshbox_certs::tls::spiffe_id_of(&certs[0])
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_workload_token_gets_its_own_identity_only() {
    meshbox_certs::install_crypto_provider();
    let cp = ControlPlane::start(&[("pods.yaml", PODS)], &[]);
    let mut ca = client(&cp).await;
    let token = cp.token_for_identity(CART);

    let chain = ca
        .create_certificate(request(CART, Some(&token), None, 3600))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 2, "leaf first, root last");
    assert_eq!(leaf_identity(&chain), CART);
    assert_eq!(chain[1], cp.root_pem());

    let err = ca
        .create_certificate(request(PAY, Some(&token), None, 3600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // A workload cannot use impersonation to get someone else's identity.
    let err = ca
        .create_certificate(request(PAY, Some(&token), Some(PAY), 3600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    let err = ca
        .create_certificate(request(CART, None, None, 3600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = ca
        .create_certificate(request(CART, Some("garbage"), None, 3600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = ca
        .create_certificate(request(CART, Some(&token), None, -5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut garbage = request(CART, Some(&token), None, 0);
    garbage.get_mut().csr = "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n".into();
    let err = ca.create_certificate(garbage).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_node_proxy_may_impersonate_only_pods_on_its_node() {
    meshbox_certs::install_crypto_provider();
    let cp = ControlPlane::start(&[("pods.yaml", PODS)], &[]);
    let mut ca = client(&cp).await;
    let node_a = cp.token_for_node("node-a");

    // cart runs on node-a: allowed, as ztunnel asks for it.
    let chain = ca
        .create_certificate(request(CART, Some(&node_a), Some(CART), 86400))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(leaf_identity(&chain), CART);

    // pay runs on node-b: refused.
    let err = ca
        .create_certificate(request(PAY, Some(&node_a), Some(PAY), 86400))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("node-a"), "{}", err.message());

    // The CSR must match the impersonated identity.
    let err = ca
        .create_certificate(request(PAY, Some(&node_a), Some(CART), 86400))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // An identity with no pod anywhere is refused too.
    let ghost = "spiffe://cluster.local/ns/shop/sa/ghost";
    let err = ca
        .create_certificate(request(ghost, Some(&node_a), Some(ghost), 86400))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let node_b = cp.token_for_node("node-b");
    let chain = ca
        .create_certificate(request(PAY, Some(&node_b), Some(PAY), 86400))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(leaf_identity(&chain), PAY);
}

/// Istio's ztunnel reads `AUTH_TOKEN` (a file) and sends `Bearer ` plus the
/// file's bytes verbatim; a trailing newline makes that header invalid and
/// ztunnel never connects. `token --out` writes a file it can use as is.
#[tokio::test]
async fn a_token_file_works_the_way_ztunnel_reads_it() {
    use std::os::unix::fs::PermissionsExt;
    meshbox_certs::install_crypto_provider();
    let cp = ControlPlane::start(&[("pods.yaml", PODS)], &[]);
    let file = cp.state.join("node-a.token");
    std::fs::write(&file, "wider permissions before").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let printed = token(
        &cp.state,
        &["--node", "node-a", "--out", file.to_str().unwrap()],
    );
    assert!(printed.is_empty(), "the token is not printed with --out");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let content = std::fs::read(&file).unwrap();
    assert!(!content.is_empty());
    assert!(!content.ends_with(b"\n"), "no trailing newline");

    // ztunnel's header: "Bearer " + the file's bytes, unchanged.
    let mut header = b"Bearer ".to_vec();
    header.extend_from_slice(&content);
    let value = tonic::metadata::AsciiMetadataValue::try_from(header.as_slice()).unwrap();
    let mut req = request(CART, None, Some(CART), 3600);
    req.metadata_mut().insert("authorization", value);
    let chain = client(&cp)
        .await
        .create_certificate(req)
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(leaf_identity(&chain), CART);
}
