//! A layer's feed-forward half in training, as one op.

use super::lora_linear::{keep, split_adapters, take, Kept, LayerProjection};
use super::rms_norm::{rms_norm_rows, rms_norm_rows_backward};
use super::swiglu::{swiglu_backward, swiglu_rows};
use super::*;

/// The feed-forward half of a LLaMA layer in training, as one op:
/// `y = x + down(silu(gate(n)) ⊙ up(n))` with `n = rms_norm(x)`, each projection with its LoRA
/// adapter where it has one. Its inputs are x and the adapters' matrices flattened and
/// concatenated (gate A, gate B, up A, up B, down A, down B, those present), so that one op
/// takes them all (candle's custom ops take at most three inputs).
///
/// Why one op: composed of the norm, three [`LoraLinear`]s, [`SwiGlu`] and an addition, autograd
/// keeps the normalised input, both projections, their product and the down projection's output
/// until the backward pass (5,760 floats a token in SmolLM2-135M, most of a training step's
/// memory). This op keeps x and the two projections (3,072 floats), recomputes the norm and the
/// product in its backward pass, and hands the projections back to the allocator there, as the
/// backward pass leaves the layer instead of when it ends. Values and gradients are those of the
/// composition, bit for bit (tested).
#[derive(Clone)]
pub struct SwiGluMlp {
    pub norm: RmsNorm,
    pub gate: LayerProjection,
    pub up: LayerProjection,
    pub down: LayerProjection,
    /// The gate and up projections.
    kept: Kept<(Vec<f32>, Vec<f32>)>,
}

impl SwiGluMlp {
    pub fn new(norm: RmsNorm, [gate, up, down]: [LayerProjection; 3]) -> Self {
        SwiGluMlp {
            norm,
            gate,
            up,
            down,
            kept: Arc::default(),
        }
    }

    /// Applies the op to `x` (.., hidden) with the flat adapters, or none where no projection has
    /// one.
    pub fn forward(&self, x: &Tensor, adapters: Option<&Tensor>) -> R<Tensor> {
        let x = x.contiguous()?;
        match adapters {
            Some(a) => x.apply_op2(&a.contiguous()?, self.clone()),
            None => x.apply_op1(self.clone()),
        }
    }

    /// The adapters' parts of `flat`, in the order gate, up, down.
    fn split<'a>(&self, flat: &'a [f32]) -> R<[&'a [f32]; 3]> {
        split_adapters("swiglu-mlp", [&self.gate, &self.up, &self.down], flat)
    }

    /// (hidden, rows) of the input `x`.
    fn rows(&self, x: &[f32], shape: &Shape) -> R<(usize, usize)> {
        let hidden = self.gate.dims()?.1;
        if shape.dims().last() != Some(&hidden) || self.down.dims()?.0 != hidden {
            candle_core::bail!(
                "swiglu-mlp: input {shape:?} does not fit a hidden size of {hidden}"
            );
        }
        Ok((hidden, x.len() / hidden))
    }

    /// The normalised input, and the gate and up projections of it.
    fn gate_up(&self, x: &[f32], m: usize, flat: &[f32]) -> R<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let [fg, fu, _] = self.split(flat)?;
        let n = rms_norm_rows(x, &values(&self.norm.weight)?, self.norm.eps);
        let g = self.gate.forward(&n, m, fg)?;
        let u = self.up.forward(&n, m, fu)?;
        Ok((n, g, u))
    }

    fn fwd(&self, x: &[f32], shape: &Shape, flat: &[f32]) -> R<(CpuStorage, Shape)> {
        let (_, m) = self.rows(x, shape)?;
        let (_, g, u) = self.gate_up(x, m, flat)?;
        let [.., fd] = self.split(flat)?;
        let mut y = self.down.forward(&swiglu_rows(&g, &u), m, fd)?;
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, x) in y.iter_mut().zip(x) {
                    *y += x;
                }
            });
        keep(&self.kept, (g, u));
        Ok((CpuStorage::F32(y), shape.clone()))
    }

    /// The gradients of x and of the flat adapters for the output gradient `dy`.
    fn bwd_values(&self, x: &Tensor, flat: &[f32], dy: &[f32]) -> R<(Tensor, Vec<f32>)> {
        let xs = Values::of(x)?;
        let (_, m) = self.rows(&xs, x.shape())?;
        let [fg, fu, fd] = self.split(flat)?;
        let (n, g, u) = match take(&self.kept) {
            Some((g, u)) => {
                let w = values(&self.norm.weight)?;
                (rms_norm_rows(&xs, &w, self.norm.eps), g, u)
            }
            None => self.gate_up(&xs, m, flat)?,
        };
        let (da, grad_d) = self.down.backward(&swiglu_rows(&g, &u), m, fd, dy)?;
        let (dg, du) = swiglu_backward(&g, &u, &da);
        drop((g, u, da));
        let (mut dn, grad_g) = self.gate.backward(&n, m, fg, &dg)?;
        let (dn_up, grad_u) = self.up.backward(&n, m, fu, &du)?;
        for (a, b) in dn.iter_mut().zip(&dn_up) {
            *a += b;
        }
        let w = values(&self.norm.weight)?;
        let mut dx = rms_norm_rows_backward(&xs, &dn, &w, self.norm.eps);
        // The residual path: x's gradient is also dy.
        for (a, b) in dx.iter_mut().zip(dy) {
            *a += b;
        }
        let grads = [grad_g, grad_u, grad_d].concat();
        Ok((tensor(dx, x.shape())?, grads))
    }
}

impl CustomOp1 for SwiGluMlp {
    fn name(&self) -> &'static str {
        "swiglu-mlp"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> R<(CpuStorage, Shape)> {
        self.fwd(input(storage, layout, "swiglu-mlp")?, layout.shape(), &[])
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> R<Option<Tensor>> {
        Ok(Some(self.bwd_values(x, &[], &Values::of(grad)?)?.0))
    }
}

impl CustomOp2 for SwiGluMlp {
    fn name(&self) -> &'static str {
        "swiglu-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let x = input(s1, l1, "swiglu-mlp")?;
        self.fwd(x, l1.shape(), input(s2, l2, "swiglu-mlp")?)
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
