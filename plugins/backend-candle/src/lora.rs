//! LoRA adapters (Hu et al. 2021) on a linear layer: `y += (alpha / r) · dropout(x) · Aᵀ · Bᵀ`.
//!
//! A starts Kaiming-uniform (as PEFT does: bound 1/sqrt(in)) and B at zero, so a fresh adapter
//! changes nothing; dropout applies to the adapter's input only, and only while training. A and
//! B are candle `Var`s, the only parameters that train.

use candle_core::{DType, Device, Tensor, Var};

/// One adapter: A (r, in), B (out, r).
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

impl Lora {
    /// A fresh adapter for a layer `in_dim -> out_dim`; `seed` makes A reproducible.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        r: usize,
        alpha: f64,
        dropout: f32,
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a = seeded_uniform(r * in_dim, bound as f32, seed);
        Ok(Lora {
            a: Var::from_vec(a, (r, in_dim), device)?,
            b: Var::zeros((out_dim, r), DType::F32, device)?,
            scale: alpha / r as f64,
            dropout,
        })
    }

    /// An adapter with given A and B (loaded from a file, or for tests).
    pub fn from_tensors(
        a: Tensor,
        b: Tensor,
        scale: f64,
        dropout: f32,
    ) -> candle_core::Result<Self> {
        Ok(Lora {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale,
            dropout,
        })
    }

    /// The adapter's contribution for `x` (m, in): (m, out). While training, dropout zeroes
    /// inputs with a mask drawn from `seed`, so the same seed repeats the same mask (the
    /// checkpointed backward pass recomputes layers and must see what the forward saw).
    pub fn forward(&self, x: &Tensor, train: bool, seed: u64) -> candle_core::Result<Tensor> {
        let x = if train && self.dropout > 0.0 {
            let mask = dropout_mask(x.elem_count(), self.dropout, seed);
            (x * Tensor::from_vec(mask, x.shape(), x.device())?)?
        } else {
            x.clone()
        };
        let h = x.matmul(&self.a.as_tensor().t()?)?;
        h.matmul(&self.b.as_tensor().t()?)? * self.scale
    }
}

/// The inverted-dropout mask for `n` inputs: each is kept (scaled by 1 / (1 - dropout)) or zeroed,
/// drawn from `seed`, so the same seed gives the same mask. Each 64-bit hash of (seed, i / 4)
/// (SplitMix64's finaliser) gives the draws of four elements, 16 bits each, so the mask is made
/// in parallel, needs no sequence, and costs a quarter of a hash per element.
pub(crate) fn dropout_mask(n: usize, dropout: f32, seed: u64) -> Vec<f32> {
    use rayon::prelude::*;
    let keep = 1.0 - dropout;
    // Kept when a 16-bit draw, as a fraction, falls below `keep`.
    let threshold = (f64::from(keep) * 65536.0) as u64;
    let base = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    const CHUNK: usize = 16 * 1024; // a multiple of 4: chunks start on a hash boundary
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, four) in chunk.chunks_mut(4).enumerate() {
                let i = ((c * CHUNK) / 4 + j) as u64;
                let mut z = base.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                for (h, m) in four.iter_mut().enumerate() {
                    let draw = (z >> (16 * h)) & 0xffff;
                    *m = if draw < threshold { 1.0 / keep } else { 0.0 };
                }
            }
        });
    mask
}

/// Uniform values in [-bound, bound) from a 64-bit LCG: reproducible across platforms and runs.
pub(crate) fn seeded_uniform(n: usize, bound: f32, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (u * 2.0 - 1.0) * bound
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_adapter_changes_nothing_and_a_is_bounded() {
        let l = Lora::new(64, 32, 8, 16.0, 0.1, 1, &Device::Cpu).unwrap();
        let x = Tensor::ones((3, 64), DType::F32, &Device::Cpu).unwrap();
        let y = l.forward(&x, true, 0).unwrap();
        assert_eq!(
            y.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let a =
            l.a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.125));
        assert_eq!(l.scale, 2.0);
    }

    #[test]
    fn dropout_masks_keep_the_right_share_and_repeat_with_their_seed() {
        let m = dropout_mask(100_000, 0.1, 7);
        let kept = m.iter().filter(|&&v| v > 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        assert_eq!(m, dropout_mask(100_000, 0.1, 7));
        assert_ne!(m, dropout_mask(100_000, 0.1, 8));
    }

    #[test]
    fn dropout_only_while_training() {
        let a = Tensor::ones((2, 16), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::ones((4, 2), DType::F32, &Device::Cpu).unwrap();
        let l = Lora::from_tensors(a, b, 1.0, 0.5).unwrap();
        let x = Tensor::ones((100, 16), DType::F32, &Device::Cpu).unwrap();
        let eval = l.forward(&x, false, 0).unwrap().to_vec2::<f32>().unwrap();
        assert!(eval.iter().flatten().all(|&v| v == 32.0));
        let train = l.forward(&x, true, 9).unwrap().to_vec2::<f32>().unwrap();
        assert!(train.iter().flatten().any(|&v| v != 32.0));
        let again = l.forward(&x, true, 9).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(train, again, "the same seed repeats the mask");
    }
}
