//! The dataplane through real capture: two "pods" (network namespaces on a
//! bridge), each with Istio's in-pod redirection rules and its own
//! `dataplane` in dedicated mode, the control plane on the bridge — and next
//! to them, on the same bridge, a second pair of pods with neither rules
//! nor dataplanes: the direct baseline. Every test runs direct, then
//! meshed, back to back in the same run; figures are ratios meshed/direct.
//!
//! Why a second pair rather than the same pods before the rules go in: the
//! two paths can then be measured alternately, test by test, so a noisy
//! neighbour on this shared machine hits both sides of a ratio alike; and
//! the meshed pods never change state half-way through the run. The pairs
//! are built identically (veth on the same bridge, same addresses plan,
//! same servers).
//!
//! Measured: iperf3 bulk throughput (1 and 4 streams) with the CPU seconds
//! per GB moved; wrk against nginx with 10 and 100 keep-alive connections
//! and with a new connection per request (requests/s, p50/p90/p99); N idle
//! connections held open end to end (setup rate, and the dataplanes'
//! resident memory per connection); the dataplanes' idle resident memory.
//!
//! Every meshed figure is checked against the dataplanes' own metrics
//! (`istio_tcp_connections_opened_total`, `istio_tcp_received_bytes_total`,
//! `meshbox_proxy_active_connections` on :15020): a capture that lets
//! traffic bypass the proxies fails the run instead of reporting direct
//! numbers as meshed.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::netns::{self, Lab, Pod};
use crate::proc::rss_kib;
use crate::report::Section;

#[derive(clap::Args)]
pub struct DataplaneArgs {
    /// Short runs (3 s per test, 2 000 idle connections), for CI.
    #[arg(long)]
    quick: bool,
    /// Seconds per throughput and request-rate test (default 10; --quick 3).
    #[arg(long)]
    seconds: Option<u64>,
    /// Idle tunneled connections for the memory test (default 10 000;
    /// --quick 2 000).
    #[arg(long)]
    connections: Option<usize>,
    /// Rounds of each throughput and request-rate test (direct then meshed,
    /// alternating); the report shows the median of each figure.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Keep the work directory (dataplane and control-plane logs, access
    /// logs, nginx config) instead of removing it.
    #[arg(long)]
    keep_logs: bool,
    /// (internal) hold every connection accepted on this address.
    #[arg(long, hide = true)]
    hold_listen: Option<SocketAddr>,
    /// (internal) open `--hold-count` connections to this address and hold them.
    #[arg(long, hide = true)]
    hold_connect: Option<SocketAddr>,
    #[arg(long, hide = true, default_value_t = 0)]
    hold_count: usize,
}

const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The control plane's own namespace on the bridge (its own, so nothing
/// listening on :15012 in the root namespace gets in the way).
const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const MESH_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
const MESH_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
const DIRECT_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 21);
const DIRECT_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 22);
const NGINX_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const HOLD_PORT: u16 = 7000;
const NAMESPACE: &str = "bench";
const NODE: &str = "bench-node";
/// Connections opened concurrently by the idle-connection client.
const HOLD_BATCH: usize = 200;
/// File descriptors wanted for the dataplanes and the connection holders
/// (capped at this process's hard limit).
const NOFILE: u64 = 65_536;
/// Istio ztunnel on this machine, from issue 5 (for the notes).
const ZTUNNEL: &str = "Istio ztunnel measured on this machine (issue 5): bulk 32% of direct, \
    keep-alive requests 17%, new-connection requests 26%, 14.5 MB idle RSS";

pub async fn run(args: DataplaneArgs, out: &Path) -> anyhow::Result<Section> {
    // The helper modes run until killed.
    if let Some(addr) = args.hold_listen {
        return hold_listen(addr).await.map(|never| match never {});
    }
    if let Some(addr) = args.hold_connect {
        return hold_connect(addr, args.hold_count)
            .await
            .map(|never| match never {});
    }
    preflight()?;
    let out = out.to_path_buf();
    let bench = tokio::task::spawn_blocking(move || Bench::run(args, &out));
    tokio::select! {
        result = bench => {
            let result = result.context("benchmark thread")?;
            if netns::interrupted() && result.is_err() {
                bail!("interrupted");
            }
            result
        }
        () = netns::cleanup_on_signal() => bail!("interrupted"),
    }
}

/// Root, and the tools this needs, each named with its Debian package.
fn preflight() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        bail!(
            "`bench dataplane` builds network namespaces, veths, a bridge and iptables rules: run it as root"
        );
    }
    let tools = [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("iptables-restore", "iptables"),
        ("iperf3", "iperf3"),
        ("wrk", "wrk"),
        ("nginx", "nginx-light"),
        ("curl", "curl"),
        ("prlimit", "util-linux"),
    ];
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut missing: Vec<(&str, &str)> = vec![];
    for (tool, package) in tools {
        let found = std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|dir| dir.join(tool).is_file());
        if !found {
            missing.push((tool, package));
        }
    }
    if !missing.is_empty() {
        let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        packages.dedup();
        bail!(
            "missing tools: {}. Install them with: apt-get install {}",
            missing
                .iter()
                .map(|(t, p)| format!("{t} (package {p})"))
                .collect::<Vec<_>>()
                .join(", "),
            packages.join(" ")
        );
    }
    Ok(())
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    ensure!(
        path.exists(),
        "{} not found: build it first with `cargo build --release -p meshbox-bench -p meshbox-dataplane -p meshbox-controlplane`",
        path.display()
    );
    Ok(path)
}

/// A dataplane process serving one pod.
struct Proxy {
    pod: Pod,
    pid: u32,
    log: PathBuf,
}

/// Counters scraped from a dataplane's `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    opened: f64,
    refused: f64,
    received_bytes: f64,
    active: f64,
    /// utime + stime in seconds.
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

/// What the dataplanes did during one meshed test.
struct MeshDelta {
    client: Counters,
    server: Counters,
    /// Highest RSS (KiB) sampled during the test, client + server.
    peak_rss_kib: u64,
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
                "{what}: the {side} dataplane counted {} connections, expected at least {connections}: \
                 the traffic did not go through the mesh (is the capture broken?)",
                c.opened
            );
            if let Some(bytes) = bytes {
                ensure!(
                    c.received_bytes >= 0.9 * bytes,
                    "{what}: the {side} dataplane carried {} bytes from the client, the test moved {bytes}: \
                     traffic bypassed the mesh",
                    c.received_bytes
                );
            }
        }
        let refused = self.client.refused + self.server.refused;
        Ok(format!(
            "{what}: dataplanes counted {}/{} connections (client/server){}{}",
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
    seconds: u64,
    rounds: u32,
    connections: usize,
    work: PathBuf,
    clk_tck: f64,
    mesh_client: Pod,
    mesh_server: Pod,
    direct_client: Pod,
    direct_server: Pod,
    proxies: [Proxy; 2],
    bench_exe: PathBuf,
    section: Section,
}

impl Bench {
    fn run(args: DataplaneArgs, out: &Path) -> anyhow::Result<Section> {
        let seconds = args.seconds.unwrap_or(if args.quick { 3 } else { 10 });
        let connections = args
            .connections
            .unwrap_or(if args.quick { 2_000 } else { 10_000 });
        let dataplane_bin = sibling_binary("dataplane")?;
        let controlplane_bin = sibling_binary("controlplane")?;
        let bench_exe = std::env::current_exe()?;

        let work =
            std::env::temp_dir().join(format!("meshbox-bench-dataplane-{}", std::process::id()));
        std::fs::create_dir_all(&work)?;
        if args.keep_logs {
            eprintln!("logs kept in {}", work.display());
        } else {
            netns::remove_at_exit(&work);
        }
        let (guard, lab) = Lab::create(BRIDGE_IP, 24)?;

        let result = (|| {
            eprintln!(
                "==> network lab: bridge {} ({}/24), 5 namespaces",
                lab.bridge, lab.bridge_ip
            );
            let control_plane = lab.add_pod("cp", CONTROL_PLANE_IP)?;
            let mesh_client = lab.add_pod("mcli", MESH_CLIENT_IP)?;
            let mesh_server = lab.add_pod("msrv", MESH_SERVER_IP)?;
            let direct_client = lab.add_pod("dcli", DIRECT_CLIENT_IP)?;
            let direct_server = lab.add_pod("dsrv", DIRECT_SERVER_IP)?;

            // The manifests the control plane serves, kept with the report.
            let manifests = out.join("dataplane-lab");
            let _ = std::fs::remove_dir_all(&manifests);
            std::fs::create_dir_all(&manifests)?;
            let manifests = manifests.canonicalize()?;
            std::fs::write(
                manifests.join("lab.yaml"),
                manifests_yaml(&mesh_client, &mesh_server, &direct_client, &direct_server),
            )?;

            eprintln!("==> control plane on {CONTROL_PLANE_IP}:15012");
            let state = work.join("state");
            std::fs::create_dir_all(&state)?;
            netns::spawn(
                "controlplane",
                netns::in_netns(&control_plane.netns, &controlplane_bin)
                    .arg("run")
                    .arg("--config-dir")
                    .arg(&manifests)
                    .arg("--state-dir")
                    .arg(&state)
                    .args(["--grpc-addr", &format!("{CONTROL_PLANE_IP}:15012")])
                    .args(["--rest-addr", "127.0.0.1:15014"])
                    .args(["--server-san", &CONTROL_PLANE_IP.to_string()]),
                &work.join("controlplane.log"),
            )?;
            wait_for(
                "the control plane's port 15012",
                Duration::from_secs(30),
                || {
                    std::net::TcpStream::connect_timeout(
                        &SocketAddr::from((CONTROL_PLANE_IP, 15012)),
                        Duration::from_millis(200),
                    )
                    .is_ok()
                },
            )
            .with_context(|| tail(&work.join("controlplane.log")))?;

            eprintln!("==> in-pod capture rules (seed 004) in the meshed pods");
            for pod in [&mesh_client, &mesh_server] {
                install_capture(pod)?;
            }

            eprintln!("==> one dataplane per meshed pod (dedicated mode)");
            let mut proxies = vec![];
            for (pod, name) in [(&mesh_client, "client"), (&mesh_server, "server")] {
                let identity = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{name}");
                let token = netns::run(
                    Command::new(&controlplane_bin)
                        .args(["token", "--identity", &identity])
                        .arg("--state-dir")
                        .arg(&state),
                )?;
                let token_file = work.join(format!("{name}.token"));
                std::fs::write(&token_file, String::from_utf8(token.stdout)?.trim())?;
                let log = work.join(format!("dataplane-{name}.log"));
                let pid = netns::spawn(
                    &format!("dataplane ({name} pod)"),
                    netns::in_netns(&pod.netns, "prlimit")
                        .arg(nofile())
                        .arg(&dataplane_bin)
                        .arg("run")
                        .args([
                            "--xds-address",
                            &format!("https://{CONTROL_PLANE_IP}:15012"),
                        ])
                        .arg("--xds-root-ca")
                        .arg(state.join("root-cert.pem"))
                        .arg("--auth-token")
                        .arg(&token_file)
                        .args(["--proxy-mode", "dedicated"])
                        .args([
                            "--proxy-workload-info",
                            &format!("{NAMESPACE}/{name}/{name}"),
                        ])
                        .args(["--node-name", NODE])
                        .env("RUST_LOG", "info"),
                    &log,
                )?;
                proxies.push(Proxy {
                    pod: pod.clone(),
                    pid,
                    log,
                });
            }
            for proxy in &proxies {
                wait_for(
                    &format!("{}'s dataplane to be ready", proxy.pod.netns),
                    Duration::from_secs(30),
                    || {
                        ensure_alive(proxy).is_ok()
                            && curl(&proxy.pod, "http://127.0.0.1:15021/healthz/ready").is_ok()
                    },
                )
                .with_context(|| tail(&proxy.log))?;
                let comm = std::fs::read_to_string(format!("/proc/{}/comm", proxy.pid))
                    .unwrap_or_default();
                ensure!(
                    comm.trim() == "dataplane",
                    "pid {} is {comm:?}, not the dataplane (ip netns exec / prlimit did not exec?)",
                    proxy.pid
                );
            }
            let [client_proxy, server_proxy]: [Proxy; 2] = proxies
                .try_into()
                .map_err(|_| anyhow::anyhow!("two dataplanes"))?;

            let clk_tck = netns::run(Command::new("getconf").arg("CLK_TCK"))
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                .unwrap_or(100.0);
            let mut bench = Bench {
                seconds,
                rounds: args.rounds.max(1),
                connections,
                work: work.clone(),
                clk_tck,
                mesh_client,
                mesh_server,
                direct_client,
                direct_server,
                proxies: [client_proxy, server_proxy],
                bench_exe,
                section: Section::new("Dataplane: meshed (two dataplanes, HBONE) vs direct"),
            };
            bench.measure()
        })();
        if result.is_err() && !netns::interrupted() {
            for name in [
                "dataplane-client.log",
                "dataplane-server.log",
                "controlplane.log",
            ] {
                let path = work.join(name);
                if path.exists() {
                    eprintln!("--- last lines of {name}:\n{}", tail(&path));
                }
            }
        }
        drop(guard);
        result
    }

    fn measure(&mut self) -> anyhow::Result<Section> {
        // Idle: ready, nothing carried yet.
        std::thread::sleep(Duration::from_secs(1));
        let idle = [
            rss_kib(Some(self.proxies[0].pid)),
            rss_kib(Some(self.proxies[1].pid)),
        ];

        eprintln!("==> servers: nginx and iperf3 in both server pods");
        for pod in [self.direct_server.clone(), self.mesh_server.clone()] {
            self.start_servers(&pod)?;
        }
        // The dataplanes' own connections (xDS and CA, made while the capture
        // rules were already in place) must not have been captured.
        for proxy in &self.proxies {
            let c = self.scrape(proxy)?;
            ensure!(
                c.opened == 0.0 && c.refused == 0.0,
                "the dataplane in {} proxied or refused connections before any test traffic \
                 ({} opened, {} refused): its own control-plane connections were captured \
                 (packet mark not set?)",
                proxy.pod.netns,
                c.opened,
                c.refused
            );
        }
        self.section.notes.push(
            "Capture check: after startup (rules installed before the dataplanes started), neither \
             dataplane had proxied or refused anything: their own control-plane connections carry \
             mark 0x539 and were not redirected."
                .to_owned(),
        );
        // Smoke test: one request each way, the meshed one seen by both proxies.
        let url = |pod: &Pod| format!("http://{}:{NGINX_PORT}/index.html", pod.ip);
        curl(&self.direct_client, &url(&self.direct_server)).context("direct smoke request")?;
        let (_, delta) = self.meshed(|| {
            curl(&self.mesh_client, &url(&self.mesh_server)).context("meshed smoke request")
        })?;
        let smoke = delta.check("smoke request", 1.0, None)?;
        self.section.notes.push(smoke);

        self.bulk(1)?;
        self.bulk(4)?;
        self.http("10 keep-alive connections", 10, false)?;
        self.http("100 keep-alive connections", 100, false)?;
        self.http("new connection per request", 10, true)?;
        self.idle_connections(idle)?;

        let s = &mut self.section;
        s.notes.insert(
            0,
            format!(
                "Two pod network namespaces (client {MESH_CLIENT_IP}, server {MESH_SERVER_IP}) on a bridge, \
                 each with Istio's in-pod capture rules (mangle TPROXY to 15006/15008, nat REDIRECT to 15001, \
                 mark 0x539, connmark 0x111, local route table) and its own `dataplane run --proxy-mode \
                 dedicated`; the control plane in a namespace of its own on the bridge ({CONTROL_PLANE_IP}:15012). Direct baseline: a second, \
                 identical pair of namespaces ({DIRECT_CLIENT_IP}, {DIRECT_SERVER_IP}) on the same bridge, \
                 no rules, no dataplanes; each test runs direct then meshed, back to back."
            ),
        );
        s.notes.insert(
            1,
            format!(
                "{} s per test, {} round(s) (figures are medians over rounds; peak RSS the maximum); \
                 2 cores shared by the load generator, the servers and both dataplanes. \
                 Ratios are meshed / direct (for latency and CPU, higher is worse).",
                self.seconds, self.rounds
            ),
        );
        s.notes.push(
            "CPU: dataplanes' utime + stime from /proc/PID/stat over the meshed run; iperf3 client \
             and server from its own cpu_utilization_percent. Memory: VmRSS."
                .to_owned(),
        );
        let ratio = |metric: &str| {
            s.rows
                .iter()
                .find(|r| r.metric == metric)
                .and_then(|r| r.ratio)
                .map(|r| format!("{:.0}%", r * 100.0))
                .unwrap_or_else(|| "?".into())
        };
        let idle_mib = s
            .rows
            .iter()
            .find(|r| r.metric == "dataplane RSS idle (client pod)")
            .map(|r| r.value)
            .unwrap_or(0.0);
        let summary = format!(
            "{ZTUNNEL}. Here: bulk {} of direct, keep-alive requests {} (10 connections), \
             new-connection requests {}, {:.1} MB idle RSS.",
            ratio("bulk, 1 stream: throughput"),
            ratio("HTTP, 10 keep-alive connections: requests/s"),
            ratio("HTTP, new connection per request: requests/s"),
            idle_mib * 1.048_576,
        );
        s.notes.push(summary);
        Ok(std::mem::replace(s, Section::new("")))
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
        netns::spawn(
            &format!("nginx ({})", pod.netns),
            netns::in_netns(&pod.netns, "nginx")
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf),
            &dir.join("stderr.log"),
        )?;
        netns::spawn(
            &format!("iperf3 server ({})", pod.netns),
            netns::in_netns(&pod.netns, "iperf3").args(["-s", "-p", &IPERF_PORT.to_string()]),
            &dir.join("iperf3.log"),
        )?;
        for port in [NGINX_PORT, IPERF_PORT] {
            wait_listening(pod, port).with_context(|| tail(&dir.join("error.log")))?;
        }
        Ok(())
    }

    fn scrape(&self, proxy: &Proxy) -> anyhow::Result<Counters> {
        ensure_alive(proxy)?;
        let text = curl(&proxy.pod, "http://127.0.0.1:15020/metrics")?;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", proxy.pid))?;
        // Fields after "(comm)": state is 0, utime 11, stime 12.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok(Counters {
            opened: metric_sum(&text, "istio_tcp_connections_opened_total"),
            refused: metric_sum(&text, "meshbox_proxy_connections_refused_total"),
            received_bytes: metric_sum(&text, "istio_tcp_received_bytes_total"),
            active: metric_sum(&text, "meshbox_proxy_active_connections"),
            cpu: (ticks(11) + ticks(12)) / self.clk_tck,
        })
    }

    /// Runs `test` on the meshed pods and returns what both dataplanes
    /// counted meanwhile (after their connections closed).
    fn meshed<T>(
        &self,
        test: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, MeshDelta)> {
        let before = [
            self.scrape(&self.proxies[0])?,
            self.scrape(&self.proxies[1])?,
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            let pids = [self.proxies[0].pid, self.proxies[1].pid];
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(
                        rss_kib(Some(pids[0])) + rss_kib(Some(pids[1])),
                        Ordering::Relaxed,
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let result = test();
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let value = result?;
        // Bytes are counted when a connection closes: wait for them.
        let deadline = Instant::now() + Duration::from_secs(10);
        let after = loop {
            let after = [
                self.scrape(&self.proxies[0])?,
                self.scrape(&self.proxies[1])?,
            ];
            let settled = after.iter().zip(&before).all(|(a, b)| a.active <= b.active);
            if settled || Instant::now() > deadline {
                break after;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        Ok((
            value,
            MeshDelta {
                client: after[0] - before[0],
                server: after[1] - before[1],
                peak_rss_kib: peak.load(Ordering::Relaxed),
            },
        ))
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
        // Per round: throughput, CPU per GB (all; dataplanes), peak RSS.
        let (mut direct, mut meshed) = (Figures::default(), Figures::default());
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
            self.section.notes.push(note);
            direct.add("throughput", d.gbps());
            direct.add("cpu", 1000.0 * d.endpoint_cpu() / (d.bytes / 1e9));
            meshed.add("throughput", m.gbps());
            meshed.add(
                "cpu",
                1000.0 * (m.endpoint_cpu() + delta.cpu()) / (m.bytes / 1e9),
            );
            meshed.add("dataplane cpu", 1000.0 * delta.cpu() / (m.bytes / 1e9));
            meshed.add("peak rss", delta.peak_rss_kib as f64 / 1024.0);
        }
        let s = &mut self.section;
        s.compared(
            &format!("{label}: throughput"),
            meshed.median("throughput"),
            direct.median("throughput"),
            "Gbit/s",
        );
        s.compared(
            &format!("{label}: CPU (endpoints + dataplanes) per GB"),
            meshed.median("cpu"),
            direct.median("cpu"),
            "ms/GB",
        );
        s.row(
            &format!("{label}: CPU of both dataplanes per GB"),
            meshed.median("dataplane cpu"),
            "ms/GB",
        );
        s.row(
            &format!("{label}: dataplanes' peak RSS (client + server)"),
            meshed.max("peak rss"),
            "MiB",
        );
        Ok(())
    }

    fn http(&mut self, label: &str, connections: u32, close: bool) -> anyhow::Result<()> {
        eprintln!(
            "==> wrk, {label}, {} s each way, {} round(s)",
            self.seconds, self.rounds
        );
        let run = |client: &Pod, server: &Pod, seconds: u64| {
            wrk(client, server, connections, close, seconds)
        };
        let (mut direct, mut meshed) = (Figures::default(), Figures::default());
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
            self.section.notes.push(note);
            for (figures, w) in [(&mut direct, &d), (&mut meshed, &m)] {
                figures.add("requests/s", w.rps);
                figures.add("p50", w.p50_ms * 1000.0);
                figures.add("p90", w.p90_ms * 1000.0);
                figures.add("p99", w.p99_ms * 1000.0);
            }
            meshed.add("peak rss", delta.peak_rss_kib as f64 / 1024.0);
        }
        let s = &mut self.section;
        s.compared(
            &format!("HTTP, {label}: requests/s"),
            meshed.median("requests/s"),
            direct.median("requests/s"),
            "req/s",
        );
        for name in ["p50", "p90", "p99"] {
            s.compared(
                &format!("HTTP, {label}: {name} latency"),
                meshed.median(name),
                direct.median(name),
                "µs",
            );
        }
        if !close {
            s.row(
                &format!("HTTP, {label}: dataplanes' peak RSS (client + server)"),
                meshed.max("peak rss"),
                "MiB",
            );
        }
        Ok(())
    }

    fn idle_connections(&mut self, idle: [u64; 2]) -> anyhow::Result<()> {
        let n = self.connections;
        eprintln!("==> {n} idle connections held open end to end");
        let direct_rate = self.hold(
            &self.direct_client.clone(),
            &self.direct_server.clone(),
            n,
            |_| Ok(()),
        )?;
        let before = [
            rss_kib(Some(self.proxies[0].pid)),
            rss_kib(Some(self.proxies[1].pid)),
        ];
        let mut held = [0u64; 2];
        let mut active = [0f64; 2];
        let mesh_rate = self.hold(
            &self.mesh_client.clone(),
            &self.mesh_server.clone(),
            n,
            |b| {
                // Let allocations settle, then read memory with all of them open.
                std::thread::sleep(Duration::from_secs(1));
                held = [
                    rss_kib(Some(b.proxies[0].pid)),
                    rss_kib(Some(b.proxies[1].pid)),
                ];
                active = [
                    b.scrape(&b.proxies[0])?.active,
                    b.scrape(&b.proxies[1])?.active,
                ];
                Ok(())
            },
        )?;
        for (side, a) in ["client", "server"].iter().zip(active) {
            ensure!(
                a >= n as f64,
                "the {side} dataplane had {a} active connections with {n} held open: \
                 the connections did not go through the mesh"
            );
        }
        let s = &mut self.section;
        s.notes.push(format!(
            "{n} idle connections: dataplanes reported {}/{} active (client/server)",
            active[0], active[1]
        ));
        s.compared(
            &format!("connection setup ({n} connections, {HOLD_BATCH} at a time, first byte back)"),
            mesh_rate,
            direct_rate,
            "conn/s",
        );
        for (i, side) in ["client", "server"].iter().enumerate() {
            s.row(
                &format!("dataplane RSS idle ({side} pod)"),
                idle[i] as f64 / 1024.0,
                "MiB",
            );
        }
        for (i, side) in ["client", "server"].iter().enumerate() {
            s.row(
                &format!("dataplane RSS with {n} idle connections ({side} pod)"),
                held[i] as f64 / 1024.0,
                "MiB",
            );
            s.row(
                &format!("dataplane memory per idle connection ({side} pod)"),
                (held[i] as f64 - before[i] as f64) / n as f64,
                "KiB/conn",
            );
        }
        Ok(())
    }

    /// Holds `n` connections from `client` to `server`, calls `while_held`,
    /// releases them; returns the setup rate (connections per second).
    fn hold(
        &self,
        client: &Pod,
        server: &Pod,
        n: usize,
        mut while_held: impl FnMut(&Self) -> anyhow::Result<()>,
    ) -> anyhow::Result<f64> {
        let listen = SocketAddr::from((server.ip, HOLD_PORT));
        let server_pid = netns::spawn(
            "connection holder (server)",
            netns::in_netns(&server.netns, "prlimit")
                .arg(nofile())
                .arg(&self.bench_exe)
                .args(["dataplane", "--hold-listen", &listen.to_string()]),
            &self.work.join(format!("hold-server-{}.log", server.ip)),
        )?;
        let result = (|| {
            wait_listening(server, HOLD_PORT)?;
            let log = self.work.join(format!("hold-client-{}.log", client.ip));
            let (client_pid, stdout) = netns::spawn_piped(
                "connection holder (client)",
                netns::in_netns(&client.netns, "prlimit")
                    .arg(nofile())
                    .arg(&self.bench_exe)
                    .args(["dataplane", "--hold-connect", &listen.to_string()])
                    .args(["--hold-count", &n.to_string()]),
                &log,
            )?;
            let line = netns::read_line_timeout(stdout, Duration::from_secs(180));
            let result = match line.as_deref().and_then(|l| l.strip_prefix("ready ")) {
                Some(rest) => {
                    let secs: f64 = rest
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .context("holder output")?;
                    while_held(self).map(|()| n as f64 / secs)
                }
                None => Err(anyhow::anyhow!(
                    "holding {n} connections from {} to {listen} failed: {}",
                    client.netns,
                    line.unwrap_or_else(|| tail(&log))
                )),
            };
            netns::stop(client_pid, Duration::from_secs(5));
            result
        })();
        netns::stop(server_pid, Duration::from_secs(5));
        result
    }
}

/// `prlimit`'s argument: NOFILE file descriptors, or as many as allowed.
fn nofile() -> String {
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

/// One figure's values over the rounds of a test.
#[derive(Default)]
struct Figures(Vec<(&'static str, f64)>);

impl Figures {
    fn add(&mut self, name: &'static str, value: f64) {
        self.0.push((name, value));
    }

    fn values(&self, name: &str) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .0
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The median (the mean of the middle two for an even count).
    fn median(&self, name: &str) -> f64 {
        let v = self.values(name);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn max(&self, name: &str) -> f64 {
        self.values(name).last().copied().unwrap_or(0.0)
    }
}

fn ensure_alive(proxy: &Proxy) -> anyhow::Result<()> {
    ensure!(
        netns::alive(proxy.pid),
        "the dataplane in {} exited:\n{}",
        proxy.pod.netns,
        tail(&proxy.log)
    );
    Ok(())
}

/// GET `url` from inside `pod` (loopback or over the pod's network).
fn curl(pod: &Pod, url: &str) -> anyhow::Result<String> {
    let out =
        netns::run(netns::in_netns(&pod.netns, "curl").args(["-sSf", "--max-time", "10", url]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Waits until something listens on `port` inside `pod` (asked with `ss`:
/// a connection attempt from outside would be captured by the proxy).
fn wait_listening(pod: &Pod, port: u16) -> anyhow::Result<()> {
    wait_for(
        &format!("port {port} in {}", pod.netns),
        Duration::from_secs(15),
        || {
            netns::run(netns::in_netns(&pod.netns, "ss").args([
                "-Htln",
                "sport",
                "=",
                &format!(":{port}"),
            ]))
            .is_ok_and(|o| !o.stdout.is_empty())
        },
    )
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Sum of a metric over all its label sets in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            line.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Istio's in-pod redirection (seed 004), applied with iptables-restore
/// inside the pod's namespace, plus the policy route that delivers
/// TPROXY-marked packets (and the app's replies to spoofed sources) locally.
fn install_capture(pod: &Pod) -> anyhow::Result<()> {
    netns::run_with_input(
        &mut netns::in_netns(&pod.netns, "iptables-restore"),
        CAPTURE_RULES,
    )
    .context("installing the capture rules (needs the xt_TPROXY, xt_connmark, xt_mark modules)")?;
    netns::run(netns::in_netns(&pod.netns, "ip").args([
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ]))?;
    netns::run(netns::in_netns(&pod.netns, "ip").args([
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ]))?;
    let saved = netns::run(&mut netns::in_netns(&pod.netns, "iptables-save"))?;
    ensure!(
        String::from_utf8_lossy(&saved.stdout).contains("TPROXY"),
        "capture rules missing in {} after iptables-restore",
        pod.netns
    );
    Ok(())
}

/// What `iptables-save` shows in an ambient pod (seed 004).
const CAPTURE_RULES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -i lo -p tcp -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 15008 -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15008 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
-A ISTIO_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
";

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

fn pod_yaml(out: &mut String, namespace: &str, name: &str, ip: Ipv4Addr, ports: &[(&str, u16)]) {
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
  nodeName: {NODE}
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
# {NAMESPACE}: client and server, captured, each with a dedicated dataplane.
# {NAMESPACE}-direct: the same pair without the mesh (the baseline).
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
  name: {NAMESPACE}-direct
"
    );
    pod_yaml(&mut out, NAMESPACE, "client", mc.ip, &[]);
    pod_yaml(&mut out, NAMESPACE, "server", ms.ip, &server_ports);
    pod_yaml(
        &mut out,
        &format!("{NAMESPACE}-direct"),
        "client",
        dc.ip,
        &[],
    );
    pod_yaml(
        &mut out,
        &format!("{NAMESPACE}-direct"),
        "server",
        ds.ip,
        &server_ports,
    );
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
    let out = netns::output(netns::in_netns(&client.netns, "iperf3").args([
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

struct Wrk {
    rps: f64,
    requests: u64,
    errors: u64,
    non_2xx: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
}

fn wrk(
    client: &Pod,
    server: &Pod,
    connections: u32,
    close: bool,
    seconds: u64,
) -> anyhow::Result<Wrk> {
    let mut cmd = netns::in_netns(&client.netns, "wrk");
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
    let out = netns::run(&mut cmd)?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk(text: &str) -> anyhow::Result<Wrk> {
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

/// The server side of the idle-connection test: accepts, sends one byte
/// (so the client knows the connection reached here), holds it.
async fn hold_listen(addr: SocketAddr) -> anyhow::Result<Infallible> {
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
async fn hold_connect(addr: SocketAddr, count: usize) -> anyhow::Result<Infallible> {
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
    fn medians_over_rounds() {
        let mut f = Figures::default();
        for v in [3.0, 1.0, 2.0] {
            f.add("a", v);
        }
        f.add("b", 4.0);
        f.add("b", 1.0);
        assert_eq!(f.median("a"), 2.0);
        assert_eq!(f.median("b"), 2.5);
        assert_eq!(f.max("a"), 3.0);
        assert_eq!(f.median("none"), 0.0);
    }

    #[test]
    fn sums_metrics_over_labels() {
        let text = "# HELP istio_tcp_connections_opened The total\n\
            istio_tcp_connections_opened_total{reporter=\"source\",a=\"b c\"} 3\n\
            istio_tcp_connections_opened_total{reporter=\"destination\"} 4\n\
            istio_tcp_connections_opened_totalx 100\n\
            meshbox_proxy_active_connections 7\n# EOF\n";
        assert_eq!(metric_sum(text, "istio_tcp_connections_opened_total"), 7.0);
        assert_eq!(metric_sum(text, "meshbox_proxy_active_connections"), 7.0);
    }
}
