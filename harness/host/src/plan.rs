//! Turning raw eval arguments into a typed plan before any work starts: option tables for the
//! task and the backend, the metric list, the run folder. A resumed run takes its plan from the
//! run folder's run.toml instead, so it repeats exactly what the interrupted run did.

use std::path::PathBuf;

use anyhow::{bail, Result};
use toml::{Table, Value};

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
    /// Present when resuming: what the interrupted run recorded.
    pub resumed: Option<RunRecord>,
}

/// `KEY=VALUE` into the table; VALUE is read as TOML (`3`, `true`, `"x"`), else kept as text.
pub(crate) fn insert_pair(table: &mut Table, pair: &str, flag: &str) -> Result<()> {
    let Some((key, value)) = pair.split_once('=') else {
        bail!("{flag} expects KEY=VALUE, got `{pair}`");
    };
    let key = key.trim();
    if key.is_empty() {
        bail!("{flag} expects KEY=VALUE, got `{pair}`");
    }
    let parsed = format!("v = {value}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(value.to_string()));
    table.insert(key.to_string(), parsed);
    Ok(())
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
    let mut put = |key: &str, v: Option<Value>| {
        if let Some(v) = v {
            t.insert(key.to_string(), v);
        }
    };
    put("digits", args.digits.clone().map(Value::String));
    put("n", args.n.map(|x| Value::Integer(x as i64)));
    put("shots", args.shots.map(|x| Value::Integer(x as i64)));
    put("seed", args.seed.map(|x| Value::Integer(x as i64)));
    put("subject", args.subject.clone().map(Value::String));
    put(
        "data",
        args.data
            .as_ref()
            .map(|p| Value::String(p.display().to_string())),
    );
    put("scoring", args.scoring.clone().map(Value::String));
    put("limit", args.limit.map(|x| Value::Integer(x as i64)));
    for pair in &args.options {
        insert_pair(&mut t, pair, "--option")?;
    }

    let mut b = Table::new();
    let mut adapter_dir = None;
    if let Some(model) = &args.model {
        b.insert("model".into(), Value::String(model.display().to_string()));
    } else {
        let default = harness_abi::paths::default_model();
        if !default.exists() && args.backend == "candle" {
            bail!(
                "no --model given and the default model is not cached at {}; run `harness fetch` first (or pass --model FILE.gguf)",
                default.display()
            );
        }
    }
    if let Some(adapter) = &args.adapter {
        if !adapter.join("adapter_config.json").is_file() {
            bail!(
                "--adapter {}: no adapter_config.json there; an adapter folder holds adapter_config.json and adapter_model.safetensors",
                adapter.display()
            );
        }
        // Recorded absolute, so that reports find the adapter's record and loss curve from
        // any folder.
        let adapter = std::path::absolute(adapter).unwrap_or_else(|_| adapter.clone());
        adapter_dir = Some(adapter.clone());
        b.insert(
            "adapter".into(),
            Value::String(adapter.display().to_string()),
        );
    }
    if let Some(device) = &args.device {
        b.insert("device".into(), Value::String(device.clone()));
    }
    if let Some(base) = &args.base {
        b.insert("base".into(), Value::String(base.clone()));
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    b.insert("max_batch".into(), Value::Integer(args.batch as i64));
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
        ("--device", args.device.is_some()),
        ("--digits", args.digits.is_some()),
        ("--n", args.n.is_some()),
        ("--shots", args.shots.is_some()),
        ("--seed", args.seed.is_some()),
        ("--subject", args.subject.is_some()),
        ("--data", args.data.is_some()),
        ("--scoring", args.scoring.is_some()),
        ("--limit", args.limit.is_some()),
        ("--option", !args.options.is_empty()),
        ("--backend-option", !args.backend_options.is_empty()),
    ];
    let clash: Vec<&str> = given.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect();
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
        resumed: Some(record),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_read_as_toml_or_text() {
        let mut t = Table::new();
        insert_pair(&mut t, "n=3", "--option").unwrap();
        insert_pair(&mut t, "fewshot=shared", "--option").unwrap();
        insert_pair(&mut t, "flag=true", "--option").unwrap();
        assert_eq!(t["n"], Value::Integer(3));
        assert_eq!(t["fewshot"], Value::String("shared".into()));
        assert_eq!(t["flag"], Value::Boolean(true));
        assert!(insert_pair(&mut t, "novalue", "--option")
            .unwrap_err()
            .to_string()
            .contains("expects KEY=VALUE"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any `--option` argument: a key and a value in the table, or one error line.
            #[test]
            fn any_option_argument(pair in any::<String>()) {
                let mut t = Table::new();
                match insert_pair(&mut t, &pair, "--option") {
                    Ok(()) => prop_assert_eq!(t.len(), 1),
                    Err(e) => prop_assert!(e.to_string().starts_with("--option expects KEY=VALUE")),
                }
                // What is inserted is passed on as TOML that reads back.
                prop_assert!(t.to_string().parse::<Table>().is_ok());
            }
        }
    }
}
