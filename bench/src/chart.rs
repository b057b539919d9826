//! SVG charts (plotters, SVG backend only: no system font or image
//! libraries; text is SVG `<text>`, laid out by the viewer). A chart is data
//! first — it goes into report.json as is — and rendered to `file` in the
//! report folder.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::numbers::num;

#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    /// File name in the report folder, `*.svg`.
    pub file: String,
    pub title: String,
    #[serde(flatten)]
    pub plot: Plot,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Plot {
    /// One line per series, points marked.
    Lines {
        x_label: String,
        y_label: String,
        series: Vec<Series>,
    },
    /// Horizontal bars, one per label, with an optional reference line
    /// (e.g. 100% = as fast as without the mesh).
    Bars {
        x_label: String,
        unit: String,
        bars: Vec<Bar>,
        reference: Option<f64>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn grey: a guide (e.g. "linear"), not a measurement.
    pub reference: bool,
}

impl Series {
    pub fn new(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            reference: false,
        }
    }

    pub fn reference(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            reference: true,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub label: String,
    pub value: f64,
}

impl Chart {
    pub fn lines(
        file: &str,
        title: &str,
        x_label: &str,
        y_label: &str,
        series: Vec<Series>,
    ) -> Self {
        Self {
            file: file.into(),
            title: title.into(),
            plot: Plot::Lines {
                x_label: x_label.into(),
                y_label: y_label.into(),
                series,
            },
        }
    }

    pub fn bars(
        file: &str,
        title: &str,
        x_label: &str,
        unit: &str,
        bars: Vec<Bar>,
        reference: Option<f64>,
    ) -> Self {
        Self {
            file: file.into(),
            title: title.into(),
            plot: Plot::Bars {
                x_label: x_label.into(),
                unit: unit.into(),
                bars,
                reference,
            },
        }
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const GREY: RGBColor = RGBColor(110, 110, 110);
const FONT: &str = "sans-serif";

/// An axis label: like [`num`], without trailing zeros.
fn axis(v: f64) -> String {
    let s = num(v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

pub fn render(dir: &Path, chart: &Chart) -> anyhow::Result<()> {
    let path = dir.join(&chart.file);
    match &chart.plot {
        Plot::Lines {
            x_label,
            y_label,
            series,
        } => lines(&path, &chart.title, x_label, y_label, series),
        Plot::Bars {
            x_label,
            unit,
            bars: values,
            reference,
        } => bars(&path, &chart.title, x_label, unit, values, *reference),
    }
}

fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let finite = |s: &Series| {
        s.points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect::<Vec<_>>()
    };
    let all: Vec<(f64, f64)> = series.iter().flat_map(finite).collect();
    anyhow::ensure!(!all.is_empty(), "no data");
    let x_max = all.iter().map(|p| p.0).fold(f64::MIN, f64::max);
    let x_min = all.iter().map(|p| p.0).fold(f64::MAX, f64::min).min(0.0);
    let y_max = all.iter().map(|p| p.1).fold(0.0, f64::max);
    let x_max = if x_max > x_min {
        x_max * 1.04
    } else {
        x_min + 1.0
    };
    let y_max = if y_max > 0.0 { y_max * 1.12 } else { 1.0 };

    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 19))
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| axis(*v))
        .y_label_formatter(&|v| axis(*v))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.08))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()?;
    // Measurements first, guides (dashed, grey) over them, so a guide a
    // measurement follows exactly stays visible.
    for (i, s) in series.iter().filter(|s| !s.reference).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = finite(s);
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    for s in series.iter().filter(|s| s.reference) {
        chart
            .draw_series(DashedLineSeries::new(finite(s), 6, 4, GREY.stroke_width(1)))?
            .label(s.name.as_str())
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREY.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}

fn bars(
    path: &Path,
    title: &str,
    x_label: &str,
    unit: &str,
    values: &[Bar],
    reference: Option<f64>,
) -> anyhow::Result<()> {
    anyhow::ensure!(!values.is_empty(), "no data");
    let n = values.len();
    let top = values
        .iter()
        .map(|b| b.value)
        .chain(reference)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let x_max = if top > 0.0 { top * 1.15 } else { 1.0 };
    let height = 110 + 42 * n as u32;
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 19))
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(8)
        .build_cartesian_2d(0f64..x_max, 0f64..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc(x_label)
        .x_label_formatter(&|v| axis(*v))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.08))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()?;
    for (i, b) in values.iter().enumerate() {
        // First bar at the top.
        let row = (n - 1 - i) as f64;
        let value = if b.value.is_finite() { b.value } else { 0.0 };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, row + 0.08), (value, row + 0.5)],
            COLORS[0].mix(0.8).filled(),
        )))?;
        let space = if unit.starts_with('%') { "" } else { " " };
        chart.draw_series(std::iter::once(Text::new(
            format!("{}: {}{space}{unit}", b.label, num(b.value)),
            (x_max * 0.005, row + 0.93),
            (FONT, 13),
        )))?;
    }
    if let Some(r) = reference {
        chart.draw_series(LineSeries::new(
            vec![(r, 0.0), (r, n as f64)],
            GREY.stroke_width(1),
        ))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_lines_and_bars_to_svg() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let line = Chart::lines(
            "l.svg",
            "cost vs pods",
            "pods",
            "ms",
            vec![
                Series::new("build", vec![(1000.0, 40.0), (10000.0, 437.0)]),
                Series::reference("linear", vec![(1000.0, 40.0), (10000.0, 400.0)]),
            ],
        );
        let bar = Chart::bars(
            "b.svg",
            "ratios",
            "% of direct",
            "%",
            vec![
                Bar {
                    label: "bulk".into(),
                    value: 24.0,
                },
                Bar {
                    label: "http".into(),
                    value: f64::NAN,
                },
            ],
            Some(100.0),
        );
        render(dir, &line).unwrap();
        render(dir, &bar).unwrap();
        let svg = std::fs::read_to_string(dir.join("l.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("cost vs pods"));
        let svg = std::fs::read_to_string(dir.join("b.svg")).unwrap();
        assert!(svg.contains("bulk: 24%"), "{svg}");
    }
}
