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

mod cells;
mod file;
mod report;

use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cli::StudyArgs;
use crate::registry::Registry;
use crate::run_dir::write_atomic;

use cells::{Kind, Rates, Status};
use file::load;
use report::write_study_report;

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
    for (c, s) in cells.iter().zip(&statuses) {
        if *s == Status::Done {
            study.adopt(c)?;
        }
    }
    write_atomic(&study.out.join("study.toml"), study.text.as_bytes())?;
    if done == cells.len() {
        println!(
            "study {}: all {} cells are done; nothing to run (writing the report)",
            study.file.display(),
            cells.len()
        );
    }
    let start = Instant::now();
    let mut left: Vec<(Kind, f64)> = cells
        .iter()
        .zip(&statuses)
        .filter(|(_, s)| **s != Status::Done)
        .map(|(c, _)| study.work(c))
        .collect();
    let mut rates = Rates::default();
    let mut finished = done;
    for (c, s) in cells.iter().zip(&statuses) {
        if *s == Status::Done {
            continue;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let estimate = format!(", about {} left", duration(rates.seconds(&left)));
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
        let cell_start = Instant::now();
        let result = study.run_cell(reg, c, *s);
        if crate::interrupt::requested() {
            bail!(
                "study interrupted during `{}` (what finished is kept); `harness study {}` resumes it",
                study.cell_name(c),
                study.file.display()
            );
        }
        result.with_context(|| format!("study cell `{}`", study.cell_name(c)))?;
        let (kind, units) = left.remove(0);
        rates.record(kind, units, cell_start.elapsed().as_secs_f64());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration(5.2), "5s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(3725.0), "1h02m");
    }
}
