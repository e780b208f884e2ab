//! The plan of `harness train`: a training config's values first, flags on top, paths made
//! absolute; recorded as train.toml's `[plan]`, from which `--resume` rebuilds it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use toml::{Table, Value};

use super::insert_pair;
use crate::cli::TrainArgs;

/// A training plan: file values first, flags on top.
pub(crate) struct TrainPlan {
    pub(crate) task: Option<String>,
    pub(crate) task_options: Table,
    pub(crate) examples: Option<u64>,
    pub(crate) data: Option<PathBuf>,
    pub(crate) out: PathBuf,
    pub(crate) model: Option<PathBuf>,
    pub(crate) backend: String,
    pub(crate) device: Option<String>,
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

    pub(crate) fn from_table(t: &Table, origin: &Path) -> Result<TrainPlan> {
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
pub(crate) fn resume(dir: &Path, args: &TrainArgs) -> Result<TrainPlan> {
    let given = args.config.is_some()
        || args.task.is_some()
        || args.examples.is_some()
        || args.data.is_some()
        || args.out.is_some()
        || args.model.is_some()
        || args.backend.is_some()
        || args.device.is_some()
        || !args.task_flags.given().is_empty()
        || !args.options.is_empty()
        || args.base.is_some()
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
    let plan = TrainPlan {
        out: dir.to_path_buf(),
        ..plan
    };
    check_unchanged(&record, &plan)?;
    Ok(plan)
}

/// A stopped run continues on the inputs it started with: the model and the pairs file must
/// still have the sha256 train.toml recorded (runs of older versions recorded none).
fn check_unchanged(record: &Table, plan: &TrainPlan) -> Result<()> {
    let model = plan
        .model
        .clone()
        .unwrap_or_else(harness_abi::paths::default_model);
    let recorded_model = record
        .get("model")
        .and_then(|m| m.get("sha256"))
        .and_then(Value::as_str);
    let recorded_data = record.get("data_sha256").and_then(Value::as_str);
    let inputs = [
        ("model", Some(model), recorded_model),
        ("training data", plan.data.clone(), recorded_data),
    ];
    for (what, path, recorded) in inputs {
        if let (Some(path), Some(recorded)) = (path, recorded) {
            crate::run_dir::check_unchanged(what, &path, recorded)?;
        }
    }
    Ok(())
}

pub(crate) fn from_args(args: &TrainArgs) -> Result<TrainPlan> {
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
    for (_, key, value) in args.task_flags.given() {
        task_options.insert(key.to_string(), value);
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
    put("base", args.base.clone().map(Value::String));
    put("r", args.r.map(|x| Value::Integer(x as i64)));
    put("alpha", args.alpha.map(Value::Float));
    put("lr", args.lr.map(Value::Float));
    put("epochs", args.epochs.map(|x| Value::Integer(x as i64)));
    put(
        "micro_batch",
        args.micro_batch.map(|x| Value::Integer(x as i64)),
    );
    put(
        "seed",
        args.task_flags.seed.map(|x| Value::Integer(x as i64)),
    );
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
