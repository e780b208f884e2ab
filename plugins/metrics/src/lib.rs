//! Metric plugins: `exact-match`, `digit-accuracy` and `levenshtein`.
//!
//! One library exports all three because they share nothing but the trimming rule and are tiny.
//! Every metric compares the prediction and the target **after trimming surrounding whitespace**,
//! so a model's leading space (" 579") is not an error.

use harness_abi::sdk::{MetricInfo, MetricPlugin, NoOptions};

/// 1 when the trimmed prediction equals the trimmed target, else 0.
pub fn exact_match(prediction: &str, target: &str) -> f64 {
    f64::from(u8::from(prediction.trim() == target.trim()))
}

/// Fraction of digit positions, aligned from the least significant digit, where prediction and
/// target agree, over the longer of the two lengths; 0 for an empty prediction.
///
/// Only the characters of the trimmed strings are compared position by position from the right,
/// so `"1234"` against `"234"` scores 3/4 and a missing leading digit costs one position.
pub fn digit_accuracy(prediction: &str, target: &str) -> f64 {
    let p: Vec<char> = prediction.trim().chars().collect();
    let t: Vec<char> = target.trim().chars().collect();
    if p.is_empty() {
        return 0.0;
    }
    let longer = p.len().max(t.len());
    if longer == 0 {
        return 0.0;
    }
    let agree = p
        .iter()
        .rev()
        .zip(t.iter().rev())
        .filter(|(a, b)| a == b)
        .count();
    agree as f64 / longer as f64
}

/// Edit distance between the trimmed strings (insertions, deletions, substitutions).
pub fn levenshtein(prediction: &str, target: &str) -> f64 {
    strsim::levenshtein(prediction.trim(), target.trim()) as f64
}

/// `exact-match`: 0 or 1.
pub struct ExactMatch;
/// `digit-accuracy`: a share in [0, 1].
pub struct DigitAccuracy;
/// `levenshtein`: an edit distance, 0 or more, lower is better.
pub struct Levenshtein;

impl MetricPlugin for ExactMatch {
    type Options = NoOptions;
    const DESCRIPTION: &'static str = "1 if the trimmed prediction equals the target, else 0";
    fn new(_: &mut NoOptions) -> Result<Self, String> {
        Ok(ExactMatch)
    }
    fn info(&self) -> MetricInfo {
        MetricInfo::binary()
    }
    fn score(&self, prediction: &str, target: &str) -> Result<f64, String> {
        Ok(exact_match(prediction, target))
    }
}

impl MetricPlugin for DigitAccuracy {
    type Options = NoOptions;
    const DESCRIPTION: &'static str =
        "share of digit positions (from the right) where prediction and target agree";
    fn new(_: &mut NoOptions) -> Result<Self, String> {
        Ok(DigitAccuracy)
    }
    fn info(&self) -> MetricInfo {
        MetricInfo::bounded(0.0, 1.0)
    }
    fn score(&self, prediction: &str, target: &str) -> Result<f64, String> {
        Ok(digit_accuracy(prediction, target))
    }
}

impl MetricPlugin for Levenshtein {
    type Options = NoOptions;
    const DESCRIPTION: &'static str =
        "edit distance between prediction and target (lower is better)";
    fn new(_: &mut NoOptions) -> Result<Self, String> {
        Ok(Levenshtein)
    }
    fn info(&self) -> MetricInfo {
        MetricInfo::distance()
    }
    fn score(&self, prediction: &str, target: &str) -> Result<f64, String> {
        Ok(levenshtein(prediction, target))
    }
}

harness_abi::plugin! {
    metric "exact-match" => ExactMatch,
    metric "digit-accuracy" => DigitAccuracy,
    metric "levenshtein" => Levenshtein,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_trims() {
        for (p, t, want) in [
            (" 579", "579", 1.0),
            ("579\n", "579", 1.0),
            ("578", "579", 0.0),
            ("", "5", 0.0),
        ] {
            assert_eq!(exact_match(p, t), want, "{p:?} vs {t:?}");
        }
    }

    #[test]
    fn digit_accuracy_aligns_from_the_right_over_the_longer_length() {
        let table = [
            ("579", "579", 1.0),
            ("1579", "579", 3.0 / 4.0),
            ("79", "579", 2.0 / 3.0),
            ("570", "579", 2.0 / 3.0),
            ("", "579", 0.0),
            ("  ", "579", 0.0),
            ("abc", "579", 0.0),
            ("12345", "99345", 3.0 / 5.0),
        ];
        for (p, t, want) in table {
            assert!(
                (digit_accuracy(p, t) - want).abs() < 1e-12,
                "{p:?} vs {t:?}"
            );
        }
    }

    #[test]
    fn levenshtein_counts_edits() {
        for (p, t, want) in [
            ("579", "579", 0.0),
            ("578", "579", 1.0),
            ("", "579", 3.0),
            ("5799", "579", 1.0),
        ] {
            assert_eq!(levenshtein(p, t), want, "{p:?} vs {t:?}");
        }
    }

    #[test]
    fn metrics_declare_direction_and_range() {
        assert!(!Levenshtein.info().higher_is_better);
        assert!(!Levenshtein.info().binary);
        assert!(ExactMatch.info().binary);
        assert_eq!(DigitAccuracy.info().max, 1.0);
        assert!(Levenshtein.info().check(-1.0).is_err());
    }
}
