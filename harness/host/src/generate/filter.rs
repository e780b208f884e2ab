//! The quality filters of the paper's Algorithm 1 (and 2): well-formed (four options, one answer
//! letter: [`super::pair`]), no duplicates or near-duplicates, relevant to the subject, solvable.
//! Each filter counts what it removed, so the generated file's record says how much each one
//! took away.

use serde::Serialize;

use super::pair::{normalise, Pair};

/// Pairs left and removed at each stage, for one subject.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    /// Replies the teacher was asked for.
    pub asked: usize,
    /// Not a question with four options A-D and one answer among them.
    pub malformed: usize,
    /// The same normalised text as a pair kept before, or at least `similarity` alike.
    pub duplicate: usize,
    /// Judged not about the subject.
    pub irrelevant: usize,
    /// The teacher, asked the question alone, did not give the stated answer.
    pub unsolvable: usize,
    pub kept: usize,
}

/// A pair on its way through the filters, with where it came from.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub pair: Pair,
    /// The test question it was made from (targeted pairs).
    pub source: Option<String>,
}

/// How alike two texts are: 1 − Levenshtein distance / longer length. Order matters, so a
/// question with its options reordered is a different text; two texts whose lengths alone put
/// them below `floor` are not compared character by character.
pub fn similarity(a: &str, b: &str, floor: f64) -> f64 {
    let (la, lb) = (a.chars().count(), b.chars().count());
    let longer = la.max(lb);
    if longer == 0 {
        return 1.0;
    }
    if (la.min(lb) as f64) / (longer as f64) < floor {
        return 0.0;
    }
    strsim::normalized_levenshtein(a, b)
}

/// Keeps the first of each group of duplicates: a pair is dropped when its normalised text
/// equals, or is at least `threshold` similar to, one already kept (`kept` carries the texts
/// across calls). Returns the pairs kept and how many were dropped.
pub fn dedupe(
    candidates: Vec<Candidate>,
    kept: &mut Vec<String>,
    threshold: f64,
) -> (Vec<Candidate>, usize) {
    let mut out = Vec::with_capacity(candidates.len());
    let mut dropped = 0;
    for c in candidates {
        let text = c.pair.fingerprint();
        let near = kept
            .iter()
            .any(|k| *k == text || similarity(k, &text, threshold) >= threshold);
        if near {
            dropped += 1;
        } else {
            kept.push(text);
            out.push(c);
        }
    }
    (out, dropped)
}

/// The test question most like `pair` (by question text, normalised) and how alike, if any is
/// at least `threshold` alike: a generated pair that nearly copies a test question.
pub fn nearest_test<'a>(
    pair: &Pair,
    tests: &'a [(String, Pair)],
    threshold: f64,
) -> Option<(&'a str, f64)> {
    let text = normalise(&pair.question);
    tests
        .iter()
        .map(|(id, t)| {
            (
                id.as_str(),
                similarity(&normalise(&t.question), &text, threshold),
            )
        })
        .filter(|(_, s)| *s >= threshold)
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(q: &str, options: [&str; 4]) -> Candidate {
        Candidate {
            pair: Pair {
                question: q.into(),
                options: options.map(String::from),
                answer: 0,
            },
            source: None,
        }
    }

    #[test]
    fn exact_and_near_duplicates_are_dropped_reorderings_are_not() {
        let a = pair(
            "What is the VC dimension of a line in 2D?",
            ["3", "2", "4", "infinite"],
        );
        let same = pair(
            "what is the VC-dimension of a line in 2D",
            ["3", "2", "4", "Infinite"],
        );
        let near = pair(
            "What is the VC dimension of a line in 2-D?",
            ["3", "2", "4", "infinite"],
        );
        let other = pair(
            "Which optimiser uses momentum?",
            ["SGD", "Adam", "LBFGS", "None"],
        );
        let reordered = pair(
            "Which optimiser uses momentum?",
            ["None of the listed optimisers", "LBFGS", "Adam", "SGD"],
        );
        let mut kept = Vec::new();
        let (out, dropped) = dedupe(vec![a, same, near, other, reordered], &mut kept, 0.9);
        assert_eq!(dropped, 2);
        assert_eq!(out.len(), 3);
        // Across calls too.
        let again = pair(
            "Which optimiser uses momentum?",
            ["SGD", "Adam", "LBFGS", "None"],
        );
        assert_eq!(dedupe(vec![again], &mut kept, 0.9).1, 1);
    }

    #[test]
    fn a_near_copy_of_a_test_question_is_found() {
        let tests = vec![(
            "ml-1".to_string(),
            pair("Which optimiser uses momentum?", ["a", "b", "c", "d"]).pair,
        )];
        let copy = pair("Which optimizer uses momentum?", ["w", "x", "y", "z"]).pair;
        assert_eq!(nearest_test(&copy, &tests, 0.8).unwrap().0, "ml-1");
        let fresh = pair("What is a kernel?", ["w", "x", "y", "z"]).pair;
        assert!(nearest_test(&fresh, &tests, 0.8).is_none());
    }
}
