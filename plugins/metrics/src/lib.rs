//! Metric plugins: `exact-match`, `digit-accuracy` and `levenshtein`.
//!
//! One library exports all three because they share nothing but the trimming rule and are tiny.
//! Every metric compares the prediction and the target **after trimming surrounding whitespace**,
//! so a model's leading space (" 579") is not an error.

use harness_abi::{
    abi_stable::{
        prefix_type::PrefixTypeTrait,
        std_types::{RResult, RStr, RString, RVec},
    },
    guard, not_provided,
    options::Options,
    BackendBox, Metric, MetricBox, Metric_TO, PluginInfo, PluginKind, PluginLib, PluginLibRef,
    TD_Opaque, TaskBox,
};

const VERSION: &str = env!("CARGO_PKG_VERSION");

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

#[derive(Clone, Copy)]
enum Which {
    ExactMatch,
    DigitAccuracy,
    Levenshtein,
}

const METRICS: [(&str, Which, &str); 3] = [
    (
        "exact-match",
        Which::ExactMatch,
        "1 if the trimmed prediction equals the target, else 0",
    ),
    (
        "digit-accuracy",
        Which::DigitAccuracy,
        "share of digit positions (from the right) where prediction and target agree",
    ),
    (
        "levenshtein",
        Which::Levenshtein,
        "edit distance between prediction and target (lower is better)",
    ),
];

struct TextMetric(Which);

impl Metric for TextMetric {
    fn higher_is_better(&self) -> bool {
        !matches!(self.0, Which::Levenshtein)
    }

    fn is_binary(&self) -> bool {
        matches!(self.0, Which::ExactMatch)
    }

    fn score(&self, prediction: RStr<'_>, target: RStr<'_>) -> f64 {
        let (p, t) = (prediction.as_str(), target.as_str());
        match self.0 {
            Which::ExactMatch => exact_match(p, t),
            Which::DigitAccuracy => digit_accuracy(p, t),
            Which::Levenshtein => levenshtein(p, t),
        }
    }
}

extern "C" fn manifest() -> RVec<PluginInfo> {
    METRICS
        .iter()
        .map(|(name, _, description)| PluginInfo {
            kind: PluginKind::Metric,
            name: (*name).into(),
            version: VERSION.into(),
            description: (*description).into(),
        })
        .collect()
}

extern "C" fn new_metric(name: RStr<'_>, options: RStr<'_>) -> RResult<MetricBox, RString> {
    guard("metrics", || {
        let (_, which, _) = METRICS
            .iter()
            .find(|(n, _, _)| *n == name.as_str())
            .ok_or_else(|| format!("this library provides no metric named `{name}`"))?;
        Options::parse(name.as_str(), options.as_str(), &[])?;
        Ok(Metric_TO::from_value(TextMetric(*which), TD_Opaque))
    })
}

extern "C" fn new_task(name: RStr<'_>, _options: RStr<'_>) -> RResult<TaskBox, RString> {
    not_provided(PluginKind::Task, name)
}

extern "C" fn new_backend(name: RStr<'_>, _options: RStr<'_>) -> RResult<BackendBox, RString> {
    not_provided(PluginKind::Backend, name)
}

/// The root module the host loads.
pub fn plugin_lib() -> PluginLibRef {
    PluginLib {
        manifest,
        new_task,
        new_metric,
        new_backend,
    }
    .leak_into_prefix()
}

harness_abi::export_plugin!(plugin_lib);

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
    fn trait_objects_report_direction_and_kind() {
        let m = TextMetric(Which::Levenshtein);
        assert!(!m.higher_is_better());
        assert!(!m.is_binary());
        assert!(TextMetric(Which::ExactMatch).is_binary());
    }
}
