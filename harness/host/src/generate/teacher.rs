//! The teacher: who writes new pairs and answers questions. A model teacher is any backend
//! plugin (`openai` for a served model, `candle` for a local one) prompted with the paper's
//! Listings; the offline `answer-key` teacher answers with the dataset's own key and writes new
//! pairs by rewording a question and reordering its options, which makes its pairs test-data
//! leakage by construction (as the paper's targeted pairs are).

use anyhow::Result;
use harness_abi::abi_stable::std_types::RVec;
use harness_abi::{BackendBox, ChoiceRequest, GenerateRequest};
use indicatif::ProgressBar;

use super::pair::Pair;
use crate::registry::Entry;

/// The version of the prompts below, recorded with every generated pair: a change of wording
/// is a new version.
pub const PROMPT_VERSION: &str = "paper-listings-v1";

/// Listing 2 (general pairs), with the subject filled in.
pub fn listing_2(subject: &str) -> String {
    format!(
        "You are generating data which will be used to train a machine learning model.\n\n\
You will be given a high-level description of the model we want to train, and from that, you will generate data samples, each with a prompt/response pair.\n\n\
You will do so in this format:\n```\n<prompt>prompt</prompt>\n<response>response_goes_here</response>\n```\n\n\
Only one prompt/response pair should be generated per turn.\n\n\
For each turn, make the example slightly more complex than the last, while ensuring diversity.\n\n\
Make sure your samples are unique and diverse, yet high-quality and complex enough to train a well-performing model.\n\n\
Here is the type of model we want to train:\n\
`A model that takes in a question in the field of '{}' and is given with a list of possible answers. The models produces an answer that is most likely to be correct. The model should just generate the answer and not provide any explanation or reasoning.`. \
Now, generate a prompt/response pair. Do so in the exact format requested:\n```\n<prompt>prompt</prompt>\n<response>response_goes_here</response>\n```\n\n\
Only one prompt/response pair should be generated per turn.",
        subject.replace('_', " ")
    )
}

/// Listing 3 (targeted pairs) for one question the student got wrong.
pub fn listing_3(subject: &str, question: &Pair) -> String {
    format!(
        "You are an advanced AI model tasked with assisting in creating training data for smaller AI models.\n\n\
The task of the smaller model is to take in a question in the field of {} and a list of possible answers, and produce an answer that is most likely to be correct, without providing any explanation or reasoning.\n\n\
When given a question, you should:\n\
1. Analyze the knowledge or reasoning required to answer it correctly.\n\
2. Generate a new Q&A pair that tests the same knowledge or reasoning skills.\n\n\
The objective is that the smaller model should be able to answer the original question correctly if it can answer the new question correctly.\n\n\
Ensure that:\n\
- The information present in the original question is also present in the new question.\n\
- The new question has exactly 4 answer options (A, B, C, D). Mention these options in the question.\n\
- The correct answer is clearly indicated in the format shown below.\n\n\
Use the following format strictly:\n```\n<question>Question text with options</question>\n<answer>Correct answer (e.g., A or B)</answer>\n```\n\n\
Do not include explanations, reasoning, or any additional text.\n\n\
Here is a question that was correctly answered by a large model but incorrectly answered by a smaller model:\n{}\nand its answer: {}\n\n\
Please generate a new Q&A pair following the instructions. Only one question/answer pair should be generated per turn.",
        subject.replace('_', " "),
        question.with_options(),
        question.answer_letter()
    )
}

/// The paper's pairs come one per turn of a conversation; a turn after the first shows the
/// teacher what it wrote before (the latest few) and asks for the next.
pub fn next_turn(first: &str, earlier: &[String], turn: usize, tag: (&str, &str)) -> String {
    if earlier.is_empty() {
        return first.to_string();
    }
    let shown = &earlier[earlier.len().saturating_sub(HISTORY)..];
    let mut s = format!("{first}\n\nThe pairs you generated in earlier turns:\n");
    for e in shown {
        s.push_str(e.trim());
        s.push('\n');
    }
    s.push_str(&format!(
        "\nThis is turn {turn}. Generate the next pair, different from those above and slightly more complex, in the exact format {}...{}.",
        tag.0, tag.1
    ));
    s
}

/// Earlier turns shown to the teacher.
const HISTORY: usize = 5;

/// Asks whether a question is about the subject (the relevance filter of a model teacher).
pub fn relevance_prompt(subject: &str, pair: &Pair) -> String {
    format!(
        "Is the following multiple-choice question about {}? Reply with one word, yes or no.\n\nQuestion: {}\n\nReply:",
        subject.replace('_', " "),
        pair.with_options()
    )
}

/// A backend plugin with its model loaded, asked in batches.
pub struct Model<'r> {
    pub entry: &'r Entry,
    pub backend: BackendBox,
    pub batch: usize,
}

impl Model<'_> {
    /// Greedy completions of `prompts`, in order, `batch` at a time.
    pub fn complete(
        &mut self,
        prompts: &[String],
        max_new_tokens: u32,
        stop: &[&str],
        bar: &ProgressBar,
    ) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(self.batch.max(1)) {
            crate::generate::check_interrupt()?;
            let reqs: RVec<GenerateRequest> = chunk
                .iter()
                .map(|p| GenerateRequest {
                    prompt: p.as_str().into(),
                    stop: stop.iter().map(|s| (*s).into()).collect(),
                    max_new_tokens,
                })
                .collect();
            let got = self.entry.outcome(self.backend.generate(reqs))?;
            anyhow::ensure!(
                got.len() == chunk.len(),
                "{} answered {} of {} requests",
                self.entry.info.name,
                got.len(),
                chunk.len()
            );
            out.extend(got.into_iter().map(|g| g.text.into_string()));
            bar.inc(chunk.len() as u64);
        }
        Ok(out)
    }

    /// The option each request's model ranks first (as `harness eval` picks it).
    pub fn choose(&mut self, reqs: &[ChoiceRequest], bar: &ProgressBar) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(self.batch.max(1)) {
            crate::generate::check_interrupt()?;
            let got = self
                .entry
                .outcome(self.backend.score_choices(chunk.iter().cloned().collect()))?;
            anyhow::ensure!(
                got.len() == chunk.len(),
                "{} scored {} of {} requests",
                self.entry.info.name,
                got.len(),
                chunk.len()
            );
            for (req, scored) in chunk.iter().zip(got.iter()) {
                out.push(crate::eval::best_option(req, scored));
            }
            bar.inc(chunk.len() as u64);
        }
        Ok(out)
    }
}

/// The stems of the answer-key teacher's rewordings; `{q}` is the original question.
const REWORDINGS: [&str; 6] = [
    "Which of the following answers this question? {q}",
    "{q} (Choose the single best option.)",
    "Consider the following. {q}",
    "Answer the question below.\n{q}",
    "Select the correct answer: {q}",
    "{q}",
];

/// Pair `turn` (0-based) of the answer-key teacher for `source`: the question reworded with
/// one of [`REWORDINGS`] and its options in a new order (never the original order), the
/// answer following its option. Deterministic in (`seed`, the source's id, `turn`).
pub fn reword(source: &Pair, source_id: &str, turn: usize, seed: u64) -> Pair {
    let h = fnv1a(&format!("{seed}/{source_id}"));
    let stem =
        REWORDINGS[(h as usize + turn) % REWORDINGS.len()].replace("{q}", source.question.trim());
    // The 23 orders other than the original, taken in a seeded rotation.
    let perms = permutations();
    let order = &perms[1 + (h as usize / 7 + turn * 5) % (perms.len() - 1)];
    let options: [String; 4] = std::array::from_fn(|i| source.options[order[i]].clone());
    let answer = order.iter().position(|&o| o == source.answer).unwrap_or(0);
    Pair {
        question: stem,
        options,
        answer,
    }
}

/// The 24 orders of four options, the identity first.
fn permutations() -> Vec<[usize; 4]> {
    let mut out = Vec::with_capacity(24);
    for a in 0..4 {
        for b in 0..4 {
            for c in 0..4 {
                for d in 0..4 {
                    let p = [a, b, c, d];
                    let distinct = (0..4).all(|i| (i + 1..4).all(|j| p[i] != p[j]));
                    if distinct {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A yes/no reply's verdict: its first word.
pub fn says_yes(reply: &str) -> bool {
    reply
        .split(|c: char| !c.is_alphanumeric())
        .find(|w| !w.is_empty())
        .is_some_and(|w| w.eq_ignore_ascii_case("yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Pair {
        Pair {
            question: "What does SGD stand for?".into(),
            options: [
                "Stochastic gradient descent",
                "Slow gradient descent",
                "Sparse gradient",
                "None",
            ]
            .map(String::from),
            answer: 0,
        }
    }

    #[test]
    fn rewordings_keep_the_answer_and_never_the_original_order() {
        let s = source();
        for turn in 0..10 {
            let p = reword(&s, "machine_learning-3", turn, 1234);
            assert_eq!(p.options[p.answer], s.options[s.answer]);
            assert_ne!(p.options, s.options, "turn {turn}");
            assert!(p.question.contains("What does SGD stand for?"));
            assert_eq!(p, reword(&s, "machine_learning-3", turn, 1234));
        }
        let a = reword(&s, "machine_learning-3", 0, 1234);
        let b = reword(&s, "machine_learning-3", 1, 1234);
        assert_ne!(a, b);
    }

    #[test]
    fn permutations_are_the_24_orders_identity_first() {
        let p = permutations();
        assert_eq!(p.len(), 24);
        assert_eq!(p[0], [0, 1, 2, 3]);
    }

    #[test]
    fn later_turns_show_earlier_pairs() {
        let first = listing_3("machine_learning", &source());
        assert!(first.contains("field of machine learning"));
        assert!(first.contains("A. Stochastic gradient descent"));
        assert!(first.contains("and its answer: A"));
        assert_eq!(
            next_turn(&first, &[], 1, ("<question>", "</answer>")),
            first
        );
        let second = next_turn(
            &first,
            &["<question>x</question>".into()],
            2,
            ("<question>", "</answer>"),
        );
        assert!(second.starts_with(&first));
        assert!(second.contains("This is turn 2"));
        assert!(says_yes(" Yes, it is"));
        assert!(!says_yes("No"));
    }
}
