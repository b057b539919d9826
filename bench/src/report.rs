//! Report output: a markdown table per section and the same data as JSON.

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Row {
    pub metric: String,
    pub value: f64,
    pub unit: String,
    /// The same-run baseline, when the metric has one.
    pub baseline: Option<f64>,
    /// value / baseline.
    pub ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Section {
    pub name: String,
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
}

impl Section {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            notes: vec![],
            rows: vec![],
        }
    }

    pub fn row(&mut self, metric: &str, value: f64, unit: &str) {
        self.rows.push(Row {
            metric: metric.into(),
            value,
            unit: unit.into(),
            baseline: None,
            ratio: None,
        });
    }

    pub fn compared(&mut self, metric: &str, value: f64, baseline: f64, unit: &str) {
        self.rows.push(Row {
            metric: metric.into(),
            value,
            unit: unit.into(),
            baseline: Some(baseline),
            ratio: (baseline != 0.0).then(|| value / baseline),
        });
    }
}

pub fn markdown(sections: &[Section]) -> String {
    let mut out = String::from("# meshbox benchmark report\n\n");
    for s in sections {
        out.push_str(&format!("## {}\n\n", s.name));
        for note in &s.notes {
            out.push_str(&format!("- {note}\n"));
        }
        if !s.notes.is_empty() {
            out.push('\n');
        }
        out.push_str("| metric | value | unit | baseline | ratio |\n|---|---:|---|---:|---:|\n");
        for r in &s.rows {
            let baseline = r.baseline.map(|b| format!("{b:.1}")).unwrap_or_default();
            let ratio = r
                .ratio
                .map(|x| format!("{:.0}%", x * 100.0))
                .unwrap_or_default();
            out.push_str(&format!(
                "| {} | {:.1} | {} | {} | {} |\n",
                r.metric, r.value, r.unit, baseline, ratio
            ));
        }
        out.push('\n');
    }
    out
}

pub fn write(dir: &Path, sections: &[Section]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let md = markdown(sections);
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(sections)?,
    )?;
    print!("{md}");
    eprintln!("report written to {}", dir.display());
    Ok(())
}
