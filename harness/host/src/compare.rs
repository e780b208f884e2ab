//! `harness compare A B`: a paired comparison of two run folders over the same instances, with
//! a significance test per group and metric ([`reports::compare`] does the statistics).
//!
//! Nothing here needs a model or plugins: it reads run folders only, so it works on folders
//! copied from another machine.

use anyhow::Result;
use reports::compare::{self, CompareOptions};
use reports::run::Run;

use crate::cli::CompareArgs;

pub fn run(args: &CompareArgs) -> Result<()> {
    let run_a = Run::read(&args.a)?;
    let run_b = Run::read(&args.b)?;
    let samples_a = run_a.samples()?;
    let samples_b = run_b.samples()?;
    if run_a.task != run_b.task {
        eprintln!(
            "warning: A is a `{}` run and B a `{}` run; comparing them by instance id anyway",
            run_a.task, run_b.task
        );
    }
    let options = CompareOptions {
        metrics: (!args.metrics.is_empty()).then(|| args.metrics.clone()),
        resamples: args.resamples,
        seed: args.seed,
    };
    let rows = compare::compare(&samples_a, &samples_b, &options)?;

    let a_label = format!("{} ({})", run_a.label, run_a.dir.display());
    let b_label = format!("{} ({})", run_b.label, run_b.dir.display());
    let mut text = compare::table(&rows, &a_label, &b_label);
    text.push('\n');
    for row in rows.iter().filter(|r| r.group == "all") {
        text.push_str(&compare::verdict(row));
        text.push('\n');
    }
    print!("{text}");

    if let Some(out) = &args.out {
        let mut bytes = Vec::new();
        compare::write_csv(&rows, &mut bytes)?;
        crate::run_dir::write_atomic(out, &bytes)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
