//! `harness train`: examples from a task or a JSONL file, the backend trains LoRA adapters on its
//! frozen NF4 base, the adapter is saved in PEFT layout with the loss curve beside it.
//!
//! Ctrl-C stops after the current optimiser step and saves the adapter trained so far (marked as
//! stopped early in train.toml).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use harness_abi::abi_stable::std_types::{RStr, RVec};
use harness_abi::{PluginKind, ProgressSink, ProgressSink_TO, TD_Opaque, TrainExample, TrainStep};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use toml::{Table, Value};

use crate::cli::TrainArgs;
use crate::plan::insert_pair;
use crate::registry::Registry;
use crate::run_dir::{self, write_atomic};

/// A training plan: file values first, flags on top.
pub(crate) struct TrainPlan {
    pub(crate) task: Option<String>,
    pub(crate) task_options: Table,
    examples: Option<u64>,
    pub(crate) data: Option<PathBuf>,
    out: PathBuf,
    model: Option<PathBuf>,
    pub(crate) backend: String,
    device: Option<String>,
    pub(crate) train: Table,
}

impl TrainPlan {
    /// The plan as train.toml's `[plan]` table, from which `--resume` rebuilds it.
    pub(crate) fn to_table(&self) -> Table {
        let mut t = Table::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                t.insert(k.into(), v);
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| Value::String(p.display().to_string()));
        put("task", self.task.clone().map(Value::String));
        put(
            "task_options",
            Some(Value::Table(self.task_options.clone())),
        );
        put("examples", self.examples.map(|n| Value::Integer(n as i64)));
        put("data", path(&self.data));
        put("out", Some(Value::String(self.out.display().to_string())));
        put("model", path(&self.model));
        put("backend", Some(Value::String(self.backend.clone())));
        put("device", self.device.clone().map(Value::String));
        put("train", Some(Value::Table(self.train.clone())));
        t
    }

    fn from_table(t: &Table, origin: &Path) -> Result<TrainPlan> {
        let bad = |k: &str| anyhow!("{}: `plan.{k}` is missing or malformed", origin.display());
        let string = |k: &str| t.get(k).and_then(Value::as_str).map(str::to_string);
        let table = |k: &str| match t.get(k) {
            Some(Value::Table(x)) => Ok(x.clone()),
            _ => Err(bad(k)),
        };
        Ok(TrainPlan {
            task: string("task"),
            task_options: table("task_options")?,
            examples: t
                .get("examples")
                .and_then(Value::as_integer)
                .map(|n| n as u64),
            data: string("data").map(PathBuf::from),
            out: string("out").map(PathBuf::from).ok_or_else(|| bad("out"))?,
            model: string("model").map(PathBuf::from),
            backend: string("backend").ok_or_else(|| bad("backend"))?,
            device: string("device"),
            train: table("train")?,
        })
    }
}

/// The plan of the stopped run in `dir`, from its train.toml. Where its checkpoint stands is the
/// backend's business: it reads its own checkpoint and reports steps from there on.
fn resume_plan(dir: &Path, args: &TrainArgs) -> Result<TrainPlan> {
    let given = args.config.is_some()
        || args.task.is_some()
        || args.examples.is_some()
        || args.data.is_some()
        || args.out.is_some()
        || args.model.is_some()
        || args.backend.is_some()
        || args.device.is_some()
        || args.digits.is_some()
        || args.seed.is_some()
        || !args.options.is_empty()
        || args.r.is_some()
        || args.alpha.is_some()
        || args.lr.is_some()
        || args.epochs.is_some()
        || args.micro_batch.is_some()
        || !args.train_options.is_empty();
    if given {
        bail!("--resume continues a run with the settings in its train.toml; give no other training option");
    }
    let path = dir.join("train.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}; is {} a training run's --out folder?",
            path.display(),
            dir.display()
        )
    })?;
    let record = text
        .parse::<Table>()
        .map_err(|e| anyhow!("{} is not valid TOML: {}", path.display(), e.message()))?;
    let plan = match record.get("plan") {
        Some(Value::Table(t)) => TrainPlan::from_table(t, &path)?,
        _ => bail!(
            "{} has no [plan]; it was written by an older harness and cannot be resumed",
            path.display()
        ),
    };
    let finished = record
        .get("summary")
        .and_then(Value::as_table)
        .and_then(|s| s.get("stopped_early"))
        .and_then(Value::as_bool)
        == Some(false);
    if finished {
        bail!(
            "the run in {} finished; there is nothing to resume",
            dir.display()
        );
    }
    Ok(TrainPlan {
        out: dir.to_path_buf(),
        ..plan
    })
}

fn plan(args: &TrainArgs) -> Result<TrainPlan> {
    let mut file = Table::new();
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        file = text
            .parse::<Table>()
            .map_err(|e| anyhow!("{} is not valid TOML: {}", path.display(), e.message()))?;
        check_config_keys(&file).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    plan_with(&file, args)
}

/// The keys of a training config (`harness train --config`, a study's `train` table).
pub(crate) const CONFIG_KEYS: [&str; 9] = [
    "task",
    "examples",
    "data",
    "model",
    "out",
    "backend",
    "device",
    "task_options",
    "train",
];

pub(crate) fn check_config_keys(file: &Table) -> Result<()> {
    for key in file.keys() {
        if !CONFIG_KEYS.contains(&key.as_str()) {
            bail!(
                "unknown key `{key}`; valid keys are {}",
                CONFIG_KEYS.join(", ")
            );
        }
    }
    Ok(())
}

/// A plan from config values (`file`) with flags (`args`) on top; checks that the examples'
/// source is given and that `out` holds no finished or stopped run.
pub(crate) fn plan_with(file: &Table, args: &TrainArgs) -> Result<TrainPlan> {
    let text = |key: &str| -> Result<Option<String>> {
        match file.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => bail!("config key `{key}` must be a string, got {other}"),
        }
    };
    let table = |key: &str| -> Result<Table> {
        match file.get(key) {
            None => Ok(Table::new()),
            Some(Value::Table(t)) => Ok(t.clone()),
            Some(other) => bail!("config key `{key}` must be a table, got {other}"),
        }
    };
    let mut task_options = table("task_options")?;
    if let Some(d) = &args.digits {
        task_options.insert("digits".into(), Value::String(d.clone()));
    }
    if let Some(s) = args.seed {
        task_options.insert("seed".into(), Value::Integer(s as i64));
    }
    for pair in &args.options {
        insert_pair(&mut task_options, pair, "--option")?;
    }
    let mut train = table("train")?;
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            train.insert(k.to_string(), v);
        }
    };
    put("r", args.r.map(|x| Value::Integer(x as i64)));
    put("alpha", args.alpha.map(Value::Float));
    put("lr", args.lr.map(Value::Float));
    put("epochs", args.epochs.map(|x| Value::Integer(x as i64)));
    put(
        "micro_batch",
        args.micro_batch.map(|x| Value::Integer(x as i64)),
    );
    put("seed", args.seed.map(|x| Value::Integer(x as i64)));
    for pair in &args.train_options {
        insert_pair(&mut train, pair, "--train-option")?;
    }
    let examples = match (args.examples, file.get("examples")) {
        (Some(n), _) => Some(n),
        (None, Some(Value::Integer(n))) if *n > 0 => Some(*n as u64),
        (None, Some(other)) => {
            bail!("config key `examples` must be a positive integer, got {other}")
        }
        (None, None) => None,
    };
    let out = args
        .out
        .clone()
        .or(text("out")?.map(PathBuf::from))
        .ok_or_else(|| {
            anyhow!("say where the adapter goes with --out DIR (or `out` in the config file)")
        })?;
    if out.join("adapter_model.safetensors").exists() {
        if out.join("optimizer.safetensors").exists() {
            bail!(
                "{} holds a stopped run; continue it with `harness train --resume {}`, or choose another --out",
                out.display(),
                out.display()
            );
        }
        bail!(
            "{} already holds an adapter; choose another --out or remove it",
            out.display()
        );
    }
    // Recorded absolute, so that `harness train --resume` works from any folder.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let p = TrainPlan {
        task: args.task.clone().or(text("task")?),
        task_options,
        examples,
        data: args
            .data
            .clone()
            .or(text("data")?.map(PathBuf::from))
            .map(absolute),
        out: absolute(out),
        model: args
            .model
            .clone()
            .or(text("model")?.map(PathBuf::from))
            .map(absolute),
        backend: args
            .backend
            .clone()
            .or(text("backend")?)
            .unwrap_or_else(|| "candle".into()),
        device: args.device.clone().or(text("device")?),
        train,
    };
    if p.task.is_none() && p.data.is_none() {
        bail!("give the examples: --task NAME --examples N, or --data PAIRS.jsonl");
    }
    if p.data.is_none() && p.examples.is_none() {
        bail!("say how many examples the task should make with --examples N");
    }
    Ok(p)
}

/// Reads {"prompt", "completion"} pairs, one JSON object per line.
pub fn read_pairs(path: &Path) -> Result<Vec<TrainExample>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}: not valid JSON: {e}", at()))?;
        let field = |k: &str| -> Result<String> {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{}: missing string field `{k}`", at()))
        };
        out.push(TrainExample {
            prompt: field("prompt")?.into(),
            completion: field("completion")?.into(),
            group: v
                .get("group")
                .and_then(|g| g.as_str())
                .unwrap_or("all")
                .into(),
        });
    }
    if out.is_empty() {
        bail!("{} holds no examples", path.display());
    }
    Ok(out)
}

/// The host's end of training progress: a progress bar, the loss curve (appended to train.csv
/// and flushed at every step, so a killed run keeps it), and Ctrl-C.
struct Sink {
    bar: ProgressBar,
    steps: Arc<Mutex<Vec<TrainStep>>>,
    csv_path: PathBuf,
    /// Open for appending once the first step is known (a resumed run first drops the rows the
    /// checkpoint does not hold).
    csv: Option<std::fs::File>,
    start: Instant,
    tokens: u64,
}

impl ProgressSink for Sink {
    fn report(&mut self, step: TrainStep) -> bool {
        use std::io::Write;
        // A failed write must not stop training; the adapter matters more than the curve.
        if self.csv.is_none() {
            match open_curve(&self.csv_path, step.step) {
                Ok(f) => self.csv = Some(f),
                Err(e) => self.bar.println(format!("warning: {e:#}")),
            }
        }
        let written = self.csv.as_mut().map(|f| {
            f.write_all(curve_row(&step).as_bytes())
                .and_then(|_| f.flush())
        });
        if let Some(Err(e)) = written {
            self.bar
                .println(format!("warning: cannot append to train.csv: {e}"));
        }
        self.tokens += step.tokens;
        let rate = self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_length(step.total_steps);
        self.bar.set_position(step.step);
        self.bar
            .set_message(format!("loss {:.4}  {:.0} tok/s", step.loss, rate));
        if let Ok(mut s) = self.steps.lock() {
            s.push(step);
        }
        !crate::interrupt::requested()
    }
}

pub fn run(reg: &Registry, args: &TrainArgs, command_line: String) -> Result<()> {
    let resumed = args.resume.is_some();
    let p = match &args.resume {
        Some(dir) => resume_plan(dir, args)?,
        None => plan(args)?,
    };
    execute(reg, p, resumed, command_line)
}

/// Trains as planned (continuing the checkpoint in `p.out` when `resumed`).
pub(crate) fn execute(
    reg: &Registry,
    p: TrainPlan,
    resumed: bool,
    command_line: String,
) -> Result<()> {
    // The training options are the backend's to check, and it checks them before any model
    // is loaded: a typo costs no load time.
    let train_opts = train_options(&p, resumed);
    reg.check_train_options(&p.backend, &train_opts)?;
    let mut task_record = None;
    let examples: Vec<TrainExample> = match &p.data {
        Some(path) => read_pairs(path)?,
        None => {
            let name = p.task.clone().expect("checked in plan");
            let (entry, task) = reg.task(&name, &p.task_options.to_string())?;
            let n = p.examples.expect("checked in plan");
            let ex = entry.outcome(task.train_examples(n))?;
            task_record = Some(entry.component(entry.outcome(task.resolved_options())?.into())?);
            ex.into_iter().collect()
        }
    };
    let backend_entry = reg.get(PluginKind::Backend, &p.backend)?;
    let model = p
        .model
        .clone()
        .unwrap_or_else(harness_abi::paths::default_model);
    if !model.exists() {
        bail!(
            "model {} not found; run `harness fetch` for the default model or pass --model",
            model.display()
        );
    }
    let mut backend_opts = Table::new();
    backend_opts.insert("model".into(), Value::String(model.display().to_string()));
    // The QLoRA base: projections packed to NF4 as they are read, never all in f32 at once.
    backend_opts.insert("base".into(), Value::String("nf4-packed".into()));
    if let Some(device) = &p.device {
        backend_opts.insert("device".into(), Value::String(device.clone()));
    }
    if let Some(dq) = p.train.get("double_quant") {
        backend_opts.insert("double_quant".into(), dq.clone());
    }
    let backend_opts = backend_opts.to_string();
    println!(
        "{} on {} examples -> {}",
        if resumed { "resume training" } else { "train" },
        examples.len(),
        p.out.display()
    );
    let (_, mut backend) = reg.backend(&p.backend, &backend_opts)?;
    let info = backend_entry.outcome(backend.info())?;

    crate::interrupt::install();
    let bar = if std::io::stdout().is_terminal() {
        let b = ProgressBar::new(1);
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] step {pos}/{len}  {msg}  ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let steps = Arc::new(Mutex::new(Vec::new()));
    std::fs::create_dir_all(&p.out)
        .with_context(|| format!("cannot create {}", p.out.display()))?;
    let (_, created) = run_dir::utc_now();
    let mut record = toml::toml! {
        harness_version = (env!("CARGO_PKG_VERSION"))
        created_utc = created
        command = command_line
    };
    record.insert("plan".into(), Value::Table(p.to_table()));
    // Written before training too, so that the folder says what it is while it fills.
    write_atomic(
        &p.out.join("train.toml"),
        toml::to_string(&record)?.as_bytes(),
    )?;
    if !resumed {
        // A fresh curve; a resumed run keeps its rows until the backend says where it stands.
        write_atomic(&p.out.join("train.csv"), CURVE_HEADER.as_bytes())?;
    }
    let sink = Sink {
        bar: bar.clone(),
        steps: steps.clone(),
        csv_path: p.out.join("train.csv"),
        csv: None,
        start: Instant::now(),
        tokens: 0,
    };
    let result = backend.train(
        RVec::from(examples),
        RStr::from(train_opts.as_str()),
        ProgressSink_TO::from_value(sink, TD_Opaque),
    );
    bar.finish_and_clear();
    let curve = steps.lock().map(|s| s.clone()).unwrap_or_default();
    let summary = match result.into_result() {
        Ok(s) => s,
        Err(e) => {
            // The parameters of the last good step are still in the backend: keep them.
            let saved = backend
                .save_adapter(RStr::from(p.out.display().to_string().as_str()))
                .is_ok();
            bail!(
                "{e}{}",
                if saved {
                    format!(
                        "; the adapter of the last good step is in {}",
                        p.out.display()
                    )
                } else {
                    String::new()
                }
            );
        }
    };
    backend_entry
        .outcome(backend.save_adapter(RStr::from(p.out.display().to_string().as_str())))?;
    if let Some(t) = task_record {
        record.insert("task".into(), Value::try_from(t)?);
    }
    if let Some(d) = &p.data {
        record.insert("data".into(), Value::String(d.display().to_string()));
        record.insert(
            "data_sha256".into(),
            Value::String(run_dir::sha256_path(d)?),
        );
    }
    let mut model_t = Table::new();
    model_t.insert("name".into(), Value::String(info.name.to_string()));
    model_t.insert("path".into(), Value::String(info.path.to_string()));
    model_t.insert(
        "sha256".into(),
        Value::String(run_dir::sha256_path(Path::new(info.path.as_str()))?),
    );
    record.insert("model".into(), Value::Table(model_t));
    record.insert(
        "backend".into(),
        Value::try_from(backend_entry.component(info.resolved_options.to_string())?)?,
    );
    record.insert(
        "train_options".into(),
        Value::String(summary.resolved_options.to_string()),
    );
    let mut s = Table::new();
    s.insert("steps".into(), Value::Integer(summary.steps as i64));
    s.insert("examples".into(), Value::Integer(summary.examples as i64));
    s.insert("tokens".into(), Value::Integer(summary.tokens as i64));
    s.insert("seconds".into(), Value::Float(summary.seconds));
    s.insert("final_loss".into(), Value::Float(summary.final_loss));
    s.insert(
        "trainable_parameters".into(),
        Value::Integer(summary.trainable_parameters as i64),
    );
    s.insert(
        "stopped_early".into(),
        Value::Boolean(summary.stopped_early),
    );
    let first_step = curve.first().map_or(1, |t| t.step);
    let last_step = curve.last().map_or(first_step - 1, |t| t.step);
    s.insert("last_step".into(), Value::Integer(last_step as i64));
    if resumed {
        s.insert(
            "resumed_after_step".into(),
            Value::Integer(first_step as i64 - 1),
        );
    }
    record.insert("summary".into(), Value::Table(s));
    write_atomic(
        &p.out.join("train.toml"),
        toml::to_string(&record)?.as_bytes(),
    )?;
    println!(
        "{} steps on {} examples in {:.1} s ({:.0} tokens/s), final loss {:.4}, {} trainable parameters{}",
        summary.steps,
        summary.examples,
        summary.seconds,
        summary.tokens as f64 / summary.seconds.max(1e-9),
        summary.final_loss,
        summary.trainable_parameters,
        if summary.stopped_early { " (stopped early)" } else { "" }
    );
    if summary.stopped_early {
        println!(
            "stopped after step {last_step}: continue with `harness train --resume {}`",
            p.out.display()
        );
    } else {
        println!(
            "adapter: {} (use it with `harness eval --adapter {}`)",
            p.out.display(),
            p.out.display()
        );
    }
    Ok(())
}

/// The training options the backend gets: the plan's, with checkpoints (every `save_every`
/// steps, and on Ctrl-C) going beside the adapter, continuing from there when `resumed`.
fn train_options(p: &TrainPlan, resumed: bool) -> String {
    let mut train_table = p.train.clone();
    train_table.insert(
        "checkpoint_dir".into(),
        Value::String(p.out.display().to_string()),
    );
    if resumed {
        train_table.insert("resume".into(), Value::String(p.out.display().to_string()));
    }
    train_table.to_string()
}

const CURVE_HEADER: &str = "step,epoch,loss,lr,grad_norm,tokens\n";

/// Opens train.csv for appending before step `first` is written: rows from `first` on (left by
/// a run killed after its last checkpoint) are dropped, earlier ones kept.
fn open_curve(path: &Path, first: u64) -> Result<std::fs::File> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut kept = String::from(CURVE_HEADER);
    for line in old.lines().skip(1) {
        let n = line.split(',').next().and_then(|x| x.parse::<u64>().ok());
        if n.is_some_and(|n| n < first) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    write_atomic(path, kept.as_bytes())?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

fn curve_row(t: &TrainStep) -> String {
    format!(
        "{},{},{:.6},{:.8},{:.6},{}\n",
        t.step, t.epoch, t.loss, t.lr, t.grad_norm, t.tokens
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn case_file(name: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!("train-prop-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(format!("{}-{name}", NEXT.fetch_add(1, Ordering::SeqCst)))
    }

    const PAIR: &str = r#"{"prompt": "Q: 1+1\nA:", "completion": " 2\n", "group": "k=1"}"#;

    const PLAN: &str = "[plan]\ntask = \"addition\"\nexamples = 100\nout = \"/a\"\nbackend = \"candle\"\n[plan.task_options]\ndigits = \"1-7\"\n[plan.train]\nr = 8\n";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// A pairs file with a mutated line: examples, or one error line naming the file's line.
        #[test]
        fn mutated_training_pairs(edits in prop::collection::vec((0..PAIR.len(), any::<u8>()), 1..5)) {
            let mut line = PAIR.as_bytes().to_vec();
            for (at, b) in edits {
                line[at] = b;
            }
            let mut text = format!("{PAIR}\n").into_bytes();
            text.extend(line);
            let path = case_file("pairs.jsonl");
            std::fs::write(&path, text).unwrap();
            match read_pairs(&path) {
                Ok(ex) => prop_assert!(!ex.is_empty() && ex.len() <= 2),
                Err(e) => {
                    let line = crate::error_line(&e);
                    prop_assert!(!line.contains('\n'), "{line}");
                    prop_assert!(line.contains("pairs.jsonl"), "{line}");
                }
            }
            let _ = std::fs::remove_file(path);
        }

        /// A train.toml `[plan]` with bytes overwritten: a plan, or an error, never a panic.
        #[test]
        fn mutated_train_plan(edits in prop::collection::vec((0..PLAN.len(), any::<u8>()), 1..5)) {
            let mut bytes = PLAN.as_bytes().to_vec();
            for (at, b) in edits {
                bytes[at] = b;
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(record) = text.parse::<Table>() {
                if let Some(Value::Table(t)) = record.get("plan") {
                    if let Err(e) = TrainPlan::from_table(t, Path::new("train.toml")) {
                        let line = crate::error_line(&e);
                        prop_assert!(!line.contains('\n'), "{line}");
                    }
                }
            }
        }
    }
}
