//! Training LoRA adapters: AdamW with decoupled weight decay, warm-up then a constant, linear or
//! cosine schedule, micro-batches with gradient accumulation, global-norm clipping, and the loss
//! taken on completion tokens only (logits are computed for those positions alone).
//!
//! Everything is seeded: the order of examples per epoch and the LoRA initialisation, so the same
//! inputs give the same adapter.

use candle_core::{Tensor, Var};

use crate::error::{BackendError, Result};
use crate::model::llama::Llama;
use crate::ops::fused::CrossEntropy;

/// Learning-rate schedule after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// Optimiser and batching settings; defaults follow the QLoRA paper's Table 1.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Share of the optimiser steps spent warming the learning rate up from 0.
    pub warmup_ratio: f64,
    pub schedule: Schedule,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub epochs: usize,
    /// Global gradient-norm limit (0 = no clipping).
    pub clip: f64,
    pub seed: u64,
    /// Micro-batches of more tokens (rows x longest row) than this use activation checkpointing:
    /// the backward pass recomputes each layer instead of keeping every layer's activations
    /// (about 36 KB per token and layer for SmolLM2). Shorter ones keep the whole graph and
    /// compute nothing twice. 0 checkpoints always.
    pub checkpoint_tokens: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_ratio: 0.03,
            schedule: Schedule::Constant,
            micro_batch: 8,
            grad_accum: 1,
            max_seq_len: 512,
            epochs: 1,
            clip: 0.3,
            seed: 0,
            checkpoint_tokens: 2048,
        }
    }
}

impl TrainConfig {
    /// The learning rate at optimiser step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = (self.warmup_ratio * total as f64).ceil() as usize;
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let span = (total - warmup).max(1) as f64;
        let progress = (step - warmup) as f64 / span;
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr * (1.0 - progress),
            Schedule::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// A tokenized example: the loss covers `ids[prompt_len..]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

impl Example {
    /// Joins prompt and completion tokens, dropping the start of the prompt if the whole would
    /// exceed `max_len` (the completion is what is learned; it is never cut).
    pub fn new(prompt: Vec<u32>, completion: Vec<u32>, max_len: usize) -> Result<Self> {
        if completion.is_empty() || prompt.is_empty() {
            return Err(BackendError::Options(
                "a training example needs a non-empty prompt and completion".into(),
            ));
        }
        if completion.len() >= max_len {
            return Err(BackendError::Options(format!(
                "a completion of {} tokens does not fit in max_seq_len {max_len}",
                completion.len()
            )));
        }
        let keep = (max_len - completion.len()).min(prompt.len());
        let prompt = &prompt[prompt.len() - keep..];
        let mut ids = prompt.to_vec();
        ids.extend(&completion);
        Ok(Example {
            prompt_len: prompt.len(),
            ids,
        })
    }
}

/// AdamW (Loshchilov & Hutter) over the adapter parameters.
pub struct AdamW {
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
}

impl AdamW {
    pub fn new(params: Vec<Var>) -> Result<Self> {
        let m = params
            .iter()
            .map(|p| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<_>>()?;
        let v = params
            .iter()
            .map(|p| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW { params, m, v, t: 0 })
    }

    /// The optimiser's state: steps taken and the first and second moments.
    pub fn state(&self, step: usize) -> Resume {
        Resume {
            step,
            m: self.m.clone(),
            v: self.v.clone(),
        }
    }

    /// Continues from a saved state (moments in parameter order).
    pub fn restore(&mut self, state: Resume) -> Result<()> {
        if state.m.len() != self.params.len() || state.v.len() != self.params.len() {
            return Err(BackendError::Options(format!(
                "the saved optimiser state holds {} tensors for {} parameters",
                state.m.len(),
                self.params.len()
            )));
        }
        for ((p, m), v) in self.params.iter().zip(&state.m).zip(&state.v) {
            if m.shape() != p.as_tensor().shape() || v.shape() != p.as_tensor().shape() {
                return Err(BackendError::Options(format!(
                    "the saved optimiser state has shape {:?} for a parameter of shape {:?}",
                    m.shape(),
                    p.as_tensor().shape()
                )));
            }
        }
        self.t = state.step as i32;
        self.m = state.m;
        self.v = state.v;
        Ok(())
    }

    /// One update with `grads` (same order as the parameters) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64, c: &TrainConfig) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t);
        let bc2 = 1.0 - c.beta2.powi(self.t);
        for (i, g) in grads.iter().enumerate() {
            let p = &self.params[i];
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            p.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Where a run stands: optimiser steps taken, and AdamW's moments (in parameter order). Saved
/// when a run stops early, so that it can resume exactly where it left off.
#[derive(Clone)]
pub struct Resume {
    pub step: usize,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens (prompt and completion) run through the model in this step.
    pub tokens: usize,
}

/// Trains the model's LoRA parameters on `examples`; `on_step` sees every step (with the
/// optimiser, whose state it may save) and may stop the run early by returning false. With `resume` the first `resume.step` steps are skipped
/// (the example order is seeded, so the run continues where it stopped) and the optimiser
/// starts from the saved moments. Returns the reports of the steps taken and the final state.
pub fn train(
    model: &mut Llama,
    params: &[Var],
    examples: &[Example],
    config: &TrainConfig,
    resume: Option<Resume>,
    mut on_step: impl FnMut(&StepReport, &AdamW) -> Result<bool>,
) -> Result<(Vec<StepReport>, Resume)> {
    if examples.is_empty() {
        return Err(BackendError::Options("no training examples".into()));
    }
    let per_step = config.micro_batch.max(1) * config.grad_accum.max(1);
    let steps_per_epoch = examples.len().div_ceil(per_step);
    let total = steps_per_epoch * config.epochs.max(1);
    let mut opt = AdamW::new(params.to_vec())?;
    let start = resume.as_ref().map_or(0, |r| r.step);
    if start > total {
        return Err(BackendError::Options(format!(
            "the saved run took {start} steps but this one has only {total}"
        )));
    }
    if let Some(state) = resume {
        opt.restore(state)?;
    }
    let mut reports = Vec::with_capacity(total - start);
    model.set_training(true);
    let mut step = 0;
    'epochs: for epoch in 0..config.epochs.max(1) {
        let order = shuffled(examples.len(), config.seed.wrapping_add(epoch as u64));
        for chunk in order.chunks(per_step) {
            if step < start {
                step += 1;
                continue;
            }
            let micro: Vec<&[usize]> = chunk.chunks(config.micro_batch.max(1)).collect();
            let mut sum: Option<Vec<Tensor>> = None;
            let mut loss_sum = 0.0;
            let mut tokens = 0;
            for (k, batch) in micro.iter().enumerate() {
                let rows: Vec<&Example> = batch.iter().map(|&i| &examples[i]).collect();
                tokens += rows.iter().map(|e| e.ids.len()).sum::<usize>();
                let seed = config
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((step * 64 + k) as u64);
                let longest = rows.iter().map(|e| e.ids.len()).max().unwrap_or(0);
                // The portable path's products keep their (dequantized) weights in the graph:
                // recomputing one layer at a time holds one layer's weights, not all of them.
                let checkpoint =
                    model.ops().is_portable() || rows.len() * longest > config.checkpoint_tokens;
                let (value, g) = loss_and_grads(model, &rows, params, seed, checkpoint)?;
                if !value.is_finite() {
                    model.set_training(false);
                    return Err(BackendError::Internal(format!(
                        "the loss became {value} at step {}; lower the learning rate (the adapter of the last good step is kept)",
                        step + 1
                    )));
                }
                loss_sum += value;
                sum = Some(match sum {
                    None => g,
                    Some(acc) => acc
                        .iter()
                        .zip(&g)
                        .map(|(a, b)| a + b)
                        .collect::<candle_core::Result<_>>()?,
                });
            }
            let n = micro.len() as f64;
            let mut grads: Vec<Tensor> = sum
                .expect("at least one micro-batch")
                .iter()
                .map(|g| g / n)
                .collect::<candle_core::Result<_>>()?;
            let norm = grads
                .iter()
                .map(|g| g.sqr()?.sum_all()?.to_scalar::<f32>())
                .sum::<candle_core::Result<f32>>()?
                .sqrt() as f64;
            if config.clip > 0.0 && norm > config.clip {
                let scale = config.clip / norm;
                grads = grads
                    .iter()
                    .map(|g| g * scale)
                    .collect::<candle_core::Result<_>>()?;
            }
            let lr = config.lr_at(step, total);
            opt.step(&grads, lr, config)?;
            let report = StepReport {
                step: step + 1,
                total_steps: total,
                epoch: epoch + 1,
                loss: loss_sum / n,
                lr,
                grad_norm: norm,
                tokens,
            };
            reports.push(report);
            step += 1;
            if !on_step(&report, &opt)? {
                break 'epochs;
            }
        }
    }
    model.set_training(false);
    Ok((reports, opt.state(step)))
}

/// The right-padded token rows of a micro-batch, and for the loss: the flat positions whose next
/// token is a completion token, with those tokens.
fn batch_layout(rows: &[&Example]) -> (Vec<Vec<u32>>, Vec<u32>, Vec<u32>) {
    let longest = rows.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let tokens: Vec<Vec<u32>> = rows
        .iter()
        .map(|e| {
            let mut ids = e.ids.clone();
            ids.resize(longest, 0);
            ids
        })
        .collect();
    // Positions whose next token is a completion token, and those tokens.
    let mut at = Vec::new();
    let mut targets = Vec::new();
    for (r, e) in rows.iter().enumerate() {
        for p in e.prompt_len - 1..e.ids.len() - 1 {
            at.push((r * longest + p) as u32);
            targets.push(e.ids[p + 1]);
        }
    }
    (tokens, at, targets)
}

/// Mean cross-entropy over the completion tokens of `hidden` (B, T, H), final-normalised:
/// logits are made for those positions only, a few rows at a time (see [`CrossEntropy`]).
fn head_loss(model: &Llama, hidden: &Tensor, at: &[u32], targets: &[u32]) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let picked = hidden
        .reshape((b * t, h))?
        .index_select(&Tensor::new(at, hidden.device())?, 0)?;
    if model.ops().is_portable() {
        return Ok(crate::ops::portable::cross_entropy(
            &model.logits(&picked)?,
            targets,
        )?);
    }
    let op = CrossEntropy::new(model.output_projection(), targets.to_vec());
    Ok(op.forward(&picked)?)
}

/// Mean cross-entropy over the completion tokens of a right-padded micro-batch, as one graph
/// (padding sits after each sequence, so causal attention keeps it out of every real position).
pub fn completion_loss(model: &Llama, rows: &[&Example], dropout_seed: u64) -> Result<Tensor> {
    let (tokens, at, targets) = batch_layout(rows);
    let positions = vec![0; rows.len()];
    let (mut x, pass) = model.embed(&tokens, &positions, None, 0)?;
    for l in 0..model.num_layers() {
        x = model.block(l, &x, &pass, None, dropout_seed)?.0;
    }
    head_loss(model, &model.final_norm(&x)?, &at, &targets)
}

/// The loss of a micro-batch and the gradient of every parameter (zeros where none reached).
///
/// With `checkpoint` (activation checkpointing) the forward pass keeps only each layer's
/// input; the backward pass recomputes one layer at a time (with the same dropout masks) and
/// backpropagates through it alone. Peak memory then holds one layer's graph instead of all of
/// them, for one extra forward pass. Without it the whole graph is kept and walked once.
pub fn loss_and_grads(
    model: &Llama,
    rows: &[&Example],
    params: &[Var],
    dropout_seed: u64,
    checkpoint: bool,
) -> Result<(f64, Vec<Tensor>)> {
    let mut sums: Vec<Option<Tensor>> = vec![None; params.len()];
    let value = if checkpoint {
        checkpointed(model, rows, params, dropout_seed, &mut sums)?
    } else {
        let loss = completion_loss(model, rows, dropout_seed)?;
        let store = loss.backward()?;
        for (sum, p) in sums.iter_mut().zip(params) {
            *sum = store.get(p.as_tensor()).cloned();
        }
        f64::from(loss.to_scalar::<f32>()?)
    };
    let grads = sums
        .into_iter()
        .zip(params)
        .map(|(g, p)| match g {
            Some(g) => Ok(g),
            None => p.as_tensor().zeros_like(),
        })
        .collect::<candle_core::Result<_>>()?;
    Ok((value, grads))
}

/// The checkpointed pass of [`loss_and_grads`]: adds each parameter's gradient into `sums`.
fn checkpointed(
    model: &Llama,
    rows: &[&Example],
    params: &[Var],
    dropout_seed: u64,
    sums: &mut [Option<Tensor>],
) -> Result<f64> {
    let (tokens, at, targets) = batch_layout(rows);
    let positions = vec![0; rows.len()];
    let (mut x, pass) = model.embed(&tokens, &positions, None, 0)?;
    let layers = model.num_layers();
    let mut inputs = Vec::with_capacity(layers);
    for l in 0..layers {
        let (y, _) = model.block(l, &x, &pass, None, dropout_seed)?;
        inputs.push(x);
        x = y.detach();
    }
    let top = Var::from_tensor(&x)?;
    let loss = head_loss(model, &model.final_norm(top.as_tensor())?, &at, &targets)?;
    let value = f64::from(loss.to_scalar::<f32>()?);
    let store = loss.backward()?;
    let mut grad_out = store
        .get(top.as_tensor())
        .cloned()
        .ok_or_else(|| BackendError::Internal("no gradient reached the last layer".into()))?;
    for l in (0..layers).rev() {
        let input = Var::from_tensor(&inputs[l])?;
        let (y, _) = model.block(l, input.as_tensor(), &pass, None, dropout_seed)?;
        let store = (y * &grad_out)?.sum_all()?.backward()?;
        for (sum, p) in sums.iter_mut().zip(params) {
            if let Some(g) = store.get(p.as_tensor()) {
                *sum = Some(match sum.take() {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
        }
        grad_out = store
            .get(input.as_tensor())
            .cloned()
            .ok_or_else(|| BackendError::Internal(format!("no gradient reached layer {l}")))?;
    }
    Ok(value)
}

/// A seeded permutation of 0..n (Fisher-Yates over a 64-bit LCG).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut s = seed ^ 0xd1b5_4a32_d192_ed03;
    for i in (1..n).rev() {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = ((s >> 33) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_warm_up_then_follow_their_shape() {
        let mut c = TrainConfig {
            lr: 1.0,
            warmup_ratio: 0.1,
            ..TrainConfig::default()
        };
        assert!((c.lr_at(0, 100) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9, 100) - 1.0).abs() < 1e-12);
        assert_eq!(c.lr_at(50, 100), 1.0);
        c.schedule = Schedule::Linear;
        assert!((c.lr_at(10, 100) - 1.0).abs() < 1e-12);
        assert!(c.lr_at(99, 100) < 0.02);
        c.schedule = Schedule::Cosine;
        assert!((c.lr_at(55, 100) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn long_examples_lose_the_start_of_the_prompt_never_the_completion() {
        let e = Example::new((0..10).collect(), vec![100, 101], 6).unwrap();
        assert_eq!(e.ids, vec![6, 7, 8, 9, 100, 101]);
        assert_eq!(e.prompt_len, 4);
        assert!(Example::new(vec![1], vec![], 6).is_err());
        assert!(Example::new(vec![], vec![1], 6).is_err());
        assert!(Example::new(vec![1], vec![1; 6], 6).is_err());
    }

    #[test]
    fn training_an_adapter_on_the_tiny_model_cuts_the_loss() {
        // A toy task: after any prompt, answer the same three tokens. From a random model (loss
        // about ln(50) = 3.9) LoRA on the NF4 base must bring the loss below a third of where it
        // started within 40 steps, on the fused path and on the portable one (which trains
        // with activation checkpointing always) alike.
        for portable in [false, true] {
            let mut model = crate::model::llama::testing::tiny_model();
            if portable {
                model.set_ops(crate::ops::OpSet::Portable).unwrap();
            }
            model.quantize_nf4(true).unwrap();
            let params: Vec<Var> = model
                .add_lora(&crate::model::llama::TARGETS, 8, 16.0, 0.0, 1)
                .unwrap()
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            let examples: Vec<Example> = (0..32u32)
                .map(|i| {
                    Example::new(
                        vec![i % 50, (i * 7) % 50, (i * 13) % 50],
                        vec![7, 21, 7],
                        64,
                    )
                    .unwrap()
                })
                .collect();
            let config = TrainConfig {
                lr: 1e-2,
                micro_batch: 4,
                grad_accum: 2,
                epochs: 10,
                clip: 1.0,
                ..TrainConfig::default()
            };
            let (reports, _) = train(&mut model, &params, &examples, &config, None, |_, _| {
                Ok(true)
            })
            .unwrap();
            assert_eq!(reports.len(), 40);
            let first = reports[0].loss;
            let last = reports.last().unwrap().loss;
            assert!(
                last < first / 3.0,
                "portable={portable}: loss went from {first} to {last}"
            );
        }
    }

    #[test]
    fn training_over_gguf_blocks_equals_training_over_their_f32_copy() {
        // The blocks decode to the very values of the f32 copy, through the same products: the
        // same losses and the same adapter, bit for bit, with none of the f32 projections (nor
        // the embedding) kept.
        use crate::model::weights::Packing;
        let run = |blocks: bool| {
            let packing = if blocks {
                Packing::Blocks
            } else {
                Packing::F32
            };
            let (config, mut weights) = crate::model::llama::testing::tiny_weights_q4_1(packing);
            let mut model = Llama::new(config, &mut weights, &Device::Cpu).unwrap();
            if blocks {
                assert_eq!(model.keep_projections_in_blocks().unwrap(), 14);
            }
            let params: Vec<Var> = model
                .add_lora(&crate::model::llama::TARGETS, 4, 8.0, 0.1, 1)
                .unwrap()
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            let examples: Vec<Example> = (0..8u32)
                .map(|i| Example::new(vec![i % 50, (i * 7) % 50], vec![7, 21, 7], 64).unwrap())
                .collect();
            let config = TrainConfig {
                lr: 1e-2,
                micro_batch: 4,
                epochs: 2,
                ..TrainConfig::default()
            };
            let (reports, _) = train(&mut model, &params, &examples, &config, None, |_, _| {
                Ok(true)
            })
            .unwrap();
            let losses: Vec<u64> = reports.iter().map(|r| r.loss.to_bits()).collect();
            let values: Vec<Vec<f32>> = params
                .iter()
                .map(|p| p.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            (losses, values)
        };
        let (dense, blocks) = (run(false), run(true));
        assert_eq!(dense.0.len(), 4);
        assert_eq!(dense, blocks);
    }

    #[test]
    fn a_model_without_blocks_cannot_train_over_them() {
        let mut model = crate::model::llama::testing::tiny_model();
        let e = model.keep_projections_in_blocks().unwrap_err().to_string();
        assert!(
            e.contains("holds none") && e.contains("use base = \"nf4\""),
            "{e}"
        );
    }

    /// The loss and gradients of `rows` on the tiny NF4 model with random (non-zero) adapters.
    fn tiny_gradients(training: bool, dropout: f32, checkpoint: bool) -> (f64, Vec<Vec<f32>>) {
        tiny_gradients_on(&Device::Cpu, training, dropout, checkpoint, false, false)
    }

    /// The loss and gradients of the tiny model on `device` (off the CPU the path is portable;
    /// on it, `portable` chooses), with `bf16` products where the CPU has a kernel (and the
    /// shapes fit it: the rank-4 adapters' products here stay f32).
    pub(crate) fn tiny_gradients_on(
        device: &Device,
        training: bool,
        dropout: f32,
        checkpoint: bool,
        bf16: bool,
        portable: bool,
    ) -> (f64, Vec<Vec<f32>>) {
        let (config, mut weights) = crate::model::llama::testing::tiny_weights();
        let mut model = Llama::new(config, &mut weights, device).unwrap();
        if portable {
            model.set_ops(crate::ops::OpSet::Portable).unwrap();
        }
        model.quantize_nf4(false).unwrap();
        let named = model
            .add_lora(&crate::model::llama::TARGETS, 4, 8.0, dropout, 2)
            .unwrap();
        let params: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        for (i, p) in params.iter().enumerate() {
            let n = p.as_tensor().elem_count();
            let v = crate::model::llama::testing::uniform(n, 0.1, 70 + i as u64);
            p.set(&Tensor::from_vec(v, p.as_tensor().shape(), device).unwrap())
                .unwrap();
        }
        model.set_training(training);
        model.set_bf16(bf16);
        let a = Example::new(vec![1, 2, 3, 4], vec![5, 6], 32).unwrap();
        let b = Example::new(vec![9, 8], vec![7, 6, 5], 32).unwrap();
        let (value, grads) = loss_and_grads(&model, &[&a, &b], &params, 5, checkpoint).unwrap();
        let grads = grads
            .iter()
            .map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        (value, grads)
    }

    pub(crate) fn assert_same(a: &(f64, Vec<Vec<f32>>), b: &(f64, Vec<Vec<f32>>)) {
        assert!((a.0 - b.0).abs() < 1e-5, "loss {} vs {}", a.0, b.0);
        for (x, y) in a.1.iter().flatten().zip(b.1.iter().flatten()) {
            assert!((x - y).abs() < 1e-4 + 1e-3 * x.abs(), "{x} vs {y}");
        }
    }

    #[test]
    fn checkpointed_gradients_equal_whole_graph_gradients() {
        // Composed ops (evaluation mode, no dropout) and fused training ops with dropout.
        assert_same(
            &tiny_gradients(false, 0.0, true),
            &tiny_gradients(false, 0.0, false),
        );
        assert_same(
            &tiny_gradients(true, 0.2, true),
            &tiny_gradients(true, 0.2, false),
        );
    }

    #[test]
    fn bf16_products_give_gradients_close_to_f32() {
        // Where the CPU has a bf16 kernel the frozen products run in bf16: 8 bits of mantissa
        // per operand (the adapter's are checked in `fused`).
        // Elsewhere both runs are f32 and equal.
        let (f32_loss, f32_grads) = tiny_gradients_on(&Device::Cpu, true, 0.0, false, false, false);
        let (bf_loss, bf_grads) = tiny_gradients_on(&Device::Cpu, true, 0.0, false, true, false);
        assert!(
            (f32_loss - bf_loss).abs() < 2e-2 * f32_loss.abs(),
            "{f32_loss} vs {bf_loss}"
        );
        let (mut diff, mut norm) = (0f64, 0f64);
        for (a, b) in f32_grads.iter().flatten().zip(bf_grads.iter().flatten()) {
            diff += f64::from(a - b).powi(2);
            norm += f64::from(*a).powi(2);
        }
        let rel = (diff / norm).sqrt();
        assert!(rel < 5e-2, "bf16 gradients are {rel} off in relative norm");
        eprintln!(
            "bf16 ({:?}): loss {bf_loss} vs {f32_loss}, gradients {rel:.2e} off",
            crate::ops::bf16::kernel()
        );
    }

    #[test]
    fn fused_training_ops_give_the_gradients_of_the_composed_model() {
        assert_same(
            &tiny_gradients(true, 0.0, false),
            &tiny_gradients(false, 0.0, false),
        );
    }

    #[test]
    fn the_portable_path_gives_the_gradients_of_the_fused_ops() {
        // What runs on CUDA, checked on the CPU: NF4 dequantized by tensor ops and composed
        // attention, norms and loss, with the same dropout masks; whole graph and checkpointed.
        for checkpoint in [false, true] {
            assert_same(
                &tiny_gradients_on(&Device::Cpu, true, 0.2, checkpoint, false, true),
                &tiny_gradients_on(&Device::Cpu, true, 0.2, checkpoint, false, false),
            );
        }
    }

    #[test]
    fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
        let setup = || {
            let mut model = crate::model::llama::testing::tiny_model();
            model.quantize_nf4(true).unwrap();
            let params: Vec<Var> = model
                .add_lora(&crate::model::llama::TARGETS, 4, 8.0, 0.1, 3)
                .unwrap()
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            (model, params)
        };
        let values = |params: &[Var]| -> Vec<Vec<f32>> {
            params
                .iter()
                .map(|p| p.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        let examples: Vec<Example> = (0..16u32)
            .map(|i| Example::new(vec![i % 50, (i * 3) % 50], vec![7, 21], 64).unwrap())
            .collect();
        let config = TrainConfig {
            lr: 1e-2,
            micro_batch: 4,
            epochs: 2,
            warmup_ratio: 0.25,
            schedule: Schedule::Linear,
            ..TrainConfig::default()
        };
        let (mut m1, p1) = setup();
        let (all, _) = train(&mut m1, &p1, &examples, &config, None, |_, _| Ok(true)).unwrap();
        assert_eq!(all.len(), 8);
        let (mut m2, p2) = setup();
        let (first, state) = train(
            &mut m2,
            &p2,
            &examples,
            &config,
            None,
            |r, _| Ok(r.step < 3),
        )
        .unwrap();
        assert_eq!((first.len(), state.step), (3, 3));
        let (mut m3, p3) = setup();
        for (p, v) in p3.iter().zip(&p2) {
            p.set(v.as_tensor()).unwrap();
        }
        let (rest, end) = train(&mut m3, &p3, &examples, &config, Some(state), |_, _| {
            Ok(true)
        })
        .unwrap();
        assert_eq!(rest.first().map(|r| r.step), Some(4));
        assert_eq!(end.step, 8);
        assert_eq!(
            rest,
            all[3..].to_vec(),
            "the resumed steps repeat the uninterrupted ones"
        );
        assert_eq!(values(&p3), values(&p1));
    }

    #[test]
    fn shuffles_are_seeded_permutations() {
        let a = shuffled(100, 1);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shuffled(100, 1));
        assert_ne!(a, shuffled(100, 2));
    }
}

/// Checks that need a GPU: built with the `cuda` feature, they run where CUDA device 0 opens
/// (and say they were skipped elsewhere).
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use super::tests::{assert_same, tiny_gradients_on};
    use candle_core::Device;

    #[test]
    fn training_on_cuda_gives_the_gradients_of_the_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        for checkpoint in [false, true] {
            let on_gpu = tiny_gradients_on(&gpu, true, 0.2, checkpoint, false, true);
            let on_cpu = tiny_gradients_on(&Device::Cpu, true, 0.2, checkpoint, false, false);
            eprintln!("CUDA loss {} vs CPU {}", on_gpu.0, on_cpu.0);
            assert_same(&on_gpu, &on_cpu);
        }
    }
}
