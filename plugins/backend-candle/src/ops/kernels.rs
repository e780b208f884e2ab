//! A CPU kernel for the matmuls of decoding: a few rows of activations times a large weight.
//!
//! candle's matmul (the gemm crate) packs the weight matrix on every call, which dominates when
//! only a handful of rows multiply it (one row per sequence being decoded). Here every weight row
//! is read once, straight from memory, and dotted with each activation row while it is in cache;
//! the work is split across threads by weight rows. The inner dot products are AVX2+FMA
//! intrinsics (also on AVX-512 CPUs), chosen at run time, with a portable fallback that gives the
//! same bits.
//!
//! Weight rows come from a [`WeightRows`]: an f32 matrix, or a checkpoint's quantized blocks
//! ([`BlockMatrix`]), which read several times fewer bytes per step and multiply the same f32
//! numbers: on AVX2 CPUs each block is expanded in registers right where it is multiplied
//! (expanding a row into a buffer first cost as much as its products at batch 1), elsewhere
//! one row at a time into a buffer in L1 cache. bf16 weights (evaluation with
//! `compute = "bf16"`) are widened in registers the same way.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::ops::blocks::BlockMatrix;

/// Where the kernel reads weight rows from.
pub trait WeightRows: Sync {
    /// Row `j` (`k` weights), borrowed or expanded into `buf` (`k` long).
    fn row<'a>(&'a self, j: usize, k: usize, buf: &'a mut [f32]) -> &'a [f32];

    /// `out[i] = dot(x[i], row j)` for each row of `x` (rows of `k` values), bit for bit
    /// [`dot_lanes`]: row `j` (expanded into `buf` if need be) through `dots`.
    fn dots(&self, j: usize, x: &[f32], k: usize, buf: &mut [f32], out: &mut [f32], dots: DotsFn) {
        dots(x, k, self.row(j, k, buf), out);
    }
}

/// A row-major f32 matrix.
impl WeightRows for [f32] {
    fn row<'a>(&'a self, j: usize, k: usize, _: &'a mut [f32]) -> &'a [f32] {
        &self[j * k..(j + 1) * k]
    }
}

impl WeightRows for BlockMatrix {
    fn row<'a>(&'a self, j: usize, _: usize, buf: &'a mut [f32]) -> &'a [f32] {
        self.dequantize_row(j, buf);
        buf
    }

    fn dots(&self, j: usize, x: &[f32], k: usize, buf: &mut [f32], out: &mut [f32], dots: DotsFn) {
        #[cfg(target_arch = "x86_64")]
        {
            if blocks_in_registers() {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked); the kernel asserts that
                // the row, `x` and `out` fit.
                unsafe { block_dots_avx2(self.kind, self.row_blocks(j), x, k, out) };
                return;
            }
        }
        dots(x, k, self.row(j, k, buf), out);
    }
}

/// Whether [`block_dots_avx2`] can run here.
#[cfg(target_arch = "x86_64")]
fn blocks_in_registers() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Whether `x` qualifies for the few-row kernel: a contiguous f32 CPU matrix of at most
/// [`SKINNY_MAX_ROWS`] rows of `k` values.
fn is_skinny(x: &Tensor, k: usize) -> candle_core::Result<bool> {
    let (m, kx) = x.dims2()?;
    Ok(m <= SKINNY_MAX_ROWS
        && kx == k
        && x.dtype() == DType::F32
        && matches!(x.device(), Device::Cpu)
        && x.is_contiguous())
}

/// `x` (m, k) times the transpose of the block matrix `w` (n, k), for small m; `None` when `x`
/// does not qualify (the caller then uses the f32 copy).
pub fn skinny_matmul_blocks_t(x: &Tensor, w: &BlockMatrix) -> candle_core::Result<Option<Tensor>> {
    if !is_skinny(x, w.cols)? {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let out_t = skinny_matmul(&xs, m, k, w, w.rows);
    Ok(Some(transposed(out_t, m, w.rows, x.device())?))
}

/// The (m, n) tensor of a kernel's (n, m) output.
fn transposed(out_t: Vec<f32>, m: usize, n: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    Tensor::from_vec(out, (m, n), device)
}

/// Row counts up to this use [`skinny_matmul`]; above it the weight is reused enough that gemm's
/// packing pays off.
pub const SKINNY_MAX_ROWS: usize = 16;

/// Weight rows handled per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `x` (m, k) times `w` (n, k) transposed, for contiguous f32 CPU tensors with small m; `None`
/// when the inputs do not qualify (the caller then uses candle's matmul).
pub fn skinny_matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (n, k) = w.dims2()?;
    if !is_skinny(x, k)? || w.dtype() != DType::F32 || !w.is_contiguous() {
        return Ok(None);
    }
    let m = x.dim(0)?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let all = cpu.as_slice::<f32>()?;
    let ws = &all[layout.start_offset()..layout.start_offset() + n * k];
    let out_t = skinny_matmul(&xs, m, k, ws, n);
    drop(storage);
    Ok(Some(transposed(out_t, m, n, x.device())?))
}

/// Computes `out_t[j * m + i] = dot(x[i], w[j])` for x (m, k) and the n rows of `w`.
///
/// Each product equals [`dot_lanes`] of its two rows bit for bit whichever path runs and however
/// many rows `x` has, so a prediction does not depend on the batch it was decoded in.
pub fn skinny_matmul<W: WeightRows + ?Sized>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &W,
    n: usize,
) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    let dots = dots_fn();
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, dst)| {
            let first = task * ROWS_PER_TASK;
            let mut buf = vec![0f32; k];
            for (r, cells) in dst.chunks_mut(m).enumerate() {
                w.dots(first + r, x, k, &mut buf, cells, dots);
            }
        });
    out_t
}

/// `out[i] = dot(x[i], w)` for every row of x (rows of `k` values).
pub type DotsFn = fn(&[f32], usize, &[f32], &mut [f32]);

fn dots_fn() -> DotsFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |x, k, w, out| unsafe { dots_avx2(x, k, w, out) };
        }
    }
    dots_portable
}

fn dots_portable(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    for (i, cell) in out.iter_mut().enumerate() {
        *cell = dot_lanes(&x[i * k..(i + 1) * k], w);
    }
}

/// Four rows of x at a time against one weight row held in L1, so each 16-value chunk of the
/// weight row is loaded once for four rows. Lane l of a row's two accumulators sums the same
/// products as `dot_lanes`' `acc[l]`, and the lanes are added in the same order, so each result
/// is `dot_lanes`' to the bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let chunks = k / L;
    let finish = |lo: __m256, hi: __m256, xr: &[f32]| -> f32 {
        let mut sum = sum_lanes(lo, hi);
        for i in chunks * L..k {
            sum = xr[i].mul_add(w[i], sum);
        }
        sum
    };
    let m = out.len();
    let wp = w.as_ptr();
    let mut i = 0;
    while i + 4 <= m {
        let xp: [*const f32; 4] = std::array::from_fn(|r| x.as_ptr().add((i + r) * k));
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        for c in 0..chunks {
            let w0 = _mm256_loadu_ps(wp.add(c * L));
            let w1 = _mm256_loadu_ps(wp.add(c * L + 8));
            for r in 0..4 {
                lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[r].add(c * L)), w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[r].add(c * L + 8)), w1, hi[r]);
            }
        }
        for r in 0..4 {
            out[i + r] = finish(lo[r], hi[r], &x[(i + r) * k..(i + r + 1) * k]);
        }
        i += 4;
    }
    while i < m {
        let xp = x.as_ptr().add(i * k);
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in 0..chunks {
            let x0 = _mm256_loadu_ps(xp.add(c * L));
            let x1 = _mm256_loadu_ps(xp.add(c * L + 8));
            lo = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wp.add(c * L)), lo);
            hi = _mm256_fmadd_ps(x1, _mm256_loadu_ps(wp.add(c * L + 8)), hi);
        }
        out[i] = finish(lo, hi, &x[i * k..(i + 1) * k]);
        i += 1;
    }
}

/// The sixteen lanes of two accumulators added in [`dot_lanes`]' order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn sum_lanes(lo: std::arch::x86_64::__m256, hi: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let mut lanes = [0f32; 16];
    _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    lanes.iter().sum()
}

/// [`dots_avx2`] over a row of quantized blocks, each block expanded in registers
/// ([`crate::ops::blocks::block_avx2`], the values `BlockMatrix::dequantize_row` writes) and
/// multiplied at once: the lanes accumulate the same products in the same order as
/// [`dot_lanes`] on the expanded row, so each result is its bits. Four rows of `x` at a time
/// share each expanded block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_dots_avx2(
    kind: crate::ops::blocks::BlockKind,
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let m = out.len();
    let mut i = 0;
    while i + 4 <= m {
        block_dots_group::<4>(kind, row, &x[i * k..], k, &mut out[i..i + 4]);
        i += 4;
    }
    match m - i {
        3 => block_dots_group::<3>(kind, row, &x[i * k..], k, &mut out[i..]),
        2 => block_dots_group::<2>(kind, row, &x[i * k..], k, &mut out[i..]),
        1 => block_dots_group::<1>(kind, row, &x[i * k..], k, &mut out[i..]),
        _ => {}
    }
}

/// `X` rows of `x` against one row of blocks (see [`block_dots_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_dots_group<const X: usize>(
    kind: crate::ops::blocks::BlockKind,
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    use crate::ops::blocks::{block_avx2, prefetch_ahead, BLOCK};
    use std::arch::x86_64::*;
    let blocks = k / BLOCK;
    assert!(
        k.is_multiple_of(BLOCK)
            && row.len() == blocks * kind.block_bytes()
            && x.len() >= X * k
            && out.len() >= X,
        "block dots: the row, x or out do not fit"
    );
    let xp = x.as_ptr();
    let mut lo = [_mm256_setzero_ps(); X];
    let mut hi = [_mm256_setzero_ps(); X];
    for (b, block) in row.chunks_exact(kind.block_bytes()).enumerate() {
        prefetch_ahead(block);
        // A block is two of dot_lanes' 16-value chunks: w[0], w[1] and then w[2], w[3].
        let w = block_avx2(kind, block);
        for (half, (w_lo, w_hi)) in [(w[0], w[1]), (w[2], w[3])].into_iter().enumerate() {
            let at = b * BLOCK + half * 16;
            for r in 0..X {
                let xr = xp.add(r * k + at);
                lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w_lo, lo[r]);
                hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w_hi, hi[r]);
            }
        }
    }
    for r in 0..X {
        out[r] = sum_lanes(lo[r], hi[r]);
    }
}

/// [`dots_avx2`] over a row of bf16 values (the top halves of their f32), each chunk widened in
/// registers where it is multiplied: the lanes accumulate the same products in the same order as
/// [`dot_lanes`] on the widened row, so each result is its bits. Four rows of `x` at a time share
/// each widened chunk.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn bf16_dots_avx2(row: &[u16], x: &[f32], k: usize, out: &mut [f32]) {
    let m = out.len();
    let mut i = 0;
    while i + 4 <= m {
        bf16_dots_group::<4>(row, &x[i * k..], k, &mut out[i..i + 4]);
        i += 4;
    }
    match m - i {
        3 => bf16_dots_group::<3>(row, &x[i * k..], k, &mut out[i..]),
        2 => bf16_dots_group::<2>(row, &x[i * k..], k, &mut out[i..]),
        1 => bf16_dots_group::<1>(row, &x[i * k..], k, &mut out[i..]),
        _ => {}
    }
}

/// `X` rows of `x` against one bf16 row (see [`bf16_dots_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn bf16_dots_group<const X: usize>(row: &[u16], x: &[f32], k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    assert!(
        row.len() == k && x.len() >= X * k && out.len() >= X,
        "bf16 dots: the row, x or out do not fit"
    );
    let chunks = k / L;
    let (xp, wp) = (x.as_ptr(), row.as_ptr());
    let mut lo = [_mm256_setzero_ps(); X];
    let mut hi = [_mm256_setzero_ps(); X];
    for c in 0..chunks {
        let raw = _mm256_loadu_si256(wp.add(c * L) as *const __m256i);
        let widen =
            |half: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
        let w_lo = widen(_mm256_castsi256_si128(raw));
        let w_hi = widen(_mm256_extracti128_si256(raw, 1));
        for r in 0..X {
            let xr = xp.add(r * k + c * L);
            lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w_lo, lo[r]);
            hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w_hi, hi[r]);
        }
    }
    for r in 0..X {
        let mut sum = sum_lanes(lo[r], hi[r]);
        for i in chunks * L..k {
            sum = x[r * k + i].mul_add(f32::from_bits(u32::from(row[i]) << 16), sum);
        }
        out[r] = sum;
    }
}

/// Sixteen independent partial sums, so the compiler can keep them in vector registers.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let chunks = a.len() / L;
    for c in 0..chunks {
        let (ac, bc) = (&a[c * L..c * L + L], &b[c * L..c * L + L]);
        for l in 0..L {
            acc[l] = ac[l].mul_add(bc[l], acc[l]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * L..a.len() {
        sum = a[i].mul_add(b[i], sum);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candle_matmul() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 576, 1536), (8, 64, 100), (3, 37, 5), (16, 576, 49)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            let got = skinny_matmul_t(&x, &w)
                .unwrap()
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
                assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn vector_path_equals_the_portable_one_bit_for_bit_for_any_row_count() {
        // Lengths with and without a tail past the 16-value chunks; row counts around the
        // kernel's groups of four.
        for k in [576, 1000, 37] {
            let w: Vec<f32> = (0..k).map(|i| (i as f32 * 0.11).cos()).collect();
            for m in [1, 3, 4, 5, 8, 13] {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
                let mut want = vec![0f32; m];
                dots_portable(&x, k, &w, &mut want);
                let mut got = vec![0f32; m];
                dots_fn()(&x, k, &w, &mut got);
                assert!(
                    want.iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "k {k}, m {m}: {want:?} vs {got:?}"
                );
                // The last row alone gives the bits it gave among the m rows.
                let mut alone = [0f32];
                dots_fn()(&x[(m - 1) * k..], k, &w, &mut alone);
                assert_eq!(alone[0].to_bits(), got[m - 1].to_bits(), "k {k}, m {m}");
            }
        }
    }

    #[test]
    fn block_rows_give_the_f32_copys_products_bit_for_bit() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        // Every group size of the kernel that expands blocks in registers (4, 3, 2, 1 rows).
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for m in [1, 2, 3, 5, 7, 8, 16] {
                let (n, k) = (70, 96);
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let dense = q.dequantize(&dev).unwrap();
                let blocks = BlockMatrix::new(
                    crate::ops::blocks::BlockKind::of_gguf(dtype).unwrap(),
                    n,
                    k,
                    q.data().unwrap().into_owned(),
                )
                .unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let want = skinny_matmul_t(&x, &dense).unwrap().unwrap();
                let got = skinny_matmul_blocks_t(&x, &blocks).unwrap().unwrap();
                let (want, got) = (
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert!(
                    want.iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?}, {m} rows"
                );
            }
        }
    }

    #[test]
    fn bf16_rows_widened_in_registers_give_the_widened_rows_products_bit_for_bit() {
        // Every group size, and lengths with and without a tail past the 16-value chunks.
        for k in [96, 37] {
            let row: Vec<u16> = (0..k)
                .map(|i| ((i as f32 * 0.13).sin().to_bits() >> 16) as u16)
                .collect();
            let wide: Vec<f32> = row
                .iter()
                .map(|&v| f32::from_bits(u32::from(v) << 16))
                .collect();
            for m in [1, 2, 3, 5, 7, 8, 16] {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).cos()).collect();
                let mut want = vec![0f32; m];
                dots_portable(&x, k, &wide, &mut want);
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    let mut got = vec![0f32; m];
                    // SAFETY: the CPU has AVX2 and FMA (checked).
                    unsafe { bf16_dots_avx2(&row, &x, k, &mut got) };
                    assert!(
                        want.iter()
                            .zip(&got)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "k {k}, m {m}: {want:?} vs {got:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn tall_inputs_are_left_to_candle() {
        let x = Tensor::zeros((17, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(skinny_matmul_t(&x, &w).unwrap().is_none());
    }
}
