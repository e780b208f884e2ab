//! Study files: the TOML read with spans (so an error names its line) into a checked [`Study`]:
//! variants, evaluations, comparisons, paths resolved against the study file's folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use harness_abi::PluginKind;
use reports::figures::Format;
use serde::Deserialize;
use toml::{Spanned, Table, Value};

use crate::cli::TrainArgs;
use crate::registry::Registry;
use crate::run_dir;

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
    /// `f32` or `nf4`; default nf4 with an adapter (the base QLoRA trains on), f32 without one
    /// or with one trained over a GGUF's own blocks (`train = { base = "gguf" }`, or an
    /// adapter folder whose train.toml says so).
    base: Option<Spanned<String>>,
    /// An adapter folder (relative to the study file's folder).
    adapter: Option<Spanned<String>>,
    /// A training config, as `harness train --config` reads (task, examples, data,
    /// task_options, train); the study trains it into adapters/<variant>.
    train: Option<Spanned<Table>>,
    /// Pairs `harness generate` writes for `train` (method, subject, teacher, backend_options,
    /// per_gap, pairs, ...): the study generates them into data/<variant>/ first.
    generate: Option<Spanned<Table>>,
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
pub(super) struct CompareSpec {
    pub(super) eval: Spanned<String>,
    pub(super) a: Spanned<String>,
    pub(super) b: Spanned<String>,
    #[serde(default)]
    pub(super) metrics: Vec<String>,
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
pub(super) struct Study {
    pub(super) file: PathBuf,
    pub(super) text: String,
    pub(super) out: PathBuf,
    pub(super) title: String,
    pub(super) description: String,
    /// Absolute.
    pub(super) model: PathBuf,
    /// sha256 of the model file or folder: a cell made from other weights is not reused.
    pub(super) model_sha256: String,
    pub(super) backend: String,
    pub(super) device: Option<String>,
    /// In file order of first use.
    pub(super) variants: Vec<(String, VariantPlan)>,
    pub(super) evals: Vec<EvalPlanned>,
    pub(super) compares: Vec<CompareSpec>,
    pub(super) figures: Option<Vec<String>>,
    pub(super) format: Format,
}

#[derive(Debug, Clone)]
pub(super) struct VariantPlan {
    pub(super) label: String,
    pub(super) base: String,
    pub(super) adapter: AdapterPlan,
    /// What the variant's cells are made from (base, adapter path and sha256, or training
    /// config and its data's sha256): part of every cell definition that uses it.
    pub(super) fingerprint: Table,
}

#[derive(Debug, Clone)]
pub(super) enum AdapterPlan {
    None,
    /// An existing adapter folder (absolute).
    Folder(PathBuf),
    /// Trained by the study into this folder (absolute), from this config (a `data` path in it
    /// made absolute); `plan` is the `[plan]` its train.toml will record.
    Train {
        dir: PathBuf,
        config: Table,
        plan: Table,
        /// The pairs the study generates first, when the variant has `generate`.
        generate: Option<Box<GeneratePlan>>,
    },
}

/// A variant's `generate`: the table as written (part of the variant's fingerprint) and the
/// arguments it makes, writing into data/<variant>/pairs.jsonl.
#[derive(Debug, Clone)]
pub(super) struct GeneratePlan {
    pub(super) spec: Table,
    pub(super) args: crate::cli::GenerateArgs,
}

impl VariantPlan {
    pub(super) fn adapter_dir(&self) -> Option<&Path> {
        match &self.adapter {
            AdapterPlan::None => None,
            AdapterPlan::Folder(p) => Some(p),
            AdapterPlan::Train { dir, .. } => Some(dir),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct EvalPlanned {
    pub(super) name: String,
    pub(super) task: String,
    /// As written (`"@variant"` kept: the definition does not depend on where the study
    /// folder is).
    pub(super) options: Table,
    /// Variants whose adapter an option refers to (`"@variant"`).
    pub(super) refs: Vec<String>,
    /// How many instances the task makes (for the estimate of the time left).
    pub(super) instances: usize,
    pub(super) metrics: Vec<String>,
    pub(super) variants: Vec<String>,
    pub(super) backend_options: Table,
    pub(super) batch: u64,
}

/// The line (1-based) of byte offset `at` in `text`.
pub(super) fn line_of(text: &str, at: usize) -> usize {
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
pub(super) fn load(reg: &Registry, file: &Path, out: Option<&Path>) -> Result<Study> {
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
    let model = absolute(&model)?;
    let model_sha256 = run_dir::sha256_path(&model)?;
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
        if let (Some(g), None) = (&spec.generate, &spec.train) {
            bail!(
                "{}: variant `{vname}` has `generate` but no `train`; the pairs are generated to train on (add train = {{ train = {{ epochs = 1 }} }})",
                at(file, &text, g)
            );
        }
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
                AdapterPlan::Folder(absolute(&dir)?)
            }
            (None, Some(t)) => {
                let mut config = t.get_ref().clone();
                let where_t = at(file, &text, t);
                crate::plan::train::check_config_keys(&config)
                    .map_err(|e| anyhow!("{where_t}: variant `{vname}`.train: {e}"))?;
                for k in ["model", "out", "backend", "device"] {
                    if config.contains_key(k) {
                        bail!("{where_t}: variant `{vname}`.train: `{k}` is set by the study ([study] and the study folder), not per variant");
                    }
                }
                let generate = match &spec.generate {
                    None => None,
                    Some(g) => {
                        let where_g = at(file, &text, g);
                        for k in ["data", "task"] {
                            if config.contains_key(k) {
                                bail!("{where_t}: variant `{vname}`.train: `{k}` is what `generate` gives; leave it out");
                            }
                        }
                        let pairs = absolute(&out.join("data").join(vname))?.join("pairs.jsonl");
                        let args = crate::generate::args_from_table(
                            g.get_ref(),
                            |p| resolve(p),
                            &model,
                            pairs,
                        )
                        .map_err(|e| anyhow!("{where_g}: variant `{vname}`.generate: {e}"))?;
                        crate::generate::check(reg, &args)
                            .map(|_| ())
                            .map_err(|e| anyhow!("{where_g}: variant `{vname}`.generate: {e}"))?;
                        Some(Box::new(GeneratePlan {
                            spec: g.get_ref().clone(),
                            args,
                        }))
                    }
                };
                if let Some(Value::String(d)) = config.get_mut("data") {
                    let path = resolve(d);
                    if !path.is_file() {
                        bail!(
                            "{where_t}: variant `{vname}`.train: data file {} not found",
                            path.display()
                        );
                    }
                    *d = absolute(&path)?.display().to_string();
                }
                if let Some(g) = &generate {
                    config.insert(
                        "data".into(),
                        Value::String(g.args.out.display().to_string()),
                    );
                }
                // The plan checks the source of examples and the options' types.
                let probe = TrainArgs {
                    out: Some(out.join(".check")),
                    ..TrainArgs::default()
                };
                let plan = crate::plan::train::plan_with(&config, &probe)
                    .map_err(|e| anyhow!("{where_t}: variant `{vname}`.train: {e}"))?;
                reg.check_train_options(&plan.backend, &plan.train.to_string())
                    .map_err(|e| anyhow!("{where_t}: variant `{vname}`.train: {e}"))?;
                if let Some(task) = &plan.task {
                    if plan.data.is_none() {
                        check_task(reg, task, &plan.task_options)
                            .map(|_| ())
                            .map_err(|e| anyhow!("{where_t}: variant `{vname}`.train: {e}"))?;
                    }
                }
                AdapterPlan::Train {
                    dir: absolute(&out.join("adapters").join(vname))?,
                    config,
                    plan: plan.to_table(),
                    generate,
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
            // An adapter trained over a GGUF's own blocks goes onto those values.
            None if matches!(adapter, AdapterPlan::None) || trained_over_gguf(&adapter) => {
                "f32".into()
            }
            None => "nf4".into(),
        };
        let label = spec.label.clone().unwrap_or_else(|| vname.clone());
        let fingerprint = fingerprint(&base, &adapter)?;
        variants.push((
            vname.clone(),
            VariantPlan {
                label,
                base,
                adapter,
                fingerprint,
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
        let refs = referred(&spec.options, &variants)
            .map_err(|m| anyhow!("{}: eval `{name}`: {m}", at(file, &text, e)))?;
        // The task is built with its options to check them. An option naming an adapter the
        // study has not trained yet points at a stand-in holding the train.toml it will have.
        let stand_in =
            std::env::temp_dir().join(format!("harness-study-check-{}-{name}", std::process::id()));
        let checked = (|| -> Result<usize> {
            let mut folders = BTreeMap::new();
            for r in &refs {
                let v = &variants
                    .iter()
                    .find(|(n, _)| n == r)
                    .expect("referred checks")
                    .1;
                let dir = match &v.adapter {
                    AdapterPlan::Train {
                        dir,
                        plan,
                        generate,
                        ..
                    } if !dir.join("train.toml").is_file() => {
                        let d = stand_in.join(r);
                        std::fs::create_dir_all(&d)?;
                        let mut plan = plan.clone();
                        // Pairs not generated yet: an empty stand-in file.
                        if generate.as_ref().is_some_and(|g| !g.args.out.is_file()) {
                            let pairs = d.join("pairs.jsonl");
                            std::fs::write(&pairs, "")?;
                            plan.insert("data".into(), Value::String(pairs.display().to_string()));
                        }
                        let mut record = Table::new();
                        record.insert("plan".into(), Value::Table(plan));
                        std::fs::write(d.join("train.toml"), toml::to_string(&record)?)?;
                        d
                    }
                    _ => v.adapter_dir().expect("referred checks").to_path_buf(),
                };
                folders.insert(r.clone(), dir);
            }
            let options = resolve_refs(&spec.options, &folders);
            check_task(reg, spec.task.get_ref(), &options)
        })();
        let _ = std::fs::remove_dir_all(&stand_in);
        let instances = checked.map_err(|m| anyhow!("{}: {m}", at(file, &text, &spec.task)))?;
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
            options: spec.options.clone(),
            refs,
            instances,
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
        model_sha256,
        backend: parsed.study.backend.clone(),
        device: parsed.study.device.clone(),
        variants,
        evals,
        compares: parsed.compare.into_iter().map(|c| c.into_inner()).collect(),
        figures,
        format,
    })
}

/// The variants that option values `"@variant"` refer to (each must have an adapter).
fn referred(
    options: &Table,
    variants: &[(String, VariantPlan)],
) -> std::result::Result<Vec<String>, String> {
    let mut refs = Vec::new();
    for (key, value) in options {
        let Some(name) = value.as_str().and_then(|s| s.strip_prefix('@')) else {
            continue;
        };
        let Some((_, v)) = variants.iter().find(|(n, _)| n == name) else {
            return Err(format!(
                "option `{key}` refers to variant `{name}`, which is not defined"
            ));
        };
        if v.adapter_dir().is_none() {
            return Err(format!(
                "option `{key}` refers to variant `{name}`, which has no adapter"
            ));
        }
        if !refs.iter().any(|r| r == name) {
            refs.push(name.to_string());
        }
    }
    Ok(refs)
}

/// `options` with each `"@variant"` replaced by the folder given for that variant.
pub(super) fn resolve_refs(options: &Table, folders: &BTreeMap<String, PathBuf>) -> Table {
    let mut out = options.clone();
    for (_, value) in out.iter_mut() {
        let Some(dir) = value
            .as_str()
            .and_then(|s| s.strip_prefix('@'))
            .and_then(|n| folders.get(n))
        else {
            continue;
        };
        *value = Value::String(dir.display().to_string());
    }
    out
}

/// A path made absolute against the current folder, so that what run folders and cell
/// definitions record does not depend on how the study was invoked.
fn absolute(p: &Path) -> Result<PathBuf> {
    let p = std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .with_context(|| format!("cannot resolve {}", p.display()))?;
    Ok(p)
}

/// Whether the adapter is (or will be) trained over a GGUF's own blocks (`train = { base =
/// "gguf" }`): a study trains it so, or an adapter folder's train.toml says so.
fn trained_over_gguf(adapter: &AdapterPlan) -> bool {
    let over_gguf = |plan: &Table| {
        let train = plan.get("train").and_then(Value::as_table);
        train.is_some_and(|t| crate::plan::training_base(t) == "gguf")
    };
    match adapter {
        AdapterPlan::None => false,
        AdapterPlan::Train { plan, .. } => over_gguf(plan),
        AdapterPlan::Folder(dir) => std::fs::read_to_string(dir.join("train.toml"))
            .ok()
            .and_then(|text| text.parse::<Table>().ok())
            .is_some_and(|t| {
                t.get("plan")
                    .and_then(Value::as_table)
                    .is_some_and(over_gguf)
            }),
    }
}

/// What a variant's cells are made from, for their definitions.
fn fingerprint(base: &str, adapter: &AdapterPlan) -> Result<Table> {
    let mut t = Table::new();
    t.insert("base".into(), Value::String(base.into()));
    match adapter {
        AdapterPlan::None => {}
        AdapterPlan::Folder(p) => {
            t.insert("adapter".into(), Value::String(p.display().to_string()));
            t.insert(
                "adapter_sha256".into(),
                Value::String(run_dir::sha256_path(p)?),
            );
        }
        AdapterPlan::Train {
            config, generate, ..
        } => {
            let mut train = config.clone();
            if let Some(g) = generate {
                // The pairs do not exist before the study makes them, and live in the study
                // folder, however it is spelled: what makes them stands for them.
                train.remove("data");
                t.insert("generate".into(), Value::Table(g.spec.clone()));
            } else if let Some(d) = config.get("data").and_then(Value::as_str) {
                t.insert(
                    "data_sha256".into(),
                    Value::String(run_dir::sha256_path(Path::new(d))?),
                );
            }
            t.insert("train".into(), Value::Table(train));
        }
    }
    Ok(t)
}

/// Builds the task with these options, which checks them; returns how many instances it makes.
fn check_task(reg: &Registry, task: &str, options: &Table) -> Result<usize> {
    let (entry, task) = reg.task(task, &options.to_string())?;
    Ok(entry.outcome(task.eval_instances())?.len())
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
    fn adapters_trained_over_gguf_blocks_are_known_by_their_plan() {
        let plan = |base: &str| -> Table {
            format!("train = {{ base = \"{base}\", r = 4 }}")
                .parse()
                .unwrap()
        };
        let train = |base: &str| AdapterPlan::Train {
            dir: PathBuf::new(),
            config: Table::new(),
            plan: plan(base),
            generate: None,
        };
        assert!(trained_over_gguf(&train("gguf")));
        assert!(!trained_over_gguf(&train("nf4")));
        assert!(!trained_over_gguf(&AdapterPlan::None));
        let dir = std::env::temp_dir().join(format!("study-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let folder = AdapterPlan::Folder(dir.clone());
        assert!(!trained_over_gguf(&folder), "no train.toml");
        std::fs::write(dir.join("train.toml"), "[plan.train]\nbase = \"gguf\"\n").unwrap();
        assert!(trained_over_gguf(&folder));
        std::fs::write(dir.join("train.toml"), "[plan.train]\nr = 4\n").unwrap();
        assert!(!trained_over_gguf(&folder));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn names_must_be_folder_names() {
        assert!(check_name("eval name", "addition-1_2.x").is_ok());
        assert!(check_name("eval name", "a/b").is_err());
        assert!(check_name("eval name", "").is_err());
        assert!(check_name("eval name", "..").is_err());
    }
}
