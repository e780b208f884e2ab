//! Turning raw eval arguments into a typed plan before any work starts: option tables for the
//! task and the backend, the metric list, the run folder. A resumed run takes its plan from the
//! run folder's run.toml instead, so it repeats exactly what the interrupted run did.

use std::path::PathBuf;

use anyhow::{bail, Result};
use toml::{Table, Value};

use super::{insert_pair, BackendFlags};
use crate::cli::EvalArgs;
use crate::run_dir::{self, RunRecord};

/// What an eval will do.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    pub task: String,
    /// TOML handed to the task plugin.
    pub task_options: String,
    /// Empty: the task's default metrics.
    pub metrics: Vec<String>,
    pub backend: String,
    /// TOML handed to the backend plugin.
    pub backend_options: String,
    pub batch: usize,
    pub run_dir: PathBuf,
    /// What reports call the run.
    pub label: Option<String>,
    /// The `--adapter` folder, absolute (recorded with its sha256).
    pub adapter: Option<PathBuf>,
    /// The shard this run evaluates, if any.
    pub shard: Option<Shard>,
    /// Wrap every prompt in the model's chat template.
    pub chat_template: bool,
    /// Present when resuming: what the interrupted run recorded.
    pub resumed: Option<RunRecord>,
}

/// One of N shards of an eval: the instances whose position in the task's order is I-1
/// modulo N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 1-based.
    pub index: u64,
    pub count: u64,
}

impl Shard {
    /// `I/N` with 1 <= I <= N.
    pub fn parse(text: &str) -> Result<Self> {
        let bad =
            || anyhow::anyhow!("--shard expects I/N with 1 <= I <= N (e.g. 3/16), got `{text}`");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// Whether the instance at `position` (0-based, in the task's order) is in this shard.
    pub fn holds(&self, position: usize) -> bool {
        position as u64 % self.count == self.index - 1
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Builds the plan of a new eval.
pub fn from_args(args: &EvalArgs) -> Result<EvalPlan> {
    if let Some(dir) = &args.resume {
        return resume(args, dir);
    }
    let task = args
        .task
        .clone()
        .expect("clap requires --task without --resume");
    let mut t = Table::new();
    for (_, key, value) in args.task_flags.given() {
        t.insert(key.to_string(), value);
    }
    if let Some(p) = &args.data {
        t.insert("data".into(), Value::String(p.display().to_string()));
    }
    for pair in &args.options {
        insert_pair(&mut t, pair, "--option")?;
    }

    if args.model.is_none() {
        let default = harness_abi::paths::default_model();
        if !default.exists() && args.backend == "candle" {
            bail!(
                "no --model given and the default model is not cached at {}; run `harness fetch` first (or pass --model FILE.gguf)",
                default.display()
            );
        }
    }
    let mut adapter_dir = None;
    if let Some(adapter) = &args.adapter {
        if !adapter.join("adapter_config.json").is_file() {
            bail!(
                "--adapter {}: no adapter_config.json there; an adapter folder holds adapter_config.json and adapter_model.safetensors",
                adapter.display()
            );
        }
        // Recorded absolute, so that reports find the adapter's record and loss curve from
        // any folder.
        adapter_dir = Some(std::path::absolute(adapter).unwrap_or_else(|_| adapter.clone()));
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let mut b = BackendFlags {
        model: args.model.as_deref(),
        adapter: adapter_dir.as_deref(),
        base: args.base.as_deref(),
        compute: args.compute.as_deref(),
        device: args.device.as_deref(),
        max_batch: Some(args.batch),
    }
    .table();
    for pair in &args.backend_options {
        insert_pair(&mut b, pair, "--backend-option")?;
    }
    let run_dir = args
        .out
        .clone()
        .unwrap_or_else(|| run_dir::new_run_dir(&task));
    if run_dir.join(run_dir::SAMPLES).exists() || run_dir.join(run_dir::RUN_TOML).exists() {
        bail!(
            "{} already holds a run; finish it with `harness eval --resume {}` or choose another --out",
            run_dir.display(),
            run_dir.display()
        );
    }
    Ok(EvalPlan {
        task,
        task_options: t.to_string(),
        metrics: args
            .metrics
            .iter()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect(),
        backend: args.backend.clone(),
        backend_options: b.to_string(),
        batch: args.batch as usize,
        run_dir,
        label: args.label.clone(),
        adapter: adapter_dir,
        shard: args.shard.as_deref().map(Shard::parse).transpose()?,
        chat_template: args.chat_template,
        resumed: None,
    })
}

fn resume(args: &EvalArgs, dir: &std::path::Path) -> Result<EvalPlan> {
    let given = [
        ("--task", args.task.is_some()),
        ("--metric", !args.metrics.is_empty()),
        ("--model", args.model.is_some()),
        ("--adapter", args.adapter.is_some()),
        ("--base", args.base.is_some()),
        ("--compute", args.compute.is_some()),
        ("--device", args.device.is_some()),
        ("--data", args.data.is_some()),
        ("--option", !args.options.is_empty()),
        ("--backend-option", !args.backend_options.is_empty()),
    ];
    let mut clash: Vec<&str> = args.task_flags.given().iter().map(|(f, _, _)| *f).collect();
    clash.extend(given.iter().filter(|(_, g)| *g).map(|(f, _)| *f));
    if !clash.is_empty() {
        bail!(
            "--resume repeats the run recorded in {}/run.toml; drop {}",
            dir.display(),
            clash.join(", ")
        );
    }
    let record = RunRecord::read(dir)?;
    Ok(EvalPlan {
        task: record.task.name.clone(),
        task_options: record.task.options.clone(),
        metrics: record.metrics.iter().map(|m| m.name.clone()).collect(),
        backend: record.backend.name.clone(),
        backend_options: record.backend.options.clone(),
        batch: record.batch as usize,
        run_dir: dir.to_path_buf(),
        label: record.label.clone(),
        adapter: record.model.adapter.as_ref().map(PathBuf::from),
        shard: record.shard.as_deref().map(Shard::parse).transpose()?,
        chat_template: record.chat_template,
        resumed: Some(record),
    })
}
