//! The report every benchmark writes: `report.md` (tables, charts linked),
//! `report.json` (the same data, machine-readable; what CI checks) and one
//! SVG per chart, all in the `--out` folder.
//!
//! A part of the suite that cannot run here (not root, a tool missing) is a
//! section with status `skipped` and the reason; one that broke is `failed`
//! with the error — the other parts are still reported.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::checks::CheckResult;
use crate::host::Machine;
use crate::numbers::{num, percent};
use crate::section::{Row, Section, Status, cell};

/// How and where the report was made.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    pub command: String,
    /// UTC, RFC 3339.
    pub date: String,
    pub quick: bool,
    /// `release` or `debug`: figures from a debug build are not comparable.
    pub build: &'static str,
    pub git_commit: Option<String>,
    pub machine: Machine,
    pub load_average_start: [f64; 3],
    pub load_average_end: [f64; 3],
    pub elapsed_s: f64,
}

impl Meta {
    pub fn start(quick: bool) -> Self {
        let args: Vec<String> = std::env::args().collect();
        let now = time::OffsetDateTime::now_utc();
        let date = now
            .replace_nanosecond(0)
            .unwrap_or(now)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .current_dir(
                    std::env::current_exe()
                        .ok()
                        .and_then(|p| p.parent().map(Path::to_path_buf))
                        .unwrap_or_else(|| ".".into()),
                )
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        // "-dirty": the binaries may include changes not in that commit.
        let git_commit = git(&["rev-parse", "--short=12", "HEAD"]).map(|c| {
            match git(&["status", "--porcelain", "--untracked-files=no"]) {
                Some(changes) if !changes.is_empty() => format!("{c}-dirty"),
                _ => c,
            }
        });
        let load = crate::host::load_average();
        Self {
            command: args.join(" "),
            date,
            quick,
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            git_commit,
            machine: Machine::describe(),
            load_average_start: load,
            load_average_end: load,
            elapsed_s: 0.0,
        }
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.load_average_end = crate::host::load_average();
        self.elapsed_s = elapsed.as_secs_f64();
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// Bumped when a reader of report.json would need to change.
    pub schema: u32,
    pub meta: Meta,
    pub sections: Vec<Section>,
    pub checks: Vec<CheckResult>,
}

fn status_text(s: &Status) -> String {
    match s {
        Status::Ok => "ok".into(),
        Status::Skipped { reason } => format!("skipped: {reason}"),
        Status::Failed { error } => format!("**failed**: {}", error.replace('\n', " ")),
    }
}

pub fn markdown(report: &Report) -> String {
    let m = &report.meta;
    let mut out = String::from("# meshbox benchmark report\n\n");
    let _ = writeln!(
        out,
        "`{}` — {}, {} build{}{}.\n",
        m.command,
        m.date,
        m.build,
        if m.quick { ", quick mode" } else { "" },
        m.git_commit
            .as_ref()
            .map(|c| format!(", commit {c}"))
            .unwrap_or_default()
    );
    let mc = &m.machine;
    let _ = writeln!(
        out,
        "Machine: {} ({}), {} cores, {:.0} GiB, {}, kernel {} ({}). Load average (1/5/15 min): {:.2} {:.2} {:.2} at the start, {:.2} {:.2} {:.2} at the end. Took {:.0} s.\n",
        mc.cpu,
        mc.hostname,
        mc.cores,
        mc.memory_gib,
        mc.os,
        mc.kernel,
        match &mc.kernel_tls {
            Ok(()) => "kernel TLS available".to_owned(),
            Err(reason) => format!("no kernel TLS: {reason}"),
        },
        m.load_average_start[0],
        m.load_average_start[1],
        m.load_average_start[2],
        m.load_average_end[0],
        m.load_average_end[1],
        m.load_average_end[2],
        m.elapsed_s
    );
    out.push_str(
        "Every figure that has a baseline was measured next to it in the same run; on a shared, \
         noisy machine read the ratios.\n\n",
    );
    if report.sections.len() > 1 {
        out.push_str("| part | status | time |\n|---|---|---:|\n");
        for s in &report.sections {
            let _ = writeln!(
                out,
                "| [{}](#{}) | {} | {:.0} s |",
                s.name,
                anchor(&s.name),
                cell(&status_text(&s.status)),
                s.elapsed_s
            );
        }
        out.push('\n');
    }
    if !report.checks.is_empty() {
        out.push_str(&crate::checks::markdown(&report.checks));
    }
    for s in &report.sections {
        let _ = writeln!(out, "## {}\n", s.name);
        if !matches!(s.status, Status::Ok) {
            let _ = writeln!(out, "{}\n", status_text(&s.status));
        }
        for note in &s.notes {
            let _ = writeln!(out, "- {note}");
        }
        if !s.notes.is_empty() {
            out.push('\n');
        }
        let listed: Vec<&Row> = s.rows.iter().filter(|r| !r.in_table).collect();
        if !listed.is_empty() {
            out.push_str(&rows_table(&listed));
        }
        for t in &s.tables {
            if !t.title.is_empty() {
                let _ = writeln!(out, "**{}**\n", t.title);
            }
            let _ = writeln!(out, "| {} |", t.columns.join(" | "));
            let _ = writeln!(
                out,
                "|{}",
                t.columns
                    .iter()
                    .enumerate()
                    .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                    .collect::<String>()
            );
            for r in &t.rows {
                let cells: Vec<String> = r.iter().map(|c| cell(c)).collect();
                let _ = writeln!(out, "| {} |", cells.join(" | "));
            }
            out.push('\n');
        }
        if let Some(c) = &s.comparison {
            out.push_str(&c.markdown());
        }
        for c in &s.charts {
            let _ = writeln!(out, "![{}]({})\n", c.title, c.file);
        }
    }
    out
}

fn rows_table(rows: &[&Row]) -> String {
    let mut out = String::from("| figure | value | baseline | ratio |\n|---|---:|---:|---:|\n");
    for r in rows {
        let unit = if r.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", r.unit)
        };
        let _ = writeln!(
            out,
            "| {} | {}{} | {} | {} |",
            cell(&r.metric),
            num(r.value),
            unit,
            r.baseline
                .map(|b| format!("{}{unit}", num(b)))
                .unwrap_or_default(),
            r.ratio.map(percent).unwrap_or_default()
        );
    }
    out.push('\n');
    out
}

/// GitHub's heading anchor: lower case, spaces to dashes, most punctuation
/// dropped.
fn anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Writes report.md, report.json and the charts to `dir`; prints the
/// markdown.
pub fn write(dir: &Path, report: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for section in &report.sections {
        for chart in &section.charts {
            if let Err(e) = crate::chart::render(dir, chart) {
                eprintln!("chart {}: {e:#}", chart.file);
            }
        }
    }
    let md = markdown(report);
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    print!("{md}");
    eprintln!("report written to {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::{Comparison, Versus};

    #[test]
    fn headings_become_anchors() {
        assert_eq!(anchor("xDS server (TLS)"), "xds-server-tls");
    }

    #[test]
    fn sections_render_rows_or_tables() {
        let mut s = Section::new("x", "X part");
        s.compared("a", "a figure", 5.5, 11.0, "req/s");
        let mut skipped = Section::skipped("y", "Y part", "needs root".into());
        skipped.elapsed_s = 0.0;
        let report = Report {
            schema: 1,
            meta: Meta::start(true),
            sections: vec![s, skipped],
            checks: vec![],
        };
        let md = markdown(&report);
        assert!(
            md.contains("| a figure | 5.50 req/s | 11 req/s | 50% |"),
            "{md}"
        );
        assert!(md.contains("skipped: needs root"), "{md}");
        let mut c = Comparison {
            title: "side by side".into(),
            ztunnel_given: true,
            notes: vec![],
            rows: vec![Versus::new(
                "a",
                "bulk",
                "Gbit/s",
                Some(10.0),
                Some(3.0),
                Some(2.0),
            )],
        };
        assert!(
            c.markdown()
                .contains("| bulk | 10 Gbit/s | 3 Gbit/s | 2 Gbit/s | 0.30 | 0.20 | 1.50 |"),
            "{}",
            c.markdown()
        );
        c.ztunnel_given = false;
        c.rows = vec![Versus::new("b", "rss", "MiB", None, Some(9.0), None)];
        assert!(
            c.markdown()
                .contains("| rss |  | 9 MiB | not given |  |  |  |"),
            "{}",
            c.markdown()
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["sections"][0]["status"], "ok");
        assert_eq!(json["sections"][0]["rows"][0]["ratio"], 0.5);
        assert_eq!(json["sections"][1]["status"], "skipped");
        assert_eq!(json["sections"][1]["reason"], "needs root");
    }
}
