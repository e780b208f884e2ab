//! `harness study FILE`: one TOML file describes an experiment (the model, named variants of it,
//! evaluations, comparisons), one command runs what is missing and writes a report.
//!
//! The study folder holds every cell's folder: `adapters/<variant>` for a variant the study
//! trains, `runs/<eval>/<variant>` for each evaluation of a variant; then `figures/`,
//! `report.md` and a copy of the study file. A cell is done when its folder holds a finished
//! result (an adapter whose train.toml says it finished; a run with results.csv); a cell with
//! a checkpoint or a partial run is resumed; anything else starts fresh. Each cell folder keeps
//! `cell.toml`, the definition it was made from, so a study file edited afterwards is refused
//! with the cell that no longer matches, instead of mixing old results with new settings.
//!
//! Every error a file can hold is found before any work: the file's syntax and keys (with the
//! line), variant and eval names, task, metric and backend names, task options (a task is built
//! with its options to check them), training configs and adapter folders.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use harness_abi::abi_stable::std_types::RStr;
use harness_abi::PluginKind;
use reports::figures::Format;
use reports::report::{self, Section, Target};
use reports::run::Run;
use serde::Deserialize;
use toml::{Spanned, Table, Value};

use crate::cli::{EvalArgs, StudyArgs, TrainArgs};
use crate::eval::plugin_result;
use crate::registry::Registry;
use crate::run_dir::{self, write_atomic};
use crate::train;

// ---- The file ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StudyFile {
    study: Header,
    variants: BTreeMap<String, Spanned<Variant>>,
    #[serde(default)]
    evals: Vec<Spanned<EvalSpec>>,
    #[serde(default)]
    compare: Vec<Spanned<CompareSpec>>,
    #[serde(default)]
    report: ReportSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    /// The study folder's default name (runs/<name>); default: the file's stem.
    name: Option<String>,
    title: Option<String>,
    description: Option<String>,
    /// Model file or HF folder; default: the fetched default model.
    model: Option<String>,
    #[serde(default = "default_backend")]
    backend: String,
    device: Option<String>,
}

fn default_backend() -> String {
    "candle".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Variant {
    label: Option<String>,
    /// `f32` or `nf4`; default nf4 with an adapter (the base QLoRA trains on), else f32.
    base: Option<Spanned<String>>,
    /// An adapter folder (relative to the study file's folder).
    adapter: Option<Spanned<String>>,
    /// A training config, as `harness train --config` reads (task, examples, data,
    /// task_options, train); the study trains it into adapters/<variant>.
    train: Option<Spanned<Table>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalSpec {
    name: Spanned<String>,
    task: Spanned<String>,
    #[serde(default)]
    options: Table,
    #[serde(default)]
    metrics: Vec<Spanned<String>>,
    variants: Vec<Spanned<String>>,
    #[serde(default)]
    backend_options: Table,
    batch: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareSpec {
    eval: Spanned<String>,
    a: Spanned<String>,
    b: Spanned<String>,
    #[serde(default)]
    metrics: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportSpec {
    /// Only these figures (by name: accuracy-vs-k, metrics-vs-k, <metric>-by-group,
    /// by-<attribute>, loss); default: every figure the results call for.
    figures: Option<Vec<Spanned<String>>>,
    format: Option<Spanned<String>>,
}

/// A study file read and checked: where things are and what each cell is.
pub struct Study {
    file: PathBuf,
    text: String,
    pub out: PathBuf,
    title: String,
    description: String,
    model: PathBuf,
    backend: String,
    device: Option<String>,
    /// In file order of first use.
    variants: Vec<(String, VariantPlan)>,
    evals: Vec<EvalPlanned>,
    compares: Vec<CompareSpec>,
    figures: Option<Vec<String>>,
    format: Format,
}

#[derive(Debug, Clone)]
struct VariantPlan {
    label: String,
    base: String,
    adapter: AdapterPlan,
}

#[derive(Debug, Clone)]
enum AdapterPlan {
    None,
    Folder(PathBuf),
    /// Trained by the study into this folder, from this config.
    Train {
        dir: PathBuf,
        config: Table,
    },
}

impl VariantPlan {
    fn adapter_dir(&self) -> Option<&Path> {
        match &self.adapter {
            AdapterPlan::None => None,
            AdapterPlan::Folder(p) => Some(p),
            AdapterPlan::Train { dir, .. } => Some(dir),
        }
    }
}

#[derive(Debug, Clone)]
struct EvalPlanned {
    name: String,
    task: String,
    options: Table,
    metrics: Vec<String>,
    variants: Vec<String>,
    backend_options: Table,
    batch: u64,
}

/// The line (1-based) of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

fn at<T>(file: &Path, text: &str, s: &Spanned<T>) -> String {
    format!("{} line {}", file.display(), line_of(text, s.span().start))
}

/// A name that can be a folder name.
fn check_name(what: &str, name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} `{name}` must be letters, digits, `-`, `_` or `.` (it names a folder)"
        ))
    }
}

/// Reads and checks a study file; `out` overrides the study folder.
pub fn load(reg: &Registry, file: &Path, out: Option<&Path>) -> Result<Study> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read study file {}", file.display()))?;
    let parsed: StudyFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start));
        let msg = e.message().replace('\n', " ");
        match line {
            Some(l) => anyhow!("{} line {l}: {msg}", file.display()),
            None => anyhow!("{}: {msg}", file.display()),
        }
    })?;
    let here = file.parent().unwrap_or(Path::new("")).to_path_buf();
    let resolve = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            here.join(p)
        }
    };
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "study".into());
    let name = parsed.study.name.clone().unwrap_or(stem);
    check_name("study name", &name).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("runs").join(&name));
    let model = match &parsed.study.model {
        Some(m) => resolve(m),
        None => harness_abi::paths::default_model(),
    };
    if !model.exists() {
        bail!(
            "{}: model {} not found; run `harness fetch` for the default model, or fix `model`",
            file.display(),
            model.display()
        );
    }
    reg.get(PluginKind::Backend, &parsed.study.backend)
        .map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let format = match &parsed.report.format {
        Some(f) => {
            Format::parse(f.get_ref()).map_err(|e| anyhow!("{}: {e}", at(file, &text, f)))?
        }
        None => Format::Png,
    };

    // Variants.
    let mut variants = Vec::new();
    // In file order (the table of the recipe lists them so).
    let mut ordered: Vec<(&String, &Spanned<Variant>)> = parsed.variants.iter().collect();
    ordered.sort_by_key(|(_, v)| v.span().start);
    for (vname, v) in ordered {
        let where_ = at(file, &text, v);
        check_name("variant name", vname).map_err(|e| anyhow!("{where_}: {e}"))?;
        let spec = v.get_ref();
        let adapter = match (&spec.adapter, &spec.train) {
            (Some(_), Some(_)) => bail!(
                "{where_}: variant `{vname}` has both `adapter` and `train`; give one (a folder, or a training config the study trains)"
            ),
            (Some(a), None) => {
                let dir = resolve(a.get_ref());
                if !dir.join("adapter_config.json").is_file() {
                    bail!(
                        "{}: variant `{vname}`: no adapter_config.json in {}",
                        at(file, &text, a),
                        dir.display()
                    );
                }
                AdapterPlan::Folder(dir)
            }
            (None, Some(t)) => {
                let config = t.get_ref().clone();
                let where_t = at(file, &text, t);
                train::check_config_keys(&config)
                    .map_err(|e| anyhow!("{where_t}: variant `{vname}`.train: {e}"))?;
                for k in ["model", "out", "backend", "device"] {
                    if config.contains_key(k) {
                        bail!("{where_t}: variant `{vname}`.train: `{k}` is set by the study ([study] and the study folder), not per variant");
                    }
                }
                // The plan checks the source of examples and the options' types.
                let probe = TrainArgs {
                    out: Some(out.join(".check")),
                    ..TrainArgs::default()
                };
                let plan = train::plan_with(&config, &probe)
                    .map_err(|e| anyhow!("{where_t}: variant `{vname}`.train: {e}"))?;
                if let Some(task) = &plan.task {
                    if plan.data.is_none() {
                        check_task(reg, task, &plan.task_options)
                            .map_err(|e| anyhow!("{where_t}: variant `{vname}`.train: {e}"))?;
                    }
                }
                if let Some(d) = &plan.data {
                    let d = resolve(&d.display().to_string());
                    if !d.is_file() {
                        bail!(
                            "{where_t}: variant `{vname}`.train: data file {} not found",
                            d.display()
                        );
                    }
                }
                AdapterPlan::Train {
                    dir: out.join("adapters").join(vname),
                    config,
                }
            }
            (None, None) => AdapterPlan::None,
        };
        let base = match &spec.base {
            Some(b) if b.get_ref() == "f32" || b.get_ref() == "nf4" => b.get_ref().clone(),
            Some(b) => bail!(
                "{}: variant `{vname}`: base must be `f32` or `nf4`, got `{}`",
                at(file, &text, b),
                b.get_ref()
            ),
            None if matches!(adapter, AdapterPlan::None) => "f32".into(),
            None => "nf4".into(),
        };
        let label = spec.label.clone().unwrap_or_else(|| vname.clone());
        variants.push((
            vname.clone(),
            VariantPlan {
                label,
                base,
                adapter,
            },
        ));
    }

    // Evaluations.
    if parsed.evals.is_empty() {
        bail!(
            "{}: no [[evals]]; a study evaluates at least one task",
            file.display()
        );
    }
    let mut evals: Vec<EvalPlanned> = Vec::new();
    for e in &parsed.evals {
        let spec = e.get_ref();
        let name = spec.name.get_ref().clone();
        check_name("eval name", &name)
            .map_err(|m| anyhow!("{}: {m}", at(file, &text, &spec.name)))?;
        if evals.iter().any(|x| x.name == name) {
            bail!(
                "{}: a second eval named `{name}`",
                at(file, &text, &spec.name)
            );
        }
        if spec.variants.is_empty() {
            bail!("{}: eval `{name}` lists no variants", at(file, &text, e));
        }
        for v in &spec.variants {
            if !variants.iter().any(|(n, _)| n == v.get_ref()) {
                let known: Vec<&str> = variants.iter().map(|(n, _)| n.as_str()).collect();
                bail!(
                    "{}: eval `{name}` names variant `{}`, which is not defined; variants are {}",
                    at(file, &text, v),
                    v.get_ref(),
                    known.join(", ")
                );
            }
        }
        let mut options = spec.options.clone();
        let refs = resolve_refs(&mut options, &variants)
            .map_err(|m| anyhow!("{}: eval `{name}`: {m}", at(file, &text, e)))?;
        // A task is built with its options to check them; options that name an adapter the
        // study has not trained yet are checked when the eval runs.
        let pending = refs.iter().any(|d| !d.join("train.toml").is_file());
        if pending {
            reg.get(PluginKind::Task, spec.task.get_ref())
                .map_err(|m| anyhow!("{}: {m}", at(file, &text, &spec.task)))?;
        } else {
            check_task(reg, spec.task.get_ref(), &options)
                .map_err(|m| anyhow!("{}: {m}", at(file, &text, &spec.task)))?;
        }
        for m in &spec.metrics {
            reg.get(PluginKind::Metric, m.get_ref())
                .map_err(|x| anyhow!("{}: {x}", at(file, &text, m)))?;
        }
        if spec.batch == Some(0) {
            bail!(
                "{}: eval `{name}`: batch must be at least 1",
                at(file, &text, e)
            );
        }
        evals.push(EvalPlanned {
            name,
            task: spec.task.get_ref().clone(),
            options,
            metrics: spec.metrics.iter().map(|m| m.get_ref().clone()).collect(),
            variants: spec.variants.iter().map(|v| v.get_ref().clone()).collect(),
            backend_options: spec.backend_options.clone(),
            batch: spec.batch.unwrap_or(8),
        });
    }

    // Comparisons.
    for c in &parsed.compare {
        let spec = c.get_ref();
        let Some(e) = evals.iter().find(|e| e.name == *spec.eval.get_ref()) else {
            bail!(
                "{}: compare names eval `{}`, which is not defined",
                at(file, &text, &spec.eval),
                spec.eval.get_ref()
            );
        };
        for v in [&spec.a, &spec.b] {
            if !e.variants.contains(v.get_ref()) {
                bail!(
                    "{}: compare: eval `{}` does not evaluate variant `{}` (it evaluates {})",
                    at(file, &text, v),
                    e.name,
                    v.get_ref(),
                    e.variants.join(", ")
                );
            }
        }
    }
    let figures = match &parsed.report.figures {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            for f in list {
                let known = ["accuracy-vs-k", "metrics-vs-k", "loss"];
                let ok = known.contains(&f.get_ref().as_str())
                    || f.get_ref().starts_with("by-")
                    || f.get_ref().ends_with("-by-group");
                if !ok {
                    bail!(
                        "{}: unknown figure `{}`; figures are accuracy-vs-k, metrics-vs-k, <metric>-by-group, by-<attribute>, loss",
                        at(file, &text, f),
                        f.get_ref()
                    );
                }
                out.push(f.get_ref().clone());
            }
            Some(out)
        }
    };
    Ok(Study {
        file: file.to_path_buf(),
        title: parsed.study.title.clone().unwrap_or_else(|| name.clone()),
        description: parsed.study.description.clone().unwrap_or_default(),
        text,
        out,
        model,
        backend: parsed.study.backend.clone(),
        device: parsed.study.device.clone(),
        variants,
        evals,
        compares: parsed.compare.into_iter().map(|c| c.into_inner()).collect(),
        figures,
        format,
    })
}

/// Replaces option values `"@variant"` by that variant's adapter folder (for options such as
/// addition's `seen_in`); returns the folders referred to.
fn resolve_refs(
    options: &mut Table,
    variants: &[(String, VariantPlan)],
) -> std::result::Result<Vec<PathBuf>, String> {
    let mut refs = Vec::new();
    for (key, value) in options.iter_mut() {
        let Value::String(s) = value else { continue };
        let Some(name) = s.strip_prefix('@') else {
            continue;
        };
        let Some((_, v)) = variants.iter().find(|(n, _)| n == name) else {
            return Err(format!(
                "option `{key}` refers to variant `{name}`, which is not defined"
            ));
        };
        let Some(dir) = v.adapter_dir() else {
            return Err(format!(
                "option `{key}` refers to variant `{name}`, which has no adapter"
            ));
        };
        refs.push(dir.to_path_buf());
        *s = dir.display().to_string();
    }
    Ok(refs)
}

/// Builds the task with these options, which checks them.
fn check_task(reg: &Registry, task: &str, options: &Table) -> Result<()> {
    let entry = reg.get(PluginKind::Task, task)?;
    let opts = options.to_string();
    plugin_result(
        entry,
        (entry.lib.new_task())(RStr::from(task), RStr::from(opts.as_str())),
    )?;
    Ok(())
}

// ---- Cells ----

/// One unit of work.
#[derive(Debug, Clone)]
enum Cell {
    Train { variant: String },
    Eval { eval: usize, variant: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Done,
    /// Started and stopped: resumed from its checkpoint or its samples.
    Partial,
    Todo,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Partial => "partial (resumes)",
            Status::Todo => "to do",
        }
    }
}

const CELL_TOML: &str = "cell.toml";

impl Study {
    fn variant(&self, name: &str) -> &VariantPlan {
        &self
            .variants
            .iter()
            .find(|(n, _)| n == name)
            .expect("checked at load")
            .1
    }

    fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for (name, v) in &self.variants {
            let used = self.evals.iter().any(|e| e.variants.contains(name));
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

    fn cell_dir(&self, cell: &Cell) -> PathBuf {
        match cell {
            Cell::Train { variant } => self.out.join("adapters").join(variant),
            Cell::Eval { eval, variant } => self
                .out
                .join("runs")
                .join(&self.evals[*eval].name)
                .join(variant),
        }
    }

    fn cell_name(&self, cell: &Cell) -> String {
        match cell {
            Cell::Train { variant } => format!("train {variant}"),
            Cell::Eval { eval, variant } => {
                format!("eval {} on {variant}", self.evals[*eval].name)
            }
        }
    }

    /// What a cell is made from, as TOML: a changed definition means a stale folder.
    fn definition(&self, cell: &Cell) -> String {
        let mut t = Table::new();
        t.insert(
            "model".into(),
            Value::String(self.model.display().to_string()),
        );
        t.insert("backend".into(), Value::String(self.backend.clone()));
        if let Some(d) = &self.device {
            t.insert("device".into(), Value::String(d.clone()));
        }
        match cell {
            Cell::Train { variant } => {
                if let AdapterPlan::Train { config, .. } = &self.variant(variant).adapter {
                    t.insert("train".into(), Value::Table(config.clone()));
                }
            }
            Cell::Eval { eval, variant } => {
                let e = &self.evals[*eval];
                let v = self.variant(variant);
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
                t.insert("base".into(), Value::String(v.base.clone()));
                match &v.adapter {
                    AdapterPlan::None => {}
                    AdapterPlan::Folder(p) => {
                        t.insert("adapter".into(), Value::String(p.display().to_string()));
                    }
                    AdapterPlan::Train { config, .. } => {
                        t.insert("adapter_train".into(), Value::Table(config.clone()));
                    }
                }
            }
        }
        t.to_string()
    }

    fn status(&self, cell: &Cell) -> Result<Status> {
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
                if finished && dir.join("adapter_model.safetensors").is_file() {
                    Status::Done
                } else if dir.join("optimizer.safetensors").is_file() {
                    Status::Partial
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

    /// A rough cost of a cell, for the estimate of what is left: an eval is 1; training is
    /// proportional to its examples (1000 addition examples train in about 2.5 evals' time of
    /// 1200 problems on a 2-core CPU).
    fn cost(&self, cell: &Cell) -> f64 {
        match cell {
            Cell::Eval { .. } => 1.0,
            Cell::Train { variant } => match &self.variant(variant).adapter {
                AdapterPlan::Train { config, .. } => {
                    let examples = config
                        .get("examples")
                        .and_then(Value::as_integer)
                        .unwrap_or(1000);
                    let epochs = config
                        .get("train")
                        .and_then(|t| t.get("epochs"))
                        .and_then(Value::as_integer)
                        .unwrap_or(1);
                    (examples * epochs) as f64 / 400.0
                }
                _ => 1.0,
            },
        }
    }

    fn run_cell(&self, reg: &Registry, cell: &Cell, status: Status) -> Result<()> {
        let dir = self.cell_dir(cell);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(&dir.join(CELL_TOML), self.definition(cell).as_bytes())?;
        let command = format!("harness study {}", self.file.display());
        match cell {
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
                let mut config = config.clone();
                if let Some(Value::String(d)) = config.get_mut("data") {
                    let here = self.file.parent().unwrap_or(Path::new(""));
                    if Path::new(d.as_str()).is_relative() {
                        *d = here.join(d.as_str()).display().to_string();
                    }
                }
                let args = TrainArgs {
                    out: Some(dir),
                    model: Some(self.model.clone()),
                    backend: Some(self.backend.clone()),
                    device: self.device.clone(),
                    ..TrainArgs::default()
                };
                let plan = train::plan_with(&config, &args)?;
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
                    crate::plan::from_args(&EvalArgs {
                        task: Some(e.task.clone()),
                        metrics: e.metrics.clone(),
                        backend: self.backend.clone(),
                        model: Some(self.model.clone()),
                        adapter: v.adapter_dir().map(Path::to_path_buf),
                        base: Some(v.base.clone()),
                        device: self.device.clone(),
                        options: pairs(&e.options),
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

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// `harness study FILE [--plan] [--out DIR]`.
pub fn run(reg: &Registry, args: &StudyArgs) -> Result<()> {
    let study = load(reg, &args.file, args.out.as_deref())?;
    let cells = study.cells();
    let statuses: Vec<Status> = cells
        .iter()
        .map(|c| study.status(c))
        .collect::<Result<_>>()?;
    let done = statuses.iter().filter(|s| **s == Status::Done).count();
    if args.plan {
        println!(
            "study {} -> {} ({} of {} cells done)",
            study.file.display(),
            study.out.display(),
            done,
            cells.len()
        );
        for (c, s) in cells.iter().zip(&statuses) {
            println!(
                "  {:<18} {:<40} {}",
                s.word(),
                study.cell_name(c),
                study.cell_dir(c).display()
            );
        }
        let report = study.out.join("report.md");
        println!(
            "  {:<18} {:<40} {}",
            if report.is_file() && done == cells.len() {
                "done"
            } else {
                "to do"
            },
            "report",
            report.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(&study.out)
        .with_context(|| format!("cannot create {}", study.out.display()))?;
    write_atomic(&study.out.join("study.toml"), study.text.as_bytes())?;
    if done == cells.len() {
        println!(
            "study {}: all {} cells are done; nothing to run (writing the report)",
            study.file.display(),
            cells.len()
        );
    }
    let start = Instant::now();
    let total_cost: f64 = cells
        .iter()
        .zip(&statuses)
        .filter(|(_, s)| **s != Status::Done)
        .map(|(c, _)| study.cost(c))
        .sum();
    let mut spent_cost = 0.0;
    let mut finished = done;
    for (c, s) in cells.iter().zip(&statuses) {
        if *s == Status::Done {
            continue;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let estimate = if spent_cost > 0.0 {
            format!(
                ", about {} left",
                duration(elapsed / spent_cost * (total_cost - spent_cost))
            )
        } else {
            String::new()
        };
        println!(
            "\n[{}/{}] {}{} (elapsed {}{estimate})",
            finished + 1,
            cells.len(),
            study.cell_name(c),
            if *s == Status::Partial {
                ", resuming"
            } else {
                ""
            },
            duration(elapsed),
        );
        study
            .run_cell(reg, c, *s)
            .with_context(|| format!("study cell `{}`", study.cell_name(c)))?;
        if crate::interrupt::requested() {
            bail!(
                "study interrupted after `{}`; `harness study {}` resumes it",
                study.cell_name(c),
                study.file.display()
            );
        }
        spent_cost += study.cost(c);
        finished += 1;
    }
    let report = write_study_report(&study)?;
    println!(
        "\nstudy done in {}: {}",
        duration(start.elapsed().as_secs_f64()),
        report.display()
    );
    Ok(())
}

fn wanted(study: &Study, section: &Section) -> bool {
    let Some(figures) = &study.figures else {
        return true;
    };
    let Some(f) = &section.figure else {
        return true;
    };
    let stem = f
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    figures
        .iter()
        .any(|w| stem.ends_with(&format!("-{w}")) || (w == "loss" && stem.contains("-loss-")))
}

/// report.md: the recipe, then per eval its figures, tables and comparisons.
fn write_study_report(study: &Study) -> Result<PathBuf> {
    let out = &study.out;
    let mut md = format!("# {}\n\n", study.title);
    if !study.description.is_empty() {
        let _ = writeln!(md, "{}\n", study.description.trim());
    }
    md.push_str("## Recipe\n\n");
    let _ = writeln!(
        md,
        "Made by `harness study {}` (harness {}); the study file is copied in [study.toml](study.toml).\n",
        study.file.display(),
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        md,
        "- model: `{}`\n- backend: {}{}\n",
        study.model.display(),
        study.backend,
        study
            .device
            .as_ref()
            .map(|d| format!(" on {d}"))
            .unwrap_or_default()
    );
    md.push_str("| variant | label | base | adapter |\n|---|---|---|---|\n");
    for (name, v) in &study.variants {
        let adapter = match &v.adapter {
            AdapterPlan::None => "none".to_string(),
            AdapterPlan::Folder(p) => format!("`{}`", p.display()),
            AdapterPlan::Train { dir, .. } => train_summary(dir),
        };
        let _ = writeln!(md, "| {name} | {} | {} | {adapter} |", v.label, v.base);
    }
    md.push('\n');
    md.push_str("| eval | task | options | metrics | variants |\n|---|---|---|---|---|\n");
    for e in &study.evals {
        let opts: Vec<String> = e
            .options
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            e.name,
            e.task,
            opts.join(", ").replace('|', "/"),
            if e.metrics.is_empty() {
                "the task's".to_string()
            } else {
                e.metrics.join(", ")
            },
            e.variants.join(", ")
        );
    }
    md.push('\n');
    let mut time = String::new();
    let mut total = 0.0;
    for (name, v) in &study.variants {
        if let AdapterPlan::Train { dir, .. } = &v.adapter {
            if let Some(secs) = train_seconds(dir) {
                total += secs;
                let _ = write!(time, "train {name} {}; ", duration(secs));
            }
        }
    }
    if !time.is_empty() {
        let _ = writeln!(md, "Training time: {}(total {}).\n", time, duration(total));
    }

    for e in &study.evals {
        let _ = writeln!(md, "## {}\n", e.name);
        let mut runs = Vec::new();
        for v in &e.variants {
            let dir = out.join("runs").join(&e.name).join(v);
            let mut run = Run::read(&dir)?;
            run.label = study.variant(v).label.clone();
            runs.push(run);
        }
        let sections = report::sections(
            &runs,
            &Target {
                out,
                prefix: &e.name,
                format: study.format,
            },
        )?;
        let sections: Vec<Section> = sections.into_iter().filter(|s| wanted(study, s)).collect();
        md.push_str(&report::markdown(&sections, "###"));
        for c in study
            .compares
            .iter()
            .filter(|c| c.eval.get_ref() == &e.name)
        {
            md.push_str(&comparison(study, e, c)?);
        }
    }
    let path = out.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

/// A paired comparison of two variants on one eval, as Markdown, with its CSV beside.
fn comparison(study: &Study, e: &EvalPlanned, c: &CompareSpec) -> Result<String> {
    let (a, b) = (c.a.get_ref(), c.b.get_ref());
    let dir = |v: &str| study.out.join("runs").join(&e.name).join(v);
    let ra = Run::read(&dir(a))?;
    let rb = Run::read(&dir(b))?;
    let options = reports::compare::CompareOptions {
        metrics: if c.metrics.is_empty() {
            None
        } else {
            Some(c.metrics.clone())
        },
        ..reports::compare::CompareOptions::default()
    };
    let rows = reports::compare::compare(&ra.samples()?, &rb.samples()?, &options)
        .map_err(|x| anyhow!("compare {a} and {b} on {}: {x}", e.name))?;
    let (la, lb) = (&study.variant(a).label, &study.variant(b).label);
    let csv_rel = PathBuf::from("figures").join(format!("{}-compare-{a}-{b}.csv", e.name));
    let mut csv = Vec::new();
    reports::compare::write_csv(&rows, &mut csv)?;
    write_atomic(&study.out.join(&csv_rel), &csv)?;
    Ok(format!(
        "### {lb} vs {la}\n\nPaired over the same instances: B − A with a 95% interval, McNemar's exact test for 0/1 metrics, a sign-flip permutation test otherwise, and how many instances moved each way.\n\n{}\nNumbers: [{}]({})\n\n",
        reports::compare::markdown(&rows, la, lb),
        csv_rel.display(),
        csv_rel.display()
    ))
}

fn train_toml(dir: &Path) -> Option<Table> {
    std::fs::read_to_string(dir.join("train.toml"))
        .ok()?
        .parse()
        .ok()
}

fn train_seconds(dir: &Path) -> Option<f64> {
    train_toml(dir)?.get("summary")?.get("seconds")?.as_float()
}

/// `trained here: addition, 1000 examples, digits 1-7; r 32, ...` from the adapter's record.
fn train_summary(dir: &Path) -> String {
    let Some(t) = train_toml(dir) else {
        return format!("trained into `{}`", dir.display());
    };
    let plan = t.get("plan").and_then(Value::as_table);
    let mut parts = Vec::new();
    if let Some(p) = plan {
        if let Some(task) = p.get("task").and_then(Value::as_str) {
            parts.push(format!("task {task}"));
        }
        if let Some(n) = p.get("examples").and_then(Value::as_integer) {
            parts.push(format!("{n} examples"));
        }
        if let Some(o) = p.get("task_options").and_then(Value::as_table) {
            for (k, v) in o {
                parts.push(format!("{k} = {v}"));
            }
        }
    }
    if let Some(s) = t.get("train_options").and_then(Value::as_str) {
        let opts: Vec<String> = s
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .collect();
        parts.push(opts.join(", "));
    }
    if let Some(s) = t.get("summary").and_then(Value::as_table) {
        if let (Some(steps), Some(loss)) = (
            s.get("steps").and_then(Value::as_integer),
            s.get("final_loss").and_then(Value::as_float),
        ) {
            parts.push(format!("{steps} steps, final loss {loss:.4}"));
        }
    }
    format!(
        "trained into `{}`: {}",
        dir.display(),
        parts.join("; ").replace('|', "/")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_offsets() {
        let t = "a\nb\nc";
        assert_eq!(line_of(t, 0), 1);
        assert_eq!(line_of(t, 2), 2);
        assert_eq!(line_of(t, 4), 3);
    }

    #[test]
    fn durations() {
        assert_eq!(duration(5.2), "5s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(3725.0), "1h02m");
    }

    #[test]
    fn names_must_be_folder_names() {
        assert!(check_name("eval name", "addition-1_2.x").is_ok());
        assert!(check_name("eval name", "a/b").is_err());
        assert!(check_name("eval name", "").is_err());
        assert!(check_name("eval name", "..").is_err());
    }
}
