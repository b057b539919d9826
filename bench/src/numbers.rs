//! How figures read in tables, checks and charts: about three significant
//! digits, thousands grouped, ratios as percentages. Below every module that
//! shows a number, so none of them imports another for it.

/// A number as people read it: about 3 significant digits, whole numbers
/// whole, thousands grouped.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 100.0 || (v.fract() == 0.0 && a < 1e15) {
        group(v.round() as i64)
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{v:.3}")
    }
}

fn group(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

pub fn percent(ratio: f64) -> String {
    if !ratio.is_finite() {
        return "–".into();
    }
    if ratio < 0.1 {
        format!("{:.1}%", ratio * 100.0)
    } else {
        format!("{:.0}%", ratio * 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(1234567.4), "1 234 567");
        assert_eq!(num(437.4), "437");
        assert_eq!(num(48.25), "48.2");
        assert_eq!(num(50.0), "50");
        assert_eq!(num(1.5), "1.50");
        assert_eq!(num(0.0123), "0.012");
        assert_eq!(num(f64::NAN), "–");
        assert_eq!(percent(0.24), "24%");
        assert_eq!(percent(0.091), "9.1%");
    }
}
