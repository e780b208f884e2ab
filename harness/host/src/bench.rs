//! `harness bench train`: QLoRA training speed and peak memory on fixed-length sequences.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use harness_abi::abi_stable::std_types::{RStr, RVec};
use harness_abi::{
    BackendStats, GenerateRequest, ProgressSink, ProgressSink_TO, TD_Opaque, TrainExample,
    TrainStep,
};

use crate::cli::{BenchEvalArgs, BenchTrainArgs};
use crate::plan::{insert_pair, training_base, BackendFlags};
use crate::registry::Registry;
use toml::{Table, Value};

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

/// The model a bench runs: `--model`, else the one `harness fetch` cached; it must exist.
fn model_path(given: Option<&std::path::Path>) -> Result<std::path::PathBuf> {
    let model = given
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(harness_abi::paths::default_model);
    if !model.exists() {
        bail!(
            "model {} not found; run `harness fetch` or pass --model",
            model.display()
        );
    }
    Ok(model)
}

pub fn train(reg: &Registry, args: &BenchTrainArgs) -> Result<()> {
    if args.seq_len < 8 || args.micro_batch == 0 || args.steps == 0 {
        bail!("--seq-len must be at least 8, --micro-batch and --steps at least 1");
    }
    let model = model_path(args.model.as_deref())?;
    let mut train = Table::new();
    for (key, value) in [
        ("r", args.r),
        ("micro_batch", args.micro_batch),
        ("max_seq_len", args.seq_len * 2),
    ] {
        train.insert(key.into(), Value::Integer(value as i64));
    }
    train.insert("warmup_ratio".into(), Value::Float(0.0));
    for pair in &args.train_options {
        insert_pair(&mut train, pair, "--train-option")?;
    }
    let train_opts = train.to_string();
    reg.check_train_options("candle", &train_opts)?;
    let opts = BackendFlags {
        model: Some(&model),
        base: Some(training_base(&train)),
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
    let base = match training_base(&train) {
        "gguf" => "the GGUF's own blocks as base",
        _ => "NF4 base with double quantization",
    };
    let extra = if args.train_options.is_empty() {
        String::new()
    } else {
        format!(" ({})", args.train_options.join(", "))
    };
    println!(
        "qlora train: micro-batch {} x {:.0} tokens, r={}, all seven projections, {base}{extra}",
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

/// The median of `xs` (NaN for none).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// The CPU kernels the candle backend picks on this machine for f32 evaluation: the decoding
/// dot products (AVX2+FMA, also on AVX-512 CPUs, else portable) and gemm for prompts; and the
/// bf16 units its training products and `compute = "bf16"` use.
fn kernel_path() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        // bf16 units from the kernel's flags (AMX has no stable run-time detection in std).
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = flags
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let f32_path = if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            "AVX2+FMA f32"
        } else {
            "portable f32"
        };
        let bf16: Vec<&str> = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")]
            .into_iter()
            .filter(|(flag, _)| flags.contains(flag))
            .map(|(_, name)| name)
            .collect();
        let bf16 = if bf16.is_empty() {
            "none (training's bf16 products run in f32, and compute=bf16 is emulated in f32)"
                .to_string()
        } else {
            bf16.join(", ")
        };
        format!("{f32_path} (decoding dot products; gemm for prompts); bf16 units: {bf16}")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "portable f32 (decoding dot products; gemm for prompts)".to_string()
    }
}

/// The difference of two stats readings.
fn delta(after: BackendStats, before: BackendStats) -> BackendStats {
    BackendStats {
        prompt_tokens: after.prompt_tokens - before.prompt_tokens,
        prompt_seconds: after.prompt_seconds - before.prompt_seconds,
        generated_tokens: after.generated_tokens - before.generated_tokens,
        generate_seconds: after.generate_seconds - before.generate_seconds,
        reused_prefix_tokens: after.reused_prefix_tokens - before.reused_prefix_tokens,
    }
}

/// One timed measurement: tokens/s for each run, and what it processed.
struct Rate {
    per_run: Vec<f64>,
    /// Tokens per run (prompt tokens for prefill, generated for decoding).
    tokens: u64,
}

pub fn eval(reg: &Registry, args: &BenchEvalArgs) -> Result<()> {
    if args.batch == 0 || args.prompt_len < 2 || args.new_tokens == 0 || args.runs == 0 {
        bail!("--batch, --new-tokens and --runs must be at least 1, --prompt-len at least 2");
    }
    let model = model_path(args.model.as_deref())?;
    let mut table = BackendFlags {
        model: Some(&model),
        compute: args.compute.as_deref(),
        device: args.device.as_deref(),
        max_batch: Some(args.batch.max(8)),
        ..BackendFlags::default()
    }
    .table();
    for pair in &args.backend_options {
        insert_pair(&mut table, pair, "--backend-option")?;
    }
    let opts = table.to_string();
    let (entry, mut backend) = reg.backend("candle", &opts)?;
    let info = entry.outcome(backend.info())?;
    let mut call = |requests: Vec<GenerateRequest>| -> Result<(f64, BackendStats)> {
        let before = entry.outcome(backend.stats())?;
        let start = Instant::now();
        entry.outcome(backend.generate(RVec::from(requests)))?;
        let wall = start.elapsed().as_secs_f64();
        Ok((wall, delta(entry.outcome(backend.stats())?, before)))
    };

    // Prefill: distinct digit strings (no shared prefix, nothing reused), one new token each.
    let digits = |len: u64, seed: u64| -> String {
        (0..len)
            .map(|j| char::from(b'0' + ((seed * 7 + j * j * 3 + j + seed * j) % 10) as u8))
            .collect()
    };
    let mut prefill = Rate {
        per_run: Vec::new(),
        tokens: 0,
    };
    for run in 0..=args.runs {
        let requests = (0..args.batch)
            .map(|r| GenerateRequest {
                prompt: format!("{}{}", r % 10, digits(args.prompt_len - 1, run * 31 + r)).into(),
                stop: RVec::new(),
                max_new_tokens: 1,
            })
            .collect();
        let (wall, d) = call(requests)?;
        // The first call warms up caches and thread pools and is not counted.
        if run > 0 {
            prefill
                .per_run
                .push(d.prompt_tokens as f64 / wall.max(1e-9));
            prefill.tokens = d.prompt_tokens;
        }
    }

    // Decoding: counting prompts, which the model continues without stopping.
    let mut decode_rate = |batch: u64| -> Result<Rate> {
        let mut rate = Rate {
            per_run: Vec::new(),
            tokens: 0,
        };
        for run in 0..=args.runs {
            let requests = (0..batch)
                .map(|r| {
                    let from = 10 + 40 * r + run;
                    let count: Vec<String> = (from..from + 12).map(|n| n.to_string()).collect();
                    GenerateRequest {
                        prompt: format!("{},", count.join(", ")).into(),
                        stop: RVec::new(),
                        max_new_tokens: args.new_tokens as u32,
                    }
                })
                .collect();
            let (_, d) = call(requests)?;
            if run > 0 {
                rate.per_run
                    .push(d.generated_tokens as f64 / d.generate_seconds.max(1e-9));
                rate.tokens = d.generated_tokens;
            }
        }
        Ok(rate)
    };
    let decode_1 = decode_rate(1)?;
    let decode_b = decode_rate(args.batch)?;
    let kernel_peak = peak_rss();
    drop(backend);

    let workloads = if args.workloads {
        vec![
            time_workload(args, &model, "addition", WORKLOAD_ADDITION)?,
            time_workload(args, &model, "mmlu", WORKLOAD_MMLU)?,
        ]
    } else {
        Vec::new()
    };

    let gib = |b: Option<u64>| b.map(|b| b as f64 / (1u64 << 30) as f64);
    println!(
        "model: {} ({} parameters, {})",
        info.name, info.parameters, info.device
    );
    println!("kernel path: {}", kernel_path());
    println!("backend options: {}", opts.trim().replace('\n', ", "));
    let line = |what: String, r: &Rate| {
        println!(
            "{what:<34} {:>9.1} tokens/s  (median of {}; min {:.1}, max {:.1}; {} tokens per run)",
            median(r.per_run.clone()),
            r.per_run.len(),
            r.per_run.iter().copied().fold(f64::INFINITY, f64::min),
            r.per_run.iter().copied().fold(0.0, f64::max),
            r.tokens
        )
    };
    line(
        format!("prefill {} x {} tokens", args.batch, args.prompt_len),
        &prefill,
    );
    line("greedy decoding, batch 1".to_string(), &decode_1);
    line(format!("greedy decoding, batch {}", args.batch), &decode_b);
    if let Some(p) = gib(kernel_peak) {
        println!("peak resident memory (these kernels): {p:.2} GiB");
    }
    for w in &workloads {
        println!(
            "{:<34} {:>9.1} s wall  (median of {}: {}; peak memory {})",
            w.name,
            median(w.seconds.clone()),
            w.seconds.len(),
            w.seconds
                .iter()
                .map(|s| format!("{s:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            w.peak_gib
                .map(|g| format!("{g:.2} GiB"))
                .unwrap_or_else(|| "not reported".into())
        );
    }
    if let Some(path) = &args.json {
        let rate = |r: &Rate| {
            serde_json::json!({
                "tokens_per_s": median(r.per_run.clone()),
                "runs": r.per_run,
                "tokens_per_run": r.tokens,
            })
        };
        let doc = serde_json::json!({
            "model": info.name.as_str(),
            "kernel_path": kernel_path(),
            "backend_options": opts,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "prefill": rate(&prefill),
            "decode_batch_1": rate(&decode_1),
            "decode_batch_n": rate(&decode_b),
            "peak_gib": gib(kernel_peak),
            "workloads": workloads.iter().map(|w| serde_json::json!({
                "name": w.name,
                "command": w.command,
                "wall_s": median(w.seconds.clone()),
                "runs": w.seconds,
                "peak_gib": w.peak_gib,
            })).collect::<Vec<_>>(),
        });
        crate::run_dir::write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// The issue's addition workload: k = 1..12, 20 problems each, 3-shot, greedy.
const WORKLOAD_ADDITION: &[&str] = &[
    "--task",
    "addition",
    "--digits",
    "1-12",
    "--n",
    "20",
    "--metric",
    "levenshtein",
];
/// MMLU machine_learning, letter scoring, zero-shot.
const WORKLOAD_MMLU: &[&str] = &[
    "--task",
    "mmlu",
    "--subject",
    "machine_learning",
    "--metric",
    "exact-match",
];

struct Workload {
    name: String,
    command: String,
    seconds: Vec<f64>,
    peak_gib: Option<f64>,
}

/// Runs `harness eval ARGS` as a child process `--workload-runs` times into fresh folders and
/// times each whole process.
fn time_workload(
    args: &BenchEvalArgs,
    model: &std::path::Path,
    name: &str,
    eval_args: &[&str],
) -> Result<Workload> {
    let exe = std::env::current_exe().context("finding the harness executable")?;
    let scratch = std::env::temp_dir().join(format!("harness-bench-{}", std::process::id()));
    let mut seconds = Vec::new();
    let mut peak_gib = None;
    let mut command = String::new();
    for run in 0..args.workload_runs {
        let out = scratch.join(format!("{name}-{run}"));
        let _ = std::fs::remove_dir_all(&out);
        let mut c = std::process::Command::new(&exe);
        c.arg("eval").args(eval_args).arg("--model").arg(model);
        if let Some(d) = &args.device {
            c.args(["--device", d]);
        }
        if let Some(compute) = &args.compute {
            c.args(["--compute", compute]);
        }
        for pair in &args.backend_options {
            c.args(["--backend-option", pair]);
        }
        c.arg("--out").arg(&out);
        command = format!("harness eval {}", eval_args.join(" "));
        let start = Instant::now();
        let output = c
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        let wall = start.elapsed().as_secs_f64();
        if !output.status.success() {
            bail!(
                "the {name} workload failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        seconds.push(wall);
        let stdout = String::from_utf8_lossy(&output.stdout);
        peak_gib = stdout
            .split("peak memory ")
            .nth(1)
            .and_then(|rest| rest.split(" GiB").next())
            .and_then(|g| g.trim().parse().ok())
            .or(peak_gib);
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Workload {
        name: format!("{name} eval (whole process)"),
        command,
        seconds,
        peak_gib,
    })
}
