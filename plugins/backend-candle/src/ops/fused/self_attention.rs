//! A layer's attention half in training, as one op.

use super::layer_half::{
    add_residual, apply, input_gradient, keep, take, HalfLayer, Kept, LayerProjection,
};
use super::*;

/// The attention half of a LLaMA layer in training, for sequences that start at position 0
/// with no cache, as one op: `y = x + o(attention(q(n), k(n), v(n)))` with `n = rms_norm(x)`,
/// rotary causal attention ([`CausalAttention`]) and each projection with its LoRA adapter where
/// it has one.
///
/// Why one op: composed, autograd keeps the normalised input, q, k, v, the attention output and
/// the output projection until the backward pass (3,072 floats a token in SmolLM2-135M). This op
/// keeps x, and q, k and v (960 floats), and recomputes the norm and the attention output in its
/// backward pass (the attention costs a few percent of the projections at training's lengths);
/// the kept projections are handed back there. Values and gradients are those of the
/// composition, bit for bit (tested).
#[derive(Clone)]
pub struct SelfAttention {
    pub norm: RmsNorm,
    pub attention: CausalAttention,
    pub q: LayerProjection,
    pub k: LayerProjection,
    pub v: LayerProjection,
    pub o: LayerProjection,
    /// q, k and v.
    kept: Kept<(Vec<f32>, Vec<f32>, Vec<f32>)>,
}

impl SelfAttention {
    pub fn new(
        norm: RmsNorm,
        attention: CausalAttention,
        [q, k, v, o]: [LayerProjection; 4],
    ) -> Self {
        SelfAttention {
            norm,
            attention,
            q,
            k,
            v,
            o,
            kept: Arc::default(),
        }
    }

    /// Applies the op to `x` (B, T, hidden).
    pub fn forward(&self, x: &Tensor) -> R<Tensor> {
        apply(self, x)
    }

    /// (B, T) of the input of `shape`, checked against the projections and the heads.
    fn batch(&self, shape: &Shape) -> R<(usize, usize)> {
        let (b, t, hidden) = shape.dims3()?;
        let a = &self.attention;
        let (d, cols) = (a.head_dim, self.q.dims()?.1);
        let fits = hidden == cols
            && self.q.dims()?.0 == a.heads * d
            && self.k.dims()? == (a.kv_heads * d, hidden)
            && self.v.dims()? == (a.kv_heads * d, hidden)
            && self.o.dims()? == (hidden, a.heads * d)
            && a.heads.is_multiple_of(a.kv_heads)
            && a.cos.len() >= t * d / 2
            && a.sin.len() >= t * d / 2;
        if !fits {
            candle_core::bail!(
                "self-attention: input {shape:?} does not fit the projections and {} heads, {} key heads of {d}",
                a.heads,
                a.kv_heads
            );
        }
        Ok((b, t))
    }

    /// q, k and v of the normalised input `n` (m rows).
    fn qkv(&self, n: &[f32], m: usize) -> R<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        Ok((
            self.q.forward(n, m)?,
            self.k.forward(n, m)?,
            self.v.forward(n, m)?,
        ))
    }
}

impl HalfLayer for SelfAttention {
    const NAME: &'static str = "self-attention";

    fn projections(&self) -> Vec<&LayerProjection> {
        vec![&self.q, &self.k, &self.v, &self.o]
    }

    fn fwd(&self, x: &[f32], shape: &Shape) -> R<Vec<f32>> {
        let (b, t) = self.batch(shape)?;
        let (q, k, v) = self.qkv(&self.norm.rows(x)?, b * t)?;
        let att = self.attention.attend(&q, &k, &v, b, t);
        let mut y = self.o.forward(&att, b * t)?;
        add_residual(&mut y, x);
        keep(&self.kept, (q, k, v));
        Ok(y)
    }

    fn bwd(&self, x: &Tensor, dy: &[f32]) -> R<Vec<f32>> {
        let (b, t) = self.batch(x.shape())?;
        let m = b * t;
        let xs = Values::of(x)?;
        let n = self.norm.rows(&xs)?;
        let (q, k, v) = match take(&self.kept) {
            Some(qkv) => qkv,
            None => self.qkv(&n, m)?,
        };
        let att = self.attention.attend(&q, &k, &v, b, t);
        let datt = self.o.backward(&att, m, dy)?;
        drop(att);
        let (dq, dk, dv) = self.attention.attend_backward(&q, &k, &v, &datt, b, t);
        drop((q, k, v, datt));
        // n's gradient from its three projections, summed in the order autograd sums them in
        // the composed layer (v, k, q), so that the gradients stay bit for bit.
        let mut dn = self.v.backward(&n, m, &dv)?;
        let dn_k = self.k.backward(&n, m, &dk)?;
        let dn_q = self.q.backward(&n, m, &dq)?;
        for ((a, k), q) in dn.iter_mut().zip(&dn_k).zip(&dn_q) {
            *a = *a + k + q;
        }
        input_gradient(&self.norm, &xs, &dn, dy)
    }
}
