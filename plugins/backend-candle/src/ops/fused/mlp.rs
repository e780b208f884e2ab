//! A layer's feed-forward half in training, as one op.

use super::layer_half::{
    add_residual, apply, input_gradient, keep, take, HalfLayer, Kept, LayerProjection,
};
use super::swiglu::{swiglu_backward, swiglu_rows};
use super::*;

/// The feed-forward half of a LLaMA layer in training, as one op:
/// `y = x + down(silu(gate(n)) ⊙ up(n))` with `n = rms_norm(x)`, each projection with its LoRA
/// adapter where it has one.
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

    /// Applies the op to `x` (.., hidden).
    pub fn forward(&self, x: &Tensor) -> R<Tensor> {
        apply(self, x)
    }

    /// Rows of the input of `shape`, checked against the projections.
    fn rows(&self, shape: &Shape) -> R<usize> {
        let hidden = self.gate.dims()?.1;
        let inter = self.gate.dims()?.0;
        let fits = shape.dims().last() == Some(&hidden)
            && self.up.dims()? == (inter, hidden)
            && self.down.dims()? == (hidden, inter);
        if !fits {
            candle_core::bail!("swiglu-mlp: input {shape:?} does not fit the projections");
        }
        Ok(shape.elem_count() / hidden)
    }
}

impl HalfLayer for SwiGluMlp {
    const NAME: &'static str = "swiglu-mlp";

    fn projections(&self) -> Vec<&LayerProjection> {
        vec![&self.gate, &self.up, &self.down]
    }

    fn fwd(&self, x: &[f32], shape: &Shape) -> R<Vec<f32>> {
        let m = self.rows(shape)?;
        let n = self.norm.rows(x)?;
        let (g, u) = (self.gate.forward(&n, m)?, self.up.forward(&n, m)?);
        drop(n);
        let mut y = self.down.forward(&swiglu_rows(&g, &u), m)?;
        add_residual(&mut y, x);
        keep(&self.kept, (g, u));
        Ok(y)
    }

    fn bwd(&self, x: &Tensor, dy: &[f32]) -> R<Vec<f32>> {
        let m = self.rows(x.shape())?;
        let xs = Values::of(x)?;
        let n = self.norm.rows(&xs)?;
        let (g, u) = match take(&self.kept) {
            Some(gu) => gu,
            None => (self.gate.forward(&n, m)?, self.up.forward(&n, m)?),
        };
        let da = self.down.backward(&swiglu_rows(&g, &u), m, dy)?;
        let (dg, du) = swiglu_backward(&g, &u, &da);
        drop((g, u, da));
        let mut dn = self.gate.backward(&n, m, &dg)?;
        // n's gradient from its two projections, summed as autograd sums them in the composed
        // layer (the sum of two is the same either way round).
        for (a, b) in dn.iter_mut().zip(&self.up.backward(&n, m, &du)?) {
            *a += b;
        }
        input_gradient(&self.norm, &xs, &dn, dy)
    }
}
