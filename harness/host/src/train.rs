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
use crate::plan::train::{self as plan, TrainPlan};
use crate::plan::{training_base, BackendFlags};
use crate::registry::Registry;
use crate::run_dir::{self, write_atomic};

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
        Some(dir) => plan::resume(dir, args)?,
        None => plan::from_args(args)?,
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
    let mut backend_opts = BackendFlags {
        model: Some(&model),
        base: Some(training_base(&p.train)),
        device: p.device.as_deref(),
        ..BackendFlags::default()
    }
    .table();
    // The base is quantized as the training run says.
    if let Some(dq) = p.train.get("double_quant") {
        backend_opts.insert("double_quant".into(), dq.clone());
    }
    let backend_opts = backend_opts.to_string();
    // Loaded before the run is announced, so that a base the backend refuses is the only line.
    let (_, mut backend) = reg.backend(&p.backend, &backend_opts)?;
    println!(
        "{} on {} examples -> {}",
        if resumed { "resume training" } else { "train" },
        examples.len(),
        p.out.display()
    );
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
    // What the run reads, with sha256s, so that `--resume` refuses changed inputs.
    let model_sha = run_dir::sha256_path(&model)?;
    let mut model_t = Table::new();
    model_t.insert("path".into(), Value::String(model.display().to_string()));
    model_t.insert("sha256".into(), Value::String(model_sha.clone()));
    record.insert("model".into(), Value::Table(model_t.clone()));
    if let Some(d) = &p.data {
        record.insert("data".into(), Value::String(d.display().to_string()));
        record.insert(
            "data_sha256".into(),
            Value::String(run_dir::sha256_path(d)?),
        );
    }
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
    model_t.insert("name".into(), Value::String(info.name.to_string()));
    model_t.insert("path".into(), Value::String(info.path.to_string()));
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
        #![proptest_config(crate::proptest_config(1000))]

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
