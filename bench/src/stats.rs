//! Percentiles and medians, one definition for every benchmark.

use std::time::Duration;

/// The `p` quantile (0..=1) of `values`, nearest rank on the sorted values;
/// NaN for no values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let i = ((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    sorted[i]
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Least-squares slope of y over x; NaN with fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    if sxx > 0.0 { sxy / sxx } else { f64::NAN }
}

/// Named values collected over the rounds of a test.
#[derive(Default)]
pub struct Samples(Vec<(&'static str, f64)>);

impl Samples {
    pub fn add(&mut self, name: &'static str, value: f64) {
        self.0.push((name, value));
    }

    fn values(&self, name: &str) -> Vec<f64> {
        self.0
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .collect()
    }

    pub fn median(&self, name: &str) -> f64 {
        median(&self.values(name))
    }

    pub fn max(&self, name: &str) -> f64 {
        self.values(name)
            .into_iter()
            .max_by(f64::total_cmp)
            .unwrap_or(f64::NAN)
    }
}

/// Sum of a metric over all its label sets in Prometheus text format.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            line.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.0), 1.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), 2.0);
        assert!(slope(&[(1.0, 1.0)]).is_nan());
    }

    #[test]
    fn samples_over_rounds() {
        let mut s = Samples::default();
        for v in [3.0, 1.0, 2.0] {
            s.add("a", v);
        }
        s.add("b", 4.0);
        s.add("b", 1.0);
        assert_eq!(s.median("a"), 2.0);
        assert_eq!(s.median("b"), 2.5);
        assert_eq!(s.max("a"), 3.0);
        assert!(s.median("none").is_nan());
    }

    #[test]
    fn sums_metrics_over_labels() {
        let text = "# HELP istio_tcp_connections_opened The total\n\
            istio_tcp_connections_opened_total{reporter=\"source\",a=\"b c\"} 3\n\
            istio_tcp_connections_opened_total{reporter=\"destination\"} 4\n\
            istio_tcp_connections_opened_totalx 100\n\
            meshbox_proxy_active_connections 7\n# EOF\n";
        assert_eq!(metric_sum(text, "istio_tcp_connections_opened_total"), 7.0);
        assert_eq!(metric_sum(text, "meshbox_proxy_active_connections"), 7.0);
    }
}
