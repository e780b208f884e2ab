//! bf16 matrix products for the frozen-weight products of training, on whichever of two kinds
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

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::matmul::View;

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

/// Whether a product with inner size `k` and `n` output columns has the shapes the kernels need.
pub fn fits(k: usize, n: usize) -> bool {
    k > 0 && k.is_multiple_of(32) && n > 0 && n.is_multiple_of(16)
}

/// `dst` (a.m x b.n, row stride `ldd`) = A · B, or += with `accumulate`. Callers check
/// [`available`] and [`fits`] first.
pub fn matmul(dst: &mut [f32], ldd: usize, a: &PackedA, b: &PackedB, accumulate: bool) {
    let kernel = kernel().expect("bf16 product called without a bf16 kernel");
    matmul_on(kernel, dst, ldd, a, b, accumulate);
}

/// [`matmul`] on a given kernel, which the CPU must have.
fn matmul_on(
    kernel: Kernel,
    dst: &mut [f32],
    ldd: usize,
    a: &PackedA,
    b: &PackedB,
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
                        *d += s;
                    }
                } else {
                    dst.copy_from_slice(src);
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
        crate::llama::testing::uniform(n, 1.0, seed)
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
                false,
            );
            check(&got, &want, k);
            // The same product with B given as W's transpose in rows, accumulated onto ones.
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // (k, n)
            let mut acc = vec![1f32; m * n];
            matmul_on(kernel, &mut acc, n, &a, &PackedB::rows(&wt, k, n), true);
            let want1: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
            check(&acc, &want1, k);
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
            crate::matmul::matmul(
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
