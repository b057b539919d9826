//! `meshbox-cni install` / `uninstall` as the DaemonSet runs them: the real
//! binary against a node's CNI directories in a temporary folder. The
//! watching installer keeps the plugin in the conflist when the cluster's
//! CNI rewrites it, and takes it out on SIGTERM.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PLUGIN: &str = env!("CARGO_BIN_EXE_meshbox-cni");
const SOCKET: &str = "/var/run/meshbox/cni.sock";

const KINDNET: &str = r#"{
	"cniVersion": "0.3.1",
	"name": "kindnet",
	"plugins": [
	{
		"type": "ptp",
		"ipMasq": false,
		"ipam": {
			"type": "host-local",
			"dataDir": "/run/cni-ipam-state",
			"routes": [ { "dst": "0.0.0.0/0" } ],
			"ranges": [ [ { "subnet": "10.244.1.0/24" } ] ]
		},
		"mtu": 1500
	},
	{ "type": "portmap", "capabilities": { "portMappings": true } }
	]
}
"#;

/// A node's CNI directories, removed on drop.
struct Node {
    root: tempfile::TempDir,
}

impl Node {
    fn new(tag: &str) -> Self {
        let root = tempfile::Builder::new()
            .prefix(&format!("meshbox-cni-install-it-{tag}-"))
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(root.path().join("bin")).unwrap();
        std::fs::create_dir_all(root.path().join("net.d")).unwrap();
        Self { root }
    }

    fn bin(&self) -> PathBuf {
        self.root.path().join("bin")
    }

    fn conf_dir(&self) -> PathBuf {
        self.root.path().join("net.d")
    }

    fn conflist(&self) -> PathBuf {
        self.conf_dir().join("10-kindnet.conflist")
    }

    fn command(&self, sub: &str) -> Command {
        let mut cmd = Command::new(PLUGIN);
        cmd.arg(sub)
            .arg("--cni-bin-dir")
            .arg(self.bin())
            .arg("--cni-conf-dir")
            .arg(self.conf_dir());
        if sub == "install" {
            cmd.arg("--socket").arg(SOCKET);
        }
        cmd
    }

    fn types(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.conflist()).unwrap();
        let list: Value = serde_json::from_str(&text).unwrap();
        list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// Kills the child if the test fails before it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_shot_install_then_uninstall() {
    let node = Node::new("oneshot");
    std::fs::write(node.conflist(), KINDNET).unwrap();
    let out = node.command("install").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(node.types(), ["ptp", "portmap", "meshbox-cni"]);
    // It copied itself: the plugin in the bin dir is this very binary.
    assert_eq!(
        std::fs::read(node.bin().join("meshbox-cni")).unwrap(),
        std::fs::read(PLUGIN).unwrap()
    );
    // The copy still works as a plugin.
    let version = Command::new(node.bin().join("meshbox-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("supportedVersions"),
        "{version:?}"
    );

    let out = node.command("uninstall").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(node.conflist()).unwrap(), KINDNET);
    assert!(!node.bin().join("meshbox-cni").exists());
}

#[test]
fn bad_json_fails_the_install_with_the_reason_and_leaves_the_file() {
    let node = Node::new("badjson");
    std::fs::write(node.conflist(), "{ not json").unwrap();
    let out = node.command("install").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("10-kindnet.conflist"), "{stderr}");
    assert!(stderr.contains("not valid JSON"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(node.conflist()).unwrap(),
        "{ not json"
    );
}

#[test]
fn the_watching_installer_repairs_the_conflist_and_uninstalls_on_sigterm() {
    let node = Node::new("watch");
    // Started before the cluster's CNI has written anything: it waits.
    let mut child = node
        .command("install")
        .args(["--watch", "100ms"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log, read as it comes, so "it waits" is seen rather than assumed
    // from it still running after a guessed pause.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().unwrap();
    let lines = log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            lines.lock().unwrap().push(line);
        }
    });
    let mut child = Running(child);
    wait_for(
        "the installer to say it waits",
        Duration::from_secs(10),
        || {
            log.lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("waiting for the cluster's CNI to write its configuration"))
        },
    );
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "it waits for a config instead of exiting: {:?}",
        log.lock().unwrap()
    );
    assert!(!node.conflist().exists(), "it wrote nothing meanwhile");
    std::fs::write(node.conflist(), KINDNET).unwrap();
    wait_for(
        "the plugin in the conflist",
        Duration::from_secs(10),
        || {
            node.conflist().exists()
                && node.types().last().map(String::as_str) == Some("meshbox-cni")
        },
    );

    // kindnet restarts and rewrites its file, dropping the entry.
    let rewritten = KINDNET.replace("10.244.1.0/24", "10.244.9.0/24");
    let temp = node.conf_dir().join("kindnet.temp");
    std::fs::write(&temp, &rewritten).unwrap();
    std::fs::rename(&temp, node.conflist()).unwrap();
    wait_for("the entry to be put back", Duration::from_secs(10), || {
        node.types() == ["ptp", "portmap", "meshbox-cni"]
    });
    assert!(
        std::fs::read_to_string(node.conflist())
            .unwrap()
            .contains("10.244.9.0/24")
    );

    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let sent = unsafe { nix::libc::kill(child.0.id() as i32, nix::libc::SIGTERM) };
    assert_eq!(sent, 0, "sending SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    // kindnet's own (rewritten) file, exactly; nothing of ours left.
    assert_eq!(std::fs::read_to_string(node.conflist()).unwrap(), rewritten);
    assert!(!node.bin().join("meshbox-cni").exists());
    let left: Vec<_> = std::fs::read_dir(node.conf_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["10-kindnet.conflist"]);
}
