//! One part's share of the report: its figures ([`Row`]), the tables and
//! charts that show them, its side-by-side comparison and whether it ran
//! ([`Status`]). Every part fills a [`Section`]; `checks` reads them and
//! `report` writes them out, so this module imports neither.

use std::fmt::Write as _;

use serde::Serialize;

use crate::chart::Chart;
use crate::numbers::num;

/// One figure. `id` is stable (what report.json readers and CI look up);
/// `metric` is the label people read.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    /// The same-run baseline, when the figure has one.
    pub baseline: Option<f64>,
    /// value / baseline.
    pub ratio: Option<f64>,
    /// Shown in one of the section's tables rather than in its list of
    /// figures (report.json has it either way).
    #[serde(skip)]
    pub in_table: bool,
}

/// A table as people read it (e.g. one line per size); every number in it
/// is also a [`Row`] (added with [`Section::table_row`]).
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// One figure measured on the direct pair, through our dataplane and
/// through a stock Istio ztunnel in the same seats and run, with the three
/// ratios. `None`: not measured there (a proxy-only figure has no direct
/// value; no ztunnel was given).
#[derive(Debug, Clone, Serialize)]
pub struct Versus {
    pub id: String,
    pub metric: String,
    pub unit: String,
    pub direct: Option<f64>,
    pub ours: Option<f64>,
    pub ztunnel: Option<f64>,
    pub ours_direct: Option<f64>,
    pub ztunnel_direct: Option<f64>,
    pub ours_ztunnel: Option<f64>,
}

impl Versus {
    pub fn new(
        id: &str,
        metric: &str,
        unit: &str,
        direct: Option<f64>,
        ours: Option<f64>,
        ztunnel: Option<f64>,
    ) -> Self {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
            _ => None,
        };
        Self {
            id: id.into(),
            metric: metric.into(),
            unit: unit.into(),
            direct,
            ours,
            ztunnel,
            ours_direct: ratio(ours, direct),
            ztunnel_direct: ratio(ztunnel, direct),
            ours_ztunnel: ratio(ours, ztunnel),
        }
    }
}

/// A table of [`Versus`] figures, with what the reader needs to know about
/// how they were measured.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub title: String,
    /// Whether a ztunnel was measured (its column reads "not given" if not).
    pub ztunnel_given: bool,
    pub notes: Vec<String>,
    pub rows: Vec<Versus>,
}

impl Comparison {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "### {}

",
            self.title
        );
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out.push_str(
            "| figure | direct | ours | ztunnel | ours/direct | ztunnel/direct | ours/ztunnel |\n\
             |---|---:|---:|---:|---:|---:|---:|\n",
        );
        let value = |v: Option<f64>, unit: &str| match v {
            Some(v) => format!("{} {unit}", num(v)),
            None => String::new(),
        };
        let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_default();
        for r in &self.rows {
            let ztunnel = if self.ztunnel_given {
                value(r.ztunnel, &r.unit)
            } else {
                "not given".into()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                cell(&r.metric),
                value(r.direct, &r.unit),
                value(r.ours, &r.unit),
                ztunnel,
                ratio(r.ours_direct),
                ratio(r.ztunnel_direct),
                ratio(r.ours_ztunnel)
            );
        }
        out.push('\n');
        out
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    Ok,
    Skipped { reason: String },
    Failed { error: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Section {
    pub id: String,
    pub name: String,
    #[serde(flatten)]
    pub status: Status,
    pub elapsed_s: f64,
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
    pub tables: Vec<Table>,
    pub charts: Vec<Chart>,
    /// Side-by-side figures (the dataplane part: direct, ours, ztunnel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
}

impl Section {
    pub fn new(id: &str, name: &str) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            status: Status::Ok,
            elapsed_s: 0.0,
            notes: vec![],
            rows: vec![],
            tables: vec![],
            charts: vec![],
            comparison: None,
        }
    }

    pub fn skipped(id: &str, name: &str, reason: String) -> Self {
        let mut s = Self::new(id, name);
        s.status = Status::Skipped { reason };
        s
    }

    pub fn failed(id: &str, name: &str, error: &anyhow::Error) -> Self {
        let mut s = Self::new(id, name);
        s.status = Status::Failed {
            error: format!("{error:#}"),
        };
        s
    }

    pub fn row(&mut self, id: &str, metric: &str, value: f64, unit: &str) {
        self.rows.push(Row {
            id: id.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            baseline: None,
            ratio: None,
            in_table: false,
        });
    }

    /// A figure that one of the section's tables shows.
    pub fn table_row(&mut self, id: &str, metric: &str, value: f64, unit: &str) {
        self.row(id, metric, value, unit);
        if let Some(r) = self.rows.last_mut() {
            r.in_table = true;
        }
    }

    /// A figure next to its same-run baseline.
    pub fn compared(&mut self, id: &str, metric: &str, value: f64, baseline: f64, unit: &str) {
        self.rows.push(Row {
            id: id.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            baseline: Some(baseline),
            ratio: (baseline != 0.0 && baseline.is_finite()).then(|| value / baseline),
            in_table: false,
        });
    }

    pub fn value(&self, id: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.id == id).map(|r| r.value)
    }

    pub fn ratio(&self, id: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.id == id).and_then(|r| r.ratio)
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }
}

/// Text made safe for one markdown table cell.
pub fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}
