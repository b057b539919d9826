//! `bench`: meshbox's benchmarks, each figure next to a baseline measured in
//! the same run (these machines are shared and noisy: read the ratios).
//!
//! `cargo build --release --workspace && target/release/bench all` runs every
//! part and writes one report (report.md with tables, report.json, SVG
//! charts) to `--out`; `bench all --quick` is the short version CI runs,
//! checked against machine-speed-independent bounds (see `checks`). Each
//! part also runs alone (`bench ca|model|xds|capture|dataplane|waypoint`),
//! with the same code and the same report.

mod alloc;
mod ca;
mod capture;
mod chart;
mod checks;
mod dataplane;
mod host;
mod lab;
mod model;
mod numbers;
mod report;
mod section;
mod stats;
mod waypoint;
mod xds;

use std::future::Future;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::report::{Meta, Report};
use crate::section::{Section, Status};

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(name = "bench", about = "meshbox benchmarks")]
struct Cli {
    /// Folder for the report (report.md, report.json, *.svg).
    #[arg(long, global = true, default_value = "target/bench-report")]
    out: PathBuf,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Every part below, one report. Parts that need root or tools this
    /// machine lacks are reported as skipped, with the reason.
    All(AllArgs),
    /// CA issuance through the full gRPC path vs raw ECDSA signing.
    Ca(ca::CaArgs),
    /// The control plane's mesh model: full build, incremental updates,
    /// memory, at several sizes.
    Model(model::ModelArgs),
    /// The xDS server: full sync and change propagation to many clients.
    Xds(xds::XdsArgs),
    /// Time from CNI ADD to a captured pod, through the real meshbox-cni
    /// and node agent (root; network namespaces).
    Capture(capture::CaptureArgs),
    /// Pod-to-pod traffic through in-pod capture and two node dataplanes vs
    /// the same traffic without the mesh (root; iperf3, wrk, nginx).
    Dataplane(dataplane::DataplaneArgs),
    /// HTTP/1.1 and HTTP/2 through the waypoint (client node → waypoint →
    /// server node) vs the same pods L4-only and vs direct; the waypoint's
    /// CPU and memory at 1 000 requests/s and with idle connections (root;
    /// wrk, h2load, nginx).
    Waypoint(waypoint::WaypointArgs),
    /// (internal) the client side of `xds`, run as a child process.
    #[command(hide = true)]
    XdsClients(xds::ClientArgs),
    /// (internal) hold idle connections open, for `dataplane` and `waypoint`.
    #[command(hide = true)]
    Hold(dataplane::HoldArgs),
    /// (internal) open-loop HTTP/1.1 requests at a fixed rate, for
    /// `dataplane` and `waypoint`.
    #[command(hide = true)]
    Rate(dataplane::RateArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Ca,
    Model,
    Xds,
    Capture,
    Dataplane,
    Waypoint,
}

#[derive(Args)]
struct AllArgs {
    /// Short runs with small sizes (under 2 minutes), for CI: the regression
    /// checks hold either way, the timings are only indicative.
    #[arg(long)]
    quick: bool,
    /// Parts to leave out.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<Part>,
    /// A stock Istio ztunnel binary for the dataplane part to measure side
    /// by side with ours (`bench dataplane --ztunnel`).
    #[arg(long)]
    ztunnel: Option<PathBuf>,
}

/// A part's arguments as `bench PART [--quick]` would have them, so `all`
/// measures exactly what the part alone measures.
fn part_args<A: Args + FromArgMatches>(name: &'static str, quick: bool) -> anyhow::Result<A> {
    let command = A::augment_args(clap::Command::new(name));
    let mut argv = vec![name];
    if quick {
        argv.push("--quick");
    }
    Ok(A::from_arg_matches(&command.try_get_matches_from(argv)?)?)
}

/// Runs one part: skipped with `unavailable`'s reason, or timed, its error
/// turned into a failed section so the other parts still run.
async fn part(
    id: &str,
    name: &str,
    unavailable: Option<String>,
    run: impl Future<Output = anyhow::Result<Section>>,
) -> Section {
    if let Some(reason) = unavailable {
        eprintln!("### {name}: skipped ({reason})");
        return Section::skipped(id, name, reason);
    }
    eprintln!("### {name}");
    let started = Instant::now();
    let mut section = match run.await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("### {name} failed: {e:#}");
            Section::failed(id, name, &e)
        }
    };
    section.elapsed_s = started.elapsed().as_secs_f64();
    section
}

async fn run_parts(
    parts: &[Part],
    quick: bool,
    what: Option<What>,
    ztunnel: Option<PathBuf>,
) -> anyhow::Result<Vec<Section>> {
    let mut what = what;
    let mut sections = vec![];
    for &p in parts {
        let section = match p {
            Part::Ca => {
                let args = match what.take() {
                    Some(What::Ca(a)) => a,
                    _ => part_args("ca", quick)?,
                };
                part("ca", ca::NAME, ca::unavailable(), ca::run(args)).await
            }
            Part::Model => {
                let args = match what.take() {
                    Some(What::Model(a)) => a,
                    _ => part_args("model", quick)?,
                };
                part("model", model::NAME, None, async { model::run(args) }).await
            }
            Part::Xds => {
                let args = match what.take() {
                    Some(What::Xds(a)) => a,
                    _ => part_args("xds", quick)?,
                };
                part("xds", xds::NAME, None, xds::run(args)).await
            }
            Part::Capture => {
                let args = match what.take() {
                    Some(What::Capture(a)) => a,
                    _ => part_args("capture", quick)?,
                };
                part(
                    "capture",
                    capture::NAME,
                    capture::unavailable(),
                    capture::run(args),
                )
                .await
            }
            Part::Dataplane => {
                let args = match what.take() {
                    Some(What::Dataplane(a)) => a,
                    _ => {
                        let mut a: dataplane::DataplaneArgs = part_args("dataplane", quick)?;
                        a.ztunnel = ztunnel.clone();
                        a
                    }
                };
                part(
                    "dataplane",
                    dataplane::NAME,
                    dataplane::unavailable(),
                    dataplane::run(args),
                )
                .await
            }
            Part::Waypoint => {
                let args = match what.take() {
                    Some(What::Waypoint(a)) => a,
                    _ => part_args("waypoint", quick)?,
                };
                part(
                    "waypoint",
                    waypoint::NAME,
                    waypoint::unavailable(),
                    waypoint::run(args),
                )
                .await
            }
        };
        sections.push(section);
        if lab::interrupted() {
            break;
        }
    }
    Ok(sections)
}

fn main() -> anyhow::Result<()> {
    meshbox_certs::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut ztunnel = None;
    let (parts, quick, what): (Vec<Part>, bool, Option<What>) = match cli.what {
        What::XdsClients(args) => return runtime.block_on(xds::run_clients(args)),
        What::Hold(args) => return runtime.block_on(dataplane::hold(args)),
        What::Rate(args) => return runtime.block_on(dataplane::rate(args)),
        What::All(args) => {
            let parts = [
                Part::Ca,
                Part::Model,
                Part::Xds,
                Part::Capture,
                Part::Dataplane,
                Part::Waypoint,
            ]
            .into_iter()
            .filter(|p| !args.skip.contains(p))
            .collect();
            ztunnel = args.ztunnel;
            (parts, args.quick, None)
        }
        What::Ca(a) => (vec![Part::Ca], a.quick, Some(What::Ca(a))),
        What::Model(a) => (vec![Part::Model], a.quick, Some(What::Model(a))),
        What::Xds(a) => (vec![Part::Xds], a.quick, Some(What::Xds(a))),
        What::Capture(a) => (vec![Part::Capture], a.quick, Some(What::Capture(a))),
        What::Dataplane(a) => (vec![Part::Dataplane], a.quick, Some(What::Dataplane(a))),
        What::Waypoint(a) => (vec![Part::Waypoint], a.quick, Some(What::Waypoint(a))),
    };
    let started = Instant::now();
    let mut meta = Meta::start(quick);
    let sections = runtime.block_on(run_parts(&parts, quick, what, ztunnel))?;
    meta.finish(started.elapsed());
    let checks = checks::evaluate(&sections);
    let report = Report {
        schema: 1,
        meta,
        sections,
        checks,
    };
    report::write(&cli.out, &report)?;
    let failed: Vec<&str> = report
        .sections
        .iter()
        .filter(|s| !matches!(s.status, Status::Ok))
        .filter(|s| parts.len() == 1 || matches!(s.status, Status::Failed { .. }))
        .map(|s| s.name.as_str())
        .collect();
    let failed_checks = checks::failures(&report.checks);
    if lab::interrupted() {
        anyhow::bail!("interrupted");
    }
    anyhow::ensure!(
        failed.is_empty() && failed_checks == 0,
        "{}{}",
        if failed.is_empty() {
            String::new()
        } else {
            format!("did not complete: {}. ", failed.join(", "))
        },
        if failed_checks == 0 {
            String::new()
        } else {
            format!("{failed_checks} regression check(s) failed (see the report)")
        }
    );
    Ok(())
}
