//! `harness report`: reads run folders (files only, no plugins) and writes report.md with
//! figures and tables through the `reports` crate.

use std::path::PathBuf;

use anyhow::{Context, Result};
use reports::figures::Format;
use reports::run::Run;

use crate::cli::ReportArgs;
use crate::run_dir;

pub fn run(args: &ReportArgs) -> Result<()> {
    let format = Format::parse(&args.format)?;
    let runs = args
        .runs
        .iter()
        .map(|d| Run::read(d))
        .collect::<Result<Vec<_>, _>>()?;
    let out = args.out.clone().unwrap_or_else(|| {
        let (stamp, _) = run_dir::utc_now();
        PathBuf::from("runs").join(format!("report-{stamp}"))
    });
    let sections = reports::report::write_report(&runs, &out, format)
        .with_context(|| format!("cannot write the report into {}", out.display()))?;
    for s in &sections {
        if let Some(f) = &s.figure {
            println!("figure  {}", out.join(f).display());
        }
    }
    println!("report: {}", out.join("report.md").display());
    Ok(())
}
