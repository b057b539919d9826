#!/usr/bin/env python3
"""Offline schema checks of meshbox's Kubernetes manifests (run by
deploy/check.sh; needs the PyPI package kubernetes-validate).

Every document in the files given is checked:

- built-in kinds against the Kubernetes OpenAPI schema of each
  --kubernetes-version, strictly (an unknown field is an error, as with
  kubectl's default server-side field validation); a kind with no schema
  there is an error too;
- the AuthorizationPolicy and PeerAuthentication CRDs like any built-in
  kind (apiextensions/v1), and also for what the API server demands of a
  CRD beyond that: a structural schema, one storage version, the same
  schema in every served version (there is no conversion webhook);
- every AuthorizationPolicy and PeerAuthentication against its CRD's
  openAPIV3Schema, the way the API server applies it: unknown fields
  rejected, and the CRD's CEL rules (x-kubernetes-validations), each
  emulated here.

- Gateway API objects (Gateway, HTTPRoute) against a schema written here:
  the subset of the standard channel's CRDs that meshbox reads, closed
  (a misspelt field is an error), with the CRD's rule that a Service
  backendRef needs a port. Gateway API's CRDs are not part of meshbox's
  install (deploy/kind.sh applies the upstream release); the cluster's CRD
  stays the authority.

Before any of that it checks itself on objects that must be refused, so a
checker that accepts everything fails.
"""

import argparse
import copy
import sys

import jsonschema
import kubernetes_validate
import yaml

POLICY_GROUP = "security.istio.io"
# kind -> the name of its CRD.
CRDS = {
    "AuthorizationPolicy": "authorizationpolicies.security.istio.io",
    "PeerAuthentication": "peerauthentications.security.istio.io",
}


def port_key(key):
    """CEL's int(key) and the range check: a non-number is an error, which
    the API server counts as a failed rule."""
    try:
        return 0 < int(key) <= 65535
    except ValueError:
        return False


# The CEL rules of the CRD, as Python. A rule in the CRD that is not here
# fails the check: add its emulation when you add the rule.
CEL_RULES = {
    "!(has(self.selector) && (has(self.targetRef) || has(self.targetRefs)))":
        lambda spec: not ("selector" in spec and ("targetRef" in spec or "targetRefs" in spec)),
    "!(has(self.targetRef) && has(self.targetRefs))":
        lambda spec: not ("targetRef" in spec and "targetRefs" in spec),
    "self.all(key, 0 < int(key) && int(key) <= 65535)":
        lambda ports: all(port_key(k) for k in ports),
    "(has(self.selector) && has(self.selector.matchLabels) && self.selector.matchLabels.size() > 0) || !has(self.portLevelMtls)":
        lambda spec: bool((spec.get("selector") or {}).get("matchLabels")) or "portLevelMtls" not in spec,
}


class Failure(Exception):
    pass


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def name_of(doc):
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    return "%s %s%s" % (doc.get("kind"), ns + "/" if ns else "", meta.get("name"))


# --------------------------------------------------------------------------
# The CRD

def check_structural(node, path, errors):
    """What the API server requires of a CRD's schema (structural schemas,
    apiextensions validation), for the constructs this CRD uses."""
    if not isinstance(node, dict):
        errors.append("%s: not a schema object" % path)
        return
    for junctor in ("allOf", "anyOf", "oneOf", "not"):
        if junctor in node:
            errors.append("%s: %s is not handled by this checker" % (path, junctor))
    free = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    kind = node.get("type")
    if not kind and not free:
        errors.append("%s: no type (a structural schema types every node)" % path)
    if "properties" in node and "additionalProperties" in node:
        errors.append("%s: properties and additionalProperties are mutually exclusive" % path)
    if "properties" in node or "additionalProperties" in node:
        if kind != "object":
            errors.append("%s: properties on a node of type %r" % (path, kind))
    for field, sub in (node.get("properties") or {}).items():
        check_structural(sub, "%s.%s" % (path, field), errors)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        check_structural(extra, path + ".*", errors)
    if kind == "array":
        if "items" not in node:
            errors.append("%s: an array needs items" % path)
        else:
            check_structural(node["items"], path + "[]", errors)
    elif "items" in node:
        errors.append("%s: items on a node of type %r" % (path, kind))
    for field in node.get("required") or []:
        if field not in (node.get("properties") or {}):
            errors.append("%s: required field %r is not a property" % (path, field))
    for value in node.get("enum") or []:
        if kind == "string" and not isinstance(value, str):
            errors.append("%s: enum value %r is not a string" % (path, value))
    for rule in node.get("x-kubernetes-validations") or []:
        if rule.get("rule") not in CEL_RULES:
            errors.append("%s: CEL rule %r has no emulation in deploy/validate.py" % (path, rule.get("rule")))


def check_crd(crd, kind):
    spec = crd["spec"]
    errors = []
    if spec.get("group") != POLICY_GROUP:
        errors.append("group is %r, not %s" % (spec.get("group"), POLICY_GROUP))
    if spec.get("names", {}).get("kind") != kind:
        errors.append("kind is not %s" % kind)
    if spec.get("scope") != "Namespaced":
        errors.append("not namespaced")
    versions = spec.get("versions") or []
    stored = [v["name"] for v in versions if v.get("storage")]
    if stored != ["v1"]:
        errors.append("the storage version must be v1 alone, is %s" % stored)
    served = [v for v in versions if v.get("served")]
    if "v1" not in [v["name"] for v in served]:
        errors.append("v1 is not served")
    schemas = [v.get("schema", {}).get("openAPIV3Schema") for v in served]
    if any(s != schemas[0] for s in schemas):
        errors.append("served versions have different schemas, and there is no conversion")
    if spec.get("conversion", {}).get("strategy", "None") != "None":
        errors.append("a conversion strategy other than None")
    for version in versions:
        schema = version.get("schema", {}).get("openAPIV3Schema")
        if schema is None:
            errors.append("%s: no openAPIV3Schema" % version["name"])
            continue
        check_structural(schema, version["name"], errors)
        if schema.get("type") != "object":
            errors.append("%s: the root must be of type object" % version["name"])
        if "metadata" in (schema.get("properties") or {}):
            errors.append("%s: metadata may only restrict name and generateName" % version["name"])
    if errors:
        raise Failure("CRD %s:\n  %s" % (crd["metadata"]["name"], "\n  ".join(errors)))
    return next(v for v in versions if v["name"] == "v1")["schema"]["openAPIV3Schema"]


# --------------------------------------------------------------------------
# Custom resources against the CRD

def closed(schema):
    """The schema as the API server enforces it: objects with properties
    accept no other field (strict field validation after pruning), except
    where x-kubernetes-preserve-unknown-fields says otherwise."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.get("type") == "object" and "properties" in node \
                and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])
        if isinstance(node.get("items"), dict):
            walk(node["items"])

    walk(schema)
    # Every object has these; the CRD's schema does not list them.
    schema.setdefault("properties", {}).update({
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    })
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    return schema


def cel_rules(schema, doc, path="", out=None):
    """(rule, message, value) for every CEL rule, with the value it applies to."""
    out = [] if out is None else out
    if not isinstance(schema, dict) or doc is None:
        return out
    for rule in schema.get("x-kubernetes-validations") or []:
        out.append((rule["rule"], rule.get("message", rule["rule"]), doc, path or "<root>"))
    if isinstance(doc, dict):
        for field, sub in (schema.get("properties") or {}).items():
            if field in doc:
                cel_rules(sub, doc[field], path + "." + field, out)
    if isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            cel_rules(schema["items"], item, "%s[%d]" % (path, i), out)
    return out


def check_policy(doc, schema):
    api_version = doc.get("apiVersion", "")
    if api_version not in ("security.istio.io/v1", "security.istio.io/v1beta1"):
        raise Failure("%s: apiVersion %s is not served by the CRD" % (name_of(doc), api_version))
    validator = jsonschema.Draft7Validator(closed(schema))
    problems = ["%s: %s" % ("/".join(str(p) for p in e.absolute_path) or "<root>", e.message)
                for e in validator.iter_errors(doc)]
    if not problems:
        for rule, message, value, path in cel_rules(schema, doc):
            if rule not in CEL_RULES:
                problems.append("%s: no emulation of CEL rule %r" % (path, rule))
            elif not CEL_RULES[rule](value):
                problems.append("%s: %s" % (path, message))
    if problems:
        raise Failure("%s does not validate against the CRD:\n  %s" % (name_of(doc), "\n  ".join(problems)))


# Objects the check must refuse: if one passes, the checker is broken.
MUST_FAIL = {
    "a misspelt field (principal)": """
spec:
  rules:
  - from:
    - source:
        principal: ["cluster.local/ns/a/sa/b"]
""",
    "an unknown action": """
spec:
  action: PERMIT
""",
    "ports as a string, not a list": """
spec:
  rules:
  - to:
    - operation:
        ports: "8080"
""",
    "a condition without key": """
spec:
  rules:
  - when:
    - values: ["x"]
""",
    "selector and targetRef together": """
spec:
  selector:
    matchLabels: {app: a}
  targetRef: {kind: Service, name: a}
""",
}

PA_MUST_FAIL = {
    "an unknown mode": """
spec:
  mtls: {mode: strict}
""",
    "a port key that is not a number": """
spec:
  selector:
    matchLabels: {app: a}
  portLevelMtls:
    http: {mode: STRICT}
""",
    "port 0": """
spec:
  selector:
    matchLabels: {app: a}
  portLevelMtls:
    "0": {mode: STRICT}
""",
    "portLevelMtls without a selector": """
spec:
  mtls: {mode: STRICT}
  portLevelMtls:
    "8080": {mode: PERMISSIVE}
""",
    "a misspelt field (mtl)": """
spec:
  mtl: {mode: STRICT}
""",
}

PA_MUST_PASS = """
spec:
  selector:
    matchLabels: {app: db}
  mtls: {mode: STRICT}
  portLevelMtls:
    "9090": {mode: PERMISSIVE}
    "65535": {mode: DISABLE}
"""

MUST_PASS = """
spec:
  selector:
    matchLabels: {app: reviews}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/bookinfo/sa/productpage"]
        notNamespaces: ["legacy"]
    to:
    - operation:
        ports: ["9080"]
    when:
    - key: source.ip
      values: ["10.0.0.0/8"]
"""


SELF_TESTS = {
    "AuthorizationPolicy": (MUST_PASS, MUST_FAIL),
    "PeerAuthentication": (PA_MUST_PASS, PA_MUST_FAIL),
}


def self_test(kind, schema):
    """The number of broken objects the checker refused."""
    must_pass, must_fail = SELF_TESTS[kind]
    head = {"apiVersion": "security.istio.io/v1", "kind": kind,
            "metadata": {"name": "t", "namespace": "t"}}
    check_policy(dict(head, **yaml.safe_load(must_pass)), schema)
    for what, text in must_fail.items():
        try:
            check_policy(dict(head, **yaml.safe_load(text)), schema)
        except Failure:
            continue
        raise Failure("self-test: a %s with %s was accepted" % (kind, what))
    return len(must_fail)


# --------------------------------------------------------------------------
# Gateway API (gateway.networking.k8s.io/v1): Gateway and HTTPRoute

GATEWAY_GROUP = "gateway.networking.k8s.io"
DNS_LABELS = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
NAME = {"type": "string", "minLength": 1, "maxLength": 253}
KIND = {"type": "string", "minLength": 1, "maxLength": 63}
GROUP = {"type": "string", "maxLength": 253}


def obj(properties, required=()):
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def array(items, max_items):
    return {"type": "array", "items": items, "maxItems": max_items}


# Nested parts meshbox passes through or reports as unsupported: their
# shape is the CRD's business, only their type is checked here.
OPEN_OBJECT = {"type": "object"}
HEADER_MODIFIER = obj({
    "set": array(obj({"name": NAME, "value": {"type": "string"}}, ["name", "value"]), 16),
    "add": array(obj({"name": NAME, "value": {"type": "string"}}, ["name", "value"]), 16),
    "remove": array({"type": "string"}, 16),
})
HTTP_FILTER = obj({
    "type": {"type": "string", "enum": ["RequestHeaderModifier", "ResponseHeaderModifier",
                                        "RequestMirror", "RequestRedirect", "URLRewrite",
                                        "ExtensionRef", "CORS"]},
    "requestHeaderModifier": HEADER_MODIFIER,
    "responseHeaderModifier": HEADER_MODIFIER,
    "requestMirror": OPEN_OBJECT,
    "requestRedirect": OPEN_OBJECT,
    "urlRewrite": OPEN_OBJECT,
    "extensionRef": OPEN_OBJECT,
    "cors": OPEN_OBJECT,
}, ["type"])
HTTP_MATCH = obj({
    "path": obj({"type": {"type": "string", "enum": ["Exact", "PathPrefix", "RegularExpression"]},
                 "value": {"type": "string", "maxLength": 1024}}),
    "headers": array(obj({"type": {"type": "string", "enum": ["Exact", "RegularExpression"]},
                          "name": NAME, "value": {"type": "string"}}, ["name", "value"]), 16),
    "queryParams": array(obj({"type": {"type": "string", "enum": ["Exact", "RegularExpression"]},
                              "name": NAME, "value": {"type": "string"}}, ["name", "value"]), 16),
    "method": {"type": "string", "enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT",
                                          "OPTIONS", "TRACE", "PATCH"]},
})
PARENT_REF = obj({"group": GROUP, "kind": KIND, "namespace": NAME, "name": NAME,
                  "sectionName": {"type": "string", "pattern": DNS_LABELS}, "port": PORT}, ["name"])
BACKEND_REF = obj({"group": GROUP, "kind": KIND, "namespace": NAME, "name": NAME, "port": PORT,
                   "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
                   "filters": array(HTTP_FILTER, 16)}, ["name"])
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": NAME, "namespace": NAME}}

GATEWAY_API_SCHEMAS = {
    "Gateway": obj({
        "apiVersion": {"const": GATEWAY_GROUP + "/v1"},
        "kind": {"const": "Gateway"},
        "metadata": METADATA,
        "spec": obj({
            "gatewayClassName": NAME,
            "listeners": dict(array(obj({
                "name": {"type": "string", "pattern": DNS_LABELS, "maxLength": 253},
                "hostname": {"type": "string"},
                "port": PORT,
                "protocol": {"type": "string", "minLength": 1, "maxLength": 255},
                "tls": OPEN_OBJECT,
                "allowedRoutes": obj({"namespaces": obj({
                    "from": {"type": "string", "enum": ["All", "Same", "Selector"]},
                    "selector": OPEN_OBJECT}),
                    "kinds": array(obj({"group": GROUP, "kind": KIND}, ["kind"]), 8)}),
            }, ["name", "port", "protocol"]), 64), minItems=1),
            "addresses": array(obj({"type": {"type": "string"}, "value": {"type": "string"}}), 16),
            "infrastructure": OPEN_OBJECT,
        }, ["gatewayClassName", "listeners"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
    "HTTPRoute": obj({
        "apiVersion": {"const": GATEWAY_GROUP + "/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": METADATA,
        "spec": obj({
            "parentRefs": array(PARENT_REF, 32),
            "hostnames": array({"type": "string"}, 16),
            "rules": array(obj({
                "name": {"type": "string", "pattern": DNS_LABELS},
                "matches": array(HTTP_MATCH, 64),
                "filters": array(HTTP_FILTER, 16),
                "backendRefs": array(BACKEND_REF, 16),
                "timeouts": obj({"request": DURATION, "backendRequest": DURATION}),
            }), 16),
        }),
    }, ["apiVersion", "kind", "metadata", "spec"]),
}


def service_backends_have_ports(doc):
    """The CRD's CEL rule: a backendRef to a Service (the default kind) needs
    a port."""
    problems = []
    for i, rule in enumerate((doc.get("spec") or {}).get("rules") or []):
        for j, ref in enumerate(rule.get("backendRefs") or []):
            if ref.get("group", "") == "" and ref.get("kind", "Service") == "Service" and "port" not in ref:
                problems.append("spec/rules/%d/backendRefs/%d: a Service backend needs a port" % (i, j))
    return problems


def check_gateway_api(doc):
    kind = doc.get("kind")
    if kind not in GATEWAY_API_SCHEMAS:
        raise Failure("%s: no schema for %s %s here" % (name_of(doc), doc.get("apiVersion"), kind))
    validator = jsonschema.Draft7Validator(GATEWAY_API_SCHEMAS[kind])
    problems = ["%s: %s" % ("/".join(str(p) for p in e.absolute_path) or "<root>", e.message)
                for e in validator.iter_errors(doc)]
    if kind == "HTTPRoute" and not problems:
        problems = service_backends_have_ports(doc)
    if problems:
        raise Failure("%s does not validate against the Gateway API schema:\n  %s"
                      % (name_of(doc), "\n  ".join(problems)))


GATEWAY_API_MUST_PASS = [
    """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: t}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
""",
    """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: t}
spec:
  parentRefs:
  - {group: "", kind: Service, name: server, port: 80}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-a, value: b}]
    backendRefs:
    - {name: server-v1, port: 80, weight: 90}
    timeouts: {request: 5s}
""",
]

GATEWAY_API_MUST_FAIL = {
    "a Gateway without gatewayClassName": """
kind: Gateway
spec:
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
""",
    "a Gateway without listeners": """
kind: Gateway
spec: {gatewayClassName: istio-waypoint, listeners: []}
""",
    "a listener port as a string": """
kind: Gateway
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: "15008", protocol: HBONE}]
""",
    "a misspelt listener field (protocl)": """
kind: Gateway
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocl: HBONE}]
""",
    "a Service backendRef without a port": """
kind: HTTPRoute
spec:
  rules: [{backendRefs: [{name: server-v1, weight: 90}]}]
""",
    "a negative weight": """
kind: HTTPRoute
spec:
  rules: [{backendRefs: [{name: server-v1, port: 80, weight: -1}]}]
""",
    "a misspelt rule field (backendRef)": """
kind: HTTPRoute
spec:
  rules: [{backendRef: [{name: server-v1, port: 80}]}]
""",
    "an unknown path match type": """
kind: HTTPRoute
spec:
  rules: [{matches: [{path: {type: Prefix, value: /}}]}]
""",
}


def gateway_api_self_test():
    """The number of broken objects the checker refused."""
    for text in GATEWAY_API_MUST_PASS:
        check_gateway_api(yaml.safe_load(text))
    for what, text in GATEWAY_API_MUST_FAIL.items():
        doc = yaml.safe_load(text)
        doc = dict({"apiVersion": GATEWAY_GROUP + "/v1", "metadata": {"name": "t", "namespace": "t"}}, **doc)
        try:
            check_gateway_api(doc)
        except Failure:
            continue
        raise Failure("self-test: %s was accepted" % what)
    return len(GATEWAY_API_MUST_FAIL)


# --------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubernetes-version", action="append", required=True,
                        help="validate built-in kinds against this version (repeatable)")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    docs = []
    for path in args.files:
        try:
            docs += [(path, d) for d in load(path)]
        except yaml.YAMLError as e:
            print("FAIL %s: not valid YAML: %s" % (path, e))
            return 1

    failures = 0
    schemas = {}
    for kind, crd_name in CRDS.items():
        crds = [d for _, d in docs if d.get("kind") == "CustomResourceDefinition"
                and d.get("metadata", {}).get("name") == crd_name]
        if not crds:
            print("FAIL no CustomResourceDefinition %s among the files" % crd_name)
            return 1
        try:
            schemas[kind] = check_crd(crds[0], kind)
            if any(c != crds[0] for c in crds):
                raise Failure("the CRD %s differs between the rendered files" % crd_name)
            refused = self_test(kind, schemas[kind])
            print("ok   CRD %s: structural, v1 stored, every served version the same schema; "
                  "the checker refuses %d broken objects" % (crd_name, refused))
        except Failure as e:
            print("FAIL %s" % e)
            return 1

    try:
        refused = gateway_api_self_test()
        print("ok   Gateway API schema (Gateway, HTTPRoute): the checker refuses %d broken objects" % refused)
    except Failure as e:
        print("FAIL %s" % e)
        return 1

    seen = set()
    for path, doc in docs:
        key = (path, name_of(doc))
        if key in seen:
            continue
        seen.add(key)
        api_version = doc.get("apiVersion", "")
        try:
            if api_version.split("/")[0] == POLICY_GROUP:
                if doc.get("kind") not in schemas:
                    raise Failure("%s: %s: no CRD for this kind" % (path, name_of(doc)))
                check_policy(doc, schemas[doc.get("kind")])
                print("ok   %s: %s (against the CRD)" % (path, name_of(doc)))
                continue
            if api_version.split("/")[0] == GATEWAY_GROUP:
                check_gateway_api(doc)
                print("ok   %s: %s (against the Gateway API schema)" % (path, name_of(doc)))
                continue
            for version in args.kubernetes_version:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.utils.SchemaNotFoundError:
                    raise Failure("%s: %s: no schema for %s in Kubernetes %s" % (path, name_of(doc), api_version, version))
                except kubernetes_validate.utils.ValidationError as e:
                    where = "/".join(str(p) for p in e.path) or "<root>"
                    raise Failure("%s: %s: Kubernetes %s: %s: %s" % (path, name_of(doc), version, where, e.message))
            print("ok   %s: %s (Kubernetes %s, strict)" % (path, name_of(doc), ", ".join(args.kubernetes_version)))
        except Failure as e:
            print("FAIL %s" % e)
            failures += 1
    print("%d documents, %d failed" % (len(seen), failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
