//! Backend plugin `candle`: LLaMA-family models on candle, loaded from a GGUF file or a HF
//! folder, answering generation and multiple-choice requests.
//!
//! Key decision: one llama implementation of our own ([`llama`]) rather than
//! candle-transformers', because we need logits at chosen positions, batched decoding with
//! per-row positions and (next) LoRA on every projection. Weights are dequantized to f32 at load,
//! which is what the reference logits in `shared/fixtures/` were computed with.

pub mod adapter;
pub mod bf16;
pub mod checkpoint;
pub mod engine;
pub mod error;
pub mod fused;
pub mod gguf_tokenizer;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod matmul;
pub mod nf4;
pub mod portable;
pub mod trainer;
pub mod training;
pub mod weights;

use std::path::PathBuf;

use candle_core::Device;
use harness_abi::{
    abi_stable::{
        prefix_type::PrefixTypeTrait,
        std_types::{RResult, RStr, RString, RVec},
    },
    guard, not_provided,
    options::Options,
    Backend, BackendBox, BackendStats, Backend_TO, ChoiceRequest, ChoiceScore, GenerateRequest,
    Generation, MetricBox, ModelInfo, PluginInfo, PluginKind, PluginLib, PluginLibRef,
    ProgressSinkBox, TD_Opaque, TaskBox, TokenLogprob, TrainExample, TrainStep, TrainSummary,
};

use crate::engine::Engine;
use crate::error::{BackendError, Result};

const NAME: &str = "candle";
const OPTIONS: &[&str] = &[
    "model",
    "adapter",
    "base",
    "double_quant",
    "max_batch",
    "device",
];

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    /// The checkpoint's values in f32.
    F32,
    /// Their NF4 round trip, held in f32: the numbers of the QLoRA base at full inference speed
    /// (the default when an adapter is given).
    Nf4,
    /// Packed NF4 from the moment each is read, dequantized tile by tile in every product: the
    /// QLoRA training base, with no full-precision copy of the projections at any time.
    Nf4Packed,
}

impl BaseKind {
    fn name(self) -> &'static str {
        match self {
            BaseKind::F32 => "f32",
            BaseKind::Nf4 => "nf4",
            BaseKind::Nf4Packed => "nf4-packed",
        }
    }
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self> {
        let o = Options::parse(NAME, text, OPTIONS).map_err(BackendError::Options)?;
        let model = o
            .string("model")
            .map_err(BackendError::Options)?
            .map(PathBuf::from)
            .unwrap_or_else(harness_abi::paths::default_model);
        let max_batch = o
            .u64("max_batch")
            .map_err(BackendError::Options)?
            .unwrap_or(8) as usize;
        if max_batch == 0 {
            return Err(BackendError::Options(
                "`max_batch` must be at least 1".into(),
            ));
        }
        let device = match o.string("device").map_err(BackendError::Options)? {
            None => DeviceSpec::Cpu,
            Some(text) => DeviceSpec::parse(&text)?,
        };
        let adapter = o
            .string("adapter")
            .map_err(BackendError::Options)?
            .map(PathBuf::from);
        let base = match o.string("base").map_err(BackendError::Options)?.as_deref() {
            None if adapter.is_some() => BaseKind::Nf4,
            None => BaseKind::F32,
            Some("nf4") => BaseKind::Nf4,
            Some("f32") => BaseKind::F32,
            Some("nf4-packed") => BaseKind::Nf4Packed,
            Some(other) => {
                return Err(BackendError::Options(format!(
                    "base `{other}` is not `nf4`, `f32` or `nf4-packed`"
                )))
            }
        };
        if base == BaseKind::Nf4Packed && adapter.is_some() {
            return Err(BackendError::Options(
                "an adapter is merged into f32 weights, not a packed base; use base = \"nf4\" to evaluate on the QLoRA base".into(),
            ));
        }
        let double_quant = o
            .bool("double_quant")
            .map_err(BackendError::Options)?
            .unwrap_or(true);
        Ok(Config {
            model,
            adapter,
            base,
            double_quant,
            max_batch,
            device,
        })
    }
}

/// A loaded model behind the [`Backend`] interface.
pub struct CandleBackend {
    engine: Engine,
    info: ModelInfo,
    /// The adapter of the last training run, for `save_adapter`.
    trained: Option<training::Trained>,
}

impl CandleBackend {
    pub fn load(config: &Config) -> Result<Self> {
        let device = config.device.open()?;
        let pack = (config.base == BaseKind::Nf4Packed).then_some(config.double_quant);
        // Read, quantized and merged on the CPU; the model moves each weight to the device.
        let mut ckpt = checkpoint::load(&config.model, &Device::Cpu, pack)?;
        if config.base == BaseKind::Nf4 {
            ckpt.weights.round_projections_to_nf4(config.double_quant)?;
        }
        if let Some(dir) = &config.adapter {
            adapter::LoraAdapter::load(dir, &Device::Cpu)?.merge_into(&mut ckpt.weights)?;
        }
        let model = llama::Llama::new(ckpt.config.clone(), &mut ckpt.weights, &device)?;
        let info = ModelInfo {
            name: ckpt.name.clone().into(),
            path: config.model.display().to_string().into(),
            architecture: ckpt.architecture.clone().into(),
            parameters: ckpt.parameters,
            device: config.device.name().into(),
            resolved_options: format!(
                "model = {:?}\n{}base = \"{}\"\nmax_batch = {}\ndevice = \"{}\"\n",
                config.model.display().to_string(),
                config
                    .adapter
                    .as_ref()
                    .map(|a| format!("adapter = {:?}\n", a.display().to_string()))
                    .unwrap_or_default(),
                config.base.name(),
                config.max_batch,
                config.device.name()
            )
            .into(),
        };
        Ok(CandleBackend {
            engine: Engine::new(model, ckpt.tokenizer, ckpt.eos, config.max_batch),
            info,
            trained: None,
        })
    }

    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

fn text(e: BackendError) -> String {
    e.to_string()
}

impl Backend for CandleBackend {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn tokenize(&self, text_in: RStr<'_>) -> RResult<RVec<u32>, RString> {
        guard(NAME, || {
            self.engine
                .encode(text_in.as_str())
                .map(RVec::from)
                .map_err(text)
        })
    }

    fn generate(&mut self, requests: RVec<GenerateRequest>) -> RResult<RVec<Generation>, RString> {
        guard(NAME, || {
            self.engine
                .generate(&requests)
                .map(RVec::from)
                .map_err(text)
        })
    }

    fn score_choices(
        &mut self,
        requests: RVec<ChoiceRequest>,
    ) -> RResult<RVec<RVec<ChoiceScore>>, RString> {
        guard(NAME, || {
            let mut out = RVec::with_capacity(requests.len());
            for r in requests.iter() {
                let options: Vec<String> = r.options.iter().map(|o| o.to_string()).collect();
                let scores = self
                    .engine
                    .score_choices(r.context.as_str(), &options)
                    .map_err(text)?;
                out.push(RVec::from(scores));
            }
            Ok(out)
        })
    }

    fn next_token_logprobs(
        &mut self,
        text_in: RStr<'_>,
        top: u32,
    ) -> RResult<RVec<TokenLogprob>, RString> {
        guard(NAME, || {
            let top = self
                .engine
                .next_token_logprobs(text_in.as_str(), top as usize)
                .map_err(text)?;
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
                .collect::<std::result::Result<Vec<_>, String>>()
                .map(RVec::from)
        })
    }

    fn stats(&self) -> BackendStats {
        self.engine.stats()
    }

    fn train(
        &mut self,
        examples: RVec<TrainExample>,
        options: RStr<'_>,
        mut progress: ProgressSinkBox,
    ) -> RResult<TrainSummary, RString> {
        guard(NAME, || {
            if self.trained.is_some() {
                return Err("this backend already trained an adapter; load the model again to train another".into());
            }
            let opts = training::TrainOptions::from_toml(options.as_str()).map_err(text)?;
            let name = self.info.name.to_string();
            let mut trained = None;
            let result = training::run(
                &mut self.engine,
                &name,
                &examples,
                &opts,
                &mut trained,
                |r| {
                    progress.report(TrainStep {
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
            let summary = TrainSummary {
                steps: outcome.reports.len() as u64,
                examples: outcome.examples as u64,
                tokens: outcome.reports.iter().map(|r| r.tokens as u64).sum(),
                seconds: outcome.seconds,
                final_loss: outcome.reports.last().map(|r| r.loss).unwrap_or(f64::NAN),
                trainable_parameters: parameters,
                stopped_early: outcome.stopped_early,
                resolved_options: opts.to_toml(self.engine.model_mut().is_portable()).into(),
            };
            Ok(summary)
        })
    }

    fn save_adapter(&self, dir: RStr<'_>) -> RResult<(), RString> {
        guard(NAME, || {
            let trained = self
                .trained
                .as_ref()
                .ok_or("no adapter to save: train first")?;
            trained
                .save(std::path::Path::new(dir.as_str()))
                .map_err(text)
        })
    }
}

extern "C" fn manifest() -> RVec<PluginInfo> {
    RVec::from(vec![PluginInfo {
        kind: PluginKind::Backend,
        name: NAME.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "LLaMA-family models (GGUF or HF safetensors) on candle, CPU or CUDA (options: model, adapter, base, double_quant, max_batch, device)".into(),
    }])
}

extern "C" fn new_backend(name: RStr<'_>, options: RStr<'_>) -> RResult<BackendBox, RString> {
    if name.as_str() != NAME {
        return not_provided(PluginKind::Backend, name);
    }
    guard(NAME, || {
        let config = Config::from_toml(options.as_str()).map_err(text)?;
        let backend = CandleBackend::load(&config).map_err(text)?;
        Ok(Backend_TO::from_value(backend, TD_Opaque))
    })
}

extern "C" fn new_task(name: RStr<'_>, _options: RStr<'_>) -> RResult<TaskBox, RString> {
    not_provided(PluginKind::Task, name)
}

extern "C" fn new_metric(name: RStr<'_>, _options: RStr<'_>) -> RResult<MetricBox, RString> {
    not_provided(PluginKind::Metric, name)
}

/// The root module the host loads.
pub fn plugin_lib() -> PluginLibRef {
    PluginLib {
        manifest,
        new_task,
        new_metric,
        new_backend,
    }
    .leak_into_prefix()
}

harness_abi::export_plugin!(plugin_lib);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_kinds_parse_and_a_packed_base_takes_no_adapter() {
        let base = |text: &str| Config::from_toml(text).map(|c| c.base);
        assert_eq!(base("").unwrap(), BaseKind::F32);
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
        assert!(e.contains("`nf4`, `f32` or `nf4-packed`"), "{e}");
        let c = Config::from_toml("base = \"nf4\"\ndouble_quant = false").unwrap();
        assert!(!c.double_quant);
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
}
