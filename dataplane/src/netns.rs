//! Network namespaces: open one by path, run code inside it, list its
//! addresses, and find the one holding a given pod IP.
//!
//! Code runs inside a namespace on a fresh OS thread that enters it and then
//! ends, so no thread of the runtime is ever left in a pod's namespace.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    /// `(device, inode)`: the namespace's identity.
    id: (u64, u64),
}

impl Netns {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        let meta = file.metadata()?;
        Ok(Self {
            file,
            path,
            id: (meta.dev(), meta.ino()),
        })
    }

    /// The namespace this process runs in.
    pub fn current() -> io::Result<Self> {
        Self::open("/proc/self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn same_as(&self, other: &Netns) -> bool {
        self.id == other.id
    }

    /// Runs `f` inside this namespace, on a thread of its own.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                        io::Error::other(format!("entering {}: {e}", self.path.display()))
                    })?;
                    f()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("thread in the namespace panicked")))
        })
    }

    /// The IP addresses configured in this namespace (loopback excluded).
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        self.run(|| {
            let mut out = Vec::new();
            for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
                let Some(addr) = ifa.address else { continue };
                let ip = if let Some(v4) = addr.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                if !ip.is_loopback() {
                    out.push(ip.to_canonical());
                }
            }
            Ok(out)
        })
    }
}

/// Every network namespace on the machine except the current one, by the
/// IPs it holds: the named ones (`/var/run/netns`) and those of running
/// processes (`/proc/*/ns/net`), each once.
pub fn scan() -> HashMap<IpAddr, PathBuf> {
    let mut seen = Vec::new();
    if let Ok(me) = Netns::current() {
        seen.push(me.id);
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/var/run/netns") {
        candidates.extend(dir.flatten().map(|e| e.path()));
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        candidates.extend(
            dir.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .map(|e| e.path().join("ns/net")),
        );
    }
    let mut found = HashMap::new();
    for path in candidates {
        let Ok(ns) = Netns::open(&path) else { continue };
        if seen.contains(&ns.id) {
            continue;
        }
        seen.push(ns.id);
        if let Ok(addrs) = ns.addresses() {
            for ip in addrs {
                found.entry(ip).or_insert_with(|| path.clone());
            }
        }
    }
    found
}
