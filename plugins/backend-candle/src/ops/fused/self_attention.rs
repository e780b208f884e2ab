//! A layer's attention half in training, as one op.

use super::lora_linear::{keep, split_adapters, take, Kept, LayerProjection};
use super::rms_norm::{rms_norm_rows, rms_norm_rows_backward};
use super::*;

/// The attention half of a LLaMA layer in training, for sequences that start at position 0
/// with no cache, as one op: `y = x + o(attention(q(n), k(n), v(n)))` with `n = rms_norm(x)`,
/// rotary causal attention ([`CausalAttention`]) and each projection with its LoRA adapter where
/// it has one. Its inputs are x and the adapters' matrices flattened and concatenated (q A, q B,
/// k A, k B, v A, v B, o A, o B, those present).
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

    /// Applies the op to `x` (B, T, hidden) with the flat adapters, or none where no projection
    /// has one.
    pub fn forward(&self, x: &Tensor, adapters: Option<&Tensor>) -> R<Tensor> {
        let x = x.contiguous()?;
        match adapters {
            Some(a) => x.apply_op2(&a.contiguous()?, self.clone()),
            None => x.apply_op1(self.clone()),
        }
    }

    /// The adapters' parts of `flat`, in the order q, k, v, o.
    fn split<'a>(&self, flat: &'a [f32]) -> R<[&'a [f32]; 4]> {
        split_adapters("self-attention", [&self.q, &self.k, &self.v, &self.o], flat)
    }

    /// (B, T) of the input `x`, checked against the projections and the attention's heads.
    fn batch(&self, shape: &Shape) -> R<(usize, usize)> {
        let (b, t, hidden) = shape.dims3()?;
        let a = &self.attention;
        let (d, cols) = (a.head_dim, self.q.dims()?.1);
        let fits = hidden == cols
            && self.q.dims()?.0 == a.heads * d
            && self.k.dims()?.0 == a.kv_heads * d
            && self.v.dims()?.0 == a.kv_heads * d
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

    fn normed(&self, x: &[f32]) -> R<Vec<f32>> {
        Ok(rms_norm_rows(x, &values(&self.norm.weight)?, self.norm.eps))
    }

    /// q, k and v of the normalised input `n` (m rows).
    fn qkv(&self, n: &[f32], m: usize, flat: &[f32]) -> R<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let [fq, fk, fv, _] = self.split(flat)?;
        Ok((
            self.q.forward(n, m, fq)?,
            self.k.forward(n, m, fk)?,
            self.v.forward(n, m, fv)?,
        ))
    }

    fn fwd(&self, x: &[f32], shape: &Shape, flat: &[f32]) -> R<(CpuStorage, Shape)> {
        let (b, t) = self.batch(shape)?;
        let (q, k, v) = self.qkv(&self.normed(x)?, b * t, flat)?;
        let att = self.attention.attend(&q, &k, &v, b, t);
        let [.., fo] = self.split(flat)?;
        let mut y = self.o.forward(&att, b * t, fo)?;
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, x) in y.iter_mut().zip(x) {
                    *y += x;
                }
            });
        keep(&self.kept, (q, k, v));
        Ok((CpuStorage::F32(y), shape.clone()))
    }

    /// The gradients of x and of the flat adapters for the output gradient `dy`.
    fn bwd_values(&self, x: &Tensor, flat: &[f32], dy: &[f32]) -> R<(Tensor, Vec<f32>)> {
        let (b, t) = self.batch(x.shape())?;
        let m = b * t;
        let xs = Values::of(x)?;
        let [fq, fk, fv, fo] = self.split(flat)?;
        let n = self.normed(&xs)?;
        let (q, k, v) = match take(&self.kept) {
            Some(qkv) => qkv,
            None => self.qkv(&n, m, flat)?,
        };
        let att = self.attention.attend(&q, &k, &v, b, t);
        let (datt, grad_o) = self.o.backward(&att, m, fo, dy)?;
        drop(att);
        let (dq, dk, dv) = self.attention.attend_backward(&q, &k, &v, &datt, b, t);
        drop((q, k, v, datt));
        // n's gradient from its three projections, summed in the order autograd sums them in
        // the composed layer (v, k, q), so that the gradients stay bit for bit.
        let (mut dn, grad_v) = self.v.backward(&n, m, fv, &dv)?;
        let (dn_k, grad_k) = self.k.backward(&n, m, fk, &dk)?;
        let (dn_q, grad_q) = self.q.backward(&n, m, fq, &dq)?;
        for ((a, k), q) in dn.iter_mut().zip(&dn_k).zip(&dn_q) {
            *a = *a + k + q;
        }
        let w = values(&self.norm.weight)?;
        let mut dx = rms_norm_rows_backward(&xs, &dn, &w, self.norm.eps);
        // The residual path: x's gradient is also dy.
        for (a, b) in dx.iter_mut().zip(dy) {
            *a += b;
        }
        let grads = [grad_q, grad_k, grad_v, grad_o].concat();
        Ok((tensor(dx, x.shape())?, grads))
    }
}

impl CustomOp1 for SelfAttention {
    fn name(&self) -> &'static str {
        "self-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> R<(CpuStorage, Shape)> {
        self.fwd(
            input(storage, layout, "self-attention")?,
            layout.shape(),
            &[],
        )
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> R<Option<Tensor>> {
        Ok(Some(self.bwd_values(x, &[], &Values::of(grad)?)?.0))
    }
}

impl CustomOp2 for SelfAttention {
    fn name(&self) -> &'static str {
        "self-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let x = input(s1, l1, "self-attention")?;
        self.fwd(x, l1.shape(), input(s2, l2, "self-attention")?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        adapters: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let flat = Values::of(adapters)?;
        let (dx, grads) = self.bwd_values(x, &flat, &Values::of(grad)?)?;
        Ok((Some(dx), Some(tensor(grads, adapters.shape())?)))
    }
}
