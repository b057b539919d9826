#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions run from traps and wait_until are reachable
# meshbox standalone demo: the whole mesh on one Linux machine, no Kubernetes.
#
# Two "nodes" and four "pods" are network namespaces; the control plane runs
# standalone on the manifests in examples/demo/; one node-mode dataplane per
# node captures its node's enrolled pods inside their own namespaces; small
# HTTP apps in the pods talk to each other as if there were no mesh. The
# script tells what happens, then removes everything it made.
#
#   sudo examples/demo.sh                 build (release) and run the story
#   sudo examples/demo.sh --keep          ... and leave it running until Ctrl-C
#   sudo examples/demo.sh --bin-dir DIR   use prebuilt controlplane + dataplane
#   sudo examples/demo.sh --no-install    never install missing packages
#
# On Debian and Ubuntu it installs the packages it lacks with apt-get,
# saying which and why first. Everything it creates is named mbd-*
# (namespaces, links) and uses addresses in 10.55.0.0/16 only.
#
# One step puts a waypoint (the L7 proxy) in front of the web Service: an
# HTTP AuthorizationPolicy and a weighted HTTPRoute.

set -euo pipefail

readonly PREFIX=mbd
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
readonly DEMO_SRC=$REPO/examples/demo
readonly TMP_BASE=${TMPDIR:-/tmp}
# Held (flock) while a demo runs; records what it started, so a run that
# was killed outright is cleaned up by the next one.
readonly RUN_FILE=$TMP_BASE/$PREFIX-demo.run

BIN_DIR=${MESHBOX_BIN_DIR:-}
BASE_PORT=${MESHBOX_DEMO_BASE_PORT:-15000}
KEEP=0
INSTALL=1
# The waypoint step, behind its own switch until it is part of the default
# story (and of dataplane/tests/standalone_demo.rs).

usage() {
	cat <<EOF
Usage: sudo $0 [--keep] [--bin-dir DIR] [--base-port N] [--no-install]

Runs the meshbox standalone demo: network namespaces as two nodes and four
pods, the control plane on examples/demo/, one in-pod dataplane per node,
and a short story of what the mesh does. Cleans up on exit or Ctrl-C.

  --keep          leave the mesh running after the story, until Ctrl-C
  --bin-dir DIR   use the controlplane and dataplane binaries in DIR
                  instead of building them (env MESHBOX_BIN_DIR)
  --base-port N   ports on 127.0.0.1: control plane N+12 (gRPC) and N+14
                  (REST), node-a's dataplane N+0/N+20/N+21 (admin, metrics,
                  readiness), node-b's N+100/N+120/N+121; default 15000
                  (env MESHBOX_DEMO_BASE_PORT)
  --no-install    do not install missing packages: list them and stop
                  (without it, on Debian and Ubuntu, the demo installs
                  them with apt-get install --no-install-recommends, saying
                  which and why first)
EOF
}

while (($#)); do
	case $1 in
	--keep) KEEP=1 ;;
	--bin-dir)
		[[ $# -ge 2 ]] || {
			echo "--bin-dir needs a directory" >&2
			exit 2
		}
		BIN_DIR=$2
		shift
		;;
	--bin-dir=*) BIN_DIR=${1#*=} ;;
	--base-port)
		[[ $# -ge 2 ]] || {
			echo "--base-port needs a number" >&2
			exit 2
		}
		BASE_PORT=$2
		shift
		;;
	--base-port=*) BASE_PORT=${1#*=} ;;
	--no-install) INSTALL=0 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "unknown argument: $1" >&2
		usage >&2
		exit 2
		;;
	esac
	shift
done

# ---------------------------------------------------------------- output --

if [[ -t 1 && -z ${NO_COLOR:-} ]]; then
	BOLD=$'\e[1m' DIM=$'\e[2m' RED=$'\e[31m' GREEN=$'\e[32m' CYAN=$'\e[36m' RESET=$'\e[0m'
else
	BOLD='' DIM='' RED='' GREEN='' CYAN='' RESET=''
fi
STEP=0
readonly STEPS=11
readonly SPINNER=('|' '/' '-' "\\")

step() {
	STEP=$((STEP + 1))
	printf '\n%s[%d/%d] %s%s\n' "$BOLD" "$STEP" "$STEPS" "$1" "$RESET"
}
say() { printf '  %s\n' "$*"; }
cmd_line() { printf '  %s$ %s%s\n' "$CYAN" "$*" "$RESET"; }
ok() { printf '  %s✔%s %s\n' "$GREEN" "$RESET" "$*"; }
indent() { sed 's/^/    /'; }

# Stops the demo with a reason and, when given, the end of a log file.
die() {
	printf '\n%sdemo failed:%s %s\n' "$RED$BOLD" "$RESET" "$1" >&2
	if [[ -n ${2:-} && -f $2 ]]; then
		printf '  last lines of %s:\n' "$2" >&2
		tail -n "${3:-25}" "$2" | indent >&2
	fi
	exit 1
}

# Waits for background job $1 with a spinner (on a terminal) labelled $2,
# followed by the last line of log $3 when given (what cargo is compiling);
# returns the job's exit status.
spin() {
	local pid=$1 label=$2 log=${3:-} i=0 start=$SECONDS last=''
	if [[ -t 1 ]]; then
		while kill -0 "$pid" 2>/dev/null; do
			[[ -n $log ]] && last=$(tail -n 1 "$log" 2>/dev/null | tr -d '\r' | sed 's/^ *//' | cut -c1-50)
			printf '\r\e[K  %s %s %s(%ds) %s%s' "${SPINNER[i % 4]}" "$label" "$DIM" $((SECONDS - start)) "$last" "$RESET"
			i=$((i + 1))
			sleep 0.2
		done
		printf '\r\e[K'
	fi
	wait "$pid"
}

# Runs "$@" with its output in log $2, showing spinner label $1; dies with
# the log's tail if it fails.
run_logged() {
	local label=$1 log=$2 start=$SECONDS
	shift 2
	"$@" >"$log" 2>&1 9>&- &
	if ! spin $! "$label" "$log"; then
		die "$label failed" "$log"
	fi
	ok "$label ($((SECONDS - start))s)"
}

# Polls "$@" until it succeeds, for at most $2 seconds, with spinner label
# $1; dies showing log $3 if it never does.
wait_until() {
	local label=$1 timeout=$2 log=$3 deadline=$((SECONDS + $2)) i=0
	shift 3
	until "$@"; do
		check_running
		if ((SECONDS >= deadline)); then
			[[ -t 1 ]] && printf '\r\e[K'
			die "timed out after ${timeout}s: $label" "$log"
		fi
		if [[ -t 1 ]]; then
			printf '\r  %s %s' "${SPINNER[i % 4]}" "$label"
			i=$((i + 1))
		fi
		sleep 0.2
	done
	[[ -t 1 ]] && printf '\r\e[K'
	return 0
}

# Dies, showing its log, if a process the demo started has stopped: no
# point waiting for it.
check_running() {
	local pid
	for pid in "${PIDS[@]}"; do
		if ! alive "$pid"; then
			[[ -t 1 ]] && printf '\r\e[K'
			die "$(basename "${LOGS[$pid]}" .log) stopped unexpectedly" "${LOGS[$pid]}"
		fi
	done
}

# --------------------------------------------------------- prerequisites --

# What the demo runs, and the Debian/Ubuntu package that has it:
# tool-or-file:package:why (the why is shown before installing).
readonly RUN_NEEDS=(
	"ip:iproute2:network namespaces, links and routes for the nodes and pods"
	"iptables:iptables:the dataplanes' capture rules inside the pods"
	"iptables-restore:iptables:the dataplanes' capture rules inside the pods"
	"nsenter:util-linux:the dataplanes run iptables inside the pods' namespaces"
	"runuser:util-linux:building as the checkout's owner under sudo"
	"flock:util-linux:one demo at a time"
	"curl:curl:the pods' HTTP requests and the REST API calls"
	"openssl:openssl:the key and CSR of the certificate step"
	"python3:python3:the pods' sample app, and reading the JSON answers"
)
# What building the binaries with cargo needs besides Rust itself.
readonly BUILD_NEEDS=(
	"cc:gcc:the linker Rust uses, and the C parts of ring, aws-lc and jemalloc"
	"/usr/include/stdio.h:libc6-dev:the C library's headers and start files, for cc"
	"make:make:building jemalloc, the dataplane's allocator"
)

# Whether this is Debian or a derivative (Ubuntu...) with apt-get.
debian_like() {
	[[ -r /etc/os-release ]] && command -v apt-get >/dev/null || return 1
	local ids
	# shellcheck disable=SC1091 # the machine's own file, read in a subshell
	ids=$(. /etc/os-release && printf ' %s %s ' "${ID:-}" "${ID_LIKE:-}")
	[[ $ids == *" debian "* || $ids == *" ubuntu "* ]]
}

# The entries of "$@" (tool:package:why) whose tool or file is missing.
missing_needs() {
	local need tool
	for need in "$@"; do
		tool=${need%%:*}
		if [[ $tool == /* ]]; then
			[[ -e $tool ]] || printf '%s\n' "$need"
		else
			command -v "$tool" >/dev/null || printf '%s\n' "$need"
		fi
	done
}

# cargo, and how to run it: as the user who owns the checkout when run
# with sudo (so target/ stays theirs; sudo's PATH rarely has their
# ~/.cargo/bin, and their toolchain is the one that built this checkout
# before). Sets CARGO_RUN (the command prefix) and BUILD_USER.
CARGO_RUN=()
BUILD_USER=''
find_cargo() {
	local cargo user_home
	cargo=$(command -v cargo || true)
	if [[ -n ${SUDO_USER:-} && $SUDO_USER != root && $(stat -c %U "$REPO") == "$SUDO_USER" ]]; then
		BUILD_USER=$SUDO_USER
		user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
		if [[ -x $user_home/.cargo/bin/cargo ]]; then cargo=$user_home/.cargo/bin/cargo; fi
		[[ -n $cargo ]] || return 1
		CARGO_RUN=(runuser -u "$SUDO_USER" -- env HOME="$user_home" PATH="$(dirname "$cargo"):$PATH" "$cargo")
	else
		[[ -n $cargo ]] || return 1
		CARGO_RUN=("$cargo")
	fi
}

# Rust is not installed from here: the demo does not run a remote script as
# root. It says how to get it (rustup, as the user who builds).
check_rust() {
	local need have
	need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$REPO/Cargo.toml" | head -n 1)
	if ! find_cargo; then
		printf '%sdemo failed:%s cargo (Rust %s or newer) is not installed.\n' "$RED$BOLD" "$RESET" "${need:-?}" >&2
		cat >&2 <<EOF
  Install Rust with rustup as $(stat -c %U "$REPO"), who owns the checkout (under sudo the demo builds as them):
    on Debian 13 or Ubuntu 24.04 and later:  apt-get install rustup, then  rustup default stable
    elsewhere: https://rustup.rs tells how (read the script it runs first)
  Then run the demo again. Or give prebuilt binaries: --bin-dir DIR.
EOF
		exit 1
	fi
	have=$("${CARGO_RUN[@]}" --version 2>&1) ||
		die "'cargo --version' failed${BUILD_USER:+ (as $BUILD_USER)}: $(head -n 3 <<<"$have") -- with rustup: rustup default stable"
	have=$(grep -oE '[0-9]+\.[0-9]+' <<<"$have" | head -n 1)
	if [[ -n $need && -n $have ]] && ! version_at_least "$have" "$need"; then
		die "Rust $have is older than the $need meshbox needs: rustup update stable${BUILD_USER:+ (as $BUILD_USER)}, or --bin-dir DIR"
	fi
}

version_at_least() { # have need, both MAJOR.MINOR
	local IFS=. h n
	read -r -a h <<<"$1"
	read -r -a n <<<"$2"
	((h[0] > n[0] || (h[0] == n[0] && ${h[1]:-0} >= ${n[1]:-0})))
}

readonly APT_LOG=$TMP_BASE/$PREFIX-demo-apt.log

# A fresh cloud machine often runs unattended-upgrades at first boot: wait
# for its dpkg lock rather than fail on it.
readonly APT_LOCK_WAIT=(-o DPkg::Lock::Timeout=300)

apt_install() {
	DEBIAN_FRONTEND=noninteractive apt-get "${APT_LOCK_WAIT[@]}" install -y --no-install-recommends "$@" >>"$APT_LOG" 2>&1 9>&-
}

# Installs packages "$@" with apt-get; refreshes the package lists (once)
# only if the install fails for want of them.
install_packages() {
	: >"$APT_LOG"
	cmd_line "apt-get install -y --no-install-recommends $*"
	apt_install "$@" &
	if spin $! "installing" "$APT_LOG"; then
		rm -f -- "$APT_LOG"
		return 0
	fi
	if ! grep -qE 'Unable to locate package|has no installation candidate|Unable to fetch some archives|Failed to fetch' "$APT_LOG"; then
		die "apt-get install failed (the whole log: $APT_LOG)" "$APT_LOG"
	fi
	say "the package lists are missing or out of date: updating them, then again"
	cmd_line "apt-get update"
	DEBIAN_FRONTEND=noninteractive apt-get "${APT_LOCK_WAIT[@]}" update >>"$APT_LOG" 2>&1 9>&- &
	spin $! "apt-get update" "$APT_LOG" || die "apt-get update failed (the whole log: $APT_LOG)" "$APT_LOG"
	cmd_line "apt-get install -y --no-install-recommends $*"
	apt_install "$@" &
	spin $! "installing" "$APT_LOG" || die "apt-get install failed (the whole log: $APT_LOG)" "$APT_LOG"
	rm -f -- "$APT_LOG"
}

check_prerequisites() {
	[[ $(uname -s) == Linux ]] || die "this demo needs Linux (network namespaces, iptables)"
	((EUID == 0)) || die "run it as root: sudo $0 (it creates network namespaces and iptables rules)"
	if ! [[ $BASE_PORT =~ ^[0-9]+$ ]] || ((BASE_PORT < 1024 || BASE_PORT + 121 > 65535)); then
		die "--base-port must be a number between 1024 and 65414"
	fi
	local -a needs=("${RUN_NEEDS[@]}") missing packages
	if [[ -z $BIN_DIR ]]; then
		check_rust
		needs+=("${BUILD_NEEDS[@]}")
	fi
	mapfile -t missing < <(missing_needs "${needs[@]}")
	if ((${#missing[@]})); then
		local need rest pkg
		# One line per package, however many of its tools are missing.
		local -A why=()
		for need in "${missing[@]}"; do
			rest=${need#*:}
			pkg=${rest%%:*}
			if [[ -z ${why[$pkg]+set} ]]; then
				packages+=("$pkg")
				why[$pkg]=${rest#*:}
			fi
		done
		if ((INSTALL)) && debian_like; then
			say "missing packages; installing them with apt-get (--no-install to refuse):"
			for pkg in "${packages[@]}"; do
				printf '    %-12s for %s\n' "$pkg" "${why[$pkg]}"
			done
			install_packages "${packages[@]}"
			mapfile -t missing < <(missing_needs "${needs[@]}")
			((${#missing[@]} == 0)) || die "still missing after apt-get install: ${missing[*]%%:*}"
			ok "installed ${packages[*]}"
		else
			printf '%sdemo failed:%s missing prerequisites:\n' "$RED$BOLD" "$RESET" >&2
			for need in "${missing[@]}"; do
				pkg=${need#*:}
				printf '    %s (package %s)\n' "${need%%:*}" "${pkg%%:*}" >&2
			done
			if debian_like; then
				echo "  On Debian/Ubuntu: apt-get install --no-install-recommends ${packages[*]}" >&2
				((INSTALL)) || echo "  (or run the demo without --no-install, and it installs them)" >&2
			else
				echo "  Install them with your distribution's package manager (Debian's names: ${packages[*]})." >&2
			fi
			exit 1
		fi
	fi
	ip netns list >/dev/null 2>&1 || die "'ip netns' does not work here (is this a container without CAP_SYS_ADMIN?)"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_ports() {
	local p busy=()
	for p in "${CP_GRPC_PORT}" "${CP_REST_PORT}" "${ADMIN[node-a]}" "${METRICS[node-a]}" "${READY[node-a]}" \
		"${ADMIN[node-b]}" "${METRICS[node-b]}" "${READY[node-b]}"; do
		port_in_use "$p" && busy+=("$p")
	done
	((${#busy[@]} == 0)) ||
		die "port(s) ${busy[*]} on 127.0.0.1 already in use (another meshbox?); pick other ports with --base-port N"
}

# ------------------------------------------------------------- clean-up --

# Processes this run started (control plane, dataplanes, apps).
PIDS=()
declare -A LOGS=()
WORK=''

# Kills every process inside our namespaces, then deletes the namespaces
# (their links, addresses, routes and iptables rules go with them).
remove_namespaces() {
	local ns pid
	for ns in $(ip netns list 2>/dev/null | awk -v p="^$PREFIX-" '$1 ~ p {print $1}'); do
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			kill -KILL "$pid" 2>/dev/null || true
		done
		ip netns del "$ns" 2>/dev/null || true
	done
}

alive() {
	local pid=$1 state
	[[ -r /proc/$pid/stat ]] || return 1
	state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
	[[ $state != Z ]]
}

stop_processes() {
	local pid i left
	((${#PIDS[@]})) || return 0
	for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	for ((i = 0; i < 50; i++)); do
		left=0
		for pid in "${PIDS[@]}"; do alive "$pid" && left=1; done
		((left)) || break
		sleep 0.1
	done
	for pid in "${PIDS[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
	wait "${PIDS[@]}" 2>/dev/null || true
}

# Cleans up what a previous run left when it was killed outright: the
# processes it recorded (only if still the same binaries), its work dir and
# any mbd-* namespace.
clean_leftovers() {
	local kind value exe found=0 killed=()
	if [[ -s $RUN_FILE ]]; then
		while read -r kind value exe; do
			case $kind in
			pid)
				if [[ $(readlink "/proc/$value/exe" 2>/dev/null) == "$exe" ]] && kill -KILL "$value" 2>/dev/null; then
					killed+=("$value")
				fi
				;;
			work)
				if [[ $value == "$TMP_BASE/$PREFIX-demo."* && -d $value ]]; then
					rm -rf -- "$value"
					found=1
				fi
				;;
			esac
		done <"$RUN_FILE"
	fi
	# Not our children: wait for them to be gone (and their ports free).
	local pid i
	for ((i = 0; i < 50; i++)); do
		local left=0
		for pid in "${killed[@]}"; do alive "$pid" && left=1; done
		((left)) || break
		sleep 0.1
	done
	if ip netns list 2>/dev/null | grep -q "^$PREFIX-"; then
		found=1
		remove_namespaces
	fi
	: >"$RUN_FILE"
	((found == 0 && ${#killed[@]} == 0)) || say "${DIM}removed what an earlier run left behind${RESET}"
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM PIPE
	# Clean up even when whoever read our output has gone away.
	trap '' PIPE
	set +e
	printf '\n%sCleaning up%s\n' "$BOLD" "$RESET"
	stop_processes
	remove_namespaces
	[[ -n $WORK ]] && rm -rf -- "$WORK"
	rm -f -- "$RUN_FILE"
	# Check, rather than assume, that nothing is left.
	local left=()
	ip netns list 2>/dev/null | grep -q "^$PREFIX-" && left+=("network namespaces")
	ip -o link show 2>/dev/null | grep -q ": $PREFIX" && left+=("links")
	local pid
	for pid in "${PIDS[@]}"; do alive "$pid" && left+=("process $pid"); done
	[[ -n $WORK && -e $WORK ]] && left+=("$WORK")
	if ((${#left[@]})); then
		printf '  %sleft behind: %s%s\n' "$RED" "${left[*]}" "$RESET" >&2
		((rc)) || rc=1
	else
		ok "stopped ${#PIDS[@]} processes; removed the $PREFIX-* namespaces (with their links, routes and iptables rules) and the work dir: nothing left"
	fi
	exit "$rc"
}

# ------------------------------------------------------------------ mesh --

CP_GRPC_PORT=$((BASE_PORT + 12))
CP_REST_PORT=$((BASE_PORT + 14))
declare -A ADMIN=([node-a]=$((BASE_PORT)) [node-b]=$((BASE_PORT + 100)))
declare -A METRICS=([node-a]=$((BASE_PORT + 20)) [node-b]=$((BASE_PORT + 120)))
declare -A READY=([node-a]=$((BASE_PORT + 21)) [node-b]=$((BASE_PORT + 121)))
declare -A NODE_SUBNET=([node-a]=10.55.1 [node-b]=10.55.2)
declare -A NODE_LINK_IP=([node-a]=10.55.0.1 [node-b]=10.55.0.2)
readonly NODES=(node-a node-b)
# pod:node:ip:namespace
readonly PODS=(sleep:node-a:10.55.1.10:demo legacy:node-a:10.55.1.20:legacy
	web-1:node-b:10.55.2.10:demo web-2:node-b:10.55.2.11:demo)
readonly VIP=10.55.100.10
SHELL_EXE=$(readlink /proc/$$/exe)
readonly SHELL_EXE
export RUST_LOG=${RUST_LOG:-info}

# Starts "$@" in the background with its output in log $1, and records it
# (pid and executable, so that the next run can tell it from a recycled
# pid if this one is killed before it can clean up).
spawn() {
	local log=$1 pid exe i
	shift
	"$@" >"$log" 2>&1 9>&- &
	pid=$!
	PIDS+=("$pid")
	LOGS[$pid]=$log
	for ((i = 0; i < 50; i++)); do
		exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || break
		[[ $exe == "$SHELL_EXE" ]] || break
		sleep 0.02
	done
	printf 'pid %s %s\n' "$pid" "${exe:-?}" >>"$RUN_FILE"
}

netns_sh() { ip netns exec "$1" sh -c "$2"; }

build_topology() {
	local node other spec pod pnode pip
	for node in "${NODES[@]}"; do
		ip netns add "$PREFIX-$node"
		ip -n "$PREFIX-$node" link set lo up
		ip -n "$PREFIX-$node" link add "${PREFIX}br0" type bridge
		ip -n "$PREFIX-$node" addr add "${NODE_SUBNET[$node]}.1/24" dev "${PREFIX}br0"
		ip -n "$PREFIX-$node" link set "${PREFIX}br0" up
		netns_sh "$PREFIX-$node" 'echo 1 > /proc/sys/net/ipv4/ip_forward'
	done
	# The wire between the nodes, and a route to each other's pod subnet.
	ip -n "$PREFIX-node-a" link add "$PREFIX-to-b" type veth peer name "$PREFIX-to-a" netns "$PREFIX-node-b"
	for node in "${NODES[@]}"; do
		if [[ $node == node-a ]]; then other="node-b"; else other="node-a"; fi
		ip -n "$PREFIX-$node" addr add "${NODE_LINK_IP[$node]}/30" dev "$PREFIX-to-${other#node-}"
		ip -n "$PREFIX-$node" link set "$PREFIX-to-${other#node-}" up
		ip -n "$PREFIX-$node" route add "${NODE_SUBNET[$other]}.0/24" via "${NODE_LINK_IP[$other]}"
	done
	for spec in "${PODS[@]}"; do
		IFS=: read -r pod pnode pip _ <<<"$spec"
		add_pod "$pod" "$pnode" "$pip"
	done
}

# A pod: a namespace with eth0 on its node's bridge, as a CNI would leave it.
add_pod() { # pod node ip
	local pod=$1 node=$2 ip=$3
	ip netns add "$PREFIX-$pod"
	ip -n "$PREFIX-$node" link add "$PREFIX-$pod" type veth peer name eth0 netns "$PREFIX-$pod"
	ip -n "$PREFIX-$node" link set "$PREFIX-$pod" master "${PREFIX}br0" up
	ip -n "$PREFIX-$pod" addr add "$ip/24" dev eth0
	ip -n "$PREFIX-$pod" link set lo up
	ip -n "$PREFIX-$pod" link set eth0 up
	ip -n "$PREFIX-$pod" route add default via "${NODE_SUBNET[$node]}.1"
}

pod_field() { # pod field-index (1 node, 2 ip, 3 namespace)
	local spec
	for spec in "${PODS[@]}"; do
		if [[ ${spec%%:*} == "$1" ]]; then
			cut -d: -f"$(($2 + 1))" <<<"$spec"
			return
		fi
	done
}

cp_curl() { curl -sS --noproxy '*' --max-time 5 --cacert "$WORK/state/root-cert.pem" "$@"; }
local_curl() { curl -sS --noproxy '*' --max-time 5 "$@"; }

cp_ready() { [[ -s $WORK/state/root-cert.pem ]] && cp_curl -f -o /dev/null "https://127.0.0.1:$CP_REST_PORT/readyz" 2>/dev/null; }
dp_ready() { local_curl -f -o /dev/null "http://127.0.0.1:${READY[$1]}/healthz/ready" 2>/dev/null; }
dump() { local_curl -f "http://127.0.0.1:${ADMIN[$1]}/config_dump" -o "$WORK/dump-$1.json" 2>/dev/null; }

# Whether every pod in "${@:2}" shows as captured in node $1's /config_dump.
captured() {
	local node=$1
	shift
	dump "$node" || return 1
	python3 - "$WORK/dump-$node.json" "$@" <<'PY'
import json, sys
dump = json.load(open(sys.argv[1]))
state = {p["uid"].rsplit("/", 1)[-1]: p["state"] for p in dump.get("pods") or []}
sys.exit(0 if all(state.get(p) == "captured" for p in sys.argv[2:]) else 1)
PY
}

# An HTTP request made by the app in pod $1 (curl inside its namespace).
request_from() {
	ip netns exec "$PREFIX-$1" curl -sS --noproxy '*' --max-time 5 "$2" 2>&1
}

# The last line of node $1's dataplane log that holds every pattern in
# "${@:2}", reduced to the fields that tell the story (FIELDS, space
# separated; default: those of an access-log line).
ACCESS_FIELDS="src.addr src.workload src.identity dst.addr dst.hbone_addr dst.service dst.workload dst.identity direction error"
access_log() {
	local node=$1
	shift
	python3 - "$WORK/logs/dataplane-$node.log" "${FIELDS:-$ACCESS_FIELDS}" "$@" <<'PY'
import re, sys
path, keep, needles = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
for line in reversed(open(path, errors="replace").read().splitlines()):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if all(n in line for n in needles):
        fields = dict(re.findall(r'([a-z_.]+)=("[^"]*"|\S+)', line))
        print(" ".join(f"{k}={fields[k]}" for k in keep if k in fields))
        sys.exit(0)
sys.exit(1)
PY
}

wait_log() { # node timeout patterns...
	local node=$1 timeout=$2
	shift 2
	wait_until "the access log of $node" "$timeout" "$WORK/logs/dataplane-$node.log" \
		access_log "$node" "$@" >/dev/null
}

# ------------------------------------------------------------- waypoint --

readonly WAYPOINT_POD=waypoint-1 WAYPOINT_NODE=node-a WAYPOINT_IP=10.55.1.30
readonly WAYPOINT_ID=spiffe://cluster.local/ns/demo/sa/waypoint
readonly WAYPOINT_SRC=$DEMO_SRC/waypoint

in_waypoint() { ip netns exec "$PREFIX-$WAYPOINT_POD" "$@"; }
waypoint_ready() { in_waypoint curl -sf --noproxy '*' --max-time 2 -o /dev/null http://127.0.0.1:15021/healthz/ready; }

# Whether the waypoint's /config_dump holds resource $1 (namespace/name):
# as that string, or as an object with that namespace and name.
waypoint_has() {
	in_waypoint curl -sf --noproxy '*' --max-time 2 -o "$WORK/dump-waypoint.json" http://127.0.0.1:15000/config_dump ||
		return 1
	python3 - "$WORK/dump-waypoint.json" "$1" <<'PY'
import json, sys
want = sys.argv[2]
ns, name = want.split("/", 1)
def found(v):
    if isinstance(v, dict):
        if v.get("namespace") == ns and v.get("name") == name:
            return True
        return want in v or any(found(x) for x in v.values())
    if isinstance(v, list):
        return any(found(x) for x in v)
    return v == want
sys.exit(0 if found(json.load(open(sys.argv[1]))) else 1)
PY
}

# Whether the control plane lists waypoint demo/waypoint (GET /api/v1/waypoints).
cp_knows_waypoint() {
	cp_curl -f "https://127.0.0.1:$CP_REST_PORT/api/v1/waypoints" -o "$WORK/waypoints.json" 2>/dev/null || return 1
	python3 - "$WORK/waypoints.json" <<'PY'
import json, sys
sys.exit(0 if any(w.get("namespace") == "demo" and w.get("name") == "waypoint" for w in json.load(open(sys.argv[1]))) else 1)
PY
}

# Whether node $1's dataplane sends what is addressed to web to a waypoint.
web_via_waypoint() {
	dump "$1" || return 1
	python3 - "$WORK/dump-$1.json" <<'PY'
import json, sys
services = json.load(open(sys.argv[1])).get("services") or []
sys.exit(0 if any(s.get("hostname") == "web.demo.svc.cluster.local" and s.get("waypoint") for s in services) else 1)
PY
}

# An HTTP request from the app in pod $1: method $2, URL $3, more curl
# arguments after; prints "STATUS BODY".
http_from() {
	local pod=$1 method=$2 url=$3 status body
	shift 3
	status=$(ip netns exec "$PREFIX-$pod" curl -sS --noproxy '*' --max-time 5 -X "$method" \
		-o "$WORK/body" -w '%{http_code}' "$@" "$url" 2>&1) || {
		echo "$status" | tr '\n' ' '
		return 1
	}
	# On one line: the body's line breaks as spaces, none at the end.
	body=$(head -c 200 "$WORK/body" | tr -s '\r\n' '  ')
	printf '%s %s\n' "$status" "${body% }"
}

# The last line of the waypoint's log holding every pattern in "$@" (its
# access log: one line per request), without colours or timestamp.
waypoint_log() {
	python3 - "$WORK/logs/waypoint.log" "$@" <<'PY'
import re, sys
path, needles = sys.argv[1], sys.argv[2:]
for line in reversed(open(path, errors="replace").read().splitlines()):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if all(n in line for n in needles):
        print(re.sub(r"^\s*\d{4}-\d\d-\d\dT\S+\s+", "", line))
        sys.exit(0)
sys.exit(1)
PY
}

waypoint_logged() { waypoint_log "$@" >/dev/null; }

# Writes examples/demo/$1 into the watched folder as $2 (whole, at once) and
# shows the command a user would type.
write_config() {
	cp "$DEMO_SRC/$1" "$WORK/config/.$2.tmp"
	mv "$WORK/config/.$2.tmp" "$WORK/config/$2"
	cmd_line "cp examples/demo/$1 $WORK/config/$2"
}

fold_indent() { fold -s -w 96 | sed 's/ *$//' | indent | indent; }

waypoint_step() {
	step "A waypoint: an HTTP policy and a weighted split (L7)"
	rm -f "$WORK/config/deny-sleep.yaml"
	say "deny-sleep.yaml removed: once web has a waypoint, web's node proxy sees the"
	say "waypoint's identity, not sleep's; HTTP policies for web are enforced at the waypoint"

	add_pod "$WAYPOINT_POD" "$WAYPOINT_NODE" "$WAYPOINT_IP"
	say "the waypoint's pod: namespace $PREFIX-$WAYPOINT_POD on $WAYPOINT_NODE, $WAYPOINT_IP (istio.io/dataplane-mode: none: not captured)"
	write_config waypoint/waypoint.yaml waypoint.yaml
	say "  Gateway demo/waypoint (class istio-waypoint, for services), its Service (HBONE 15008) and pod"
	wait_until "the control plane knowing the waypoint" 10 "$WORK/logs/controlplane.log" cp_knows_waypoint
	python3 - "$WORK/waypoints.json" <<'PY' | indent
import json, sys
for w in json.load(open(sys.argv[1])):
    print(f'{w["namespace"]}/{w["name"]}: class {w.get("class")}, for {w.get("for")}, at {", ".join(w.get("addresses") or [])}')
PY

	"$BIN_DIR/controlplane" token --state-dir "$WORK/state" --identity "$WAYPOINT_ID" --out "$WORK/waypoint.token" \
		>"$WORK/logs/token-waypoint.log" 2>&1 || die "minting the waypoint's token" "$WORK/logs/token-waypoint.log"
	# The control plane listens on this machine's 127.0.0.1, which the
	# pod's namespace cannot reach; the relay carries the bytes (TLS end to
	# end) from the pod's 127.0.0.1 to ours.
	spawn "$WORK/logs/relay.log" python3 "$DEMO_SRC/relay.py" "/var/run/netns/$PREFIX-$WAYPOINT_POD" "$CP_GRPC_PORT"
	wait_until "the relay to the control plane" 10 "$WORK/logs/relay.log" grep -q relaying "$WORK/logs/relay.log"
	local started
	started=$(now_ms)
	spawn "$WORK/logs/waypoint.log" ip netns exec "$PREFIX-$WAYPOINT_POD" "$BIN_DIR/waypoint" run \
		--xds-address "https://127.0.0.1:$CP_GRPC_PORT" --xds-root-ca "$WORK/state/root-cert.pem" \
		--ca-root-ca "$WORK/state/root-cert.pem" --auth-token "$WORK/waypoint.token" \
		--namespace demo --pod-name "$WAYPOINT_POD" --service-account waypoint --gateway waypoint \
		--drain-timeout 1s
	cmd_line "controlplane token --identity $WAYPOINT_ID --out waypoint.token"
	cmd_line "ip netns exec $PREFIX-$WAYPOINT_POD waypoint run --gateway waypoint --namespace demo --pod-name $WAYPOINT_POD --service-account waypoint --auth-token waypoint.token ..."
	say "  (its xDS and CA address, 127.0.0.1:$CP_GRPC_PORT, is relayed into the pod by examples/demo/relay.py)"
	wait_until "the waypoint ready" 30 "$WORK/logs/waypoint.log" waypoint_ready
	ok "waypoint ready as $WAYPOINT_ID, $(($(now_ms) - started)) ms after it started (in its pod: curl 127.0.0.1:15021/healthz/ready)"

	local written
	written=$(now_ms)
	write_config waypoint/services.yaml services.yaml
	say "  the web Service now has the label istio.io/use-waypoint: waypoint; web-v1 and web-v2 select one version each"
	wait_until "node-a sending web's traffic to the waypoint" 10 "$WORK/logs/dataplane-node-a.log" web_via_waypoint node-a
	ok "node-a's dataplane sends what sleep addresses to web to the waypoint, $(($(now_ms) - written)) ms after the file was written"

	written=$(now_ms)
	write_config waypoint/allow-get.yaml allow-get.yaml
	sed -n '/^apiVersion/,$p' "$WAYPOINT_SRC/allow-get.yaml" | indent
	wait_until "the waypoint receiving demo/allow-get" 10 "$WORK/logs/waypoint.log" waypoint_has demo/allow-get
	ok "the waypoint has demo/allow-get, $(($(now_ms) - written)) ms after the file was written"
	say "what the control plane made of it (GET /api/v1/policies):"
	cp_curl "https://127.0.0.1:$CP_REST_PORT/api/v1/policies" -o "$WORK/policies.json" 2>/dev/null || true
	python3 - "$WORK/policies.json" <<'PY' | indent || true
import json, sys
for p in json.load(open(sys.argv[1])):
    if (p.get("namespace"), p.get("name")) == ("demo", "allow-get"):
        print(f'demo/allow-get: {p.get("action")} scope {p.get("scope")}, enforced by {", ".join(p.get("enforcedBy") or ["nothing"])}')
PY
	local answer
	cmd_line "ip netns exec $PREFIX-sleep curl http://$VIP/l7/get"
	answer=$(http_from sleep GET "http://$VIP/l7/get") || die "the GET through the waypoint failed: $answer" "$WORK/logs/waypoint.log"
	[[ $answer == "200 hello from web-"* ]] || die "the GET was not served: $answer" "$WORK/logs/waypoint.log"
	say "  $answer"
	say "  (web sees the waypoint's address: the waypoint opens its own HBONE connection to web)"
	cmd_line "ip netns exec $PREFIX-sleep curl -X POST --data-binary hello http://$VIP/l7/post"
	answer=$(http_from sleep POST "http://$VIP/l7/post" --data-binary hello) ||
		die "the POST through the waypoint failed: $answer" "$WORK/logs/waypoint.log"
	[[ $answer == "403 RBAC: access denied" ]] || die "the POST was not refused with 403 RBAC: access denied: $answer" "$WORK/logs/waypoint.log"
	say "  $answer"
	wait_until "the waypoint's access log" 5 "$WORK/logs/waypoint.log" waypoint_logged /l7/post
	say "the waypoint's access log (one line per request):"
	waypoint_log /l7/get | fold_indent
	waypoint_log /l7/post | fold_indent
	ok "GET allowed, POST refused 403: decided by the waypoint on the method and sleep's verified identity"

	written=$(now_ms)
	write_config waypoint/route-90-10.yaml route-90-10.yaml
	sed -n '/^apiVersion/,$p' "$WAYPOINT_SRC/route-90-10.yaml" | indent
	wait_until "the waypoint receiving demo/web-split" 10 "$WORK/logs/waypoint.log" waypoint_has demo/web-split
	ok "the waypoint has demo/web-split, $(($(now_ms) - written)) ms after the file was written"
	say "what the control plane made of it (GET /api/v1/routes):"
	cp_curl "https://127.0.0.1:$CP_REST_PORT/api/v1/routes" -o "$WORK/routes.json" 2>/dev/null || true
	python3 - "$WORK/routes.json" <<'PY' | indent || true
import json, sys
for r in json.load(open(sys.argv[1])):
    parents = ", ".join(f'{p["namespace"]}/{p["name"]}:{p.get("port", "*")} via {p.get("waypoint") or "no waypoint"}' for p in r["parents"])
    for rule in r["rules"]:
        backends = ", ".join(f'{b["name"]}:{b.get("port")} weight {b.get("weight")}' for b in rule.get("backends") or [])
        print(f'{r["namespace"]}/{r["name"]}: {parents} -> {backends} ({rule.get("outcome")})')
    for p in r.get("problems") or []:
        print(f'  problem: {p}')
PY
	cmd_line "ip netns exec $PREFIX-sleep curl 'http://$VIP/l7/split/[1-100]'   # 100 GETs on one connection"
	ip netns exec "$PREFIX-sleep" curl -sS --noproxy '*' --max-time 20 "http://$VIP/l7/split/[1-100]" \
		>"$WORK/split.txt" 2>&1 || die "the 100 requests failed: $(tail -n 3 "$WORK/split.txt")" "$WORK/logs/waypoint.log"
	local v1 v2
	v1=$(grep -c '^hello from web-1 ' "$WORK/split.txt" || true)
	v2=$(grep -c '^hello from web-2 ' "$WORK/split.txt" || true)
	say "  web-1 (version v1): $(printf '%3d' "$v1") $(printf '%*s' $((v1 / 2)) '' | tr ' ' '#')"
	say "  web-2 (version v2): $(printf '%3d' "$v2") $(printf '%*s' $((v2 / 2)) '' | tr ' ' '#')"
	((v1 + v2 == 100)) || die "$((v1 + v2)) of 100 requests answered by web: $(grep -v '^hello from' "$WORK/split.txt" | head -n 3)" "$WORK/logs/waypoint.log"
	((v2 >= 1 && v2 <= 30)) || die "not a 90/10 split: $v1 to v1, $v2 to v2" "$WORK/logs/waypoint.log"
	wait_until "the waypoint's access log" 5 "$WORK/logs/waypoint.log" waypoint_logged /l7/split/100
	say "the waypoint's access log: $(grep -c '/l7/split/' "$WORK/logs/waypoint.log") lines for them; the last to each version:"
	waypoint_log /l7/split/ dst.workload=web-1 | fold_indent
	waypoint_log /l7/split/ dst.workload=web-2 | fold_indent
	ok "split per request, by weight, on one client connection: the waypoint routes each request"
}

# ----------------------------------------------------------------- story --

main() {
	printf '%smeshbox standalone demo%s: a zero-trust mesh on this machine, in network namespaces\n' "$BOLD" "$RESET"

	step "Checking prerequisites"
	check_prerequisites
	exec 9>>"$RUN_FILE"
	# A few seconds' grace: what a killed run had in the foreground may
	# still hold the lock for a moment.
	flock -w 3 9 || die "another demo is running (see $RUN_FILE); stop it first"
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	trap 'exit 141' PIPE
	clean_leftovers
	check_ports
	ok "root, ip, iptables, nsenter, curl, openssl, $(python3 --version 2>&1)"

	step "meshbox binaries"
	WORK=$(mktemp -d "$TMP_BASE/$PREFIX-demo.XXXXXX")
	printf 'work %s\n' "$WORK" >>"$RUN_FILE"
	mkdir -p "$WORK/logs" "$WORK/config"
	if [[ -z $BIN_DIR ]]; then
		build_release
	else
		BIN_DIR=$(cd "$BIN_DIR" 2>/dev/null && pwd) || die "--bin-dir: no such directory"
	fi
	local bin
	local -a bins=(controlplane dataplane waypoint)
	for bin in "${bins[@]}"; do
		[[ -x $BIN_DIR/$bin ]] || die "$BIN_DIR/$bin not found: build it with cargo build -p meshbox-$bin, or leave out --bin-dir"
	done
	ok "$(printf '%s, ' "${bins[@]}" | sed 's/, $//') from $BIN_DIR"

	step "A cluster of network namespaces: two nodes, four pods"
	build_topology
	say "node-a  ${PREFIX}-node-a   pods in 10.55.1.0/24: sleep 10.55.1.10, legacy 10.55.1.20"
	say "node-b  ${PREFIX}-node-b   pods in 10.55.2.0/24: web-1 10.55.2.10, web-2 10.55.2.11"
	say "each pod is a namespace ${PREFIX}-<pod> with eth0 on its node's bridge; the nodes"
	say "are joined by one link and route each other's pod subnet"

	step "Control plane, standalone on examples/demo/"
	cp "$DEMO_SRC"/*.yaml "$WORK/config/"
	cmd_line "controlplane run --config-dir $WORK/config --state-dir $WORK/state"
	spawn "$WORK/logs/controlplane.log" "$BIN_DIR/controlplane" run \
		--config-dir "$WORK/config" --state-dir "$WORK/state" \
		--grpc-addr "127.0.0.1:$CP_GRPC_PORT" --rest-addr "127.0.0.1:$CP_REST_PORT"
	wait_until "control plane starting" 20 "$WORK/logs/controlplane.log" cp_ready
	ok "xDS + CA on 127.0.0.1:$CP_GRPC_PORT, REST API on https://127.0.0.1:$CP_REST_PORT"
	cp_curl "https://127.0.0.1:$CP_REST_PORT/api/v1/workloads" -o "$WORK/workloads.json" ||
		die "GET /api/v1/workloads failed" "$WORK/logs/controlplane.log"
	say "workloads it serves (GET /api/v1/workloads):"
	python3 - "$WORK/workloads.json" <<'PY' | indent
import json, sys
for w in sorted(json.load(open(sys.argv[1])), key=lambda w: (w["node"], w["name"])):
    enrolled = "enrolled (HBONE)" if w["protocol"] == "HBONE" else "not enrolled   "
    name = f'{w["namespace"]}/{w["name"]}'
    print(f'{name:<14} {w["node"]}  {w["addresses"][0]:<11} {enrolled}  {w["identity"]}')
PY

	step "Dataplanes: one per node, capturing its pods in their own namespaces"
	local node
	for node in "${NODES[@]}"; do
		"$BIN_DIR/controlplane" token --state-dir "$WORK/state" --node "$node" --out "$WORK/$node.token" \
			>"$WORK/logs/token-$node.log" 2>&1 || die "minting the node token for $node" "$WORK/logs/token-$node.log"
		spawn "$WORK/logs/dataplane-$node.log" "$BIN_DIR/dataplane" run \
			--xds-address "https://127.0.0.1:$CP_GRPC_PORT" --xds-root-ca "$WORK/state/root-cert.pem" \
			--auth-token "$WORK/$node.token" --proxy-mode shared --node-name "$node" --inpod true \
			--admin-addr "127.0.0.1:${ADMIN[$node]}" --metrics-addr "127.0.0.1:${METRICS[$node]}" \
			--readiness-addr "127.0.0.1:${READY[$node]}" --drain-timeout 1s
	done
	cmd_line "controlplane token --node node-a --out node-a.token   # a node token: pods on node-a only"
	cmd_line "dataplane run --proxy-mode shared --inpod true --node-name node-a --auth-token node-a.token ..."
	wait_until "node-a capturing sleep" 30 "$WORK/logs/dataplane-node-a.log" captured node-a sleep
	wait_until "node-b capturing web-1 and web-2" 30 "$WORK/logs/dataplane-node-b.log" captured node-b web-1 web-2
	for node in "${NODES[@]}"; do
		wait_until "$node ready" 30 "$WORK/logs/dataplane-$node.log" dp_ready "$node"
		dump "$node" || die "GET /config_dump on $node" "$WORK/logs/dataplane-$node.log"
	done
	ok "both dataplanes ready (admin: curl 127.0.0.1:${ADMIN[node-a]}/config_dump and 127.0.0.1:${ADMIN[node-b]}/config_dump)"
	say "pods, from each dataplane's /config_dump (\"pods\"):"
	for node in "${NODES[@]}"; do
		python3 - "$WORK/dump-$node.json" "$node" <<'PY' | indent
import json, sys
dump, node = json.load(open(sys.argv[1])), sys.argv[2]
for p in dump.get("pods") or []:
    name = p["uid"].split("//Pod/", 1)[-1]
    where = f'in {p["netns"]}' if p.get("netns") else p.get("error", "")
    print(f'{node}: {p["state"]} {name} ({", ".join(p["ips"])}) {where}')
PY
	done
	say "legacy/legacy is not enrolled: no capture rules, no listeners in its namespace"
	say "workload certificates the dataplanes hold (issued by the control plane's CA):"
	for node in "${NODES[@]}"; do
		python3 - "$WORK/dump-$node.json" "$node" <<'PY' | indent
import json, sys
dump, node = json.load(open(sys.argv[1])), sys.argv[2]
for c in dump.get("certificates") or []:
    print(f'{node}: {c["identity"]}  serial {c.get("serial", "-")}  {c["state"]} until {c.get("notAfter", "-")}')
PY
	done

	step "A request across nodes, through HBONE"
	local spec pod
	for spec in "${PODS[@]}"; do
		pod=${spec%%:*}
		spawn "$WORK/logs/app-$pod.log" ip netns exec "$PREFIX-$pod" \
			python3 "$DEMO_SRC/app.py" "$pod" "$(pod_field "$pod" 1)" 8080
	done
	for spec in web-1 web-2; do
		wait_until "app in $spec listening" 10 "$WORK/logs/app-$spec.log" \
			grep -q listening "$WORK/logs/app-$spec.log"
	done
	say "sleep (node-a) calls the web Service's virtual IP; it knows nothing of the mesh:"
	cmd_line "ip netns exec $PREFIX-sleep curl http://$VIP/      # web.demo.svc.cluster.local"
	local answer i
	for i in 1 2; do
		answer=$(request_from sleep "http://$VIP/") || die "the request from sleep to $VIP failed: $answer" "$WORK/logs/dataplane-node-a.log"
		say "  $answer"
	done
	wait_log node-a 10 "connection complete" 'direction="outbound"' 'src.workload="sleep"' 'dst.identity='
	wait_log node-b 10 "connection complete" 'direction="inbound"' 'src.identity="spiffe://cluster.local/ns/demo/sa/sleep"'
	say "the access logs of both dataplanes (one line each, abridged):"
	say "node-a, leaving sleep's namespace:"
	access_log node-a "connection complete" 'direction="outbound"' 'src.workload="sleep"' | fold -s -w 96 | sed 's/ *$//' | indent | indent
	say "node-b, arriving in the web pod's namespace:"
	access_log node-b "connection complete" 'direction="inbound"' 'src.identity="spiffe://cluster.local/ns/demo/sa/sleep"' |
		fold -s -w 96 | sed 's/ *$//' | indent | indent
	ok "mutual TLS between spiffe://cluster.local/ns/demo/sa/sleep and spiffe://cluster.local/ns/demo/sa/web; the app still sees sleep's own address"
	answer=$(request_from legacy "http://10.55.2.10:8080/") || die "legacy -> web-1 failed: $answer" "$WORK/logs/dataplane-node-b.log"
	say "legacy (not in the mesh) calls web-1's pod IP in plaintext: \"$answer\""
	say "  (captured on arrival, allowed with no identity: no policy says otherwise yet)"

	step "An AuthorizationPolicy: web refuses sleep"
	cp "$DEMO_SRC/policy/deny-sleep-to-web.yaml" "$WORK/config/.deny-sleep.tmp"
	mv "$WORK/config/.deny-sleep.tmp" "$WORK/config/deny-sleep.yaml"
	cmd_line "cp examples/demo/policy/deny-sleep-to-web.yaml $WORK/config/deny-sleep.yaml"
	sed -n '/^apiVersion/,$p' "$DEMO_SRC/policy/deny-sleep-to-web.yaml" | indent
	local written
	written=$(now_ms)
	wait_until "node-b receiving the policy" 10 "$WORK/logs/controlplane.log" policy_known node-b
	ok "node-b's dataplane has demo/deny-sleep, $(($(now_ms) - written)) ms after the file was written"
	cmd_line "ip netns exec $PREFIX-sleep curl http://$VIP/"
	if answer=$(request_from sleep "http://$VIP/"); then
		die "the request was served despite the policy: $answer" "$WORK/logs/dataplane-node-b.log"
	fi
	say "  $answer"
	wait_log node-b 10 "denied by authorization policy" "sa/sleep"
	say "node-b's log, \"connection denied by authorization policy\":"
	FIELDS="src.addr src.identity dst.addr dst.workload reason" access_log node-b "denied by authorization policy" "sa/sleep" |
		fold -s -w 96 | sed 's/ *$//' | indent | indent
	ok "denied: web's dataplane checked sleep's verified identity against the policy"

	step "A PeerAuthentication: STRICT mTLS refuses legacy's plaintext"
	cp "$DEMO_SRC/policy/strict-demo.yaml" "$WORK/config/.strict.tmp"
	mv "$WORK/config/.strict.tmp" "$WORK/config/strict-demo.yaml"
	cmd_line "cp examples/demo/policy/strict-demo.yaml $WORK/config/strict-demo.yaml"
	sed -n '/^apiVersion/,$p' "$DEMO_SRC/policy/strict-demo.yaml" | indent
	written=$(now_ms)
	wait_until "node-b receiving the converted policy" 10 "$WORK/logs/controlplane.log" web_strict node-b yes
	ok "web-1 lists $STRICT_POLICY on node-b's dataplane, $(($(now_ms) - written)) ms after the file was written"
	say "what the control plane made of it (GET /api/v1/policies):"
	cp_curl "https://127.0.0.1:$CP_REST_PORT/api/v1/policies" -o "$WORK/policies.json" 2>/dev/null || true
	python3 - "$WORK/policies.json" <<'PY' | indent || true
import json, sys
for p in json.load(open(sys.argv[1])):
    if p.get("convertedFrom"):
        origins = ", ".join(f'{o["kind"]} {o["namespace"]}/{o["name"]}' for o in p["convertedFrom"])
        print(f'{p["namespace"]}/{p["name"]}: {p["action"]} {p["scope"]} {json.dumps(p["rules"])}  <- {origins}')
PY
	cmd_line "ip netns exec $PREFIX-legacy curl http://10.55.2.10:8080/"
	if answer=$(request_from legacy "http://10.55.2.10:8080/"); then
		die "legacy's plaintext was served despite STRICT: $answer" "$WORK/logs/dataplane-node-b.log"
	fi
	say "  $answer"
	wait_log node-b 10 "plaintext connection denied by authorization policy" "$STRICT_POLICY"
	say "node-b's log and its refusal counter:"
	FIELDS="src.addr dst.addr dst.workload reason" access_log node-b "plaintext connection denied by authorization policy" "$STRICT_POLICY" |
		fold -s -w 96 | sed 's/ *$//' | indent | indent
	local_curl "http://127.0.0.1:${METRICS[node-b]}/metrics" 2>/dev/null | grep -E '^meshbox_proxy_connections_refused.*policy_denied' | indent | indent || true
	ok "refused: legacy has no mesh identity and demo is STRICT"
	rm "$WORK/config/strict-demo.yaml"
	wait_until "node-b lifting STRICT" 10 "$WORK/logs/controlplane.log" web_strict node-b no
	answer=$(request_from legacy "http://10.55.2.10:8080/") || die "legacy -> web-1 failed after STRICT was lifted: $answer" "$WORK/logs/dataplane-node-b.log"
	say "strict-demo.yaml removed again: legacy's plaintext is accepted once more: \"$answer\""

	waypoint_step

	step "A SPIFFE certificate with curl, from the REST API"
	local id=spiffe://cluster.local/ns/demo/sa/reporter
	cmd_line "TOKEN=\$(controlplane token --state-dir $WORK/state --identity $id)"
	local token
	token=$("$BIN_DIR/controlplane" token --state-dir "$WORK/state" --identity "$id" 2>"$WORK/logs/token.log") ||
		die "minting a workload token" "$WORK/logs/token.log"
	cmd_line "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj / -keyout reporter.key -out reporter.csr -addext subjectAltName=URI:$id"
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj / \
		-keyout "$WORK/reporter.key" -out "$WORK/reporter.csr" \
		-addext "subjectAltName=URI:$id" >"$WORK/logs/openssl.log" 2>&1 || die "openssl req" "$WORK/logs/openssl.log"
	cmd_line "curl --cacert root-cert.pem -H \"Authorization: Bearer \$TOKEN\" --data-binary @reporter.csr 'https://127.0.0.1:$CP_REST_PORT/api/v1/certificates?ttl=3600s' > reporter-chain.pem"
	local status
	status=$(cp_curl -w '%{http_code}' -o "$WORK/reporter-chain.pem" -H "Authorization: Bearer $token" \
		--data-binary "@$WORK/reporter.csr" "https://127.0.0.1:$CP_REST_PORT/api/v1/certificates?ttl=3600s" 2>&1) || true
	[[ $status == 200 ]] || die "POST /api/v1/certificates answered ${status:-nothing}: $(head -c 300 "$WORK/reporter-chain.pem" 2>/dev/null)" "$WORK/logs/controlplane.log"
	cmd_line "openssl verify -CAfile root-cert.pem reporter-chain.pem"
	local verified
	verified=$(openssl verify -CAfile "$WORK/state/root-cert.pem" "$WORK/reporter-chain.pem" 2>&1) ||
		die "the issued certificate does not verify: $verified"
	say "  ${verified##*/}"
	openssl x509 -in "$WORK/reporter-chain.pem" -noout -ext subjectAltName -serial -enddate 2>/dev/null |
		sed -e '/^X509v3/d' -e 's/^ *//' | indent
	ok "certificate issued for $id and verified against the mesh root"
	cp_curl "https://127.0.0.1:$CP_REST_PORT/api/v1/certificates" -o "$WORK/issued.json" 2>/dev/null || true
	say "the CA's recent issuances (GET /api/v1/certificates):"
	python3 - "$WORK/issued.json" <<'PY' | indent || true
import json, sys
items = json.load(open(sys.argv[1]))
items = items.get("certificates", items) if isinstance(items, dict) else items
for c in items[-6:]:
    print(f'{c.get("identity")}  for {c.get("requester", "?")}  serial {c.get("serial", "?")}')
PY

	step "Where to look next"
	local rest="https://127.0.0.1:$CP_REST_PORT" root="$WORK/state/root-cert.pem"
	if ((KEEP)); then
		say "The mesh keeps running until Ctrl-C. Try:"
	else
		say "Run again with --keep to leave the mesh running, then try:"
	fi
	local -a tips=(
		"node-a's dataplane: pods, workloads, certificates, HBONE pool"
		"curl -s 127.0.0.1:${ADMIN[node-a]}/config_dump | less"
		"node-b's Istio TCP metrics"
		"curl -s 127.0.0.1:${METRICS[node-b]}/metrics | grep istio_tcp"
		"the capture rules inside a pod"
		"ip netns exec $PREFIX-web-1 iptables-save"
	)
	tips+=(
		"a POST from sleep (403 from the waypoint), then a GET"
		"ip netns exec $PREFIX-sleep curl -d hi http://$VIP/; ip netns exec $PREFIX-sleep curl http://$VIP/"
		"the waypoint's routes, policies and certificates"
		"ip netns exec $PREFIX-$WAYPOINT_POD curl -s 127.0.0.1:15000/config_dump | less"
		"lift the HTTP policy, or the split"
		"rm $WORK/config/allow-get.yaml $WORK/config/route-90-10.yaml"
	)
	tips+=(
		"make the demo namespace STRICT again (legacy is refused)"
		"cp $DEMO_SRC/policy/strict-demo.yaml $WORK/config/"
		"the control plane: connected dataplanes, versions sent and ACKed"
		"curl -s --cacert $root $rest/api/v1/dataplanes"
		"access logs"
		"tail -f $WORK/logs/dataplane-node-b.log"
	)
	tips+=("the waypoint's access log" "tail -f $WORK/logs/waypoint.log")
	local t
	for ((t = 0; t < ${#tips[@]}; t += 2)); do
		printf '    %s# %s%s\n    %s\n' "$DIM" "${tips[t]}" "$RESET" "${tips[t + 1]}"
	done
	say "examples/README.md explains each step."
	if ((KEEP)); then
		say "${BOLD}Running; Ctrl-C to stop and clean up.${RESET}"
		# In the foreground, so Ctrl-C reaches it; the INT trap then cleans up.
		while :; do sleep 1 9>&-; done
	fi
}

now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }

policy_known() {
	dump "$1" || return 1
	python3 - "$WORK/dump-$1.json" <<'PY'
import json, sys
sys.exit(0 if any(p.get("key") == "demo/deny-sleep" for p in json.load(open(sys.argv[1])).get("policies") or []) else 1)
PY
}

readonly STRICT_POLICY=istio-system/istio_converted_static_strict

# Whether (yes/no) web-1 lists the converted STRICT policy, and node $1's
# dataplane has it, in node $1's /config_dump.
web_strict() {
	dump "$1" || return 1
	python3 - "$WORK/dump-$1.json" "$STRICT_POLICY" "$2" <<'PY'
import json, sys
dump, key, want = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3] == "yes"
listed = any(w.get("name") == "web-1" and key in (w.get("authorizationPolicies") or []) for w in dump.get("workloads") or [])
known = any(p.get("key") == key for p in dump.get("policies") or [])
sys.exit(0 if (listed and known) == want and (want or not listed) else 1)
PY
}

# Builds the release binaries with the cargo check_rust found (as the user
# who owns the checkout when run with sudo, so target/ stays theirs) and
# points BIN_DIR at them.
build_release() {
	local -a packages=(-p meshbox-controlplane -p meshbox-dataplane -p meshbox-waypoint)
	[[ -n $BUILD_USER ]] && say "building as $BUILD_USER, who owns the checkout"
	cmd_line "cargo build --release ${packages[*]}   # the first build takes a few minutes"
	run_logged "building" "$WORK/logs/build.log" \
		"${CARGO_RUN[@]}" build --release --manifest-path "$REPO/Cargo.toml" "${packages[@]}"
	local target
	target=$("${CARGO_RUN[@]}" metadata --format-version 1 --no-deps --manifest-path "$REPO/Cargo.toml" 2>/dev/null |
		python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])') ||
		target=$REPO/target
	BIN_DIR=$target/release
}

# On one line, so bash has read all it will run before it starts: editing
# this file while a demo runs cannot change what the running one does.
main; exit
