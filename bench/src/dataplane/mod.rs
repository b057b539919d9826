//! The dataplane through real in-pod capture: two "nodes" and four "pods",
//! all network namespaces on one bridge. Each node runs a `dataplane` in
//! node mode with `--inpod true`, as a cluster would: its agent learns from
//! the control plane which pods on its node are enrolled, finds their
//! namespaces, installs the redirection rules inside them and opens the
//! proxy's listeners there. The meshed client pod is on node A, the meshed
//! server pod on node B, so traffic crosses nodes over HBONE. Next to them,
//! on the same bridge and the same nodes, a second pair of pods in a
//! namespace that is not enrolled: the direct baseline. Every test runs
//! direct, then meshed, back to back in the same run; figures are ratios
//! meshed / direct.
//!
//! Why a second pair rather than the same pods before capture: the two
//! paths can then be measured alternately, test by test, so a noisy
//! neighbour on this shared machine hits both sides of a ratio alike; and
//! the meshed pods never change state half-way through the run.
//!
//! Measured: iperf3 bulk throughput (1 and 4 streams) with the CPU seconds
//! per GB moved; wrk against nginx with 10 and 100 keep-alive connections
//! and with a new connection per request (requests/s, p50/p90/p99); idle
//! connections held open end to end, in steps (setup rate; the dataplanes'
//! resident memory per connection and against the number of connections);
//! the dataplanes' resident memory idle and under load.
//!
//! Every meshed figure is checked against the dataplanes' own metrics
//! (`istio_tcp_connections_opened_total`, `istio_tcp_received_bytes_total`,
//! `meshbox_proxy_active_connections` on :15020): a capture that lets
//! traffic bypass the proxies fails the run instead of reporting direct
//! numbers as meshed.
//!
//! Then, side by side ([`dedicated`]): our dataplane and (with `--ztunnel
//! PATH`) a stock Istio ztunnel, each in dedicated mode in pods of their
//! own with Istio's in-pod rules, measured in interleaved rounds with the
//! direct pair; the same cross-check applies to both.

mod dedicated;
mod load;

pub use load::{RateArgs, RateResult, rate};

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::chart::{Bar, Chart, Series};
use crate::host::{cpu_seconds, rss_kib};
use crate::lab::{self, Lab, NodeDataplane, Pod};
use crate::numbers::{num, percent};
use crate::section::{Section, Table};
use crate::stats::{Samples, metric_sum, slope};

pub const NAME: &str = "Dataplane: meshed (in-pod capture, two node dataplanes, HBONE) vs direct";

#[derive(clap::Args)]
pub struct DataplaneArgs {
    /// Short runs (2 s per test, 1 000 idle connections), for CI.
    #[arg(long)]
    pub quick: bool,
    /// Seconds per throughput and request-rate test (default 10; --quick 2).
    #[arg(long)]
    seconds: Option<u64>,
    /// Idle tunneled connections for the memory test (default 10 000;
    /// --quick 1 000).
    #[arg(long)]
    connections: Option<usize>,
    /// Rounds of each throughput and request-rate test (direct then meshed,
    /// alternating); the report shows the median of each figure. Default 1,
    /// and 3 for the side-by-side tests when --ztunnel is given.
    #[arg(long)]
    rounds: Option<u32>,
    /// A stock Istio ztunnel binary, measured side by side with our
    /// dataplane in the same seats (dedicated mode, one per pod).
    #[arg(long)]
    pub ztunnel: Option<PathBuf>,
    /// Requests per second of the fixed-rate latency test (side by side).
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Idle tunneled connections for the side-by-side memory test (default
    /// 2 000; --quick 200).
    #[arg(long)]
    dedicated_connections: Option<usize>,
    /// Keep the work directory (dataplane and control-plane logs, manifests,
    /// nginx config) instead of removing it.
    #[arg(long)]
    keep_logs: bool,
}

/// The helper processes of the idle-connection test (`bench hold`).
#[derive(clap::Args)]
pub struct HoldArgs {
    /// Hold every connection accepted on this address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Open `--count` connections to this address and hold them.
    #[arg(long)]
    connect: Option<SocketAddr>,
    #[arg(long, default_value_t = 0)]
    count: usize,
    /// With `--connect`: each connection is HTTP/2 (prior knowledge) and
    /// GETs this path once before it idles, instead of waiting for a byte.
    #[arg(long, value_name = "PATH")]
    http2: Option<String>,
}

const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The control plane's own namespace on the bridge.
const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 4);
const MESH_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
const MESH_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
const DIRECT_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 21);
const DIRECT_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 22);
pub(crate) const NGINX_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const HOLD_PORT: u16 = 7000;
const NAMESPACE: &str = "bench";
const DIRECT_NAMESPACE: &str = "bench-direct";
/// Connections opened concurrently by the idle-connection client.
pub(crate) const HOLD_BATCH: usize = 200;
/// Steps of the idle-connection test (memory is read after each).
pub(crate) const HOLD_STEPS: usize = 4;
/// File descriptors wanted for the dataplanes and the connection holders
/// (capped at this process's hard limit).
const NOFILE: u64 = 65_536;

const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("iptables-restore", "iptables"),
    ("iperf3", "iperf3"),
    ("wrk", "wrk"),
    ("nginx", "nginx-light"),
    ("curl", "curl"),
    ("prlimit", "util-linux"),
    ("sysctl", "procps"),
];

/// Why this part cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    crate::host::missing_for_lab(TOOLS)
        .or_else(|| crate::host::missing_siblings(&["controlplane", "dataplane"]))
}

pub async fn run(args: DataplaneArgs) -> anyhow::Result<Section> {
    lab::run_blocking(move || Bench::run(args)).await
}

/// Counters scraped from a dataplane's `/metrics`, and its CPU time.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    opened: f64,
    refused: f64,
    received_bytes: f64,
    active: f64,
    cpu: f64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, b: Counters) -> Counters {
        Counters {
            opened: self.opened - b.opened,
            refused: self.refused - b.refused,
            received_bytes: self.received_bytes - b.received_bytes,
            active: self.active - b.active,
            cpu: self.cpu - b.cpu,
        }
    }
}

/// Both proxies' counters once the connections a test opened have closed
/// (bytes are counted when a connection closes), or after 10 s.
fn settled(
    before: &[Counters; 2],
    scrape: impl Fn() -> anyhow::Result<[Counters; 2]>,
) -> anyhow::Result<[Counters; 2]> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = scrape()?;
        let closed = after.iter().zip(before).all(|(a, b)| a.active <= b.active);
        if closed || Instant::now() > deadline {
            return Ok(after);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the dataplanes did during one meshed test.
struct MeshDelta {
    client: Counters,
    server: Counters,
    /// Highest RSS (KiB) sampled during the test, per node.
    peak_rss_kib: [u64; 2],
}

impl MeshDelta {
    fn cpu(&self) -> f64 {
        self.client.cpu + self.server.cpu
    }

    /// Fails unless both dataplanes carried at least `connections`
    /// connections and, when given, `bytes` bytes from client to server.
    fn check(&self, what: &str, connections: f64, bytes: Option<f64>) -> anyhow::Result<String> {
        for (side, c) in [("client", &self.client), ("server", &self.server)] {
            ensure!(
                c.opened >= connections,
                "{what}: the {side} side's proxy counted {} connections, expected at least {connections}: \
                 the traffic did not go through the mesh (is the capture broken?)",
                c.opened
            );
            if let Some(bytes) = bytes {
                ensure!(
                    c.received_bytes >= 0.9 * bytes,
                    "{what}: the {side} side's proxy carried {} bytes from the client, the test moved {bytes}: \
                     traffic bypassed the mesh",
                    c.received_bytes
                );
            }
        }
        let refused = self.client.refused + self.server.refused;
        Ok(format!(
            "{what}: proxies counted {}/{} connections (client/server side){}{}",
            self.client.opened,
            self.server.opened,
            if refused > 0.0 {
                format!(", {refused} refused")
            } else {
                String::new()
            },
            bytes
                .map(|b| format!(
                    ", {:.2}/{:.2} GB from the client (test: {:.2} GB)",
                    self.client.received_bytes / 1e9,
                    self.server.received_bytes / 1e9,
                    b / 1e9
                ))
                .unwrap_or_default()
        ))
    }
}

struct Bench {
    quick: bool,
    seconds: u64,
    rounds: u32,
    connections: usize,
    work: PathBuf,
    mesh_client: Pod,
    mesh_server: Pod,
    direct_client: Pod,
    direct_server: Pod,
    /// Node A (the client pods) and node B (the server pods).
    nodes: [NodeDataplane; 2],
    bench_exe: PathBuf,
    section: Section,
    /// Checks of the metrics cross-check, one per test (in the notes).
    cross_checks: Vec<String>,
    /// Highest RSS per node under load, KiB.
    peak_under_load: [u64; 2],
    /// RSS (KiB) per node after each step of the idle-connection test.
    held: Vec<(usize, [u64; 2])>,
    /// The side-by-side part's seats and settings.
    side_by_side: SideBySide,
}

/// What the side-by-side part needs from the lab (see [`dedicated`]).
struct SideBySide {
    ztunnel: Option<PathBuf>,
    ours: [Pod; 2],
    ztunnel_pods: Option<[Pod; 2]>,
    state: PathBuf,
    rounds: u32,
    seconds: u64,
    rate: u32,
    connections: usize,
}

impl Bench {
    fn run(args: DataplaneArgs) -> anyhow::Result<Section> {
        let seconds = args.seconds.unwrap_or(if args.quick { 2 } else { 10 });
        let connections = args
            .connections
            .unwrap_or(if args.quick { 1_000 } else { 10_000 });
        let bench_exe = std::env::current_exe()?;
        if let Some(path) = &args.ztunnel {
            ensure!(
                path.is_file(),
                "--ztunnel {}: no such file (build it as README.md's Benchmarks section says)",
                path.display()
            );
        }
        let ztunnel = args
            .ztunnel
            .as_deref()
            .map(std::path::absolute)
            .transpose()?;
        let dedicated_connections =
            args.dedicated_connections
                .unwrap_or(if args.quick { 200 } else { 2_000 });

        let work =
            std::env::temp_dir().join(format!("meshbox-bench-dataplane-{}", std::process::id()));
        std::fs::create_dir_all(&work)?;
        if args.keep_logs {
            eprintln!("logs kept in {}", work.display());
        } else {
            lab::remove_at_exit(&work);
        }
        let (guard, lab) = Lab::create("mbx", Some((BRIDGE_IP, 24)))?;

        let result = (|| {
            eprintln!(
                "==> network lab: bridge {} ({BRIDGE_IP}/24), {} namespaces",
                lab.bridge_name().unwrap_or_default(),
                if ztunnel.is_some() { 11 } else { 9 }
            );
            let control_plane = lab.add_pod("cp", CONTROL_PLANE_IP)?;
            let node_a = lab.add_pod("na", NODE_A_IP)?;
            let node_b = lab.add_pod("nb", NODE_B_IP)?;
            let mesh_client = lab.add_pod("mcli", MESH_CLIENT_IP)?;
            let mesh_server = lab.add_pod("msrv", MESH_SERVER_IP)?;
            let direct_client = lab.add_pod("dcli", DIRECT_CLIENT_IP)?;
            let direct_server = lab.add_pod("dsrv", DIRECT_SERVER_IP)?;
            let ours = [
                lab.add_pod("oc", dedicated::OURS_CLIENT_IP)?,
                lab.add_pod("os", dedicated::OURS_SERVER_IP)?,
            ];
            let ztunnel_pods = match ztunnel {
                Some(_) => Some([
                    lab.add_pod("zc", dedicated::ZTUNNEL_CLIENT_IP)?,
                    lab.add_pod("zs", dedicated::ZTUNNEL_SERVER_IP)?,
                ]),
                None => None,
            };

            let config = work.join("config");
            std::fs::create_dir_all(&config)?;
            std::fs::write(
                config.join("lab.yaml"),
                manifests_yaml(&mesh_client, &mesh_server, &direct_client, &direct_server),
            )?;

            eprintln!("==> control plane on {CONTROL_PLANE_IP}:15012");
            let state = work.join("state");
            let grpc = SocketAddr::from((CONTROL_PLANE_IP, 15012));
            lab::start_control_plane(
                &control_plane.netns,
                &config,
                &state,
                grpc,
                &work.join("controlplane.log"),
            )?;

            eprintln!("==> one node-mode dataplane per node, --inpod true");
            let limit = nofile();
            let captured_in = Instant::now();
            let mut nodes = vec![];
            for (netns, node) in [(&node_a.netns, "node-a"), (&node_b.netns, "node-b")] {
                nodes.push(NodeDataplane::start(
                    netns,
                    node,
                    grpc,
                    &state,
                    &work,
                    Some(&limit),
                    &[],
                )?);
            }
            let [a, b]: [NodeDataplane; 2] = nodes
                .try_into()
                .map_err(|_| anyhow::anyhow!("two dataplanes"))?;
            a.wait_captured(&[&format!("{NAMESPACE}/client")], Duration::from_secs(30))?;
            b.wait_captured(&[&format!("{NAMESPACE}/server")], Duration::from_secs(30))?;
            let captured_in = captured_in.elapsed();
            for node in [&a, &b] {
                let states = node.pod_states()?;
                ensure!(
                    !states
                        .iter()
                        .any(|(uid, _)| uid.contains(&format!("/{DIRECT_NAMESPACE}/"))),
                    "the dataplane of {} took on a pod outside the mesh: {states:?}",
                    node.node
                );
            }

            let mut bench = Bench {
                quick: args.quick,
                seconds,
                rounds: args.rounds.unwrap_or(1).max(1),
                connections,
                work: work.clone(),
                mesh_client,
                mesh_server,
                direct_client,
                direct_server,
                nodes: [a, b],
                bench_exe,
                section: Section::new("dataplane", NAME),
                cross_checks: vec![],
                peak_under_load: [0, 0],
                held: vec![],
                side_by_side: SideBySide {
                    rounds: args
                        .rounds
                        .unwrap_or(if ztunnel.is_some() { 3 } else { 1 })
                        .max(1),
                    ztunnel: ztunnel.clone(),
                    ours,
                    ztunnel_pods,
                    state: state.clone(),
                    // The quick run only checks that the seats work.
                    seconds: if args.quick { 1 } else { seconds },
                    rate: args.rate,
                    connections: dedicated_connections,
                },
            };
            bench.section.note(format!(
                "Capture: each node's agent found its enrolled pod's namespace by the pod's IP and \
                 captured it (rules + listeners inside the pod); both pods were captured {:.1} s after \
                 the first dataplane started; the pods outside the mesh were left alone.",
                captured_in.as_secs_f64()
            ));
            bench.measure()
        })();
        if result.is_err() && !lab::interrupted() {
            for name in [
                "dataplane-node-a.log",
                "dataplane-node-b.log",
                "controlplane.log",
            ] {
                let path = work.join(name);
                if path.exists() {
                    eprintln!("--- last lines of {name}:\n{}", lab::tail(&path));
                }
            }
        }
        drop(guard);
        result
    }

    fn pids(&self) -> [u32; 2] {
        [self.nodes[0].pid, self.nodes[1].pid]
    }

    fn measure(&mut self) -> anyhow::Result<Section> {
        // Idle: ready, pods captured, nothing carried yet.
        std::thread::sleep(Duration::from_secs(1));
        let idle = self.pids().map(|p| rss_kib(Some(p)));

        eprintln!("==> servers: nginx and iperf3 in both server pods");
        for pod in [self.direct_server.clone(), self.mesh_server.clone()] {
            self.start_servers(&pod)?;
        }
        for node in &self.nodes {
            let c = self.scrape(node)?;
            ensure!(
                c.opened == 0.0 && c.refused == 0.0,
                "the dataplane of {} proxied or refused connections before any test traffic \
                 ({} opened, {} refused): its own connections were captured (packet mark not set?)",
                node.node,
                c.opened,
                c.refused
            );
        }
        // Smoke test: one request each way, the meshed one seen by both proxies.
        let url = |pod: &Pod| format!("http://{}:{NGINX_PORT}/index.html", pod.ip);
        lab::curl(&self.direct_client.netns, &url(&self.direct_server))
            .context("direct smoke request")?;
        let (_, delta) = self.meshed(|| {
            lab::curl(&self.mesh_client.netns, &url(&self.mesh_server))
                .context("meshed smoke request")
        })?;
        let smoke = delta.check("smoke request", 1.0, None)?;
        self.cross_checks.push(smoke);

        // Idle connections first, while nothing else has grown the
        // dataplanes' heaps: memory per connection is then its own.
        self.idle_connections()?;
        self.restart_dataplanes()?;
        self.bulk(1)?;
        self.bulk(4)?;
        self.http("ka10", "10 keep-alive connections", 10, false)?;
        self.http("ka100", "100 keep-alive connections", 100, false)?;
        self.http("close", "new connection per request", 10, true)?;
        self.memory_table(idle);
        self.summarize();
        let sbs = &self.side_by_side;
        let setup = dedicated::CompareSetup {
            ztunnel: sbs.ztunnel.clone(),
            ours_pods: sbs.ours.clone(),
            ztunnel_pods: sbs.ztunnel_pods.clone(),
            direct: [self.direct_client.clone(), self.direct_server.clone()],
            control_plane: dedicated::ControlPlane {
                ip: CONTROL_PLANE_IP,
                grpc: SocketAddr::from((CONTROL_PLANE_IP, 15012)),
                state: sbs.state.clone(),
            },
            rounds: sbs.rounds,
            seconds: sbs.seconds,
            rate: sbs.rate,
            connections: sbs.connections,
        };
        let comparison = self.compare(setup)?;
        self.section.comparison = Some(comparison);
        Ok(std::mem::replace(&mut self.section, Section::new("", "")))
    }

    /// A fresh start for the load tests: the heap the idle connections
    /// grew stays with the process (allocators keep freed memory), and
    /// "memory under load" must not include it. The pods stay captured
    /// meanwhile (their rules remain); the agents re-adopt them.
    fn restart_dataplanes(&mut self) -> anyhow::Result<()> {
        eprintln!("==> restarting both dataplanes (fresh heaps for the load tests)");
        let started = Instant::now();
        for node in &mut self.nodes {
            node.restart()?;
        }
        self.nodes[0].wait_captured(&[&format!("{NAMESPACE}/client")], Duration::from_secs(30))?;
        self.nodes[1].wait_captured(&[&format!("{NAMESPACE}/server")], Duration::from_secs(30))?;
        let url = format!("http://{}:{NGINX_PORT}/index.html", self.mesh_server.ip);
        let (_, delta) = self.meshed(|| {
            lab::curl(&self.mesh_client.netns, &url).context("meshed request after the restart")
        })?;
        let check = delta.check("request after the restart", 1.0, None)?;
        self.cross_checks.push(check);
        self.section.note(format!(
            "After the idle-connection test both dataplanes were restarted, so the load figures \
             start from a fresh heap; the pods stayed captured (their rules remain) and were \
             re-adopted, traffic flowing again {:.1} s after the first SIGTERM.",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn summarize(&mut self) {
        let s = &mut self.section;
        s.notes.insert(
            0,
            format!(
                "Two nodes ({NODE_A_IP}, {NODE_B_IP}) and four pods as network namespaces on one bridge; \
                 the control plane in a namespace of its own ({CONTROL_PLANE_IP}:15012) serving them from \
                 a manifest folder. Each node runs `dataplane run --proxy-mode shared --inpod true`; \
                 the meshed client pod ({MESH_CLIENT_IP}) is on node A, the meshed server pod \
                 ({MESH_SERVER_IP}) on node B, both in an enrolled namespace. Direct baseline: a second \
                 pair ({DIRECT_CLIENT_IP} on node A, {DIRECT_SERVER_IP} on node B) in a namespace that \
                 is not enrolled; each test runs direct then meshed, back to back."
            ),
        );
        s.notes.insert(
            1,
            format!(
                "{} s per test, {} round(s) (figures are medians over rounds; peak RSS the maximum); \
                 the load generators, the servers and both dataplanes share the machine's cores. \
                 Ratios are meshed / direct (for latency and CPU, higher is worse).",
                self.seconds, self.rounds
            ),
        );
        s.note(
            "CPU: dataplanes' utime + stime from /proc/PID/stat over the meshed run; iperf3 client \
             and server from its own cpu_utilization_percent. Memory: VmRSS of each node's dataplane.",
        );
        s.note(format!(
            "Metrics cross-check (each meshed test against the dataplanes' own counters): {}.",
            self.cross_checks.join("; ")
        ));
        let ratio = |id: &str| s.ratio(id).map(percent).unwrap_or_else(|| "?".into());
        let summary = format!(
            "Node mode: bulk {} of direct, keep-alive requests {} (10 connections), \
             new-connection requests {}, {:.1} MB idle RSS. Stock ztunnel in the same seats as \
             our dataplane: the side-by-side table below (measured in this run).",
            ratio("bulk_1_gbps"),
            ratio("http_ka10_rps"),
            ratio("http_close_rps"),
            s.value("rss_idle_client_mib").unwrap_or(f64::NAN) * 1.048_576,
        );
        s.note(summary);

        let bars: Vec<Bar> = [
            ("bulk_1_gbps", "bulk, 1 stream"),
            ("bulk_4_gbps", "bulk, 4 streams"),
            ("http_ka10_rps", "HTTP, 10 keep-alive connections"),
            ("http_ka100_rps", "HTTP, 100 keep-alive connections"),
            ("http_close_rps", "HTTP, new connection per request"),
            ("setup_rate", "connection setup"),
        ]
        .iter()
        .map(|(id, label)| Bar {
            label: (*label).into(),
            value: s.ratio(id).unwrap_or(f64::NAN) * 100.0,
        })
        .collect();
        s.charts.push(Chart::bars(
            "dataplane-ratios.svg",
            "Meshed as % of direct (same run; 100% = no cost)",
            "% of the direct pair's figure",
            "%",
            bars,
            Some(100.0),
        ));
    }

    fn start_servers(&self, pod: &Pod) -> anyhow::Result<()> {
        let dir = self.work.join(format!("nginx-{}", pod.ip));
        let www = dir.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::create_dir_all(dir.join("body"))?;
        // A small static page (1 KiB).
        std::fs::write(www.join("index.html"), "x".repeat(1024))?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&dir))?;
        lab::spawn(
            &format!("nginx ({})", pod.netns),
            lab::in_netns(&pod.netns, "nginx")
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf),
            &dir.join("stderr.log"),
        )?;
        lab::spawn(
            &format!("iperf3 server ({})", pod.netns),
            lab::in_netns(&pod.netns, "iperf3").args(["-s", "-p", &IPERF_PORT.to_string()]),
            &dir.join("iperf3.log"),
        )?;
        for port in [NGINX_PORT, IPERF_PORT] {
            lab::wait_listening(&pod.netns, port)
                .with_context(|| lab::tail(&dir.join("error.log")))?;
        }
        Ok(())
    }

    fn scrape(&self, node: &NodeDataplane) -> anyhow::Result<Counters> {
        node.ensure_alive()?;
        let text = node.get("15020/metrics")?;
        Ok(Counters {
            opened: metric_sum(&text, "istio_tcp_connections_opened_total"),
            refused: metric_sum(&text, "meshbox_proxy_connections_refused_total"),
            received_bytes: metric_sum(&text, "istio_tcp_received_bytes_total"),
            active: metric_sum(&text, "meshbox_proxy_active_connections"),
            cpu: cpu_seconds(node.pid),
        })
    }

    /// Runs `test` on the meshed pods and returns what both dataplanes
    /// counted meanwhile (after their connections closed).
    fn meshed<T>(
        &self,
        test: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, MeshDelta)> {
        let before = [self.scrape(&self.nodes[0])?, self.scrape(&self.nodes[1])?];
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let sampler = {
            let (stop, peaks) = (stop.clone(), peaks.clone());
            let pids = self.pids();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (peak, pid) in peaks.iter().zip(pids) {
                        peak.fetch_max(rss_kib(Some(pid)), Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let result = test();
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let value = result?;
        let after = settled(&before, || {
            Ok([self.scrape(&self.nodes[0])?, self.scrape(&self.nodes[1])?])
        })?;
        Ok((
            value,
            MeshDelta {
                client: after[0] - before[0],
                server: after[1] - before[1],
                peak_rss_kib: [
                    peaks[0].load(Ordering::Relaxed),
                    peaks[1].load(Ordering::Relaxed),
                ],
            },
        ))
    }

    fn note_peak(&mut self, delta: &MeshDelta) {
        for (peak, seen) in self.peak_under_load.iter_mut().zip(delta.peak_rss_kib) {
            *peak = (*peak).max(seen);
        }
    }

    fn bulk(&mut self, streams: u32) -> anyhow::Result<()> {
        eprintln!(
            "==> iperf3, {streams} stream(s), {} s each way, {} round(s)",
            self.seconds, self.rounds
        );
        let label = if streams == 1 {
            "bulk, 1 stream".to_owned()
        } else {
            format!("bulk, {streams} streams")
        };
        let (mut direct, mut meshed) = (Samples::default(), Samples::default());
        for round in 0..self.rounds {
            let d = iperf(
                &self.direct_client,
                &self.direct_server,
                streams,
                self.seconds,
            )?;
            let (m, delta) =
                self.meshed(|| iperf(&self.mesh_client, &self.mesh_server, streams, self.seconds))?;
            let note = delta.check(
                &format!("iperf3 -P {streams}, round {}", round + 1),
                f64::from(streams) + 1.0,
                Some(m.bytes),
            )?;
            self.cross_checks.push(note);
            self.note_peak(&delta);
            direct.add("throughput", d.gbps());
            direct.add("cpu", 1000.0 * d.endpoint_cpu() / (d.bytes / 1e9));
            meshed.add("throughput", m.gbps());
            meshed.add(
                "cpu",
                1000.0 * (m.endpoint_cpu() + delta.cpu()) / (m.bytes / 1e9),
            );
            meshed.add("dataplane cpu", 1000.0 * delta.cpu() / (m.bytes / 1e9));
            meshed.add(
                "peak rss",
                (delta.peak_rss_kib[0] + delta.peak_rss_kib[1]) as f64 / 1024.0,
            );
        }
        let id = format!("bulk_{streams}");
        let s = &mut self.section;
        s.compared(
            &format!("{id}_gbps"),
            &format!("{label}: throughput"),
            meshed.median("throughput"),
            direct.median("throughput"),
            "Gbit/s",
        );
        s.compared(
            &format!("{id}_cpu_ms_per_gb"),
            &format!("{label}: CPU (endpoints + dataplanes) per GB"),
            meshed.median("cpu"),
            direct.median("cpu"),
            "ms/GB",
        );
        s.row(
            &format!("{id}_dataplane_cpu_ms_per_gb"),
            &format!("{label}: CPU of both dataplanes per GB"),
            meshed.median("dataplane cpu"),
            "ms/GB",
        );
        s.row(
            &format!("{id}_peak_rss_mib"),
            &format!("{label}: dataplanes' peak RSS (client + server node)"),
            meshed.max("peak rss"),
            "MiB",
        );
        Ok(())
    }

    fn http(&mut self, id: &str, label: &str, connections: u32, close: bool) -> anyhow::Result<()> {
        eprintln!(
            "==> wrk, {label}, {} s each way, {} round(s)",
            self.seconds, self.rounds
        );
        let run = |client: &Pod, server: &Pod, seconds: u64| {
            wrk(client, server, connections, close, seconds)
        };
        let (mut direct, mut meshed) = (Samples::default(), Samples::default());
        for round in 0..self.rounds {
            // A short warm-up on each side (pools, nginx workers), not measured.
            run(&self.direct_client, &self.direct_server, 1)?;
            let d = run(&self.direct_client, &self.direct_server, self.seconds)?;
            run(&self.mesh_client, &self.mesh_server, 1)?;
            let (m, delta) =
                self.meshed(|| run(&self.mesh_client, &self.mesh_server, self.seconds))?;
            for (side, w) in [("direct", &d), ("meshed", &m)] {
                ensure!(
                    w.errors as f64 <= 0.01 * w.requests as f64 && w.non_2xx == 0,
                    "wrk {label} ({side}): {} socket errors and {} non-2xx responses in {} requests",
                    w.errors,
                    w.non_2xx,
                    w.requests
                );
            }
            let expected = if close {
                0.9 * m.requests as f64
            } else {
                f64::from(connections)
            };
            let note = delta.check(&format!("wrk {label}, round {}", round + 1), expected, None)?;
            self.cross_checks.push(note);
            self.note_peak(&delta);
            for (samples, w) in [(&mut direct, &d), (&mut meshed, &m)] {
                samples.add("requests/s", w.rps);
                samples.add("p50", w.p50_ms * 1000.0);
                samples.add("p90", w.p90_ms * 1000.0);
                samples.add("p99", w.p99_ms * 1000.0);
            }
            meshed.add(
                "peak rss",
                (delta.peak_rss_kib[0] + delta.peak_rss_kib[1]) as f64 / 1024.0,
            );
        }
        let s = &mut self.section;
        s.compared(
            &format!("http_{id}_rps"),
            &format!("HTTP, {label}: requests/s"),
            meshed.median("requests/s"),
            direct.median("requests/s"),
            "req/s",
        );
        for name in ["p50", "p90", "p99"] {
            s.compared(
                &format!("http_{id}_{name}_us"),
                &format!("HTTP, {label}: {name} latency"),
                meshed.median(name),
                direct.median(name),
                "µs",
            );
        }
        s.row(
            &format!("http_{id}_peak_rss_mib"),
            &format!("HTTP, {label}: dataplanes' peak RSS (client + server node)"),
            meshed.max("peak rss"),
            "MiB",
        );
        Ok(())
    }

    fn idle_connections(&mut self) -> anyhow::Result<()> {
        let n = self.connections;
        eprintln!("==> {n} idle connections held open end to end, in {HOLD_STEPS} steps");
        let (direct_client, direct_server) =
            (self.direct_client.clone(), self.direct_server.clone());
        let (mesh_client, mesh_server) = (self.mesh_client.clone(), self.mesh_server.clone());
        let direct_rate = self.hold(&direct_client, &direct_server, n, |_, _| Ok(()))?;
        let before = self.pids().map(|p| rss_kib(Some(p)));
        let mut steps: Vec<(usize, [u64; 2])> = vec![(0, before)];
        let mut active = [0f64; 2];
        let mesh_rate = self.hold(&mesh_client, &mesh_server, n, |b, held| {
            // Let allocations settle, then read memory with all of them open.
            std::thread::sleep(Duration::from_secs(1));
            steps.push((held, b.pids().map(|p| rss_kib(Some(p)))));
            if held == n {
                active = [b.scrape(&b.nodes[0])?.active, b.scrape(&b.nodes[1])?.active];
            }
            Ok(())
        })?;
        for (side, a) in ["client", "server"].iter().zip(active) {
            ensure!(
                a >= n as f64,
                "the {side} node's dataplane had {a} active connections with {n} held open: \
                 the connections did not go through the mesh"
            );
        }
        self.cross_checks.push(format!(
            "{} idle connections: dataplanes reported {}/{} active (client/server node)",
            num(n as f64),
            active[0],
            active[1]
        ));
        self.section.compared(
            "setup_rate",
            &format!(
                "connection setup ({} connections, {HOLD_BATCH} at a time, first byte back)",
                num(n as f64)
            ),
            mesh_rate,
            direct_rate,
            "conn/s",
        );
        let series = |i: usize, name: &str| {
            Series::new(
                name,
                steps
                    .iter()
                    .map(|(k, r)| (*k as f64, r[i] as f64 / 1024.0))
                    .collect(),
            )
        };
        self.section.charts.push(Chart::lines(
            "dataplane-memory.svg",
            "Dataplane resident memory vs idle tunneled connections",
            "idle connections held open end to end",
            "RSS (MiB)",
            vec![series(0, "client node"), series(1, "server node")],
        ));
        self.held = steps;
        Ok(())
    }

    /// The memory figures: idle, under load, with the idle connections
    /// held (per connection: the slope of RSS over the steps, so memory
    /// the allocator had cached does not count as free).
    fn memory_table(&mut self, idle: [u64; 2]) {
        let n = self.connections;
        let Some(&(_, held)) = self.held.last() else {
            return;
        };
        let s = &mut self.section;
        s.note(format!(
            "Memory per idle connection: the slope of each dataplane's RSS over {} steps of {} \
             connections held open (a pooled HBONE stream each on the client node; an inbound \
             stream plus the connection to the app on the server node).",
            HOLD_STEPS,
            num((n / HOLD_STEPS) as f64)
        ));
        let mut memory = Table {
            title: "Dataplane resident memory".into(),
            columns: vec![
                "node".into(),
                "idle".into(),
                "under load (peak)".into(),
                format!("with {} idle connections", num(n as f64)),
                "per 1 000 idle connections".into(),
                "per idle connection".into(),
            ],
            rows: vec![],
        };
        for (i, side) in ["client", "server"].iter().enumerate() {
            let points: Vec<(f64, f64)> = self
                .held
                .iter()
                .map(|(k, r)| (*k as f64, r[i] as f64))
                .collect();
            let per_conn_kib = slope(&points);
            s.table_row(
                &format!("rss_idle_{side}_mib"),
                &format!("dataplane RSS idle ({side} node)"),
                idle[i] as f64 / 1024.0,
                "MiB",
            );
            s.table_row(
                &format!("rss_load_{side}_mib"),
                &format!("dataplane RSS under load, peak over all tests ({side} node)"),
                self.peak_under_load[i] as f64 / 1024.0,
                "MiB",
            );
            s.table_row(
                &format!("rss_held_{side}_mib"),
                &format!("dataplane RSS with {n} idle connections ({side} node)"),
                held[i] as f64 / 1024.0,
                "MiB",
            );
            s.table_row(
                &format!("mib_per_1000_idle_{side}"),
                &format!("dataplane memory per 1 000 idle tunneled connections ({side} node)"),
                per_conn_kib * 1000.0 / 1024.0,
                "MiB",
            );
            s.table_row(
                &format!("kib_per_idle_connection_{side}"),
                &format!("dataplane memory per idle tunneled connection ({side} node)"),
                per_conn_kib,
                "KiB",
            );
            memory.rows.push(vec![
                (*side).into(),
                format!("{} MiB", num(idle[i] as f64 / 1024.0)),
                format!("{} MiB", num(self.peak_under_load[i] as f64 / 1024.0)),
                format!("{} MiB", num(held[i] as f64 / 1024.0)),
                format!("{} MiB", num(per_conn_kib * 1000.0 / 1024.0)),
                format!("{} KiB", num(per_conn_kib)),
            ]);
        }
        s.tables.push(memory);
    }

    /// Holds `n` connections from `client` to `server`, opened in
    /// [`HOLD_STEPS`] steps with `at_step(self, held so far)` after each;
    /// releases them; returns the setup rate (connections per second of
    /// opening time).
    fn hold(
        &self,
        client: &Pod,
        server: &Pod,
        n: usize,
        mut at_step: impl FnMut(&Self, usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<f64> {
        let listen = SocketAddr::from((server.ip, HOLD_PORT));
        let server_pid = lab::spawn(
            "connection holder (server)",
            lab::in_netns(&server.netns, "prlimit")
                .arg(nofile())
                .arg(&self.bench_exe)
                .args(["hold", "--listen", &listen.to_string()]),
            &self.work.join(format!("hold-server-{}.log", server.ip)),
        )?;
        let mut clients = vec![];
        let result = (|| {
            lab::wait_listening(&server.netns, HOLD_PORT)?;
            let (mut held, mut opening) = (0, 0.0);
            for step in 0..HOLD_STEPS {
                let count = n * (step + 1) / HOLD_STEPS - held;
                let log = self
                    .work
                    .join(format!("hold-client-{}-{step}.log", client.ip));
                let (pid, stdout) = lab::spawn_piped(
                    "connection holder (client)",
                    lab::in_netns(&client.netns, "prlimit")
                        .arg(nofile())
                        .arg(&self.bench_exe)
                        .args(["hold", "--connect", &listen.to_string()])
                        .args(["--count", &count.to_string()]),
                    &log,
                )?;
                clients.push(pid);
                let line = lab::read_line_timeout(stdout, Duration::from_secs(180));
                let Some(rest) = line.as_deref().and_then(|l| l.strip_prefix("ready ")) else {
                    bail!(
                        "holding {count} more connections from {} to {listen} failed: {}",
                        client.netns,
                        line.unwrap_or_else(|| lab::tail(&log))
                    );
                };
                opening += rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse::<f64>().ok())
                    .context("holder output")?;
                held += count;
                at_step(self, held)?;
            }
            Ok(n as f64 / opening)
        })();
        for pid in clients {
            lab::stop(pid, Duration::from_secs(5));
        }
        lab::stop(server_pid, Duration::from_secs(5));
        result
    }
}

/// `prlimit`'s argument: NOFILE file descriptors, or as many as allowed.
pub(crate) fn nofile() -> String {
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        })
        .and_then(|h| h.parse::<u64>().ok())
        .unwrap_or(NOFILE);
    let n = NOFILE.min(hard);
    format!("--nofile={n}:{n}")
}

fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen {NGINX_PORT} backlog=4096;
        root {d}/www;
        location / {{ }}
    }}
}}
"
    )
}

pub(crate) fn pod_yaml(
    out: &mut String,
    namespace: &str,
    name: &str,
    node: &str,
    ip: Ipv4Addr,
    ports: &[(&str, u16)],
) {
    let _ = write!(
        out,
        "---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  uid: {namespace}-{name}
  labels:
    app: {name}
spec:
  nodeName: {node}
  serviceAccountName: {name}
  containers:
  - name: {name}
    image: debian:bookworm
    ports:
"
    );
    for (port_name, port) in ports {
        let _ = writeln!(out, "    - name: {port_name}\n      containerPort: {port}");
    }
    let _ = write!(
        out,
        "status:
  phase: Running
  podIP: {ip}
  podIPs:
  - ip: {ip}
  conditions:
  - type: Ready
    status: \"True\"
"
    );
}

/// The lab as Kubernetes objects: the meshed pair in an ambient namespace
/// (with a Service in front of the server), the direct pair outside it.
fn manifests_yaml(mc: &Pod, ms: &Pod, dc: &Pod, ds: &Pod) -> String {
    let server_ports = [
        ("http", NGINX_PORT),
        ("iperf", IPERF_PORT),
        ("hold", HOLD_PORT),
    ];
    let mut out = format!(
        "# Written by `bench dataplane`: the pods of its network lab.
# {NAMESPACE}: client (node-a) and server (node-b), captured by their nodes' dataplanes.
# {DIRECT_NAMESPACE}: the same pair without the mesh (the baseline).
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Namespace
metadata:
  name: {DIRECT_NAMESPACE}
"
    );
    pod_yaml(&mut out, NAMESPACE, "client", "node-a", mc.ip, &[]);
    pod_yaml(
        &mut out,
        NAMESPACE,
        "server",
        "node-b",
        ms.ip,
        &server_ports,
    );
    pod_yaml(&mut out, DIRECT_NAMESPACE, "client", "node-a", dc.ip, &[]);
    pod_yaml(
        &mut out,
        DIRECT_NAMESPACE,
        "server",
        "node-b",
        ds.ip,
        &server_ports,
    );
    dedicated::manifests_yaml(&mut out, &server_ports);
    let _ = write!(
        out,
        "---
apiVersion: v1
kind: Service
metadata:
  name: server
  namespace: {NAMESPACE}
spec:
  clusterIP: 10.77.100.12
  selector:
    app: server
  ports:
  - name: http
    port: 80
    targetPort: {NGINX_PORT}
"
    );
    out
}

struct Iperf {
    bits_per_second: f64,
    bytes: f64,
    seconds: f64,
    /// CPU utilisation (% of one core over the test) of client and server.
    host_cpu: f64,
    remote_cpu: f64,
}

impl Iperf {
    fn gbps(&self) -> f64 {
        self.bits_per_second / 1e9
    }

    /// CPU seconds of the iperf3 client and server.
    fn endpoint_cpu(&self) -> f64 {
        (self.host_cpu + self.remote_cpu) / 100.0 * self.seconds
    }
}

fn iperf(client: &Pod, server: &Pod, streams: u32, seconds: u64) -> anyhow::Result<Iperf> {
    let out = lab::output(lab::in_netns(&client.netns, "iperf3").args([
        "-c",
        &server.ip.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &seconds.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(error) = json.get("error") {
        bail!("iperf3 from {} to {}: {error}", client.netns, server.ip);
    }
    let end = &json["end"];
    let received = &end["sum_received"];
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let result = Iperf {
        bits_per_second: f(&received["bits_per_second"]),
        bytes: f(&received["bytes"]),
        seconds: f(&received["seconds"]),
        host_cpu: f(&end["cpu_utilization_percent"]["host_total"]),
        remote_cpu: f(&end["cpu_utilization_percent"]["remote_total"]),
    };
    ensure!(result.bytes > 0.0, "iperf3 moved nothing: {json}");
    Ok(result)
}

pub(crate) struct Wrk {
    pub rps: f64,
    pub requests: u64,
    pub errors: u64,
    pub non_2xx: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

fn wrk(
    client: &Pod,
    server: &Pod,
    connections: u32,
    close: bool,
    seconds: u64,
) -> anyhow::Result<Wrk> {
    let mut cmd = lab::in_netns(&client.netns, "wrk");
    cmd.args([
        "-t",
        "2",
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        "--latency",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{}:{NGINX_PORT}/index.html", server.ip));
    let out = lab::run(&mut cmd)?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

pub(crate) fn parse_wrk(text: &str) -> anyhow::Result<Wrk> {
    let mut w = Wrk {
        rps: 0.0,
        requests: 0,
        errors: 0,
        non_2xx: 0,
        p50_ms: 0.0,
        p90_ms: 0.0,
        p99_ms: 0.0,
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => w.rps = v.parse()?,
            [n, "requests", "in", ..] => w.requests = n.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                w.errors = rest
                    .iter()
                    .filter_map(|t| t.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => w.non_2xx = n.parse()?,
            ["50%", v] => w.p50_ms = duration_ms(v)?,
            ["90%", v] => w.p90_ms = duration_ms(v)?,
            ["99%", v] => w.p99_ms = duration_ms(v)?,
            _ => {}
        }
    }
    ensure!(
        w.requests > 0 && w.rps > 0.0,
        "wrk made no requests:\n{text}"
    );
    Ok(w)
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`, `1.50m`.
fn duration_ms(v: &str) -> anyhow::Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("duration {v:?}"))?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse()?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => bail!("duration unit {unit:?}"),
    })
}

/// `bench hold`: the two sides of the idle-connection test; runs until
/// killed.
pub async fn hold(args: HoldArgs) -> anyhow::Result<()> {
    match (args.listen, args.connect) {
        (Some(addr), None) => hold_listen(addr).await,
        (None, Some(addr)) => match args.http2 {
            Some(path) => load::hold_connect_http2(addr, args.count, &path).await,
            None => hold_connect(addr, args.count).await,
        },
        _ => bail!("give one of --listen and --connect"),
    }
}

/// The server side: accepts, sends one byte (so the client knows the
/// connection reached here), holds it.
async fn hold_listen(addr: SocketAddr) -> anyhow::Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(4096)?;
    let mut held = vec![];
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(b"k").await;
                held.push(stream);
            }
            Err(error) => {
                eprintln!("accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The client side: opens `count` connections, `HOLD_BATCH` at a time,
/// each complete when the server's byte came back; prints
/// `ready COUNT SECONDS` and holds them until killed.
async fn hold_connect(addr: SocketAddr, count: usize) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut held = Vec::with_capacity(count);
    while held.len() < count {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..HOLD_BATCH.min(count - held.len()) {
            batch.spawn(async move {
                let mut stream = tokio::time::timeout(
                    Duration::from_secs(30),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                .context("connect timed out")??;
                let mut byte = [0u8; 1];
                tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut byte))
                    .await
                    .context("no byte from the server within 30 s")?
                    .context("the connection closed before the server's byte")?;
                anyhow::Ok(stream)
            });
        }
        while let Some(result) = batch.join_next().await {
            match result? {
                Ok(stream) => held.push(stream),
                Err(error) => {
                    println!("error after {} connections: {error:#}", held.len());
                    std::process::exit(1);
                }
            }
        }
    }
    println!("ready {} {}", held.len(), start.elapsed().as_secs_f64());
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 3s test @ http://10.77.0.22:8080/index.html
  2 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   231.13us  101.58us   4.57ms   90.12%
    Req/Sec    20.48k     1.22k   23.23k    70.00%
  Latency Distribution
     50%  212.00us
     75%  254.00us
     90%  311.00us
     99%    1.02ms
  122310 requests in 3.00s, 144.21MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:  40770.00
Transfer/sec:     48.07MB
";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.requests, 122_310);
        assert_eq!(w.errors, 4);
        assert!((w.rps - 40770.0).abs() < 1e-6);
        assert!((w.p50_ms - 0.212).abs() < 1e-9);
        assert!((w.p99_ms - 1.02).abs() < 1e-9);
    }

    #[test]
    fn manifests_put_each_pair_on_both_nodes() {
        // (and the dedicated pairs on a node of their own)
        let pod = |ip| Pod {
            netns: "x".into(),
            ip,
        };
        let yaml = manifests_yaml(
            &pod(MESH_CLIENT_IP),
            &pod(MESH_SERVER_IP),
            &pod(DIRECT_CLIENT_IP),
            &pod(DIRECT_SERVER_IP),
        );
        assert_eq!(yaml.matches("nodeName: node-a").count(), 2);
        assert_eq!(yaml.matches("nodeName: node-b").count(), 2);
        assert_eq!(yaml.matches("istio.io/dataplane-mode: ambient").count(), 3);
        assert_eq!(
            yaml.matches(&format!("nodeName: {}", dedicated::DEDICATED_NODE))
                .count(),
            4
        );
    }
}
