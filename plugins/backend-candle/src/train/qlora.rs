//! The backend's training entry point: options from TOML, examples tokenized, the base
//! quantized to NF4 (or kept in the GGUF's own blocks), adapters attached, the trainer run, the
//! adapter kept for saving.

use std::path::Path;
use std::time::Instant;

use candle_core::Var;
use harness_abi::TrainExample;
use serde::{Deserialize, Serialize};

use crate::error::{BackendError, Result};
use crate::model::engine::Engine;
use crate::model::llama::TARGETS;
use crate::train::adapter::{save_peft, write_tensors, AdapterSpec};
use crate::train::trainer::{self, Example, Resume, Schedule, StepReport, TrainConfig};

/// The training options as given (`--train-option KEY=VALUE`, a train config's `[train]`), with
/// the QLoRA paper's defaults; recorded in train.toml by serializing this struct, except the
/// two paths of the invocation (`resume`, `checkpoint_dir`), which say where, not what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainArgs {
    pub r: u64,
    pub alpha: f64,
    pub dropout: f64,
    /// LoRA targets among the projections (`q_proj,v_proj` or a list).
    pub targets: Vec<String>,
    /// The frozen base: the checkpoint's weights in NF4 (QLoRA), or a GGUF's own blocks.
    pub base: TrainBase,
    pub double_quant: bool,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    pub schedule: Schedule,
    pub micro_batch: u64,
    pub grad_accum: u64,
    pub max_seq_len: u64,
    pub epochs: u64,
    pub clip: f64,
    pub seed: u64,
    pub checkpoint_tokens: u64,
    /// Products in bf16 (where the CPU has AMX or AVX512-BF16) or all in f32.
    pub compute: Compute,
    pub save_every: u64,
    /// An unfinished run's folder to continue from (its adapter and optimizer.safetensors).
    #[serde(skip_serializing)]
    pub resume: Option<std::path::PathBuf>,
    /// Where to save a resumable checkpoint every `save_every` steps.
    #[serde(skip_serializing)]
    pub checkpoint_dir: Option<std::path::PathBuf>,
}

/// The `base` training option: what the frozen projections are during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainBase {
    /// Quantized to NF4 with the QLoRA paper's recipe: the adapter learns on top of their
    /// 4-bit round trip, and is evaluated on it (the backend's `base = "nf4"`).
    #[default]
    Nf4,
    /// The GGUF checkpoint's own Q4_1/Q8_0 blocks, decoded in every product to exactly the f32
    /// values inference uses: the adapter learns on the model users run, and is evaluated on
    /// the checkpoint as it is (the backend's `base = "f32"`).
    Gguf,
}

impl TrainBase {
    /// The name the option and the adapter's metadata use.
    pub fn name(self) -> &'static str {
        match self {
            TrainBase::Nf4 => "nf4",
            TrainBase::Gguf => "gguf",
        }
    }
}

/// The `compute` training option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    Bf16,
    F32,
}

impl Default for TrainArgs {
    fn default() -> Self {
        let d = TrainConfig::default();
        TrainArgs {
            r: 32,
            alpha: 16.0,
            dropout: 0.1,
            targets: TARGETS.iter().map(|s| s.to_string()).collect(),
            base: TrainBase::Nf4,
            double_quant: true,
            lr: d.lr,
            beta1: d.beta1,
            beta2: d.beta2,
            weight_decay: d.weight_decay,
            warmup_ratio: d.warmup_ratio,
            schedule: d.schedule,
            micro_batch: d.micro_batch as u64,
            grad_accum: d.grad_accum as u64,
            max_seq_len: d.max_seq_len as u64,
            epochs: d.epochs as u64,
            clip: d.clip,
            seed: d.seed,
            checkpoint_tokens: d.checkpoint_tokens as u64,
            compute: Compute::Bf16,
            save_every: 100,
            resume: None,
            checkpoint_dir: None,
        }
    }
}

/// The training options, checked: as given (`args`, what is recorded) and the optimiser's
/// settings made of them.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub args: TrainArgs,
    pub optimizer: TrainConfig,
}

impl TrainOptions {
    pub fn from_toml(text: &str) -> Result<Self> {
        let args = harness_abi::options::read(NAME, text).map_err(BackendError::Options)?;
        TrainOptions::new(args)
    }

    /// Checks the values the types do not.
    pub fn new(args: TrainArgs) -> Result<Self> {
        let bad = |m: String| Err(BackendError::Options(format!("{NAME}: {m}")));
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                return bad(format!(
                    "unknown LoRA target `{t}`; choose among {}",
                    TARGETS.join(", ")
                ));
            }
        }
        if args.targets.is_empty() {
            return bad(format!(
                "`targets` names none; choose among {}",
                TARGETS.join(", ")
            ));
        }
        for (key, v) in [
            ("r", args.r),
            ("micro_batch", args.micro_batch),
            ("grad_accum", args.grad_accum),
            ("max_seq_len", args.max_seq_len),
            ("epochs", args.epochs),
            ("save_every", args.save_every),
        ] {
            if v == 0 {
                return bad(format!("`{key}` must be at least 1"));
            }
        }
        if !(0.0..1.0).contains(&args.dropout) {
            return bad("`dropout` must be in [0, 1)".into());
        }
        for (key, v) in [
            ("alpha", args.alpha),
            ("lr", args.lr),
            ("weight_decay", args.weight_decay),
            ("clip", args.clip),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!(
                    "`{key}` must be a finite number of 0 or more, got {v}"
                ));
            }
        }
        for (key, v) in [
            ("beta1", args.beta1),
            ("beta2", args.beta2),
            ("warmup_ratio", args.warmup_ratio),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("`{key}` must be in [0, 1), got {v}"));
            }
        }
        let d = TrainConfig::default();
        Ok(TrainOptions {
            optimizer: TrainConfig {
                lr: args.lr,
                beta1: args.beta1,
                beta2: args.beta2,
                eps: d.eps,
                weight_decay: args.weight_decay,
                warmup_ratio: args.warmup_ratio,
                schedule: args.schedule,
                micro_batch: args.micro_batch as usize,
                grad_accum: args.grad_accum as usize,
                max_seq_len: args.max_seq_len as usize,
                epochs: args.epochs as usize,
                clip: args.clip,
                seed: args.seed,
                checkpoint_tokens: args.checkpoint_tokens as usize,
            },
            args,
        })
    }

    /// Products in bf16 (`compute = "bf16"`, the default, used where the CPU has AMX or
    /// AVX512-BF16; see `crate::ops::bf16`): the frozen base's and the adapter's, operands
    /// rounded to bf16 and sums kept in f32, as QLoRA's bf16 compute dtype. Or all in f32.
    /// The adapter's weights, their gradients and the optimiser are f32 always.
    pub fn bf16(&self) -> bool {
        self.args.compute == Compute::Bf16
    }

    /// The options as TOML, with a comment on how the products really ran: `portable` when
    /// the model is on the portable path (off the CPU), which computes in f32.
    pub fn to_toml(&self, portable: bool) -> String {
        let record = harness_abi::options::record(&self.args).unwrap_or_default();
        record
            + &match (self.bf16(), portable, crate::ops::bf16::kernel()) {
                (false, ..) => String::new(),
                (true, true, _) => {
                    "# compute ran in f32: the portable path (off the CPU) has no bf16 products\n"
                        .into()
                }
                (true, false, Some(k)) => format!("# bf16 products on {}\n", k.name()),
                (true, false, None) => {
                    "# compute ran in f32: this CPU has neither AMX nor AVX512-BF16\n".into()
                }
            }
    }
}

/// The name training errors start with.
const NAME: &str = "candle train";

/// A trained (or training) adapter, kept for saving.
pub struct Trained {
    pub spec: AdapterSpec,
    pub params: Vec<(String, Var)>,
    /// The optimiser's state when the run stopped before its last step (saved for `resume`).
    pub unfinished: Option<Resume>,
}

/// What [`run`] returns besides the adapter.
pub struct Outcome {
    pub reports: Vec<StepReport>,
    pub examples: usize,
    pub seconds: f64,
    pub stopped_early: bool,
}

/// The file beside the adapter that holds an unfinished run's checkpoint: its parameters,
/// AdamW's moments and the step, in one file so that it is always consistent.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Quantizes the base to NF4 (unless it was loaded packed) or keeps it in the checkpoint's
/// blocks (`base = "gguf"`), attaches fresh adapters (or the
/// saved ones of `opts.resume`) and trains them. `trained` holds the adapter from the moment
/// it exists, so that the last good step can be saved even when training fails (a NaN loss).
pub fn run(
    engine: &mut Engine,
    model_name: &str,
    examples: &[TrainExample],
    opts: &TrainOptions,
    trained: &mut Option<Trained>,
    mut on_step: impl FnMut(&StepReport) -> bool,
) -> Result<Outcome> {
    let start = Instant::now();
    let positions = engine.model_mut().config().max_position_embeddings;
    if opts.optimizer.max_seq_len > positions {
        return Err(BackendError::Options(format!(
            "max_seq_len = {} is longer than the model's {positions} positions; lower it",
            opts.optimizer.max_seq_len
        )));
    }
    crate::keep_freed_memory();
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
    let args = &opts.args;
    match args.base {
        TrainBase::Nf4 => model.quantize_nf4(args.double_quant)?,
        TrainBase::Gguf => {
            model.keep_projections_in_blocks()?;
        }
    }
    model.set_bf16(opts.bf16());
    let targets: Vec<&str> = args.targets.iter().map(String::as_str).collect();
    let params = model.add_lora(
        &targets,
        args.r as usize,
        args.alpha,
        args.dropout as f32,
        opts.optimizer.seed,
    )?;
    let resume = match &args.resume {
        Some(dir) => Some(load_state(dir, &params)?),
        None => None,
    };
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    *trained = Some(Trained {
        spec: AdapterSpec {
            r: args.r as usize,
            alpha: args.alpha,
            dropout: args.dropout,
            target_modules: args.targets.clone(),
            base_model: model_name.to_string(),
            trained_on: args.base,
        },
        params,
        unfinished: None,
    });
    let mut stopped_early = false;
    let adapter = trained.as_ref().expect("set above");
    let (reports, state) = trainer::train(
        model,
        &vars,
        &tokenized,
        &opts.optimizer,
        resume,
        |r, opt| {
            if let Some(dir) = &args.checkpoint_dir {
                let every = args.save_every as usize;
                if every > 0 && r.step % every == 0 && r.step < r.total_steps {
                    // A checkpoint a killed run can resume from.
                    adapter.write(dir, Some(&opt.state(r.step)))?;
                }
            }
            let go_on = on_step(r);
            stopped_early = !go_on && r.step < r.total_steps;
            Ok(go_on)
        },
    )?;
    if let Some(t) = trained.as_mut() {
        t.unfinished = stopped_early.then_some(state);
    }
    Ok(Outcome {
        reports,
        examples: tokenized.len(),
        seconds: start.elapsed().as_secs_f64(),
        stopped_early,
    })
}

/// Loads an unfinished run's checkpoint from `dir` (optimizer.safetensors: parameters, moments
/// and step): the parameters into `params` (same names and shapes), and the optimiser state.
fn load_state(dir: &Path, params: &[(String, Var)]) -> Result<Resume> {
    let bad =
        |why: String| BackendError::Options(format!("cannot resume from {}: {why}", dir.display()));
    let (state, meta) = read_tensors_with_meta(&dir.join(OPTIMIZER_FILE)).map_err(|_| {
        bad(format!(
            "no {OPTIMIZER_FILE}: the run finished, or ended before its first checkpoint; start it again without --resume"
        ))
    })?;
    let step: usize = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("{OPTIMIZER_FILE} does not say its step")))?;
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (name, var) in params {
        let find = |map: &std::collections::HashMap<String, candle_core::Tensor>, key: &str| {
            map.get(key).cloned().ok_or_else(|| {
                bad(format!(
                    "`{key}` is missing; was it trained with the same options?"
                ))
            })
        };
        let value = find(&state, &format!("p.{name}"))?;
        if value.shape() != var.as_tensor().shape() {
            return Err(bad(format!(
                "`{name}` has shape {:?}, this run's has {:?}",
                value.dims(),
                var.as_tensor().dims()
            )));
        }
        let device = var.as_tensor().device();
        var.set(&value.to_device(device)?)?;
        m.push(find(&state, &format!("m.{name}"))?.to_device(device)?);
        v.push(find(&state, &format!("v.{name}"))?.to_device(device)?);
    }
    Ok(Resume { step, m, v })
}

/// The f32 tensors of a safetensors file and its metadata.
#[allow(clippy::type_complexity)]
fn read_tensors_with_meta(
    path: &Path,
) -> Result<(
    std::collections::HashMap<String, candle_core::Tensor>,
    std::collections::HashMap<String, String>,
)> {
    let bytes = std::fs::read(path).map_err(|cause| BackendError::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    let corrupt = |e: String| BackendError::Checkpoint(format!("{}: {e}", path.display()));
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .map_err(|e| corrupt(e.to_string()))?;
    Ok((tensors, meta))
}

impl Trained {
    /// Writes the adapter in PEFT layout; an unfinished run also writes its optimiser state
    /// (a finished one removes any left from before).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.write(dir, self.unfinished.as_ref())
    }

    /// The adapter and, for an unfinished run, its checkpoint `unfinished`.
    fn write(&self, dir: &Path, unfinished: Option<&Resume>) -> Result<()> {
        save_peft(dir, &self.spec, &self.params)?;
        let path = dir.join(OPTIMIZER_FILE);
        match unfinished {
            Some(state) => {
                let mut tensors = Vec::new();
                // The parameters too: this one file (renamed into place whole) is the
                // checkpoint, so a kill while saving cannot pair moments with other weights.
                for (i, (name, var)) in self.params.iter().enumerate() {
                    tensors.push((format!("p.{name}"), var.as_tensor().clone()));
                    tensors.push((format!("m.{name}"), state.m[i].clone()));
                    tensors.push((format!("v.{name}"), state.v[i].clone()));
                }
                let meta = [("step".to_string(), state.step.to_string())];
                write_tensors(&path, &tensors, &meta)
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(BackendError::Io { path, cause: e })
                }
                _ => Ok(()),
            },
        }
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
            (o.args.r, o.args.alpha, o.args.dropout, o.args.targets.len()),
            (32, 16.0, 0.1, 7)
        );
        assert_eq!(
            (o.optimizer.lr, o.optimizer.clip, o.optimizer.epochs),
            (2e-4, 0.3, 1)
        );
        assert_eq!(o.optimizer.schedule, Schedule::Constant);
        assert!(o.args.double_quant);
        let e = TrainOptions::from_toml("rank = 8").unwrap_err().to_string();
        assert!(e.contains("unknown option `rank`"), "{e}");
        let e = TrainOptions::from_toml("targets = \"q_proj,lm_head\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown LoRA target `lm_head`"), "{e}");
        let again = TrainOptions::from_toml(&o.to_toml(false)).unwrap();
        assert_eq!(again, o);
        for (bad, why) in [
            ("r = 0", "`r` must be at least 1"),
            ("dropout = 1.5", "`dropout` must be in [0, 1)"),
            ("lr = -1", "`lr` must be a finite number"),
            (
                "schedule = \"steep\"",
                "must be one of `constant`, `linear`, `cosine`",
            ),
            ("compute = \"fp8\"", "must be one of `bf16`, `f32`"),
        ] {
            let e = TrainOptions::from_toml(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// Writes a PEFT compatibility case for `scripts/peft_check.py` into $HARNESS_PEFT_CHECK:
    /// a tiny random LLaMA in HF layout (model/), an adapter trained on it here (adapter/), and
    /// our next-token logits with and without the adapter (cases.json).
    #[test]
    #[ignore]
    fn export_peft_compatibility_case() {
        use crate::model::llama::{testing, KvCache, Llama, TARGETS};
        use crate::train::adapter::write_tensors;
        let dir = std::path::PathBuf::from(
            std::env::var("HARNESS_PEFT_CHECK").expect("set HARNESS_PEFT_CHECK to a folder"),
        );
        let (config, weights) = testing::tiny_weights();
        std::fs::create_dir_all(dir.join("model")).unwrap();
        let mut tensors: Vec<(String, candle_core::Tensor)> = weights
            .tensors()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        write_tensors(
            &dir.join("model/model.safetensors"),
            &tensors,
            &[("format".into(), "pt".into())],
        )
        .unwrap();
        let hf = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "vocab_size": config.vocab_size,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_theta,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        });
        std::fs::write(dir.join("model/config.json"), hf.to_string()).unwrap();

        let mut model = testing::tiny_model();
        let params = model.add_lora(&TARGETS, 4, 8.0, 0.1, 9).unwrap();
        let vars: Vec<candle_core::Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let examples: Vec<Example> = (0..32u32)
            .map(|i| {
                Example::new(vec![i % 50, (i * 7) % 50, 3], vec![(i * 11) % 50, 8], 64).unwrap()
            })
            .collect();
        let config = TrainConfig {
            lr: 1e-2,
            micro_batch: 4,
            epochs: 3,
            ..TrainConfig::default()
        };
        trainer::train(&mut model, &vars, &examples, &config, None, |_, _| Ok(true)).unwrap();
        let spec = AdapterSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            target_modules: TARGETS.iter().map(|s| s.to_string()).collect(),
            base_model: "tiny-random-llama".into(),
            trained_on: TrainBase::Nf4,
        };
        save_peft(&dir.join("adapter"), &spec, &params).unwrap();

        let base = testing::tiny_model();
        let logits = |m: &Llama, ids: &[u32]| -> Vec<f32> {
            let h = m
                .forward(&[ids.to_vec()], &[0], None, &mut KvCache::default())
                .unwrap();
            let last = h
                .narrow(1, ids.len() - 1, 1)
                .unwrap()
                .reshape((1, 64))
                .unwrap();
            m.logits(&last)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let cases: Vec<serde_json::Value> = [vec![1u32, 2, 3], vec![5, 9, 3, 30, 11, 7], vec![42]]
            .iter()
            .map(|ids| {
                serde_json::json!({
                    "ids": ids,
                    "with_adapter": logits(&model, ids),
                    "base": logits(&base, ids),
                })
            })
            .collect();
        std::fs::write(
            dir.join("cases.json"),
            serde_json::Value::from(cases).to_string(),
        )
        .unwrap();
    }
}
