//! Backend plugin `candle`: LLaMA-family models on candle, loaded from a GGUF file or a HF
//! folder, answering generation and multiple-choice requests.
//!
//! Key decision: one llama implementation of our own ([`llama`]) rather than
//! candle-transformers', because we need logits at chosen positions, batched decoding with
//! per-row positions and (next) LoRA on every projection. Weights are dequantized to f32 at load,
//! which is what the reference logits in `tests/fixtures/smollm2/` were computed with.

pub mod error;
pub mod model;
pub mod ops;
pub mod train;

use std::path::{Path, PathBuf};

use candle_core::Device;
use harness_abi::abi_stable::std_types::ROption;
use harness_abi::sdk::{
    BackendPlugin, BackendStats, ChatMessage, ChoiceRequest, ChoiceScore, GenerateRequest,
    Generation, ModelInfo, Prompt, PromptToken, TokenLogprob, TokenizerInfo, TrainExample,
    TrainStep, TrainSummary,
};
use serde::{Deserialize, Serialize};

use crate::error::{BackendError, Result};
use crate::model::engine::Engine;
use crate::model::weights::Packing;
use crate::train::qlora::{self, TrainArgs, TrainOptions};

const NAME: &str = "candle";

/// The backend's options as given (`--model`, `--adapter`, `--base`, `--device`, `--batch`,
/// `--backend-option`); recorded in run.toml with every default filled in and paths absolute,
/// which is what `harness eval --resume` loads the model with again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Options {
    /// A `.gguf` file or a HF folder (default: the fetched default model).
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter folder merged into the base weights.
    pub adapter: Option<PathBuf>,
    /// `f32`, `nf4`, `nf4-packed` or `gguf`. Default: with an adapter, the base it was trained
    /// over (`nf4`, or `f32` for one trained with `base = "gguf"`); else `gguf` for a GGUF of
    /// Q4_1/Q8_0 projections on the CPU (the same values as `f32`), else `f32`.
    pub base: Option<BaseKind>,
    /// Double quantization of the NF4 block maxima.
    pub double_quant: bool,
    /// Requests decoded together.
    pub max_batch: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The precision of evaluation's products: `f32` (exact) or `bf16`.
    pub compute: Compute,
}

/// The precision of evaluation's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// f32 throughout: the checkpoint's numbers, the reference fixtures' answers.
    #[default]
    F32,
    /// The projections' and output projection's products with both operands rounded to bf16
    /// and f32 sums, on the CPU's bf16 units (AMX, AVX512-BF16) where it has them and emulated
    /// in f32 elsewhere (the same numbers, no faster): see `ops::bf16::Bf16Matrix`.
    Bf16,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            model: None,
            adapter: None,
            base: None,
            double_quant: true,
            max_batch: 8,
            device: "cpu".into(),
            compute: Compute::F32,
        }
    }
}

/// The validated options of the backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// A `.gguf` file or a HF folder.
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder merged into the base weights.
    pub adapter: Option<PathBuf>,
    /// How the projection weights are held.
    pub base: BaseKind,
    /// Double quantization of the NF4 block maxima (`nf4` and `nf4-packed`).
    pub double_quant: bool,
    /// Requests decoded together.
    pub max_batch: usize,
    /// Where the model runs.
    pub device: DeviceSpec,
    /// The precision of evaluation's products.
    pub compute: Compute,
}

/// The device a model runs on, as the `device` option names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` is `cuda:0`); needs the `cuda` feature.
    Cuda(usize),
}

impl DeviceSpec {
    fn parse(text: &str) -> Result<Self> {
        let ordinal = match text {
            "cpu" => return Ok(DeviceSpec::Cpu),
            "cuda" => Some(0),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok()),
        };
        ordinal.map(DeviceSpec::Cuda).ok_or_else(|| {
            BackendError::Options(format!(
                "device `{text}` is not `cpu`, `cuda` or `cuda:N` (N the GPU's ordinal)"
            ))
        })
    }

    fn name(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// Opens the device: a clear error where this build has no CUDA or the GPU cannot be used.
    fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                BackendError::Options(format!(
                    "cannot open CUDA device {n}: {e}; check the GPU and its driver with nvidia-smi, or run on the CPU"
                ))
            }),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(BackendError::Options(
                "this candle backend was built without CUDA; build harness with it by scripts/build-cuda.sh and run target/cuda/release/harness, or run on the CPU".into(),
            )),
        }
    }
}

/// How the base's projection weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseKind {
    /// The checkpoint's values in f32.
    F32,
    /// Their NF4 round trip, held in f32: the numbers of the QLoRA base at full inference speed
    /// (the default when an adapter is given).
    Nf4,
    /// Packed NF4 from the moment each is read, dequantized tile by tile in every product: the
    /// QLoRA training base, with no full-precision copy of the projections at any time.
    Nf4Packed,
    /// A GGUF's own quantized blocks (Q4_1, Q8_0), decoded tile by tile in every product into
    /// exactly the values of `f32`, with no f32 copy of the projections kept: the base of
    /// training with `base = "gguf"`, and inference in less memory.
    Gguf,
}

impl Config {
    /// Reads and checks options given as TOML.
    pub fn from_toml(text: &str) -> Result<Self> {
        let mut o = harness_abi::options::read(NAME, text).map_err(BackendError::Options)?;
        Config::new(&mut o)
    }

    /// Checks the options and writes back what was resolved: the model (the default one when
    /// none is given) and the adapter as absolute paths, the base, the device's canonical name.
    pub fn new(o: &mut Options) -> Result<Self> {
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let model = absolute(
            &o.model
                .clone()
                .unwrap_or_else(harness_abi::paths::default_model),
        );
        let adapter = o.adapter.as_deref().map(absolute);
        if o.max_batch == 0 {
            return Err(BackendError::Options(
                "`max_batch` must be at least 1".into(),
            ));
        }
        let device = DeviceSpec::parse(&o.device)?;
        // An adapter goes onto the base it was trained over: the NF4 round trip (QLoRA), or
        // the checkpoint as it is for one trained over a GGUF's own blocks. Without one, a
        // GGUF's blocks alone where they can be (the f32 values in a fraction of the memory).
        let base =
            o.base.unwrap_or_else(
                || match adapter.as_deref().map(train::adapter::trained_on) {
                    Some(Some(train::qlora::TrainBase::Gguf)) => BaseKind::F32,
                    Some(_) => BaseKind::Nf4,
                    None if device == DeviceSpec::Cpu
                        && model::checkpoint::has_projection_blocks(&model) =>
                    {
                        BaseKind::Gguf
                    }
                    None => BaseKind::F32,
                },
            );
        match base {
            BaseKind::Nf4Packed if adapter.is_some() => {
                return Err(BackendError::Options(
                    "an adapter is merged into f32 weights, not a packed base; use base = \"nf4\" to evaluate on the QLoRA base".into(),
                ));
            }
            BaseKind::Gguf if adapter.is_some() => {
                return Err(BackendError::Options(
                    "an adapter is merged into f32 weights, not the checkpoint's blocks; use base = \"f32\" (the same values)".into(),
                ));
            }
            BaseKind::Gguf if device != DeviceSpec::Cpu => {
                return Err(BackendError::Options(
                    "base = \"gguf\" multiplies the checkpoint's blocks on the CPU; on a GPU use base = \"f32\" (the same values) or \"nf4\"".into(),
                ));
            }
            BaseKind::Gguf if !model::checkpoint::has_projection_blocks(&model) => {
                return Err(BackendError::Options(format!(
                    "base = \"gguf\" needs a GGUF checkpoint with Q4_1/Q8_0 blocks, and {} has none (a safetensors checkpoint, a GGUF of other types, or no such file); evaluate with base = \"f32\", or train with base = \"nf4\"",
                    model.display()
                )));
            }
            _ => {}
        }
        if o.compute == Compute::Bf16 && device != DeviceSpec::Cpu {
            return Err(BackendError::Options(
                "compute = \"bf16\" runs on the CPU's bf16 kernels; on a GPU evaluate with compute = \"f32\"".into(),
            ));
        }
        o.model = Some(model.clone());
        o.adapter = adapter.clone();
        o.base = Some(base);
        o.device = device.name();
        Ok(Config {
            model,
            adapter,
            base,
            double_quant: o.double_quant,
            max_batch: o.max_batch as usize,
            device,
            compute: o.compute,
        })
    }
}

/// Asks glibc's allocator to keep freed memory for reuse instead of returning each large block
/// to the kernel: a training step allocates and frees the same few hundred megabytes of
/// activations every time, and a decoding step its growing key/value caches, and fresh pages
/// cost a page fault and zeroing each (measured: about 4% of a training step). Peak memory is
/// unchanged, since the same sizes come back every step.
///
/// All threads share one arena: evaluation runs on whichever rayon worker picks it up
/// ([`on_pool`]), and with an arena per thread each worker kept a whole working set of its own
/// (an addition eval peaked at 0.40-0.43 GiB instead of 0.31; the same speed, and the same
/// training speed, with one arena).
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// A loaded model behind the [`Backend`] interface.
pub struct CandleBackend {
    engine: Engine,
    info: ModelInfo,
    /// The adapter of the last training run, for `save_adapter`.
    trained: Option<qlora::Trained>,
    chat: Option<model::chat::ChatTemplate>,
}

impl CandleBackend {
    pub fn load(config: &Config) -> Result<Self> {
        keep_freed_memory();
        let device = config.device.open()?;
        let pack = match config.base {
            BaseKind::Nf4Packed => Packing::Nf4 {
                double_quant: config.double_quant,
                tables_in_blocks: device.is_cpu(),
            },
            BaseKind::Gguf => Packing::Blocks,
            BaseKind::F32 | BaseKind::Nf4 => Packing::F32,
        };
        // Read, quantized and merged on the CPU; the model moves each weight to the device.
        let mut ckpt = model::checkpoint::load(&config.model, &Device::Cpu, pack)?;
        if config.base == BaseKind::Nf4 {
            ckpt.weights.round_projections_to_nf4(config.double_quant)?;
        }
        if let Some(dir) = &config.adapter {
            train::adapter::LoraAdapter::load(dir, &Device::Cpu)?.merge_into(&mut ckpt.weights)?;
        }
        let mut model = model::llama::Llama::new(ckpt.config.clone(), &mut ckpt.weights, &device)?;
        if config.base == BaseKind::Gguf {
            // An error unless some projection is in blocks (a GGUF of a kind kept, on the CPU).
            model.keep_projections_in_blocks()?;
        }
        if config.compute == Compute::Bf16 {
            model.compute_in_bf16()?;
        }
        let info = ModelInfo {
            name: ckpt.name.clone().into(),
            path: config.model.display().to_string().into(),
            architecture: ckpt.architecture.clone().into(),
            parameters: ckpt.parameters,
            device: config.device.name().into(),
            // Filled in by the SDK with the recorded options.
            resolved_options: Default::default(),
        };
        Ok(CandleBackend {
            engine: Engine::new(model, ckpt.tokenizer, ckpt.eos, config.max_batch),
            info,
            trained: None,
            chat: ckpt.chat,
        })
    }

    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

/// Runs `f` on one of rayon's worker threads and waits for it. The model's parallel products
/// (several hundred per decoding step) then start from a worker, which works on them itself and
/// hands halves to the other workers, instead of from the host's thread, which must wake a worker
/// for each one and sleep until it is done: decoding at batch 1 went from 69-72 to 82-85
/// tokens/s with that alone (2 cores).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `join` called outside the pool runs both closures on the pool and blocks until they end.
    rayon::join(f, || ()).0
}

fn text(e: BackendError) -> String {
    e.to_string()
}

impl BackendPlugin for CandleBackend {
    type Options = Options;
    type TrainOptions = TrainArgs;
    const DESCRIPTION: &'static str = "LLaMA-family models (GGUF or HF safetensors) on candle, CPU or CUDA (options: model, adapter, base, double_quant, max_batch, device, compute)";

    fn new(options: &mut Options) -> std::result::Result<Self, String> {
        let config = Config::new(options).map_err(text)?;
        CandleBackend::load(&config).map_err(text)
    }

    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn tokenize(&self, text_in: &str) -> std::result::Result<Vec<u32>, String> {
        self.engine.encode(text_in).map_err(text)
    }

    fn generate(
        &mut self,
        requests: Vec<GenerateRequest>,
    ) -> std::result::Result<Vec<Generation>, String> {
        let engine = &mut self.engine;
        on_pool(|| engine.generate(&requests).map_err(text))
    }

    fn score_choices(
        &mut self,
        requests: Vec<ChoiceRequest>,
    ) -> std::result::Result<Vec<Vec<ChoiceScore>>, String> {
        let engine = &mut self.engine;
        on_pool(|| {
            requests
                .iter()
                .map(|r| {
                    let options: Vec<String> = r.options.iter().map(|o| o.to_string()).collect();
                    engine
                        .score_choices(r.context.as_str(), &options)
                        .map_err(text)
                })
                .collect()
        })
    }

    fn next_token_logprobs(
        &mut self,
        text_in: &str,
        top: u32,
    ) -> std::result::Result<Vec<TokenLogprob>, String> {
        let engine = &mut self.engine;
        let top = on_pool(|| engine.next_token_logprobs(text_in, top as usize)).map_err(text)?;
        top.into_iter()
            .map(|(id, logprob)| {
                let piece = self
                    .engine
                    .tokenizer()
                    .decode(&[id], false)
                    .map_err(|e| e.to_string())?;
                Ok(TokenLogprob {
                    id,
                    text: piece.into(),
                    logprob,
                })
            })
            .collect()
    }

    fn prompt_logprobs(
        &mut self,
        prompts: Vec<Prompt>,
        top: u32,
    ) -> std::result::Result<Vec<Vec<PromptToken>>, String> {
        let engine = &mut self.engine;
        on_pool(|| {
            prompts
                .iter()
                .map(|p| engine.prompt_logprobs(p, top as usize).map_err(text))
                .collect()
        })
    }

    fn detokenize(&self, ids: &[u32]) -> std::result::Result<String, String> {
        self.engine.decode_all(ids).map_err(text)
    }

    fn tokenizer_info(&self) -> TokenizerInfo {
        let some = |s: &str| (!s.is_empty()).then(|| s.into()).into();
        match &self.chat {
            Some(t) => TokenizerInfo {
                bos_token: some(&t.bos),
                eos_token: some(&t.eos),
                chat_template: some(&t.source),
            },
            None => TokenizerInfo {
                eos_token: self
                    .engine
                    .eos_text()
                    .as_deref()
                    .map_or(ROption::RNone, some),
                ..Default::default()
            },
        }
    }

    fn chat_prompt(&self, messages: &[ChatMessage]) -> std::result::Result<String, String> {
        match &self.chat {
            Some(t) => t.render(messages).map_err(text),
            None => Err(format!(
                "model `{}` ships no chat template (GGUF `tokenizer.chat_template` or tokenizer_config.json `chat_template`)",
                self.info.path
            )),
        }
    }

    fn stats(&self) -> BackendStats {
        self.engine.stats()
    }

    fn check_train_options(args: &TrainArgs) -> std::result::Result<(), String> {
        TrainOptions::new(args.clone()).map(|_| ()).map_err(text)
    }

    fn train(
        &mut self,
        examples: Vec<TrainExample>,
        args: TrainArgs,
        progress: &mut dyn FnMut(TrainStep) -> bool,
    ) -> std::result::Result<TrainSummary, String> {
        if self.trained.is_some() {
            return Err(
                "this backend already trained an adapter; load the model again to train another"
                    .into(),
            );
        }
        let opts = TrainOptions::new(args).map_err(text)?;
        let name = self.info.name.to_string();
        let mut trained = None;
        let result = qlora::run(
            &mut self.engine,
            &name,
            &examples,
            &opts,
            &mut trained,
            |r| {
                progress(TrainStep {
                    step: r.step as u64,
                    total_steps: r.total_steps as u64,
                    epoch: r.epoch as u64,
                    loss: r.loss,
                    lr: r.lr,
                    grad_norm: r.grad_norm,
                    tokens: r.tokens as u64,
                })
            },
        );
        // Kept even when training failed: the adapter of the last good step can be saved.
        self.trained = trained;
        let outcome = result.map_err(text)?;
        let parameters = self.trained.as_ref().map_or(0, |t| t.parameter_count());
        Ok(TrainSummary {
            steps: outcome.reports.len() as u64,
            examples: outcome.examples as u64,
            tokens: outcome.reports.iter().map(|r| r.tokens as u64).sum(),
            seconds: outcome.seconds,
            final_loss: outcome.reports.last().map(|r| r.loss).unwrap_or(f64::NAN),
            trainable_parameters: parameters,
            stopped_early: outcome.stopped_early,
            resolved_options: opts
                .to_toml(self.engine.model_mut().ops().is_portable())
                .into(),
        })
    }

    fn save_adapter(&self, dir: &Path) -> std::result::Result<(), String> {
        let trained = self
            .trained
            .as_ref()
            .ok_or("no adapter to save: train first")?;
        trained.save(dir).map_err(text)
    }
}

harness_abi::plugin! { backend "candle" => CandleBackend }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_kinds_parse_and_a_packed_base_takes_no_adapter() {
        let base = |text: &str| Config::from_toml(text).map(|c| c.base);
        // Without an adapter: f32 unless the model is a GGUF of blocks kept, which a missing
        // file is not (`default_bases_follow_the_checkpoint_and_the_adapter` covers the rest).
        assert_eq!(base("model = \"missing.gguf\"").unwrap(), BaseKind::F32);
        let e = base("model = \"missing.gguf\"\nbase = \"gguf\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("has none") && e.contains("missing.gguf"), "{e}");
        let e = base("base = \"gguf\"\nadapter = \"a\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("use base = \"f32\""), "{e}");
        assert_eq!(base("adapter = \"a\"").unwrap(), BaseKind::Nf4);
        assert_eq!(
            base("base = \"f32\"\nadapter = \"a\"").unwrap(),
            BaseKind::F32
        );
        assert_eq!(base("base = \"nf4-packed\"").unwrap(), BaseKind::Nf4Packed);
        let e = base("base = \"nf4-packed\"\nadapter = \"a\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("use base = \"nf4\""), "{e}");
        let e = base("base = \"int8\"").unwrap_err().to_string();
        assert!(e.contains("`f32`, `nf4`, `nf4-packed`"), "{e}");
        let c = Config::from_toml("base = \"nf4\"\ndouble_quant = false").unwrap();
        assert!(!c.double_quant);
    }

    /// What `harness eval --resume` loads the model with is the record read back: every option
    /// survives it (`double_quant = false` was once lost this way).
    #[test]
    fn the_recorded_options_rebuild_the_same_config() {
        for given in [
            "base = \"nf4\"\ndouble_quant = false\nmax_batch = 3",
            "adapter = \"rel/adapter\"\nmodel = \"m.gguf\"",
            "base = \"nf4-packed\"\ndevice = \"cuda:1\"",
        ] {
            let mut o: Options = harness_abi::options::read(NAME, given).unwrap();
            let config = Config::new(&mut o).unwrap();
            let record = harness_abi::options::record(&o).unwrap();
            assert_eq!(Config::from_toml(&record).unwrap(), config, "{record}");
            assert!(record.contains("double_quant = "), "{record}");
            assert!(config.model.is_absolute(), "{record}");
            assert!(config.adapter.as_ref().is_none_or(|a| a.is_absolute()));
        }
    }

    #[test]
    fn devices_parse_and_cuda_without_the_feature_says_how_to_build_it() {
        let device = |text: &str| Config::from_toml(text).map(|c| c.device);
        assert_eq!(device("").unwrap(), DeviceSpec::Cpu);
        assert_eq!(device("device = \"cuda\"").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(device("device = \"cuda:3\"").unwrap(), DeviceSpec::Cuda(3));
        let e = device("device = \"gpu\"").unwrap_err().to_string();
        assert!(e.contains("`cpu`, `cuda` or `cuda:N`"), "{e}");
        if !cfg!(feature = "cuda") {
            let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(e.contains("scripts/build-cuda.sh"), "{e}");
        }
    }

    #[test]
    fn default_bases_follow_the_checkpoint_and_the_adapter() {
        use candle_core::quantized::GgmlDType;
        let dir = std::env::temp_dir().join(format!("candle-bases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let q4 = dir.join("q4_1.gguf");
        model::checkpoint::testing::tiny_gguf_of(&q4, GgmlDType::Q4_1);
        let f32_file = dir.join("f32.gguf");
        model::checkpoint::testing::tiny_gguf_of(&f32_file, GgmlDType::F32);
        let base = |model: &Path, extra: &str| {
            let text = format!("model = {:?}\n{extra}", model.display().to_string());
            Config::from_toml(&text).map(|c| c.base)
        };
        // Without an adapter: the blocks alone where the file has them, on the CPU.
        assert_eq!(base(&q4, "").unwrap(), BaseKind::Gguf);
        assert_eq!(base(&f32_file, "").unwrap(), BaseKind::F32);
        assert_eq!(base(&q4, "base = \"f32\"").unwrap(), BaseKind::F32);
        let e = base(&f32_file, "base = \"gguf\"").unwrap_err().to_string();
        assert!(e.contains("has none"), "{e}");
        let e = base(&q4, "base = \"gguf\"\ndevice = \"cuda:0\"");
        assert!(e.unwrap_err().to_string().contains("on a GPU"));
        // With one: the base it was trained over, as its metadata says.
        let save = |name: &str, trained_on: train::qlora::TrainBase| {
            let spec = train::adapter::AdapterSpec {
                r: 1,
                alpha: 1.0,
                dropout: 0.0,
                target_modules: vec!["q_proj".into()],
                base_model: "tiny".into(),
                trained_on,
            };
            let a = candle_core::Var::zeros((1, 64), candle_core::DType::F32, &Device::Cpu);
            let params = [(
                "model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
                a.unwrap(),
            )];
            train::adapter::save_peft(&dir.join(name), &spec, &params).unwrap();
            format!("adapter = {:?}", dir.join(name).display().to_string())
        };
        let over_gguf = save("over-gguf", train::qlora::TrainBase::Gguf);
        let over_nf4 = save("over-nf4", train::qlora::TrainBase::Nf4);
        assert_eq!(base(&q4, &over_gguf).unwrap(), BaseKind::F32);
        assert_eq!(base(&q4, &over_nf4).unwrap(), BaseKind::Nf4);
        let _ = std::fs::remove_dir_all(dir);
    }
}
