//! Means, standard errors and 95% intervals of per-instance scores: the numbers results.csv
//! holds, and the ones reports compute again for splits results.csv does not have (by an
//! instance attribute such as `carries` or `seen`).
//!
//! 0/1 metrics get Wilson score intervals, which stay inside [0, 1] and behave at 0% and 100%;
//! other metrics a normal interval.

/// The 0.975 quantile of the standard normal.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Mean, standard error and 95% interval of `xs`.
pub fn summarize(xs: &[f64], binary: bool) -> (f64, f64, f64, f64) {
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
    let (lo, hi) = if binary {
        wilson(mean, n)
    } else {
        (mean - Z95 * stderr, mean + Z95 * stderr)
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
        let (m, se, lo, hi) = summarize(&[1.0, 2.0, 3.0, 4.0], false);
        assert_eq!(m, 2.5);
        assert!((se - (1.666_666_666_666_666_7f64 / 4.0).sqrt()).abs() < 1e-12);
        assert!((hi - m - Z95 * se).abs() < 1e-12 && (m - lo - Z95 * se).abs() < 1e-12);
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
