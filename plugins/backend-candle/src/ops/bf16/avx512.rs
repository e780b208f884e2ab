//! The AVX512-BF16 kernel (AMD Zen 4 and later, Intel Cooper Lake and later): VDPBF16PS adds
//! the products of 16 bf16 pairs into 16 f32 lanes. It reads the very layouts the AMX kernel
//! reads: a 32-bit broadcast of one row of A gives the pair (A[i][2p], A[i][2p+1]), and one
//! 64-byte pair-row of a B panel gives (B[2p][j], B[2p+1][j]) for its 16 columns.
//!
//! Measured here (AMD EPYC, one thread, 512 x 576 x 1536): about 180 GFLOP/s against 76-103
//! for f32 gemm.

/// Whether the CPU has AVX512-BF16 (and `HARNESS_NO_AVX512BF16` is not set).
#[cfg(target_arch = "x86_64")]
pub(super) fn detect() -> bool {
    std::env::var_os("HARNESS_NO_AVX512BF16").is_none()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn detect() -> bool {
    false
}

/// Output rows per pass of the kernel: 8 rows x 32 columns are 16 accumulator registers.
const ROWS: usize = 8;

/// One 32 x 32 block of the product: rows of `a` (32 x k), two B panels (k x 16 each), into
/// `out` (32 x 32, row-major).
///
/// # Safety
/// The CPU must have AVX512F and AVX512-BF16 ([`detect`]); `a` holds 32 rows of k values and
/// each panel k/2 pair-rows of 32 values, k even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn block(a: &[u16], p0: &[u16], p1: &[u16], k: usize, out: &mut [f32; 1024]) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= 32 * k && p0.len() >= 16 * k && p1.len() >= 16 * k);
    for r0 in (0..32).step_by(ROWS) {
        let mut c0 = [_mm512_setzero_ps(); ROWS];
        let mut c1 = [_mm512_setzero_ps(); ROWS];
        let rows = a.as_ptr().add(r0 * k);
        for p in 0..k / 2 {
            // SAFETY (all loads): p < k/2 stays inside each panel and each row of `a`.
            let b0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(p0.as_ptr().add(p * 32) as *const __m512i));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(p1.as_ptr().add(p * 32) as *const __m512i));
            for r in 0..ROWS {
                let pair = (rows.add(r * k + 2 * p) as *const i32).read_unaligned();
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
                c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
            }
        }
        for r in 0..ROWS {
            let dst = out.as_mut_ptr().add((r0 + r) * 32);
            _mm512_storeu_ps(dst, c0[r]);
            _mm512_storeu_ps(dst.add(16), c1[r]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn block(_: &[u16], _: &[u16], _: &[u16], _: usize, _: &mut [f32; 1024]) {
    unreachable!("AVX512-BF16 is never available off x86-64")
}
