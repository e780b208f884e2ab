//! The backend's training entry point: options from TOML, examples tokenized, the base
//! quantized to NF4, adapters attached, the trainer run, the adapter kept for saving.

use std::path::Path;
use std::time::Instant;

use candle_core::Var;
use harness_abi::options::Options;
use harness_abi::TrainExample;

use crate::adapter::{save_peft, AdapterSpec};
use crate::engine::Engine;
use crate::error::{BackendError, Result};
use crate::llama::TARGETS;
use crate::trainer::{self, Example, Schedule, StepReport, TrainConfig};

const KEYS: &[&str] = &[
    "r",
    "alpha",
    "dropout",
    "targets",
    "lr",
    "beta1",
    "beta2",
    "weight_decay",
    "warmup_ratio",
    "schedule",
    "micro_batch",
    "grad_accum",
    "max_seq_len",
    "epochs",
    "clip",
    "seed",
    "double_quant",
    "checkpoint_tokens",
];

/// LoRA and optimiser options, with the QLoRA paper's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
    pub double_quant: bool,
    pub optimizer: TrainConfig,
}

impl TrainOptions {
    pub fn from_toml(text: &str) -> Result<Self> {
        let o = Options::parse("candle train", text, KEYS).map_err(BackendError::Options)?;
        let e = BackendError::Options;
        let d = TrainConfig::default();
        let targets: Vec<String> = match o.string("targets").map_err(e)? {
            None => TARGETS.iter().map(|s| s.to_string()).collect(),
            Some(list) => list
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
        };
        for t in &targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(BackendError::Options(format!(
                    "unknown LoRA target `{t}`; choose among {}",
                    TARGETS.join(", ")
                )));
            }
        }
        let schedule = match o.string("schedule").map_err(e)?.as_deref() {
            None | Some("constant") => Schedule::Constant,
            Some("linear") => Schedule::Linear,
            Some("cosine") => Schedule::Cosine,
            Some(other) => {
                return Err(BackendError::Options(format!(
                    "schedule `{other}` is not one of constant, linear, cosine"
                )))
            }
        };
        let r = o.u64("r").map_err(e)?.unwrap_or(32) as usize;
        if r == 0 {
            return Err(BackendError::Options("`r` must be at least 1".into()));
        }
        let opts = TrainOptions {
            r,
            alpha: o.f64("alpha").map_err(e)?.unwrap_or(16.0),
            dropout: o.f64("dropout").map_err(e)?.unwrap_or(0.1),
            targets,
            double_quant: o.bool("double_quant").map_err(e)?.unwrap_or(true),
            optimizer: TrainConfig {
                lr: o.f64("lr").map_err(e)?.unwrap_or(d.lr),
                beta1: o.f64("beta1").map_err(e)?.unwrap_or(d.beta1),
                beta2: o.f64("beta2").map_err(e)?.unwrap_or(d.beta2),
                eps: d.eps,
                weight_decay: o.f64("weight_decay").map_err(e)?.unwrap_or(d.weight_decay),
                warmup_ratio: o.f64("warmup_ratio").map_err(e)?.unwrap_or(d.warmup_ratio),
                schedule,
                micro_batch: o
                    .u64("micro_batch")
                    .map_err(e)?
                    .unwrap_or(d.micro_batch as u64)
                    .max(1) as usize,
                grad_accum: o
                    .u64("grad_accum")
                    .map_err(e)?
                    .unwrap_or(d.grad_accum as u64)
                    .max(1) as usize,
                max_seq_len: o
                    .u64("max_seq_len")
                    .map_err(e)?
                    .unwrap_or(d.max_seq_len as u64) as usize,
                epochs: o
                    .u64("epochs")
                    .map_err(e)?
                    .unwrap_or(d.epochs as u64)
                    .max(1) as usize,
                clip: o.f64("clip").map_err(e)?.unwrap_or(d.clip),
                seed: o.u64("seed").map_err(e)?.unwrap_or(d.seed),
                checkpoint_tokens: o
                    .u64("checkpoint_tokens")
                    .map_err(e)?
                    .unwrap_or(d.checkpoint_tokens as u64)
                    as usize,
            },
        };
        if !(0.0..1.0).contains(&opts.dropout) {
            return Err(BackendError::Options("`dropout` must be in [0, 1)".into()));
        }
        Ok(opts)
    }

    pub fn to_toml(&self) -> String {
        let c = &self.optimizer;
        format!(
            "r = {}\nalpha = {:?}\ndropout = {:?}\ntargets = {:?}\ndouble_quant = {}\nlr = {:?}\nbeta1 = {:?}\nbeta2 = {:?}\nweight_decay = {:?}\nwarmup_ratio = {:?}\nschedule = \"{}\"\nmicro_batch = {}\ngrad_accum = {}\nmax_seq_len = {}\nepochs = {}\nclip = {:?}\nseed = {}\ncheckpoint_tokens = {}\n",
            self.r, self.alpha, self.dropout, self.targets.join(","), self.double_quant, c.lr, c.beta1,
            c.beta2, c.weight_decay, c.warmup_ratio,
            match c.schedule { Schedule::Constant => "constant", Schedule::Linear => "linear", Schedule::Cosine => "cosine" },
            c.micro_batch, c.grad_accum, c.max_seq_len, c.epochs, c.clip, c.seed, c.checkpoint_tokens
        )
    }
}

/// A trained (or training) adapter, kept for saving.
pub struct Trained {
    pub spec: AdapterSpec,
    pub params: Vec<(String, Var)>,
}

/// What [`run`] returns besides the adapter.
pub struct Outcome {
    pub reports: Vec<StepReport>,
    pub examples: usize,
    pub seconds: f64,
    pub stopped_early: bool,
}

/// Quantizes the base to NF4, attaches fresh adapters and trains them.
pub fn run(
    engine: &mut Engine,
    model_name: &str,
    examples: &[TrainExample],
    opts: &TrainOptions,
    mut on_step: impl FnMut(&StepReport) -> bool,
) -> Result<(Trained, Outcome)> {
    let start = Instant::now();
    let mut tokenized = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let prompt = engine.encode(ex.prompt.as_str())?;
        let completion = engine.encode(ex.completion.as_str())?;
        tokenized.push(
            Example::new(prompt, completion, opts.optimizer.max_seq_len)
                .map_err(|e| BackendError::Options(format!("training example {}: {e}", i + 1)))?,
        );
    }
    let model = engine.model_mut();
    model.quantize_nf4(opts.double_quant)?;
    let targets: Vec<&str> = opts.targets.iter().map(String::as_str).collect();
    let params = model.add_lora(
        &targets,
        opts.r,
        opts.alpha,
        opts.dropout as f32,
        opts.optimizer.seed,
    )?;
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut stopped_early = false;
    let reports = trainer::train(model, &vars, &tokenized, &opts.optimizer, |r| {
        let go_on = on_step(r);
        stopped_early = !go_on && r.step < r.total_steps;
        go_on
    })?;
    let spec = AdapterSpec {
        r: opts.r,
        alpha: opts.alpha,
        dropout: opts.dropout,
        target_modules: opts.targets.clone(),
        base_model: model_name.to_string(),
    };
    Ok((
        Trained { spec, params },
        Outcome {
            reports,
            examples: tokenized.len(),
            seconds: start.elapsed().as_secs_f64(),
            stopped_early,
        },
    ))
}

impl Trained {
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_peft(dir, &self.spec, &self.params)
    }

    pub fn parameter_count(&self) -> u64 {
        self.params
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_paper_and_unknown_keys_are_named() {
        let o = TrainOptions::from_toml("").unwrap();
        assert_eq!(
            (o.r, o.alpha, o.dropout, o.targets.len()),
            (32, 16.0, 0.1, 7)
        );
        assert_eq!(
            (o.optimizer.lr, o.optimizer.clip, o.optimizer.epochs),
            (2e-4, 0.3, 1)
        );
        assert_eq!(o.optimizer.schedule, Schedule::Constant);
        assert!(o.double_quant);
        let e = TrainOptions::from_toml("rank = 8").unwrap_err().to_string();
        assert!(e.contains("unknown option `rank`"), "{e}");
        let e = TrainOptions::from_toml("targets = \"q_proj,lm_head\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown LoRA target `lm_head`"), "{e}");
        let again = TrainOptions::from_toml(&o.to_toml()).unwrap();
        assert_eq!(again, o);
    }
}
