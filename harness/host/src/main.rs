//! `harness`: evaluate a language model, fine-tune it, and see what changed.
//!
//! The binary is a thin host: tasks, metrics and model backends are plugins loaded at run time
//! ([`registry`]). Arguments are parsed by clap ([`cli`]) and validated into a plan
//! ([`plan`]) before any model is loaded; [`eval`] runs the plan into a run folder
//! ([`run_dir`]).

mod bench;
mod cli;
mod compare;
mod eval;
mod fetch;
mod generate;
mod interrupt;
mod merge;
mod plan;
mod registry;
mod report;
mod run_dir;
mod serve;
mod stats;
mod study;
mod train;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use harness_abi::PluginKind;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    quiet_candle_pool();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            if interrupt::requested() {
                // The shell's convention for a command stopped by Ctrl-C.
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// An error and its causes as one line: causes joined by `: `, and a cause of several lines
/// (a TOML parser's message with its source snippet) reduced to its text lines joined by `; `.
pub fn error_line(e: &anyhow::Error) -> String {
    let flat = |cause: String| -> String {
        cause
            .lines()
            .map(str::trim)
            .filter(|l| {
                let snippet = l.starts_with('|')
                    || l.split_once(" |")
                        .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()));
                !l.is_empty() && !snippet
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    e.chain()
        .map(|c| flat(c.to_string()))
        .collect::<Vec<_>>()
        .join(": ")
}

/// Gives candle (the candle backend's tensor library) no CPU pool of its own, unless the user
/// sized it (`CANDLE_NUM_THREADS`). candle runs element-wise ops on large tensors on a pool
/// beside rayon's, whose idle workers spin for a while after each op on the very cores that
/// the backend's rayon work needs next. On the project's 2-core reference machine that spinning
/// took about 9% of a training step's CPU time, and `harness bench train` ran about 15% faster
/// without the pool (medians of interleaved runs; parking its workers at once instead, with
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT=0`, did about as well). Those element-wise ops then run on
/// the calling thread; the heavy work is the backend's, on rayon.
///
/// Set here, first thing in `main`, because the environment may only be written while no other
/// thread exists; candle reads the variable when it first builds its pool.
fn quiet_candle_pool() {
    const VAR: &str = "CANDLE_NUM_THREADS";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}

fn load_registry(cli: &Cli) -> Result<registry::Registry> {
    let dirs = registry::search_path(&cli.plugin_dirs);
    let reg = registry::load(&dirs)?;
    for w in &reg.warnings {
        eprintln!("warning: {w}");
    }
    Ok(reg)
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::List => {
            let reg = load_registry(&cli)?;
            list(&reg);
            Ok(())
        }
        Command::Eval(args) => {
            let plan = plan::from_args(args)?;
            let reg = load_registry(&cli)?;
            let command_line = std::env::args().collect::<Vec<_>>().join(" ");
            eval::run(&reg, plan, command_line)
        }
        Command::Train(args) => {
            let reg = load_registry(&cli)?;
            let command_line = std::env::args().collect::<Vec<_>>().join(" ");
            train::run(&reg, args, command_line)
        }
        Command::Bench(cli::BenchCommand::Train(args)) => {
            let reg = load_registry(&cli)?;
            bench::train(&reg, args)
        }
        Command::Bench(cli::BenchCommand::Eval(args)) => {
            let reg = load_registry(&cli)?;
            bench::eval(&reg, args)
        }
        Command::Fetch(args) => fetch::run(args.force),
        Command::Compare(args) => compare::run(args),
        Command::Report(args) => report::run(args),
        Command::Study(args) => {
            let reg = load_registry(&cli)?;
            study::run(&reg, args)
        }
        Command::Generate(args) => {
            let reg = load_registry(&cli)?;
            let command_line = std::env::args().collect::<Vec<_>>().join(" ");
            generate::run(&reg, args, command_line)
        }
        Command::Serve(args) => {
            let reg = load_registry(&cli)?;
            serve::run(&reg, args)
        }
        Command::Merge(args) => {
            let command_line = std::env::args().collect::<Vec<_>>().join(" ");
            merge::run(args, command_line)
        }
    }
}

fn list(reg: &registry::Registry) {
    let mut rows = vec![[
        "KIND".to_string(),
        "NAME".to_string(),
        "VERSION".to_string(),
        "LIBRARY".to_string(),
        "DESCRIPTION".to_string(),
    ]];
    for kind in [PluginKind::Task, PluginKind::Metric, PluginKind::Backend] {
        for name in reg.names(kind) {
            let e = &reg.entries[&(kind, name.clone())];
            rows.push([
                kind.as_str().to_string(),
                name,
                e.info.version.to_string(),
                e.library.display().to_string(),
                e.info.description.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    if rows.len() == 1 {
        println!(
            "(no plugins found; searched {})",
            reg.searched
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// proptest's settings for the host's property tests: a fixed seed unless PROPTEST_RNG_SEED is
/// set (every run checks the same cases and a failure reproduces; set it to explore others),
/// PROPTEST_CASES overrides the count, and no regression files are written into the source tree.
#[cfg(test)]
pub(crate) fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    let mut c = proptest::test_runner::Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = proptest::test_runner::RngSeed::Fixed(0x5eed_1234);
    }
    c.failure_persistence = None;
    c
}
