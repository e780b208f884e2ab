//! Task plugin `addition`: k-digit addition, as in section 4.2 of the paper.
//!
//! Both operands of a problem have exactly k digits (leading digit non-zero), drawn uniformly.
//! Evaluation problems, few-shot examples and training examples come from three independent,
//! seeded random streams, and training examples are rejected when they coincide with an
//! evaluation problem of the same seed, so a fine-tuned model is never tested on what it saw.
//!
//! Options: `digits` (`5`, `1-7`, `1,3,12`; default `1-12`), `n` (problems per k, default 100),
//! `shots` (default 3), `seed` (default 1234), `fewshot` (`per-instance` or `shared`),
//! `max_new_tokens`, and two for the memorisation probe:
//!
//! - `seen_in = "ADAPTER_DIR"`: an adapter folder written by `harness train --task addition`.
//!   Its train.toml's `[plan]` (the task options and the number of examples) regenerates the very
//!   problems it was trained on, and every instance gets the attribute `seen = yes` when its
//!   problem `a + b` is among them, else `seen = no`. Only the same order counts: the model saw
//!   the text `a + b`, and `b + a` is another prompt. The whole training set counts, even when the
//!   run was stopped early. A relative path is taken from where harness runs and recorded
//!   absolute, so a resumed run finds the folder from anywhere.
//! - `seen_per_k = N` (default 0; needs `seen_in`): for each k of `digits` the training set has
//!   problems of, up to N more instances (ids `k{k}-seen-{i}`, group `k={k}`, `seen = yes`)
//!   after the regular ones of that k: the first N distinct training problems of that k in
//!   training order,
//!   leaving out those that already are regular instances of the run (they would count twice)
//!   and, with `fewshot = "shared"`, those that are one of the shared shots. Their prompts are
//!   built as the others': the same shared shots, or per-instance shots drawn after the regular
//!   instances' and never equal to a regular or a probe problem.
//!
//! With `seen_in`, the resolved options (run.toml) record `seen_in` (absolute), `seen_per_k`, and
//! `seen_overlap = M`: how many regular (non-probe) instances are in the adapter's training set,
//! which is how a run says how much of its evaluation overlaps training (0 for an adapter trained
//! with the same seed, digits and n, except for k = 1 where the 81 problems can run out). When
//! `seen_overlap` is given back (as `harness eval --resume` does) it must still hold, so a run is
//! not resumed against a retrained adapter. None of the three is a training option:
//! `harness train` refuses them.
//!
//! Every instance also carries `carries`: the number of carry operations of `a + b` in base 10,
//! column by column ([`carries`]), so results can be split by difficulty within a k.

mod digits;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use harness_abi::sdk::{Instance, TaskPlugin, TrainExample};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use digits::parse_digits;

const NAME: &str = "addition";

/// The instruction of the paper's Listing 4.
pub const INSTRUCTION: &str = "You are an expert in solving math problems.\nYou will be given two numbers and you need to add them. Do not produce any output other than the sum of the two numbers. You will also be given examples to help you understand the task.\n\n";

/// How few-shot examples are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FewShot {
    /// Fresh examples for every problem (like lm-evaluation-harness).
    PerInstance,
    /// One set of examples for all problems of the same k (the prompt prefix is then shared).
    Shared,
}

/// The task's options as given (and recorded in run.toml); see the crate documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The digit counts k (`5`, `1-7`, `1,3,12`).
    pub digits: Digits,
    /// Problems per k.
    pub n: u64,
    pub shots: u64,
    pub seed: u64,
    pub fewshot: FewShot,
    /// Tokens allowed beyond the k+1 digits of the answer (default k + 6 in all).
    pub max_new_tokens: Option<u32>,
    /// The adapter folder whose training set marks instances `seen` (evaluation only).
    pub seen_in: Option<PathBuf>,
    /// Training problems added per k as `seen = yes` probes (needs `seen_in`).
    pub seen_per_k: u64,
    /// The overlap a run recorded; checked against the adapter folder when given back.
    pub seen_overlap: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            digits: Digits::try_from("1-12".to_string()).expect("a valid digit spec"),
            n: 100,
            shots: 3,
            seed: 1234,
            fewshot: FewShot::PerInstance,
            max_new_tokens: None,
            seen_in: None,
            seen_per_k: 0,
            seen_overlap: None,
        }
    }
}

/// The digit counts k, recorded as the spec they were given as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digits {
    spec: String,
    ks: Vec<u32>,
}

impl TryFrom<String> for Digits {
    type Error = String;
    fn try_from(spec: String) -> Result<Self, String> {
        let ks = parse_digits(&spec).map_err(|e| e.trim_start_matches("addition: ").to_string())?;
        Ok(Digits { spec, ks })
    }
}

impl From<Digits> for String {
    fn from(d: Digits) -> String {
        d.spec
    }
}

impl std::ops::Deref for Digits {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.ks
    }
}

impl Config {
    /// Reads and checks options given as TOML.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let config: Config = harness_abi::options::read(NAME, text)?;
        config.check()?;
        Ok(config)
    }

    /// Checks what the types do not.
    pub fn check(&self) -> Result<(), String> {
        if self.n == 0 {
            return Err("addition: option `n` must be at least 1".into());
        }
        if self
            .seen_in
            .as_ref()
            .is_some_and(|s| s.as_os_str().is_empty())
        {
            return Err(
                "addition: option `seen_in` must name an adapter folder written by `harness train --task addition`"
                    .into(),
            );
        }
        if self.seen_per_k > 0 && self.seen_in.is_none() {
            return Err("addition: option `seen_per_k` needs `seen_in`, the adapter folder whose training problems to probe".into());
        }
        if self.seen_overlap.is_some() && self.seen_in.is_none() {
            return Err("addition: option `seen_overlap` is recorded by a run with `seen_in` and means nothing without it".into());
        }
        Ok(())
    }
}

/// One addition problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Problem {
    pub a: u64,
    pub b: u64,
}

impl Problem {
    pub fn sum(&self) -> u64 {
        self.a + self.b
    }

    fn question(&self) -> String {
        format!("Question: {} + {}\nAnswer:", self.a, self.b)
    }
}

/// The number of carry operations when adding `a + b` in base 10, column by column from the
/// units (a carry out of the leading column counts): 15 + 17 -> 1, 99 + 1 -> 2, 10 + 10 -> 0.
pub fn carries(a: u64, b: u64) -> u32 {
    let (mut a, mut b, mut carry, mut count) = (a, b, 0, 0);
    while a > 0 || b > 0 {
        carry = u64::from(a % 10 + b % 10 + carry >= 10);
        count += carry as u32;
        a /= 10;
        b /= 10;
    }
    count
}

/// A random stream for one purpose and one k, independent of every other stream.
fn stream(seed: u64, purpose: u64, k: u32) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(purpose * 1000 + u64::from(k));
    rng
}

const EVAL: u64 = 1;
const SHOTS: u64 = 2;
const TRAIN: u64 = 3;

/// A number with exactly `k` digits, uniformly.
fn k_digit(rng: &mut impl Rng, k: u32) -> u64 {
    let low = 10u64.pow(k - 1);
    rng.gen_range(low..low * 10)
}

fn problem(rng: &mut impl Rng, k: u32) -> Problem {
    Problem {
        a: k_digit(rng, k),
        b: k_digit(rng, k),
    }
}

/// The problems an adapter was trained on, rebuilt from its train.toml.
#[derive(Debug)]
struct TrainingSet {
    /// Each training example's k and problem, in training order (repeats kept).
    problems: Vec<(u32, Problem)>,
    set: HashSet<Problem>,
}

impl TrainingSet {
    /// Reads `dir/train.toml` and regenerates the problems its `[plan]` trained on.
    fn load(dir: &Path) -> Result<TrainingSet, String> {
        let shown = dir.display();
        if !dir.is_dir() {
            return Err(format!(
                "addition: seen_in: no folder {shown}; give an adapter folder written by `harness train --task addition`"
            ));
        }
        let path = dir.join("train.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "addition: seen_in: cannot read {} ({e}); is {shown} a folder written by `harness train --task addition`?",
                path.display()
            )
        })?;
        let record: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            format!(
                "addition: seen_in: {} is not valid TOML: {}",
                path.display(),
                e.message().replace('\n', " ")
            )
        })?;
        let Some(toml::Value::Table(plan)) = record.get("plan") else {
            return Err(format!(
                "addition: seen_in: {} has no [plan] table (written by an older harness?), so which problems it trained on is unknown",
                path.display()
            ));
        };
        match plan.get("task").and_then(toml::Value::as_str) {
            Some(NAME) => {}
            Some(other) => {
                return Err(format!(
                    "addition: seen_in: {shown} was trained on task `{other}`, not `addition`"
                ))
            }
            None => {
                let data = plan
                    .get("data")
                    .and_then(toml::Value::as_str)
                    .map(|d| format!(" on --data {d}"))
                    .unwrap_or_default();
                return Err(format!(
                    "addition: seen_in: {shown} was trained{data} without a task, not on the addition task's problems"
                ));
            }
        }
        let examples = match plan.get("examples").and_then(toml::Value::as_integer) {
            Some(n) if n >= 0 => n as u64,
            _ => {
                return Err(format!(
                    "addition: seen_in: {} has no `examples` count in its [plan]",
                    path.display()
                ))
            }
        };
        let options = match plan.get("task_options") {
            None => String::new(),
            Some(toml::Value::Table(t)) => t.to_string(),
            Some(_) => {
                return Err(format!(
                    "addition: seen_in: `plan.task_options` in {} is not a table",
                    path.display()
                ))
            }
        };
        let config = Config::from_toml(&options).map_err(|e| {
            format!(
                "addition: seen_in: the task options in {}: {}",
                path.display(),
                e.trim_start_matches("addition: ")
            )
        })?;
        if config.seen_in.is_some() {
            return Err(format!(
                "addition: seen_in: the task options in {} name `seen_in`, which training refuses",
                path.display()
            ));
        }
        let problems = Addition::new(config).training_problems(examples);
        let set = problems.iter().map(|(_, p)| *p).collect();
        Ok(TrainingSet { problems, set })
    }
}

/// The task: builds prompts per the paper's Listing 4.
pub struct Addition {
    config: Config,
    /// The training set of `seen_in`, read on first use (so that training, which refuses
    /// `seen_in`, says so rather than failing on the folder).
    seen: OnceLock<Result<Option<TrainingSet>, String>>,
}

impl Addition {
    pub fn new(config: Config) -> Self {
        Addition {
            config,
            seen: OnceLock::new(),
        }
    }

    /// The training set of `seen_in`, when that option is given.
    fn training_set(&self) -> Result<Option<&TrainingSet>, String> {
        self.seen
            .get_or_init(|| {
                self.config
                    .seen_in
                    .as_deref()
                    .map(TrainingSet::load)
                    .transpose()
            })
            .as_ref()
            .map(Option::as_ref)
            .map_err(Clone::clone)
    }

    /// The evaluation problems for `k`, in order.
    pub fn eval_problems(&self, k: u32) -> Vec<Problem> {
        let mut rng = stream(self.config.seed, EVAL, k);
        (0..self.config.n).map(|_| problem(&mut rng, k)).collect()
    }

    /// The full prompt: instruction, shots, then the question.
    pub fn prompt(&self, shots: &[Problem], p: &Problem) -> String {
        let mut s = String::from(INSTRUCTION);
        for shot in shots {
            s.push_str(&format!("{} {}\n\n", shot.question(), shot.sum()));
        }
        s.push_str(&p.question());
        s
    }

    /// How many regular (non-probe) instances are in the training set of `seen_in`.
    fn seen_overlap(&self, training: &TrainingSet) -> u64 {
        self.config
            .digits
            .iter()
            .flat_map(|&k| self.eval_problems(k))
            .filter(|p| training.set.contains(p))
            .count() as u64
    }

    fn instance(
        &self,
        id: String,
        k: u32,
        shots: &[Problem],
        p: &Problem,
        seen: Option<bool>,
    ) -> Instance {
        let max_new_tokens = self.config.max_new_tokens.unwrap_or(k + 6);
        let inst = Instance::generate(
            id,
            format!("k={k}"),
            self.prompt(shots, p),
            p.sum().to_string(),
        )
        .stop_at("\n")
        .max_new_tokens(max_new_tokens)
        .attribute("carries", carries(p.a, p.b).to_string());
        match seen {
            Some(seen) => inst.attribute("seen", if seen { "yes" } else { "no" }),
            None => inst,
        }
    }

    fn instances(&self) -> Result<Vec<Instance>, String> {
        let training = self.training_set()?;
        if let (Some(t), Some(recorded)) = (training, self.config.seen_overlap) {
            let now = self.seen_overlap(t);
            if now != recorded {
                return Err(format!(
                    "addition: the run recorded seen_overlap = {recorded}, but the training set in {} now overlaps {now} evaluation problems; was that adapter retrained since?",
                    self.config.seen_in.as_deref().unwrap_or(Path::new("")).display()
                ));
            }
        }
        let mut out = Vec::new();
        for &k in self.config.digits.iter() {
            let problems = self.eval_problems(k);
            let avoid: HashSet<Problem> = problems.iter().copied().collect();
            let mut shot_rng = stream(self.config.seed, SHOTS, k);
            let draw_shots = |rng: &mut ChaCha8Rng, avoid: &HashSet<Problem>| -> Vec<Problem> {
                (0..self.config.shots)
                    .map(|_| draw_avoiding(rng, k, avoid))
                    .collect()
            };
            let shared = draw_shots(&mut shot_rng, &avoid);
            for (i, p) in problems.iter().enumerate() {
                let shots = match self.config.fewshot {
                    FewShot::Shared => shared.clone(),
                    FewShot::PerInstance => draw_shots(&mut shot_rng, &avoid),
                };
                let seen = training.map(|t| t.set.contains(p));
                out.push(self.instance(format!("k{k}-{i}"), k, &shots, p, seen));
            }
            let Some(training) = training else { continue };
            let probes = self.probes(training, k, &avoid, &shared);
            let mut avoid_all = avoid;
            avoid_all.extend(probes.iter().copied());
            for (i, p) in probes.iter().enumerate() {
                let shots = match self.config.fewshot {
                    FewShot::Shared => shared.clone(),
                    FewShot::PerInstance => draw_shots(&mut shot_rng, &avoid_all),
                };
                out.push(self.instance(format!("k{k}-seen-{i}"), k, &shots, p, Some(true)));
            }
        }
        Ok(out)
    }

    /// The `seen_per_k` problems of `k` probed for memorisation: the first distinct training
    /// problems of that k, leaving out regular instances and (with shared shots) the shots.
    fn probes(
        &self,
        training: &TrainingSet,
        k: u32,
        regular: &HashSet<Problem>,
        shared: &[Problem],
    ) -> Vec<Problem> {
        let mut taken = HashSet::new();
        let mut out = Vec::new();
        for (tk, p) in &training.problems {
            if out.len() as u64 >= self.config.seen_per_k {
                break;
            }
            let is_shot = self.config.fewshot == FewShot::Shared && shared.contains(p);
            if *tk == k && !regular.contains(p) && !is_shot && taken.insert(*p) {
                out.push(*p);
            }
        }
        out
    }

    /// The k and problem of each of `count` training examples, in order: k uniform over the
    /// configured digits, no problem equal to an evaluation problem of the same seed.
    pub fn training_problems(&self, count: u64) -> Vec<(u32, Problem)> {
        let avoid: HashSet<Problem> = self
            .config
            .digits
            .iter()
            .flat_map(|&k| self.eval_problems(k))
            .collect();
        let mut rng = stream(self.config.seed, TRAIN, 0);
        (0..count)
            .map(|_| {
                let k = self.config.digits[rng.gen_range(0..self.config.digits.len())];
                (k, draw_avoiding(&mut rng, k, &avoid))
            })
            .collect()
    }

    /// `count` training examples: the [`training_problems`](Self::training_problems), each with
    /// shots of its k from a stream of their own.
    pub fn training(&self, count: u64) -> Result<Vec<TrainExample>, String> {
        if self.config.seen_in.is_some() || self.config.seen_per_k > 0 {
            return Err("addition: options `seen_in` and `seen_per_k` describe an evaluation (which training problems an adapter saw); training takes neither".into());
        }
        let mut shot_rng = stream(self.config.seed, TRAIN, 1);
        Ok(self
            .training_problems(count)
            .into_iter()
            .map(|(k, p)| {
                let shots: Vec<Problem> = (0..self.config.shots)
                    .map(|_| problem(&mut shot_rng, k))
                    .collect();
                TrainExample::new(self.prompt(&shots, &p), format!(" {}\n", p.sum()))
                    .in_group(format!("k={k}"))
            })
            .collect())
    }
}

/// A problem of `k` digits not in `avoid`; when every problem of that size is in `avoid`
/// (possible only for k = 1), a repeated one is returned rather than looping forever.
fn draw_avoiding(rng: &mut ChaCha8Rng, k: u32, avoid: &HashSet<Problem>) -> Problem {
    let mut p = problem(rng, k);
    for _ in 0..1000 {
        if !avoid.contains(&p) {
            break;
        }
        p = problem(rng, k);
    }
    p
}

impl TaskPlugin for Addition {
    type Options = Config;
    const DESCRIPTION: &'static str = "k-digit addition, k-shot prompts of the paper's Listing 4 (options: digits, n, shots, seed, fewshot, max_new_tokens, seen_in, seen_per_k)";

    /// Checks the options; with `seen_in`, records it absolute and, when the adapter's
    /// training set can be read, the overlap `seen_overlap` a resumed run is checked against.
    fn new(options: &mut Config) -> Result<Self, String> {
        options.check()?;
        if let Some(dir) = &options.seen_in {
            options.seen_in = Some(std::path::absolute(dir).unwrap_or_else(|_| dir.clone()));
        }
        let task = Addition::new(options.clone());
        // A folder that cannot be read is reported when instances are made (training, which
        // refuses `seen_in`, says so first).
        if let Ok(Some(t)) = task.training_set() {
            options.seen_overlap = Some(task.seen_overlap(t));
        }
        Ok(task)
    }

    fn eval_instances(&self) -> Result<Vec<Instance>, String> {
        self.instances()
    }

    fn default_metrics(&self) -> Vec<String> {
        ["exact-match", "digit-accuracy", "levenshtein"]
            .map(String::from)
            .to_vec()
    }

    fn train_examples(&self, count: u64) -> Result<Vec<TrainExample>, String> {
        self.training(count)
    }
}

harness_abi::plugin! { task "addition" => Addition }

#[cfg(test)]
mod tests {
    use super::*;
    use harness_abi::sdk::Request;

    /// The options `harness eval --resume` gives back: what the SDK records after `new`.
    fn resolved(toml: &str) -> (Addition, String) {
        let mut o: Config = harness_abi::options::read(NAME, toml).unwrap();
        let t = <Addition as TaskPlugin>::new(&mut o).unwrap();
        (t, harness_abi::options::record(&o).unwrap())
    }

    fn task(toml: &str) -> Addition {
        Addition::new(Config::from_toml(toml).unwrap())
    }

    #[test]
    fn operands_have_exactly_k_digits() {
        let t = task("n = 500");
        for k in [1, 2, 7, 12] {
            for p in t.eval_problems(k) {
                assert_eq!(p.a.to_string().len(), k as usize);
                assert_eq!(p.b.to_string().len(), k as usize);
            }
        }
    }

    #[test]
    fn defaults_and_groups() {
        let t = task("");
        let inst = t.instances().unwrap();
        assert_eq!(inst.len(), 1200);
        assert_eq!(inst[0].group.as_str(), "k=1");
        assert_eq!(inst[1199].group.as_str(), "k=12");
        assert_eq!(inst[1199].id.as_str(), "k12-99");
    }

    #[test]
    fn prompt_follows_listing_4() {
        let t = task("shots = 1");
        let s = t.prompt(&[Problem { a: 123, b: 456 }], &Problem { a: 314, b: 271 });
        assert_eq!(
            s,
            format!(
                "{INSTRUCTION}Question: 123 + 456\nAnswer: 579\n\nQuestion: 314 + 271\nAnswer:"
            )
        );
    }

    #[test]
    fn same_seed_same_instances_other_seed_other_instances() {
        assert_eq!(
            task("seed = 7").instances().unwrap(),
            task("seed = 7").instances().unwrap()
        );
        assert_ne!(
            task("seed = 7").instances().unwrap(),
            task("seed = 8").instances().unwrap()
        );
    }

    #[test]
    fn shots_have_the_same_k_and_are_not_the_question() {
        let t = task("digits = \"5\"\nn = 50");
        for inst in t.instances().unwrap() {
            let Request::Generate(g) = &inst.request else {
                panic!("addition makes generate requests")
            };
            let questions: Vec<&str> = g.prompt.split("Question: ").skip(1).collect();
            assert_eq!(questions.len(), 4);
            let last = questions[3];
            for q in &questions[..3] {
                let operands = q.split('\n').next().unwrap();
                assert!(operands.split(" + ").all(|x| x.len() == 5), "{operands}");
                assert_ne!(*q, last);
            }
        }
    }

    #[test]
    fn shared_fewshot_gives_one_prefix_per_k() {
        let t = task("digits = \"3\"\nn = 10\nfewshot = \"shared\"");
        let prefixes: HashSet<String> = t
            .instances()
            .unwrap()
            .iter()
            .map(|i| match &i.request {
                Request::Generate(g) => g.prompt.rsplit_once("Question:").unwrap().0.to_string(),
                Request::Choice(_) => unreachable!(),
            })
            .collect();
        assert_eq!(prefixes.len(), 1);
    }

    #[test]
    fn training_examples_avoid_eval_problems() {
        let t = task("digits = \"1-3\"\nn = 100");
        let eval: HashSet<String> = t
            .instances()
            .unwrap()
            .iter()
            .map(|i| match &i.request {
                Request::Generate(g) => g.prompt.rsplit_once("Question:").unwrap().1.to_string(),
                Request::Choice(_) => unreachable!(),
            })
            .collect();
        let train = t.training(2000).unwrap();
        let clashes = train
            .iter()
            .filter(|e| {
                let q = e.prompt.rsplit_once("Question:").unwrap().1;
                eval.contains(q) && !e.group.as_str().ends_with("=1")
            })
            .count();
        assert_eq!(clashes, 0);
        assert!(train.iter().all(|e| e.completion.ends_with('\n')));
    }

    #[test]
    fn unknown_option_is_named() {
        let e = Config::from_toml("digts = 3").unwrap_err();
        assert!(
            e.contains("unknown option `digts` (did you mean `digits`?)"),
            "{e}"
        );
    }

    #[test]
    fn carries_are_counted_column_by_column() {
        assert_eq!(carries(15, 17), 1);
        assert_eq!(carries(99, 1), 2);
        assert_eq!(carries(10, 10), 0);
        assert_eq!(carries(0, 0), 0);
        assert_eq!(carries(123, 456), 0);
        assert_eq!(carries(555, 555), 3);
        assert_eq!(carries(999, 1), 3);
        assert_eq!(carries(1, 999), 3);
        assert_eq!(carries(909, 91), 3);
        assert_eq!(carries(9_999_999_999, 1), 10);
        assert_eq!(carries(5, 5), 1);
    }

    #[test]
    fn every_instance_carries_its_carries_and_no_seen_without_seen_in() {
        for inst in task("digits = \"1-4\"\nn = 20").instances().unwrap() {
            let (a, b) = operands(&inst);
            assert_eq!(
                attributes(&inst),
                vec![("carries".to_string(), carries(a, b).to_string())]
            );
        }
    }

    #[test]
    fn training_examples_are_unchanged_by_the_refactor() {
        // Pinned from the training examples made before `training_problems` existed.
        let t = task("digits = \"1-7\"");
        let ex = t.training(3).unwrap();
        let last = |e: &TrainExample| e.prompt.rsplit_once("Question: ").unwrap().1.to_string();
        let got: Vec<(String, String, String)> = ex
            .iter()
            .map(|e| (last(e), e.completion.to_string(), e.group.to_string()))
            .collect();
        let want = [
            ("60 + 79\nAnswer:", " 139\n", "k=2"),
            ("7827 + 2619\nAnswer:", " 10446\n", "k=4"),
            ("51 + 82\nAnswer:", " 133\n", "k=2"),
        ]
        .map(|(q, c, g)| (q.to_string(), c.to_string(), g.to_string()));
        assert_eq!(got, want);
        assert_eq!(
            ex[0].prompt.as_str(),
            format!("{INSTRUCTION}Question: 56 + 39\nAnswer: 95\n\nQuestion: 30 + 18\nAnswer: 48\n\nQuestion: 10 + 68\nAnswer: 78\n\nQuestion: 60 + 79\nAnswer:")
        );
    }

    // ---- seen_in / seen_per_k ----

    /// A folder like the one `harness train --task addition` writes, with only its train.toml.
    fn fake_adapter(name: &str, train_toml: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("addition-seen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("train.toml"), train_toml).unwrap();
        dir
    }

    const TRAINED: &str = "harness_version = \"0.1.0\"\n\n[plan]\ntask = \"addition\"\nexamples = 200\nout = \"adapters/x\"\nbackend = \"candle\"\n\n[plan.task_options]\ndigits = \"1-2\"\nseed = 99\n\n[plan.train]\n";

    fn toml_path(dir: &Path) -> String {
        toml::Value::String(dir.display().to_string()).to_string()
    }

    fn operands(inst: &Instance) -> (u64, u64) {
        let Request::Generate(g) = &inst.request else {
            panic!("addition makes generate requests")
        };
        let q = g.prompt.rsplit_once("Question: ").unwrap().1;
        let (a, rest) = q.split_once(" + ").unwrap();
        (
            a.parse().unwrap(),
            rest.split('\n').next().unwrap().parse().unwrap(),
        )
    }

    fn attributes(inst: &Instance) -> Vec<(String, String)> {
        inst.attributes
            .iter()
            .map(|a| (a.key.to_string(), a.value.to_string()))
            .collect()
    }

    fn attr(inst: &Instance, key: &str) -> Option<String> {
        inst.attributes
            .iter()
            .find(|a| a.key.as_str() == key)
            .map(|a| a.value.to_string())
    }

    /// The (a, b) of every training example, read back from the training prompts themselves.
    fn trained_on() -> HashSet<(u64, u64)> {
        task("digits = \"1-2\"\nseed = 99")
            .training(200)
            .unwrap()
            .iter()
            .map(|e| {
                let q = e.prompt.rsplit_once("Question: ").unwrap().1;
                let (a, rest) = q.split_once(" + ").unwrap();
                (
                    a.parse().unwrap(),
                    rest.split('\n').next().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn seen_in_marks_exactly_the_training_problems() {
        let dir = fake_adapter("marks", TRAINED);
        let opts = format!("digits = \"1-2\"\nseed = 7\nseen_in = {}", toml_path(&dir));
        let t = task(&opts);
        let inst = t.instances().unwrap();
        assert_eq!(inst.len(), 200);
        let trained = trained_on();
        let mut yes = 0;
        let mut yes_k2 = 0;
        for i in &inst {
            let (a, b) = operands(i);
            let want = if trained.contains(&(a, b)) {
                "yes"
            } else {
                "no"
            };
            assert_eq!(attr(i, "seen").as_deref(), Some(want), "{}", i.id);
            assert_eq!(attr(i, "carries"), Some(carries(a, b).to_string()));
            assert_eq!(i.attributes.len(), 2);
            if want == "yes" {
                yes += 1;
                yes_k2 += usize::from(i.group.as_str() == "k=2");
            }
        }
        // Only the same order counts: (b, a) of a trained (a, b) is not seen unless trained too.
        assert!(yes > yes_k2, "some k=1 problems overlap training: {yes}");
        let (_, resolved) = resolved(&opts);
        assert!(
            resolved.contains(&format!("seen_overlap = {yes}\n"))
                && resolved.contains("seen_per_k = 0\n")
                && resolved.contains(&format!("seen_in = {}\n", toml_path(&dir))),
            "{resolved}"
        );
        // The resolved options are what --resume gives back: the same instances again.
        let again = Addition::new(Config::from_toml(&resolved).unwrap());
        assert_eq!(again.instances().unwrap(), inst);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn seen_per_k_adds_training_problems_after_each_k() {
        let dir = fake_adapter("probes", TRAINED);
        for fewshot in ["per-instance", "shared"] {
            let base = format!("digits = \"1-2\"\nseed = 7\nn = 30\nfewshot = \"{fewshot}\"");
            let plain = task(&base).instances().unwrap();
            let opts = format!("{base}\nseen_in = {}\nseen_per_k = 4", toml_path(&dir));
            let inst = task(&opts).instances().unwrap();
            assert_eq!(inst.len(), 60 + 2 * 4, "{fewshot}");
            let ids: HashSet<&str> = inst.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(ids.len(), inst.len(), "ids are unique");
            let trained = trained_on();

            // The regular instances are those of a run without the options, plus `seen`.
            let regular: Vec<&Instance> =
                inst.iter().filter(|i| !i.id.contains("-seen-")).collect();
            assert_eq!(regular.len(), plain.len());
            for (r, p) in regular.iter().zip(&plain) {
                let mut stripped = (*r).clone();
                stripped.attributes = r
                    .attributes
                    .iter()
                    .filter(|a| a.key.as_str() != "seen")
                    .cloned()
                    .collect();
                assert_eq!(&stripped, p);
            }

            // Probes follow the regular instances of their k, in order.
            let order: Vec<&str> = inst.iter().map(|i| i.id.as_str()).collect();
            assert_eq!(order[29], "k1-29");
            assert_eq!(
                &order[30..34],
                ["k1-seen-0", "k1-seen-1", "k1-seen-2", "k1-seen-3"]
            );
            assert_eq!(order[34], "k2-0");
            assert_eq!(order[67], "k2-seen-3");
            let regular_problems: HashSet<(u64, u64)> =
                regular.iter().map(|i| operands(i)).collect();
            let mut probes = HashSet::new();
            for i in inst.iter().filter(|i| i.id.contains("-seen-")) {
                let (a, b) = operands(i);
                let k = i.id.as_str()[1..2].parse::<usize>().unwrap();
                assert_eq!(i.group.as_str(), format!("k={k}"));
                assert_eq!(a.to_string().len(), k);
                assert_eq!(attr(i, "seen").as_deref(), Some("yes"));
                assert_eq!(attr(i, "carries"), Some(carries(a, b).to_string()));
                assert!(trained.contains(&(a, b)), "{}: {a} + {b}", i.id);
                assert!(!regular_problems.contains(&(a, b)), "{}", i.id);
                assert!(probes.insert((a, b)), "probes are distinct");
                // Shots come before the question and never are the question itself.
                let Request::Generate(g) = &i.request else {
                    unreachable!()
                };
                let questions: Vec<&str> = g.prompt.split("Question: ").skip(1).collect();
                assert_eq!(questions.len(), 4);
                for q in &questions[..3] {
                    assert_ne!(q.split('\n').next(), questions[3].split('\n').next());
                }
                assert_eq!(i.target.as_str(), (a + b).to_string());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn seen_per_k_takes_the_first_training_problems_in_order() {
        let dir = fake_adapter("first", TRAINED);
        let opts = format!(
            "digits = \"2\"\nseed = 7\nn = 5\nseen_in = {}\nseen_per_k = 3",
            toml_path(&dir)
        );
        let t = task(&opts);
        let regular: HashSet<Problem> = t.eval_problems(2).into_iter().collect();
        let mut want = Vec::new();
        for (k, p) in task("digits = \"1-2\"\nseed = 99").training_problems(200) {
            if k == 2 && !regular.contains(&p) && !want.contains(&(p.a, p.b)) && want.len() < 3 {
                want.push((p.a, p.b));
            }
        }
        let got: Vec<(u64, u64)> = t.instances().unwrap()[5..].iter().map(operands).collect();
        assert_eq!(got, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn seen_errors_are_one_clear_line() {
        let one_line = |e: String| {
            assert!(e.starts_with("addition: ") && !e.contains('\n'), "{e}");
            e
        };
        let eval_err = |opts: String| one_line(task(&opts).instances().unwrap_err());

        let missing = std::env::temp_dir().join("addition-seen-no-such-folder");
        let e = eval_err(format!("seen_in = {}", toml_path(&missing)));
        assert!(e.contains("no folder"), "{e}");

        let empty = fake_adapter("empty", "");
        std::fs::remove_file(empty.join("train.toml")).unwrap();
        let e = eval_err(format!("seen_in = {}", toml_path(&empty)));
        assert!(e.contains("cannot read") && e.contains("train.toml"), "{e}");

        let data = fake_adapter(
            "data",
            "[plan]\ndata = \"pairs.jsonl\"\nout = \"a\"\nbackend = \"candle\"\n[plan.task_options]\n[plan.train]\n",
        );
        let e = eval_err(format!("seen_in = {}", toml_path(&data)));
        assert!(e.contains("on --data pairs.jsonl without a task"), "{e}");

        let mmlu = fake_adapter("mmlu", &TRAINED.replace("\"addition\"", "\"mmlu\""));
        let e = eval_err(format!("seen_in = {}", toml_path(&mmlu)));
        assert!(e.contains("trained on task `mmlu`, not `addition`"), "{e}");

        let old = fake_adapter("old", "harness_version = \"0.0.1\"\n[summary]\nsteps = 3\n");
        let e = eval_err(format!("seen_in = {}", toml_path(&old)));
        assert!(e.contains("has no [plan]"), "{e}");

        let bad = fake_adapter("bad", "[plan\n");
        let e = eval_err(format!("seen_in = {}", toml_path(&bad)));
        assert!(e.contains("not valid TOML"), "{e}");

        let e = one_line(Config::from_toml("seen_per_k = 2").unwrap_err());
        assert!(e.contains("`seen_per_k` needs `seen_in`"), "{e}");

        // Training refuses the evaluation options, before looking at the folder.
        let e = one_line(
            task(&format!("seen_in = {}", toml_path(&missing)))
                .training(3)
                .unwrap_err(),
        );
        assert!(e.contains("training takes neither"), "{e}");

        // A resumed run whose adapter was retrained since is refused.
        let good = fake_adapter("retrained", TRAINED);
        let opts = format!("digits = \"1-2\"\nseed = 7\nseen_in = {}", toml_path(&good));
        let e = eval_err(format!("{opts}\nseen_overlap = 100000"));
        assert!(
            e.contains("seen_overlap = 100000") && e.contains("retrained"),
            "{e}"
        );

        for d in [empty, data, mmlu, old, bad, good] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
