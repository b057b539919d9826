#!/usr/bin/env bash
# meshbox on a local kind cluster, in one command.
#
#   deploy/kind.sh         create (or reuse) the cluster, build and load the
#                          images, install meshbox, run a sample in the mesh
#                          and prove it works: L4 (mutual TLS, a DENY
#                          policy), then L7 through a waypoint the control
#                          plane deploys (GET allowed and POST refused by one
#                          policy, a 90/10 HTTPRoute split); safe to run again
#   deploy/kind.sh down    remove what it installed (see below)
#
# Needs docker (running), kind and kubectl (1.24 or later); curl and openssl
# for the certificate step. The nodes pull the sample's images and the
# script applies Gateway API's CRDs from GitHub, so internet access too.
#
# Environment:
#   CLUSTER_NAME         kind cluster to create or reuse (default: meshbox)
#   KIND_NODE_IMAGE      node image for a new cluster (default: kind's own;
#                        Kubernetes 1.30 or later is needed)
#   GATEWAY_API_VERSION  Gateway API release installed when its CRDs are
#                        absent (default: v1.4.0)
#   REST_PORT            local port for the REST API port-forward
#                        (default: 15014)
#
# `down`: a cluster this script created is deleted. In a cluster it reused,
# only what it added is removed: the sample namespace, meshbox-system and
# meshbox's cluster-wide objects, and the AuthorizationPolicy and Gateway
# API CRDs only if they were absent before (it notes what it added in
# ConfigMap kube-system/meshbox-kind-sh). The dataplane pods take the CNI
# plugin out of each node's configuration as they stop; for kind nodes
# the script checks that they did.

set -euo pipefail

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$DEPLOY/.." && pwd)
readonly DEPLOY REPO
readonly CLUSTER=${CLUSTER_NAME:-meshbox}
readonly CONTEXT=kind-$CLUSTER
readonly GATEWAY_API_VERSION=${GATEWAY_API_VERSION:-v1.4.0}
readonly GATEWAY_API_URL=https://github.com/kubernetes-sigs/gateway-api/releases/download/$GATEWAY_API_VERSION/standard-install.yaml
readonly REST_PORT=${REST_PORT:-15014}
readonly SYSTEM_NS=meshbox-system
readonly DEMO_NS=meshbox-demo
readonly MARKER=meshbox-kind-sh
readonly CP_IMAGE=meshbox/controlplane:dev
readonly DP_IMAGE=meshbox/dataplane:dev
readonly WP_IMAGE=meshbox/waypoint:dev
readonly WAYPOINT=waypoint
readonly USE_WAYPOINT=istio.io/use-waypoint
# controllerName of the HTTPRoute status entries the control plane writes.
readonly ROUTE_CONTROLLER=meshbox.io/mesh-controller
# The L7 samples, removed again before the L4 steps of a rerun.
readonly L7_SAMPLES=(split-route.yaml split-backends.yaml get-only.yaml waypoint.yaml)
# The weighted split's check: requests sent, and the share of server-v2
# (10% configured) accepted, in requests: 3% to 20%, over 3.5 standard
# deviations of a binomial(200, 0.1) either side.
readonly SPLIT_REQUESTS=200 SPLIT_V2_MIN=6 SPLIT_V2_MAX=40
readonly CLIENT_ID=spiffe://cluster.local/ns/$DEMO_NS/sa/client
readonly SERVER_ID=spiffe://cluster.local/ns/$DEMO_NS/sa/server
readonly TOTAL_STEPS=12

WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshbox-kind.XXXXXX")
readonly WORK
KEEP_WORK=0
PORT_FORWARD_PID=
STEP=0

# ---------------------------------------------------------------------------
# Output

if [[ -t 1 ]]; then
	BOLD=$'\e[1m' GREEN=$'\e[32m' RED=$'\e[31m' DIM=$'\e[2m' RESET=$'\e[0m'
else
	BOLD='' GREEN='' RED='' DIM='' RESET=''
fi

step() {
	STEP=$((STEP + 1))
	printf '\n%s==> [%d/%d] %s%s\n' "$BOLD" "$STEP" "$TOTAL_STEPS" "$*" "$RESET"
}
say() { printf '    %s\n' "$*"; }
ok() { printf '    %sok%s %s\n' "$GREEN" "$RESET" "$*"; }
cmd_line() { printf '    %s$ %s%s\n' "$DIM" "$*" "$RESET"; }
indent() { sed 's/^/      /'; }

# die MESSAGE [LOG]: the reason, the end of LOG if given, and where the
# logs are.
die() {
	printf '\n%serror:%s %s\n' "$RED" "$RESET" "$1" >&2
	if [[ $# -ge 2 && -s $2 ]]; then
		printf '  last lines of %s:\n' "$2" >&2
		tail -n 30 "$2" | sed 's/^/    /' >&2
	fi
	KEEP_WORK=1
	printf '  logs of this run: %s\n' "$WORK" >&2
	exit 1
}

# run_logged LOG WHAT COMMAND...: runs COMMAND with its output in LOG,
# showing the elapsed time on a terminal; dies with the log's end on failure.
run_logged() {
	local log=$1 what=$2
	shift 2
	local start=$SECONDS pid
	"$@" >"$log" 2>&1 &
	pid=$!
	if [[ -t 1 ]]; then
		while kill -0 "$pid" 2>/dev/null; do
			printf '\r    %s ... %ds ' "$what" "$((SECONDS - start))"
			sleep 1
		done
		printf '\r\e[K'
	fi
	if wait "$pid"; then
		ok "$what ($((SECONDS - start))s)"
	else
		die "$what failed" "$log"
	fi
}

cleanup() {
	if [[ -n $PORT_FORWARD_PID ]]; then
		kill "$PORT_FORWARD_PID" 2>/dev/null || true
		wait "$PORT_FORWARD_PID" 2>/dev/null || true
	fi
	if [[ $KEEP_WORK == 0 ]]; then
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'KEEP_WORK=1; exit 130' INT TERM

k() { kubectl --context "$CONTEXT" "$@"; }

# kubectl apply/delete -k print kustomize's notice that the overlay uses
# `bases` and `patchesStrategicMerge` (kept for kustomize v2, see
# deploy/kind/kustomization.yaml).
quiet_kustomize() {
	grep -v -e "Warning: 'bases' is deprecated" -e "Warning: 'patchesStrategicMerge' is deprecated" || true
}

now_utc() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# wait_until SECONDS COMMAND...: retries COMMAND every 2 s until it succeeds.
wait_until() {
	local deadline=$((SECONDS + $1))
	shift
	until "$@"; do
		((SECONDS < deadline)) || return 1
		sleep 2
	done
}

# ---------------------------------------------------------------------------
# Prerequisites

# check_prerequisites [up]: docker, kind and kubectl; curl and openssl too
# for `up`.
check_prerequisites() {
	local missing=()
	if ! command -v docker >/dev/null 2>&1; then
		missing+=("docker is not installed: https://docs.docker.com/engine/install/")
	elif ! docker info >/dev/null 2>&1; then
		missing+=("docker is installed but its daemon does not answer ('docker info' failed): start it, or add your user to the docker group and log in again")
	fi
	command -v kind >/dev/null 2>&1 ||
		missing+=("kind is not installed: https://kind.sigs.k8s.io/docs/user/quick-start/#installation (e.g. 'go install sigs.k8s.io/kind@latest')")
	if ! command -v kubectl >/dev/null 2>&1; then
		missing+=("kubectl is not installed: https://kubernetes.io/docs/tasks/tools/#kubectl")
	else
		local minor
		minor=$(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -n 1)
		if [[ -n $minor ]] && ((minor < 24)); then
			missing+=("kubectl 1.$minor is too old: 1.24 or later is needed (for 'kubectl create token'): https://kubernetes.io/docs/tasks/tools/#kubectl")
		fi
	fi
	if [[ ${1:-} == up ]]; then
		command -v curl >/dev/null 2>&1 || missing+=("curl is not installed (e.g. 'sudo apt-get install curl')")
		command -v openssl >/dev/null 2>&1 || missing+=("openssl is not installed (e.g. 'sudo apt-get install openssl')")
	fi
	if ((${#missing[@]})); then
		printf '%serror:%s missing prerequisites:\n' "$RED" "$RESET" >&2
		printf '  - %s\n' "${missing[@]}" >&2
		exit 1
	fi
}

cluster_exists() { kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; }

# ---------------------------------------------------------------------------
# What this script added to a cluster (so `down` removes only that)

marker_get() {
	k -n kube-system get configmap "$MARKER" -o "jsonpath={.data.$1}" 2>/dev/null || true
}

marker_set() {
	if ! k -n kube-system get configmap "$MARKER" >/dev/null 2>&1; then
		k -n kube-system create configmap "$MARKER" >/dev/null
	fi
	k -n kube-system patch configmap "$MARKER" --type merge \
		-p "{\"data\":{\"$1\":\"$2\"}}" >/dev/null
}

# ---------------------------------------------------------------------------
# The CNI plugin on the kind nodes (the node containers, through docker)

node_has_plugin() {
	docker exec "$1" sh -c 'cat /etc/cni/net.d/*.conflist 2>/dev/null' | grep -q '"meshbox-cni"'
}

# The kind nodes whose CNI configuration names meshbox-cni (or not).
nodes_with_plugin() {
	local node
	for node in $(kind get nodes --name "$CLUSTER" 2>/dev/null); do
		if node_has_plugin "$node"; then echo "$node"; fi
	done
}

nodes_without_plugin() {
	local node
	for node in $(kind get nodes --name "$CLUSTER" 2>/dev/null); do
		if ! node_has_plugin "$node"; then echo "$node"; fi
	done
}

plugin_on_every_node() { [[ -z $(nodes_without_plugin) ]]; }
plugin_removed_from_nodes() { [[ -z $(nodes_with_plugin) ]]; }

# ---------------------------------------------------------------------------
# up

cluster_up() {
	step "Kind cluster '$CLUSTER'"
	if cluster_exists; then
		kind export kubeconfig --name "$CLUSTER" >/dev/null 2>&1 ||
			die "cannot get the kubeconfig of kind cluster $CLUSTER"
		if [[ $(marker_get createdCluster) == true ]]; then
			ok "reusing the cluster an earlier run created (context $CONTEXT)"
		else
			ok "reusing existing cluster (context $CONTEXT); 'down' will remove only what this script adds"
		fi
	else
		local args=(create cluster --name "$CLUSTER" --config "$DEPLOY/kind/cluster.yaml" --wait 180s)
		if [[ -n ${KIND_NODE_IMAGE:-} ]]; then
			args+=(--image "$KIND_NODE_IMAGE")
		fi
		cmd_line "kind ${args[*]}"
		run_logged "$WORK/kind-create.log" "creating the cluster (one control plane, two workers)" kind "${args[@]}"
		marker_set createdCluster true
	fi
	local version minor
	version=$(k get --raw /version) || die "the API server of $CLUSTER does not answer"
	minor=$(sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' <<<"$version" | head -n 1)
	if [[ -z $minor ]] || ((minor < 30)); then
		die "Kubernetes 1.${minor:-?} is too old: meshbox needs 1.30 or later (pod-bound tokens that name their node). Create the cluster with a newer node image: KIND_NODE_IMAGE=kindest/node:v1.31.0 $0 (after '$0 down')"
	fi
	local nodes workers
	nodes=$(k get nodes --no-headers 2>/dev/null | wc -l)
	workers=$(k get nodes --no-headers -l '!node-role.kubernetes.io/control-plane' 2>/dev/null | wc -l)
	ok "Kubernetes 1.$minor, $nodes nodes ($workers workers)"
	if ((workers < 2)); then
		say "fewer than two workers: the sample's client and server may share a node"
	fi
}

build_images() {
	step "Building the images (deploy/Dockerfile)"
	say "the first build compiles the workspace in release mode: several minutes"
	local target image
	for target in controlplane dataplane waypoint; do
		image=meshbox/$target:dev
		cmd_line "docker build -f deploy/Dockerfile --target $target -t $image ."
		run_logged "$WORK/build-$target.log" "building $image" \
			env DOCKER_BUILDKIT=1 docker build -f "$DEPLOY/Dockerfile" --target "$target" -t "$image" "$REPO"
	done
}

load_images() {
	step "Loading the images into the nodes"
	cmd_line "kind load docker-image --name $CLUSTER $CP_IMAGE $DP_IMAGE $WP_IMAGE"
	run_logged "$WORK/kind-load.log" "kind load" kind load docker-image --name "$CLUSTER" "$CP_IMAGE" "$DP_IMAGE" "$WP_IMAGE"
}

gateway_api() {
	step "Gateway API CRDs"
	# Gateway (waypoints) and HTTPRoute (the split) are both in the
	# standard channel.
	if k get crd gateways.gateway.networking.k8s.io httproutes.gateway.networking.k8s.io >/dev/null 2>&1; then
		ok "already installed"
		return
	fi
	cmd_line "kubectl apply --server-side -f $GATEWAY_API_URL"
	run_logged "$WORK/gateway-api.log" "installing Gateway API $GATEWAY_API_VERSION (standard channel)" \
		kubectl --context "$CONTEXT" apply --server-side -f "$GATEWAY_API_URL"
	marker_set installedGatewayApi true
}

# Shows why the mesh's pods are not ready.
diagnose() {
	{
		echo "--- pods"
		k -n "$1" get pods -o wide
		echo "--- events"
		k -n "$1" get events --sort-by=.lastTimestamp | tail -n 25
		local pod
		for pod in $(k -n "$1" get pods -o name); do
			echo "--- logs of $pod"
			k -n "$1" logs "$pod" --all-containers --tail=20 --prefix 2>&1 || true
		done
	} >"$WORK/diagnose-$1.log" 2>&1
	sed 's/^/      /' "$WORK/diagnose-$1.log" | tail -n 80 >&2
}

# restart_if_rebuilt KEY IMAGE WORKLOAD: the images keep their tag (dev)
# from build to build, so a new build does not change the pod templates;
# restart WORKLOAD when IMAGE differs from the one the last run deployed
# (noted under KEY in the marker).
restart_if_rebuilt() {
	local id last
	id=$(docker image inspect -f '{{.Id}}' "$2" | sed 's/^sha256://' | cut -c1-16)
	last=$(marker_get "$1")
	if [[ -n $last && $last != "$id" ]]; then
		k -n "$SYSTEM_NS" rollout restart "$3" | indent
	fi
	marker_set "$1" "$id"
}

install_meshbox() {
	step "Installing meshbox (kubectl apply -k deploy/kind)"
	if ! k get crd authorizationpolicies.security.istio.io >/dev/null 2>&1; then
		marker_set installedAuthzCrd true
	fi
	cmd_line "kubectl apply -k deploy/kind"
	k apply -k "$DEPLOY/kind" >"$WORK/apply.log" 2>&1 ||
		die "kubectl apply -k deploy/kind failed" "$WORK/apply.log"
	quiet_kustomize <"$WORK/apply.log" | indent
	restart_if_rebuilt imageControlplane "$CP_IMAGE" deployment/meshbox-controlplane
	restart_if_rebuilt imageDataplane "$DP_IMAGE" daemonset/meshbox-dataplane

	say "waiting for the control plane, then a dataplane on every node"
	cmd_line "kubectl -n $SYSTEM_NS rollout status deployment/meshbox-controlplane"
	if ! k -n "$SYSTEM_NS" rollout status deployment/meshbox-controlplane --timeout=300s >"$WORK/rollout-cp.log" 2>&1; then
		diagnose "$SYSTEM_NS"
		die "the control plane did not become ready" "$WORK/rollout-cp.log"
	fi
	ok "control plane ready"
	cmd_line "kubectl -n $SYSTEM_NS rollout status daemonset/meshbox-dataplane"
	if ! k -n "$SYSTEM_NS" rollout status daemonset/meshbox-dataplane --timeout=300s >"$WORK/rollout-dp.log" 2>&1; then
		diagnose "$SYSTEM_NS"
		die "the dataplanes did not become ready" "$WORK/rollout-dp.log"
	fi
	ok "dataplanes ready"
	wait_until 30 plugin_on_every_node ||
		die "meshbox-cni is missing from the CNI configuration of: $(nodes_without_plugin | paste -sd ' ' -) (see: kubectl -n $SYSTEM_NS logs ds/meshbox-dataplane -c cni)"
	ok "meshbox-cni chained into every node's CNI configuration (checked on the node containers)"
	k -n "$SYSTEM_NS" get pods -o wide | indent
}

deploy_sample() {
	step "Sample app in namespace $DEMO_NS (istio.io/dataplane-mode=ambient)"
	# A policy, waypoint or route left by an earlier run would change the
	# first proofs (through a waypoint, the server sees the waypoint's
	# identity, not the client's). Deleting the Gateway also lets its
	# waypoint come back with a freshly loaded image.
	k delete -f "$DEPLOY/samples/deny-client.yaml" --ignore-not-found >/dev/null 2>&1 || true
	local f
	for f in "${L7_SAMPLES[@]}"; do
		k delete -f "$DEPLOY/samples/$f" --ignore-not-found --wait=true >/dev/null 2>&1 || true
	done
	k -n "$DEMO_NS" wait --for=delete "deployment/$WAYPOINT" --timeout=60s >/dev/null 2>&1 || true
	k -n "$DEMO_NS" label service server "$USE_WAYPOINT-" >/dev/null 2>&1 || true
	cmd_line "kubectl apply -f deploy/samples/demo.yaml"
	k apply -f "$DEPLOY/samples/demo.yaml" >"$WORK/apply-sample.log" 2>&1 ||
		die "kubectl apply -f deploy/samples/demo.yaml failed" "$WORK/apply-sample.log"
	indent <"$WORK/apply-sample.log"
	local d
	for d in server client; do
		if ! k -n "$DEMO_NS" rollout status "deployment/$d" --timeout=300s >"$WORK/rollout-$d.log" 2>&1; then
			diagnose "$DEMO_NS"
			die "the sample's $d did not become ready (its image is pulled from the internet)" "$WORK/rollout-$d.log"
		fi
	done
	ok "client and server running"
	k -n "$DEMO_NS" get pods -o wide | indent
}

# dataplane_logs SINCE: every dataplane's log since SINCE, one pod per line
# prefix.
dataplane_logs() {
	k -n "$SYSTEM_NS" logs -l app.kubernetes.io/name=meshbox-dataplane -c dataplane \
		--since-time="$1" --tail=-1 --prefix --max-log-requests=20 2>/dev/null || true
}

# The access-log fields worth showing, from one log line: the pod, then a
# field per line.
fields() {
	local line=$1 pod
	pod=$(sed -n 's/^\[pod\/\([^/]*\)\/.*/\1/p' <<<"$line")
	printf '%s:\n' "${pod:-dataplane}"
	grep -oE '(direction|src\.addr|src\.identity|dst\.addr|dst\.hbone_addr|dst\.identity|reason)=("[^"]*"|[^ ]*)' <<<"$line" | sed 's/^/  /'
}

# with_field NAME VALUE: the lines of stdin where field NAME is VALUE
# (tracing quotes string fields, not displayed ones: both forms).
with_field() {
	grep -F -e "$1=\"$2\"" -e "$1=$2 " || true
}

request() {
	k -n "$DEMO_NS" exec deploy/client -c client -- curl -sS --max-time 5 "http://server/$1" 2>&1
}

# Both dataplanes logged the request: the client's outbound and the
# server's inbound line, each with both identities.
request_logged() {
	dataplane_logs "$1" >"$WORK/request.log"
	local dir
	for dir in outbound inbound; do
		[[ -n $(access_lines "$dir") ]] || return 1
	done
}

# access_lines DIRECTION: the request's access-log lines of that direction.
access_lines() {
	grep 'connection complete' "$WORK/request.log" | with_field direction "$1" |
		with_field src.identity "$CLIENT_ID" | with_field dst.identity "$SERVER_ID"
}

prove_request() {
	step "A request from client to server, through both dataplanes (HBONE)"
	local client_node server_node client_ip since answer=''
	client_node=$(k -n "$DEMO_NS" get pod -l app=client -o jsonpath='{.items[0].spec.nodeName}')
	server_node=$(k -n "$DEMO_NS" get pod -l app=server -o jsonpath='{.items[0].spec.nodeName}')
	client_ip=$(k -n "$DEMO_NS" get pod -l app=client -o jsonpath='{.items[0].status.podIP}')
	say "client runs on $client_node, server on $server_node"
	cmd_line "kubectl -n $DEMO_NS exec deploy/client -- curl -s http://server/hostname"
	since=$(now_utc)
	# A pod created in a namespace with no enrolled pod yet is captured
	# once the control plane reports it (seconds): retry until both
	# dataplanes log the request.
	local deadline=$((SECONDS + 120))
	until answer=$(request hostname) && request_logged "$since"; do
		((SECONDS < deadline)) ||
			die "no request between client and server showed in both dataplanes' access logs within 120 s (last answer: ${answer:-none})" "$WORK/request.log"
		sleep 3
	done
	say "server answered: $answer"
	say "the dataplanes' access logs (\"connection complete\", abridged):"
	local dir line
	for dir in outbound inbound; do
		line=$(access_lines "$dir" | tail -n 1)
		fields "$line" | indent
	done
	ok "mutual TLS between $CLIENT_ID and $SERVER_ID, each side checked against the control plane's CA"
	if answer=$(request clientip); then
		say "the server saw the connection come from ${answer%:*} (the client pod's IP is $client_ip)"
	fi
}

denied() { ! request hostname >/dev/null; }
allowed() { request hostname >/dev/null; }

denial_lines() {
	grep 'denied by authorization policy' "$WORK/deny.log" | with_field src.identity "$CLIENT_ID"
}

policy_denial_logged() {
	dataplane_logs "$1" >"$WORK/deny.log"
	[[ -n $(denial_lines) ]]
}

prove_policy() {
	step "An AuthorizationPolicy: the server refuses the client"
	sed -n '/^apiVersion/,$p' "$DEPLOY/samples/deny-client.yaml" | indent
	local since start
	since=$(now_utc)
	start=$SECONDS
	cmd_line "kubectl apply -f deploy/samples/deny-client.yaml"
	k apply -f "$DEPLOY/samples/deny-client.yaml" >"$WORK/apply-policy.log" 2>&1 ||
		die "kubectl apply -f deploy/samples/deny-client.yaml failed" "$WORK/apply-policy.log"
	indent <"$WORK/apply-policy.log"
	wait_until 60 denied || die "the request still passes 60 s after the policy was applied"
	ok "the request is refused ($((SECONDS - start)) s after kubectl apply)"
	say "$(request hostname | head -n 1)"
	wait_until 30 policy_denial_logged "$since" ||
		die "the server's dataplane logged no denial for the client" "$WORK/deny.log"
	say "the server's dataplane: \"connection denied by authorization policy\":"
	fields "$(denial_lines | tail -n 1)" | indent
	cmd_line "kubectl delete -f deploy/samples/deny-client.yaml"
	k delete -f "$DEPLOY/samples/deny-client.yaml" 2>&1 | indent
	wait_until 60 allowed || die "the request is still refused 60 s after the policy was deleted"
	ok "policy deleted: the request passes again"
}

rest_up() {
	curl -fsS --max-time 2 --cacert "$WORK/root-cert.pem" "https://localhost:$REST_PORT/healthz" >/dev/null 2>&1
}

prove_certificate() {
	step "A SPIFFE certificate from the REST API, with curl"
	local id=$CLIENT_ID
	cmd_line "kubectl -n $DEMO_NS get configmap istio-ca-root-cert -o jsonpath='{.data.root-cert\\.pem}' > root-cert.pem"
	k -n "$DEMO_NS" get configmap istio-ca-root-cert -o 'jsonpath={.data.root-cert\.pem}' >"$WORK/root-cert.pem"
	[[ -s $WORK/root-cert.pem ]] || die "ConfigMap $DEMO_NS/istio-ca-root-cert has no root-cert.pem"
	cmd_line "kubectl -n $SYSTEM_NS port-forward svc/meshbox-controlplane $REST_PORT:15014 &"
	k -n "$SYSTEM_NS" port-forward svc/meshbox-controlplane "$REST_PORT:15014" >"$WORK/port-forward.log" 2>&1 &
	PORT_FORWARD_PID=$!
	wait_until 20 rest_up ||
		die "the REST API is not reachable through the port-forward on localhost:$REST_PORT (another process on that port? set REST_PORT)" "$WORK/port-forward.log"
	cmd_line "TOKEN=\$(kubectl -n $DEMO_NS create token client --audience istio-ca --duration 10m)"
	local token
	token=$(k -n "$DEMO_NS" create token client --audience istio-ca --duration 10m) ||
		die "kubectl create token failed"
	cmd_line "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj / -keyout client.key -out client.csr -addext subjectAltName=URI:$id"
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj / \
		-keyout "$WORK/client.key" -out "$WORK/client.csr" \
		-addext "subjectAltName=URI:$id" >"$WORK/openssl.log" 2>&1 || die "openssl req failed" "$WORK/openssl.log"
	cmd_line "curl --cacert root-cert.pem -H \"Authorization: Bearer \$TOKEN\" --data-binary @client.csr 'https://localhost:$REST_PORT/api/v1/certificates?ttl=3600s' > client-chain.pem"
	local status
	status=$(curl -sS --cacert "$WORK/root-cert.pem" -o "$WORK/client-chain.pem" -w '%{http_code}' \
		-H "Authorization: Bearer $token" --data-binary "@$WORK/client.csr" \
		"https://localhost:$REST_PORT/api/v1/certificates?ttl=3600s" 2>"$WORK/curl.log") || true
	[[ $status == 200 ]] ||
		die "POST /api/v1/certificates answered ${status:-nothing}: $(head -c 300 "$WORK/client-chain.pem" 2>/dev/null)" "$WORK/curl.log"
	cmd_line "openssl verify -CAfile root-cert.pem client-chain.pem"
	openssl verify -CAfile "$WORK/root-cert.pem" "$WORK/client-chain.pem" 2>&1 | sed "s|$WORK/||" | indent
	openssl verify -CAfile "$WORK/root-cert.pem" "$WORK/client-chain.pem" >/dev/null 2>&1 ||
		die "the issued chain does not verify against the root"
	openssl x509 -in "$WORK/client-chain.pem" -noout -ext subjectAltName -enddate 2>/dev/null | indent
	openssl x509 -in "$WORK/client-chain.pem" -noout -ext subjectAltName 2>/dev/null | grep -q "URI:$id" ||
		die "the certificate does not carry $id"
	ok "a certificate for $id, issued for the client's service-account token"
}

# apply_sample FILE: shows FILE's objects and applies it.
apply_sample() {
	sed -n '/^apiVersion/,$p' "$DEPLOY/samples/$1" | indent
	cmd_line "kubectl apply -f deploy/samples/$1"
	k apply -f "$DEPLOY/samples/$1" >"$WORK/apply-$1.log" 2>&1 ||
		die "kubectl apply -f deploy/samples/$1 failed" "$WORK/apply-$1.log"
	indent <"$WORK/apply-$1.log"
}

# The waypoint controller's log lines, for a failure report.
controlplane_waypoint_log() {
	k -n "$SYSTEM_NS" logs deployment/meshbox-controlplane --tail=-1 2>/dev/null |
		grep -i waypoint | tail -n 20 >"$WORK/controlplane-waypoint.log" || true
}

prove_waypoint() {
	step "A waypoint: a Gateway of class istio-waypoint, deployed by the control plane"
	apply_sample waypoint.yaml
	cmd_line "kubectl -n $DEMO_NS wait --for=condition=Programmed gateway/$WAYPOINT"
	if ! k -n "$DEMO_NS" wait --for=condition=Programmed "gateway/$WAYPOINT" --timeout=180s >"$WORK/wait-waypoint.log" 2>&1; then
		diagnose "$DEMO_NS"
		controlplane_waypoint_log
		die "the Gateway was not Programmed within 180 s (the control plane's waypoint lines are in $WORK/controlplane-waypoint.log)" "$WORK/wait-waypoint.log"
	fi
	k -n "$DEMO_NS" get gateway "$WAYPOINT" | indent
	cmd_line "kubectl -n $DEMO_NS get deployment,service,serviceaccount -l gateway.networking.k8s.io/gateway-name=$WAYPOINT"
	k -n "$DEMO_NS" get deployment,service,serviceaccount -l "gateway.networking.k8s.io/gateway-name=$WAYPOINT" | indent
	local kind owner address cluster_ip
	for kind in deployment service serviceaccount; do
		owner=$(k -n "$DEMO_NS" get "$kind" "$WAYPOINT" \
			-o 'jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}/{.metadata.ownerReferences[0].controller}')
		[[ $owner == "Gateway/$WAYPOINT/true" ]] ||
			die "$kind/$WAYPOINT is not controlled by Gateway $WAYPOINT (owner: ${owner:-none}), so it would not go with it"
	done
	address=$(k -n "$DEMO_NS" get gateway "$WAYPOINT" -o 'jsonpath={.status.addresses[0].value}')
	cluster_ip=$(k -n "$DEMO_NS" get service "$WAYPOINT" -o 'jsonpath={.spec.clusterIP}')
	[[ -n $address && $address == "$cluster_ip" ]] ||
		die "the Gateway's status address (${address:-none}) is not its Service's cluster IP ($cluster_ip)"
	ok "Deployment, Service and ServiceAccount $WAYPOINT, owned by the Gateway; Programmed, at $address:15008"
}

# http_code METHOD: the status code of METHOD http://server/hostname from
# the client.
http_code() {
	k -n "$DEMO_NS" exec deploy/client -c client -- \
		curl -sS -o /dev/null -w '%{http_code}' --max-time 5 -X "$1" http://server/hostname 2>/dev/null || true
}

post_refused() { [[ $(http_code POST) == 403 ]]; }

prove_l7_policy() {
	step "L7 authorization at the waypoint: GET allowed, POST refused (403)"
	cmd_line "kubectl -n $DEMO_NS label service server $USE_WAYPOINT=$WAYPOINT"
	k -n "$DEMO_NS" label --overwrite service server "$USE_WAYPOINT=$WAYPOINT" 2>&1 | indent
	apply_sample get-only.yaml
	local start=$SECONDS body code
	if ! wait_until 120 post_refused; then
		diagnose "$DEMO_NS"
		die "a POST to server is still not refused with 403 120 s after the policy was applied (last answer: $(http_code POST))"
	fi
	ok "POST refused ($((SECONDS - start)) s after kubectl apply)"
	cmd_line "kubectl -n $DEMO_NS exec deploy/client -- curl -s -X POST http://server/hostname"
	body=$(k -n "$DEMO_NS" exec deploy/client -c client -- curl -sS --max-time 5 -X POST http://server/hostname 2>&1 || true)
	say "$body"
	[[ $body == "RBAC: access denied" ]] ||
		die "the refusal's body is '$body', not 'RBAC: access denied'"
	cmd_line "kubectl -n $DEMO_NS exec deploy/client -- curl -s -w ' %{http_code}' http://server/hostname"
	code=$(http_code GET)
	[[ $code == 200 ]] || die "a GET to server answered ${code:-nothing}, not 200"
	say "$(request hostname) 200"
	ok "GET allowed, POST answered 403 'RBAC: access denied': one AuthorizationPolicy (targetRefs: Service server), enforced by the waypoint"
	local log
	log=$(k -n "$DEMO_NS" logs "deployment/$WAYPOINT" --tail=200 2>/dev/null | grep -F 403 | tail -n 1 || true)
	if [[ -n $log ]]; then
		say "the waypoint's access log:"
		indent <<<"$log"
	fi
}

# The answers of SPLIT_REQUESTS GETs to server, one per line (the pod name
# of the backend that answered), from one exec in the client.
split_answers() {
	k -n "$DEMO_NS" exec deploy/client -c client -- sh -c \
		"for i in \$(seq $SPLIT_REQUESTS); do curl -sS --max-time 5 http://server/hostname; echo; done" 2>/dev/null
}

route_in_effect() { [[ $(request hostname) == server-v[12]-* ]]; }

# The conditions of meshbox's entry in the split route's status, as
# "Type=Status " each.
route_conditions() {
	k -n "$DEMO_NS" get httproute server-split \
		-o "jsonpath={range .status.parents[?(@.controllerName==\"$ROUTE_CONTROLLER\")].conditions[*]}{.type}={.status} {end}" 2>/dev/null
}

route_status_true() {
	local conditions
	conditions=$(route_conditions)
	[[ $conditions == *Accepted=True* && $conditions == *ResolvedRefs=True* && $conditions == *ResolvedWaypoints=True* ]]
}

prove_split() {
	step "A weighted split at the waypoint: HTTPRoute 90/10 between server-v1 and server-v2"
	cmd_line "kubectl apply -f deploy/samples/split-backends.yaml"
	k apply -f "$DEPLOY/samples/split-backends.yaml" >"$WORK/apply-split-backends.log" 2>&1 ||
		die "kubectl apply -f deploy/samples/split-backends.yaml failed" "$WORK/apply-split-backends.log"
	local d
	for d in server-v1 server-v2; do
		if ! k -n "$DEMO_NS" rollout status "deployment/$d" --timeout=300s >"$WORK/rollout-$d.log" 2>&1; then
			diagnose "$DEMO_NS"
			die "the sample's $d did not become ready" "$WORK/rollout-$d.log"
		fi
	done
	ok "server-v1 and server-v2 running"
	apply_sample split-route.yaml
	wait_until 120 route_in_effect ||
		die "120 s after the HTTPRoute was applied, server still answers from its own pod ($(request hostname))"
	cmd_line "kubectl -n $DEMO_NS exec deploy/client -- sh -c 'for i in \$(seq $SPLIT_REQUESTS); do curl -s http://server/hostname; echo; done'"
	split_answers >"$WORK/split.txt"
	local v1 v2 other
	v1=$(grep -c '^server-v1-' "$WORK/split.txt" || true)
	v2=$(grep -c '^server-v2-' "$WORK/split.txt" || true)
	other=$((SPLIT_REQUESTS - v1 - v2))
	say "$SPLIT_REQUESTS requests: server-v1 answered $v1, server-v2 $v2, anything else $other"
	((other == 0)) ||
		die "$other of $SPLIT_REQUESTS requests were not answered by server-v1 or server-v2" "$WORK/split.txt"
	((v2 >= SPLIT_V2_MIN && v2 <= SPLIT_V2_MAX)) ||
		die "server-v2 answered $v2 of $SPLIT_REQUESTS, outside $SPLIT_V2_MIN..$SPLIT_V2_MAX for a 10% weight"
	ok "split $((v1 * 100 / SPLIT_REQUESTS))/$((v2 * 100 / SPLIT_REQUESTS)) for weights 90/10"
	cmd_line "kubectl -n $DEMO_NS get httproute server-split -o yaml   # status.parents, controllerName $ROUTE_CONTROLLER"
	wait_until 60 route_status_true ||
		die "the HTTPRoute's status (controllerName $ROUTE_CONTROLLER) says '$(route_conditions)', not Accepted, ResolvedRefs and ResolvedWaypoints True"
	ok "the route's status, written by the control plane: $(route_conditions)"
}

summary() {
	printf '\n%s==> Done: meshbox runs on kind cluster %s%s\n' "$BOLD" "$CLUSTER" "$RESET"
	cat <<EOF | indent
Where to look next:
  kubectl --context $CONTEXT -n $SYSTEM_NS logs ds/meshbox-dataplane -c dataplane -f   # access logs of one node
  kubectl --context $CONTEXT -n $SYSTEM_NS port-forward svc/meshbox-controlplane $REST_PORT:15014
  kubectl --context $CONTEXT -n $DEMO_NS get configmap istio-ca-root-cert -o jsonpath='{.data.root-cert\.pem}' > root-cert.pem
  TOKEN=\$(kubectl --context $CONTEXT -n $DEMO_NS create token client --audience istio-ca --duration 10m)   # reads need a token in Kubernetes mode
  curl --cacert root-cert.pem -H "Authorization: Bearer \$TOKEN" https://localhost:$REST_PORT/api/v1/workloads?namespace=$DEMO_NS
  curl --cacert root-cert.pem -H "Authorization: Bearer \$TOKEN" https://localhost:$REST_PORT/api/v1/dataplanes      # xDS streams, capture state
  kubectl --context $CONTEXT -n $DEMO_NS exec deploy/client -- curl -s http://server/hostname
  kubectl --context $CONTEXT -n $DEMO_NS get gateway $WAYPOINT                  # the waypoint: address, Programmed
  kubectl --context $CONTEXT -n $DEMO_NS logs deploy/$WAYPOINT -f              # its access log (L7)
  kubectl --context $CONTEXT -n $DEMO_NS get httproute server-split -o yaml     # the route's status: Accepted, ResolvedRefs, ResolvedWaypoints
Remove it all: $0 down
EOF
}

up() {
	check_prerequisites up
	cluster_up
	build_images
	load_images
	gateway_api
	install_meshbox
	deploy_sample
	prove_request
	prove_policy
	prove_certificate
	prove_waypoint
	prove_l7_policy
	prove_split
	summary
}

# ---------------------------------------------------------------------------
# down


down() {
	check_prerequisites
	STEP=0
	if ! cluster_exists; then
		echo "no kind cluster named '$CLUSTER': nothing to remove"
		return
	fi
	kind export kubeconfig --name "$CLUSTER" >/dev/null 2>&1 || true
	if [[ $(marker_get createdCluster) == true ]]; then
		printf '%s==> deleting kind cluster %s (created by this script)%s\n' "$BOLD" "$CLUSTER" "$RESET"
		kind delete cluster --name "$CLUSTER"
		return
	fi
	printf '%s==> removing meshbox from kind cluster %s (not created by this script, so it stays)%s\n' "$BOLD" "$CLUSTER" "$RESET"
	local gateway_api authz_crd
	gateway_api=$(marker_get installedGatewayApi)
	authz_crd=$(marker_get installedAuthzCrd)
	# The sample first, while its dataplanes still answer the CNI plugin's DEL.
	k delete namespace "$DEMO_NS" --ignore-not-found --wait=true | indent
	# Namespace-scoped objects and meshbox's cluster-wide RBAC; the
	# dataplane pods remove meshbox-cni from each node as they stop.
	k delete namespace "$SYSTEM_NS" --ignore-not-found --wait=true | indent
	k delete clusterrolebinding meshbox-controlplane --ignore-not-found | indent
	k delete clusterrole meshbox-controlplane --ignore-not-found | indent
	if [[ $authz_crd == true ]]; then
		k delete crd authorizationpolicies.security.istio.io --ignore-not-found | indent
	fi
	if [[ $gateway_api == true ]]; then
		local crds
		crds=$(k get crd -o name | grep '\.gateway\.networking\.k8s\.io$' || true)
		if [[ -n $crds ]]; then
			# shellcheck disable=SC2086 # one argument per CRD
			k delete $crds --ignore-not-found | indent
		fi
	fi
	k -n kube-system delete configmap "$MARKER" --ignore-not-found >/dev/null
	if wait_until 30 plugin_removed_from_nodes; then
		ok "meshbox-cni is out of every node's CNI configuration"
		return
	fi
	# A dataplane pod that did not stop gracefully (force-deleted, node
	# down) could not uninstall; the plugin binary is still on the node
	# then (it is removed last) and static, so it can do it there.
	local node
	for node in $(nodes_with_plugin); do
		say "$node: meshbox-cni still configured; uninstalling it on the node"
		docker exec "$node" /opt/cni/bin/meshbox-cni uninstall 2>&1 | indent ||
			die "could not remove meshbox-cni from $node's /etc/cni/net.d: new pods on it will fail until it is removed"
	done
	plugin_removed_from_nodes || die "a node's CNI configuration still names meshbox-cni"
	ok "meshbox-cni is out of every node's CNI configuration"
}

usage() {
	sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

case ${1:-up} in
up) up ;;
down) down ;;
-h | --help | help) usage ;;
*)
	usage >&2
	exit 2
	;;
esac
