//! One LLaMA-family transformer for inference (and, later, training): RMSNorm, rotary
//! embeddings (rotate-half layout, as in the HF checkpoints), grouped-query attention, SwiGLU.
//!
//! candle-transformers' llama returns only the last position's logits and hard-wires its linear
//! layers; we need per-token log-likelihoods, batched decoding with per-row positions and, next,
//! LoRA on every projection, hence this module. Weights are held in HF names and layout (GGUF
//! q/k weights are un-permuted at load, see `checkpoint`), so PEFT adapters apply unchanged.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{BackendError, Result};
use crate::weights::Weights;

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

struct Linear {
    /// (out, in), contiguous.
    weight: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // x: (B, T, in) -> (B*T, in) @ (in, out)
        let (b, t, i) = x.dims3()?;
        let y = matmul_t(&x.reshape((b * t, i))?, &self.weight)?;
        y.reshape((b, t, ()))
    }
}

/// `x` (m, k) times `w` (n, k) transposed: the decoding kernel for a few rows, else gemm.
fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match crate::kernels::skinny_matmul_t(x, w)? {
        Some(y) => Ok(y),
        None => x.matmul(&w.t()?),
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
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
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
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
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// (vocab, hidden); the embedding matrix when the weights are tied.
    lm_head: Tensor,
    /// (max_positions, head_dim / 2)
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl Llama {
    /// Builds the model from weights in HF names (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub fn new(config: Config, weights: &mut Weights, device: &Device) -> Result<Self> {
        let linear = |w: &mut Weights, name: String| -> Result<Linear> {
            Ok(Linear {
                weight: w.take(&name)?.contiguous()?,
            })
        };
        let norm = |w: &mut Weights, name: String| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.take(&name)?,
                eps: config.rms_norm_eps,
            })
        };
        let embed = weights.take("model.embed_tokens.weight")?;
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
        let lm_head = match weights.try_take("lm_head.weight") {
            Some(w) if !config.tie_word_embeddings => w,
            _ => embed.clone(),
        };
        let (rows, cols) = embed.dims2()?;
        if rows != config.vocab_size || cols != config.hidden_size {
            return Err(BackendError::Checkpoint(format!(
                "embedding is {rows}x{cols}, but the config says vocab {} x hidden {}",
                config.vocab_size, config.hidden_size
            )));
        }
        let (cos, sin) = rope_tables(&config, device)?;
        Ok(Llama {
            config,
            embed,
            blocks,
            norm: norm_w,
            lm_head: lm_head.contiguous()?,
            cos,
            sin,
            device: device.clone(),
        })
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
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b * t,), &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.reshape((b, t, ()))?;

        // Rotary tables for each row's positions: (B, 1, T, head_dim/2).
        let pos: Vec<u32> = positions
            .iter()
            .flat_map(|&p| (p..p + t).map(|q| q as u32))
            .collect();
        let pos = Tensor::from_vec(pos, (b * t,), &self.device)?;
        let half = self.config.head_dim() / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, 1, t, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, 1, t, half))?;

        let mask = self.mask(b, t, past, key_valid)?;
        let mut new_layers = Vec::with_capacity(self.blocks.len());
        for (l, block) in self.blocks.iter().enumerate() {
            let residual = &x;
            let h = block.input_norm.forward(&x)?;
            let past_kv = cache.layers.get(l);
            let (h, kv) = self.attention(&block.attn, &h, &cos, &sin, past_kv, &mask)?;
            new_layers.push(kv);
            let x1 = (residual + h)?;
            let h = block.post_norm.forward(&x1)?;
            let m = &block.mlp;
            let g = candle_nn::ops::silu(&m.gate.forward(&h)?)?;
            let h = m.down.forward(&(g * m.up.forward(&h)?)?)?;
            x = (x1 + h)?;
        }
        cache.layers = new_layers;
        Ok(self.norm.forward(&x)?)
    }

    /// Logits (N, vocab) of hidden states (N, hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(matmul_t(hidden, &self.lm_head)?)
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
        cos: &Tensor,
        sin: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        mask: &Option<Tensor>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            self.config.num_heads,
            self.config.num_kv_heads,
            self.config.head_dim(),
        );
        let q = a.q.forward(x)?.reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = a.k.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = a.v.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
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
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.reshape((b, nkv, rep * t, total))?.matmul(&v)?;
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok((a.o.forward(&y)?, (k, v)))
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
