#!/usr/bin/env bash
# Checks of the Kubernetes install that need no cluster (CI runs this):
#
#  1. kustomize renders deploy/base and deploy/kind (with the kubectl on
#     PATH; kustomize v2, as in Debian's kubernetes-client, and v5 both
#     work), and the kind overlay uses the images kind.sh builds;
#  2. deploy/validate.py: every built-in kind of both renders, of
#     deploy/samples and of deploy/rendered (what the control plane applies
#     for a waypoint Gateway, kept current by a controlplane test) against
#     the Kubernetes schemas of 1.30 (the oldest meshbox supports) and 1.34,
#     strictly; the AuthorizationPolicy and PeerAuthentication CRDs; every
#     AuthorizationPolicy and PeerAuthentication in deploy/samples and
#     examples/ against its CRD's schema; the Gateway API samples (Gateway,
#     HTTPRoute) against validate.py's own subset of their schema;
#  3. shellcheck on deploy/*.sh, examples/*.sh and .ci/run.
#
#   deploy/check.sh
#
# Needs kubectl, shellcheck and a python3 with the PyPI package
# kubernetes-validate (PYTHON=/path/to/venv/bin/python to pick one).

set -euo pipefail

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$DEPLOY/.." && pwd)
readonly DEPLOY REPO
readonly PYTHON=${PYTHON:-python3}
readonly KUBECTL=${KUBECTL:-kubectl}
readonly KUBERNETES_VERSIONS=(1.30.0 1.34.0)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshbox-check.XXXXXX")
readonly WORK
trap 'rm -rf "$WORK"' EXIT

fail() {
	echo "FAIL $*" >&2
	exit 1
}

missing=()
command -v "$KUBECTL" >/dev/null 2>&1 || missing+=("kubectl (Debian: apt-get install kubernetes-client)")
command -v shellcheck >/dev/null 2>&1 || missing+=("shellcheck (apt-get install shellcheck)")
if ! "$PYTHON" -c 'import kubernetes_validate' >/dev/null 2>&1; then
	missing+=("the Python package kubernetes-validate for $PYTHON (python3 -m venv V && V/bin/pip install kubernetes-validate==1.34.1, then PYTHON=V/bin/python)")
fi
if ((${#missing[@]})); then
	echo "deploy/check.sh needs:" >&2
	printf '  - %s\n' "${missing[@]}" >&2
	exit 1
fi

echo "==> kustomize ($("$KUBECTL" version --client 2>/dev/null | head -n 1))"
for overlay in base kind; do
	if ! "$KUBECTL" kustomize "$DEPLOY/$overlay" >"$WORK/$overlay.yaml" 2>"$WORK/$overlay.err"; then
		cat "$WORK/$overlay.err" >&2
		fail "kubectl kustomize deploy/$overlay"
	fi
	# kustomize v5 notes that the kind overlay uses `bases` and
	# `patchesStrategicMerge` (kept for v2); anything else on stderr is
	# worth reading.
	grep -v -e "Warning: 'bases' is deprecated" -e "Warning: 'patchesStrategicMerge' is deprecated" \
		"$WORK/$overlay.err" >&2 || true
	echo "ok   deploy/$overlay: $(grep -c '^kind:' "$WORK/$overlay.yaml") objects"
done
for image in meshbox/controlplane:dev meshbox/dataplane:dev; do
	grep -q "image: $image\$" "$WORK/kind.yaml" || fail "deploy/kind does not use $image (deploy/kind.sh builds and loads it)"
done
# The waypoint image is the value of the control plane's
# MESHBOX_WAYPOINT_IMAGE (it deploys the waypoints), the line after the name.
waypoint_image() { grep -A1 -- '- name: MESHBOX_WAYPOINT_IMAGE$' "$1" | sed -n 's/^ *value: //p'; }
[[ $(waypoint_image "$WORK/kind.yaml") == meshbox/waypoint:dev ]] ||
	fail "deploy/kind does not deploy waypoints with meshbox/waypoint:dev (deploy/kind.sh builds and loads it)"
if grep -E 'image: meshbox/[a-z]+:(dev|latest)$' "$WORK/base.yaml" ||
	[[ $(waypoint_image "$WORK/base.yaml") =~ :(dev|latest)$|^$ ]]; then
	fail "deploy/base uses a :dev or :latest image, or sets no waypoint image"
fi
echo "ok   deploy/kind runs the images kind.sh builds; deploy/base pins a version"

echo "==> schemas (kubernetes-validate $("$PYTHON" -c 'import kubernetes_validate.version as v; print(v.__version__)'))"
shopt -s nullglob
policies=("$REPO"/examples/*/policies.yaml "$REPO"/examples/*/policy/*.yaml)
versions=()
for v in "${KUBERNETES_VERSIONS[@]}"; do
	versions+=(--kubernetes-version "$v")
done
(cd "$REPO" && "$PYTHON" "$DEPLOY/validate.py" "${versions[@]}" \
	"$WORK/base.yaml" "$WORK/kind.yaml" "$DEPLOY"/samples/*.yaml "$DEPLOY"/rendered/*.yaml "${policies[@]}") |
	sed "s|$WORK/\([a-z]*\)\.yaml|deploy/\1 (rendered)|; s|$REPO/||g" || fail "schema validation"

echo "==> shellcheck"
scripts=("$DEPLOY"/*.sh "$REPO"/examples/*.sh "$REPO"/.ci/run)
shellcheck "${scripts[@]}" || fail "shellcheck"
for script in "${scripts[@]}"; do
	echo "ok   ${script#"$REPO"/}"
done

echo "==> all deploy checks passed"
