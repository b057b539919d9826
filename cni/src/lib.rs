//! The CNI plugin (`meshbox-cni`) and its contract with the node agent.
//!
//! The plugin is chained after the cluster's primary CNI. On `ADD` it tells
//! the dataplane on this node, over a Unix socket, which pod just got a
//! network namespace, and returns only once the agent says the pod is
//! captured (or not enrolled), so an enrolled pod never runs a single
//! instruction uncaptured. An agent that cannot be reached fails the `ADD`
//! (fail closed; the runtime retries).
//!
//! The contract on the socket is one line of JSON each way per connection:
//!
//! ```text
//! -> {"command":"add","containerId":"c1","podNamespace":"default","podName":"web-0",
//!     "podUid":"6f1c…","netns":"/var/run/netns/cni-1234","ips":["10.1.2.3"]}
//! <- {"captured":true,"error":null}
//! ```
//!
//! - `command` is `add`, `del` or `check`.
//! - `add`: `captured:true` means rules and listeners are in place;
//!   `captured:false` with `error:null` means the pod is not enrolled and
//!   nothing was done; any `error` fails the `ADD`.
//! - `del`: the agent releases the pod; the plugin never fails a `DEL`
//!   because of the agent (it logs and succeeds).
//! - `check`: `captured:true` or (not enrolled) `captured:false` with
//!   `error:null` pass; an enrolled pod that is not captured is answered
//!   with an `error`, which fails the `CHECK`.
//!
//! [`serve`] is the agent's side of the socket, [`request`] the plugin's,
//! [`plugin`] the CNI spec side (environment, stdin, results, errors), and
//! [`install`] puts the plugin into a node's CNI configuration.
//!
//! A crate of its own, as Istio keeps istio-cni apart from ztunnel: the
//! plugin binary is copied onto every node and linked statically, so it
//! links nothing of the dataplane (no global allocator, no proxy). The
//! dataplane depends on this library for the contract only: the types
//! above and [`listen`]/[`serve`].

pub mod install;
pub mod plugin;

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Where the dataplane listens for the plugin unless the network config
/// says otherwise (`"socket"`).
pub const DEFAULT_SOCKET: &str = "/var/run/meshbox/cni.sock";

/// Longest line either side accepts, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// How long [`serve`] waits for a connection's request line, and for its
/// answer to be taken.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections [`serve`] handles at once; more wait to be accepted.
const MAX_CONCURRENT: usize = 256;

/// What the plugin asks the agent to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureCommand {
    Add,
    Del,
    Check,
}

/// The plugin's request: one line of JSON.
///
/// Pod fields come from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
/// `K8S_POD_UID`) and are empty when the runtime did not give them; `ips`
/// come from the primary plugin's result and are empty when there was none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureRequest {
    pub command: CaptureCommand,
    pub container_id: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub pod_uid: String,
    /// Path of the pod's network namespace (`/var/run/netns/x`,
    /// `/proc/123/ns/net`); may be empty on `del`.
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// The agent's answer: one line of JSON. `error` is always present
/// (`null` on success).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureResponse {
    pub captured: bool,
    #[serde(default)]
    pub error: Option<String>,
}

impl CaptureResponse {
    /// Rules and listeners are in place.
    pub fn captured() -> Self {
        Self {
            captured: true,
            error: None,
        }
    }

    /// Not enrolled (or, for `del`, released): nothing to do.
    pub fn not_captured() -> Self {
        Self {
            captured: false,
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            captured: false,
            error: Some(message.into()),
        }
    }
}

/// Binds the agent's socket at `path`: creates the parent directory,
/// replaces a stale socket left by an earlier run (never another kind of
/// file), and makes it accessible to root only, as the plugin runs as root.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The agent's side: for each connection, reads one request line (at most
/// [`MAX_LINE`] bytes, within [`READ_TIMEOUT`]), calls `handler`, writes
/// its answer as one line and closes. Input that is not a request is
/// answered with `{"captured":false,"error":"…"}`; a connection that closes
/// without sending anything (a liveness probe) is dropped quietly. Runs
/// until the future is dropped; one connection's trouble (a panicking
/// handler included) never ends it.
pub async fn serve<F, Fut>(listener: UnixListener, handler: F)
where
    F: Fn(CaptureRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CaptureResponse> + Send + 'static,
{
    serve_with_timeout(listener, READ_TIMEOUT, handler).await
}

/// [`serve`] with another wait for the request line than [`READ_TIMEOUT`].
pub async fn serve_with_timeout<F, Fut>(listener: UnixListener, read_timeout: Duration, handler: F)
where
    F: Fn(CaptureRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CaptureResponse> + Send + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: back off, keep serving.
                warn!(error = %e, "cni socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_one(stream, read_timeout, &*handler).await {
                debug!(error = %e, "cni socket: connection ended early");
            }
        });
    }
}

async fn serve_one<F, Fut>(
    stream: UnixStream,
    read_timeout: Duration,
    handler: &F,
) -> io::Result<()>
where
    F: Fn(CaptureRequest) -> Fut,
    Fut: Future<Output = CaptureResponse>,
{
    let (read, mut write) = stream.into_split();
    let response = match tokio::time::timeout(read_timeout, read_line(read)).await {
        Err(_) => CaptureResponse::error("timed out waiting for the request line"),
        Ok(Err(e)) => CaptureResponse::error(format!("reading the request: {e}")),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(line))) => match serde_json::from_slice::<CaptureRequest>(&line) {
            Ok(request) => {
                debug!(?request, "cni request");
                handler(request).await
            }
            Err(e) => {
                warn!(error = %e, "cni socket: malformed request");
                CaptureResponse::error(format!("malformed request: {e}"))
            }
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    tokio::time::timeout(read_timeout, async {
        write.write_all(&out).await?;
        write.shutdown().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "writing the response"))?
}

/// Reads one line of at most [`MAX_LINE`] bytes. `None`: the peer closed
/// without sending anything. A last line without its newline counts.
async fn read_line(read: impl AsyncRead + Unpin) -> io::Result<Option<Vec<u8>>> {
    let mut reader = BufReader::new(read.take(MAX_LINE as u64 + 1));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes"),
        ));
    } else if line.is_empty() {
        return Ok(None);
    }
    Ok(Some(line))
}

/// Why [`request`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot connect to the dataplane at {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("talking to the dataplane at {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the dataplane at {path} closed the connection without answering")]
    NoAnswer { path: String },
    #[error("the dataplane at {path} answered something that is not a response: {source}")]
    Malformed {
        path: String,
        source: serde_json::Error,
    },
    #[error("no answer from the dataplane at {path} within {timeout:?}")]
    Timeout { path: String, timeout: Duration },
}

/// The plugin's side: sends `req` to the agent at `socket` and waits, at
/// most `timeout` in all, for its answer.
pub async fn request(
    socket: &Path,
    req: &CaptureRequest,
    timeout: Duration,
) -> Result<CaptureResponse, RequestError> {
    let path = socket.display().to_string();
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| RequestError::Connect {
                path: path.clone(),
                source,
            })?;
        let io_err = |source| RequestError::Io {
            path: path.clone(),
            source,
        };
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(|e| io_err(io::Error::other(e)))?;
        line.push(b'\n');
        write.write_all(&line).await.map_err(io_err)?;
        let answer = read_line(read)
            .await
            .map_err(io_err)?
            .ok_or_else(|| RequestError::NoAnswer { path: path.clone() })?;
        serde_json::from_slice(&answer).map_err(|source| RequestError::Malformed {
            path: path.clone(),
            source,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(RequestError::Timeout {
            path: path.clone(),
            timeout,
        }),
    }
}

/// Whether something accepts connections on `socket` (the plugin's
/// `STATUS`). The probe sends nothing, which [`serve`] ignores.
pub async fn probe(socket: &Path, timeout: Duration) -> Result<(), RequestError> {
    let path = socket.display().to_string();
    match tokio::time::timeout(timeout, UnixStream::connect(socket)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(RequestError::Connect { path, source }),
        Err(_) => Err(RequestError::Timeout { path, timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_json() -> &'static str {
        r#"{"command":"add","containerId":"c1","podNamespace":"ns","podName":"p","podUid":"u","netns":"/proc/1/ns/net","ips":["10.1.2.3","fd00::1"]}"#
    }

    #[test]
    fn contract_round_trips_exactly() {
        let req: CaptureRequest = serde_json::from_str(request_json()).unwrap();
        assert_eq!(req.command, CaptureCommand::Add);
        assert_eq!(
            req.ips,
            vec![
                "10.1.2.3".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(serde_json::to_string(&req).unwrap(), request_json());
        assert_eq!(
            serde_json::to_string(&CaptureResponse::captured()).unwrap(),
            r#"{"captured":true,"error":null}"#
        );
        assert_eq!(
            serde_json::to_string(&CaptureResponse::error("no")).unwrap(),
            r#"{"captured":false,"error":"no"}"#
        );
        let resp: CaptureResponse = serde_json::from_str(r#"{"captured":false}"#).unwrap();
        assert_eq!(resp, CaptureResponse::not_captured());
    }

    /// A socket path in a directory of its own, removed on drop.
    struct TempSocket(tempfile::TempDir);

    impl TempSocket {
        fn new(tag: &str) -> Self {
            let dir = tempfile::Builder::new()
                .prefix(&format!("meshbox-cni-unit-{tag}-"))
                .tempdir()
                .unwrap();
            Self(dir)
        }
        fn path(&self) -> std::path::PathBuf {
            self.0.path().join("cni.sock")
        }
    }

    async fn start(tag: &str) -> (TempSocket, tokio::task::JoinHandle<()>) {
        let dir = TempSocket::new(tag);
        let listener = listen(&dir.path()).unwrap();
        let server = tokio::spawn(serve(listener, |req: CaptureRequest| async move {
            match req.pod_name.as_str() {
                "panics" => panic!("handler bug"),
                "out" => CaptureResponse::not_captured(),
                _ => CaptureResponse::captured(),
            }
        }));
        (dir, server)
    }

    async fn raw(path: &Path, send: &[u8]) -> Option<CaptureResponse> {
        let mut stream = UnixStream::connect(path).await.unwrap();
        // The server may answer and close before taking everything.
        let _ = stream.write_all(send).await;
        let _ = stream.shutdown().await;
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        if out.is_empty() {
            return None;
        }
        assert_eq!(out.last(), Some(&b'\n'), "one line: {out:?}");
        Some(serde_json::from_slice(&out).unwrap())
    }

    #[tokio::test]
    async fn serve_answers_requests_and_survives_bad_input() {
        let (dir, server) = start("serve").await;
        let path = dir.path();
        let mut req: CaptureRequest = serde_json::from_str(request_json()).unwrap();
        let timeout = Duration::from_secs(5);

        assert_eq!(
            request(&path, &req, timeout).await.unwrap(),
            CaptureResponse::captured()
        );
        req.pod_name = "out".into();
        assert_eq!(
            request(&path, &req, timeout).await.unwrap(),
            CaptureResponse::not_captured()
        );

        for garbage in [
            &b"not json\n"[..],
            b"{\"command\":\"explode\",\"containerId\":\"c\"}\n",
            b"{\"command\":\"add\"}\n",
            b"{\"command\":\"add\",\"containerId\":\"c\",\"ips\":[\"999.1.1.1\"]}\n",
            b"\xff\xfe\n",
            b"\n",
        ] {
            let resp = raw(&path, garbage).await.expect("an answer");
            assert!(!resp.captured);
            assert!(resp.error.unwrap().contains("malformed"));
        }
        // Too long: refused without reading it all.
        let huge = vec![b'x'; MAX_LINE * 4];
        let resp = raw(&path, &huge).await.expect("an answer");
        assert!(resp.error.unwrap().contains("longer than"));
        // A last line without its newline still counts.
        let resp = raw(&path, request_json().as_bytes()).await.unwrap();
        assert_eq!(resp, CaptureResponse::captured());
        // A probe that sends nothing gets nothing.
        assert_eq!(raw(&path, b"").await, None);
        // A panicking handler drops that connection only.
        req.pod_name = "panics".into();
        assert!(matches!(
            request(&path, &req, timeout).await,
            Err(RequestError::NoAnswer { .. })
        ));
        probe(&path, timeout).await.unwrap();
        req.pod_name = "p".into();
        assert_eq!(
            request(&path, &req, timeout).await.unwrap(),
            CaptureResponse::captured()
        );
        assert!(!server.is_finished());
        server.abort();
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let dir = TempSocket::new("silent");
        let listener = listen(&dir.path()).unwrap();
        let server = tokio::spawn(serve_with_timeout(
            listener,
            Duration::from_millis(200),
            |_req: CaptureRequest| async { CaptureResponse::captured() },
        ));
        let mut stream = UnixStream::connect(dir.path()).await.unwrap();
        stream.write_all(b"{\"command\":").await.unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        let resp: CaptureResponse = serde_json::from_slice(&out).unwrap();
        assert!(resp.error.unwrap().contains("timed out"));
        server.abort();
    }

    #[tokio::test]
    async fn client_reports_absent_and_silent_agents() {
        let dir = TempSocket::new("client");
        let req: CaptureRequest = serde_json::from_str(request_json()).unwrap();
        let err = request(&dir.path(), &req, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, RequestError::Connect { .. }), "{err}");
        assert!(probe(&dir.path(), Duration::from_secs(1)).await.is_err());

        // Accepts, never answers.
        let listener = listen(&dir.path()).unwrap();
        let hold = tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let err = request(&dir.path(), &req, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, RequestError::Timeout { .. }), "{err}");
        hold.abort();
    }

    #[test]
    fn listen_replaces_stale_sockets_only() {
        let dir = TempSocket::new("listen");
        std::fs::write(dir.path(), b"precious").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(listen(&dir.path()).is_err());
            assert_eq!(std::fs::read(dir.path()).unwrap(), b"precious");
            std::fs::remove_file(dir.path()).unwrap();
            drop(listen(&dir.path()).unwrap());
            // Left behind by a dead process: replaced.
            let again = listen(&dir.path()).unwrap();
            drop(again);
        });
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
