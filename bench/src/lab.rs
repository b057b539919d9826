//! A throwaway network lab for benchmarks: network namespaces ("nodes",
//! "pods"), optionally a bridge in the root namespace with a veth to each
//! pod, processes started inside them, and the guarantee that all of it goes
//! away again — on success, on error, on panic (a [`Guard`]'s `Drop`) and on
//! Ctrl-C/SIGTERM ([`run_blocking`]).
//!
//! Everything created is recorded in one process-wide registry *before* it
//! is created, so a failure half-way through still removes what exists.
//! Children run in their own process group: a Ctrl-C reaches only this
//! process, which then stops them in order instead of racing them.
//!
//! Names carry a prefix and this process's id (`mbx-<pid>-<pod>`,
//! `mbxbr<pid>`; the capture benchmark uses `mbc`, the waypoint one `mbw`),
//! so a later run recognises what a killed run left behind
//! ([`sweep_stale`]).

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::{Mutex, MutexGuard};

/// What exists and must be removed, in the order it is removed.
struct Registry {
    /// Long-running children (servers, proxies), stopped with SIGTERM first.
    daemons: Vec<(String, Child)>,
    /// Pids of short commands being waited on right now.
    running: Vec<u32>,
    netns: Vec<String>,
    /// Network namespaces bind-mounted outside /var/run/netns.
    mounts: Vec<PathBuf>,
    links: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Registry {
    const fn new() -> Self {
        Self {
            daemons: Vec::new(),
            running: Vec::new(),
            netns: Vec::new(),
            mounts: Vec::new(),
            links: Vec::new(),
            dirs: Vec::new(),
        }
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry::new());
/// Set once cleanup began: nothing new may start.
static CLOSING: AtomicBool = AtomicBool::new(false);
/// Held for a whole cleanup, so a second caller returns only once the lab
/// is really gone.
static CLEANING: Mutex<()> = Mutex::new(());

/// Set when a signal asked us to stop.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C (or SIGTERM/SIGHUP) stopped the run.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock()
}

/// Removes everything the lab created when dropped.
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        cleanup();
    }
}

/// Waits for SIGINT, SIGTERM or SIGHUP, removes the lab and exits (130).
pub async fn cleanup_on_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        // Without handlers the default action (exit) applies; Drop guards
        // still cover errors and panics.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
    INTERRUPTED.store(true, Ordering::SeqCst);
    eprintln!("interrupted: removing the network lab");
    let _ = tokio::task::spawn_blocking(cleanup).await;
    std::process::exit(130);
}

/// Stops every child and removes every namespace, link and directory
/// recorded. Idempotent.
pub fn cleanup() {
    let _cleaning = CLEANING.lock();
    CLOSING.store(true, Ordering::SeqCst);
    let mut taken = std::mem::replace(&mut *registry(), Registry::new());
    for pid in &taken.running {
        signal(*pid, "KILL");
    }
    // Last started, first stopped: load and servers before the proxies,
    // the proxies before the control plane they are connected to.
    for (name, child) in taken.daemons.iter_mut().rev() {
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    eprintln!(
                        "{name} (pid {}) did not stop within 3 s of SIGTERM; killing it",
                        child.id()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
    for ns in taken.netns.iter().rev() {
        // Anything still inside (a grandchild) would keep the veth alive.
        kill_netns_pids(ns);
        quiet(Command::new("ip").args(["netns", "del", ns]));
    }
    for path in taken.mounts.iter().rev() {
        unmount_netns(path);
    }
    for link in taken.links.iter().rev() {
        quiet(Command::new("ip").args(["link", "del", link]));
    }
    for dir in &taken.dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    // The next part of `bench all` may build a lab of its own; after a
    // signal nothing new starts.
    if !interrupted() {
        CLOSING.store(false, Ordering::SeqCst);
    }
}

fn signal(pid: u32, sig: &str) {
    quiet(
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()),
    );
}

fn kill_netns_pids(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<u32>() {
                signal(pid, "KILL");
            }
        }
    }
}

/// Unmounts a namespace (or directory) mount and removes the file.
fn unmount_netns(path: &Path) {
    quiet(Command::new("umount").arg("-l").arg(path));
    if path.is_file() {
        let _ = std::fs::remove_file(path);
    }
}

/// Runs a cleanup command, ignoring failure (the thing may not exist).
fn quiet(cmd: &mut Command) {
    let _ = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Registers a directory to be removed at cleanup.
pub fn remove_at_exit(dir: &Path) {
    registry().dirs.push(dir.to_path_buf());
}

fn check_open() -> anyhow::Result<()> {
    if CLOSING.load(Ordering::SeqCst) {
        bail!("the lab is being removed");
    }
    Ok(())
}

/// Runs a short command to completion, output captured; fails on a
/// non-zero exit with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Runs a short command to completion, output captured, whatever its exit.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    check_open()?;
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    registry().running.push(pid);
    let out = child.wait_with_output();
    registry().running.retain(|p| *p != pid);
    Ok(out?)
}

/// Runs a short command with `input` on its stdin, output captured,
/// whatever its exit; returns how long it took from spawn to exit.
pub fn run_timed(cmd: &mut Command, input: &[u8]) -> anyhow::Result<(Duration, Output)> {
    use std::io::Write;
    check_open()?;
    cmd.process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    registry().running.push(pid);
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin may exit without reading all of it; its answer says why.
        let _ = stdin.write_all(input);
    }
    let out = child.wait_with_output();
    let took = started.elapsed();
    registry().running.retain(|p| *p != pid);
    Ok((took, out?))
}

/// Starts a long-running child, stdout and stderr appended to `log`;
/// returns its pid. It is stopped at cleanup or with [`stop`].
pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<u32> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdout(file.try_clone()?).stderr(file);
    Ok(spawn_with(name, cmd)?.0)
}

/// Like [`spawn`], but stdout is a pipe handed back; stderr goes to `log`.
pub fn spawn_piped(
    name: &str,
    cmd: &mut Command,
    log: &Path,
) -> anyhow::Result<(u32, ChildStdout)> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdout(Stdio::piped()).stderr(file);
    let (pid, stdout) = spawn_with(name, cmd)?;
    Ok((pid, stdout.context("no stdout")?))
}

fn spawn_with(name: &str, cmd: &mut Command) -> anyhow::Result<(u32, Option<ChildStdout>)> {
    check_open()?;
    cmd.process_group(0).stdin(Stdio::null());
    // Hold the lock across spawn so a concurrent cleanup cannot miss it.
    let mut reg = registry();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {name}: {cmd:?}"))?;
    let pid = child.id();
    let stdout = child.stdout.take();
    reg.daemons.push((name.to_owned(), child));
    Ok((pid, stdout))
}

/// Whether the child `pid` started with [`spawn`] still runs.
pub fn alive(pid: u32) -> bool {
    let mut reg = registry();
    reg.daemons
        .iter_mut()
        .find(|(_, c)| c.id() == pid)
        .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
}

/// Stops the child `pid` (SIGTERM, then SIGKILL after `grace`).
pub fn stop(pid: u32, grace: Duration) {
    let entry = {
        let mut reg = registry();
        let i = reg.daemons.iter().position(|(_, c)| c.id() == pid);
        i.map(|i| reg.daemons.remove(i))
    };
    let Some((_, mut child)) = entry else { return };
    signal(pid, "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `ip netns exec NS PROGRAM` (exec, not fork: the pid is the program's).
pub fn in_netns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// The name prefixes of this crate's labs (`bench dataplane`: `mbx`,
/// `bench capture`: `mbc`, `bench waypoint`: `mbw`).
const PREFIXES: [&str; 3] = ["mbx", "mbc", "mbw"];

/// Removes namespaces and links that an earlier run of this program left
/// behind when it was killed without a chance to clean up (its pid, part
/// of every name, is gone).
pub fn sweep_stale() {
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    let stale_pid = |name: &str, sep: &str| {
        PREFIXES.iter().find_map(|p| {
            let rest = name.strip_prefix(p)?.strip_prefix(sep)?;
            let pid = if sep == "-" {
                rest.split('-').next()?
            } else {
                rest
            };
            (!pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid))
                .then_some(())
        })
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if stale_pid(name, "-").is_some() {
                eprintln!("removing network namespace {name} left by an earlier run");
                kill_netns_pids(name);
                quiet(Command::new("ip").args(["netns", "del", name]));
            }
        }
    }
    // Mounts of dead runs under their work directories
    // (`/tmp/meshbox-bench-{part}-{pid}/...`: private namespaces and the
    // shared mount holding them, see `add_private_netns`), deepest first.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut stale: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|mount_point| {
            mount_point.split('/').any(|part| {
                part.strip_prefix("meshbox-bench-")
                    .and_then(|rest| rest.rsplit('-').next())
                    .is_some_and(|pid| {
                        !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid)
                    })
            })
        })
        .collect();
    stale.sort_by_key(|m| std::cmp::Reverse(m.len()));
    stale.dedup();
    for mount_point in stale {
        eprintln!("removing mount {mount_point} left by an earlier run");
        unmount_netns(Path::new(mount_point));
    }
    // Then their work directories (logs, state).
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let dead = name
                .strip_prefix("meshbox-bench-")
                .and_then(|rest| rest.rsplit('-').next())
                .is_some_and(|pid| {
                    !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid)
                });
            if dead && entry.path().is_dir() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split(':').nth(1).map(|n| n.trim()) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if stale_pid(name, "br").is_some() {
                eprintln!("removing bridge {name} left by an earlier run");
                quiet(Command::new("ip").args(["link", "del", name]));
            }
        }
    }
}

/// Network namespaces named `{prefix}-{pid}-{tag}`, and optionally a bridge
/// `{prefix}br{pid}` in the root namespace, the pods' gateway.
pub struct Lab {
    id: u32,
    prefix: &'static str,
    bridge: Option<(String, u8)>,
}

/// A pod network namespace with one veth on the bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Lab {
    /// Starts a lab (after removing what killed runs left); the returned
    /// guard removes all of it. With `bridge`, a bridge at that address.
    pub fn create(
        prefix: &'static str,
        bridge: Option<(Ipv4Addr, u8)>,
    ) -> anyhow::Result<(Guard, Lab)> {
        let guard = Guard(());
        sweep_stale();
        let id = std::process::id();
        let mut lab = Lab {
            id,
            prefix,
            bridge: None,
        };
        if let Some((bridge_ip, prefix_len)) = bridge {
            let taken = run(Command::new("ip").args(["-o", "-4", "addr", "show"]))?;
            if String::from_utf8_lossy(&taken.stdout).contains(&format!(" {bridge_ip}/")) {
                bail!(
                    "{bridge_ip} is already assigned in the root network namespace (another run of \
                     this benchmark?); stop it or remove that address first"
                );
            }
            let name = format!("{prefix}br{id}");
            registry().links.push(name.clone());
            run(Command::new("ip").args(["link", "add", &name, "type", "bridge"]))?;
            run(Command::new("ip").args([
                "addr",
                "add",
                &format!("{bridge_ip}/{prefix_len}"),
                "dev",
                &name,
            ]))?;
            run(Command::new("ip").args(["link", "set", &name, "up"]))?;
            lab.bridge = Some((name, prefix_len));
        }
        Ok((guard, lab))
    }

    pub fn bridge_name(&self) -> Option<&str> {
        self.bridge.as_ref().map(|(n, _)| n.as_str())
    }

    /// The namespace name for `tag`.
    pub fn netns_name(&self, tag: &str) -> String {
        format!("{}-{}-{tag}", self.prefix, self.id)
    }

    /// A network namespace `tag` with its loopback up.
    pub fn add_netns(&self, tag: &str) -> anyhow::Result<String> {
        let netns = self.netns_name(tag);
        registry().netns.push(netns.clone());
        run(Command::new("ip").args(["netns", "add", &netns]))?;
        run(in_netns(&netns, "ip").args(["link", "set", "lo", "up"]))?;
        Ok(netns)
    }

    /// A pod namespace `tag` (≤ 4 characters) at `ip`, on the bridge.
    pub fn add_pod(&self, tag: &str, ip: Ipv4Addr) -> anyhow::Result<Pod> {
        let Some((bridge, prefix_len)) = &self.bridge else {
            bail!("this lab has no bridge");
        };
        let host = format!("{}{}{tag}", self.prefix, self.id);
        anyhow::ensure!(host.len() <= 15, "interface name {host} too long");
        let netns = self.add_netns(tag)?;
        registry().links.push(host.clone());
        run(Command::new("ip").args([
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]))?;
        run(Command::new("ip").args(["link", "set", &host, "master", bridge, "up"]))?;
        let ns = |args: &[&str]| run(in_netns(&netns, "ip").args(args));
        ns(&["addr", "add", &format!("{ip}/{prefix_len}"), "dev", "eth0"])?;
        ns(&["link", "set", "eth0", "up"])?;
        // A new connection per request at ~10 000/s leaves more sockets in
        // TIME_WAIT than the default ephemeral range holds; a pod that runs
        // out stalls in connect() and its figure measures that, not the
        // path. Every pod gets the same room, so all seats stay comparable.
        run(in_netns(&netns, "sysctl").args([
            "-qw",
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ]))?;
        Ok(Pod { netns, ip })
    }

    /// Makes `dir` a shared mount, so that namespaces mounted in it later
    /// are seen by processes started with `ip netns exec` (each has a mount
    /// namespace of its own, a slave of this one) — as a node agent sees
    /// the runtime's sandboxes through mount propagation.
    pub fn shared_dir(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        registry().mounts.push(dir.to_path_buf());
        run(Command::new("mount").arg("--bind").arg(dir).arg(dir))?;
        run(Command::new("mount").arg("--make-shared").arg(dir))?;
        Ok(())
    }

    /// A network namespace `tag` bind-mounted at `{dir}/{prefix}-{pid}-{tag}`
    /// rather than in /var/run/netns (as Docker keeps its sandboxes' in
    /// /var/run/docker/netns), loopback up; returns its path. `dir` should
    /// be a [`Lab::shared_dir`].
    pub fn add_private_netns(&self, dir: &Path, tag: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join(self.netns_name(tag));
        std::fs::File::create(&path)?;
        registry().mounts.push(path.clone());
        run(Command::new("unshare")
            .arg(format!("--net={}", path.display()))
            .arg("true"))?;
        run(Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .args(["ip", "link", "set", "lo", "up"]))?;
        Ok(path)
    }

    /// Deletes a namespace made with [`Lab::add_private_netns`].
    pub fn remove_private_netns(&self, path: &Path) {
        unmount_netns(path);
        registry().mounts.retain(|p| p != path);
    }
}

/// Runs a lab benchmark on a blocking thread; Ctrl-C, SIGTERM or SIGHUP
/// meanwhile removes the lab and ends the process (130).
pub async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let work = tokio::task::spawn_blocking(f);
    tokio::select! {
        result = work => {
            let result = result.context("benchmark thread")?;
            if interrupted() && result.is_err() {
                bail!("interrupted");
            }
            result
        }
        () = cleanup_on_signal() => bail!("interrupted"),
    }
}

/// Polls `ready` every 100 ms until it holds or `timeout` passes.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Waits until something listens on TCP `port` inside `netns` (asked with
/// `ss`: a connection attempt into a captured pod would be captured).
pub fn wait_listening(netns: &str, port: u16) -> anyhow::Result<()> {
    wait_for(
        &format!("port {port} in {netns}"),
        Duration::from_secs(30),
        || {
            run(in_netns(netns, "ss").args(["-Htln", "sport", "=", &format!(":{port}")]))
                .is_ok_and(|o| !o.stdout.is_empty())
        },
    )
}

/// The last lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// GET `url` from inside `netns`.
pub fn curl(netns: &str, url: &str) -> anyhow::Result<String> {
    let out = run(in_netns(netns, "curl").args(["-sSf", "--max-time", "10", url]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The control plane, standalone, serving the manifests in `config` from
/// inside `netns`: gRPC (xDS + CA over TLS) on `grpc`, with `grpc`'s IP in
/// its certificate. Returns once 15012 listens.
pub fn start_control_plane(
    netns: &str,
    config: &Path,
    state: &Path,
    grpc: std::net::SocketAddr,
    log: &Path,
) -> anyhow::Result<u32> {
    let bin = crate::host::sibling_binary("controlplane")?;
    std::fs::create_dir_all(state)?;
    let pid = spawn(
        "controlplane",
        in_netns(netns, &bin)
            .arg("run")
            .arg("--config-dir")
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--rest-addr", "127.0.0.1:15014"])
            .args(["--server-san", &grpc.ip().to_string()])
            .env("RUST_LOG", "warn"),
        log,
    )?;
    wait_listening(netns, grpc.port()).with_context(|| tail(log))?;
    Ok(pid)
}

/// A node-mode dataplane with in-pod capture (`--inpod true`), started in
/// `netns` (the node) with a node token; `extra` flags appended. Admin,
/// metrics and readiness listen on their default ports inside `netns`.
pub struct NodeDataplane {
    pub netns: String,
    pub node: String,
    pub pid: u32,
    pub log: PathBuf,
    /// How it was started (program and arguments after `ip netns exec NS`),
    /// to start it again the same way.
    argv: Vec<std::ffi::OsString>,
    work: PathBuf,
    starts: u32,
}

impl NodeDataplane {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        netns: &str,
        node: &str,
        xds: std::net::SocketAddr,
        state: &Path,
        work: &Path,
        nofile: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let token = work.join(format!("{node}.token"));
        run(Command::new(crate::host::sibling_binary("controlplane")?)
            .args(["token", "--node", node])
            .arg("--state-dir")
            .arg(state)
            .arg("--out")
            .arg(&token))?;
        let bin = crate::host::sibling_binary("dataplane")?;
        let mut argv: Vec<std::ffi::OsString> = vec![];
        if let Some(limit) = nofile {
            argv.extend(["prlimit".into(), limit.into()]);
        }
        argv.push(bin.into());
        argv.extend(
            [
                "run",
                "--xds-address",
                &format!("https://{xds}"),
                "--xds-root-ca",
            ]
            .map(Into::into),
        );
        argv.push(state.join("root-cert.pem").into());
        argv.push("--auth-token".into());
        argv.push(token.into());
        argv.extend(
            [
                "--proxy-mode",
                "shared",
                "--node-name",
                node,
                "--inpod",
                "true",
                "--drain-timeout",
                "1s",
            ]
            .map(Into::into),
        );
        argv.extend(extra.iter().map(Into::into));
        let mut dp = Self {
            netns: netns.into(),
            node: node.into(),
            pid: 0,
            log: PathBuf::new(),
            argv,
            work: work.to_path_buf(),
            starts: 0,
        };
        dp.launch()?;
        Ok(dp)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        self.log = self.work.join(if self.starts == 1 {
            format!("dataplane-{}.log", self.node)
        } else {
            format!("dataplane-{}-{}.log", self.node, self.starts)
        });
        let mut cmd = in_netns(&self.netns, &self.argv[0]);
        cmd.args(&self.argv[1..]).env("RUST_LOG", "info");
        self.pid = spawn(&format!("dataplane ({})", self.node), &mut cmd, &self.log)?;
        wait_for(
            &format!("the dataplane of {} to be ready", self.node),
            Duration::from_secs(30),
            || self.ensure_alive().is_ok() && self.get("15021/healthz/ready").is_ok(),
        )
        .with_context(|| tail(&self.log))?;
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid)).unwrap_or_default();
        anyhow::ensure!(
            comm.trim() == "dataplane",
            "pid {} is {comm:?}, not the dataplane (ip netns exec / prlimit did not exec?)",
            self.pid
        );
        Ok(())
    }

    /// Stops the process (SIGTERM) and starts it again the same way; its
    /// pods' rules stay in place meanwhile, and it re-adopts them.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        stop(self.pid, Duration::from_secs(5));
        self.launch()
    }

    pub fn ensure_alive(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            alive(self.pid),
            "the dataplane of {} exited:\n{}",
            self.node,
            tail(&self.log)
        );
        Ok(())
    }

    /// GET `http://127.0.0.1:{port_and_path}` inside the node.
    pub fn get(&self, port_and_path: &str) -> anyhow::Result<String> {
        curl(&self.netns, &format!("http://127.0.0.1:{port_and_path}"))
    }

    /// Capture state per pod uid, from `/config_dump`.
    pub fn pod_states(&self) -> anyhow::Result<Vec<(String, String)>> {
        let dump: serde_json::Value = serde_json::from_str(&self.get("15000/config_dump")?)?;
        Ok(dump["pods"]
            .as_array()
            .map(|pods| {
                pods.iter()
                    .map(|p| {
                        (
                            p["uid"].as_str().unwrap_or_default().to_owned(),
                            p["state"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until the pods whose uid ends in each of `pods` are captured.
    pub fn wait_captured(&self, pods: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let mut last = vec![];
        wait_for(
            &format!("{} to be captured by {}", pods.join(", "), self.node),
            timeout,
            || {
                last = self.pod_states().unwrap_or_default();
                pods.iter().all(|want| {
                    last.iter().any(|(uid, state)| {
                        uid.ends_with(&format!("/{want}")) && state == "captured"
                    })
                })
            },
        )
        .with_context(|| format!("pod states: {last:?}\n{}", tail(&self.log)))
    }
}

/// Reads a line from a child's stdout within `timeout` (None: EOF/timeout).
pub fn read_line_timeout(stdout: ChildStdout, timeout: Duration) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = stdout;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while let Ok(1) = stdout.read(&mut byte) {
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        // Keep the pipe open (and drained) for the child's lifetime.
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink);
    });
    rx.recv_timeout(timeout).ok().filter(|l| !l.is_empty())
}
