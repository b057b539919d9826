//! Side by side: our dataplane and a stock Istio ztunnel in the same seats.
//!
//! Each proxy kind gets a pod pair of its own on the lab's bridge (client
//! and server pod, each a network namespace), next to the direct pair of
//! the node-mode test: ours in `bench-ours`, ztunnel in `bench-zt`. Into
//! each of those pods the bench itself installs Istio's in-pod capture
//! rules (seed 004: TPROXY of inbound TCP to 15008/15006, REDIRECT of
//! outbound TCP to 15001, the proxy's marked sockets let through, connmark
//! 0x111 and local route table 133 for original-source connections), plus
//! one exemption: TCP to the control plane's address is not redirected,
//! since a dedicated-mode ztunnel does not mark its xDS and CA connections.
//! Then one proxy per pod starts inside the pod's namespace in dedicated
//! mode, driven by ztunnel's environment variables, with a workload token
//! for the pod's own identity. Both kinds get exactly the same rules, the
//! same environment and the same file-descriptor limit.
//!
//! Both proxies stay up for the whole comparison, so every test runs in
//! interleaved rounds — direct, ours, ztunnel, then again — and a noisy
//! moment on this shared machine hits all three alike.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};

use super::load::RateResult;
use super::{Bench, Counters, HOLD_STEPS, MeshDelta, NGINX_PORT, iperf, nofile, settled, wrk};
use crate::host::{cpu_seconds, rss_kib};
use crate::lab::{self, Pod};
use crate::numbers::num;
use crate::section::{Comparison, Versus};
use crate::stats::{Samples, metric_sum, slope};

/// Namespaces (Kubernetes) of the dedicated pairs.
pub const OURS_NAMESPACE: &str = "bench-ours";
pub const ZTUNNEL_NAMESPACE: &str = "bench-zt";
/// The node the dedicated pods are scheduled on: no node dataplane runs
/// for it, so nothing but their own proxies captures them.
pub const DEDICATED_NODE: &str = "dedicated";
pub const OURS_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 31);
pub const OURS_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 32);
pub const ZTUNNEL_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 41);
pub const ZTUNNEL_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 42);
/// Connections (keep-alive) the fixed-rate client spreads its requests over.
const RATE_CONNECTIONS: usize = 10;
/// Istio's marks and route table (seed 004).
const PROXY_MARK: &str = "0x539/0xfff";
const CONNECTION_MARK: &str = "0x111/0xfff";
const ROUTE_TABLE: &str = "133";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Ours,
    Ztunnel,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::Ztunnel => "ztunnel",
        }
    }
}

/// Istio's in-pod rules for `iptables-restore` (seed 004's chains and
/// order), with TCP to `control_plane` exempt from the outbound redirect.
pub fn capture_rules(control_plane: Ipv4Addr) -> String {
    format!(
        "*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m connmark --mark {CONNECTION_MARK} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_PRERT -m mark --mark {PROXY_MARK} -j CONNMARK --set-xmark {CONNECTION_MARK}
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -i lo -p tcp -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 15008 -m mark ! --mark {PROXY_MARK} -j TPROXY --on-port 15008 --on-ip 0.0.0.0 --tproxy-mark {CONNECTION_MARK}
-A ISTIO_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {PROXY_MARK} -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark {CONNECTION_MARK}
COMMIT
*nat
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -d {control_plane}/32 -p tcp -j ACCEPT
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -p tcp -m mark --mark {CONNECTION_MARK} -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {PROXY_MARK} -j REDIRECT --to-ports 15001
COMMIT
"
    )
}

/// Installs [`capture_rules`] and the connmark route in `pod`.
fn install_rules(pod: &Pod, control_plane: Ipv4Addr) -> anyhow::Result<()> {
    let (_, out) = lab::run_timed(
        &mut lab::in_netns(&pod.netns, "iptables-restore"),
        capture_rules(control_plane).as_bytes(),
    )?;
    ensure!(
        out.status.success(),
        "iptables-restore in {}: {}",
        pod.netns,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let ip = |args: &[&str]| lab::run(Command::new("ip").args(["-n", &pod.netns]).args(args));
    ip(&[
        "rule",
        "add",
        "fwmark",
        CONNECTION_MARK,
        "pref",
        "32764",
        "lookup",
        ROUTE_TABLE,
    ])?;
    ip(&[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        ROUTE_TABLE,
    ])?;
    Ok(())
}

/// One dedicated-mode proxy inside a pod's namespace.
pub struct Proxy {
    kind: Kind,
    side: &'static str,
    pod: Pod,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    work: PathBuf,
    pub pid: u32,
    log: PathBuf,
    starts: u32,
}

/// Where the proxies find the control plane.
pub struct ControlPlane {
    pub ip: Ipv4Addr,
    pub grpc: SocketAddr,
    pub state: PathBuf,
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    fn start(
        kind: Kind,
        side: &'static str,
        program: &Path,
        pod: &Pod,
        namespace: &str,
        name: &str,
        cp: &ControlPlane,
        work: &Path,
    ) -> anyhow::Result<Self> {
        let token = work.join(format!("{}-{side}.token", kind.name()));
        lab::run(
            Command::new(crate::host::sibling_binary("controlplane")?)
                .arg("token")
                .arg("--state-dir")
                .arg(&cp.state)
                .args([
                    "--identity",
                    &format!("spiffe://cluster.local/ns/{namespace}/sa/{name}"),
                ])
                .arg("--out")
                .arg(&token),
        )?;
        let root = cp.state.join("root-cert.pem").display().to_string();
        let address = format!("https://{}", cp.grpc);
        // ztunnel's names; `dataplane run` reads the same ones.
        let env: Vec<(String, String)> = [
            ("XDS_ADDRESS", address.as_str()),
            ("CA_ADDRESS", address.as_str()),
            ("XDS_ROOT_CA", root.as_str()),
            ("CA_ROOT_CA", root.as_str()),
            ("AUTH_TOKEN", &token.display().to_string()),
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", &format!("{namespace}/{name}/{name}")),
            ("CLUSTER_ID", "Kubernetes"),
            ("TRUST_DOMAIN", "cluster.local"),
            // A dedicated ztunnel marks its sockets only when told; the
            // rules let marked sockets through and need the mark on the
            // proxy's connections to the app and to the peer.
            ("PACKET_MARK", "1337"),
            // Connect to the app from the client's address, through the
            // rules' connmark route, as in-pod capture does.
            ("ENABLE_ORIG_SRC", "true"),
            ("RUST_LOG", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let args = match kind {
            Kind::Ours => vec!["run".to_owned()],
            Kind::Ztunnel => vec!["proxy".to_owned()],
        };
        let mut proxy = Self {
            kind,
            side,
            pod: pod.clone(),
            program: program.to_path_buf(),
            args,
            env,
            work: work.to_path_buf(),
            pid: 0,
            log: PathBuf::new(),
            starts: 0,
        };
        proxy.launch()?;
        Ok(proxy)
    }

    fn label(&self) -> String {
        format!("{} ({} pod)", self.kind.name(), self.side)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        self.log = self.work.join(format!(
            "{}-{}-{}.log",
            self.kind.name(),
            self.side,
            self.starts
        ));
        let mut cmd = lab::in_netns(&self.pod.netns, "prlimit");
        cmd.arg(nofile())
            .arg(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // ztunnel looks for its mesh config relative to the working
            // directory; an empty one means its defaults.
            .current_dir(&self.work);
        self.pid = lab::spawn(&self.label(), &mut cmd, &self.log)?;
        lab::wait_for(
            &format!("{} to be ready", self.label()),
            Duration::from_secs(30),
            || self.ensure_alive().is_ok() && self.get("15021/healthz/ready").is_ok(),
        )
        .with_context(|| lab::tail(&self.log))?;
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid)).unwrap_or_default();
        let want = self
            .program
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(15).collect::<String>())
            .unwrap_or_default();
        ensure!(
            comm.trim() == want,
            "pid {} is {comm:?}, not {want} (ip netns exec / prlimit did not exec?)",
            self.pid
        );
        Ok(())
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        lab::stop(self.pid, Duration::from_secs(5));
        self.launch()
    }

    fn ensure_alive(&self) -> anyhow::Result<()> {
        ensure!(
            lab::alive(self.pid),
            "{} exited:\n{}",
            self.label(),
            lab::tail(&self.log)
        );
        Ok(())
    }

    fn get(&self, port_and_path: &str) -> anyhow::Result<String> {
        lab::curl(
            &self.pod.netns,
            &format!("http://127.0.0.1:{port_and_path}"),
        )
    }

    /// Istio's counters, which both kinds export; `active` is opened minus
    /// closed (the same definition for both).
    fn scrape(&self) -> anyhow::Result<Counters> {
        self.ensure_alive()?;
        let text = self.get("15020/metrics")?;
        let opened = metric_sum(&text, "istio_tcp_connections_opened_total");
        Ok(Counters {
            opened,
            refused: 0.0,
            // Bytes from the client, on both sides and in both kinds.
            received_bytes: metric_sum(&text, "istio_tcp_received_bytes_total"),
            active: opened - metric_sum(&text, "istio_tcp_connections_closed_total"),
            cpu: cpu_seconds(self.pid),
        })
    }
}

/// A pod pair and, unless it is the direct baseline, its two proxies.
pub struct Seat {
    name: &'static str,
    client: Pod,
    server: Pod,
    proxies: Option<[Proxy; 2]>,
}

impl Seat {
    fn pids(&self) -> Option<[u32; 2]> {
        self.proxies.as_ref().map(|[c, s]| [c.pid, s.pid])
    }

    /// Runs `test` and returns what both proxies counted meanwhile (none
    /// for the direct pair), after their connections closed.
    fn run<T>(
        &self,
        test: impl FnOnce(&Pod, &Pod) -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, Option<MeshDelta>)> {
        let Some([c, s]) = &self.proxies else {
            return Ok((test(&self.client, &self.server)?, None));
        };
        let before = [c.scrape()?, s.scrape()?];
        let value = test(&self.client, &self.server)?;
        let after = settled(&before, || Ok([c.scrape()?, s.scrape()?]))?;
        Ok((
            value,
            Some(MeshDelta {
                client: after[0] - before[0],
                server: after[1] - before[1],
                peak_rss_kib: [0, 0],
            }),
        ))
    }
}

/// The side-by-side part of a run: its seats and what they measured.
pub struct Compare {
    seats: Vec<Seat>,
    /// Per seat (same order), the figures over rounds.
    samples: Vec<Samples>,
    rounds: u32,
    seconds: u64,
    rate: u32,
    connections: usize,
    ztunnel: Option<PathBuf>,
    cross_checks: Vec<String>,
    notes: Vec<String>,
}

/// What the dedicated seats need from the lab.
pub struct CompareSetup {
    pub ztunnel: Option<PathBuf>,
    pub ours_pods: [Pod; 2],
    pub ztunnel_pods: Option<[Pod; 2]>,
    pub direct: [Pod; 2],
    pub control_plane: ControlPlane,
    pub rounds: u32,
    pub seconds: u64,
    pub rate: u32,
    pub connections: usize,
}

impl Bench {
    /// The comparison: rules, proxies, then every test in interleaved
    /// rounds; returns the table.
    pub(super) fn compare(&mut self, setup: CompareSetup) -> anyhow::Result<Comparison> {
        let ours_bin = crate::host::sibling_binary("dataplane")?;
        let mut kinds = vec![(Kind::Ours, ours_bin, OURS_NAMESPACE, setup.ours_pods)];
        if let (Some(bin), Some(pods)) = (&setup.ztunnel, setup.ztunnel_pods) {
            kinds.push((Kind::Ztunnel, bin.clone(), ZTUNNEL_NAMESPACE, pods));
        }
        let [dc, ds] = setup.direct;
        let mut seats = vec![Seat {
            name: "direct",
            client: dc,
            server: ds,
            proxies: None,
        }];
        let mut start_rss = vec![];
        for (kind, bin, namespace, [client, server]) in kinds {
            eprintln!(
                "==> {}: Istio's in-pod rules in both pods, then one dedicated proxy in each",
                kind.name()
            );
            for pod in [&client, &server] {
                install_rules(pod, setup.control_plane.ip)?;
            }
            self.start_servers(&server)?;
            let c = Proxy::start(
                kind,
                "client",
                &bin,
                &client,
                namespace,
                "client",
                &setup.control_plane,
                &self.work,
            )?;
            let s = Proxy::start(
                kind,
                "server",
                &bin,
                &server,
                namespace,
                "server",
                &setup.control_plane,
                &self.work,
            )?;
            seats.push(Seat {
                name: kind.name(),
                client,
                server,
                proxies: Some([c, s]),
            });
        }
        // Idle, after ready: nothing carried yet.
        std::thread::sleep(Duration::from_secs(1));
        for seat in &seats[1..] {
            start_rss.push(seat.pids().map(|p| p.map(|pid| rss_kib(Some(pid)))));
        }
        let mut cmp = Compare {
            samples: seats.iter().map(|_| Samples::default()).collect(),
            seats,
            rounds: setup.rounds,
            seconds: setup.seconds,
            rate: setup.rate,
            connections: setup.connections,
            ztunnel: setup.ztunnel,
            cross_checks: vec![],
            notes: vec![],
        };
        for (i, rss) in start_rss.into_iter().enumerate() {
            if let Some([c, s]) = rss {
                cmp.samples[i + 1].add("rss start client", c as f64);
                cmp.samples[i + 1].add("rss start server", s as f64);
            }
        }
        cmp.smoke("smoke request")?;
        for i in 1..cmp.seats.len() {
            self.hold_on(&mut cmp, i)?;
        }
        eprintln!("==> restarting the dedicated proxies (fresh heaps for the load tests)");
        for seat in &mut cmp.seats {
            if let Some(proxies) = &mut seat.proxies {
                for p in proxies {
                    p.restart()?;
                }
            }
        }
        cmp.smoke("request after the restart")?;
        cmp.bulk(1)?;
        if !self.quick {
            cmp.bulk(4)?;
        }
        cmp.http("ka10", "10 keep-alive connections", 10, false)?;
        cmp.http("close", "new connection per request", 10, true)?;
        cmp.fixed_rate(&self.bench_exe, &self.work)?;
        Ok(cmp.table())
    }

    /// Memory per idle tunneled connection on seat `i`: the slope of each
    /// proxy's RSS over the steps of `bench hold`.
    fn hold_on(&self, cmp: &mut Compare, i: usize) -> anyhow::Result<()> {
        let seat = &cmp.seats[i];
        let Some(pids) = seat.pids() else {
            return Ok(());
        };
        let (n, name) = (cmp.connections, seat.name);
        eprintln!("==> {name}: {n} idle connections held open end to end, in {HOLD_STEPS} steps");
        let mut steps: Vec<(f64, [f64; 2])> = vec![(0.0, pids.map(|p| rss_kib(Some(p)) as f64))];
        let mut active = [0f64; 2];
        let (client, server) = (seat.client.clone(), seat.server.clone());
        self.hold(&client, &server, n, |_, held| {
            std::thread::sleep(Duration::from_secs(1));
            steps.push((held as f64, pids.map(|p| rss_kib(Some(p)) as f64)));
            if held == n
                && let Some([c, s]) = &seat.proxies
            {
                active = [c.scrape()?.active, s.scrape()?.active];
            }
            Ok(())
        })?;
        for (side, a) in ["client", "server"].iter().zip(active) {
            ensure!(
                a >= n as f64,
                "{name}: the {side} pod's proxy had {a} open connections with {n} held: \
                 the connections did not go through it (is the capture broken?)"
            );
        }
        cmp.cross_checks.push(format!(
            "{name}: {} idle connections, proxies reported {}/{} open (client/server)",
            num(n as f64),
            active[0],
            active[1]
        ));
        for (j, figure) in ["kib per conn client", "kib per conn server"]
            .into_iter()
            .enumerate()
        {
            let points: Vec<(f64, f64)> = steps.iter().map(|(k, r)| (*k, r[j])).collect();
            cmp.samples[i].add(figure, slope(&points));
        }
        Ok(())
    }
}

impl Compare {
    fn smoke(&mut self, what: &str) -> anyhow::Result<()> {
        for seat in &self.seats {
            let (_, delta) = seat.run(|c, s| {
                lab::curl(
                    &c.netns,
                    &format!("http://{}:{NGINX_PORT}/index.html", s.ip),
                )
                .with_context(|| format!("{what} ({})", seat.name))
            })?;
            if let Some(delta) = delta {
                let note = delta.check(&format!("{}: {what}", seat.name), 1.0, None)?;
                self.cross_checks.push(note);
            }
        }
        Ok(())
    }

    fn bulk(&mut self, streams: u32) -> anyhow::Result<()> {
        eprintln!(
            "==> side by side: iperf3, {streams} stream(s), {} s per seat, {} round(s)",
            self.seconds, self.rounds
        );
        let (tput, cpu_c, cpu_s, cpu_b): (&str, &str, &str, &str) = if streams == 1 {
            ("bulk 1", "cpu client 1", "cpu server 1", "cpu both 1")
        } else {
            ("bulk 4", "cpu client 4", "cpu server 4", "cpu both 4")
        };
        for round in 0..self.rounds {
            for (i, seat) in self.seats.iter().enumerate() {
                let (r, delta) = seat.run(|c, s| iperf(c, s, streams, self.seconds))?;
                self.samples[i].add(tput, r.gbps());
                if let Some(delta) = delta {
                    let note = delta.check(
                        &format!("{}: iperf3 -P {streams}, round {}", seat.name, round + 1),
                        f64::from(streams) + 1.0,
                        Some(r.bytes),
                    )?;
                    self.cross_checks.push(note);
                    let gb = r.bytes / 1e9;
                    self.samples[i].add(cpu_c, delta.client.cpu / gb);
                    self.samples[i].add(cpu_s, delta.server.cpu / gb);
                    self.samples[i].add(cpu_b, delta.cpu() / gb);
                }
            }
        }
        Ok(())
    }

    fn http(&mut self, id: &str, label: &str, connections: u32, close: bool) -> anyhow::Result<()> {
        eprintln!(
            "==> side by side: wrk, {label}, {} s per seat, {} round(s)",
            self.seconds, self.rounds
        );
        let names: [&'static str; 3] = match id {
            "ka10" => ["ka10 rps", "ka10 p50", "ka10 p99"],
            _ => ["close rps", "close p50", "close p99"],
        };
        for round in 0..self.rounds {
            for (i, seat) in self.seats.iter().enumerate() {
                // A short warm-up (pools, nginx workers), not measured.
                seat.run(|c, s| wrk(c, s, connections, close, 1))?;
                let (w, delta) = seat.run(|c, s| wrk(c, s, connections, close, self.seconds))?;
                ensure!(
                    w.errors as f64 <= 0.01 * w.requests as f64 && w.non_2xx == 0,
                    "wrk {label} ({}): {} socket errors and {} non-2xx responses in {} requests",
                    seat.name,
                    w.errors,
                    w.non_2xx,
                    w.requests
                );
                if let Some(delta) = delta {
                    let expected = if close {
                        0.9 * w.requests as f64
                    } else {
                        f64::from(connections)
                    };
                    let note = delta.check(
                        &format!("{}: wrk {label}, round {}", seat.name, round + 1),
                        expected,
                        None,
                    )?;
                    self.cross_checks.push(note);
                }
                self.samples[i].add(names[0], w.rps);
                self.samples[i].add(names[1], w.p50_ms * 1000.0);
                self.samples[i].add(names[2], w.p99_ms * 1000.0);
            }
        }
        Ok(())
    }

    fn fixed_rate(&mut self, bench_exe: &Path, work: &Path) -> anyhow::Result<()> {
        eprintln!(
            "==> side by side: {} requests/s (open loop, bench rate), {} s per seat, {} round(s)",
            self.rate, self.seconds, self.rounds
        );
        let mut late = vec![];
        for round in 0..self.rounds {
            for (i, seat) in self.seats.iter().enumerate() {
                let (r, delta) =
                    seat.run(|c, s| rate_client(bench_exe, work, c, s, self.rate, self.seconds))?;
                let expected = u64::from(self.rate) * self.seconds;
                ensure!(
                    r.errors == 0 && r.non_2xx == 0 && r.requests >= expected * 99 / 100,
                    "bench rate ({}): {} of {expected} requests answered, {} errors, {} non-2xx",
                    seat.name,
                    r.requests,
                    r.errors,
                    r.non_2xx
                );
                if let Some(delta) = delta {
                    let note = delta.check(
                        &format!(
                            "{}: {} requests/s, round {}",
                            seat.name,
                            self.rate,
                            round + 1
                        ),
                        RATE_CONNECTIONS as f64,
                        None,
                    )?;
                    self.cross_checks.push(note);
                }
                self.samples[i].add("rate p50", r.p50_us);
                self.samples[i].add("rate p99", r.p99_us);
                late.push(r.pacer_late_p99_us);
            }
        }
        self.notes.push(format!(
            "Fixed rate: `bench rate`, this suite's own open-loop client (hyper's HTTP/1.1 client, \
             {RATE_CONNECTIONS} keep-alive connections, one GET of the 1 KiB page every 1/{} s); \
             each latency is measured from the request's intended send time, so a stall delays \
             the requests queued behind it and counts against them (no coordinated omission). \
             The pacer issued its requests at most {} µs late (p99, worst run; on a busy \
             machine it waits for a core like everything else, and that delay is part of the \
             latencies of all three seats alike).",
            self.rate,
            num(late.iter().copied().fold(0.0, f64::max))
        ));
        Ok(())
    }

    fn table(self) -> Comparison {
        let n = self.seats.len();
        let median = |seat: usize, name: &str| -> Option<f64> {
            (seat < n)
                .then(|| self.samples[seat].median(name))
                .filter(|v| v.is_finite())
        };
        let zt = self.ztunnel.is_some().then_some(2);
        let mut rows = vec![];
        let row = |id: &str, metric: &str, unit: &str, name: &str, has_direct: bool| {
            Versus::new(
                id,
                metric,
                unit,
                if has_direct { median(0, name) } else { None },
                median(1, name),
                zt.and_then(|z| median(z, name)),
            )
        };
        let kib_to_mib = 1.0 / 1024.0;
        rows.push(row(
            "bulk_1_gbps",
            "bulk, 1 stream (iperf3)",
            "Gbit/s",
            "bulk 1",
            true,
        ));
        rows.push(row(
            "bulk_4_gbps",
            "bulk, 4 streams (iperf3)",
            "Gbit/s",
            "bulk 4",
            true,
        ));
        rows.push(row(
            "http_ka10_rps",
            "HTTP, 10 keep-alive connections (wrk): requests/s",
            "req/s",
            "ka10 rps",
            true,
        ));
        rows.push(row("http_ka10_p50_us", "same: p50", "µs", "ka10 p50", true));
        rows.push(row("http_ka10_p99_us", "same: p99", "µs", "ka10 p99", true));
        rows.push(row(
            "http_close_rps",
            "HTTP, new connection per request (wrk): requests/s",
            "req/s",
            "close rps",
            true,
        ));
        rows.push(row(
            "http_close_p50_us",
            "same: p50",
            "µs",
            "close p50",
            true,
        ));
        rows.push(row(
            "http_close_p99_us",
            "same: p99",
            "µs",
            "close p99",
            true,
        ));
        let rate = num(f64::from(self.rate));
        rows.push(row(
            "fixed_rate_p50_us",
            &format!("HTTP at a fixed {rate} requests/s (bench rate): p50"),
            "µs",
            "rate p50",
            true,
        ));
        rows.push(row(
            "fixed_rate_p99_us",
            "same: p99",
            "µs",
            "rate p99",
            true,
        ));
        rows.push(row(
            "cpu_s_per_gb_client",
            "CPU-seconds per GB, bulk 1 stream: client pod's proxy",
            "s/GB",
            "cpu client 1",
            false,
        ));
        rows.push(row(
            "cpu_s_per_gb_server",
            "same: server pod's proxy",
            "s/GB",
            "cpu server 1",
            false,
        ));
        rows.push(row(
            "cpu_s_per_gb_both",
            "same: both proxies",
            "s/GB",
            "cpu both 1",
            false,
        ));
        for (side, name) in [
            ("client", "rss start client"),
            ("server", "rss start server"),
        ] {
            let scaled = |seat: usize| median(seat, name).map(|v| v * kib_to_mib);
            rows.push(Versus::new(
                &format!("rss_start_{side}_mib"),
                &format!("RSS at start (idle, after ready): {side} pod's proxy"),
                "MiB",
                None,
                scaled(1),
                zt.and_then(scaled),
            ));
        }
        let held = num(self.connections as f64);
        rows.push(row(
            "kib_per_idle_connection_client",
            &format!("memory per idle tunneled connection ({held} held): client pod's proxy"),
            "KiB",
            "kib per conn client",
            false,
        ));
        rows.push(row(
            "kib_per_idle_connection_server",
            "same: server pod's proxy",
            "KiB",
            "kib per conn server",
            false,
        ));
        // A test the run left out (4 streams in --quick) has no values at all.
        rows.retain(|r| r.direct.is_some() || r.ours.is_some() || r.ztunnel.is_some());
        let mut notes = vec![format!(
            "Seats: pods as network namespaces on the lab's bridge. Direct: the node-mode test's \
             uncaptured pair. Ours: `dataplane run` in dedicated mode, one per pod, in \
             `{OURS_NAMESPACE}` ({OURS_CLIENT_IP} → {OURS_SERVER_IP}). ztunnel: {}. In every \
             proxied pod the bench installed Istio's in-pod rules before the proxy started \
             (mangle PREROUTING TPROXY of inbound TCP to 15008/15006, nat OUTPUT REDIRECT of \
             outbound TCP to 15001, sockets marked 0x539 let through, connmark 0x111 and local \
             route table 133) plus an exemption for TCP to the control plane's address (a \
             dedicated ztunnel does not mark its xDS/CA connection). Both kinds ran with the same \
             environment (XDS_ADDRESS, CA_ADDRESS, XDS_ROOT_CA, CA_ROOT_CA, AUTH_TOKEN (a workload \
             token for the pod's identity), PROXY_MODE=dedicated, PROXY_WORKLOAD_INFO, CLUSTER_ID, \
             TRUST_DOMAIN, PACKET_MARK=1337, ENABLE_ORIG_SRC=true, RUST_LOG=info), their \
             defaults otherwise, and the same file-descriptor limit.",
            match &self.ztunnel {
                Some(path) => format!(
                    "the stock Istio ztunnel at `{}` in the same mode and the same kind of \
                     pods, in `{ZTUNNEL_NAMESPACE}` ({ZTUNNEL_CLIENT_IP} → {ZTUNNEL_SERVER_IP})",
                    path.display()
                ),
                None => "not given (`--ztunnel PATH`)".into(),
            }
        )];
        notes.push(format!(
            "{} s per test and seat, {} round(s), interleaved (direct, ours{} in turn); figures \
             are medians over rounds. Memory per idle connection: slope of each proxy's RSS over \
             {HOLD_STEPS} steps of {} connections held open (`bench hold`), measured before the \
             load tests; then the proxies were restarted, so load figures start from fresh heaps. \
             CPU: utime + stime of each proxy from /proc/PID/stat over the test.",
            self.seconds,
            self.rounds,
            if self.ztunnel.is_some() {
                ", ztunnel"
            } else {
                ""
            },
            num((self.connections / HOLD_STEPS) as f64)
        ));
        notes.extend(self.notes);
        notes.push(format!(
            "Metrics cross-check (each proxied test against both proxies' own istio_tcp_* \
             counters on :15020): {}.",
            self.cross_checks.join("; ")
        ));
        Comparison {
            title: "Side by side: dedicated proxies per pod, in-pod rules".into(),
            ztunnel_given: self.ztunnel.is_some(),
            notes,
            rows,
        }
    }
}

/// Runs `bench rate` in the client pod against the server's nginx.
fn rate_client(
    bench_exe: &Path,
    work: &Path,
    client: &Pod,
    server: &Pod,
    rate: u32,
    seconds: u64,
) -> anyhow::Result<RateResult> {
    let log = work.join(format!("rate-{}.log", client.ip));
    let out = lab::output(
        lab::in_netns(&client.netns, bench_exe)
            .arg("rate")
            .args([
                "--target",
                &SocketAddr::from((server.ip, NGINX_PORT)).to_string(),
            ])
            .args(["--rate", &rate.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .args(["--connections", &RATE_CONNECTIONS.to_string()]),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        let _ = std::fs::write(&log, stderr.as_bytes());
    }
    if !out.status.success() {
        bail!("bench rate in {} failed: {}", client.netns, stderr.trim());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("bench rate output: {stdout}"))
}

/// The dedicated pods as Kubernetes objects (appended to the lab's
/// manifests): an enrolled namespace per kind, a client and a server pod
/// in each, on a node no node dataplane serves.
pub fn manifests_yaml(out: &mut String, server_ports: &[(&str, u16)]) {
    for (namespace, client, server) in [
        (OURS_NAMESPACE, OURS_CLIENT_IP, OURS_SERVER_IP),
        (ZTUNNEL_NAMESPACE, ZTUNNEL_CLIENT_IP, ZTUNNEL_SERVER_IP),
    ] {
        let _ = write!(
            out,
            "---
apiVersion: v1
kind: Namespace
metadata:
  name: {namespace}
  labels:
    istio.io/dataplane-mode: ambient
"
        );
        super::pod_yaml(out, namespace, "client", DEDICATED_NODE, client, &[]);
        super::pod_yaml(
            out,
            namespace,
            "server",
            DEDICATED_NODE,
            server,
            server_ports,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_istios_with_the_control_plane_exempt() {
        let rules = capture_rules(Ipv4Addr::new(10, 77, 0, 2));
        assert!(rules.contains("--on-port 15008"));
        assert!(rules.contains("--on-port 15006"));
        assert!(rules.contains("-j REDIRECT --to-ports 15001"));
        // The exemption comes before the redirect.
        let exempt = rules.find("-d 10.77.0.2/32 -p tcp -j ACCEPT").unwrap();
        let redirect = rules.find("REDIRECT").unwrap();
        assert!(exempt < redirect);
        assert_eq!(rules.matches("COMMIT").count(), 2);
    }
}
