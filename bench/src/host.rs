//! The machine a benchmark runs on: what it is (for the report), whether
//! a part can run here (root, tools), the meshbox binaries next to this one,
//! and what /proc says about a process.

use std::path::PathBuf;

use serde::Serialize;

/// What the report says about the machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    /// Whether this kernel takes the `tls` upper-layer protocol on a TCP
    /// socket, which kernel TLS (kTLS) offload needs; the reason when not.
    pub kernel_tls: Result<(), String>,
}

impl Machine {
    pub fn describe() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "unknown".into());
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|rest| rest.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Self {
            hostname: read("/proc/sys/kernel/hostname").trim().to_owned(),
            os,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel_tls: kernel_tls(),
        }
    }
}

/// Asks the kernel to attach the `tls` ULP to a connected loopback socket,
/// as a kTLS user would before handing it the session keys. Without
/// `CONFIG_TLS` this fails with ENOENT.
fn kernel_tls() -> Result<(), String> {
    use nix::sys::socket::{setsockopt, sockopt::TcpUlp};
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("loopback: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("loopback: {e}"))?;
    let socket = std::net::TcpStream::connect(addr).map_err(|e| format!("loopback: {e}"))?;
    setsockopt(&socket, TcpUlp::default(), b"tls")
        .map_err(|errno| format!("TCP_ULP \"tls\" refused: {}", errno.desc()))
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(f64::NAN));
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Why a part cannot run here: not root, or tools missing (each named with
/// its Debian package). `None` when it can.
pub fn missing_for_lab(tools: &[(&str, &str)]) -> Option<String> {
    if !is_root() {
        return Some(
            "needs root (it builds network namespaces, veths, a bridge and iptables rules)".into(),
        );
    }
    let missing: Vec<&(&str, &str)> = tools.iter().filter(|(tool, _)| !has_tool(tool)).collect();
    if missing.is_empty() {
        return None;
    }
    let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    packages.sort_unstable();
    packages.dedup();
    Some(format!(
        "missing tools: {}; install them with: apt-get install {}",
        missing
            .iter()
            .map(|(t, p)| format!("{t} (package {p})"))
            .collect::<Vec<_>>()
            .join(", "),
        packages.join(" ")
    ))
}

/// Whether `tool` is an executable in PATH (or /usr/sbin, /sbin), or, for
/// an absolute path, whether it exists.
pub fn has_tool(tool: &str) -> bool {
    if tool.starts_with('/') {
        return std::path::Path::new(tool).is_file();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(tool).is_file())
}

/// A meshbox binary built next to this one (`target/release/NAME` for
/// `target/release/bench`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first with `cargo build --release --workspace`",
        path.display()
    );
    Ok(path)
}

/// Which of `names` are not built next to this binary.
pub fn missing_siblings(names: &[&str]) -> Option<String> {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| sibling_binary(n).is_err())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} not built next to this binary: run `cargo build --release --workspace` first",
            missing.join(", ")
        )
    })
}

/// VmRSS of `pid` (this process when `None`) in KiB; 0 where unavailable.
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds `pid` has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
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
    // SAFETY: sysconf has no preconditions.
    let hz = match unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    (ticks(11) + ticks(12)) / hz
}
