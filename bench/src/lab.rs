//! A throwaway network lab for benchmarks: a bridge in the root network
//! namespace, "pod" network namespaces each with a veth to it, processes
//! started inside them, and the guarantee that all of it goes away again —
//! on success, on error, on panic (a [`Guard`]'s `Drop`) and on
//! Ctrl-C/SIGTERM ([`cleanup_on_signal`]).
//!
//! Everything created is recorded in one process-wide registry *before* it
//! is created, so a failure half-way through still removes what exists.
//! Children run in their own process group: a Ctrl-C reaches only this
//! process, which then stops them in order instead of racing them.
//!
//! Names carry this process's id (`mbx-<pid>-<pod>`, `mbxbr<pid>`), so a
//! later run recognises what a killed run left behind ([`sweep_stale`]).

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// What exists and must be removed, in the order it is removed.
struct Registry {
    /// Long-running children (servers, proxies), stopped with SIGTERM first.
    daemons: Vec<(String, Child)>,
    /// Pids of short commands being waited on right now.
    running: Vec<u32>,
    netns: Vec<String>,
    links: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Registry {
    const fn new() -> Self {
        Self {
            daemons: Vec::new(),
            running: Vec::new(),
            netns: Vec::new(),
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

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
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
    let _cleaning = CLEANING.lock().unwrap_or_else(|p| p.into_inner());
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
    for link in taken.links.iter().rev() {
        quiet(Command::new("ip").args(["link", "del", link]));
    }
    for dir in &taken.dirs {
        let _ = std::fs::remove_dir_all(dir);
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

/// Runs a short command with `input` on its stdin.
pub fn run_with_input(cmd: &mut Command, input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    check_open()?;
    cmd.process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    registry().running.push(pid);
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output();
    registry().running.retain(|p| *p != pid);
    let out = out?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
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

/// Removes namespaces and links that an earlier run of this program left
/// behind when it was killed without a chance to clean up (its pid, part
/// of every name, is gone).
pub fn sweep_stale() {
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(pid) = name
                .strip_prefix("mbx-")
                .and_then(|rest| rest.split('-').next())
            else {
                continue;
            };
            if pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                eprintln!("removing network namespace {name} left by an earlier run");
                kill_netns_pids(name);
                quiet(Command::new("ip").args(["netns", "del", name]));
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split(':').nth(1).map(|n| n.trim()) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            let Some(pid) = name.strip_prefix("mbxbr") else {
                continue;
            };
            if pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                eprintln!("removing bridge {name} left by an earlier run");
                quiet(Command::new("ip").args(["link", "del", name]));
            }
        }
    }
}

/// A bridge in the root namespace with an address, the pods' gateway.
pub struct Lab {
    id: u32,
    pub bridge: String,
    pub bridge_ip: Ipv4Addr,
    pub prefix_len: u8,
}

/// A pod network namespace with one veth on the bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Lab {
    /// Creates the bridge; the returned guard removes the whole lab.
    pub fn create(bridge_ip: Ipv4Addr, prefix_len: u8) -> anyhow::Result<(Guard, Lab)> {
        let guard = Guard(());
        sweep_stale();
        let taken = run(Command::new("ip").args(["-o", "-4", "addr", "show"]))?;
        if String::from_utf8_lossy(&taken.stdout).contains(&format!(" {bridge_ip}/")) {
            bail!(
                "{bridge_ip} is already assigned in the root network namespace (another run of \
                 this benchmark?); stop it or remove that address first"
            );
        }
        let id = std::process::id();
        let bridge = format!("mbxbr{id}");
        registry().links.push(bridge.clone());
        run(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]))?;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{bridge_ip}/{prefix_len}"),
            "dev",
            &bridge,
        ]))?;
        run(Command::new("ip").args(["link", "set", &bridge, "up"]))?;
        Ok((
            guard,
            Lab {
                id,
                bridge,
                bridge_ip,
                prefix_len,
            },
        ))
    }

    /// A pod namespace `tag` (≤ 4 characters) at `ip`.
    pub fn add_pod(&self, tag: &str, ip: Ipv4Addr) -> anyhow::Result<Pod> {
        let netns = format!("mbx-{}-{tag}", self.id);
        let host = format!("mbx{}{tag}", self.id);
        anyhow::ensure!(host.len() <= 15, "interface name {host} too long");
        registry().netns.push(netns.clone());
        run(Command::new("ip").args(["netns", "add", &netns]))?;
        registry().links.push(host.clone());
        run(Command::new("ip").args([
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]))?;
        run(Command::new("ip").args(["link", "set", &host, "master", &self.bridge, "up"]))?;
        let ns = |args: &[&str]| run(in_netns(&netns, "ip").args(args));
        ns(&["link", "set", "lo", "up"])?;
        ns(&[
            "addr",
            "add",
            &format!("{ip}/{}", self.prefix_len),
            "dev",
            "eth0",
        ])?;
        ns(&["link", "set", "eth0", "up"])?;
        Ok(Pod { netns, ip })
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
