//! Means, standard errors and 95% intervals of per-instance scores: the numbers results.csv
//! holds, and the ones reports compute again for splits results.csv does not have (by an
//! instance attribute such as `carries` or `seen`).
//!
//! 0/1 metrics get Wilson score intervals, which stay inside [0, 1] and behave at 0% and 100%;
//! other metrics a normal interval clipped to the range their scores can take (a mean of
//! distances is never below 0, a mean of shares never above 1).

/// The 0.975 quantile of the standard normal.
pub const Z95: f64 = 1.959_963_984_540_054;

/// What a metric's scores can be, which decides the interval: 0/1, or any value in
/// `[min, max]` (infinite bounds when unbounded).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scale {
    pub binary: bool,
    pub min: f64,
    pub max: f64,
}

impl Scale {
    /// 0 or 1.
    pub const BINARY: Scale = Scale {
        binary: true,
        min: 0.0,
        max: 1.0,
    };
    /// Any real number: the plain normal interval.
    pub const UNBOUNDED: Scale = Scale {
        binary: false,
        min: f64::NEG_INFINITY,
        max: f64::INFINITY,
    };

    /// `[lo, hi]` kept inside the range.
    pub fn clip(&self, lo: f64, hi: f64) -> (f64, f64) {
        (lo.max(self.min), hi.min(self.max))
    }
}

/// Mean, standard error and 95% interval of `xs`.
pub fn summarize(xs: &[f64], scale: Scale) -> (f64, f64, f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let stderr = (var / n).sqrt();
    let (lo, hi) = if scale.binary {
        wilson(mean, n)
    } else {
        scale.clip(mean - Z95 * stderr, mean + Z95 * stderr)
    };
    (mean, stderr, lo, hi)
}

/// Wilson score interval for a proportion `p` observed over `n` trials.
pub fn wilson(p: f64, n: f64) -> (f64, f64) {
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    // At p = 0 or 1 the bound is exactly 0 or 1; do not let rounding say otherwise.
    let lo = if p <= 0.0 {
        0.0
    } else {
        (center - half).max(0.0)
    };
    let hi = if p >= 1.0 {
        1.0
    } else {
        (center + half).min(1.0)
    };
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_stderr() {
        let (m, se, lo, hi) = summarize(&[1.0, 2.0, 3.0, 4.0], Scale::UNBOUNDED);
        assert_eq!(m, 2.5);
        assert!((se - (1.666_666_666_666_666_7f64 / 4.0).sqrt()).abs() < 1e-12);
        assert!((hi - m - Z95 * se).abs() < 1e-12 && (m - lo - Z95 * se).abs() < 1e-12);
    }

    #[test]
    fn a_bounded_metric_keeps_its_interval_in_range() {
        // Four shares whose normal interval would start below 0.
        let xs = [0.0, 0.0, 0.0, 0.857];
        let (m, _, lo, hi) = summarize(&xs, Scale::UNBOUNDED);
        assert!(lo < 0.0 && m > 0.2);
        let share = Scale {
            binary: false,
            min: 0.0,
            max: 1.0,
        };
        let (_, _, lo2, hi2) = summarize(&xs, share);
        assert_eq!((lo2, hi2), (0.0, hi));
        let (_, _, lo3, hi3) = summarize(&[1.0, 1.0, 0.9], share);
        assert!(lo3 < 1.0 && hi3 == 1.0);
    }

    #[test]
    fn wilson_matches_reference_values() {
        // The textbook case: 50 successes in 100 trials gives [0.4038, 0.5962].
        let (lo, hi) = wilson(0.5, 100.0);
        assert!(
            (lo - 0.4038).abs() < 1e-4 && (hi - 0.5962).abs() < 1e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(0.0, 50.0);
        assert_eq!(lo, 0.0);
        assert!(hi > 0.05 && hi < 0.08);
    }
}
