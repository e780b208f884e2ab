//! bf16 matrix products for training (frozen weights and adapters) and for evaluation with
//! `compute = "bf16"` ([`Bf16Matrix`]), on whichever of two kinds
//! of hardware the CPU has: AMX tiles ([`amx`], Intel Xeon since Sapphire Rapids) or AVX512-BF16
//! dot products ([`avx512`], AMD Zen 4 and later, some Intel Xeons). Either is several times (AMX)
//! or about twice (AVX512-BF16) as fast as f32 gemm on the same cores. [`kernel`] picks one once;
//! where neither is usable (another CPU, another OS, `HARNESS_NO_AMX` and
//! `HARNESS_NO_AVX512BF16` set) callers keep their f32 path.
//!
//! Operands are rounded to bf16 (8 bits of mantissa) and products accumulate in f32: the
//! "bf16 compute dtype" of QLoRA. Both kernels read the same layouts: A is row-major bf16 with
//! its rows padded to a multiple of 32; B is cut into panels of 16 columns in the
//! pair-interleaved ("VNNI") layout, row p of a panel holding (B[2p][j], B[2p+1][j]) for its 16
//! columns j.

mod amx;
mod avx512;
mod rows;

pub use rows::Bf16Matrix;

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::ops::matmul::View;
use crate::ops::nf4::{Nf4Matrix, BLOCK, LEVELS};

/// The bf16 kernel this process uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (the process has been granted the tile state).
    Amx,
    /// AVX512-BF16 dot products.
    Avx512,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX",
            Kernel::Avx512 => "AVX512-BF16",
        }
    }
}

/// The fastest bf16 kernel usable here, if any (checked, and AMX permission asked, once).
pub fn kernel() -> Option<Kernel> {
    static KERNEL: OnceLock<Option<Kernel>> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        if amx::detect() {
            Some(Kernel::Amx)
        } else if avx512::detect() {
            Some(Kernel::Avx512)
        } else {
            None
        }
    })
}

/// Whether bf16 products can run in this process.
pub fn available() -> bool {
    kernel().is_some()
}

/// Round to nearest even, as the hardware converts.
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// A (m x k) in bf16, row-major, rows padded with zeros to a multiple of 32.
pub struct PackedA {
    m: usize,
    k: usize,
    data: Vec<u16>,
}

impl PackedA {
    /// Packs a strided view (a whole matrix or a block of columns of one).
    pub fn new(a: View) -> Self {
        let (m, k) = (a.rows, a.cols);
        let rows = m.div_ceil(32) * 32;
        let mut data = vec![0u16; rows * k];
        data.par_chunks_mut(k.max(1))
            .take(m)
            .enumerate()
            .for_each(|(i, row)| {
                if a.cs == 1 {
                    // Contiguous rows: a plain loop the compiler vectorises.
                    let src = &a.data[i * a.rs..i * a.rs + k];
                    for (v, &x) in row.iter_mut().zip(src) {
                        *v = bf16(x);
                    }
                } else {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = bf16(a.data[i * a.rs + j * a.cs]);
                    }
                }
            });
        PackedA { m, k, data }
    }
}

/// B (k x n) in panels of 16 columns, pair-interleaved.
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<u16>,
}

impl PackedB {
    /// Fills each panel of 16 columns with `fill(panel index, panel)`; k must be even and n a
    /// multiple of 16. Panel value `p * 32 + 2 * c + h` is B[2p + h][16 j + c].
    fn pack(k: usize, n: usize, fill: impl Fn(usize, &mut [u16]) + Sync) -> Self {
        let panel = k * 16; // u16 values per panel: k/2 rows of 16 pairs
        let mut data = vec![0u16; panel * n / 16];
        data.par_chunks_mut(panel)
            .enumerate()
            .for_each(|(j, out)| fill(j, out));
        PackedB { k, n, data }
    }

    /// B = Wᵀ for a row-major W of shape (n, k): the weight of `y = x · Wᵀ`. Column c of a
    /// panel is row 16 j + c of W, read in order, one pair per pair-row.
    pub fn transposed(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack(k, n, |j, out| {
            for c in 0..16 {
                let row = &w[(j * 16 + c) * k..(j * 16 + c + 1) * k];
                for (p, pair) in row.chunks_exact(2).enumerate() {
                    out[p * 32 + 2 * c] = bf16(pair[0]);
                    out[p * 32 + 2 * c + 1] = bf16(pair[1]);
                }
            }
        })
    }

    /// B = W for a row-major W of shape (k, n): the weight of `dx = dy · W`. Pair-row p
    /// interleaves 16 values of W's rows 2p and 2p + 1.
    pub fn rows(w: &[f32], k: usize, n: usize) -> Self {
        Self::pack(k, n, |j, out| {
            for (p, pair_row) in out.chunks_exact_mut(32).enumerate() {
                let r0 = &w[2 * p * n + j * 16..2 * p * n + j * 16 + 16];
                let r1 = &w[(2 * p + 1) * n + j * 16..(2 * p + 1) * n + j * 16 + 16];
                for (c, pair) in pair_row.chunks_exact_mut(2).enumerate() {
                    pair[0] = bf16(r0[c]);
                    pair[1] = bf16(r1[c]);
                }
            }
        })
    }
}

/// The 16 NF4 levels of each quantization block of `q` from `first_block` on (`blocks` of them),
/// scaled by the block's maximum and rounded to bf16: level × maximum in f32, as
/// [`Nf4Matrix::dequantize_rows`] computes it, then rounded, so a panel decoded with these
/// tables holds the very values that dequantizing and packing would give.
fn nf4_levels(q: &Nf4Matrix, first_block: usize, blocks: usize) -> Vec<[u16; 16]> {
    (first_block..first_block + blocks)
        .into_par_iter()
        .map(|b| {
            let max = q.absmax().get(b);
            LEVELS.map(|level| bf16(level * max))
        })
        .collect()
}

/// Rows `first..first + rows` of an NF4 weight that [`PackedB::reads_nf4`]: the level tables of
/// their blocks (see [`nf4_levels`]) and their codes, both indexed from the tile's first value.
fn nf4_tile(q: &Nf4Matrix, first: usize, rows: usize) -> (Vec<[u16; 16]>, &[u8]) {
    let cols = q.cols;
    assert!(
        PackedB::reads_nf4(q) && first + rows <= q.rows,
        "NF4 tile outside the weight, or rows not starting on quantization blocks"
    );
    let levels = nf4_levels(q, first * cols / BLOCK, rows * cols / BLOCK);
    (
        levels,
        &q.packed()[first * cols / 2..(first + rows) * cols / 2],
    )
}

impl PackedB {
    /// Whether [`PackedB::nf4_transposed`] and [`PackedB::nf4_rows`] can read `q`: its rows
    /// start on quantization blocks.
    pub fn reads_nf4(q: &Nf4Matrix) -> bool {
        q.cols.is_multiple_of(BLOCK)
    }

    /// [`PackedB::transposed`] of rows `first..first + n` of an NF4 weight (n, k), decoded from
    /// its codes straight into the panels, with no f32 tile in between. Needs
    /// [`PackedB::reads_nf4`].
    pub fn nf4_transposed(q: &Nf4Matrix, first: usize, n: usize) -> Self {
        let k = q.cols;
        let (levels, codes) = nf4_tile(q, first, n);
        Self::pack(k, n, |j, out| {
            for c in 0..16 {
                let row = j * 16 + c;
                let bytes = &codes[row * k / 2..(row + 1) * k / 2];
                // A byte holds one pair (W[row][2p], W[row][2p + 1]); a block, 32 bytes.
                for (b, block) in bytes.chunks_exact(BLOCK / 2).enumerate() {
                    let table = &levels[row * k / BLOCK + b];
                    for (i, &byte) in block.iter().enumerate() {
                        let p = b * BLOCK / 2 + i;
                        out[p * 32 + 2 * c] = table[usize::from(byte >> 4)];
                        out[p * 32 + 2 * c + 1] = table[usize::from(byte & 0x0f)];
                    }
                }
            }
        })
    }

    /// [`PackedB::rows`] of rows `first..first + k` of an NF4 weight (.., n), decoded from its
    /// codes straight into the panels. Needs [`PackedB::reads_nf4`].
    pub fn nf4_rows(q: &Nf4Matrix, first: usize, k: usize) -> Self {
        let n = q.cols;
        let (levels, codes) = nf4_tile(q, first, k);
        Self::pack(k, n, |j, out| {
            for (p, pair_row) in out.chunks_exact_mut(32).enumerate() {
                for h in 0..2 {
                    // 16 values of row 2p + h from column 16 j: 8 bytes inside one block.
                    let start = (2 * p + h) * n + j * 16;
                    let table = &levels[start / BLOCK];
                    for (t, &byte) in codes[start / 2..start / 2 + 8].iter().enumerate() {
                        pair_row[4 * t + h] = table[usize::from(byte >> 4)];
                        pair_row[4 * t + 2 + h] = table[usize::from(byte & 0x0f)];
                    }
                }
            }
        })
    }
}

impl PackedB {
    /// B from a view that is either row-major (k x n) or the transpose of a row-major (n x k)
    /// matrix; `None` for other strides.
    fn from_view(b: View) -> Option<Self> {
        let (k, n) = (b.rows, b.cols);
        if b.cs == 1 && b.rs == n {
            Some(Self::rows(&b.data[..k * n], k, n))
        } else if b.rs == 1 && b.cs == k {
            Some(Self::transposed(&b.data[..n * k], n, k))
        } else {
            None
        }
    }
}

/// `dst` (lhs.rows x rhs.cols, row stride `ldd`) = `scale` · lhs · rhs, or += with
/// `accumulate`: in bf16 where the CPU has a kernel and the shapes fit it, else in f32 gemm.
/// The adapter's products go through here (the frozen ones pack their weights themselves).
pub fn product(dst: &mut [f32], ldd: usize, lhs: View, rhs: View, scale: f32, accumulate: bool) {
    let packed = (available() && fits(lhs.cols, rhs.cols))
        .then(|| PackedB::from_view(rhs))
        .flatten();
    let Some(b) = packed else {
        return crate::ops::matmul::matmul(dst, ldd, lhs, rhs, scale, accumulate);
    };
    let kernel = kernel().expect("available() was checked");
    matmul_on(kernel, dst, ldd, &PackedA::new(lhs), &b, scale, accumulate);
}

/// Whether a product with inner size `k` and `n` output columns has the shapes the kernels need.
pub fn fits(k: usize, n: usize) -> bool {
    k > 0 && k.is_multiple_of(32) && n > 0 && n.is_multiple_of(16)
}

/// `dst` (a.m x b.n, row stride `ldd`) = A · B, or += with `accumulate`. Callers check
/// [`available`] and [`fits`] first.
pub fn matmul(dst: &mut [f32], ldd: usize, a: &PackedA, b: &PackedB, accumulate: bool) {
    let kernel = kernel().expect("bf16 product called without a bf16 kernel");
    matmul_on(kernel, dst, ldd, a, b, 1.0, accumulate);
}

/// `dst` = `scale` · A · B (or += with `accumulate`) on a given kernel, which the CPU must
/// have. The scale is applied as the kernel's sums are written out: one f32 product per
/// output, so a scale of 1 changes no bit.
fn matmul_on(
    kernel: Kernel,
    dst: &mut [f32],
    ldd: usize,
    a: &PackedA,
    b: &PackedB,
    scale: f32,
    accumulate: bool,
) {
    assert!(
        a.k == b.k && fits(b.k, b.n),
        "bf16 product: shapes do not fit the kernel's blocks"
    );
    assert!(ldd >= b.n && (a.m == 0 || (a.m - 1) * ldd + b.n <= dst.len()));
    let (k, n) = (b.k, b.n);
    // One task per 32 rows of the output: disjoint rows of dst.
    let tasks: Vec<(usize, &mut [f32])> = dst
        .chunks_mut(32 * ldd)
        .take(a.m.div_ceil(32))
        .enumerate()
        .collect();
    tasks.into_par_iter().for_each(|(blk, out)| {
        let mut scratch = [0f32; 32 * 32];
        let a_rows = &a.data[blk * 32 * k..(blk + 1) * 32 * k];
        let valid = (a.m - blk * 32).min(32);
        if kernel == Kernel::Amx {
            // SAFETY: the permission was granted (`kernel`) and the configuration is valid.
            unsafe { amx::load_config() };
        }
        for j0 in (0..n / 16).step_by(2) {
            let pair = j0 + 1 < n / 16;
            let p0 = &b.data[j0 * k * 16..(j0 + 1) * k * 16];
            let p1 = if pair {
                &b.data[(j0 + 1) * k * 16..(j0 + 2) * k * 16]
            } else {
                p0
            };
            // SAFETY: the kernel's instructions are available (`kernel`); a_rows holds 32 rows
            // of k values and each panel k/2 rows of 32, so every load stays inside them.
            match kernel {
                Kernel::Amx => unsafe { amx::block(a_rows, p0, p1, k, &mut scratch) },
                Kernel::Avx512 => unsafe { avx512::block(a_rows, p0, p1, k, &mut scratch) },
            }
            let cols = if pair { 32 } else { 16 };
            for (r, row) in out.chunks_mut(ldd).take(valid).enumerate() {
                let src = &scratch[r * 32..r * 32 + cols];
                let dst = &mut row[j0 * 16..j0 * 16 + cols];
                if accumulate {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += scale * s;
                    }
                } else {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = scale * s;
                    }
                }
            }
        }
        if kernel == Kernel::Amx {
            // SAFETY: releases this thread's tile state.
            unsafe { amx::release() };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::model::llama::testing::uniform(n, 1.0, seed)
    }

    /// Relative error of `got` against `want`, scaled by the size of the dot products.
    fn check(got: &[f32], want: &[f32], k: usize) {
        let tol = 2.0 * (k as f32).sqrt() / 256.0; // bf16 keeps 8 bits of each operand
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < tol, "{g} vs {w} (tolerance {tol})");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        assert_eq!(
            f32::from_bits(u32::from(bf16(1.0 + 1.0 / 256.0)) << 16),
            1.0
        );
        assert_eq!(f32::from_bits(u32::from(bf16(-3.0)) << 16), -3.0);
    }

    #[test]
    fn products_match_f32_within_bf16_rounding() {
        // Every kernel this CPU has, not only the one `kernel` picks.
        let kernels: Vec<Kernel> = [
            (Kernel::Amx, amx::detect()),
            (Kernel::Avx512, avx512::detect()),
        ]
        .into_iter()
        .filter_map(|(k, ok)| ok.then_some(k))
        .collect();
        if kernels.is_empty() {
            eprintln!("no bf16 kernel on this machine: skipped");
        }
        // m not a multiple of 32, an odd number of 16-column panels, accumulation.
        for (kernel, (m, k, n)) in kernels
            .iter()
            .flat_map(|&kn| [(37, 64, 48), (5, 32, 16), (64, 96, 32)].map(|s| (kn, s)))
        {
            eprintln!("{} {m}x{k}x{n}", kernel.name());
            let x = values(m * k, 1);
            let w = values(n * k, 2); // (n, k)
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                }
            }
            let a = PackedA::new(View::rows(&x, m, k));
            let mut got = vec![f32::NAN; m * n];
            matmul_on(
                kernel,
                &mut got,
                n,
                &a,
                &PackedB::transposed(&w, n, k),
                1.0,
                false,
            );
            check(&got, &want, k);
            // The same product with B given as W's transpose in rows, accumulated onto ones.
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // (k, n)
            let mut acc = vec![1f32; m * n];
            matmul_on(
                kernel,
                &mut acc,
                n,
                &a,
                &PackedB::rows(&wt, k, n),
                1.0,
                true,
            );
            let want1: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
            check(&acc, &want1, k);
        }
    }

    #[test]
    fn nf4_panels_hold_the_values_of_dequantized_packing() {
        let (rows, cols) = (96, 192);
        for double_quant in [false, true] {
            let q = Nf4Matrix::quantize(&values(rows * cols, 5), rows, cols, double_quant);
            assert!(PackedB::reads_nf4(&q));
            for (first, n) in [(0, 96), (16, 48), (32, 32)] {
                let mut tile = vec![0f32; n * cols];
                q.dequantize_rows(first, &mut tile);
                let direct = PackedB::nf4_transposed(&q, first, n);
                assert_eq!(direct.data, PackedB::transposed(&tile, n, cols).data);
                let direct = PackedB::nf4_rows(&q, first, n);
                assert_eq!(direct.data, PackedB::rows(&tile, n, cols).data);
            }
        }
    }

    #[test]
    fn products_of_views_match_f32_with_scale_and_accumulation() {
        let (m, k, n) = (40, 64, 32);
        let x = values(m * k, 6);
        let w = values(n * k, 7); // (n, k)
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // (k, n)
        let mut want = vec![0f32; m * n];
        crate::ops::matmul::matmul(
            &mut want,
            n,
            View::rows(&x, m, k),
            View::rows(&wt, k, n),
            0.5,
            false,
        );
        // The left operand also as the transpose of a (k, m) matrix: strided packing.
        let xt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect(); // (k, m)
        for lhs in [View::rows(&x, m, k), View::rows(&xt, k, m).t()] {
            for rhs in [View::rows(&wt, k, n), View::rows(&w, n, k).t()] {
                let mut got = vec![1f32; m * n];
                product(&mut got, n, lhs, rhs, 0.5, true);
                let want1: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
                check(&got, &want1, k);
                product(&mut got, n, lhs, rhs, 0.5, false);
                check(&got, &want, k);
            }
        }
    }

    /// Speed of the frozen products of one SmolLM2 MLP projection (512 rows, 576 -> 1536):
    /// `cargo test --release --lib bf16_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bf16_speed() {
        let (m, k, n) = (512, 576, 1536);
        let x = values(m * k, 3);
        let w = values(n * k, 4);
        let flops = 2.0 * (m * k * n) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        };
        let mut y = vec![0f32; m * n];
        let f32_s = time(&mut || {
            crate::ops::matmul::matmul(
                &mut y,
                n,
                View::rows(&x, m, k),
                View::rows(&w, n, k).t(),
                1.0,
                false,
            )
        });
        println!("f32 gemm: {:.1} GFLOP/s", flops / f32_s / 1e9);
        let Some(kernel) = kernel() else {
            println!("no bf16 kernel on this machine");
            return;
        };
        let bf16_s = time(&mut || {
            let a = PackedA::new(View::rows(&x, m, k));
            let b = PackedB::transposed(&w, n, k);
            matmul(&mut y, n, &a, &b, false)
        });
        let b = PackedB::transposed(&w, n, k);
        let a = PackedA::new(View::rows(&x, m, k));
        let kernel_s = time(&mut || matmul(&mut y, n, &a, &b, false));
        println!(
            "{} bf16: {:.1} GFLOP/s with packing, {:.1} GFLOP/s kernel only",
            kernel.name(),
            flops / bf16_s / 1e9,
            flops / kernel_s / 1e9
        );
    }
}
