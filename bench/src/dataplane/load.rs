//! `bench rate`: an open-loop HTTP/1.1 client at a fixed request rate, for
//! latency figures that are not taken at saturation (wrk can only saturate,
//! and wrk2 is not in Debian).
//!
//! A pacer thread issues one ticket per request at its intended send time
//! (`start + i / rate`); `--connections` keep-alive connections (hyper's
//! HTTP/1.1 client) take tickets in turn and send. Each latency is measured
//! from the ticket's intended time, not from when a connection got round
//! to sending it: when the path under test stalls, the requests that should
//! have gone out meanwhile wait in the queue and their waiting counts — no
//! coordinated omission. The pacer's own lateness is reported too, so the
//! client's precision is on record next to the figures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc};

use crate::stats::percentile;

#[derive(clap::Args)]
pub struct RateArgs {
    /// The server, `ip:port`.
    #[arg(long)]
    pub target: SocketAddr,
    /// Path to GET.
    #[arg(long, default_value = "/index.html")]
    pub path: String,
    /// Requests per second, spread evenly.
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Keep-alive connections the requests are spread over.
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
}

/// What `bench rate` prints (one JSON line on stdout).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateResult {
    pub requests: u64,
    pub errors: u64,
    pub non_2xx: u64,
    /// Requests completed per second of the run.
    pub achieved_rate: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// How late the pacer issued tickets (its own precision), p99.
    pub pacer_late_p99_us: f64,
}

/// One ticket: when the request should have been sent.
type Ticket = Instant;

pub async fn rate(args: RateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate > 0 && args.connections > 0,
        "--rate and --connections must be positive"
    );
    let host = args.target.to_string();
    // Connect everything first: connection setup is not what is measured.
    let mut senders = vec![];
    for _ in 0..args.connections {
        senders.push(connect(args.target).await?);
    }
    let total = u64::from(args.rate) * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let (tx, rx) = mpsc::unbounded_channel::<Ticket>();
    let rx = Arc::new(Mutex::new(rx));
    let started = Instant::now() + Duration::from_millis(20);
    let pacer = std::thread::spawn(move || pace(started, interval, total, &tx));

    let mut workers = tokio::task::JoinSet::new();
    for sender in senders {
        let (rx, target, host, path) = (rx.clone(), args.target, host.clone(), args.path.clone());
        workers.spawn(async move { work(sender, rx, target, &host, &path).await });
    }
    let (mut latencies, mut errors, mut non_2xx) = (Vec::with_capacity(total as usize), 0, 0);
    while let Some(result) = workers.join_next().await {
        let w = result.context("rate worker")?;
        latencies.extend(w.latencies_us);
        errors += w.errors;
        non_2xx += w.non_2xx;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let late = pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    let result = RateResult {
        requests: latencies.len() as u64,
        errors,
        non_2xx,
        achieved_rate: latencies.len() as f64 / elapsed,
        p50_us: percentile(&latencies, 0.5),
        p90_us: percentile(&latencies, 0.9),
        p99_us: percentile(&latencies, 0.99),
        max_us: percentile(&latencies, 1.0),
        pacer_late_p99_us: percentile(&late, 0.99),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// Issues `total` tickets, one per `interval` from `start`; returns how
/// late each went out (µs). Dropping `tx` at the end tells the workers to
/// finish.
fn pace(
    start: Instant,
    interval: Duration,
    total: u64,
    tx: &mpsc::UnboundedSender<Ticket>,
) -> Vec<f64> {
    // Default timer slack is 50 µs; this thread's sleeps should end on
    // time, as the intended times are 500 µs apart at 2 000/s.
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only the
    // calling thread.
    unsafe {
        nix::libc::prctl(nix::libc::PR_SET_TIMERSLACK, 1 as nix::libc::c_ulong);
    }
    let mut late = Vec::with_capacity(total as usize);
    for i in 0..total {
        let intended = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        late.push(intended.elapsed().as_secs_f64() * 1e6);
        if tx.send(intended).is_err() {
            break;
        }
    }
    late
}

#[derive(Default)]
struct Worked {
    latencies_us: Vec<f64>,
    errors: u64,
    non_2xx: u64,
}

async fn work(
    mut sender: http1::SendRequest<Empty<Bytes>>,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Ticket>>>,
    target: SocketAddr,
    host: &str,
    path: &str,
) -> Worked {
    let mut w = Worked::default();
    loop {
        let Some(intended) = rx.lock().await.recv().await else {
            return w;
        };
        match request(&mut sender, host, path).await {
            Ok(status) => {
                w.latencies_us.push(intended.elapsed().as_secs_f64() * 1e6);
                if !status.is_success() {
                    w.non_2xx += 1;
                }
            }
            Err(error) => {
                w.errors += 1;
                if w.errors <= 3 {
                    eprintln!("request to {target}: {error:#}");
                }
                // The connection is likely gone: a new one for the next.
                match connect(target).await {
                    Ok(s) => sender = s,
                    Err(error) => {
                        eprintln!("reconnecting to {target}: {error:#}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

async fn connect(target: SocketAddr) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(target),
    )
    .await
    .with_context(|| format!("connecting to {target} timed out"))?
    .with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn request(
    sender: &mut http1::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> anyhow::Result<http::StatusCode> {
    sender.ready().await?;
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        let response = sender.send_request(req).await?;
        let status = response.status();
        response.into_body().collect().await?;
        anyhow::Ok(status)
    })
    .await
    .context("no response within 10 s")??;
    Ok(response)
}

/// `bench hold --connect ADDR --http2 PATH`: opens `count` HTTP/2
/// connections (prior knowledge, as gRPC clients and h2load speak it),
/// [`super::HOLD_BATCH`] at a time, each complete once one GET of `path`
/// was answered 2xx; prints `ready COUNT SECONDS` and holds them until
/// killed. An HTTP/2 connection is what an L7 proxy keeps per idle client
/// (its HTTP/1.1 keep-alive connections are closed after the header read
/// timeout), so this is the waypoint's idle-connection test.
pub async fn hold_connect_http2(addr: SocketAddr, count: usize, path: &str) -> anyhow::Result<()> {
    use hyper::client::conn::http2;
    use hyper_util::rt::TokioExecutor;
    let uri: http::Uri = format!("http://{addr}{path}")
        .parse()
        .with_context(|| format!("--http2 {path:?}"))?;
    let start = Instant::now();
    let mut held = Vec::with_capacity(count);
    while held.len() < count {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..super::HOLD_BATCH.min(count - held.len()) {
            let uri = uri.clone();
            batch.spawn(async move {
                tokio::time::timeout(Duration::from_secs(30), async move {
                    let stream = tokio::net::TcpStream::connect(addr).await?;
                    stream.set_nodelay(true)?;
                    let (mut sender, connection) =
                        http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
                    let connection = tokio::spawn(connection);
                    let response = sender
                        .send_request(http::Request::get(uri).body(Empty::<Bytes>::new())?)
                        .await?;
                    let status = response.status();
                    response.into_body().collect().await?;
                    anyhow::ensure!(status.is_success(), "answered {status}");
                    anyhow::Ok((sender, connection))
                })
                .await
                .context("no answer within 30 s")?
            });
        }
        while let Some(result) = batch.join_next().await {
            match result? {
                Ok(connection) => held.push(connection),
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
