//! Task plugin `mmlu`: multiple-choice questions of one or more MMLU subjects, as in section 4.1
//! of the paper, with the prompt of its Listing 1.
//!
//! Each question is a multiple-choice request the backend answers by log-likelihood: of each
//! option letter (`scoring = "letter"`, the paper's way) or of each option's text, normalised
//! by its length (`scoring = "cloze"`, the way small models get above chance). The group of an
//! instance is its subject, so results come per subject; the host reports both the micro
//! average (over questions) and the macro average (over subjects).
//!
//! With `leaked_in = "PAIRS.jsonl"` (a file written by `harness generate`, or an adapter folder
//! trained on one with `harness train --data`), every question gets
//! the attribute `leaked = yes` when a training pair was made from it or nearly copies it (the
//! pairs' `leaked_from`), else `leaked = no`: reports then split accuracy by it, which is how a
//! fine-tune on teacher data shows whether it learned the subject or the test questions.

pub mod data;

use std::path::PathBuf;

use harness_abi::options::edit_distance;
use harness_abi::sdk::{Instance, TaskPlugin, TrainExample};
use rand::{seq::index::sample, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Question};

const NAME: &str = "mmlu";
const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// How an answer is read off the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    /// Log-likelihood of " A", " B", " C", " D" after the lettered options.
    Letter,
    /// Log-likelihood per byte of each option's text after the question.
    Cloze,
}

/// The task's options as given; recorded with the subjects resolved (`all` and `exclude`
/// become the list of subjects) and the data file's path absolute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Options {
    /// One subject, a comma-separated list, or `all` (required).
    pub subject: Option<String>,
    /// Subjects to leave out of `subject` (with `all`, the paper's General FT).
    pub exclude: Option<String>,
    /// The MMLU JSONL or CSV file (default: the fetched test split).
    pub data: Option<PathBuf>,
    pub shots: u64,
    pub scoring: Scoring,
    pub seed: u64,
    /// At most this many questions per subject.
    pub limit: Option<u64>,
    /// A pairs file of `harness generate`, or an adapter folder trained on one: the questions
    /// it leaked get `leaked = yes`.
    pub leaked_in: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            subject: None,
            exclude: None,
            data: None,
            shots: 0,
            scoring: Scoring::Letter,
            seed: 1234,
            limit: None,
            leaked_in: None,
        }
    }
}

/// The validated options of the task.
#[derive(Debug, Clone)]
pub struct Config {
    pub subjects: Vec<String>,
    pub data: PathBuf,
    pub shots: usize,
    pub scoring: Scoring,
    pub seed: u64,
    pub limit: Option<usize>,
    /// The ids of the questions a generated pairs file leaked (`leaked_in`).
    pub leaked: Option<std::collections::HashSet<String>>,
}

/// The task with its data loaded.
pub struct Mmlu {
    config: Config,
    data: Dataset,
}

impl Mmlu {
    /// Parses the options, loads the data and checks the subjects exist.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        Mmlu::new(&mut harness_abi::options::read(NAME, text)?)
    }

    /// Loads the data and checks the subjects exist; writes back the resolved subjects and the
    /// data file's absolute path.
    fn new(o: &mut Options) -> Result<Self, String> {
        let spec = o.subject.clone().ok_or_else(|| {
            "mmlu: choose a subject with --subject NAME (e.g. machine_learning, a comma-separated list, or `all`)".to_string()
        })?;
        let data_path = o
            .data
            .clone()
            .unwrap_or_else(harness_abi::paths::default_mmlu);
        let data_path = std::path::absolute(&data_path).unwrap_or(data_path);
        let data = data::load(&data_path)?;
        let mut subjects = resolve_subjects(&spec, &data)?;
        if let Some(exclude) = &o.exclude {
            let dropped = resolve_subjects(exclude, &data)?;
            subjects.retain(|s| !dropped.contains(s));
            if subjects.is_empty() {
                return Err("mmlu: `exclude` leaves no subject".into());
            }
        }
        o.subject = Some(subjects.join(","));
        o.exclude = None;
        o.data = Some(data_path.clone());
        let leaked = match &o.leaked_in {
            Some(p) => {
                let p = std::path::absolute(p).unwrap_or_else(|_| p.clone());
                let ids = leaked_ids(&p)?;
                o.leaked_in = Some(p);
                Some(ids)
            }
            None => None,
        };
        let config = Config {
            subjects,
            data: data_path,
            shots: o.shots as usize,
            scoring: o.scoring,
            seed: o.seed,
            limit: o.limit.map(|l| l as usize),
            leaked,
        };
        Ok(Mmlu { config, data })
    }

    fn header(subject: &str) -> String {
        format!(
            "You are an expert in {}. You will be presented with a question and four possible answers. Choose the correct answer. Do not output any explanation, only choose the correct option.\n\n",
            subject.replace('_', " ")
        )
    }

    /// A question block; with `answer`, the solved form used for few-shot examples.
    fn block(&self, q: &Question, answer: bool) -> String {
        let mut s = format!("Question: {}\n", q.question.trim());
        if self.config.scoring == Scoring::Letter {
            for (letter, choice) in LETTERS.iter().zip(&q.choices) {
                s.push_str(&format!("{letter}. {}\n", choice.trim()));
            }
        }
        // One newline before "Answer:": with Listing 1's blank line SmolLM2 no longer answers
        // "A" to every question, and the reference (35/112) was computed without it.
        s.push_str("Answer:");
        if answer {
            s.push_str(&format!(" {}\n\n", self.answer_text(q, q.answer)));
        }
        s
    }

    fn answer_text(&self, q: &Question, i: usize) -> String {
        match self.config.scoring {
            Scoring::Letter => LETTERS[i].to_string(),
            Scoring::Cloze => q.choices[i].trim().to_string(),
        }
    }

    /// Few-shot examples for question `index` of `subject`: the dev split when there is one,
    /// else other questions of the same subject, drawn with the seed.
    fn shots(
        &self,
        subject: &str,
        index: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<&Question>, String> {
        let k = self.config.shots;
        if k == 0 {
            return Ok(Vec::new());
        }
        if let Some(dev) = self.data.dev.get(subject) {
            if dev.len() < k {
                return Err(format!(
                    "mmlu: {subject} has {} dev questions, fewer than --shots {k}",
                    dev.len()
                ));
            }
            return Ok(dev.iter().take(k).collect());
        }
        let test = &self.data.test[subject];
        if test.len() <= k {
            return Err(format!(
                "mmlu: {subject} has {} questions, too few for {k} few-shot examples besides the question",
                test.len()
            ));
        }
        Ok(sample(rng, test.len() - 1, k)
            .into_iter()
            .map(|j| if j >= index { j + 1 } else { j })
            .map(|j| &test[j])
            .collect())
    }

    fn instances(&self) -> Result<Vec<Instance>, String> {
        let mut out = Vec::new();
        for subject in &self.config.subjects {
            let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
            rng.set_stream(fnv1a(subject));
            let questions = &self.data.test[subject];
            let n = self
                .config
                .limit
                .unwrap_or(questions.len())
                .min(questions.len());
            for (i, q) in questions.iter().take(n).enumerate() {
                let mut context = Self::header(subject);
                for shot in self.shots(subject, i, &mut rng)? {
                    context.push_str(&self.block(shot, true));
                }
                context.push_str(&self.block(q, false));
                let options = (0..4)
                    .map(|c| {
                        (
                            format!(" {}", self.answer_text(q, c)),
                            LETTERS[c].to_string(),
                        )
                    })
                    .collect();
                let inst = Instance::choice(
                    format!("{subject}-{i}"),
                    subject.as_str(),
                    context,
                    options,
                    LETTERS[q.answer],
                );
                let inst = match &self.config.leaked {
                    Some(ids) => {
                        let leaked = if ids.contains(inst.id.as_str()) {
                            "yes"
                        } else {
                            "no"
                        };
                        inst.attribute("leaked", leaked)
                    }
                    None => inst,
                };
                out.push(match self.config.scoring {
                    Scoring::Cloze => inst.length_normalized(),
                    Scoring::Letter => inst,
                });
            }
        }
        Ok(out)
    }

    /// `count` questions of the configured subjects, drawn without replacement with the seed,
    /// as prompt (the evaluation prompt) and completion (the answer's letter, or its text with
    /// cloze scoring): the paper's "General FT" when the subjects are every subject but the
    /// evaluated ones (`subject = "all"`, `exclude = "machine_learning,..."`).
    pub fn training(&self, count: u64) -> Result<Vec<TrainExample>, String> {
        let pool: Vec<(&str, &Question)> = self
            .config
            .subjects
            .iter()
            .flat_map(|s| self.data.test[s].iter().map(move |q| (s.as_str(), q)))
            .collect();
        if count as usize > pool.len() {
            return Err(format!(
                "mmlu: {count} training examples asked for, but the chosen subjects hold {} questions",
                pool.len()
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(fnv1a("train"));
        let picked = sample(&mut rng, pool.len(), count as usize);
        let mut out = Vec::with_capacity(count as usize);
        for i in picked {
            let (subject, q) = pool[i];
            let index = self.data.test[subject]
                .iter()
                .position(|x| std::ptr::eq(x, q))
                .unwrap_or(0);
            let mut prompt = Self::header(subject);
            for shot in self.shots(subject, index, &mut rng)? {
                prompt.push_str(&self.block(shot, true));
            }
            prompt.push_str(&self.block(q, false));
            out.push(
                TrainExample::new(prompt, format!(" {}\n", self.answer_text(q, q.answer)))
                    .in_group(subject),
            );
        }
        Ok(out)
    }
}

/// `all`, one subject, or a comma-separated list; unknown names get the nearest suggestion.
fn resolve_subjects(spec: &str, data: &Dataset) -> Result<Vec<String>, String> {
    if spec.trim() == "all" {
        return Ok(data.test.keys().cloned().collect());
    }
    let mut out = Vec::new();
    for name in spec.split(',').map(data::subject_key) {
        if name.is_empty() {
            continue;
        }
        if !data.test.contains_key(&name) {
            let nearest = data
                .test
                .keys()
                .min_by_key(|k| edit_distance(k, &name))
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            return Err(format!(
                "mmlu: unknown subject `{name}`{nearest}; the data has {} subjects, `harness eval --task mmlu --subject all` runs them all",
                data.test.len()
            ));
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    if out.is_empty() {
        return Err("mmlu: --subject names no subject".into());
    }
    Ok(out)
}

/// The `leaked_from` ids of a pairs file written by `harness generate`, or of the pairs file an
/// adapter folder was trained on (its train.toml's `data`).
fn leaked_ids(path: &std::path::Path) -> Result<std::collections::HashSet<String>, String> {
    if path.is_dir() {
        let shown = data::shown(&path.display().to_string());
        let record = std::fs::read_to_string(path.join("train.toml"))
            .map_err(|e| format!("mmlu: leaked_in: {shown} is a folder without a readable train.toml ({e}); give a pairs file of `harness generate` or an adapter trained on one"))?;
        let record: toml::Table = record.parse().map_err(|e: toml::de::Error| {
            format!(
                "mmlu: leaked_in: {shown}/train.toml is not valid TOML: {}",
                data::shown(&e.to_string())
            )
        })?;
        let pairs = record
            .get("plan")
            .and_then(|p| p.get("data"))
            .or_else(|| record.get("data"))
            .and_then(|d| d.as_str())
            .ok_or_else(|| format!("mmlu: leaked_in: the adapter {shown} was not trained on a pairs file (`--data`)"))?;
        return leaked_ids(std::path::Path::new(pairs));
    }
    let shown = data::shown(&path.display().to_string());
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("mmlu: leaked_in: cannot read {shown}: {e}"))?;
    let mut ids = std::collections::HashSet::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            format!("mmlu: leaked_in: {shown} line {}: not JSON ({e}); give a file written by `harness generate`", i + 1)
        })?;
        match v.get("leaked_from") {
            Some(serde_json::Value::String(id)) => {
                ids.insert(id.clone());
            }
            Some(serde_json::Value::Null) => {}
            _ => {
                return Err(format!(
                    "mmlu: leaked_in: {shown} line {} has no `leaked_from`; give a file written by `harness generate`",
                    i + 1
                ))
            }
        }
    }
    Ok(ids)
}

/// A stable 64-bit hash of a subject name, to give each subject its own random stream.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

impl TaskPlugin for Mmlu {
    type Options = Options;
    const DESCRIPTION: &'static str = "MMLU subjects, prompt of the paper's Listing 1 (options: subject, exclude, data, shots, scoring, seed, limit, leaked_in); trains on its questions";

    fn new(options: &mut Options) -> Result<Self, String> {
        Mmlu::new(options)
    }

    fn eval_instances(&self) -> Result<Vec<Instance>, String> {
        self.instances()
    }

    fn train_examples(&self, count: u64) -> Result<Vec<TrainExample>, String> {
        self.training(count)
    }
}

harness_abi::plugin! { task "mmlu" => Mmlu }

#[cfg(test)]
mod tests {
    use super::*;
    use harness_abi::sdk::Request;

    /// A small data file; each caller gets its own, since tests run in parallel.
    fn dataset_file() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!("mmlu-lib-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("m{}.jsonl", NEXT.fetch_add(1, Ordering::SeqCst)));
        let mut text = String::new();
        for (topic, n) in [("machine learning", 5), ("virology", 3)] {
            for i in 0..n {
                text.push_str(&format!(
                    "{{\"question\":\"{topic} q{i}\",\"answer_a\":\"a{i}\",\"answer_b\":\"b{i}\",\"answer_c\":\"c{i}\",\"answer_d\":\"d{i}\",\"correct_answer\":\"{}\",\"topic\":\"{topic}\"}}\n",
                    LETTERS[i % 4]
                ));
            }
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    fn task(extra: &str) -> Mmlu {
        Mmlu::from_toml(&format!(
            "data = {:?}\n{extra}",
            dataset_file().display().to_string()
        ))
        .unwrap()
    }

    #[test]
    fn a_generated_pairs_file_marks_the_questions_it_leaked() {
        let pairs = dataset_file().with_extension("pairs.jsonl");
        std::fs::write(
            &pairs,
            "{\"prompt\":\"p\",\"completion\":\" A\\n\",\"leaked_from\":\"machine_learning-1\"}\n{\"prompt\":\"p\",\"completion\":\" B\\n\",\"leaked_from\":null}\n",
        )
        .unwrap();
        let t = task(&format!(
            "subject = \"machine_learning\"\nleaked_in = {:?}",
            pairs.display().to_string()
        ));
        let marks: Vec<(String, String)> = t
            .instances()
            .unwrap()
            .iter()
            .map(|i| (i.id.to_string(), i.attributes[0].value.to_string()))
            .collect();
        assert_eq!(marks[1], ("machine_learning-1".into(), "yes".into()));
        assert!(marks.iter().filter(|(_, v)| v == "yes").count() == 1);
        std::fs::write(&pairs, "{\"prompt\": \"p\"}\n").unwrap();
        let e = Mmlu::from_toml(&format!(
            "data = {:?}\nsubject = \"virology\"\nleaked_in = {:?}",
            dataset_file().display().to_string(),
            pairs.display().to_string()
        ))
        .err()
        .unwrap();
        assert!(e.contains("line 1 has no `leaked_from`"), "{e}");
    }

    #[test]
    fn training_draws_other_subjects_questions_as_eval_prompts() {
        let t = task("subject = \"all\"\nexclude = \"virology\"\nseed = 3");
        assert_eq!(t.config.subjects, ["machine_learning"]);
        let ex = t.training(4).unwrap();
        assert_eq!(ex.len(), 4);
        let prompts: std::collections::HashSet<String> =
            ex.iter().map(|e| e.prompt.to_string()).collect();
        assert_eq!(prompts.len(), 4, "drawn without replacement");
        for e in &ex {
            assert!(e
                .prompt
                .starts_with("You are an expert in machine learning."));
            assert!(e.prompt.ends_with("Answer:"));
            assert!(["A", "B", "C", "D"]
                .iter()
                .any(|l| e.completion == format!(" {l}\n").as_str()));
        }
        // Same seed, same examples; too many is an error that says how many there are.
        assert_eq!(t.training(4).unwrap(), ex);
        assert!(t.training(6).unwrap_err().contains("hold 5 questions"));
        let all = Mmlu::from_toml(&format!(
            "data = {:?}\nsubject = \"all\"\nexclude = \"all\"",
            dataset_file().display().to_string()
        ));
        assert!(all.err().unwrap().contains("leaves no subject"));
    }

    #[test]
    fn zero_shot_letter_prompt_follows_listing_1() {
        let t = task("subject = \"machine_learning\"");
        let inst = t.instances().unwrap();
        assert_eq!(inst.len(), 5);
        let Request::Choice(c) = &inst[1].request else {
            panic!()
        };
        assert_eq!(
            c.context.as_str(),
            "You are an expert in machine learning. You will be presented with a question and four possible answers. Choose the correct answer. Do not output any explanation, only choose the correct option.\n\nQuestion: machine learning q1\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:"
        );
        assert_eq!(
            c.options.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
            [" A", " B", " C", " D"]
        );
        assert_eq!(inst[1].target.as_str(), "B");
        assert_eq!(inst[1].group.as_str(), "machine_learning");
    }

    #[test]
    fn cloze_scores_option_texts_normalised() {
        let t = task("subject = \"virology\"\nscoring = \"cloze\"");
        let inst = t.instances().unwrap();
        let Request::Choice(c) = &inst[0].request else {
            panic!()
        };
        assert!(c.length_normalize);
        assert_eq!(c.options[2].as_str(), " c0");
        assert!(!c.context.contains("A. a0"));
    }

    #[test]
    fn few_shot_never_includes_the_question() {
        let t = task("subject = \"machine_learning,virology\"\nshots = 2");
        for inst in t.instances().unwrap() {
            let Request::Choice(c) = &inst.request else {
                panic!()
            };
            let blocks: Vec<&str> = c.context.split("Question: ").skip(1).collect();
            assert_eq!(blocks.len(), 3);
            let own = blocks[2].lines().next().unwrap();
            assert!(blocks[..2].iter().all(|b| b.lines().next().unwrap() != own));
        }
    }

    #[test]
    fn all_subjects_and_unknown_subject_suggestion() {
        assert_eq!(task("subject = \"all\"").instances().unwrap().len(), 8);
        let e = Mmlu::from_toml(&format!(
            "data = {:?}\nsubject = \"machine_learnin\"",
            dataset_file().display().to_string()
        ))
        .err()
        .unwrap();
        assert!(
            e.contains("unknown subject `machine_learnin` (did you mean `machine_learning`?)"),
            "{e}"
        );
    }

    #[test]
    fn too_many_shots_is_an_error() {
        let t = task("subject = \"virology\"\nshots = 3");
        assert!(t.instances().unwrap_err().contains("too few"));
    }
}
