//! SwiGLU's gate.

use super::*;

/// SwiGLU's gate: `silu(g) ⊙ u`.
#[derive(Clone, Copy)]
pub struct SwiGlu;

impl SwiGlu {
    pub fn forward(g: &Tensor, u: &Tensor) -> R<Tensor> {
        g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `f(g, u)` element by element over two same-shaped contiguous inputs, in parallel chunks.
fn gate(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> R<(CpuStorage, Shape)> {
    let (g, u) = (input(s1, l1, op)?, input(s2, l2, op)?);
    if l1.shape() != l2.shape() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
    }
    Ok((CpuStorage::F32(map2(g, u, f)), l1.shape().clone()))
}

/// The gradients (dg, du) of [`SwiGlu`] at (g, u) for the output gradient `dy`, over slices.
pub(super) fn swiglu_backward(gs: &[f32], us: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = zeros(gs.len());
    let mut du = zeros(gs.len());
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            gs.par_chunks(CHUNK)
                .zip(us.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))),
        )
        .for_each(|((dg, du), (g, (u, dy)))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
    (dg, du)
}

fn swiglu_value(g: f32, u: f32) -> f32 {
    g * sigmoid(g) * u
}

/// [`SwiGlu`]'s value `silu(g) ⊙ u` over slices.
pub(super) fn swiglu_rows(g: &[f32], u: &[f32]) -> Vec<f32> {
    map2(g, u, swiglu_value)
}

/// `f(g, u)` element by element over two same-length slices, in parallel chunks.
fn map2(g: &[f32], u: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut y = zeros(g.len());
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = f(g, u);
            }
        });
    y
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        gate(self.name(), (s1, l1), (s2, l2), swiglu_value)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let (gs, us, dy) = (Values::of(g)?, Values::of(u)?, Values::of(grad)?);
        let (dg, du) = swiglu_backward(&gs, &us, &dy);
        Ok((Some(tensor(dg, g.shape())?), Some(tensor(du, u.shape())?)))
    }
}

/// Evaluation's gate: candle's `silu(g) * u` (`g / (1 + exp(-g))`, rounded, times `u`) in one
/// parallel pass with no intermediate tensor. The same expression gives the same bits as the
/// two candle ops, so answers do not move; [`SwiGlu`]'s form is kept for training, whose
/// backward pass it matches.
#[derive(Clone, Copy)]
pub struct SiluMul;

impl SiluMul {
    pub fn forward(g: &Tensor, u: &Tensor) -> R<Tensor> {
        g.contiguous()?.apply_op2_no_bwd(&u.contiguous()?, &SiluMul)
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        gate(self.name(), (s1, l1), (s2, l2), |g, u| {
            let silu = g / (1.0 + (-g).exp());
            silu * u
        })
    }
}

#[cfg(test)]
mod eval_tests {
    use super::*;

    #[test]
    fn silu_mul_gives_candles_silu_times_up_bit_for_bit() {
        let g = Tensor::randn(0f32, 3.0, (5, 1000), &Device::Cpu).unwrap();
        let u = Tensor::randn(0f32, 1.0, (5, 1000), &Device::Cpu).unwrap();
        let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        let got = SiluMul::forward(&g, &u).unwrap();
        let (want, got) = (values(&want).unwrap(), values(&got).unwrap());
        assert!(want
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
