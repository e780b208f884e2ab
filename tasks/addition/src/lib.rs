//! Task plugin `addition`: k-digit addition, as in section 4.2 of the paper.
//!
//! Both operands of a problem have exactly k digits (leading digit non-zero), drawn uniformly.
//! Evaluation problems, few-shot examples and training examples come from three independent,
//! seeded random streams, and training examples are rejected when they coincide with an
//! evaluation problem of the same seed, so a fine-tuned model is never tested on what it saw.

mod digits;

use std::collections::HashSet;

use harness_abi::{
    abi_stable::{
        prefix_type::PrefixTypeTrait,
        std_types::{RResult, RStr, RString, RVec},
    },
    guard, not_provided,
    options::Options,
    BackendBox, GenerateRequest, Instance, MetricBox, PluginInfo, PluginKind, PluginLib,
    PluginLibRef, Request, TD_Opaque, Task, TaskBox, Task_TO, TrainExample,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use digits::parse_digits;

const NAME: &str = "addition";

/// The instruction of the paper's Listing 4.
pub const INSTRUCTION: &str = "You are an expert in solving math problems.\nYou will be given two numbers and you need to add them. Do not produce any output other than the sum of the two numbers. You will also be given examples to help you understand the task.\n\n";

const OPTIONS: &[&str] = &["digits", "n", "shots", "seed", "fewshot", "max_new_tokens"];

/// How few-shot examples are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FewShot {
    /// Fresh examples for every problem (like lm-evaluation-harness).
    PerInstance,
    /// One set of examples for all problems of the same k (the prompt prefix is then shared).
    Shared,
}

/// The validated options of the task.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub digits: Vec<u32>,
    pub n: u64,
    pub shots: u64,
    pub seed: u64,
    pub fewshot: FewShot,
    /// Extra tokens allowed beyond the k+1 digits of the answer.
    pub max_new_tokens: Option<u32>,
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let o = Options::parse(NAME, text, OPTIONS)?;
        let digits = parse_digits(&o.string("digits")?.unwrap_or_else(|| "1-12".into()))?;
        let fewshot = match o.string("fewshot")?.as_deref() {
            None | Some("per-instance") => FewShot::PerInstance,
            Some("shared") => FewShot::Shared,
            Some(other) => {
                return Err(format!(
                    "addition: option `fewshot` must be `per-instance` or `shared`, got `{other}`"
                ))
            }
        };
        let n = o.u64("n")?.unwrap_or(100);
        if n == 0 {
            return Err("addition: option `n` must be at least 1".into());
        }
        Ok(Config {
            digits,
            n,
            shots: o.u64("shots")?.unwrap_or(3),
            seed: o.u64("seed")?.unwrap_or(1234),
            fewshot,
            max_new_tokens: o.u64("max_new_tokens")?.map(|v| v as u32),
        })
    }

    fn to_toml(&self) -> String {
        let digits: Vec<String> = self.digits.iter().map(u32::to_string).collect();
        format!(
            "digits = \"{}\"\nn = {}\nshots = {}\nseed = {}\nfewshot = \"{}\"\n{}",
            digits.join(","),
            self.n,
            self.shots,
            self.seed,
            match self.fewshot {
                FewShot::PerInstance => "per-instance",
                FewShot::Shared => "shared",
            },
            self.max_new_tokens
                .map(|m| format!("max_new_tokens = {m}\n"))
                .unwrap_or_default()
        )
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

/// The task: builds prompts per the paper's Listing 4.
pub struct Addition {
    config: Config,
}

impl Addition {
    pub fn new(config: Config) -> Self {
        Addition { config }
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

    fn instances(&self) -> Vec<Instance> {
        let mut out = Vec::new();
        for &k in &self.config.digits {
            let problems = self.eval_problems(k);
            let avoid: HashSet<Problem> = problems.iter().copied().collect();
            let mut shot_rng = stream(self.config.seed, SHOTS, k);
            let draw_shots = |rng: &mut ChaCha8Rng| -> Vec<Problem> {
                (0..self.config.shots)
                    .map(|_| draw_avoiding(rng, k, &avoid))
                    .collect()
            };
            let shared = draw_shots(&mut shot_rng);
            for (i, p) in problems.iter().enumerate() {
                let shots = match self.config.fewshot {
                    FewShot::Shared => shared.clone(),
                    FewShot::PerInstance => draw_shots(&mut shot_rng),
                };
                let max_new = self.config.max_new_tokens.unwrap_or(k + 6);
                out.push(Instance {
                    id: format!("k{k}-{i}").into(),
                    group: format!("k={k}").into(),
                    request: Request::Generate(GenerateRequest {
                        prompt: self.prompt(&shots, p).into(),
                        stop: vec![RString::from("\n")].into(),
                        max_new_tokens: max_new,
                    }),
                    target: p.sum().to_string().into(),
                });
            }
        }
        out
    }

    /// `count` training examples, k uniform over the configured digits, none equal to an
    /// evaluation problem of the same seed.
    pub fn training(&self, count: u64) -> Result<Vec<TrainExample>, String> {
        let avoid: HashSet<Problem> = self
            .config
            .digits
            .iter()
            .flat_map(|&k| self.eval_problems(k))
            .collect();
        let mut rng = stream(self.config.seed, TRAIN, 0);
        let mut shot_rng = stream(self.config.seed, TRAIN, 1);
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let k = self.config.digits[rng.gen_range(0..self.config.digits.len())];
            let p = draw_avoiding(&mut rng, k, &avoid);
            let shots: Vec<Problem> = (0..self.config.shots)
                .map(|_| problem(&mut shot_rng, k))
                .collect();
            out.push(TrainExample {
                prompt: self.prompt(&shots, &p).into(),
                completion: format!(" {}\n", p.sum()).into(),
                group: format!("k={k}").into(),
            });
        }
        Ok(out)
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

impl Task for Addition {
    fn eval_instances(&self) -> RResult<RVec<Instance>, RString> {
        guard(NAME, || Ok(self.instances().into()))
    }

    fn default_metrics(&self) -> RVec<RString> {
        ["exact-match", "digit-accuracy", "levenshtein"]
            .iter()
            .map(|s| RString::from(*s))
            .collect()
    }

    fn resolved_options(&self) -> RString {
        self.config.to_toml().into()
    }

    fn train_examples(&self, count: u64) -> RResult<RVec<TrainExample>, RString> {
        guard(NAME, || self.training(count).map(RVec::from))
    }
}

extern "C" fn manifest() -> RVec<PluginInfo> {
    RVec::from(vec![PluginInfo {
        kind: PluginKind::Task,
        name: NAME.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "k-digit addition, k-shot prompts of the paper's Listing 4 (options: digits, n, shots, seed, fewshot)".into(),
    }])
}

extern "C" fn new_task(name: RStr<'_>, options: RStr<'_>) -> RResult<TaskBox, RString> {
    if name.as_str() != NAME {
        return not_provided(PluginKind::Task, name);
    }
    guard(NAME, || {
        let config = Config::from_toml(options.as_str())?;
        Ok(Task_TO::from_value(Addition::new(config), TD_Opaque))
    })
}

extern "C" fn new_metric(name: RStr<'_>, _options: RStr<'_>) -> RResult<MetricBox, RString> {
    not_provided(PluginKind::Metric, name)
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
        let inst = t.instances();
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
        assert_eq!(task("seed = 7").instances(), task("seed = 7").instances());
        assert_ne!(task("seed = 7").instances(), task("seed = 8").instances());
    }

    #[test]
    fn shots_have_the_same_k_and_are_not_the_question() {
        let t = task("digits = \"5\"\nn = 50");
        for inst in t.instances() {
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
}
