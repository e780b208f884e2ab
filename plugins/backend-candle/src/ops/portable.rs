//! The device-portable path: NF4 weights held as candle tensors and dequantized with tensor ops,
//! and the training-time functions (RMSNorm, SwiGLU, cross-entropy) composed of candle ops, so
//! that they run wherever candle runs: CUDA with the `cuda` feature.
//!
//! The CPU takes the fused ops of [`crate::ops::fused`] instead, which dequantize one tile at a time,
//! compute less and keep less for the backward pass. This path dequantizes one whole projection
//! per product (as bitsandbytes does on a GPU). Its products are candle matmuls, whose backward
//! pass also computes a gradient for the frozen weight (thrown away) and whose graph keeps the
//! dequantized weight until then; training on this path therefore always recomputes one layer
//! at a time (activation checkpointing), so that one layer's weights are in full precision at
//! once, not the model's. A frozen-product op with a CUDA forward of its own would save the
//! wasted gradient. On the CPU this path is the cross-check of the fused one: tests run the tiny
//! model both ways and compare.

use candle_core::{DType, Device, Tensor, D};

use crate::ops::nf4::{Absmax, Nf4Matrix, BLOCK, DQ_BLOCK, LEVELS};

type R<T> = candle_core::Result<T>;

/// An NF4 matrix as tensors on a device: the packed codes stay 4 bits per value there.
pub struct Nf4Tensors {
    rows: usize,
    cols: usize,
    /// Two level indices per byte (high nibble first), zero-padded to whole blocks: (blocks × 32,) u8.
    codes: Tensor,
    /// The two levels each byte value stands for: (256, 2) f32.
    pairs: Tensor,
    absmax: DeviceAbsmax,
}

/// The block maxima on the device, as [`Absmax`] holds them.
enum DeviceAbsmax {
    /// (blocks, 1) f32.
    F32(Tensor),
    /// Codes offset by 128 to fit u8, zero-padded to whole groups: (groups × 256,) u8; the
    /// scale of each group (groups, 1) f32, and the mean that was taken out.
    Double {
        codes: Tensor,
        scales: Tensor,
        mean: f64,
    },
}

impl Nf4Tensors {
    /// Copies `q` to `device`, still packed.
    pub fn new(q: &Nf4Matrix, device: &Device) -> R<Self> {
        let n = q.rows * q.cols;
        let blocks = n.div_ceil(BLOCK);
        let mut codes = q.packed().to_vec();
        codes.resize(blocks * BLOCK / 2, 0);
        let pairs: Vec<f32> = (0..256)
            .flat_map(|b| [LEVELS[b >> 4], LEVELS[b & 0x0f]])
            .collect();
        let absmax = match q.absmax() {
            Absmax::F32(v) => DeviceAbsmax::F32(Tensor::from_slice(v, (blocks, 1), device)?),
            Absmax::Double {
                codes,
                scales,
                mean,
            } => {
                let groups = scales.len();
                let mut shifted: Vec<u8> =
                    codes.iter().map(|&c| (i16::from(c) + 128) as u8).collect();
                shifted.resize(groups * DQ_BLOCK, 128);
                DeviceAbsmax::Double {
                    codes: Tensor::from_vec(shifted, groups * DQ_BLOCK, device)?,
                    scales: Tensor::from_slice(scales, (groups, 1), device)?,
                    mean: f64::from(*mean),
                }
            }
        };
        Ok(Nf4Tensors {
            rows: q.rows,
            cols: q.cols,
            codes: Tensor::from_vec(codes, blocks * BLOCK / 2, device)?,
            pairs: Tensor::from_vec(pairs, (256, 2), device)?,
            absmax,
        })
    }

    /// (rows, cols).
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The block maxima, (blocks, 1) f32, computed as `Nf4Matrix` computes them.
    fn block_maxima(&self) -> R<Tensor> {
        match &self.absmax {
            DeviceAbsmax::F32(t) => Ok(t.clone()),
            DeviceAbsmax::Double {
                codes,
                scales,
                mean,
            } => {
                let blocks = self.codes.dim(0)? * 2 / BLOCK;
                let groups = scales.dim(0)?;
                let centred = (codes.to_dtype(DType::F32)? - 128.0)?;
                let absmax = (centred.reshape((groups, DQ_BLOCK))?.broadcast_mul(scales)? + *mean)?;
                absmax
                    .flatten_all()?
                    .narrow(0, 0, blocks)?
                    .reshape((blocks, 1))
            }
        }
    }

    /// The matrix in f32, (rows, cols): each byte looks up its two levels, each block of 64 is
    /// scaled by its maximum. Equal, value for value, to [`Nf4Matrix::dequantize`].
    pub fn dequantize(&self) -> R<Tensor> {
        let blocks = self.codes.dim(0)? * 2 / BLOCK;
        // u32 ids: candle's index_select reads an id equal to its type's maximum (the byte
        // 0xFF, two top levels) as padding and yields zeros.
        let levels = self
            .pairs
            .index_select(&self.codes.to_dtype(DType::U32)?, 0)?;
        let values = levels
            .reshape((blocks, BLOCK))?
            .broadcast_mul(&self.block_maxima()?)?;
        values
            .flatten_all()?
            .narrow(0, 0, self.rows * self.cols)?
            .reshape((self.rows, self.cols))
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) · weight` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> R<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// SwiGLU's gating: `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> R<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

/// Mean cross-entropy of `logits` (N, vocab) against `targets` (N token ids).
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> R<Tensor> {
    let targets = Tensor::new(targets, logits.device())?;
    candle_nn::loss::cross_entropy(logits, &targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        crate::train::lora::seeded_uniform(n, 1.0, seed)
    }

    /// `q` dequantized on `device` by tensor ops, checked value for value against the CPU's.
    fn assert_dequantizes_as_the_cpu(q: &Nf4Matrix, device: &Device, what: &str) {
        let t = Nf4Tensors::new(q, device).unwrap();
        assert_eq!(t.dims(), (q.rows, q.cols));
        let got = t
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = q.dequantize();
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(
            first.map(|i| (i, got[i], want[i])),
            None,
            "{what}: first difference"
        );
    }

    #[test]
    fn device_dequantization_equals_the_packed_matrix_value_for_value() {
        // 40 x 96 = 60 blocks: not a whole group of 256 maxima, and a ragged tail is covered by
        // 30 x 33 (990 values, not a whole block).
        for (rows, cols) in [(40, 96), (30, 33), (300, 64)] {
            for double_quant in [false, true] {
                let q = Nf4Matrix::quantize(&random(rows * cols, 7), rows, cols, double_quant);
                let what = format!("{rows}x{cols} double_quant={double_quant}");
                assert_dequantizes_as_the_cpu(&q, &Device::Cpu, &what);
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn dequantization_on_cuda_equals_the_cpu_value_for_value() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let q = Nf4Matrix::quantize(&random(300 * 64, 7), 300, 64, true);
        assert_dequantizes_as_the_cpu(&q, &gpu, "CUDA");
    }

    #[test]
    fn composed_rms_norm_matches_candle_nn() {
        let x = Tensor::from_vec(random(6 * 16, 3), (2, 3, 16), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(random(16, 4), 16, &Device::Cpu).unwrap();
        let ours = rms_norm(&x, &w, 1e-5).unwrap();
        let theirs = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        let diff = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
