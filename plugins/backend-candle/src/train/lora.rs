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
/// drawn from `seed`, so the same seed gives the same mask. See [`apply_dropout`].
pub(crate) fn dropout_mask(n: usize, dropout: f32, seed: u64) -> Vec<f32> {
    let mut mask = vec![0f32; n];
    apply_dropout(&mut mask, &vec![1f32; n], dropout, seed, false);
    mask
}

/// `dst = mask ⊙ src`, or `dst += mask ⊙ src` with `accumulate`, for the mask of
/// [`dropout_mask`], drawn while it is applied instead of stored: the fused LoRA op applies it
/// to the adapter's input in the forward pass and to the input's gradient in the backward pass.
///
/// Each 64-bit hash of (seed, i / 4) (SplitMix64's finaliser) gives the draws of four elements,
/// 16 bits each, so the mask is made in parallel, needs no sequence, and costs a quarter of a
/// hash per element.
pub(crate) fn apply_dropout(
    dst: &mut [f32],
    src: &[f32],
    dropout: f32,
    seed: u64,
    accumulate: bool,
) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), src.len(), "dropout: sizes differ");
    let keep = 1.0 - dropout;
    let mask = Mask {
        // Kept when a 16-bit draw, as a fraction, falls below `keep`.
        threshold: (f64::from(keep) * 65536.0) as u64,
        kept: 1.0 / keep,
        base: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03,
    };
    let apply = mask_fn();
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (dst, src))| apply(&mask, (c * CHUNK / 4) as u64, dst, src, accumulate));
}

/// Elements per parallel task: a multiple of 4, so each task starts on a hash boundary.
const CHUNK: usize = 16 * 1024;
/// Hashes per step of the inner loop: 64 elements, four 512-bit vectors.
const LANES: usize = 16;

/// The draws of one mask.
struct Mask {
    threshold: u64,
    kept: f32,
    base: u64,
}

impl Mask {
    /// The 64 draws of hash `i` (SplitMix64's finaliser of (seed, i)).
    #[inline(always)]
    fn hash(&self, i: u64) -> u64 {
        let mut z = self
            .base
            .wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The factor (kept or 0) of element `h` (0..4) of a hash; branch-free, since a branch
    /// would mispredict on every dropped element.
    #[inline(always)]
    fn factor(&self, z: u64, h: usize) -> f32 {
        let keep = ((z >> (16 * h)) & 0xffff < self.threshold) as u32;
        f32::from_bits(self.kept.to_bits() & keep.wrapping_neg())
    }

    /// Applies the mask to one task's elements, whose first hash is `first`; written in
    /// fixed-size steps so that the compiler vectorises the hashes.
    #[inline(always)]
    fn apply(&self, first: u64, dst: &mut [f32], src: &[f32], accumulate: bool) {
        let (dst_steps, dst_tail) = dst.as_chunks_mut::<{ 4 * LANES }>();
        let (src_steps, src_tail) = src.as_chunks::<{ 4 * LANES }>();
        for (step, (d, s)) in dst_steps.iter_mut().zip(src_steps).enumerate() {
            let i0 = first + (step * LANES) as u64;
            let z: [u64; LANES] = std::array::from_fn(|l| self.hash(i0 + l as u64));
            let f: [f32; 4 * LANES] = std::array::from_fn(|e| self.factor(z[e / 4], e % 4));
            for e in 0..4 * LANES {
                let v = s[e] * f[e];
                d[e] = if accumulate { d[e] + v } else { v };
            }
        }
        let i0 = first + (dst_steps.len() * LANES) as u64;
        for (e, (d, s)) in dst_tail.iter_mut().zip(src_tail).enumerate() {
            let v = s * self.factor(self.hash(i0 + (e / 4) as u64), e % 4);
            *d = if accumulate { *d + v } else { v };
        }
    }
}

type ApplyFn = fn(&Mask, u64, &mut [f32], &[f32], bool);

/// [`Mask::apply`] compiled for the widest vectors this CPU has (chosen once): the same
/// integer draws and f32 products on every path, so the same mask everywhere.
fn mask_fn() -> ApplyFn {
    #[cfg(target_arch = "x86_64")]
    {
        static CHOICE: std::sync::OnceLock<ApplyFn> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512dq")
            {
                |m, first, dst, src, acc| {
                    // SAFETY: the CPU has AVX-512 F and DQ (checked above).
                    unsafe { apply_avx512(m, first, dst, src, acc) }
                }
            } else {
                Mask::apply
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Mask::apply
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn apply_avx512(mask: &Mask, first: u64, dst: &mut [f32], src: &[f32], acc: bool) {
    mask.apply(first, dst, src, acc)
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
    fn every_path_draws_the_same_mask() {
        // A length that leaves a ragged tail after the 64-element steps and the 4-element hashes.
        let n = 3 * 16 * 1024 + 64 * 5 + 7;
        let src: Vec<f32> = (0..n).map(|i| i as f32 - 1000.5).collect();
        let mask = dropout_mask(n, 0.1, 5);
        // The dropped elements among the first 256, from an independent (Python) reading of the
        // definition: SplitMix64 of (seed, i / 4), draw i % 4 of 16 bits, dropped at >= 58982.
        let dropped: Vec<usize> = (0..256).filter(|&i| mask[i] == 0.0).collect();
        assert_eq!(
            dropped,
            [
                3, 10, 34, 36, 47, 51, 58, 63, 74, 85, 95, 129, 139, 144, 155, 165, 169, 173, 185,
                186, 188, 192, 208, 223, 236, 243, 248
            ]
        );
        let want: Vec<f32> = src.iter().zip(&mask).map(|(s, m)| s * m).collect();
        let mut got = vec![0f32; n];
        apply_dropout(&mut got, &src, 0.1, 5, false);
        assert_eq!(got, want);
        // Element by element, as a scalar reading of the definition would draw it.
        let m = Mask {
            threshold: (0.9f64 * 65536.0) as u64,
            kept: 1.0 / 0.9,
            base: 5u64.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03,
        };
        for (i, v) in mask.iter().enumerate() {
            assert_eq!(*v, m.factor(m.hash((i / 4) as u64), i % 4), "element {i}");
        }
        let mut portable = vec![0f32; n];
        for (c, (d, s)) in portable
            .chunks_mut(CHUNK)
            .zip(src.chunks(CHUNK))
            .enumerate()
        {
            m.apply((c * CHUNK / 4) as u64, d, s, false);
        }
        assert_eq!(portable, want);
        let mut acc = vec![1f32; n];
        apply_dropout(&mut acc, &src, 0.1, 5, true);
        assert!(acc.iter().zip(&want).all(|(a, w)| *a == 1.0 + w));
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
