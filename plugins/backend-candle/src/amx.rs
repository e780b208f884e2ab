//! bf16 matrix products on Intel AMX tiles, for the frozen-weight products of training.
//!
//! AMX multiplies 16 x 32 bf16 tiles into 16 x 16 f32 accumulators (TDPBF16PS), several times
//! faster than f32 gemm on the same cores. Linux gives the tile state only to processes that
//! ask for it (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without that request the
//! first tile instruction faults. [`available`] checks CPUID and makes the request once; where
//! either fails (another CPU, another OS, `HARNESS_NO_AMX` set) callers keep their f32 path.
//!
//! Operands are rounded to bf16 (8 bits of mantissa) and products accumulate in f32: the
//! "bf16 compute dtype" of QLoRA. Layouts: A is row-major bf16 with its rows padded to a
//! multiple of 32; B is cut into panels of 16 columns in the pair-interleaved ("VNNI") layout
//! the instruction reads, row p of a panel holding (B[2p][j], B[2p+1][j]) for its 16 columns j.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::matmul::View;

/// Whether AMX bf16 products can run in this process (checked, and permission asked, once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    if std::env::var_os("HARNESS_NO_AMX").is_some() {
        return false;
    }
    #[allow(unused_unsafe)] // cpuid is a safe intrinsic in newer compilers
    // SAFETY: CPUID is available on every x86-64 CPU.
    let (max_leaf, leaf7) = unsafe {
        (
            std::arch::x86_64::__cpuid(0).eax,
            std::arch::x86_64::__cpuid_count(7, 0),
        )
    };
    if max_leaf < 7 {
        return false;
    }
    let tile = leaf7.edx & (1 << 24) != 0;
    let bf16 = leaf7.edx & (1 << 22) != 0;
    if !(tile && bf16) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it fails cleanly where unsupported.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
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
                for (j, v) in row.iter_mut().enumerate() {
                    *v = bf16(a.data[i * a.rs + j * a.cs]);
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
    /// Packs `b(p, j)` for p < k, j < n; k must be even and n a multiple of 16.
    fn pack(k: usize, n: usize, b: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let panel = k * 16; // u16 values per panel: k/2 rows of 16 pairs
        let mut data = vec![0u16; panel * n / 16];
        data.par_chunks_mut(panel).enumerate().for_each(|(j, out)| {
            for p in 0..k / 2 {
                for c in 0..16 {
                    out[p * 32 + 2 * c] = bf16(b(2 * p, j * 16 + c));
                    out[p * 32 + 2 * c + 1] = bf16(b(2 * p + 1, j * 16 + c));
                }
            }
        });
        PackedB { k, n, data }
    }

    /// B = Wᵀ for a row-major W of shape (n, k): the weight of `y = x · Wᵀ`.
    pub fn transposed(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack(k, n, |p, j| w[j * k + p])
    }

    /// B = W for a row-major W of shape (k, n): the weight of `dx = dy · W`.
    pub fn rows(w: &[f32], k: usize, n: usize) -> Self {
        Self::pack(k, n, |p, j| w[p * n + j])
    }
}

/// Whether a product with inner size `k` and `n` output columns has the shapes AMX tiles need.
pub fn fits(k: usize, n: usize) -> bool {
    k > 0 && k.is_multiple_of(32) && n > 0 && n.is_multiple_of(16)
}

/// The tile configuration: palette 1; tiles 0-3 are 16 x 16 f32 accumulators, 4-5 hold A
/// (16 rows x 32 bf16), 6-7 hold B (16 pair-rows x 16 pairs). All rows are 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// `dst` (a.m x b.n, row stride `ldd`) = A · B, or += with `accumulate`. Callers check
/// [`available`] and [`fits`] first.
pub fn matmul(dst: &mut [f32], ldd: usize, a: &PackedA, b: &PackedB, accumulate: bool) {
    assert!(available(), "AMX product called without AMX");
    assert!(
        a.k == b.k && fits(b.k, b.n),
        "AMX product: shapes do not fit tiles"
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
        // SAFETY: the permission was granted (`available`), the configuration is valid, and
        // every tile load and store stays inside `a_rows`, the panels of `b` and `scratch`.
        unsafe { load_config() };
        for j0 in (0..n / 16).step_by(2) {
            let pair = j0 + 1 < n / 16;
            let p0 = &b.data[j0 * k * 16..(j0 + 1) * k * 16];
            let p1 = if pair {
                &b.data[(j0 + 1) * k * 16..(j0 + 2) * k * 16]
            } else {
                p0
            };
            // SAFETY: as above; a_rows holds 32 rows of k values, each panel k/2 rows of 32.
            unsafe { block(a_rows, p0, p1, k, &mut scratch) };
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
        // SAFETY: releases this thread's tile state.
        unsafe { release() };
    });
}

#[cfg(target_arch = "x86_64")]
unsafe fn load_config() {
    let cfg = &CONFIG as *const TileConfig;
    std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg, options(nostack, readonly));
}

#[cfg(target_arch = "x86_64")]
unsafe fn release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// One 32 x 32 block of the product: rows of `a` (32 x k), two B panels (k x 16 each), into
/// `out` (32 x 32, row-major).
#[cfg(target_arch = "x86_64")]
unsafe fn block(a: &[u16], p0: &[u16], p1: &[u16], k: usize, out: &mut [f32; 1024]) {
    use std::arch::asm;
    let a_stride = k * 2; // bytes per row of A
    let b_stride = 64usize; // bytes per pair-row of a panel
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for kb in 0..k / 32 {
        let a0 = a.as_ptr().add(kb * 32);
        let a1 = a.as_ptr().add(16 * k + kb * 32);
        let b0 = p0.as_ptr().add(kb * 16 * 32);
        let b1 = p1.as_ptr().add(kb * 16 * 32);
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) a1,
            b0 = in(reg) b0,
            b1 = in(reg) b1,
            sa = in(reg) a_stride,
            sb = in(reg) b_stride,
            options(nostack, readonly)
        );
    }
    let c = out.as_mut_ptr();
    let sc = 32 * 4usize; // bytes per row of out
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c.add(16),
        c2 = in(reg) c.add(16 * 32),
        c3 = in(reg) c.add(16 * 32 + 16),
        s = in(reg) sc,
        options(nostack)
    );
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn load_config() {}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn release() {}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block(_: &[u16], _: &[u16], _: &[u16], _: usize, _: &mut [f32; 1024]) {
    unreachable!("AMX is never available off x86-64")
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
        if !available() {
            eprintln!("no AMX on this machine: skipped");
            return;
        }
        // m not a multiple of 32, an odd number of 16-column panels, accumulation.
        for (m, k, n) in [(37, 64, 48), (5, 32, 16), (64, 96, 32)] {
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
            matmul(&mut got, n, &a, &PackedB::transposed(&w, n, k), false);
            check(&got, &want, k);
            // The same product with B given as W's transpose in rows, accumulated onto ones.
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // (k, n)
            let mut acc = vec![1f32; m * n];
            matmul(&mut acc, n, &a, &PackedB::rows(&wt, k, n), true);
            let want1: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
            check(&acc, &want1, k);
        }
    }

    /// Speed of the frozen products of one SmolLM2 MLP projection (512 rows, 576 -> 1536):
    /// `cargo test --release --lib amx_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn amx_speed() {
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
        if !available() {
            println!("no AMX on this machine");
            return;
        }
        let amx_s = time(&mut || {
            let a = PackedA::new(View::rows(&x, m, k));
            let b = PackedB::transposed(&w, n, k);
            matmul(&mut y, n, &a, &b, false)
        });
        let b = PackedB::transposed(&w, n, k);
        let a = PackedA::new(View::rows(&x, m, k));
        let kernel_s = time(&mut || matmul(&mut y, n, &a, &b, false));
        println!(
            "AMX bf16: {:.1} GFLOP/s with packing, {:.1} GFLOP/s kernel only",
            flops / amx_s / 1e9,
            flops / kernel_s / 1e9
        );
    }
}
