//! Capture latency: how long a new pod waits, at sandbox creation, for the
//! node agent to capture it — the time from the chained CNI plugin's ADD to
//! its answer, which comes only once the pod's rules and listeners are in
//! place (or fails, and the pod does not start).
//!
//! The lab: one "node" network namespace with the control plane (serving a
//! manifest folder that lists the pods, as the API server would) and a
//! node-mode dataplane (`--inpod true --cni-socket`); pods are network
//! namespaces made one after another as a container runtime makes
//! sandboxes. For each, the runtime's CNI chain runs exactly as libcni runs
//! it: Debian's `bridge` plugin with `host-local` IPAM (the primary CNI;
//! it creates the veth and assigns the pod's IP) inside the node, then
//! `meshbox-cni` with the primary plugin's result as `prevResult`, each a
//! fresh process with the `CNI_*` environment and its configuration on
//! stdin. Both are timed the same way (spawn to exit), so the primary
//! plugin is the baseline in the same run. Each pod is checked captured in
//! the agent's `/config_dump` the moment ADD returns.
//!
//! Two kinds of pod, because the agent decides differently:
//! - known: the control plane already has the pod (in the manifest folder
//!   with its IP); ADD captures at once. This is the figure.
//! - not yet known, in an enrolled namespace: the agent waits up to 3 s for
//!   the control plane, then captures on the namespace's word (failing
//!   closed). In Kubernetes a new pod has no IP in the API until its CNI ADD
//!   returned, so this is what a cluster sees today.
//!
//! The sandboxes are network namespaces bind-mounted in a directory of the
//! benchmark's own (as Docker keeps them in /var/run/docker/netns), not in
//! /var/run/netns: the agent also scans /var/run/netns every few seconds for
//! known pods' addresses, and a pod it found that way before meshbox-cni
//! ran would make ADD a no-op, or race it. Here the agent learns of a new
//! sandbox only from the CNI plugin — the path measured.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use crate::chart::{Chart, Series};
use crate::host::{rss_kib, sibling_binary};
use crate::lab::{self, Lab, NodeDataplane};
use crate::numbers::num;
use crate::section::{Section, Table};
use crate::stats::{ms, percentile};

pub const NAME: &str = "Dataplane: capture latency (CNI ADD to captured)";

#[derive(clap::Args)]
pub struct CaptureArgs {
    /// Fewer pods (20 known, 1 not yet known), for CI.
    #[arg(long)]
    pub quick: bool,
    /// Pods the control plane knows, created and captured one after another
    /// (default 100; --quick 20).
    #[arg(long)]
    pods: Option<usize>,
    /// Pods the control plane does not know yet, in an enrolled namespace
    /// (each waits for the control plane first; default 5, --quick 1).
    #[arg(long)]
    unknown: Option<usize>,
    /// Keep the work directory (logs, manifests) instead of removing it.
    #[arg(long)]
    keep_logs: bool,
}

const NAMESPACE: &str = "capture";
const NODE: &str = "capture-node";
/// Where Debian (and most distributions' CNI packages) put the plugins.
const CNI_DIRS: [&str; 2] = ["/usr/lib/cni", "/opt/cni/bin"];

fn cni_dir() -> Option<PathBuf> {
    CNI_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("bridge").is_file() && d.join("host-local").is_file())
}

/// Why this part cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    crate::host::missing_for_lab(&[
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("iptables-restore", "iptables"),
        ("curl", "curl"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("mount", "mount"),
    ])
    .or_else(|| {
        cni_dir().is_none().then(|| {
            "the bridge and host-local CNI plugins are missing: apt-get install containernetworking-plugins"
                .to_owned()
        })
    })
    .or_else(|| crate::host::missing_siblings(&["controlplane", "dataplane", "meshbox-cni"]))
}

pub async fn run(args: CaptureArgs) -> anyhow::Result<Section> {
    lab::run_blocking(move || Capture::run(args)).await
}

/// A pod's IP: 10.88.{1..}.{2..251} for known pods, 10.88.200.x for the
/// others.
fn pod_ip(i: usize, known: bool) -> String {
    if known {
        format!("10.88.{}.{}", 1 + i / 250, i % 250 + 2)
    } else {
        format!("10.88.200.{}", i % 250 + 2)
    }
}

fn pod_name(i: usize, known: bool) -> String {
    if known {
        format!("pod-{i}")
    } else {
        format!("late-{i}")
    }
}

fn manifests(pods: usize) -> String {
    let mut out = format!(
        "# Written by `bench capture`: the pods its node will run, as the API server lists them.
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    istio.io/dataplane-mode: ambient
"
    );
    for i in 0..pods {
        let (name, ip) = (pod_name(i, true), pod_ip(i, true));
        out.push_str(&format!(
            "---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NAMESPACE}
  labels:
    app: capture
spec:
  nodeName: {NODE}
  serviceAccountName: capture
  containers:
  - name: app
    image: debian:bookworm
status:
  phase: Running
  podIP: {ip}
  podIPs:
  - ip: {ip}
"
        ));
    }
    out
}

/// One plugin run's outcome.
struct Invocation {
    took: Duration,
    ok: bool,
    stdout: String,
    stderr: String,
}

/// The CNI chain of the node, run the way libcni runs a conflist.
struct Chain {
    list: Value,
    cni_path: String,
    /// `bridge` and `meshbox-cni`.
    binaries: [PathBuf; 2],
    /// The node namespace, entered by plugins that need it (the bridge).
    node_netns: std::fs::File,
}

impl Chain {
    /// Runs plugin `index` of the list with `command`; `pod` gives the
    /// CNI_* values. The plugin runs as a fresh process; the bridge plugin
    /// inside the node namespace (entered between fork and exec, as a
    /// runtime on that node would already be in it).
    fn invoke(
        &self,
        index: usize,
        command: &str,
        pod: &PodSpec,
        prev_result: Option<&Value>,
    ) -> anyhow::Result<Invocation> {
        let mut conf = self.list["plugins"][index].clone();
        conf["cniVersion"] = self.list["cniVersion"].clone();
        conf["name"] = self.list["name"].clone();
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev.clone();
        }
        let mut cmd = Command::new(&self.binaries[index]);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", &pod.netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", &pod.cni_args)
            .env("CNI_PATH", &self.cni_path);
        if index == 0 {
            let fd = self.node_netns.as_raw_fd();
            // SAFETY: between fork and exec only setns(2) runs, which is
            // async-signal-safe; the fd stays open until exec.
            unsafe {
                cmd.pre_exec(move || {
                    if nix::libc::setns(fd, nix::libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let (took, out) = lab::run_timed(&mut cmd, &serde_json::to_vec(&conf)?)?;
        Ok(Invocation {
            took,
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

struct PodSpec {
    name: String,
    /// The namespace's tag in the lab.
    tag: String,
    netns_path: PathBuf,
    container_id: String,
    cni_args: String,
}

/// What happened to one pod.
struct Outcome {
    add: Duration,
    primary: Duration,
}

struct Capture {
    lab: Lab,
    /// Where the sandboxes' namespaces are mounted.
    netns_dir: PathBuf,
    chain: Chain,
    node: NodeDataplane,
    failures: Vec<String>,
}

impl Capture {
    fn run(args: CaptureArgs) -> anyhow::Result<Section> {
        let pods = args.pods.unwrap_or(if args.quick { 20 } else { 100 });
        let unknown = args.unknown.unwrap_or(if args.quick { 1 } else { 5 });
        ensure!(
            (1..=2500).contains(&pods) && unknown <= 250,
            "--pods must be 1..=2500, --unknown at most 250"
        );
        let work =
            std::env::temp_dir().join(format!("meshbox-bench-capture-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        if args.keep_logs {
            eprintln!("logs kept in {}", work.display());
        } else {
            lab::remove_at_exit(&work);
        }
        let (guard, lab) = Lab::create("mbc", None)?;
        let result = (|| {
            let node_ns = lab.add_netns("node")?;
            // Before the dataplane starts, so it sees the sandboxes mounted
            // here later.
            let netns_dir = work.join("netns");
            lab.shared_dir(&netns_dir)?;
            let config = work.join("config");
            std::fs::create_dir_all(&config)?;
            std::fs::write(config.join("pods.yaml"), manifests(pods))?;
            let state = work.join("state");
            eprintln!("==> control plane and node dataplane in {node_ns}");
            let grpc = "127.0.0.1:15012".parse()?;
            lab::start_control_plane(
                &node_ns,
                &config,
                &state,
                grpc,
                &work.join("controlplane.log"),
            )?;
            let socket = work.join("cni.sock");
            let socket_arg = socket.to_string_lossy().into_owned();
            let node = NodeDataplane::start(
                &node_ns,
                NODE,
                grpc,
                &state,
                &work,
                None,
                &["--cni-socket", &socket_arg],
            )?;
            // Before the first sandbox: the agent knows every pod (pending,
            // no namespace yet), as a node does once its pods are scheduled.
            let mut states = vec![];
            lab::wait_for(
                "the dataplane to know the pods",
                Duration::from_secs(30),
                || {
                    states = node.pod_states().unwrap_or_default();
                    states.len() >= pods
                },
            )
            .with_context(|| format!("{} of {pods} pods known", states.len()))?;

            let cni_dir = cni_dir().context("CNI plugins")?;
            let list = json!({
                "cniVersion": "1.0.0",
                "name": "mbc-bench",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "mbc0",
                        "isGateway": true,
                        "ipMasq": false,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]],
                            "dataDir": work.join("ipam"),
                        },
                    },
                    {"type": "meshbox-cni", "socket": socket, "timeout": "10s"},
                ],
            });
            let meshbox_cni = sibling_binary("meshbox-cni")?;
            let cni_path = std::env::join_paths([
                cni_dir.clone(),
                meshbox_cni
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            ])?
            .to_string_lossy()
            .into_owned();
            let chain = Chain {
                list,
                cni_path,
                binaries: [cni_dir.join("bridge"), meshbox_cni],
                node_netns: std::fs::File::open(format!("/var/run/netns/{node_ns}"))?,
            };
            let mut capture = Capture {
                lab,
                netns_dir,
                chain,
                node,
                failures: vec![],
            };
            let result = capture.measure(pods, unknown);
            // Keep the lab alive until here: the guard removes it.
            drop(capture);
            result
        })();
        if result.is_err() && !lab::interrupted() {
            for name in [format!("dataplane-{NODE}.log"), "controlplane.log".into()] {
                let path = work.join(&name);
                if path.exists() {
                    eprintln!("--- last lines of {name}:\n{}", lab::tail(&path));
                }
            }
        }
        drop(guard);
        result
    }

    fn pod(&self, i: usize, known: bool) -> PodSpec {
        let name = pod_name(i, known);
        let tag = format!("{}{i}", if known { "p" } else { "u" });
        let netns = self.lab.netns_name(&tag);
        let container_id = format!("{netns}-sandbox");
        PodSpec {
            cni_args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={name};\
                 K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={name}-uid;IP={}",
                pod_ip(i, known)
            ),
            netns_path: self.netns_dir.join(&netns),
            name,
            tag,
            container_id,
        }
    }

    /// Creates pod `i`'s sandbox and runs the chain's ADD; checks the pod
    /// is captured when meshbox-cni returns.
    fn add(&mut self, i: usize, known: bool) -> anyhow::Result<Option<Outcome>> {
        let spec = self.pod(i, known);
        self.lab.add_private_netns(&self.netns_dir, &spec.tag)?;
        let primary = self.chain.invoke(0, "ADD", &spec, None)?;
        if !primary.ok {
            bail!(
                "bridge ADD for {}: {}{}",
                spec.name,
                primary.stdout,
                primary.stderr
            );
        }
        let prev: Value = serde_json::from_str(&primary.stdout)
            .with_context(|| format!("bridge ADD printed {:?}", primary.stdout))?;
        let add = self.chain.invoke(1, "ADD", &spec, Some(&prev))?;
        if !add.ok {
            self.failures.push(format!(
                "{}: ADD failed: {} (stderr: {})",
                spec.name,
                add.stdout.trim(),
                add.stderr.trim()
            ));
            return Ok(None);
        }
        let result: Value = serde_json::from_str(&add.stdout).unwrap_or(Value::Null);
        if result["ips"] != prev["ips"] {
            self.failures.push(format!(
                "{}: ADD did not pass the primary plugin's result on: {}",
                spec.name, add.stdout
            ));
        }
        let uid_suffix = format!("/{NAMESPACE}/{}", spec.name);
        let captured = self
            .node
            .pod_states()?
            .iter()
            .any(|(uid, state)| uid.ends_with(&uid_suffix) && state == "captured");
        if !captured {
            self.failures.push(format!(
                "{}: ADD returned but the agent does not show it captured",
                spec.name
            ));
            return Ok(None);
        }
        Ok(Some(Outcome {
            add: add.took,
            primary: primary.took,
        }))
    }

    /// The chain's DEL in reverse (meshbox-cni timed), then the sandbox
    /// goes.
    fn del(&mut self, i: usize, known: bool) -> anyhow::Result<Duration> {
        let spec = self.pod(i, known);
        let del = self.chain.invoke(1, "DEL", &spec, None)?;
        if !del.ok {
            self.failures.push(format!(
                "{}: DEL failed: {} (stderr: {})",
                spec.name,
                del.stdout.trim(),
                del.stderr.trim()
            ));
        }
        let _ = self.chain.invoke(0, "DEL", &spec, None)?;
        self.lab.remove_private_netns(&spec.netns_path);
        Ok(del.took)
    }

    fn measure(&mut self, pods: usize, unknown: usize) -> anyhow::Result<Section> {
        let rss_before = rss_kib(Some(self.node.pid));
        eprintln!("==> {pods} pods: sandbox, bridge ADD, meshbox-cni ADD, one after another");
        let mut known = vec![];
        for i in 0..pods {
            if let Some(o) = self.add(i, true)? {
                known.push(o);
            }
            self.node.ensure_alive()?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let rss_after = rss_kib(Some(self.node.pid));
        let captured_known = known.len();
        eprintln!("==> {unknown} pods the control plane does not know yet");
        let mut late = vec![];
        for i in 0..unknown {
            if let Some(o) = self.add(i, false)? {
                late.push(o);
            }
        }
        eprintln!("==> DEL");
        let mut dels = vec![];
        for i in 0..pods {
            dels.push(ms(self.del(i, true)?));
        }
        for i in 0..unknown {
            dels.push(ms(self.del(i, false)?));
        }

        let add: Vec<f64> = known.iter().map(|o| ms(o.add)).collect();
        let primary: Vec<f64> = known.iter().map(|o| ms(o.primary)).collect();
        let late_add: Vec<f64> = late.iter().map(|o| ms(o.add)).collect();
        let failed = self.failures.len();

        let mut s = Section::new("capture", NAME);
        s.note(format!(
            "{pods} pods the control plane knows, made one after another: a network namespace (the \
             sandbox, mounted outside /var/run/netns so only the CNI plugin tells the agent about it), then the node's CNI chain as a runtime runs it — Debian's bridge + host-local \
             (the primary CNI, run inside the node namespace), then meshbox-cni with the bridge's \
             result as prevResult; each plugin a fresh process with CNI_COMMAND/CNI_CONTAINERID/\
             CNI_NETNS/CNI_IFNAME/CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME) and its configuration \
             on stdin, timed from spawn to exit. Every pod was checked captured in the agent's \
             /config_dump as soon as its ADD returned."
        ));
        if unknown > 0 {
            s.note(format!(
                "{unknown} more pod(s) in the same enrolled namespace that the control plane has no \
                 record of at all: its enrollment lookup cannot answer, so the agent waits up to 3 s \
                 for the pod, then captures on the namespace's word. In Kubernetes the pod object \
                 exists before its sandbox, so the lookup answers at once (from the pod's and \
                 namespace's labels, before the pod has an IP); this row is the fallback."
            ));
        }
        for f in self.failures.iter().take(10) {
            s.note(format!("failure: {f}"));
        }
        let mut table = Table {
            title: String::new(),
            columns: ["", "pods", "p50", "p90", "p99", "max"]
                .map(String::from)
                .to_vec(),
            rows: vec![],
        };
        let mut line = |what: &str, v: &[f64]| {
            table.rows.push(vec![
                what.into(),
                v.len().to_string(),
                format!("{} ms", num(percentile(v, 0.5))),
                format!("{} ms", num(percentile(v, 0.9))),
                format!("{} ms", num(percentile(v, 0.99))),
                format!("{} ms", num(percentile(v, 1.0))),
            ]);
        };
        line(
            "meshbox-cni ADD, pod known to the control plane (to captured)",
            &add,
        );
        line(
            "bridge + host-local ADD (the primary CNI, baseline)",
            &primary,
        );
        if !late_add.is_empty() {
            line(
                "meshbox-cni ADD, pod not yet known (enrolled namespace)",
                &late_add,
            );
        }
        line("meshbox-cni DEL", &dels);
        s.tables.push(table);
        for (id, what, v) in [
            ("add", "meshbox-cni ADD to captured", &add),
            ("primary_add", "bridge + host-local ADD", &primary),
            (
                "unknown_add",
                "meshbox-cni ADD, pod not yet known",
                &late_add,
            ),
            ("del", "meshbox-cni DEL", &dels),
        ] {
            if v.is_empty() {
                continue;
            }
            for (p, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)] {
                s.table_row(
                    &format!("{id}_{p}_ms"),
                    &format!("{what} {p}"),
                    percentile(v, q),
                    "ms",
                );
            }
        }
        s.compared(
            "add_vs_primary_p50",
            "capture (meshbox-cni ADD) vs the primary CNI's ADD, p50",
            percentile(&add, 0.5),
            percentile(&primary, 0.5),
            "ms",
        );
        s.row(
            "failed_adds",
            "ADDs that failed or left the pod uncaptured",
            failed as f64,
            "",
        );
        s.row(
            "dataplane_rss_mib",
            &format!("dataplane RSS with {captured_known} pods captured"),
            rss_after as f64 / 1024.0,
            "MiB",
        );
        s.row(
            "dataplane_kib_per_pod",
            "dataplane memory per captured pod (RSS growth / pods)",
            (rss_after as f64 - rss_before as f64) / captured_known.max(1) as f64,
            "KiB",
        );
        let cdf = |v: &[f64]| -> Vec<(f64, f64)> {
            let mut sorted = v.to_vec();
            sorted.sort_by(f64::total_cmp);
            let n = sorted.len().max(1) as f64;
            sorted
                .iter()
                .enumerate()
                .map(|(i, &x)| (100.0 * (i + 1) as f64 / n, x))
                .collect()
        };
        s.charts.push(Chart::lines(
            "capture-latency.svg",
            &format!("CNI ADD latency over {} pods (sorted)", add.len()),
            "percentile",
            "ms from spawn to exit",
            vec![
                Series::new("meshbox-cni ADD (to captured)", cdf(&add)),
                Series::new("bridge + host-local ADD (primary CNI)", cdf(&primary)),
            ],
        ));
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_addresses_are_distinct_and_in_range() {
        let mut ips: Vec<String> = (0..2500).map(|i| pod_ip(i, true)).collect();
        ips.extend((0..250).map(|i| pod_ip(i, false)));
        let n = ips.len();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), n);
        for ip in &ips {
            let octets: Vec<u8> = ip.split('.').map(|o| o.parse().unwrap()).collect();
            assert_eq!(&octets[..2], &[10, 88]);
            assert!(octets[3] >= 2, "{ip} is the gateway or network");
        }
        let yaml = manifests(3);
        assert_eq!(yaml.matches("kind: Pod").count(), 3);
        assert!(yaml.contains("podIP: 10.88.1.4"));
    }
}
