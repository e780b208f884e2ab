//! `harness bench train`: QLoRA training speed and peak memory on fixed-length sequences.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Result};
use harness_abi::abi_stable::std_types::{RStr, RVec};
use harness_abi::{ProgressSink, ProgressSink_TO, TD_Opaque, TrainExample, TrainStep};

use crate::cli::BenchTrainArgs;
use crate::plan::{BackendFlags, TRAINING_BASE};
use crate::registry::Registry;

struct Timer {
    last: Instant,
    steps: Arc<Mutex<Vec<(f64, u64)>>>,
}

impl ProgressSink for Timer {
    fn report(&mut self, step: TrainStep) -> bool {
        let now = Instant::now();
        if let Ok(mut s) = self.steps.lock() {
            s.push((now.duration_since(self.last).as_secs_f64(), step.tokens));
        }
        self.last = now;
        true
    }
}

/// Peak resident memory of this process in bytes (Linux), if known.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn train(reg: &Registry, args: &BenchTrainArgs) -> Result<()> {
    if args.seq_len < 8 || args.micro_batch == 0 || args.steps == 0 {
        bail!("--seq-len must be at least 8, --micro-batch and --steps at least 1");
    }
    let model = args
        .model
        .clone()
        .unwrap_or_else(harness_abi::paths::default_model);
    if !model.exists() {
        bail!(
            "model {} not found; run `harness fetch` or pass --model",
            model.display()
        );
    }
    let opts = BackendFlags {
        model: Some(&model),
        base: Some(TRAINING_BASE),
        device: args.device.as_deref(),
        ..BackendFlags::default()
    }
    .table()
    .to_string();
    let (entry, mut backend) = reg.backend("candle", &opts)?;
    let completion = (args.seq_len / 4).max(1) as usize;
    let prompt = args.seq_len as usize - completion;
    let n = (args.micro_batch * (args.steps + 1)) as usize;
    let examples: Vec<TrainExample> = (0..n)
        .map(|i| {
            let digits = |len: usize, salt: usize| -> String {
                (0..len)
                    .map(|j| char::from(b'0' + ((i * 7 + j * 3 + salt) % 10) as u8))
                    .collect()
            };
            TrainExample::new(digits(prompt, 1), digits(completion, 5)).in_group("bench")
        })
        .collect();
    let train_opts = format!(
        "r = {}\nmicro_batch = {}\nwarmup_ratio = 0.0\nmax_seq_len = {}\n",
        args.r,
        args.micro_batch,
        args.seq_len * 2
    );
    let steps = Arc::new(Mutex::new(Vec::new()));
    let timer = Timer {
        last: Instant::now(),
        steps: steps.clone(),
    };
    let summary = entry.outcome(backend.train(
        RVec::from(examples),
        RStr::from(train_opts.as_str()),
        ProgressSink_TO::from_value(timer, TD_Opaque),
    ))?;
    let timed: Vec<(f64, u64)> = steps
        .lock()
        .map(|s| s.iter().skip(1).copied().collect())
        .unwrap_or_default();
    let mut rates: Vec<f64> = timed
        .iter()
        .map(|(secs, tokens)| *tokens as f64 / secs.max(1e-9))
        .collect();
    rates.sort_by(f64::total_cmp);
    let median = if rates.is_empty() {
        f64::NAN
    } else {
        rates[rates.len() / 2]
    };
    let per_seq = summary.tokens as f64 / (summary.steps as f64 * args.micro_batch as f64);
    println!(
        "qlora train: micro-batch {} x {:.0} tokens, r={}, all seven projections, NF4 base with double quantization",
        args.micro_batch, per_seq, args.r
    );
    println!(
        "tokens/s: median {:.1} over {} steps (min {:.1}, max {:.1}); trainable parameters {}",
        median,
        rates.len(),
        rates.first().copied().unwrap_or(f64::NAN),
        rates.last().copied().unwrap_or(f64::NAN),
        summary.trainable_parameters
    );
    match peak_rss() {
        Some(b) => println!(
            "peak resident memory: {:.2} GiB",
            b as f64 / (1u64 << 30) as f64
        ),
        None => println!("peak resident memory: not available on this system"),
    }
    Ok(())
}
