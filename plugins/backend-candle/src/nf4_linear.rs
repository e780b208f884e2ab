//! The frozen NF4 linear layer as a candle custom op: `y = x · deq(W)ᵀ`, with a backward pass
//! that gives the gradient to `x` only.
//!
//! candle's quantized matmul has no backward, and a plain matmul with a dequantized weight would
//! compute a weight gradient nobody needs and keep the full-precision weight alive. Here the
//! weight is dequantized one tile of rows at a time, in the forward and again in the backward
//! (`grad_x = grad_y · deq(W)`), so no full-precision copy of it ever exists (as bitsandbytes'
//! MatMul4Bit does on GPUs).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::frozen_linear::{input_rows, output};
use crate::nf4::Nf4Matrix;

/// Output rows dequantized at once: large enough for gemm to run well, small enough to stay in
/// cache (256 x 1536 f32 is 1.5 MiB).
const TILE_ROWS: usize = 256;

/// `x · deq(W)ᵀ` for an NF4 weight W of shape (out, in).
#[derive(Clone)]
pub struct Nf4MatMul {
    pub weight: Arc<Nf4Matrix>,
}

impl Nf4MatMul {
    /// Applies the op to `x` (.., in), keeping the graph for the backward pass.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1(self.clone())
    }

    fn tile(&self, first: usize, rows: usize) -> candle_core::Result<Tensor> {
        let mut buf = vec![0f32; rows * self.weight.cols];
        self.weight.dequantize_rows(first, &mut buf);
        Tensor::from_vec(buf, (rows, self.weight.cols), &Device::Cpu)
    }

    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.weight.rows)
            .step_by(TILE_ROWS)
            .map(|r| (r, TILE_ROWS.min(self.weight.rows - r)))
    }

    /// `x` (m, in) · deq(W)ᵀ -> (m, out), tile by tile.
    fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut parts = Vec::new();
        for (first, rows) in self.tiles() {
            let w = self.tile(first, rows)?;
            parts.push(match crate::kernels::skinny_matmul_t(x, &w)? {
                Some(y) => y,
                None => x.matmul(&w.t()?)?,
            });
        }
        Tensor::cat(&parts, 1)
    }

    /// `g` (m, out) · deq(W) -> (m, in), tile by tile.
    fn matmul(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        let (m, _) = g.dims2()?;
        let mut acc = Tensor::zeros((m, self.weight.cols), DType::F32, &Device::Cpu)?;
        for (first, rows) in self.tiles() {
            let w = self.tile(first, rows)?;
            acc = (acc + g.narrow(1, first, rows)?.contiguous()?.matmul(&w)?)?;
        }
        Ok(acc)
    }
}

impl CustomOp1 for Nf4MatMul {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dims) = input_rows(storage, layout, self.weight.cols, self.name())?;
        output(self.matmul_t(&x)?, &dims, self.weight.rows)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let out = self.weight.rows;
        let g = grad_res.reshape(((), out))?.contiguous()?;
        let gx = self.matmul(&g)?;
        Ok(Some(gx.reshape(arg.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn forward_equals_dense_matmul_with_the_dequantized_weight() {
        let (out, inp) = (300, 128); // two tiles, the second partial
        let q = Arc::new(Nf4Matrix::quantize(&random(out * inp, 1), out, inp, true));
        let dense = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
        let op = Nf4MatMul { weight: q };
        for m in [1usize, 5, 40] {
            let x =
                Tensor::from_vec(random(m * inp, 2 + m as u64), (m, inp), &Device::Cpu).unwrap();
            let want = x
                .matmul(&dense.t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = op.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn backward_gives_x_the_gradient_of_the_dense_layer() {
        let (out, inp, m) = (260, 64, 3);
        let q = Arc::new(Nf4Matrix::quantize(&random(out * inp, 5), out, inp, false));
        let dense = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
        let op = Nf4MatMul { weight: q };
        let x =
            candle_core::Var::from_vec(random(2 * m * inp, 6), (2, m, inp), &Device::Cpu).unwrap();
        let c = Tensor::from_vec(random(2 * m * out, 7), (2, m, out), &Device::Cpu).unwrap();
        let loss = (op.forward(x.as_tensor()).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let got = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // d/dx sum(c * x Wᵀ) = c W
        let want = c.reshape((2 * m, out)).unwrap().matmul(&dense).unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
