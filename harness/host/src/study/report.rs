//! A study's report.md: the recipe (variants, evaluations, training record and time), then per
//! evaluation its figures and tables (through the `reports` crate) and its paired comparisons.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use reports::report::{self, Section, Target};
use reports::run::Run;
use toml::{Table, Value};

use crate::run_dir::write_atomic;

use super::duration;
use super::file::{AdapterPlan, CompareSpec, EvalPlanned, Study};

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
pub(super) fn write_study_report(study: &Study) -> Result<PathBuf> {
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
            AdapterPlan::Train { dir, generate, .. } => {
                let trained = train_summary(dir, &study.out);
                match generate {
                    Some(g) => format!("{trained}; {}", generate_summary(&g.args)),
                    None => trained,
                }
            }
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
    let times: Vec<String> = study
        .variants
        .iter()
        .filter_map(|(name, v)| match &v.adapter {
            AdapterPlan::Train { dir, .. } => {
                train_seconds(dir).map(|secs| format!("{name} {}", duration(secs)))
            }
            _ => None,
        })
        .collect();
    if !times.is_empty() {
        let _ = writeln!(md, "Training time: {}.\n", times.join(", "));
    }
    // Each trained adapter's loss curve, once.
    let mut curves = Vec::new();
    for (name, v) in &study.variants {
        if let AdapterPlan::Train { dir, .. } = &v.adapter {
            if dir.join("train.csv").is_file() {
                let target = Target {
                    out,
                    prefix: "train",
                    format: study.format,
                    loss: true,
                };
                curves.push(report::loss_section(dir, name, &target)?);
            }
        }
    }
    let curves: Vec<Section> = curves.into_iter().filter(|s| wanted(study, s)).collect();
    md.push_str(&report::markdown(&curves, "###"));

    for e in &study.evals {
        let _ = writeln!(md, "## {}\n", e.name);
        let mut runs = Vec::new();
        for v in &e.variants {
            let dir = out.join("runs").join(&e.name).join(v);
            let mut run = Run::read(&dir)?;
            run.label = study.variant(v).label.clone();
            run.color = study.variants.iter().position(|(n, _)| n == v);
            runs.push(run);
        }
        let sections = report::sections(
            &runs,
            &Target {
                out,
                prefix: &e.name,
                format: study.format,
                loss: false,
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

/// `on the pairs harness generate wrote (targeted, teacher answer-key): 212 kept of 231 asked`,
/// from the pairs' provenance record.
fn generate_summary(args: &crate::cli::GenerateArgs) -> String {
    let record = std::fs::read_to_string(crate::generate::provenance_path(&args.out))
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok());
    let sum = |key: &str| -> Option<i64> {
        let counts = record.as_ref()?.get("counts")?.as_table()?;
        Some(
            counts
                .values()
                .filter_map(|c| c.get(key).and_then(Value::as_integer))
                .sum(),
        )
    };
    let counts = match (sum("kept"), sum("asked")) {
        (Some(kept), Some(asked)) => format!(": {kept} kept of {asked} asked"),
        _ => String::new(),
    };
    format!(
        "on the pairs `harness generate` wrote ({}, {}, teacher {}){counts}",
        args.method, args.subject, args.teacher
    )
}

/// `trained here: addition, 1000 examples, digits 1-7; r 32, ...` from the adapter's record.
fn train_summary(dir: &Path, out: &Path) -> String {
    // Named inside the study folder when it is there, so a copied report reads the same.
    let shown = std::path::absolute(out)
        .ok()
        .and_then(|o| dir.strip_prefix(o).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| dir.to_path_buf());
    let Some(t) = train_toml(dir) else {
        return format!("trained into `{}`", shown.display());
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
        shown.display(),
        parts.join("; ").replace('|', "/")
    )
}
