//! The cells of a study (each training and each evaluation), where each lives, whether it is
//! done, and running one through `train` and `eval`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use toml::{Table, Value};

use crate::cli::{EvalArgs, TrainArgs};
use crate::registry::Registry;
use crate::run_dir::{self, write_atomic};
use crate::train;

use super::file::{resolve_refs, AdapterPlan, Study, VariantPlan};

/// One unit of work.
#[derive(Debug, Clone)]
pub(super) enum Cell {
    /// The pairs a trained variant's `generate` writes, before its training.
    Generate {
        variant: String,
    },
    Train {
        variant: String,
    },
    Eval {
        eval: usize,
        variant: String,
    },
}

/// The two kinds of cell, which run at different rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Generate,
    Train,
    Eval,
}

impl Kind {
    /// Seconds per unit of work before any cell of the kind has been timed: about what a
    /// 2-core CPU takes with the default model (an addition problem; a training example).
    fn prior_seconds(self) -> f64 {
        match self {
            Kind::Eval => 0.35,
            Kind::Train => 1.8,
            // Per generation run: the answer-key teacher over one subject, about 30 s.
            Kind::Generate => 30.0,
        }
    }
}

/// Seconds per unit of work, measured per kind as cells finish.
#[derive(Debug, Default)]
pub(super) struct Rates {
    measured: Vec<(Kind, f64, f64)>,
}

impl Rates {
    pub(super) fn record(&mut self, kind: Kind, units: f64, seconds: f64) {
        self.measured.push((kind, units, seconds));
    }

    /// Seconds left for `work`: measured rates where a cell of the kind ran, the prior else.
    pub(super) fn seconds(&self, work: &[(Kind, f64)]) -> f64 {
        work.iter()
            .map(|&(kind, units)| {
                let (u, s) = self
                    .measured
                    .iter()
                    .filter(|m| m.0 == kind)
                    .fold((0.0, 0.0), |(u, s), m| (u + m.1, s + m.2));
                let rate = if u > 0.0 { s / u } else { kind.prior_seconds() };
                units * rate
            })
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Done,
    /// Started and stopped: resumed from its checkpoint or its samples.
    Partial,
    Todo,
}

impl Status {
    pub(super) fn word(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Partial => "partial (resumes)",
            Status::Todo => "to do",
        }
    }
}

const CELL_TOML: &str = "cell.toml";

impl Study {
    pub(super) fn variant(&self, name: &str) -> &VariantPlan {
        &self
            .variants
            .iter()
            .find(|(n, _)| n == name)
            .expect("checked at load")
            .1
    }

    pub(super) fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for (name, v) in &self.variants {
            let used = self
                .evals
                .iter()
                .any(|e| e.variants.contains(name) || e.refs.contains(name));
            if used
                && matches!(
                    v.adapter,
                    AdapterPlan::Train {
                        generate: Some(_),
                        ..
                    }
                )
            {
                cells.push(Cell::Generate {
                    variant: name.clone(),
                });
            }
            if used && matches!(v.adapter, AdapterPlan::Train { .. }) {
                cells.push(Cell::Train {
                    variant: name.clone(),
                });
            }
        }
        for (i, e) in self.evals.iter().enumerate() {
            for v in &e.variants {
                cells.push(Cell::Eval {
                    eval: i,
                    variant: v.clone(),
                });
            }
        }
        cells
    }

    pub(super) fn cell_dir(&self, cell: &Cell) -> PathBuf {
        match cell {
            Cell::Generate { variant } => self.out.join("data").join(variant),
            Cell::Train { variant } => self.out.join("adapters").join(variant),
            Cell::Eval { eval, variant } => self
                .out
                .join("runs")
                .join(&self.evals[*eval].name)
                .join(variant),
        }
    }

    pub(super) fn cell_name(&self, cell: &Cell) -> String {
        match cell {
            Cell::Generate { variant } => format!("generate {variant}"),
            Cell::Train { variant } => format!("train {variant}"),
            Cell::Eval { eval, variant } => {
                format!("eval {} on {variant}", self.evals[*eval].name)
            }
        }
    }

    /// What a cell is made from, as TOML: the model (path and sha256), backend and device, and
    /// for a training its config (and its data's sha256), for an evaluation the task, options,
    /// metrics, batch and what the variant (and any variant an option refers to) is made from.
    /// A cell whose folder records another definition is stale.
    pub(super) fn definition(&self, cell: &Cell) -> String {
        let mut t = Table::new();
        t.insert(
            "model".into(),
            Value::String(self.model.display().to_string()),
        );
        t.insert(
            "model_sha256".into(),
            Value::String(self.model_sha256.clone()),
        );
        t.insert("backend".into(), Value::String(self.backend.clone()));
        if let Some(d) = &self.device {
            t.insert("device".into(), Value::String(d.clone()));
        }
        match cell {
            Cell::Generate { variant } | Cell::Train { variant } => {
                t.insert(
                    "variant".into(),
                    Value::Table(self.variant(variant).fingerprint.clone()),
                );
            }
            Cell::Eval { eval, variant } => {
                let e = &self.evals[*eval];
                t.insert("task".into(), Value::String(e.task.clone()));
                t.insert("options".into(), Value::Table(e.options.clone()));
                t.insert(
                    "metrics".into(),
                    Value::Array(e.metrics.iter().cloned().map(Value::String).collect()),
                );
                t.insert(
                    "backend_options".into(),
                    Value::Table(e.backend_options.clone()),
                );
                t.insert("batch".into(), Value::Integer(e.batch as i64));
                t.insert(
                    "variant".into(),
                    Value::Table(self.variant(variant).fingerprint.clone()),
                );
                let mut refs = Table::new();
                for r in &e.refs {
                    refs.insert(r.clone(), Value::Table(self.variant(r).fingerprint.clone()));
                }
                if !refs.is_empty() {
                    t.insert("refers_to".into(), Value::Table(refs));
                }
            }
        }
        t.to_string()
    }

    pub(super) fn status(&self, cell: &Cell) -> Result<Status> {
        let dir = self.cell_dir(cell);
        if let Ok(recorded) = std::fs::read_to_string(dir.join(CELL_TOML)) {
            if recorded != self.definition(cell) {
                bail!(
                    "{} was made from another definition of {} than {} now gives; delete that folder to redo it, or pass --out to start the study elsewhere",
                    dir.display(),
                    self.cell_name(cell),
                    self.file.display()
                );
            }
        }
        Ok(match cell {
            // Written atomically, the pairs last: there is no partial generation.
            Cell::Generate { .. } => {
                if dir.join("pairs.jsonl").is_file() {
                    Status::Done
                } else {
                    Status::Todo
                }
            }
            Cell::Train { .. } => {
                let finished = std::fs::read_to_string(dir.join("train.toml"))
                    .ok()
                    .and_then(|t| t.parse::<Table>().ok())
                    .and_then(|t| {
                        t.get("summary")?
                            .get("stopped_early")
                            .and_then(Value::as_bool)
                    })
                    == Some(false);
                let adapter = dir.join("adapter_model.safetensors").is_file();
                if finished && adapter {
                    Status::Done
                } else if dir.join("optimizer.safetensors").is_file() {
                    Status::Partial
                } else if adapter {
                    // Killed between saving the last adapter and recording the run.
                    bail!(
                        "{} holds an adapter but no record that its training finished, and no checkpoint to resume; delete that folder to train {} again",
                        dir.display(),
                        self.cell_name(cell)
                    );
                } else {
                    Status::Todo
                }
            }
            Cell::Eval { .. } => {
                if dir.join(run_dir::RESULTS).is_file() {
                    Status::Done
                } else if dir.join(run_dir::RUN_TOML).is_file() {
                    Status::Partial
                } else {
                    Status::Todo
                }
            }
        })
    }

    /// Records the definition of a finished cell that has none (made by an older harness, or by
    /// hand with the same settings), so that later edits of the study file are caught.
    pub(super) fn adopt(&self, cell: &Cell) -> Result<()> {
        let path = self.cell_dir(cell).join(CELL_TOML);
        if !path.exists() {
            write_atomic(&path, self.definition(cell).as_bytes())?;
        }
        Ok(())
    }

    /// How much work a cell is: instances for an evaluation, examples times epochs for a
    /// training (the estimate of the time left multiplies these by measured rates).
    pub(super) fn work(&self, cell: &Cell) -> (Kind, f64) {
        match cell {
            Cell::Eval { eval, .. } => (Kind::Eval, self.evals[*eval].instances as f64),
            Cell::Generate { .. } => (Kind::Generate, 1.0),
            Cell::Train { variant } => {
                let AdapterPlan::Train { config, .. } = &self.variant(variant).adapter else {
                    unreachable!("train cells are made for trained variants only")
                };
                let examples = config
                    .get("examples")
                    .and_then(Value::as_integer)
                    .unwrap_or(1000);
                let epochs = config
                    .get("train")
                    .and_then(|t| t.get("epochs"))
                    .and_then(Value::as_integer)
                    .unwrap_or(1);
                (Kind::Train, (examples * epochs) as f64)
            }
        }
    }

    pub(super) fn run_cell(&self, reg: &Registry, cell: &Cell, status: Status) -> Result<()> {
        let dir = self.cell_dir(cell);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(&dir.join(CELL_TOML), self.definition(cell).as_bytes())?;
        let command = format!("harness study {}", self.file.display());
        match cell {
            Cell::Generate { variant } => {
                let AdapterPlan::Train {
                    generate: Some(g), ..
                } = &self.variant(variant).adapter
                else {
                    unreachable!("generate cells are made for variants that generate")
                };
                crate::generate::run(reg, &g.args, command)
            }
            Cell::Train { variant } => {
                if status == Status::Partial {
                    let args = TrainArgs {
                        resume: Some(dir),
                        ..TrainArgs::default()
                    };
                    return train::run(reg, &args, command);
                }
                let AdapterPlan::Train { config, .. } = &self.variant(variant).adapter else {
                    unreachable!("train cells are made for trained variants only")
                };
                let args = TrainArgs {
                    out: Some(dir),
                    model: Some(self.model.clone()),
                    backend: Some(self.backend.clone()),
                    device: self.device.clone(),
                    ..TrainArgs::default()
                };
                let plan = crate::plan::train::plan_with(config, &args)?;
                train::execute(reg, plan, false, command)
            }
            Cell::Eval { eval, variant } => {
                let plan = if status == Status::Partial {
                    crate::plan::from_args(&EvalArgs {
                        resume: Some(dir),
                        backend: self.backend.clone(),
                        batch: 8,
                        ..EvalArgs::default()
                    })?
                } else {
                    let e = &self.evals[*eval];
                    let v = self.variant(variant);
                    let pairs = |t: &Table| -> Vec<String> {
                        t.iter().map(|(k, v)| format!("{k}={v}")).collect()
                    };
                    let folders: BTreeMap<String, PathBuf> = e
                        .refs
                        .iter()
                        .filter_map(|r| {
                            let dir = self.variant(r).adapter_dir()?;
                            Some((r.clone(), dir.to_path_buf()))
                        })
                        .collect();
                    let options = resolve_refs(&e.options, &folders);
                    crate::plan::from_args(&EvalArgs {
                        task: Some(e.task.clone()),
                        metrics: e.metrics.clone(),
                        backend: self.backend.clone(),
                        model: Some(self.model.clone()),
                        adapter: v.adapter_dir().map(Path::to_path_buf),
                        base: Some(v.base.clone()),
                        device: self.device.clone(),
                        options: pairs(&options),
                        backend_options: pairs(&e.backend_options),
                        batch: e.batch,
                        out: Some(dir),
                        label: Some(v.label.clone()),
                        ..EvalArgs::default()
                    })?
                };
                crate::eval::run(reg, plan, command)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_uses_measured_rates_per_kind() {
        let mut r = Rates::default();
        let work = [(Kind::Train, 100.0), (Kind::Eval, 10.0)];
        assert!((r.seconds(&work) - (180.0 + 3.5)).abs() < 1e-9);
        r.record(Kind::Eval, 20.0, 40.0);
        assert!((r.seconds(&work) - (180.0 + 20.0)).abs() < 1e-9);
        r.record(Kind::Train, 10.0, 5.0);
        assert!((r.seconds(&work) - (50.0 + 20.0)).abs() < 1e-9);
    }
}
