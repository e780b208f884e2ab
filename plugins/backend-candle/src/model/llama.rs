//! One LLaMA-family transformer for inference (and, later, training): RMSNorm, rotary
//! embeddings (rotate-half layout, as in the HF checkpoints), grouped-query attention, SwiGLU.
//!
//! candle-transformers' llama returns only the last position's logits and hard-wires its linear
//! layers; we need per-token log-likelihoods, batched decoding with per-row positions and, next,
//! LoRA on every projection, hence this module. Weights are held in HF names and layout (GGUF
//! q/k weights are un-permuted at load, see `checkpoint`), so PEFT adapters apply unchanged.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::error::{BackendError, Result};
use crate::model::weights::{Projection, Weights};
use crate::ops::bf16::Bf16Matrix;
use crate::ops::blocks::BlockMatrix;
use crate::ops::fused::{
    Adapter, CacheInputs, CachedAttention, CausalAttention, Frozen, FrozenLinear, LayerProjection,
    LoraLinear, RmsNorm, RopeTable, SelfAttention, SwiGluMlp,
};
use crate::ops::nf4::Nf4Matrix;
use crate::ops::portable::Nf4Tensors;
use crate::ops::OpSet;
use crate::train::lora::Lora;

/// Hyper-parameters of a LLaMA-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// Training: LoRA dropout on, and the fused ops that keep little for the backward pass.
    train: bool,
    /// Training's products (frozen weights and adapters) in bf16 (AMX or AVX512-BF16).
    bf16: bool,
    /// The op set the layers run (the portable one off the CPU, where the fused ops cannot).
    ops: OpSet,
}

impl Mode {
    /// Whether attention may run as one [`CachedAttention`] op: in evaluation on the fused ops.
    /// The op has no backward pass, so `attention` still composes it when a gradient flows
    /// through the projections; training keeps the composed ops or its own fused ones.
    fn cached_attention(self) -> bool {
        !self.train && self.ops == OpSet::Fused
    }
}

/// A linear layer: a frozen base weight (f32, or NF4 for the QLoRA base) and maybe an adapter.
struct Linear {
    base: Frozen,
    /// The checkpoint's quantized blocks of an f32 base, which decoding reads instead (the
    /// same numbers in fewer bytes; see `ops::blocks`).
    blocks: Option<Arc<BlockMatrix>>,
    /// The weight in bf16, which evaluation with `compute = "bf16"` multiplies instead.
    bf16: Option<Arc<Bf16Matrix>>,
    lora: Option<Lora>,
}

impl Linear {
    fn dense(weight: Tensor, blocks: Option<Arc<BlockMatrix>>) -> Self {
        Linear {
            base: Frozen::Dense(weight),
            blocks,
            bf16: None,
            lora: None,
        }
    }

    /// (out, in).
    fn dims(&self) -> (usize, usize) {
        self.base.dims().unwrap_or((0, 0))
    }

    /// Training's op for this projection with its adapter `lora`.
    fn lora_op(&self, lora: &Lora, mode: Mode, seed: u64) -> LoraLinear {
        LoraLinear {
            base: self.base.clone(),
            scale: lora.scale as f32,
            dropout: lora.dropout,
            seed,
            bf16: mode.bf16,
        }
    }

    fn forward(&self, x: &Tensor, mode: Mode, seed: u64) -> candle_core::Result<Tensor> {
        if mode.ops.is_portable() {
            // Tensor ops on any device; an NF4 weight is dequantized for this product only.
            let (b, t, i) = x.dims3()?;
            let x = x.reshape((b * t, i))?;
            let mut y = x.matmul(&self.base.weight()?.t()?)?;
            if let Some(lora) = &self.lora {
                y = (y + lora.forward(&x, mode.train, seed)?)?;
            }
            return y.reshape((b, t, ()));
        }
        if let (true, Some(lora)) = (mode.train, &self.lora) {
            // Training: base and adapter as one op that keeps only x for the backward pass.
            let op = self.lora_op(lora, mode, seed);
            return op.forward(x, lora.a.as_tensor(), lora.b.as_tensor());
        }
        // x: (B, T, in) -> (B*T, in) @ (in, out)
        let (b, t, i) = x.dims3()?;
        let x = x.reshape((b * t, i))?;
        let mut y = match (&self.bf16, &self.base) {
            (Some(w), _) if !mode.train && !x.track_op() => matmul_t_bf16(&x, w)?,
            (_, Frozen::Dense(w)) => matmul_t_with(&x, w, self.blocks.as_deref())?,
            (_, Frozen::Blocks(b)) if !x.track_op() => matmul_t_blocks(&x, b)?,
            (_, frozen) => FrozenLinear(frozen.clone()).forward(&x)?,
        };
        if let Some(lora) = &self.lora {
            y = (y + lora.forward(&x, mode.train, seed)?)?;
        }
        y.reshape((b, t, ()))
    }
}

/// [`matmul_t`], reading the weight's quantized `blocks` instead where the decoding kernel runs.
fn matmul_t_with(
    x: &Tensor,
    w: &Tensor,
    blocks: Option<&BlockMatrix>,
) -> candle_core::Result<Tensor> {
    if let (Some(b), false) = (blocks, x.track_op()) {
        if let Some(y) = crate::ops::kernels::skinny_matmul_blocks_t(x, b)? {
            return Ok(y);
        }
    }
    matmul_t(x, w)
}

/// `x` (m, k) times a weight held only as blocks, by the very products [`matmul_t_with`] runs on
/// its f32 copy (the decoding kernel over the blocks, else the f32 copy's gemm call on the weight
/// expanded for this product), so that `base = "gguf"` predicts bit for bit what `f32` does.
fn matmul_t_blocks(x: &Tensor, b: &BlockMatrix) -> candle_core::Result<Tensor> {
    if let Some(y) = crate::ops::kernels::skinny_matmul_blocks_t(x, b)? {
        return Ok(y);
    }
    on_slices(x, b.rows, |xs, m| {
        crate::ops::matmul::matmul_t_expanded(xs, m, (b.rows, b.cols), |w| b.dequantize_rows(0, w))
    })
}

/// `x` (m, k) times a bf16 weight's transpose, with `x` rounded to bf16 (see [`Bf16Matrix`]).
fn matmul_t_bf16(x: &Tensor, w: &Bf16Matrix) -> candle_core::Result<Tensor> {
    on_slices(x, w.rows, |xs, m| w.product_t(xs, m))
}

/// `x` (m, k) times `w` (n, k) transposed: the decoding kernel for a few rows, else the gemm
/// call of [`crate::ops::matmul::matmul_t`]; when a gradient must flow through `x`, the
/// frozen-weight op that computes no weight gradient.
fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        // Frozen weight: the gradient goes to x only.
        return FrozenLinear(Frozen::Dense(w.clone())).forward(x);
    }
    if let Some(y) = crate::ops::kernels::skinny_matmul_t(x, w)? {
        return Ok(y);
    }
    let (n, k) = w.dims2()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("the fused ops multiply CPU weights only");
    };
    if !layout.is_contiguous() {
        candle_core::bail!("a weight must be contiguous");
    }
    let ws = &cpu.as_slice::<f32>()?[layout.start_offset()..][..n * k];
    on_slices(x, n, |xs, m| {
        crate::ops::matmul::matmul_t(xs, m, ws, (n, k))
    })
}

/// The (m, n) tensor of `product(x's values, m)` for a CPU tensor `x` (m, k).
fn on_slices(
    x: &Tensor,
    n: usize,
    product: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (m, k) = x.dims2()?;
    let y = {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("the fused ops multiply CPU inputs only");
        };
        product(&cpu.as_slice::<f32>()?[layout.start_offset()..][..m * k], m)
    };
    Tensor::from_vec(y, (m, n), x.device())
}

/// The projections of a fused training op ([`SelfAttention`], [`SwiGluMlp`]), each with its
/// dropout seed.
fn fused_parts<const N: usize>(linears: [(&Linear, u64); N], mode: Mode) -> [LayerProjection; N] {
    linears.map(|(linear, seed)| match &linear.lora {
        Some(lora) => LayerProjection::Lora(
            linear.lora_op(lora, mode, seed),
            Adapter::new(lora.a.as_tensor(), lora.b.as_tensor()),
        ),
        None => LayerProjection::Frozen(FrozenLinear(linear.base.clone())),
    })
}

/// An RMSNorm layer: its weight and epsilon (the op set computes it).
struct Norm {
    weight: Tensor,
    eps: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor, ops: OpSet) -> candle_core::Result<Tensor> {
        ops.rms_norm(x, &self.weight, self.eps)
    }

    /// The fused ops' form, for the training ops that normalise their input themselves.
    fn fused(&self) -> RmsNorm {
        RmsNorm {
            weight: self.weight.clone(),
            eps: self.eps as f32,
        }
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Block {
    input_norm: Norm,
    attn: Attention,
    post_norm: Norm,
    mlp: Mlp,
}

/// What every layer of one forward pass shares: rotary tables and the attention mask.
pub struct Pass {
    cos: Tensor,
    sin: Tensor,
    /// The composed attention's additive mask (none where it has nothing to mask, or where the
    /// cached attention runs, which masks as it goes).
    mask: Option<Tensor>,
    /// Which cached positions of each row are real, for the cached attention.
    key_valid: Option<Vec<Vec<bool>>>,
    /// When every row starts at position 0 with nothing cached and no padding mask (training):
    /// the rotary tables of positions 0..T, for the fused causal attention.
    from_zero: Option<(RopeTable, RopeTable)>,
}

/// Keys and values of the positions already processed, per layer: (B, kv_heads, T, head_dim).
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    /// Number of cached positions (0 for an empty cache).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `len` positions only.
    pub fn truncated(&self, len: usize) -> candle_core::Result<KvCache> {
        if len == 0 {
            return Ok(KvCache::default());
        }
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Stacks single-row caches into one batch, padding each on the right to the longest with
    /// zeros (the padding is masked out by the caller).
    pub fn stack(rows: &[KvCache]) -> candle_core::Result<KvCache> {
        let longest = rows.iter().map(KvCache::len).max().unwrap_or(0);
        let n_layers = rows.iter().map(|r| r.layers.len()).max().unwrap_or(0);
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let mut ks = Vec::with_capacity(rows.len());
            let mut vs = Vec::with_capacity(rows.len());
            for r in rows {
                let (k, v) = &r.layers[l];
                ks.push(pad_time(k, longest)?);
                vs.push(pad_time(v, longest)?);
            }
            layers.push((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
        }
        Ok(KvCache { layers })
    }
}

fn pad_time(x: &Tensor, to: usize) -> candle_core::Result<Tensor> {
    let t = x.dim(2)?;
    if t == to {
        return Ok(x.clone());
    }
    let (b, h, _, d) = x.dims4()?;
    let pad = Tensor::zeros((b, h, to - t, d), x.dtype(), x.device())?;
    Tensor::cat(&[x, &pad], 2)
}

/// The model.
pub struct Llama {
    config: Config,
    /// (vocab, hidden): f32, or the checkpoint's blocks alone (`base = "gguf"`).
    embed: Frozen,
    blocks: Vec<Block>,
    norm: Norm,
    /// (vocab, hidden), f32 or blocks alone; the embedding matrix when the weights are tied.
    lm_head: Frozen,
    /// The checkpoint's blocks of an f32 `lm_head`, for decoding.
    lm_head_blocks: Option<Arc<BlockMatrix>>,
    /// `lm_head` in bf16, for evaluation with `compute = "bf16"`.
    lm_head_bf16: Option<Arc<Bf16Matrix>>,
    /// (max_positions, head_dim / 2)
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Training or evaluation, and the precision of training's products.
    mode: Mode,
}

/// The projections LoRA can target, by their PEFT names.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl Llama {
    /// Builds the model from weights in HF names (`model.layers.0.self_attn.q_proj.weight`, ...),
    /// moving each to `device` as it is taken (packed NF4 weights stay packed there).
    pub fn new(config: Config, weights: &mut Weights, device: &Device) -> Result<Self> {
        let linear = |w: &mut Weights, name: String| -> Result<Linear> {
            Ok(match w.take_projection(&name)? {
                Projection::F32(t) => {
                    let blocks = w.take_blocks(&name);
                    Linear::dense(t.to_device(device)?.contiguous()?, blocks)
                }
                Projection::Nf4(weight) => Linear {
                    base: Frozen::Nf4(weight),
                    blocks: None,
                    bf16: None,
                    lora: None,
                },
                Projection::Blocks(b) => Linear {
                    base: Frozen::Blocks(b),
                    blocks: None,
                    bf16: None,
                    lora: None,
                },
            })
        };
        let norm = |w: &mut Weights, name: String| -> Result<Norm> {
            Ok(Norm {
                weight: w.take(&name)?.to_device(device)?,
                eps: config.rms_norm_eps,
            })
        };
        let mut blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                input_norm: norm(weights, format!("{p}.input_layernorm.weight"))?,
                attn: Attention {
                    q: linear(weights, format!("{p}.self_attn.q_proj.weight"))?,
                    k: linear(weights, format!("{p}.self_attn.k_proj.weight"))?,
                    v: linear(weights, format!("{p}.self_attn.v_proj.weight"))?,
                    o: linear(weights, format!("{p}.self_attn.o_proj.weight"))?,
                },
                post_norm: norm(weights, format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate: linear(weights, format!("{p}.mlp.gate_proj.weight"))?,
                    up: linear(weights, format!("{p}.mlp.up_proj.weight"))?,
                    down: linear(weights, format!("{p}.mlp.down_proj.weight"))?,
                },
            });
        }
        let norm_w = norm(weights, "model.norm.weight".into())?;
        let table = |w: &mut Weights, name: &str| -> Result<(Frozen, Option<Arc<BlockMatrix>>)> {
            Ok(match w.take_projection(name)? {
                Projection::F32(t) => (
                    Frozen::Dense(t.to_device(device)?.contiguous()?),
                    w.take_blocks(name),
                ),
                Projection::Blocks(b) => (Frozen::Blocks(b), None),
                Projection::Nf4(_) => {
                    return Err(BackendError::Internal(format!("{name} was packed to NF4")))
                }
            })
        };
        let (embed, embed_blocks) = table(weights, "model.embed_tokens.weight")?;
        let (lm_head, lm_head_blocks) =
            if !config.tie_word_embeddings && weights.contains("lm_head.weight") {
                table(weights, "lm_head.weight")?
            } else {
                (embed.clone(), embed_blocks)
            };
        let (rows, cols) = embed.dims()?;
        if rows != config.vocab_size || cols != config.hidden_size {
            return Err(BackendError::Checkpoint(format!(
                "embedding is {rows}x{cols}, but the config says vocab {} x hidden {}",
                config.vocab_size, config.hidden_size
            )));
        }
        let (cos, sin) = rope_tables(&config, device)?;
        let mut model = Llama {
            config,
            embed,
            blocks,
            norm: norm_w,
            lm_head,
            lm_head_blocks,
            lm_head_bf16: None,
            cos,
            sin,
            device: device.clone(),
            mode: Mode::default(),
        };
        if !device.is_cpu() {
            model.set_ops(OpSet::Portable)?;
        }
        Ok(model)
    }

    /// Chooses the op set. Every device but the CPU must run the portable one (NF4 weights
    /// then move to the device still packed); on the CPU it is the cross-check of the fused
    /// ops (the tests compare the two).
    pub fn set_ops(&mut self, ops: OpSet) -> Result<()> {
        self.mode.ops = ops;
        self.upload_nf4()
    }

    /// The op set the layers run.
    pub fn ops(&self) -> OpSet {
        self.mode.ops
    }

    /// With the portable op set, puts packed NF4 weights on the device as tensors.
    fn upload_nf4(&mut self) -> Result<()> {
        if !self.mode.ops.is_portable() {
            return Ok(());
        }
        let device = self.device.clone();
        for (_, _, lin) in self.linears_mut() {
            if let Frozen::Nf4(q) = &lin.base {
                lin.base = Frozen::Nf4Tensors(Arc::new(Nf4Tensors::new(q, &device)?));
            }
        }
        Ok(())
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = (usize, &'static str, &mut Linear)> {
        self.blocks.iter_mut().enumerate().flat_map(|(l, b)| {
            [
                ("q_proj", &mut b.attn.q),
                ("k_proj", &mut b.attn.k),
                ("v_proj", &mut b.attn.v),
                ("o_proj", &mut b.attn.o),
                ("gate_proj", &mut b.mlp.gate),
                ("up_proj", &mut b.mlp.up),
                ("down_proj", &mut b.mlp.down),
            ]
            .into_iter()
            .map(move |(name, lin)| (l, name, lin))
        })
    }

    /// Replaces every projection's f32 weight (or blocks) by its NF4 form (the f32 copy is
    /// dropped).
    pub fn quantize_nf4(&mut self, double_quant: bool) -> Result<()> {
        for (_, _, lin) in self.linears_mut() {
            let (rows, cols, data) = match &lin.base {
                Frozen::Dense(w) => {
                    let (rows, cols) = w.dims2()?;
                    (rows, cols, w.flatten_all()?.to_vec1::<f32>()?)
                }
                Frozen::Blocks(b) => (b.rows, b.cols, b.dequantize()),
                Frozen::Nf4(_) | Frozen::Nf4Tensors(_) => continue,
            };
            let q = Nf4Matrix::quantize(&data, rows, cols, double_quant);
            lin.base = Frozen::Nf4(Arc::new(q));
            lin.blocks = None;
        }
        self.upload_nf4()
    }

    /// Replaces every projection's f32 weight by the checkpoint's own quantized blocks kept
    /// beside it (the f32 copy is dropped): training's frozen base then holds exactly the
    /// numbers the f32 checkpoint holds, in 0.625 bytes a weight for Q4_1, instead of their NF4
    /// round trip. Returns how many projections are in blocks; a projection the loader kept no
    /// blocks for (a GGUF type other than Q4_1/Q8_0) stays f32. An error where none has blocks:
    /// the checkpoint is not a GGUF of those types, or its weights were changed after loading
    /// (an NF4 base, a merged adapter).
    pub fn keep_projections_in_blocks(&mut self) -> Result<usize> {
        if !self.device.is_cpu() {
            return Err(BackendError::Options(
                "base = \"gguf\" multiplies the checkpoint's blocks on the CPU; on a GPU train over NF4 (base = \"nf4\")".into(),
            ));
        }
        let mut in_blocks = 0;
        for (_, _, lin) in self.linears_mut() {
            if let (Frozen::Dense(_), Some(b)) = (&lin.base, lin.blocks.take()) {
                lin.base = Frozen::Blocks(b);
            }
            in_blocks += matches!(lin.base, Frozen::Blocks(_)) as usize;
        }
        if in_blocks == 0 {
            return Err(BackendError::Options(
                "base = \"gguf\" uses a GGUF checkpoint's own Q4_1/Q8_0 blocks, and this model holds none (a safetensors checkpoint, a GGUF of other types, or weights changed after loading); use base = \"nf4\" or \"f32\"".into(),
            ));
        }
        Ok(in_blocks)
    }

    /// Evaluation from now on multiplies bf16 copies of the projections and the output
    /// projection, rounding their inputs to bf16 ([`Bf16Matrix`]): `compute = "bf16"`. The
    /// embeddings, norms, attention and adapters stay f32, as under QLoRA's bf16 compute dtype.
    pub fn compute_in_bf16(&mut self) -> Result<()> {
        if !self.device.is_cpu() || self.mode.ops.is_portable() {
            return Err(BackendError::Options(
                "compute = \"bf16\" runs on the CPU's bf16 kernels; on a GPU evaluate in f32"
                    .into(),
            ));
        }
        let copy = |frozen: &Frozen| -> Result<Arc<Bf16Matrix>> {
            let (rows, cols) = frozen.dims()?;
            let mut w = Bf16Matrix::new(rows, cols);
            frozen.tiles(crate::ops::fused::TILE_ROWS, |first, _, values| {
                w.set_rows(first, values)
            })?;
            Ok(Arc::new(w))
        };
        for (_, _, lin) in self.linears_mut() {
            lin.bf16 = Some(copy(&lin.base)?);
        }
        self.lm_head_bf16 = Some(copy(&self.lm_head)?);
        Ok(())
    }

    /// Adds fresh LoRA adapters to the projections named in `targets` and returns their
    /// parameters, named as PEFT names them (`model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub fn add_lora(
        &mut self,
        targets: &[&str],
        r: usize,
        alpha: f64,
        dropout: f32,
        seed: u64,
    ) -> Result<Vec<(String, candle_core::Var)>> {
        let device = self.device.clone();
        let mut params = Vec::new();
        for (i, (layer, name, lin)) in self.linears_mut().enumerate() {
            if !targets.contains(&name) {
                continue;
            }
            let (out, inp) = lin.dims();
            let lora = Lora::new(
                inp,
                out,
                r,
                alpha,
                dropout,
                seed.wrapping_add(i as u64),
                &device,
            )?;
            let module = format!(
                "model.layers.{layer}.{}.{name}",
                if ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&name) {
                    "self_attn"
                } else {
                    "mlp"
                }
            );
            params.push((format!("{module}.lora_A.weight"), lora.a.clone()));
            params.push((format!("{module}.lora_B.weight"), lora.b.clone()));
            lin.lora = Some(lora);
        }
        Ok(params)
    }

    /// Turns training on (LoRA dropout, the fused training ops) or off (evaluation).
    pub fn set_training(&mut self, training: bool) {
        self.mode.train = training;
    }

    /// Whether training's products (frozen weights and adapters) run in bf16 (where the CPU
    /// has AMX or AVX512-BF16; elsewhere in f32 either way). Evaluation is always f32.
    pub fn set_bf16(&mut self, bf16: bool) {
        self.mode.bf16 = bf16;
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs `tokens` (B rows of T new tokens) after the cached positions.
    ///
    /// `positions` gives each row's rotary position of its first new token; `key_valid`, when
    /// given, says for each row which cached positions are real (1) or padding (0), shape
    /// (B, cache_len). Returns the final hidden states (B, T, hidden), normalised.
    pub fn forward(
        &self,
        tokens: &[Vec<u32>],
        positions: &[usize],
        key_valid: Option<&[Vec<bool>]>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let b = tokens.len();
        let t = tokens[0].len();
        if tokens.iter().any(|r| r.len() != t) || positions.len() != b {
            return Err(BackendError::Internal(
                "ragged batch passed to forward".into(),
            ));
        }
        let past = cache.len();
        let max_pos = positions.iter().max().copied().unwrap_or(0) + t;
        if max_pos > self.config.max_position_embeddings {
            return Err(BackendError::TooLong {
                tokens: max_pos,
                limit: self.config.max_position_embeddings,
            });
        }
        let (mut x, pass) = self.embed(tokens, positions, key_valid, past)?;
        let mut new_layers = Vec::with_capacity(self.blocks.len());
        for l in 0..self.blocks.len() {
            let (y, kv) = self.block(l, &x, &pass, cache.layers.get(l), 0)?;
            new_layers.extend(kv);
            x = y;
        }
        // The fused training attention keeps no keys: then nothing is cached.
        cache.layers = if new_layers.len() == self.blocks.len() {
            new_layers
        } else {
            Vec::new()
        };
        self.final_norm(&x)
    }

    /// Token embeddings (B, T, hidden) and the per-pass inputs every layer shares.
    pub fn embed(
        &self,
        tokens: &[Vec<u32>],
        positions: &[usize],
        key_valid: Option<&[Vec<bool>]>,
        past: usize,
    ) -> Result<(Tensor, Pass)> {
        let (b, t) = (tokens.len(), tokens[0].len());
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        let x = match &self.embed {
            Frozen::Blocks(table) => {
                // The rows of the tokens, expanded from the blocks to the f32 copy's values.
                let cols = table.cols;
                let mut x = vec![0f32; flat.len() * cols];
                for (&id, row) in flat.iter().zip(x.chunks_exact_mut(cols)) {
                    if id as usize >= table.rows {
                        return Err(BackendError::Internal(format!(
                            "token id {id} is outside the vocabulary of {}",
                            table.rows
                        )));
                    }
                    table.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(x, (b, t, cols), &self.device)?
            }
            table => {
                let ids = Tensor::from_vec(flat, (b * t,), &self.device)?;
                table.weight()?.index_select(&ids, 0)?.reshape((b, t, ()))?
            }
        };
        // Rotary tables for each row's positions: (B, 1, T, head_dim/2).
        let pos: Vec<u32> = positions
            .iter()
            .flat_map(|&p| (p..p + t).map(|q| q as u32))
            .collect();
        let pos = Tensor::from_vec(pos, (b * t,), &self.device)?;
        let half = self.config.head_dim() / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, 1, t, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, 1, t, half))?;
        // The cached attention masks as it goes; the composed one adds a mask tensor.
        let mask = if self.mode.cached_attention() {
            None
        } else {
            self.mask(b, t, past, key_valid)?
        };
        let from_zero = if self.mode.ops == OpSet::Fused
            && past == 0
            && key_valid.is_none()
            && positions.iter().all(|&p| p == 0)
        {
            let table = |x: &Tensor| -> Result<RopeTable> {
                Ok(Arc::new(
                    x.narrow(0, 0, t)?.flatten_all()?.to_vec1::<f32>()?,
                ))
            };
            Some((table(&self.cos)?, table(&self.sin)?))
        } else {
            None
        };
        Ok((
            x,
            Pass {
                cos,
                sin,
                mask,
                key_valid: key_valid.map(<[Vec<bool>]>::to_vec),
                from_zero,
            },
        ))
    }

    /// Layer `l` on `x` (B, T, hidden): the new hidden states and this pass's keys and values
    /// (none in training mode, whose fused attention caches nothing). `dropout_seed` fixes the LoRA dropout masks, so a recomputation repeats them exactly.
    pub fn block(
        &self,
        l: usize,
        x: &Tensor,
        pass: &Pass,
        past_kv: Option<&(Tensor, Tensor)>,
        dropout_seed: u64,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let block = &self.blocks[l];
        let seed = dropout_seed
            .wrapping_mul(0x9e37_79b9)
            .wrapping_add(l as u64 * 16);
        let mode = self.mode;
        let (x1, kv) = match (mode.train, mode.ops, past_kv, &pass.from_zero) {
            (true, OpSet::Fused, None, Some((cos, sin))) => {
                // Training: the attention half as one op that keeps little for the backward
                // pass ([`SelfAttention`]).
                let attention = CausalAttention {
                    heads: self.config.num_heads,
                    kv_heads: self.config.num_kv_heads,
                    head_dim: self.config.head_dim(),
                    cos: cos.clone(),
                    sin: sin.clone(),
                };
                let a = &block.attn;
                let parts = fused_parts(
                    [
                        (&a.q, seed),
                        (&a.k, seed + 1),
                        (&a.v, seed + 2),
                        (&a.o, seed + 3),
                    ],
                    mode,
                );
                let op = SelfAttention::new(block.input_norm.fused(), attention, parts);
                (op.forward(x)?, None)
            }
            _ => {
                let h = block.input_norm.forward(x, mode.ops)?;
                let (h, kv) = self.attention(&block.attn, &h, pass, past_kv, seed)?;
                ((x + h)?, kv)
            }
        };
        Ok((self.mlp(block, &x1, seed)?, kv))
    }

    /// The feed-forward half of a layer with its residual: `x + down(silu(gate(n)) ⊙ up(n))`
    /// with `n` the normalised `x`. Training on the fused ops runs it as one op that keeps less
    /// for the backward pass ([`SwiGluMlp`]).
    fn mlp(&self, block: &Block, x: &Tensor, seed: u64) -> candle_core::Result<Tensor> {
        let (m, mode) = (&block.mlp, self.mode);
        let adapted = [&m.gate, &m.up, &m.down].iter().any(|l| l.lora.is_some());
        if mode.train && mode.ops == OpSet::Fused && (adapted || x.track_op()) {
            let parts = fused_parts(
                [(&m.gate, seed + 4), (&m.up, seed + 5), (&m.down, seed + 6)],
                mode,
            );
            return SwiGluMlp::new(block.post_norm.fused(), parts).forward(x);
        }
        let h = block.post_norm.forward(x, mode.ops)?;
        let gate = m.gate.forward(&h, mode, seed + 4)?;
        let up = m.up.forward(&h, mode, seed + 5)?;
        let g = mode.ops.swiglu(&gate, &up)?;
        x + m.down.forward(&g, mode, seed + 6)?
    }

    /// The final normalisation of the hidden states.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(x, self.mode.ops)?)
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The output projection (vocab, hidden) as the fused loss takes it.
    pub fn output_projection(&self) -> Frozen {
        self.lm_head.clone()
    }

    /// Logits (N, vocab) of hidden states (N, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match (&self.lm_head_bf16, &self.lm_head) {
            (Some(w), _) if !self.mode.train && !hidden.track_op() => matmul_t_bf16(hidden, w)?,
            _ if self.mode.ops.is_portable() => hidden.matmul(&self.lm_head.weight()?.t()?)?,
            (_, Frozen::Dense(w)) => matmul_t_with(hidden, w, self.lm_head_blocks.as_deref())?,
            (_, Frozen::Blocks(b)) if !hidden.track_op() => matmul_t_blocks(hidden, b)?,
            (_, frozen) => FrozenLinear(frozen.clone()).forward(hidden)?,
        })
    }

    /// Additive attention mask (B, 1, T, past + T): causal over new tokens, padding masked.
    fn mask(
        &self,
        b: usize,
        t: usize,
        past: usize,
        key_valid: Option<&[Vec<bool>]>,
    ) -> Result<Option<Tensor>> {
        if t == 1 && key_valid.is_none() {
            return Ok(None);
        }
        let total = past + t;
        let mut m = vec![0f32; b * t * total];
        for row in 0..b {
            for i in 0..t {
                for j in 0..total {
                    let masked = if j < past {
                        key_valid.is_some_and(|kv| !kv[row][j])
                    } else {
                        j - past > i
                    };
                    if masked {
                        m[(row * t + i) * total + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (b, 1, t, total), &self.device)?))
    }

    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        pass: &Pass,
        past: Option<&(Tensor, Tensor)>,
        seed: u64,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            self.config.num_heads,
            self.config.num_kv_heads,
            self.config.head_dim(),
        );
        let mode = self.mode;
        let (q, k, v) = (
            a.q.forward(x, mode, seed)?,
            a.k.forward(x, mode, seed + 1)?,
            a.v.forward(x, mode, seed + 2)?,
        );
        if mode.cached_attention() && ![&q, &k, &v].iter().any(|p| p.track_op()) {
            let op = CachedAttention {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
            };
            let cache = CacheInputs {
                cos: &pass.cos,
                sin: &pass.sin,
                past: past.map(|(k, v)| (k, v)),
                key_valid: pass.key_valid.as_deref(),
            };
            let (y, k, v) = op.forward(&q, &k, &v, &cache)?;
            return Ok((a.o.forward(&y, mode, seed + 3)?, Some((k, v))));
        }
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let q = rope(&q, &pass.cos, &pass.sin)?;
        let k = rope(&k, &pass.cos, &pass.sin)?;
        let v = v.contiguous()?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let total = k.dim(2)?;
        let rep = nh / nkv;
        // Group query heads by their key head: (B, nkv, rep*T, hd), so keys are not copied.
        let qg = q.reshape((b, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (qg.matmul(&k.t()?)? * scale)?;
        let att = att.reshape((b, nh, t, total))?;
        // Evaluation builds no mask for the cached attention; a graph through it (gradients
        // taken outside training, as the tests do) needs one here.
        let built = if mode.cached_attention() {
            self.mask(b, t, total - t, pass.key_valid.as_deref())?
        } else {
            None
        };
        let att = match built.as_ref().or(pass.mask.as_ref()) {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        // The fused softmax has no backward pass; use the composed one when training.
        let att = if att.track_op() {
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att.reshape((b, nkv, rep * t, total))?.matmul(&v)?;
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok((a.o.forward(&y, mode, seed + 3)?, Some((k, v))))
    }
}

/// Rotate-half rotary embedding with per-row tables: x (B, H, T, D), cos/sin (B, 1, T, D/2).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)?.contiguous()
}

fn rope_tables(config: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = config.head_dim();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
        .collect();
    let n = config.max_position_embeddings;
    let inv = Tensor::from_vec(inv, (1, hd / 2), device)?;
    let t = Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let freqs = t.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

impl KvCache {
    /// Keeps only the batch rows in `rows` (in that order).
    pub fn select_rows(&self, rows: &[u32]) -> candle_core::Result<KvCache> {
        let Some((k0, _)) = self.layers.first() else {
            return Ok(KvCache::default());
        };
        let idx = Tensor::new(rows, k0.device())?;
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(KvCache { layers })
    }
}

/// A tiny random model for tests of this crate.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::HashMap;

    use super::*;

    pub fn uniform(n: usize, scale: f32, seed: u64) -> Vec<f32> {
        crate::train::lora::seeded_uniform(n, scale, seed)
    }

    /// A random 2-layer model: hidden 64, 4 heads over 2 key heads, vocab 50.
    pub fn tiny_model() -> Llama {
        let (config, mut weights) = tiny_weights();
        Llama::new(config, &mut weights, &Device::Cpu).unwrap()
    }

    /// The configuration and weights of [`tiny_model`].
    pub fn tiny_weights() -> (Config, Weights) {
        let config = Config {
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: 50,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
        };
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        let mut seed = 1;
        let mut add = |name: String, shape: (usize, usize), scale: f32| {
            seed += 1;
            let v = uniform(shape.0 * shape.1, scale, seed);
            t.insert(name, Tensor::from_vec(v, shape, &dev).unwrap());
        };
        add("model.embed_tokens.weight".into(), (50, 64), 1.0);
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            for (n, shape) in [
                ("self_attn.q_proj", (64, 64)),
                ("self_attn.k_proj", (32, 64)),
                ("self_attn.v_proj", (32, 64)),
                ("self_attn.o_proj", (64, 64)),
                ("mlp.gate_proj", (128, 64)),
                ("mlp.up_proj", (128, 64)),
                ("mlp.down_proj", (64, 128)),
            ] {
                add(format!("{p}.{n}.weight"), shape, 0.2);
            }
        }
        let ones = |n| Tensor::ones(n, DType::F32, &dev).unwrap();
        for l in 0..2 {
            t.insert(format!("model.layers.{l}.input_layernorm.weight"), ones(64));
            t.insert(
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                ones(64),
            );
        }
        t.insert("model.norm.weight".into(), ones(64));
        (config, Weights::new(t))
    }

    /// [`tiny_weights`] as a GGUF of Q4_1 projections and a Q8_0 embedding loads with
    /// `packing`: every such weight replaced by candle's dequantization of its blocks, the
    /// blocks kept beside it (or instead of it, for `Packing::Blocks`).
    pub fn tiny_weights_q4_1(packing: crate::model::weights::Packing) -> (Config, Weights) {
        use crate::ops::blocks::BlockKind;
        use candle_core::quantized::{GgmlDType, QTensor};
        let (config, mut all) = tiny_weights();
        let mut weights = Weights::empty(packing);
        for name in all.shapes().into_keys() {
            let t = all.take(&name).unwrap();
            let (dtype, kind) = if name.ends_with("_proj.weight") {
                (GgmlDType::Q4_1, BlockKind::Q4_1)
            } else if name == "model.embed_tokens.weight" {
                (GgmlDType::Q8_0, BlockKind::Q8_0)
            } else {
                weights.insert(name, t).unwrap();
                continue;
            };
            let (rows, cols) = t.dims2().unwrap();
            let q = QTensor::quantize(&t, dtype).unwrap();
            let bytes = q.data().unwrap().into_owned();
            let blocks = BlockMatrix::new(kind, rows, cols, bytes).unwrap();
            weights
                .insert(name.clone(), q.dequantize(&Device::Cpu).unwrap())
                .unwrap();
            weights.insert_blocks(name, blocks);
        }
        (config, weights)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{tiny_model as tiny, uniform};
    use super::*;

    /// Mean next-token cross-entropy of `ids` under the model.
    fn loss(model: &Llama, ids: &[u32]) -> Tensor {
        let h = model
            .forward(&[ids.to_vec()], &[0], None, &mut KvCache::default())
            .unwrap();
        let t = ids.len();
        let logits = model.logits(&h.reshape((t, 64)).unwrap()).unwrap();
        let logp =
            candle_nn::ops::log_softmax(&logits.narrow(0, 0, t - 1).unwrap(), D::Minus1).unwrap();
        let targets = Tensor::new(&ids[1..], &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        (logp.gather(&targets, 1).unwrap().mean_all().unwrap() * -1.0).unwrap()
    }

    #[test]
    fn lora_gradients_through_nf4_layers_match_finite_differences() {
        let mut model = tiny();
        model.quantize_nf4(true).unwrap();
        let params = model.add_lora(&TARGETS, 4, 8.0, 0.0, 3).unwrap();
        assert_eq!(params.len(), 2 * 7 * 2);
        // Non-zero B everywhere, so that every A has a gradient too.
        for (i, (name, var)) in params.iter().enumerate() {
            if name.contains("lora_B") {
                let n = var.as_tensor().elem_count();
                let v = Tensor::from_vec(
                    uniform(n, 0.1, 100 + i as u64),
                    var.as_tensor().shape(),
                    &Device::Cpu,
                )
                .unwrap();
                var.set(&v).unwrap();
            }
        }
        let ids: Vec<u32> = vec![3, 17, 42, 8, 8, 25, 1, 49, 30];
        let grads = loss(&model, &ids).backward().unwrap();
        // Check a few coordinates of A and B in the first and the last layer.
        for (name, var) in params.iter().filter(|(n, _)| {
            n.contains("layers.0.self_attn.q_proj")
                || n.contains("layers.1.mlp.down_proj")
                || n.contains("layers.0.mlp.up_proj")
        }) {
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for &i in &[0usize, 7, base.len() / 2, base.len() - 1] {
                let eps = 1e-2f32;
                let at = |delta: f32| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&model, &ids).to_scalar::<f32>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                var.set(
                    &Tensor::from_vec(base.clone(), var.as_tensor().shape(), &Device::Cpu).unwrap(),
                )
                .unwrap();
                assert!(
                    (fd - g[i]).abs() <= 2e-3 + 0.05 * g[i].abs(),
                    "{name}[{i}]: autograd {} vs finite difference {fd}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn the_portable_path_computes_the_logits_of_the_fused_one() {
        // Packed NF4 as the fused path multiplies it, and as tensors dequantized by tensor ops.
        let mut fused = tiny();
        fused.quantize_nf4(true).unwrap();
        let mut portable = tiny();
        portable.set_ops(OpSet::Portable).unwrap();
        portable.quantize_nf4(true).unwrap();
        assert!(portable.ops().is_portable() && !fused.ops().is_portable());
        let ids = [5u32, 9, 14, 2, 33, 7];
        let a = loss(&fused, &ids).to_scalar::<f32>().unwrap();
        let b = loss(&portable, &ids).to_scalar::<f32>().unwrap();
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn cached_attention_gives_the_composed_attentions_hidden_states() {
        // Evaluation on the fused ops attends in one op over the cache; the portable ops compose
        // rotation, concatenation, an additive mask and softmax. Both runs: a prefix alone, two
        // rows continuing it by different lengths (the shorter one right-padded), and a decoding
        // step whose padded key is masked out.
        let fused = tiny();
        let mut portable = tiny();
        portable.set_ops(OpSet::Portable).unwrap();
        let run = |m: &Llama| -> Vec<f32> {
            let flat = |h: Tensor| h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut cache = KvCache::default();
            let mut out = flat(
                m.forward(&[vec![3, 17, 42]], &[0], None, &mut cache)
                    .unwrap(),
            );
            let mut cache = KvCache::stack(&[cache.clone(), cache]).unwrap();
            let rows = [vec![8, 8, 25], vec![1, 49, 49]];
            out.extend(flat(m.forward(&rows, &[3, 3], None, &mut cache).unwrap()));
            let valid = [vec![true; 6], vec![true, true, true, true, true, false]];
            let step = m.forward(&[vec![30], vec![12]], &[6, 5], Some(&valid), &mut cache);
            out.extend(flat(step.unwrap()));
            assert_eq!(cache.len(), 7);
            out
        };
        let (a, b) = (run(&fused), run(&portable));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
        }
        // The padded key is really masked: changing what the padding holds changes nothing.
        let mut cache = KvCache::default();
        fused
            .forward(&[vec![3, 17, 42]], &[0], None, &mut cache)
            .unwrap();
        let mut cache = KvCache::stack(&[cache.clone(), cache]).unwrap();
        fused
            .forward(&[vec![8, 8, 25], vec![1, 49, 7]], &[3, 3], None, &mut cache)
            .unwrap();
        let valid = [vec![true; 6], vec![true, true, true, true, true, false]];
        let step = fused
            .forward(&[vec![30], vec![12]], &[6, 5], Some(&valid), &mut cache)
            .unwrap();
        let n = step.elem_count();
        assert_eq!(
            step.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            a[a.len() - n..]
        );
    }

    #[test]
    fn a_base_of_blocks_alone_gives_the_f32_copys_logits_bit_for_bit() {
        use crate::model::weights::Packing;
        let (config, mut weights) = super::testing::tiny_weights_q4_1(Packing::F32);
        let dense = Llama::new(config, &mut weights, &Device::Cpu).unwrap();
        let (config, mut weights) = super::testing::tiny_weights_q4_1(Packing::Blocks);
        let mut blocks = Llama::new(config, &mut weights, &Device::Cpu).unwrap();
        assert!(matches!(blocks.embed, Frozen::Blocks(_)));
        assert!(matches!(blocks.lm_head, Frozen::Blocks(_)));
        assert_eq!(blocks.keep_projections_in_blocks().unwrap(), 14);
        // 3 rows take the decoding kernel, 24 the gemm over the expanded weight.
        for len in [3usize, 24] {
            let ids: Vec<u32> = (0..len as u32).map(|i| (i * 11 + 3) % 50).collect();
            let (a, b) = (loss(&dense, &ids), loss(&blocks, &ids));
            let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
            assert_eq!(a.to_bits(), b.to_bits(), "{len} tokens: {a} vs {b}");
        }
    }

    #[test]
    fn bf16_compute_changes_logits_by_rounding_alone_on_either_base() {
        use crate::model::weights::Packing;
        let (config, mut weights) = super::testing::tiny_weights_q4_1(Packing::F32);
        let dense = Llama::new(config, &mut weights, &Device::Cpu).unwrap();
        let (config, mut weights) = super::testing::tiny_weights_q4_1(Packing::F32);
        let mut bf16 = Llama::new(config, &mut weights, &Device::Cpu).unwrap();
        bf16.compute_in_bf16().unwrap();
        let (config, mut weights) = super::testing::tiny_weights_q4_1(Packing::Blocks);
        let mut blocks = Llama::new(config, &mut weights, &Device::Cpu).unwrap();
        blocks.keep_projections_in_blocks().unwrap();
        blocks.compute_in_bf16().unwrap();
        // 3 rows take the decoding kernel, 24 the prompt path.
        for len in [3usize, 24] {
            let ids: Vec<u32> = (0..len as u32).map(|i| (i * 11 + 3) % 50).collect();
            let f32_loss = loss(&dense, &ids).to_scalar::<f32>().unwrap();
            let bf16_loss = loss(&bf16, &ids).to_scalar::<f32>().unwrap();
            assert_ne!(
                f32_loss, bf16_loss,
                "{len} tokens: compute = bf16 changed nothing"
            );
            assert!(
                (f32_loss - bf16_loss).abs() < 1e-2 * f32_loss.abs(),
                "{len} tokens: {f32_loss} vs {bf16_loss}"
            );
            // The same bf16 weights whichever form the base is held in.
            let from_blocks = loss(&blocks, &ids).to_scalar::<f32>().unwrap();
            assert_eq!(bf16_loss.to_bits(), from_blocks.to_bits());
        }
    }

    #[test]
    fn nf4_base_changes_logits_only_by_quantization_error() {
        let dense = tiny();
        let mut q = tiny();
        q.quantize_nf4(true).unwrap();
        let ids = [1u32, 2, 3, 4];
        let a = loss(&dense, &ids).to_scalar::<f32>().unwrap();
        let b = loss(&q, &ids).to_scalar::<f32>().unwrap();
        assert!((a - b).abs() < 0.2 * a.abs(), "{a} vs {b}");
    }
}
