//! `harness merge`: the shard runs of one eval (`harness eval --shard I/N`) into one run folder.
//!
//! Shard I holds the instances at positions I-1, I-1+N, ... of the task's order, each in that
//! order in its samples.jsonl, so interleaving the shards' lines restores the task's order, and
//! aggregating them as `harness eval` does gives the bytes of an unsharded run's results.csv.
//! No plugin is loaded: everything comes from the shards' run.toml and samples.jsonl.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use reports::stats::Scale;

use crate::cli::MergeArgs;
use crate::plan::eval::Shard;
use crate::run_dir::{self, write_atomic, RunRecord, RESULTS, RUN_TOML, SAMPLES};
use crate::stats;

/// One finished shard: its folder, record and sample lines in file order.
struct ShardRun {
    dir: PathBuf,
    shard: Shard,
    record: RunRecord,
    lines: Vec<String>,
}

pub fn run(args: &MergeArgs, command_line: String) -> Result<()> {
    let out = &args.out;
    if out.join(RUN_TOML).exists() || out.join(SAMPLES).exists() {
        bail!(
            "{} already holds a run; choose another --out",
            out.display()
        );
    }
    let mut shards = args
        .runs
        .iter()
        .map(|dir| read_shard(dir))
        .collect::<Result<Vec<_>>>()?;
    shards.sort_by_key(|s| s.shard.index);
    check_cover(&shards)?;
    let first = &shards[0];
    for s in &shards[1..] {
        check_same_eval(first, s)?;
    }

    // Interleave: position k of the task's order is line k / N of shard k % N.
    let n = first.shard.count as usize;
    let total: usize = shards.iter().map(|s| s.lines.len()).sum();
    for (i, s) in shards.iter().enumerate() {
        let expected = (total + n - 1 - i) / n;
        if s.lines.len() != expected {
            bail!(
                "shard {} in {} holds {} samples, but {total} instances split {n} ways give it {expected}; were the shards made with the same options?",
                s.shard,
                s.dir.display(),
                s.lines.len()
            );
        }
    }
    let merged: Vec<&str> = (0..total)
        .map(|k| shards[k % n].lines[k / n].as_str())
        .collect();

    let rows = aggregate(&first.record, &merged)?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run folder {}", out.display()))?;
    let mut samples = String::with_capacity(merged.iter().map(|l| l.len() + 1).sum());
    for line in &merged {
        samples.push_str(line);
        samples.push('\n');
    }
    write_atomic(&out.join(SAMPLES), samples.as_bytes())?;
    let (_, created) = run_dir::utc_now();
    let record = RunRecord {
        created_utc: created,
        command: command_line,
        shard: None,
        ..first.record.clone()
    };
    record.write(out)?;
    let mut csv = Vec::new();
    reports::write_csv(&rows, &mut csv)?;
    write_atomic(&out.join(RESULTS), &csv)?;
    println!(
        "merged {n} shards, {total} instances -> {}\n",
        out.display()
    );
    print!("{}", reports::summary_table(&rows));
    println!("\nresults: {}", out.join(RESULTS).display());
    Ok(())
}

fn read_shard(dir: &Path) -> Result<ShardRun> {
    let record = RunRecord::read(dir)?;
    let text = record.shard.as_deref().ok_or_else(|| {
        anyhow!(
            "{} is not a shard (it was run without --shard); merge takes the runs of `harness eval --shard I/N`",
            dir.display()
        )
    })?;
    let shard =
        Shard::parse(text).with_context(|| format!("{}: run.toml's shard", dir.display()))?;
    if !dir.join(RESULTS).exists() {
        bail!(
            "shard {shard} in {} is unfinished; finish it with `harness eval --resume {}`",
            dir.display(),
            dir.display()
        );
    }
    let path = dir.join(SAMPLES);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    Ok(ShardRun {
        dir: dir.to_path_buf(),
        shard,
        record,
        lines,
    })
}

/// The shards are 1..N of one N, each once (`shards` sorted by index).
fn check_cover(shards: &[ShardRun]) -> Result<()> {
    let n = shards[0].shard.count;
    for s in shards {
        if s.shard.count != n {
            bail!(
                "{} is shard {} but {} is shard {}: the shards of one eval share N",
                s.dir.display(),
                s.shard,
                shards[0].dir.display(),
                shards[0].shard
            );
        }
    }
    for pair in shards.windows(2) {
        if pair[0].shard.index == pair[1].shard.index {
            bail!(
                "shard {} is given twice: {} and {}",
                pair[0].shard,
                pair[0].dir.display(),
                pair[1].dir.display()
            );
        }
    }
    let missing: Vec<String> = (1..=n)
        .filter(|i| !shards.iter().any(|s| s.shard.index == *i))
        .map(|i| format!("{i}/{n}"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "shard {} missing; merge needs all {n} shards",
            if missing.len() == 1 {
                format!("{} is", missing[0])
            } else {
                format!("{} are", missing.join(", "))
            }
        );
    }
    Ok(())
}

/// The shard `b` is the same eval as `a`: task, backend, model and metrics.
fn check_same_eval(a: &ShardRun, b: &ShardRun) -> Result<()> {
    let (ra, rb) = (&a.record, &b.record);
    let differs = [
        ("task", ra.task.name != rb.task.name),
        ("task options", ra.task.options != rb.task.options),
        ("backend", ra.backend.name != rb.backend.name),
        ("backend options", ra.backend.options != rb.backend.options),
        ("model", ra.model.sha256 != rb.model.sha256),
        ("chat template", ra.chat_template != rb.chat_template),
        (
            "adapter",
            ra.model.adapter_sha256 != rb.model.adapter_sha256,
        ),
        (
            "metrics",
            ra.metrics
                .iter()
                .map(|m| &m.name)
                .ne(rb.metrics.iter().map(|m| &m.name)),
        ),
    ];
    if let Some((what, _)) = differs.iter().find(|(_, d)| *d) {
        bail!(
            "{} and {} are not shards of the same eval: their {what} differ",
            a.dir.display(),
            b.dir.display()
        );
    }
    Ok(())
}

/// results.csv's rows of the merged samples, as `harness eval` aggregates them.
fn aggregate(record: &RunRecord, lines: &[&str]) -> Result<Vec<reports::ResultRow>> {
    let samples: Vec<serde_json::Value> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("merged sample {} is not valid JSON", i + 1))
        })
        .collect::<Result<_>>()?;
    let metrics = record
        .metrics
        .iter()
        .map(|m| {
            let scale: Scale = m.scale.ok_or_else(|| {
                anyhow!(
                    "run.toml records no range for metric `{}` (written by an older harness); rerun the shards",
                    m.name
                )
            })?;
            Ok((m.name.as_str(), scale))
        })
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&serde_json::Value> = samples.iter().collect();
    stats::aggregate_samples(&record.task.name, &metrics, &refs)
}
