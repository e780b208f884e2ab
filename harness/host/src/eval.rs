//! The eval loop: the task makes instances, the host batches their requests, the backend
//! answers, the metrics score each answer, samples are appended to the run folder as they
//! finish, and the aggregate goes to results.csv.
//!
//! Results are computed from samples.jsonl as read back from disk, in instance order, so an
//! interrupted and resumed run gives a results.csv byte-identical to an uninterrupted one.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use harness_abi::abi_stable::std_types::RStr;
use harness_abi::{
    BackendBox, ChatMessage, ChoiceRequest, ChoiceScore, GenerateRequest, Instance, MetricBox,
    MetricInfo, PluginKind, Request,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::plan::EvalPlan;
use crate::registry::{Entry, Registry};
use crate::run_dir::{self, ModelRecord, RunRecord, SampleWriter};
use crate::stats;

/// A metric built for this run, with what it declared about its scores.
struct LoadedMetric<'a> {
    name: String,
    entry: &'a Entry,
    metric: MetricBox,
    info: MetricInfo,
}

struct Loaded<'a> {
    metrics: Vec<LoadedMetric<'a>>,
}

/// Runs the plan; prints the summary table and where the run folder is.
pub fn run(reg: &Registry, plan: EvalPlan, command_line: String) -> Result<()> {
    // Everything a user can get wrong is checked before the model is loaded.
    let (task_entry, task) = reg.task(&plan.task, &plan.task_options)?;
    let metric_names: Vec<String> = if plan.metrics.is_empty() {
        task_entry
            .outcome(task.default_metrics())?
            .iter()
            .map(|m| m.to_string())
            .collect()
    } else {
        plan.metrics.clone()
    };
    let mut loaded = Loaded {
        metrics: Vec::new(),
    };
    for name in &metric_names {
        if loaded.metrics.iter().any(|m| &m.name == name) {
            continue;
        }
        let (entry, metric) = reg.metric(name, "")?;
        let info = entry.outcome(metric.info())?;
        loaded.metrics.push(LoadedMetric {
            name: name.clone(),
            entry,
            metric,
            info,
        });
    }
    let backend_entry = reg.get(PluginKind::Backend, &plan.backend)?;
    let instances: Vec<Instance> = task_entry
        .outcome(task.eval_instances())?
        .into_iter()
        .collect();
    if instances.is_empty() {
        bail!(
            "task `{}` produced no instances with these options",
            plan.task
        );
    }
    check_ids(&instances)?;
    let instances: Vec<Instance> = match plan.shard {
        None => instances,
        Some(shard) => {
            let all = instances.len();
            let kept: Vec<Instance> = instances
                .into_iter()
                .enumerate()
                .filter(|(k, _)| shard.holds(*k))
                .map(|(_, inst)| inst)
                .collect();
            println!(
                "shard {shard}: {} of the task's {all} instances",
                kept.len()
            );
            if kept.is_empty() {
                bail!("shard {shard} holds no instance: the task makes only {all}");
            }
            kept
        }
    };
    let index = check_ids(&instances)?;

    let done = run_dir::read_samples(&plan.run_dir)?;
    for id in done.keys() {
        if !index.contains_key(id.as_str()) {
            bail!(
                "{} holds a sample `{id}` that this task does not produce; the run folder does not match its run.toml",
                plan.run_dir.join(run_dir::SAMPLES).display()
            );
        }
    }
    let todo: Vec<usize> = (0..instances.len())
        .filter(|&i| !done.contains_key(instances[i].id.as_str()))
        .collect();

    println!(
        "eval {} on {} instances ({} to do) -> {}",
        plan.task,
        instances.len(),
        todo.len(),
        plan.run_dir.display()
    );
    if !todo.is_empty() {
        if let Some(record) = &plan.resumed {
            check_unchanged(record)?;
        }
        let load_start = Instant::now();
        let (_, mut backend) = reg.backend(&plan.backend, &plan.backend_options)?;
        let info = backend_entry.outcome(backend.info())?;
        // Made once the model is loaded, so a model that fails to load leaves no empty folder.
        std::fs::create_dir_all(&plan.run_dir)
            .with_context(|| format!("cannot create run folder {}", plan.run_dir.display()))?;
        println!(
            "model {} ({} parameters, {}) loaded in {:.1} s",
            info.name,
            info.parameters,
            info.device,
            load_start.elapsed().as_secs_f64()
        );
        if plan.resumed.is_none() {
            let (_, created) = run_dir::utc_now();
            let record = RunRecord {
                harness_version: env!("CARGO_PKG_VERSION").to_string(),
                created_utc: created,
                command: command_line,
                label: plan.label.clone(),
                batch: plan.batch as u64,
                shard: plan.shard.map(|s| s.to_string()),
                chat_template: plan.chat_template,
                task: task_entry.component(task_entry.outcome(task.resolved_options())?.into())?,
                backend: backend_entry.component(info.resolved_options.to_string())?,
                model: ModelRecord {
                    name: info.name.to_string(),
                    path: info.path.to_string(),
                    // A served model (the openai backend) is no file or folder: its URL
                    // and name are what identify it.
                    sha256: if Path::new(info.path.as_str()).exists() {
                        run_dir::sha256_path(Path::new(info.path.as_str()))?
                    } else {
                        String::new()
                    },
                    architecture: info.architecture.to_string(),
                    parameters: info.parameters,
                    device: info.device.to_string(),
                    adapter: plan.adapter.as_ref().map(|a| a.display().to_string()),
                    adapter_sha256: plan
                        .adapter
                        .as_deref()
                        .map(run_dir::sha256_path)
                        .transpose()?,
                },
                metrics: loaded
                    .metrics
                    .iter()
                    .map(|m| {
                        let mut c = m.entry.component(String::new())?;
                        c.name = m.name.clone();
                        c.scale = Some(scale(&m.info));
                        Ok(c)
                    })
                    .collect::<Result<_>>()?,
            };
            record.write(&plan.run_dir)?;
        } else {
            println!("resuming: {} instances already done", done.len());
        }
        answer(
            &plan,
            backend_entry,
            &mut backend,
            &instances,
            &todo,
            &loaded,
            done.len(),
        )?;
    }
    if let Some((yes, of)) = seen_overlap(&instances) {
        println!(
            "overlap with the adapter's training set: {yes} of {of} instances (attribute seen = yes)"
        );
    }

    let rows = results(&plan, &instances, &loaded)?;
    let mut csv = Vec::new();
    reports::write_csv(&rows, &mut csv)?;
    run_dir::write_atomic(&plan.run_dir.join(run_dir::RESULTS), &csv)?;
    println!();
    print!("{}", reports::summary_table(&rows));
    println!(
        "\nresults: {}",
        plan.run_dir.join(run_dir::RESULTS).display()
    );
    Ok(())
}

/// The interval rule of a metric's scores.
fn scale(info: &MetricInfo) -> reports::stats::Scale {
    reports::stats::Scale {
        binary: info.binary,
        min: info.min,
        max: info.max,
    }
}

/// A resumed run must answer with the model it started with: the file at the recorded path must
/// still have the recorded sha256 (a retrained adapter or a replaced model would mix two
/// models' answers in one results file).
fn check_unchanged(record: &RunRecord) -> Result<()> {
    let m = &record.model;
    if !m.sha256.is_empty() {
        run_dir::check_unchanged("model", Path::new(&m.path), &m.sha256)?;
    }
    if let (Some(path), Some(sha)) = (&m.adapter, &m.adapter_sha256) {
        run_dir::check_unchanged("adapter", Path::new(path), sha)?;
    }
    Ok(())
}

fn check_ids(instances: &[Instance]) -> Result<std::collections::HashMap<&str, usize>> {
    let mut index = std::collections::HashMap::new();
    for (i, inst) in instances.iter().enumerate() {
        if index.insert(inst.id.as_str(), i).is_some() {
            bail!(
                "the task produced the instance id `{}` twice; ids must be unique",
                inst.id
            );
        }
    }
    Ok(index)
}

fn progress(total: u64, done: u64) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} instances  {per_sec}  ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_position(done);
    pb.reset_eta();
    pb
}

/// Consecutive instances of one request kind, with their requests: what is sent to the backend
/// in one call.
enum Batch<'a> {
    Generate(Vec<(&'a Instance, &'a GenerateRequest)>),
    Choice(Vec<(&'a Instance, &'a ChoiceRequest)>),
}

impl<'a> Batch<'a> {
    fn new(inst: &'a Instance) -> Self {
        match &inst.request {
            Request::Generate(g) => Batch::Generate(vec![(inst, g)]),
            Request::Choice(c) => Batch::Choice(vec![(inst, c)]),
        }
    }

    /// Adds `inst` if its request is of this batch's kind.
    fn push(&mut self, inst: &'a Instance) -> bool {
        match (self, &inst.request) {
            (Batch::Generate(b), Request::Generate(g)) => b.push((inst, g)),
            (Batch::Choice(b), Request::Choice(c)) => b.push((inst, c)),
            _ => return false,
        }
        true
    }
}

fn answer(
    plan: &EvalPlan,
    backend_entry: &Entry,
    backend: &mut BackendBox,
    instances: &[Instance],
    todo: &[usize],
    loaded: &Loaded,
    already: usize,
) -> Result<()> {
    let mut writer = SampleWriter::open(&plan.run_dir)?;
    crate::interrupt::install();
    let pb = progress(instances.len() as u64, already as u64);
    let start = Instant::now();
    let before = backend_entry.outcome(backend.stats())?;
    let mut i = 0;
    while i < todo.len() {
        let mut batch = Batch::new(&instances[todo[i]]);
        let mut j = i + 1;
        while j < todo.len() && j - i < plan.batch && batch.push(&instances[todo[j]]) {
            j += 1;
        }
        let lines = match &batch {
            Batch::Generate(b) => generated_lines(plan, backend_entry, backend, b, loaded),
            Batch::Choice(b) => choice_lines(plan, backend_entry, backend, b, loaded),
        };
        let lines = lines.map_err(|e| {
            pb.finish_and_clear();
            anyhow!(
                "{e:#}; the {} instances answered before are kept in {}, and `harness eval --resume {}` continues once the cause is fixed",
                already + i,
                plan.run_dir.display(),
                plan.run_dir.display()
            )
        })?;
        writer.append(&lines)?;
        pb.inc((j - i) as u64);
        i = j;
        if crate::interrupt::requested() && i < todo.len() {
            pb.finish_and_clear();
            bail!(
                "interrupted after {} of {} instances; finish with `harness eval --resume {}`",
                already + i,
                instances.len(),
                plan.run_dir.display()
            );
        }
    }
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let after = backend_entry.outcome(backend.stats())?;
    let prompt = after.prompt_tokens - before.prompt_tokens;
    let prompt_s = after.prompt_seconds - before.prompt_seconds;
    let generated = after.generated_tokens - before.generated_tokens;
    let generated_s = after.generate_seconds - before.generate_seconds;
    let reused = after.reused_prefix_tokens - before.reused_prefix_tokens;
    println!(
        "{} instances in {:.1} s ({:.2}/s); prompt {} tokens at {:.0} tok/s ({} more reused from a cached prefix); generated {} tokens at {:.1} tok/s{}",
        todo.len(),
        secs,
        todo.len() as f64 / secs.max(1e-9),
        prompt,
        prompt as f64 / prompt_s.max(1e-9),
        reused,
        generated,
        generated as f64 / generated_s.max(1e-9),
        crate::bench::peak_rss()
            .map(|b| format!("; peak memory {:.2} GiB", b as f64 / (1u64 << 30) as f64))
            .unwrap_or_default(),
    );
    Ok(())
}

/// Sends a batch of generation requests and makes their sample lines.
fn generated_lines(
    plan: &EvalPlan,
    backend_entry: &Entry,
    backend: &mut BackendBox,
    batch: &[(&Instance, &GenerateRequest)],
    loaded: &Loaded,
) -> Result<Vec<serde_json::Value>> {
    let reqs: Vec<GenerateRequest> = batch
        .iter()
        .map(|(_, g)| {
            let mut g = (*g).clone();
            if plan.chat_template {
                g.prompt = chat(backend_entry, backend, &g.prompt)?.into();
            }
            Ok(g)
        })
        .collect::<Result<_>>()?;
    let out = backend_entry.outcome(backend.generate(reqs.iter().cloned().collect()))?;
    check_answered(plan, "answered", out.len(), batch.len(), "requests")?;
    batch
        .iter()
        .zip(&reqs)
        .zip(out.iter())
        .map(|(((inst, _), req), g)| {
            let prediction = g.text.as_str();
            let mut line = json!({
                "id": inst.id.as_str(),
                "group": inst.group.as_str(),
                "prompt": req.prompt.as_str(),
                "prediction": prediction,
                "target": inst.target.as_str(),
                "scores": scores(loaded, inst, prediction)?,
                "prompt_tokens": g.prompt_tokens,
                "generated_tokens": g.generated_tokens,
            });
            add_attributes(&mut line, inst);
            Ok(line)
        })
        .collect()
}

/// Sends a batch of multiple-choice requests and makes their sample lines: the prediction is
/// the option with the highest log-likelihood (per byte of the option's text with
/// `length_normalize`), the first of equals.
fn choice_lines(
    plan: &EvalPlan,
    backend_entry: &Entry,
    backend: &mut BackendBox,
    batch: &[(&Instance, &ChoiceRequest)],
    loaded: &Loaded,
) -> Result<Vec<serde_json::Value>> {
    let reqs: Vec<ChoiceRequest> = batch
        .iter()
        .map(|(_, c)| {
            let mut c = (*c).clone();
            if plan.chat_template {
                c.context = chat(backend_entry, backend, &c.context)?.into();
            }
            Ok(c)
        })
        .collect::<Result<_>>()?;
    let out = backend_entry.outcome(backend.score_choices(reqs.iter().cloned().collect()))?;
    check_answered(plan, "answered", out.len(), batch.len(), "requests")?;
    let mut lines = Vec::with_capacity(batch.len());
    for (((inst, _), req), scored) in batch.iter().zip(&reqs).zip(out.iter()) {
        check_answered(plan, "scored", scored.len(), req.options.len(), "options")?;
        let best = best_option(req, scored);
        let prediction = req
            .labels
            .get(best)
            .map(|l| l.as_str())
            .unwrap_or_else(|| req.options[best].as_str());
        let mut line = json!({
            "id": inst.id.as_str(),
            "group": inst.group.as_str(),
            "prompt": req.context.as_str(),
            "options": req.options.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
            "option_logprobs": scored.iter().map(|s| s.logprob).collect::<Vec<_>>(),
            "prediction": prediction,
            "target": inst.target.as_str(),
            "scores": scores(loaded, inst, prediction)?,
        });
        add_attributes(&mut line, inst);
        lines.push(line);
    }
    Ok(lines)
}

/// `prompt` as the one user message of a chat, in the model's own template (`--chat-template`).
fn chat(backend_entry: &Entry, backend: &BackendBox, prompt: &str) -> Result<String> {
    let message = ChatMessage {
        role: "user".into(),
        content: prompt.into(),
    };
    let wrapped = backend_entry
        .outcome(backend.chat_prompt(vec![message].into()))
        .context("--chat-template")?;
    Ok(wrapped.into())
}

/// The option ranked first: the highest log-likelihood (per byte of the option's text with
/// `length_normalize`), the first of equals.
pub fn best_option(req: &ChoiceRequest, scored: &[ChoiceScore]) -> usize {
    let ranked: Vec<f64> = scored
        .iter()
        .zip(req.options.iter())
        .map(|(s, o)| {
            if req.length_normalize {
                s.logprob / (o.len().max(1) as f64)
            } else {
                s.logprob
            }
        })
        .collect();
    (0..ranked.len()).fold(0, |b, k| if ranked[k] > ranked[b] { k } else { b })
}

/// Adds the instance's attributes to its sample line as an `attributes` object; a line of an
/// instance without attributes gets no key at all, so such samples read as they always did.
fn add_attributes(line: &mut serde_json::Value, inst: &Instance) {
    if inst.attributes.is_empty() {
        return;
    }
    let map: serde_json::Map<String, serde_json::Value> = inst
        .attributes
        .iter()
        .map(|a| (a.key.to_string(), json!(a.value.as_str())))
        .collect();
    line["attributes"] = serde_json::Value::Object(map);
}

/// How many instances carry `seen = yes`, out of all instances; `None` when no instance has a
/// `seen` attribute (the task probes no adapter's training set).
fn seen_overlap(instances: &[Instance]) -> Option<(usize, usize)> {
    let seen = |i: &Instance| {
        i.attributes
            .iter()
            .find(|a| a.key.as_str() == "seen")
            .map(|a| a.value.as_str() == "yes")
    };
    if !instances.iter().any(|i| seen(i).is_some()) {
        return None;
    }
    let yes = instances.iter().filter(|i| seen(i) == Some(true)).count();
    Some((yes, instances.len()))
}

/// A backend that returned fewer (or more) answers than it was asked for is an error, not a
/// shifted results file.
fn check_answered(plan: &EvalPlan, verb: &str, got: usize, asked: usize, what: &str) -> Result<()> {
    if got != asked {
        bail!("backend `{}` {verb} {got} of {asked} {what}", plan.backend);
    }
    Ok(())
}

/// Every metric's score of `prediction`; a metric that fails, panics or returns a score outside
/// the range it declared is an error naming the metric and the instance.
fn scores(loaded: &Loaded, inst: &Instance, prediction: &str) -> Result<serde_json::Value> {
    let mut map = serde_json::Map::new();
    for m in &loaded.metrics {
        let scored = m
            .metric
            .score(RStr::from(prediction), RStr::from(inst.target.as_str()));
        let x = m
            .entry
            .outcome(scored)
            .and_then(|x| {
                m.info
                    .check(x)
                    .map(|_| x)
                    .map_err(|why| anyhow!("it returned {why}"))
            })
            .map_err(|e| {
                anyhow!(
                    "metric `{}` failed on instance `{}`: {e:#}",
                    m.name,
                    inst.id
                )
            })?;
        map.insert(m.name.clone(), json!(x));
    }
    Ok(serde_json::Value::Object(map))
}

/// Aggregates the samples on disk, in instance order.
fn results(
    plan: &EvalPlan,
    instances: &[Instance],
    loaded: &Loaded,
) -> Result<Vec<reports::ResultRow>> {
    let samples = run_dir::read_samples(&plan.run_dir)?;
    let ordered = instances
        .iter()
        .map(|inst| {
            samples.get(inst.id.as_str()).ok_or_else(|| {
                anyhow!(
                    "instance `{}` has no sample; rerun with --resume {}",
                    inst.id,
                    plan.run_dir.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let metrics: Vec<(&str, reports::stats::Scale)> = loaded
        .metrics
        .iter()
        .map(|m| (m.name.as_str(), scale(&m.info)))
        .collect();
    stats::aggregate_samples(&plan.task, &metrics, &ordered)
}
