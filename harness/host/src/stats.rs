//! Aggregating per-sample scores into means with standard errors and 95% intervals.
//!
//! Per group and over all samples (the micro average); when there are several groups, also the
//! macro average (the mean of the group means, with the standard errors of the groups
//! propagated as independent). 0/1 metrics get Wilson score intervals, which stay inside
//! [0, 1] and behave at 0% and 100%; other metrics a normal interval clipped to the range the
//! metric declared.

use reports::ResultRow;

use reports::stats::{summarize, Scale, Z95};

/// A metric's scores, in instance order, with the group of each.
pub struct MetricScores<'a> {
    pub metric: &'a str,
    pub scale: Scale,
    /// (group, score) in instance order.
    pub scores: Vec<(&'a str, f64)>,
}

/// results.csv's rows of finished samples (their lines as JSON, in the task's instance order):
/// each sample's `group` and its score of every metric. What `harness eval` writes and what
/// `harness merge` writes for the merged shards, by the same code so that they agree to the byte.
pub fn aggregate_samples(
    task: &str,
    metrics: &[(&str, Scale)],
    samples: &[&serde_json::Value],
) -> anyhow::Result<Vec<ResultRow>> {
    let mut per_metric = Vec::with_capacity(metrics.len());
    for &(metric, scale) in metrics {
        let mut scores = Vec::with_capacity(samples.len());
        for s in samples {
            let group = s["group"].as_str().unwrap_or_default();
            let x = s["scores"][metric]
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("sample `{}` has no `{metric}` score", s["id"]))?;
            scores.push((group, x));
        }
        per_metric.push(MetricScores {
            metric,
            scale,
            scores,
        });
    }
    Ok(aggregate(task, &per_metric))
}

/// Rows for each group (in first-appearance order), `all`, and `macro` when there are several
/// groups.
pub fn aggregate(task: &str, metrics: &[MetricScores<'_>]) -> Vec<ResultRow> {
    let mut groups: Vec<&str> = Vec::new();
    for m in metrics {
        for (g, _) in &m.scores {
            if !groups.contains(g) {
                groups.push(g);
            }
        }
    }
    let mut rows = Vec::new();
    let row = |group: &str, metric: &str, n: usize, s: (f64, f64, f64, f64)| ResultRow {
        task: task.to_string(),
        group: group.to_string(),
        metric: metric.to_string(),
        n: n as u64,
        mean: s.0,
        stderr: s.1,
        ci_low: s.2,
        ci_high: s.3,
    };
    for g in &groups {
        for m in metrics {
            let xs: Vec<f64> = m
                .scores
                .iter()
                .filter(|(mg, _)| mg == g)
                .map(|(_, x)| *x)
                .collect();
            rows.push(row(g, m.metric, xs.len(), summarize(&xs, m.scale)));
        }
    }
    for m in metrics {
        let xs: Vec<f64> = m.scores.iter().map(|(_, x)| *x).collect();
        rows.push(row("all", m.metric, xs.len(), summarize(&xs, m.scale)));
    }
    if groups.len() > 1 {
        for m in metrics {
            let per_group: Vec<&ResultRow> = rows
                .iter()
                .filter(|r| r.metric == m.metric && groups.contains(&r.group.as_str()))
                .collect();
            let k = per_group.len() as f64;
            let mean = per_group.iter().map(|r| r.mean).sum::<f64>() / k;
            let stderr = per_group
                .iter()
                .map(|r| r.stderr * r.stderr)
                .sum::<f64>()
                .sqrt()
                / k;
            let (lo, hi) = m.scale.clip(mean - Z95 * stderr, mean + Z95 * stderr);
            let s = (mean, stderr, lo, hi);
            rows.push(row("macro", m.metric, per_group.len(), s));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_all_and_macro() {
        let m = MetricScores {
            metric: "exact-match",
            scale: Scale::BINARY,
            scores: vec![
                ("a", 1.0),
                ("a", 1.0),
                ("b", 0.0),
                ("b", 1.0),
                ("b", 0.0),
                ("b", 0.0),
            ],
        };
        let rows = aggregate("t", &[m]);
        let names: Vec<&str> = rows.iter().map(|r| r.group.as_str()).collect();
        assert_eq!(names, ["a", "b", "all", "macro"]);
        assert_eq!(rows[2].mean, 0.5);
        assert_eq!(rows[3].mean, (1.0 + 0.25) / 2.0);
        assert_eq!(rows[3].n, 2);
    }

    /// The case that was reported: a share of 0.214 on 4 samples had the interval
    /// [-0.206, 0.634]; the metric's range now bounds it, in every row.
    #[test]
    fn a_bounded_metric_never_gets_an_interval_outside_its_range() {
        let m = MetricScores {
            metric: "digit-accuracy",
            scale: Scale {
                binary: false,
                min: 0.0,
                max: 1.0,
            },
            scores: vec![("a", 0.0), ("a", 0.0), ("a", 0.0), ("a", 0.857), ("b", 1.0)],
        };
        let rows = aggregate("t", &[m]);
        let a = &rows[0];
        assert!(
            (a.mean - 0.214).abs() < 1e-3 && a.ci_low == 0.0 && a.ci_high < 1.0,
            "{a:?}"
        );
        for r in &rows {
            assert!(r.ci_low >= 0.0 && r.ci_high <= 1.0, "{r:?}");
        }
    }
}
