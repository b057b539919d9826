#!/usr/bin/env python3
"""Writes the seed corpus under corpus/<target>/: a handful of valid and
malformed inputs per target. Re-run only to change the seeds (the CSRs get
fresh keys each time); crash regressions (corpus/<target>/crash-*) are
kept. Needs openssl for the CSRs."""

import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TD = "cluster.local"
ID = f"spiffe://{TD}/ns/default/sa/web"


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


# --- spiffe_id -------------------------------------------------------------
for name, text in {
    "valid": ID,
    "valid-max-chars": "spiffe://a-b_c.d0/ns/A.b-c_9/sa/x",
    "uppercase-td": "spiffe://Cluster.local/ns/a/sa/b",
    "extra-segment": "spiffe://cluster.local/ns/a/sa/b/c",
    "dot-dot": "spiffe://cluster.local/ns/../sa/b",
    "port": "spiffe://cluster.local:80/ns/a/sa/b",
    "percent": "spiffe://cluster.local/ns/a%2f/sa/b",
    "empty-sa": "spiffe://cluster.local/ns/a/sa/",
    "non-ascii": "spiffe://cluster.local/ns/\u00e4/sa/b",
    "wrong-scheme": "https://cluster.local/ns/a/sa/b",
}.items():
    write("spiffe_id", name, text)

# --- csr -------------------------------------------------------------------
def openssl(*args, stdin=None):
    return subprocess.run(["openssl", *args], input=stdin, check=True,
                          capture_output=True).stdout


with tempfile.TemporaryDirectory() as tmp:
    def key(name, *genpkey):
        path = os.path.join(tmp, name)
        openssl("genpkey", *genpkey, "-out", path)
        return path

    p256 = key("p256", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    keys = {
        "p256": p256,
        "p384": key("p384", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"),
        "ed25519": key("ed25519", "-algorithm", "ED25519"),
        "rsa1024": key("rsa1024", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"),
        "secp256k1": key("k1", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp256k1"),
    }

    def csr(key_path, san=None, outform="DER"):
        args = ["req", "-new", "-key", key_path, "-subj", "/O=fuzz", "-outform", outform]
        if san:
            args += ["-addext", f"subjectAltName={san}"]
        return openssl(*args)

    write("csr", "valid-p256.der", csr(p256, f"URI:{ID}"))
    write("csr", "valid-p256.pem", csr(p256, f"URI:{ID}", "PEM"))
    write("csr", "valid-p384.der", csr(keys["p384"], f"URI:{ID}"))
    write("csr", "valid-ed25519.der", csr(keys["ed25519"], f"URI:{ID}"))
    write("csr", "weak-rsa1024.der", csr(keys["rsa1024"], f"URI:{ID}"))
    write("csr", "curve-secp256k1.der", csr(keys["secp256k1"], f"URI:{ID}"))
    write("csr", "foreign-td.der", csr(p256, "URI:spiffe://evil.example/ns/a/sa/b"))
    write("csr", "dns-and-uri.der", csr(p256, f"URI:{ID},DNS:web.example"))
    write("csr", "two-uris.der", csr(p256, f"URI:{ID},URI:spiffe://{TD}/ns/a/sa/b"))
    write("csr", "no-san.der", csr(p256))
    bad = bytearray(csr(p256, f"URI:{ID}"))
    bad[-5] ^= 0x55  # inside the signature
    write("csr", "bad-signature.der", bytes(bad))
    write("csr", "truncated.der", csr(p256, f"URI:{ID}")[:60])

# --- delta_request (protobuf by hand: field number, wire type 2) ------------
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(number << 3 | 2) + varint(len(payload)) + payload


ADDRESS = "type.googleapis.com/istio.workload.Address"
AUTHZ = "type.googleapis.com/istio.security.Authorization"
node = field(1, field(1, "node-a") + field(2, "meshbox"))
write("delta_request", "wildcard-address", field(2, ADDRESS) + field(3, "*"))
write("delta_request", "wildcard-authz", node + field(2, AUTHZ))
write("delta_request", "on-demand", node + field(2, ADDRESS)
      + field(3, "Kubernetes//Pod/default/web-0") + field(3, "/10.0.0.1")
      + field(3, "default/web.default.svc.cluster.local"))
write("delta_request", "reconnect", field(2, ADDRESS) + field(3, "*")
      + field(5, field(1, "Kubernetes//Pod/default/web-0") + field(2, "v1")))
write("delta_request", "nack", field(2, ADDRESS) + field(6, "1")
      + field(7, b"\x08\x03" + field(2, "bad resource")))
write("delta_request", "unsubscribe", field(2, ADDRESS) + field(4, "*")
      + field(4, "/10.0.0.1"))
write("delta_request", "bad-name", field(2, ADDRESS) + field(3, "a b\x00"))
write("delta_request", "no-type", field(3, "*"))
write("delta_request", "unknown-type", field(2, "type.googleapis.com/envoy.Cluster"))
write("delta_request", "not-protobuf", b"\xff\xff\xff\xff")

# --- manifest --------------------------------------------------------------
write("manifest", "mesh.yaml", """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status:
  phase: Running
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
""")
write("manifest", "policy-and-waypoint.yaml", """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]
    to: [{operation: {ports: ["8080"], methods: ["GET"]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
""")
write("manifest", "list.yaml", """\
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a}}
- {apiVersion: v1, kind: Service, metadata: {name: s, namespace: a}, spec: {ports: [{port: 80}]}}
- {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: s-1, namespace: a, labels: {kubernetes.io/service-name: s}}, endpoints: [{addresses: [10.1.0.1]}], ports: [{port: 80}]}
""")
write("manifest", "anchors.yaml", "a: &x [1, 2]\nb: *x\n")
write("manifest", "no-name.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {}\n")
write("manifest", "bad-type.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 7}\n")
write("manifest", "unclosed.yaml", "a: [unclosed")

# --- cni_stdin: optional env line (container id, ifname, CNI_ARGS), stdin --
write("cni_stdin", "add-1.0.0", '{"cniVersion":"1.0.0","name":"k8s","type":"meshbox-cni",'
      '"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],'
      '"ips":[{"address":"10.0.0.5/24","interface":0},{"address":"fd00::5/64"}]}}')
write("cni_stdin", "add-no-version-in-result", '{"cniVersion":"0.4.0","prevResult":{"ips":[]},'
      '"timeout":"2s","socket":"/run/meshbox/cni.sock"}')
write("cni_stdin", "with-env", "abc123\teth0\tK8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;IgnoreUnknown=1\n"
      '{"cniVersion":"1.1.0","name":"k8s"}')
write("cni_stdin", "bad-env", "-bad/id\teth0/../x\tnoequals;K8S_POD_UID=u\n{}")
write("cni_stdin", "old-version", '{"cniVersion":"0.2.0"}')
write("cni_stdin", "zero-timeout", '{"cniVersion":"1.0.0","timeout":"0s"}')
write("cni_stdin", "bad-ip", '{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"not-an-ip"}]}}')
write("cni_stdin", "prev-huge-number", '{"cniVersion":"1.0.0","prevResult":{"mtu":1e400}}')
write("cni_stdin", "prev-not-object", '{"cniVersion":"1.0.0","prevResult":[1,2]}')
write("cni_stdin", "empty", "")
write("cni_stdin", "not-json", "{\"cniVersion\":")

# --- connect_head: method, URI, then header lines ---------------------------
write("connect_head", "ipv4", "CONNECT\n10.0.0.1:8080\nx-forwarded-network: net1\n")
write("connect_head", "ipv6", "CONNECT\n[fd00::1]:80\n")
write("connect_head", "mapped", "CONNECT\n[::ffff:10.0.0.1]:80\n")
write("connect_head", "hostname", "CONNECT\nweb.shop.svc:80\n")
write("connect_head", "port-zero", "CONNECT\n10.0.0.1:0\n")
write("connect_head", "userinfo", "CONNECT\nuser@10.0.0.1:80\n")
write("connect_head", "get", "GET\nhttp://10.0.0.1:80/\n")
write("connect_head", "no-port", "CONNECT\n10.0.0.1\n")


# --- waypoint_config (first byte: 0 stream bytes, 1 route, 2 policy) -------
def number(n, value):
    """A varint field (wire type 0)."""
    return varint(n << 3) + varint(value)


WP = "default/wp"
SVC = "default/reviews.default.svc.cluster.local"
for name, data in {
    "http1": b"GET /reviews/1 HTTP/1.1\r\nHost: reviews\r\n\r\n",
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "method-too-long": b"A" * 40 + b" / HTTP/1.1",
    "pri-not-preface": b"PRI /x HTTP/1.1\r\n",
}.items():
    write("waypoint_config", f"stream-{name}", b"\x00" + data)

split_rule = (
    field(1, field(1, number(1, 1) + field(3, "/")))  # PathPrefix /
    + field(3, field(1, "default/v1.default.svc.cluster.local") + number(2, 9080) + number(3, 90))
    + field(3, field(1, "default/v2.default.svc.cluster.local") + number(2, 9080) + number(3, 10))
    + field(4, field(1, field(1, "x-route") + field(2, "split")))
)
regex_rule = field(1, field(1, number(1, 2) + field(3, "/items/[0-9]+"))) + field(
    3, field(1, "default/v1.default.svc.cluster.local") + number(2, 9080) + number(3, 1)
)
parent = field(3, field(1, WP) + field(2, SVC) + number(3, 9080))
write("waypoint_config", "route-split", b"\x01" + field(1, "split") + field(2, "default") + parent + field(4, split_rule))
write("waypoint_config", "route-regex", b"\x01" + field(1, "regex") + parent + field(4, regex_rule))
write("waypoint_config", "route-bad-regex", b"\x01" + parent
      + field(4, field(1, field(1, number(1, 2) + field(3, "(unclosed"))) + field(3, field(1, SVC) + number(2, 9080) + number(3, 1))))
write("waypoint_config", "route-zero-weights", b"\x01" + parent
      + field(4, field(3, field(1, SVC) + number(2, 9080) + number(3, 0))))
write("waypoint_config", "route-not-protobuf", b"\x01\xff\xff\xff\xff")

target = field(3, field(1, WP))
get_only = field(5, field(2, field(5, "GET")))  # rules[0].to[0].methods
deny_admin = number(4, 1) + field(5, field(1, field(5, "default")) + field(2, field(7, "/admin*")))
deny_jwt = number(4, 1) + field(5, field(1, field(4, "*")))  # notRequestPrincipals: unsupported
write("waypoint_config", "policy-allow-get", b"\x02" + field(1, "get-only") + field(2, "default") + target + get_only)
write("waypoint_config", "policy-deny-admin", b"\x02" + field(1, "deny-admin") + target + deny_admin)
write("waypoint_config", "policy-deny-jwt", b"\x02" + field(1, "deny-jwt") + target + deny_jwt)
write("waypoint_config", "policy-when-header", b"\x02" + target + number(4, 1)
      + field(5, field(3, field(1, "request.headers[x-admin]") + field(2, "1"))))
write("waypoint_config", "policy-not-protobuf", b"\x02\x0a\xff")
