//! Paired comparison of two runs over the same instances: for each group and metric, the mean
//! difference B − A with a 95% paired interval (Newcombe's for 0/1 metrics, Student's t otherwise) and a significance test.
//!
//! Why paired: both runs answered the same instances, so most of the instance-to-instance
//! variation (easy and hard questions) cancels in the per-instance differences. A paired test
//! tells a real change from noise with far fewer instances than comparing two independent means.
//!
//! Which test: a metric whose scores are all exactly 0 or 1 in both runs (exact-match) gets
//! McNemar's exact test, which looks only at the discordant instances (right in one run, wrong in
//! the other) and asks whether the split between "B right, A wrong" and "A right, B wrong" is
//! more lopsided than a fair coin would give. Any other metric (levenshtein, digit-accuracy)
//! gets a paired permutation test: if A and B were interchangeable, each per-instance difference
//! would be as likely positive as negative, so the signs are flipped at random many times and the
//! p-value is how often the mean difference comes out at least as far from zero as observed.
//!
//! Key decision: everything is deterministic (the permutation test is seeded), so the same two
//! runs always give byte-identical CSV files.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::Write;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::run::Sample;
use crate::{fixed, ReportError};

/// The significance test of a [`Comparison`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// McNemar's exact test (a two-sided binomial test of the discordant pairs), for 0/1 metrics.
    McNemar,
    /// A paired permutation test (random sign flips of the per-instance differences).
    Permutation,
}

impl Test {
    pub fn as_str(self) -> &'static str {
        match self {
            Test::McNemar => "McNemar",
            Test::Permutation => "permutation",
        }
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One metric over one group of paired instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// A group name, or `all` (every instance).
    pub group: String,
    pub metric: String,
    /// Number of paired instances.
    pub n: u64,
    pub mean_a: f64,
    pub mean_b: f64,
    /// Mean of the per-instance differences B − A (equal to `mean_b - mean_a` up to rounding).
    pub diff: f64,
    /// 95% paired interval of the mean difference: Newcombe's for 0/1 metrics, t otherwise (NaN when n < 2).
    pub ci_low: f64,
    pub ci_high: f64,
    pub test: Test,
    /// Two-sided p-value of the test: how likely a difference at least this large would be if A
    /// and B were equally good.
    pub p_value: f64,
    /// Instances where B scored higher than A (for a 0/1 metric: B right, A wrong).
    pub b_higher: u64,
    /// Instances where A scored higher than B (for a 0/1 metric: A right, B wrong).
    pub a_higher: u64,
    /// Instances where both scored the same.
    pub ties: u64,
}

/// What to compare and how.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareOptions {
    /// Metrics to compare, in this order; None: every metric that every instance of both runs
    /// has, in name order.
    pub metrics: Option<Vec<String>>,
    /// Random sign flips of the permutation test; the smallest p-value it can give is
    /// 1 / (resamples + 1).
    pub resamples: u32,
    /// Seed of the sign flips.
    pub seed: u64,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            metrics: None,
            resamples: 10_000,
            seed: 0,
        }
    }
}

/// Why two runs cannot be compared. Each message is one line that says why and what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompareError {
    #[error(
        "run {which} has no samples; finish it with `harness eval --resume` or compare another run"
    )]
    Empty { which: &'static str },
    #[error("run {which} has the instance id `{id}` {count} times; ids must be unique to pair instances (was its samples.jsonl written by more than one run?)")]
    DuplicateId {
        which: &'static str,
        id: String,
        count: usize,
    },
    #[error("the runs are not over the same instances: {only_a} ids only in A{}, {only_b} only in B{}; compare runs of the same task with the same task options and seed", examples(.examples_a), examples(.examples_b))]
    IdsDiffer {
        only_a: usize,
        only_b: usize,
        /// Up to 3 ids only in A, in A's order.
        examples_a: Vec<String>,
        /// Up to 3 ids only in B, in B's order.
        examples_b: Vec<String>,
    },
    #[error("instance `{id}` is in group `{group_a}` in A but `{group_b}` in B ({count} instances differ); compare runs of the same task with the same task options and seed")]
    GroupDiffers {
        id: String,
        group_a: String,
        group_b: String,
        count: usize,
    },
    #[error("metric `{metric}` is not in run {which} (A has: {}; B has: {}); choose metrics both runs have with --metric", list(.metrics_a), list(.metrics_b))]
    MissingMetric {
        metric: String,
        which: &'static str,
        metrics_a: Vec<String>,
        metrics_b: Vec<String>,
    },
    #[error("metric `{metric}` has no score for {missing} of {n} instances in run {which} (e.g. `{id}`); choose other metrics with --metric")]
    IncompleteMetric {
        metric: String,
        which: &'static str,
        missing: usize,
        n: usize,
        id: String,
    },
    #[error("the runs have no metric in common (A has: {}; B has: {}); nothing to compare", list(.metrics_a), list(.metrics_b))]
    NoCommonMetric {
        metrics_a: Vec<String>,
        metrics_b: Vec<String>,
    },
}

fn examples(ids: &[String]) -> String {
    if ids.is_empty() {
        String::new()
    } else {
        format!(" (e.g. {})", ids.join(", "))
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "no metrics".to_string()
    } else {
        names.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// Tests and distributions.

/// Two-sided exact McNemar p-value for `b` and `c` discordant pairs: a binomial test of `b`
/// against `b + c` trials at 1/2, `p = min(1, 2 P[X <= min(b, c)])` with X ~ Bin(b + c, 1/2).
/// 1 when there are no discordant pairs.
///
/// Exact in integers up to 120 discordant pairs. Stable for large counts: the largest term P[X = min(b, c)] is computed in log space with
/// Loader's saddle-point formula, and the tail below it as ratios to that term.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    if n <= 120 {
        // Exactly, in integers: the sum of C(n, i) for i <= k is below 2^n <= 2^120.
        let mut term: u128 = 1;
        let mut sum: u128 = 1;
        for i in 1..=k {
            term = term * u128::from(n - i + 1) / u128::from(i);
            sum += term;
        }
        return (2.0 * sum as f64 / 2f64.powi(n as i32)).min(1.0);
    }
    // P[X <= k] = P[X = k] * (1 + t_{k-1}/t_k + t_{k-2}/t_k + ...), t_{i-1}/t_i = i / (n - i + 1).
    let mut ratio = 1.0f64;
    let mut sum = 1.0f64;
    let mut i = k;
    while i > 0 {
        ratio *= i as f64 / (n - i + 1) as f64;
        sum += ratio;
        if ratio < sum * 1e-17 {
            break;
        }
        i -= 1;
    }
    let p = 2.0 * (ln_binom_half(k, n) + sum.ln()).exp();
    p.min(1.0)
}

/// ln P[X = x] for X ~ Bin(n, 1/2).
fn ln_binom_half(x: u64, n: u64) -> f64 {
    if x == 0 || x == n {
        return -(n as f64) * std::f64::consts::LN_2;
    }
    let (xf, nf) = (x as f64, n as f64);
    let half = nf / 2.0;
    let lc = stirlerr(nf) - stirlerr(xf) - stirlerr(nf - xf) - bd0(xf, half) - bd0(nf - xf, half);
    lc - 0.5 * (2.0 * std::f64::consts::PI * xf * (nf - xf) / nf).ln()
}

/// ln(n!) − ln(sqrt(2 pi n) (n/e)^n), the error of Stirling's formula, for integer n >= 1.
fn stirlerr(n: f64) -> f64 {
    const S0: f64 = 1.0 / 12.0;
    const S1: f64 = 1.0 / 360.0;
    const S2: f64 = 1.0 / 1260.0;
    const S3: f64 = 1.0 / 1680.0;
    const S4: f64 = 1.0 / 1188.0;
    if n <= 15.0 {
        let ln_fact: f64 = (2..=n as u64).map(|i| (i as f64).ln()).sum();
        return ln_fact - (n + 0.5) * n.ln() + n - 0.5 * (2.0 * std::f64::consts::PI).ln();
    }
    let nn = n * n;
    if n > 500.0 {
        (S0 - S1 / nn) / n
    } else if n > 80.0 {
        (S0 - (S1 - S2 / nn) / nn) / n
    } else if n > 35.0 {
        (S0 - (S1 - (S2 - S3 / nn) / nn) / nn) / n
    } else {
        (S0 - (S1 - (S2 - (S3 - S4 / nn) / nn) / nn) / nn) / n
    }
}

/// x ln(x / np) + np − x, computed without cancellation when x is close to np.
fn bd0(x: f64, np: f64) -> f64 {
    if (x - np).abs() < 0.1 * (x + np) {
        let mut v = (x - np) / (x + np);
        let mut s = (x - np) * v;
        let mut ej = 2.0 * x * v;
        v *= v;
        for j in 1..1000 {
            ej *= v;
            let s1 = s + ej / (2 * j + 1) as f64;
            if s1 == s {
                return s1;
            }
            s = s1;
        }
        return s;
    }
    x * (x / np).ln() + np - x
}

/// Paired permutation test of the per-instance differences `diffs` (B − A): under the null
/// hypothesis each difference is as likely to have either sign, so the signs are flipped at
/// random `resamples` times and `p = (1 + #{|mean*| >= |mean| − 1e-12}) / (1 + resamples)`,
/// two-sided. Deterministic for a given `seed` (ChaCha8). 1 when every difference is 0 (or
/// there are none).
pub fn sign_flip_test(diffs: &[f64], resamples: u32, seed: u64) -> f64 {
    if diffs.iter().all(|&d| d == 0.0) {
        return 1.0;
    }
    let n = diffs.len() as f64;
    let observed = (diffs.iter().sum::<f64>() / n).abs();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut extreme = 0u64;
    for _ in 0..resamples {
        let mut sum = 0.0;
        for chunk in diffs.chunks(64) {
            let signs = rng.next_u64();
            for (i, &d) in chunk.iter().enumerate() {
                if (signs >> i) & 1 == 1 {
                    sum -= d;
                } else {
                    sum += d;
                }
            }
        }
        if (sum / n).abs() >= observed - 1e-12 {
            extreme += 1;
        }
    }
    (1 + extreme) as f64 / (1 + u64::from(resamples)) as f64
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom (the multiplier of a 95%
/// two-sided interval). Bisection on the t distribution's tail (a regularized incomplete beta)
/// up to 1000 degrees of freedom, the Cornish–Fisher expansion above; accurate to ~1e-10.
/// NaN unless `df > 0`.
fn t_quantile_975(df: f64) -> f64 {
    const Z: f64 = 1.959_963_984_540_054;
    if df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if df > 1000.0 {
        // Abramowitz & Stegun 26.7.5.
        let z2 = Z * Z;
        let g1 = (z2 + 1.0) * Z / 4.0;
        let g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * Z / 96.0;
        let g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * Z / 384.0;
        let g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * Z / 92160.0;
        return Z + g1 / df + g2 / (df * df) + g3 / (df * df * df) + g4 / (df * df * df * df);
    }
    // P[T > t] = I_{df/(df+t^2)}(df/2, 1/2) / 2, decreasing in t.
    let upper = |t: f64| {
        let t2 = t * t;
        0.5 * beta_reg(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))
    };
    let (mut lo, mut hi) = (0.0f64, 2.0f64);
    while upper(hi) > 0.025 {
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if upper(mid) > 0.025 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta function I_x(a, b), given x and y = 1 − x (passed
/// separately so that x close to 1 loses no precision).
fn beta_reg(a: f64, b: f64, x: f64, y: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if y <= 0.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * y.ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, y) / b
    }
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..100_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

// ---------------------------------------------------------------------------------------------
// Pairing and comparing.

/// Compares run B with run A instance by instance (paired by id).
///
/// Refuses, with a [`CompareError`] that says why, when either run is empty, an id appears
/// twice in a run, the runs' id sets differ, an instance has different groups in the two runs,
/// or a metric to compare is missing (or missing for some instances) in either run.
///
/// Returns, for each group in order of first appearance in A and then for `all` (every
/// instance), one [`Comparison`] per metric. A group that is itself named `all` (samples
/// written without a group) is reported only in the overall `all` rows.
///
/// The test is chosen per metric, over both runs at once: a metric whose every score in both
/// runs is exactly 0.0 or 1.0 is a 0/1 metric and gets McNemar's exact test on the discordant
/// instances; any other metric gets the paired sign-flip permutation test with
/// `options.resamples` flips seeded by `options.seed`. The same test is then used in every
/// group's row, so rows of one metric are comparable.
pub fn compare(
    a: &[Sample],
    b: &[Sample],
    options: &CompareOptions,
) -> Result<Vec<Comparison>, CompareError> {
    if a.is_empty() {
        return Err(CompareError::Empty { which: "A" });
    }
    if b.is_empty() {
        return Err(CompareError::Empty { which: "B" });
    }
    let index_a = index_by_id(a, "A")?;
    let index_b = index_by_id(b, "B")?;

    let only_a: Vec<&str> = a
        .iter()
        .map(|s| s.id.as_str())
        .filter(|id| !index_b.contains_key(id))
        .collect();
    let only_b: Vec<&str> = b
        .iter()
        .map(|s| s.id.as_str())
        .filter(|id| !index_a.contains_key(id))
        .collect();
    if !only_a.is_empty() || !only_b.is_empty() {
        let first3 = |ids: &[&str]| ids.iter().take(3).map(|s| s.to_string()).collect();
        return Err(CompareError::IdsDiffer {
            only_a: only_a.len(),
            only_b: only_b.len(),
            examples_a: first3(&only_a),
            examples_b: first3(&only_b),
        });
    }

    let pairs: Vec<(&Sample, &Sample)> =
        a.iter().map(|s| (s, &b[index_b[s.id.as_str()]])).collect();
    let mismatched: Vec<&(&Sample, &Sample)> =
        pairs.iter().filter(|(x, y)| x.group != y.group).collect();
    if let Some((x, y)) = mismatched.first() {
        return Err(CompareError::GroupDiffers {
            id: x.id.clone(),
            group_a: x.group.clone(),
            group_b: y.group.clone(),
            count: mismatched.len(),
        });
    }

    let metrics = resolve_metrics(a, b, options.metrics.as_deref())?;

    let mut groups: Vec<&str> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for s in a {
        if s.group != "all" && seen.insert(s.group.as_str()) {
            groups.push(&s.group);
        }
    }

    let binary: Vec<bool> = metrics
        .iter()
        .map(|m| {
            pairs
                .iter()
                .all(|(x, y)| is_01(x.scores[m]) && is_01(y.scores[m]))
        })
        .collect();

    let mut rows = Vec::new();
    let mut emit = |group: &str, members: &[&(&Sample, &Sample)]| {
        for (m, &binary) in metrics.iter().zip(&binary) {
            let scores: Vec<(f64, f64)> = members
                .iter()
                .map(|(x, y)| (x.scores[m], y.scores[m]))
                .collect();
            rows.push(comparison(group, m, &scores, binary, options));
        }
    };
    for g in groups {
        let members: Vec<&(&Sample, &Sample)> =
            pairs.iter().filter(|(x, _)| x.group == g).collect();
        emit(g, &members);
    }
    let everything: Vec<&(&Sample, &Sample)> = pairs.iter().collect();
    emit("all", &everything);
    Ok(rows)
}

fn is_01(x: f64) -> bool {
    x == 0.0 || x == 1.0
}

fn index_by_id<'s>(
    samples: &'s [Sample],
    which: &'static str,
) -> Result<HashMap<&'s str, usize>, CompareError> {
    let mut index = HashMap::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        if index.insert(s.id.as_str(), i).is_some() {
            let count = samples.iter().filter(|t| t.id == s.id).count();
            return Err(CompareError::DuplicateId {
                which,
                id: s.id.clone(),
                count,
            });
        }
    }
    Ok(index)
}

/// The metrics to compare: the requested ones (deduplicated, in order), each present for every
/// instance of both runs; or, when none are requested, every metric every instance of both runs
/// has, in name order.
fn resolve_metrics(
    a: &[Sample],
    b: &[Sample],
    requested: Option<&[String]>,
) -> Result<Vec<String>, CompareError> {
    let names = |run: &[Sample]| -> Vec<String> {
        let set: BTreeSet<&String> = run.iter().flat_map(|s| s.scores.keys()).collect();
        set.into_iter().cloned().collect()
    };
    let complete = |run: &[Sample], m: &str| run.iter().all(|s| s.scores.contains_key(m));
    match requested {
        None | Some([]) => {
            let metrics: Vec<String> = names(a)
                .into_iter()
                .filter(|m| complete(a, m) && complete(b, m))
                .collect();
            if metrics.is_empty() {
                return Err(CompareError::NoCommonMetric {
                    metrics_a: names(a),
                    metrics_b: names(b),
                });
            }
            Ok(metrics)
        }
        Some(requested) => {
            let mut metrics: Vec<String> = Vec::new();
            for m in requested {
                if metrics.contains(m) {
                    continue;
                }
                for (which, run) in [("A", a), ("B", b)] {
                    let lacking: Vec<&Sample> =
                        run.iter().filter(|s| !s.scores.contains_key(m)).collect();
                    if lacking.len() == run.len() {
                        return Err(CompareError::MissingMetric {
                            metric: m.clone(),
                            which,
                            metrics_a: names(a),
                            metrics_b: names(b),
                        });
                    }
                    if let Some(first) = lacking.first() {
                        return Err(CompareError::IncompleteMetric {
                            metric: m.clone(),
                            which,
                            missing: lacking.len(),
                            n: run.len(),
                            id: first.id.clone(),
                        });
                    }
                }
                metrics.push(m.clone());
            }
            Ok(metrics)
        }
    }
}

/// 95% interval of p_B − p_A for paired 0/1 outcomes: Newcombe's (1998) method 10, Wilson
/// intervals of both proportions combined with the correlation of the pairs. Unlike a t
/// interval of the 0/1 differences it never collapses to a point when every instance moved the
/// same way (5 of 5 flipped: [+0.57, +1]), and stays inside [−1, 1]. `both` instances are 1 in
/// both runs, `a_only` only in A, `b_only` only in B, of `n`.
pub fn newcombe_paired(both: u64, a_only: u64, b_only: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let nf = n as f64;
    let neither = n - both - a_only - b_only;
    let (a, b, c, d) = (both as f64, a_only as f64, b_only as f64, neither as f64);
    let p_a = (a + b) / nf;
    let p_b = (a + c) / nf;
    let (l_a, u_a) = crate::stats::wilson(p_a, nf);
    let (l_b, u_b) = crate::stats::wilson(p_b, nf);
    // The correlation of the pairs with Newcombe's continuity correction (as in Altman et al.,
    // Statistics with Confidence, 2000, p. 52).
    let denom = ((a + b) * (c + d) * (a + c) * (b + d)).sqrt();
    let cross = a * d - b * c;
    let corrected = if cross > nf / 2.0 {
        cross - nf / 2.0
    } else if cross < 0.0 {
        cross
    } else {
        0.0
    };
    let phi = if denom > 0.0 { corrected / denom } else { 0.0 };
    let delta = p_b - p_a;
    let low = delta
        - ((p_b - l_b).powi(2) - 2.0 * phi * (p_b - l_b) * (u_a - p_a) + (u_a - p_a).powi(2))
            .max(0.0)
            .sqrt();
    let high = delta
        + ((u_b - p_b).powi(2) - 2.0 * phi * (u_b - p_b) * (p_a - l_a) + (p_a - l_a).powi(2))
            .max(0.0)
            .sqrt();
    (low.max(-1.0), high.min(1.0))
}

/// One row from the paired scores (A, B) of a group.
fn comparison(
    group: &str,
    metric: &str,
    scores: &[(f64, f64)],
    binary: bool,
    options: &CompareOptions,
) -> Comparison {
    let n = scores.len();
    let nf = n as f64;
    let mean_a = scores.iter().map(|s| s.0).sum::<f64>() / nf;
    let mean_b = scores.iter().map(|s| s.1).sum::<f64>() / nf;
    let diffs: Vec<f64> = scores.iter().map(|(x, y)| y - x).collect();
    let diff = diffs.iter().sum::<f64>() / nf;
    let b_higher = diffs.iter().filter(|&&d| d > 0.0).count() as u64;
    let a_higher = diffs.iter().filter(|&&d| d < 0.0).count() as u64;
    let (ci_low, ci_high) = if binary {
        let both = scores
            .iter()
            .filter(|(x, y)| *x == 1.0 && *y == 1.0)
            .count() as u64;
        newcombe_paired(both, a_higher, b_higher, n as u64)
    } else if n >= 2 {
        let var = diffs.iter().map(|d| (d - diff) * (d - diff)).sum::<f64>() / (nf - 1.0);
        let half = t_quantile_975(nf - 1.0) * (var / nf).sqrt();
        (diff - half, diff + half)
    } else {
        (f64::NAN, f64::NAN)
    };
    let ties = n as u64 - b_higher - a_higher;
    let (test, p_value) = if binary {
        (Test::McNemar, mcnemar_exact(b_higher, a_higher))
    } else {
        (
            Test::Permutation,
            sign_flip_test(&diffs, options.resamples, options.seed),
        )
    };
    Comparison {
        group: group.to_string(),
        metric: metric.to_string(),
        n: n as u64,
        mean_a,
        mean_b,
        diff,
        ci_low,
        ci_high,
        test,
        p_value,
        b_higher,
        a_higher,
        ties,
    }
}

// ---------------------------------------------------------------------------------------------
// Output.

/// Writes `rows` as CSV with a header line: `group, metric, n, mean_a, mean_b, diff, ci_low,
/// ci_high, test, p_value, b_higher, a_higher, ties`. Numbers have six fixed decimals, except
/// `p_value`, written in scientific notation with six decimals (`1.953125e-3`) so that very
/// small p-values keep their digits; the same rows always give the same bytes.
pub fn write_csv(rows: &[Comparison], out: impl Write) -> Result<(), ReportError> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "group", "metric", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "test", "p_value",
        "b_higher", "a_higher", "ties",
    ])?;
    for r in rows {
        w.write_record([
            r.group.clone(),
            r.metric.clone(),
            r.n.to_string(),
            fixed(r.mean_a),
            fixed(r.mean_b),
            fixed(r.diff),
            fixed(r.ci_low),
            fixed(r.ci_high),
            r.test.as_str().to_string(),
            format!("{:.6e}", r.p_value),
            r.b_higher.to_string(),
            r.a_higher.to_string(),
            r.ties.to_string(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// `+0.060` / `−0.030` (a real minus sign); zero is `+0.000`.
fn signed(x: f64) -> String {
    format!("{:+.3}", x + 0.0).replace('-', "\u{2212}")
}

/// A p-value for people: `0.0312`, `1.0000`, `< 1e-4`.
pub fn format_p(p: f64) -> String {
    if p.is_nan() {
        "n/a".to_string()
    } else if p < 1e-4 {
        "< 1e-4".to_string()
    } else {
        format!("{p:.4}")
    }
}

fn interval(r: &Comparison) -> String {
    if r.ci_low.is_nan() || r.ci_high.is_nan() {
        format!("{} [n/a]", signed(r.diff))
    } else {
        format!(
            "{} [{}, {}]",
            signed(r.diff),
            signed(r.ci_low),
            signed(r.ci_high)
        )
    }
}

const HEADER: [&str; 9] = [
    "group",
    "metric",
    "n",
    "A",
    "B",
    "B\u{2212}A [95% CI]",
    "test",
    "p",
    "flips",
];

fn cells(r: &Comparison) -> [String; 9] {
    [
        r.group.clone(),
        r.metric.clone(),
        r.n.to_string(),
        format!("{:.3}", r.mean_a),
        format!("{:.3}", r.mean_b),
        interval(r),
        r.test.as_str().to_string(),
        format_p(r.p_value),
        format!("+{}/\u{2212}{}", r.b_higher, r.a_higher),
    ]
}

/// A plain aligned text table, after two legend lines (`A: <a_label>`, `B: <b_label>`): one
/// line per group and metric with the means of A and B, the mean difference B − A with its 95%
/// paired interval (Newcombe for 0/1 metrics, t otherwise), the test, its p-value and the flips `+b/−a` (instances where B scored
/// higher / where A scored higher).
pub fn table(rows: &[Comparison], a_label: &str, b_label: &str) -> String {
    let mut lines: Vec<[String; 9]> = vec![HEADER.map(str::to_string)];
    lines.extend(rows.iter().map(cells));
    let left = [true, true, false, false, false, false, true, false, false];
    let lines: Vec<Vec<String>> = lines.into_iter().map(Vec::from).collect();
    format!(
        "A: {a_label}\nB: {b_label}\n\n{}",
        crate::aligned(&lines, &left)
    )
}

/// The same columns as [`table`] as a Markdown table, after a legend naming A and B.
pub fn markdown(rows: &[Comparison], a_label: &str, b_label: &str) -> String {
    let escape = |s: &str| s.replace('|', "\\|");
    let mut out = format!(
        "- **A**: {}\n- **B**: {}\n\n",
        escape(a_label),
        escape(b_label)
    );
    out.push_str(&format!("| {} |\n", HEADER.join(" | ")));
    out.push_str("|:--|:--|--:|--:|--:|--:|:--|--:|--:|\n");
    for r in rows {
        let line: Vec<String> = cells(r).iter().map(|c| escape(c)).collect();
        out.push_str(&format!("| {} |\n", line.join(" | ")));
    }
    out
}

/// One sentence on a row for people: the difference with its interval, the test's p-value and
/// whether the difference stands out from noise at the 5% level, e.g. `exact-match: B − A =
/// +0.060 [−0.030, +0.150], McNemar p = 0.1892: not distinguishable from noise at the 5% level`.
pub fn verdict(r: &Comparison) -> String {
    let what = if r.group == "all" {
        r.metric.clone()
    } else {
        format!("{} ({})", r.metric, r.group)
    };
    let p = format_p(r.p_value);
    let p = if p.starts_with('<') {
        format!("p {p}")
    } else {
        format!("p = {p}")
    };
    let conclusion = if r.p_value < 0.05 && r.diff > 0.0 {
        "B is higher, beyond noise at the 5% level"
    } else if r.p_value < 0.05 && r.diff < 0.0 {
        "A is higher, beyond noise at the 5% level"
    } else {
        "not distinguishable from noise at the 5% level"
    };
    format!(
        "{what}: B \u{2212} A = {}, {} {p}: {conclusion}",
        interval(r),
        r.test
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newcombe_interval_of_paired_proportions() {
        // Values from an independent implementation of the same formulas (the R function
        // confIntPairedProportion of biostatUZH, transcribed to Python).
        let (lo, hi) = newcombe_paired(12, 2, 1, 16);
        assert!(
            (lo - -0.316094).abs() < 1e-5 && (hi - 0.195673).abs() < 1e-5,
            "{lo} {hi}"
        );
        let (lo, hi) = newcombe_paired(30, 8, 14, 112);
        assert!(
            (lo - -0.029462).abs() < 1e-5 && (hi - 0.135394).abs() < 1e-5,
            "{lo} {hi}"
        );
        // Every instance flipped the same way: an interval, not a point.
        let (lo, hi) = newcombe_paired(0, 0, 5, 5);
        assert!(lo > 0.3 && lo < 0.8 && hi == 1.0, "{lo} {hi}");
        // No change at all: centred on 0 with some width.
        let (lo, hi) = newcombe_paired(3, 0, 0, 10);
        assert!(lo < 0.0 && hi > 0.0, "{lo} {hi}");
    }
    use std::collections::BTreeMap;

    /// P[X <= k] for X ~ Bin(n, 1/2), exactly in integers (n <= 120).
    fn binom_cdf_exact(k: u64, n: u64) -> f64 {
        let mut c: u128 = 1;
        let mut sum: u128 = 0;
        for i in 0..=k {
            if i > 0 {
                c = c * u128::from(n - i + 1) / u128::from(i);
            }
            sum += c;
        }
        sum as f64 / 2f64.powi(n as i32)
    }

    /// 2 P[X <= min(b, c)] for X ~ Bin(b + c, 1/2), summing every term in log space.
    fn two_sided_log_sum(b: u64, c: u64) -> f64 {
        let (k, n) = (b.min(c), b + c);
        let mut ln_term = -(n as f64) * std::f64::consts::LN_2; // P[X = 0]
        let mut terms = vec![ln_term];
        for i in 1..=k {
            ln_term += ((n - i + 1) as f64 / i as f64).ln();
            terms.push(ln_term);
        }
        let max = terms.iter().cloned().fold(f64::MIN, f64::max);
        let sum = terms.iter().map(|t| (t - max).exp()).sum::<f64>();
        (2.0 * (max + sum.ln()).exp()).min(1.0)
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn mcnemar_known_values() {
        assert_eq!(mcnemar_exact(1, 6), 0.125);
        assert_eq!(mcnemar_exact(6, 1), 0.125);
        assert!(close(mcnemar_exact(0, 10), 0.001953125, 1e-14));
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        for b in [1, 5, 17, 500, 400_000] {
            assert_eq!(mcnemar_exact(b, b), 1.0);
        }
        assert_eq!(mcnemar_exact(3, 4), 1.0);
    }

    #[test]
    fn mcnemar_matches_a_direct_binomial_sum() {
        for (b, c) in [
            (2, 9),
            (10, 20),
            (14, 8),
            (30, 50),
            (0, 1),
            (40, 79),
            (1, 100),
        ] {
            let n = b + c;
            let want = (2.0 * binom_cdf_exact(b.min(c), n)).min(1.0);
            let got = mcnemar_exact(b, c);
            assert!(close(got, want, 1e-12), "({b}, {c}): {got} vs {want}");
        }
        // Past the exact integer range (n > 120): the saddle-point path.
        for (b, c) in [(50, 100), (10, 200), (140, 160), (0, 500), (300, 301)] {
            let got = mcnemar_exact(b, c);
            let want = two_sided_log_sum(b, c);
            assert!(close(got, want, 1e-11), "({b}, {c}): {got} vs {want}");
        }
    }

    #[test]
    fn mcnemar_is_stable_for_large_counts() {
        // n = 1e6 around the centre: by the normal approximation, b - c = 2000 is ~2 sd.
        // References from exact big-integer sums (Python's math.comb and fractions).
        let p = mcnemar_exact(499_000, 501_000);
        assert!(close(p, 4.560_829_986_538_208e-2, 1e-11), "{p}");
        assert!(close(
            mcnemar_exact(498_000, 502_000),
            6.360_933_750_082_489e-5,
            1e-11
        ));
        assert!(close(
            mcnemar_exact(4_900, 5_100),
            4.658_552_770_494_739e-2,
            1e-12
        ));
        // Symmetric and monotone.
        assert_eq!(p, mcnemar_exact(501_000, 499_000));
        assert!(mcnemar_exact(498_000, 502_000) < p);
        // Far tail: finite and tiny, not NaN.
        let tiny = mcnemar_exact(400_000, 600_000);
        assert!((0.0..1e-300).contains(&tiny), "{tiny}");
        // Agreement with a long log-space direct sum for a mid-size n.
        let (b, c) = (4_900u64, 5_100u64);
        assert!(close(mcnemar_exact(b, c), two_sided_log_sum(b, c), 1e-8));
    }

    #[test]
    fn t_quantiles() {
        for (df, want) in [
            (1.0, 12.706_204_736_174_705),
            (2.0, 4.302_652_729_749_464),
            (5.0, 2.570_581_835_636_315),
            (10.0, 2.228_138_851_986_275),
            (30.0, 2.042_272_456_301_238),
            (111.0, 1.981_566_757_074_901),
            (1000.0, 1.962_339_080_826_408_5),
            (100_000.0, 1.959_987_707_534_609_6),
        ] {
            let got = t_quantile_975(df);
            assert!((got - want).abs() < 1e-9, "df {df}: {got} vs {want}");
        }
        // Both sides of the switch to the expansion agree.
        assert!((t_quantile_975(1000.0) - t_quantile_975(1_000.000_001)).abs() < 1e-10);
        assert!((t_quantile_975(1e12) - 1.959_963_984_540_054).abs() < 1e-9);
        assert!(t_quantile_975(0.0).is_nan());
    }

    #[test]
    fn sign_flip_is_deterministic_and_sensible() {
        let shifted: Vec<f64> = (0..60).map(|i| 0.5 + (i % 7) as f64 * 0.1).collect();
        let p = sign_flip_test(&shifted, 2000, 3);
        assert_eq!(p, sign_flip_test(&shifted, 2000, 3));
        assert_eq!(
            p,
            1.0 / 2001.0,
            "every flip is less extreme than all-positive"
        );
        assert_eq!(sign_flip_test(&[0.0; 20], 1000, 0), 1.0);
        assert_eq!(sign_flip_test(&[], 1000, 0), 1.0);
        // Noise around zero: a large p, and the seed matters only a little.
        let noise: Vec<f64> = (0..80).map(|i| ((i * 37) % 11) as f64 - 5.0).collect();
        let p0 = sign_flip_test(&noise, 5000, 0);
        let p1 = sign_flip_test(&noise, 5000, 1);
        assert!(p0 > 0.3 && p1 > 0.3, "{p0} {p1}");
        assert_ne!(p0, p1);
    }

    fn sample(id: &str, group: &str, scores: &[(&str, f64)]) -> Sample {
        Sample {
            id: id.to_string(),
            group: group.to_string(),
            scores: scores
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>(),
            attributes: BTreeMap::new(),
        }
    }

    /// Two runs of 0/1 exact-match scores from (A, B) pairs, in group `g`.
    fn runs(pairs: &[(f64, f64)], g: &str) -> (Vec<Sample>, Vec<Sample>) {
        let a = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| sample(&format!("q{i}"), g, &[("exact-match", p.0)]))
            .collect();
        let b = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| sample(&format!("q{i}"), g, &[("exact-match", p.1)]))
            .collect();
        (a, b)
    }

    #[test]
    fn refuses_different_ids_naming_some() {
        let (a, mut b) = runs(&[(1.0, 1.0); 10], "k=1");
        for (i, s) in b.iter_mut().enumerate().take(5) {
            s.id = format!("z{i}");
        }
        let e = compare(&a, &b, &CompareOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("5 ids only in A (e.g. q0, q1, q2)")
                && msg.contains("5 only in B (e.g. z0, z1, z2)")
                && msg.contains("same task options and seed")
                && !msg.contains('\n'),
            "{msg}"
        );
    }

    #[test]
    fn refuses_different_groups_and_duplicates_and_empty_runs() {
        let (a, mut b) = runs(&[(1.0, 0.0); 4], "k=1");
        b[2].group = "k=2".into();
        let msg = compare(&a, &b, &CompareOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`q2` is in group `k=1` in A but `k=2` in B"),
            "{msg}"
        );
        let (mut a, b) = runs(&[(1.0, 0.0); 4], "k=1");
        a[3].id = "q0".into();
        let msg = compare(&a, &b, &CompareOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("run A has the instance id `q0` 2 times"),
            "{msg}"
        );
        let e = compare(&[], &b, &CompareOptions::default()).unwrap_err();
        assert_eq!(e, CompareError::Empty { which: "A" });
    }

    #[test]
    fn refuses_missing_metrics_naming_what_each_run_has() {
        let a = vec![sample(
            "x",
            "g",
            &[("exact-match", 1.0), ("levenshtein", 2.0)],
        )];
        let b = vec![sample("x", "g", &[("exact-match", 1.0)])];
        let options = CompareOptions {
            metrics: Some(vec!["levenshtein".into()]),
            ..CompareOptions::default()
        };
        let msg = compare(&a, &b, &options).unwrap_err().to_string();
        assert_eq!(
            msg,
            "metric `levenshtein` is not in run B (A has: exact-match, levenshtein; B has: exact-match); choose metrics both runs have with --metric"
        );
        // Without a request: only the common metric.
        let rows = compare(&a, &b, &CompareOptions::default()).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.metric == "exact-match"));
        let b = vec![sample("x", "g", &[("digit-accuracy", 1.0)])];
        let e = compare(&a, &b, &CompareOptions::default()).unwrap_err();
        assert!(matches!(e, CompareError::NoCommonMetric { .. }), "{e}");
    }

    #[test]
    fn flips_counts_and_rows_per_group() {
        // k=1: (A, B) = (0,1) x2, (1,0) x1, (1,1) x1; k=2: (0,1) x1, (0,0) x2.
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (i, (g, x, y)) in [
            ("k=1", 0.0, 1.0),
            ("k=2", 0.0, 1.0),
            ("k=1", 0.0, 1.0),
            ("k=1", 1.0, 0.0),
            ("k=2", 0.0, 0.0),
            ("k=1", 1.0, 1.0),
            ("k=2", 0.0, 0.0),
        ]
        .into_iter()
        .enumerate()
        {
            let lev = if y > x { 0.0 } else { 2.0 };
            a.push(sample(
                &format!("i{i}"),
                g,
                &[("exact-match", x), ("levenshtein", 1.0)],
            ));
            b.push(sample(
                &format!("i{i}"),
                g,
                &[("exact-match", y), ("levenshtein", lev)],
            ));
        }
        // B in another order: pairing is by id.
        b.reverse();
        let rows = compare(&a, &b, &CompareOptions::default()).unwrap();
        let keys: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.group.as_str(), r.metric.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("k=1", "exact-match"),
                ("k=1", "levenshtein"),
                ("k=2", "exact-match"),
                ("k=2", "levenshtein"),
                ("all", "exact-match"),
                ("all", "levenshtein"),
            ]
        );
        let k1 = &rows[0];
        assert_eq!((k1.n, k1.b_higher, k1.a_higher, k1.ties), (4, 2, 1, 1));
        assert_eq!(k1.test, Test::McNemar);
        assert_eq!((k1.mean_a, k1.mean_b, k1.diff), (0.5, 0.75, 0.25));
        assert_eq!(k1.p_value, 1.0);
        let all = &rows[4];
        assert_eq!((all.n, all.b_higher, all.a_higher, all.ties), (7, 3, 1, 3));
        assert_eq!(all.p_value, mcnemar_exact(3, 1));
        assert_eq!(all.p_value, 0.625);
        let lev = &rows[5];
        assert_eq!(lev.test, Test::Permutation);
        assert_eq!((lev.b_higher, lev.a_higher, lev.ties), (4, 3, 0));
        // The same inputs give the same bytes.
        let (mut x, mut y) = (Vec::new(), Vec::new());
        write_csv(&rows, &mut x).unwrap();
        write_csv(
            &compare(&a, &b, &CompareOptions::default()).unwrap(),
            &mut y,
        )
        .unwrap();
        assert_eq!(x, y);
        let csv = String::from_utf8(x).unwrap();
        assert!(csv.starts_with("group,metric,n,mean_a,mean_b,diff,ci_low,ci_high,test,p_value,b_higher,a_higher,ties\n"));
        assert!(
            csv.contains("\nall,exact-match,7,0.285714,0.571429,0.285714,"),
            "{csv}"
        );
        assert!(csv.contains(",McNemar,6.250000e-1,3,1,3\n"), "{csv}");
    }

    #[test]
    fn paired_interval_of_a_continuous_metric_is_a_t_interval() {
        let diffs = [1.0, 0.0, 2.0, 1.0, 0.5];
        let a: Vec<Sample> = (0..5)
            .map(|i| sample(&i.to_string(), "g", &[("m", 0.5)]))
            .collect();
        let b: Vec<Sample> = diffs
            .iter()
            .enumerate()
            .map(|(i, d)| sample(&i.to_string(), "g", &[("m", 0.5 + d)]))
            .collect();
        let r = &compare(&a, &b, &CompareOptions::default()).unwrap()[1];
        let mean = 0.9;
        let var = diffs.iter().map(|d| (d - mean) * (d - mean)).sum::<f64>() / 4.0;
        let half = 2.776_445_105_197_799 * (var / 5.0).sqrt(); // t_{0.975, 4}
        assert!((r.diff - mean).abs() < 1e-12);
        assert!((r.ci_low - (mean - half)).abs() < 1e-9);
        assert!((r.ci_high - (mean + half)).abs() < 1e-9);
    }

    /// The paper's example: 112 MMLU questions, accuracy 0.30 for A vs 0.36 for B (34 vs 40
    /// correct). Whether that six-point gain is real depends on how many answers changed: with
    /// 14 questions B now gets right and 8 it now gets wrong (34 - 8 + 14 = 40), McNemar's p is
    /// 2 * P[Bin(22, 1/2) <= 8] = 1200740 / 4194304 = 0.2863, far from significant.
    #[test]
    fn the_papers_112_question_example() {
        let mut pairs = Vec::new();
        pairs.extend([(0.0, 1.0); 14]); // flipped to correct
        pairs.extend([(1.0, 0.0); 8]); // flipped to wrong
        pairs.extend([(1.0, 1.0); 26]); // right in both
        pairs.extend([(0.0, 0.0); 64]); // wrong in both
        assert_eq!(pairs.len(), 112);
        let (a, b) = runs(&pairs, "machine_learning");
        let rows = compare(&a, &b, &CompareOptions::default()).unwrap();
        let all = rows.iter().find(|r| r.group == "all").unwrap();
        assert_eq!((all.b_higher, all.a_higher), (14, 8));
        assert!((all.mean_a - 34.0 / 112.0).abs() < 1e-12);
        assert!((all.mean_b - 40.0 / 112.0).abs() < 1e-12);
        // By hand: sum of C(22, i) for i = 0..=8.
        let tail: u64 = [1, 22, 231, 1540, 7315, 26334, 74613, 170544, 319770]
            .iter()
            .sum();
        assert_eq!(tail, 600_370);
        let by_hand = 2.0 * tail as f64 / (1u64 << 22) as f64;
        assert!((all.p_value - by_hand).abs() < 1e-14, "{}", all.p_value);
        assert_eq!(format_p(all.p_value), "0.2863");
        assert!(all.ci_low < 0.0 && all.ci_high > 0.0);
        assert!(verdict(all)
            .ends_with("McNemar p = 0.2863: not distinguishable from noise at the 5% level"));
    }

    #[test]
    fn tables_and_verdicts_read_well() {
        let mut pairs = vec![(0.0, 1.0); 10];
        pairs.push((1.0, 0.0));
        pairs.extend([(1.0, 1.0); 9]);
        let (a, b) = runs(&pairs, "k=3");
        let rows = compare(&a, &b, &CompareOptions::default()).unwrap();
        let t = table(&rows, "base", "tuned");
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A: base");
        assert_eq!(lines[1], "B: tuned");
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["group", "metric", "n", "A", "B", "B−A", "[95%", "CI]", "test", "p", "flips"]
        );
        assert!(lines[4].starts_with("---"));
        assert!(lines[6].starts_with("all"), "{t}");
        assert!(lines[6].contains("McNemar  0.0117  +10/−1"), "{t}");
        assert!(lines[6].contains("+0.450 [+0.147, +0.664]"), "{t}");
        let md = markdown(&rows, "base", "tu|ned");
        assert!(md.contains("- **B**: tu\\|ned"));
        assert!(
            md.contains("| all | exact-match | 20 | 0.500 | 0.950 |"),
            "{md}"
        );
        assert_eq!(md.lines().filter(|l| l.starts_with('|')).count(), 4);
        assert_eq!(
            verdict(&rows[1]),
            "exact-match: B − A = +0.450 [+0.147, +0.664], McNemar p = 0.0117: B is higher, beyond noise at the 5% level"
        );
        assert_eq!(format_p(3e-7), "< 1e-4");
        assert_eq!(format_p(0.03125), "0.0312");
        assert_eq!(signed(-0.0), "+0.000");
        assert_eq!(signed(-0.03), "−0.030");
    }
}
