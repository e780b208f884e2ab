//! A frozen weight held in bf16 for evaluation with `compute = "bf16"`: every product with it
//! rounds both operands to bf16 and sums in f32, QLoRA's bf16 compute dtype and what
//! lm-evaluation-harness runs with `dtype=bfloat16` for the projections. Prompt products run on
//! the CPU's bf16 kernel ([`super::kernel`]) where it has one; elsewhere, and for decoding's few
//! rows (memory-bound, where the f32 dot products over the weight's 2-byte values are as fast),
//! the rounded operands go through the f32 kernels: the products of two bf16 values are exact in
//! f32, so those paths compute bf16's numbers too and differ from the kernel's only in the order
//! of the f32 sums.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::{bf16, fits, kernel, matmul as bf16_matmul, PackedA, PackedB};
use crate::ops::kernels::{skinny_matmul, DotsFn, WeightRows, SKINNY_MAX_ROWS};
use crate::ops::matmul::{matmul_t_expanded, View};

/// The f32 value of a bf16 (its top 16 bits).
fn widen(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

/// `x` rounded to bf16's values, as f32.
fn rounded(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = widen(bf16(v));
            }
        });
    out
}

/// A weight (rows, cols) in bf16, row-major.
pub struct Bf16Matrix {
    pub rows: usize,
    pub cols: usize,
    data: Vec<u16>,
    /// The bf16 kernel's panels of the weight, packed at the first prompt product (only where
    /// the CPU has a kernel and the shape fits it): a second copy, kept because packing for
    /// every product would cost a tenth or more of it.
    panels: OnceLock<PackedB>,
}

impl Bf16Matrix {
    /// A (rows, cols) matrix of zeros, for [`Bf16Matrix::set_rows`] to fill.
    pub fn new(rows: usize, cols: usize) -> Self {
        Bf16Matrix {
            rows,
            cols,
            data: vec![0; rows * cols],
            panels: OnceLock::new(),
        }
    }

    /// Rounds rows `first..first + values.len() / cols` from f32 values.
    pub fn set_rows(&mut self, first: usize, values: &[f32]) {
        let start = first * self.cols;
        let dst = &mut self.data[start..start + values.len()];
        dst.par_chunks_mut(1 << 14)
            .zip(values.par_chunks(1 << 14))
            .for_each(|(d, v)| {
                for (d, &v) in d.iter_mut().zip(v) {
                    *d = bf16(v);
                }
            });
    }

    /// Row `j` in f32.
    fn expand_row(&self, j: usize, out: &mut [f32]) {
        let row = &self.data[j * self.cols..(j + 1) * self.cols];
        for (o, &v) in out.iter_mut().zip(row) {
            *o = widen(v);
        }
    }

    /// `x` (m, cols) · Wᵀ: (m, rows), with both operands rounded to bf16 and f32 sums.
    pub fn product_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k, "bf16 product: the input is not (m, {k})");
        if m <= SKINNY_MAX_ROWS {
            // Decoding: the f32 dot products over rows widened as they are read.
            let out_t = skinny_matmul(&rounded(x), m, k, self, n);
            let mut y = vec![0f32; m * n];
            for (j, col) in out_t.chunks_exact(m).enumerate() {
                for (i, &v) in col.iter().enumerate() {
                    y[i * n + j] = v;
                }
            }
            return y;
        }
        if kernel().is_some() && fits(k, n) {
            let b = self
                .panels
                .get_or_init(|| PackedB::bf16_transposed(&self.data, n, k));
            let mut y = vec![0f32; m * n];
            bf16_matmul(&mut y, n, &PackedA::new(View::rows(x, m, k)), b, false);
            return y;
        }
        // No bf16 unit: the rounded operands through the f32 gemm, the weight widened into the
        // thread's buffer.
        matmul_t_expanded(&rounded(x), m, (n, k), |w| {
            w.par_chunks_mut(k)
                .enumerate()
                .for_each(|(j, row)| self.expand_row(j, row));
        })
    }
}

impl WeightRows for Bf16Matrix {
    fn row<'a>(&'a self, j: usize, k: usize, buf: &'a mut [f32]) -> &'a [f32] {
        self.expand_row(j, &mut buf[..k]);
        &buf[..k]
    }

    fn dots(&self, j: usize, x: &[f32], k: usize, buf: &mut [f32], out: &mut [f32], dots: DotsFn) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                let row = &self.data[j * self.cols..(j + 1) * self.cols];
                // SAFETY: the CPU has AVX2 and FMA (checked); the kernel asserts that the row,
                // `x` and `out` fit.
                unsafe { crate::ops::kernels::bf16_dots_avx2(row, x, k, out) };
                return;
            }
        }
        dots(x, k, self.row(j, k, buf), out);
    }
}

impl PackedB {
    /// [`PackedB::transposed`] of a row-major bf16 weight (n, k): the same panels, from values
    /// already rounded.
    pub fn bf16_transposed(w: &[u16], n: usize, k: usize) -> Self {
        Self::pack(k, n, |j, out| {
            for c in 0..16 {
                let row = &w[(j * 16 + c) * k..(j * 16 + c + 1) * k];
                for (p, pair) in row.chunks_exact(2).enumerate() {
                    out[p * 32 + 2 * c] = pair[0];
                    out[p * 32 + 2 * c + 1] = pair[1];
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::model::llama::testing::uniform(n, 1.0, seed)
    }

    fn matrix(w: &[f32], n: usize, k: usize) -> Bf16Matrix {
        let mut b = Bf16Matrix::new(n, k);
        // In two calls, as a weight decoded tile by tile is.
        b.set_rows(0, &w[..n / 2 * k]);
        b.set_rows(n / 2, &w[n / 2 * k..]);
        b
    }

    /// bf16's product computed in f64: both operands rounded, the sums exact.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let r = |v: f32| f64::from(widen(bf16(v)));
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k).map(|p| r(x[i * k + p]) * r(w[j * k + p])).sum();
                y[i * n + j] = sum as f32;
            }
        }
        y
    }

    #[test]
    fn products_are_bf16_operands_summed_in_f32() {
        // Decoding rows, prompt rows (the kernel where this CPU has one, else the f32 gemm),
        // a shape the kernel cannot take (n not a multiple of 16).
        for (m, n, k) in [
            (1, 48, 64),
            (7, 48, 64),
            (40, 48, 64),
            (40, 40, 96),
            (33, 64, 576),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let got = matrix(&w, n, k).product_t(&x, m);
            let want = reference(&x, &w, m, n, k);
            // Only the f32 sums' rounding, far below bf16's (about 2⁻⁹ of each operand): a
            // product of unrounded operands misses by more.
            let tol = 4.0 * k as f32 * f32::EPSILON;
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= tol, "{m}x{n}x{k}: {g} vs {w}");
            }
            let exact: Vec<f32> = (0..m * n)
                .map(|c| {
                    let (i, j) = (c / n, c % n);
                    (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum()
                })
                .collect();
            let off = exact
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(off > tol, "the check would not see unrounded operands");
        }
    }

    #[test]
    fn the_kernels_panels_are_the_rounded_weights() {
        let (n, k) = (48, 64);
        let w = values(n * k, 3);
        let b = matrix(&w, n, k);
        assert_eq!(
            PackedB::bf16_transposed(&b.data, n, k).data,
            PackedB::transposed(&w, n, k).data
        );
    }

    #[test]
    fn decoding_rows_do_not_depend_on_the_batch() {
        let (n, k) = (64, 96);
        let x = values(8 * k, 4);
        let b = matrix(&values(n * k, 5), n, k);
        let batch = b.product_t(&x, 8);
        for i in 0..8 {
            assert_eq!(
                b.product_t(&x[i * k..(i + 1) * k], 1),
                batch[i * n..(i + 1) * n]
            );
        }
    }
}
