//! A GGUF checkpoint's own quantized blocks, kept for decoding.
//!
//! Decoding multiplies a few rows of activations by every weight of the model at each step, so
//! its speed is set by how many bytes of weights it reads. The f32 copy the loader makes is 4
//! bytes a weight; the checkpoint's Q4_1 blocks are 0.625 and Q8_0 1.0625. This module keeps
//! those blocks and the decoding kernel ([`crate::ops::kernels`]) expands one weight row at a
//! time into a buffer that stays in L1 cache, with the very expression candle's loader uses
//! (`q as f32 * d + m` for Q4_1, `q as f32 * d` for Q8_0, two roundings, no fused multiply-add).
//! The weights multiplied are therefore bit-for-bit those of the f32 copy, and so are the
//! products: the same dot-product kernel runs on the same numbers.

use half::f16;

/// Weights per block in both formats.
pub const BLOCK: usize = 32;

/// The block formats kept; other GGUF types are used through their f32 copy only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// f16 scale d, f16 minimum m, 16 bytes of 4-bit values: w = q * d + m.
    Q4_1,
    /// f16 scale d, 32 signed bytes: w = q * d.
    Q8_0,
}

impl BlockKind {
    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockKind::Q4_1 => 20,
            BlockKind::Q8_0 => 34,
        }
    }

    /// The kind of a GGUF tensor type, if it is one we keep.
    pub fn of_gguf(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4_1 => Some(BlockKind::Q4_1),
            GgmlDType::Q8_0 => Some(BlockKind::Q8_0),
            _ => None,
        }
    }
}

/// A (rows, cols) weight matrix as quantized blocks, row-major, each row `cols / 32` blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMatrix {
    pub kind: BlockKind,
    pub rows: usize,
    pub cols: usize,
    bytes: Vec<u8>,
}

impl BlockMatrix {
    /// The matrix of `bytes` as a GGUF tensor stores them; `None` when the sizes disagree or a
    /// row is not whole blocks.
    pub fn new(kind: BlockKind, rows: usize, cols: usize, bytes: Vec<u8>) -> Option<Self> {
        let per_row = (cols / BLOCK).checked_mul(kind.block_bytes())?;
        (cols.is_multiple_of(BLOCK) && rows.checked_mul(per_row)? == bytes.len()).then_some(
            BlockMatrix {
                kind,
                rows,
                cols,
                bytes,
            },
        )
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.kind.block_bytes()
    }

    /// Row `r`'s blocks as the checkpoint stores them.
    pub fn row_blocks(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes[r * rb..(r + 1) * rb]
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `order[i]`.
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        let rb = self.row_bytes();
        let mut bytes = Vec::with_capacity(self.bytes.len());
        for &r in order {
            bytes.extend_from_slice(&self.bytes[r * rb..(r + 1) * rb]);
        }
        BlockMatrix {
            bytes,
            ..self.clone()
        }
    }

    /// Bytes held (for memory accounting).
    pub fn size_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Writes row `r`'s weights into `out` (`cols` long): AVX2 where the CPU has it, else
    /// portable; the two give the same bits (a multiply and an add, each rounded).
    #[inline]
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row_blocks(r);
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                // SAFETY: AVX2 and F16C are present; `row` holds whole blocks and `out` a value for each.
                unsafe { dequantize_avx2(self.kind, row, out) };
                return;
            }
        }
        dequantize_portable(self.kind, row, out);
    }

    /// Rows `first..` into `out` (a whole number of rows), in parallel for a large tile: the
    /// frozen weights of training are expanded a tile at a time this way.
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        debug_assert!(out.len().is_multiple_of(self.cols));
        const ROWS_PER_TASK: usize = 16;
        out.par_chunks_mut(ROWS_PER_TASK * self.cols)
            .enumerate()
            .for_each(|(task, dst)| {
                for (r, row) in dst.chunks_exact_mut(self.cols).enumerate() {
                    self.dequantize_row(first + task * ROWS_PER_TASK + r, row);
                }
            });
    }

    /// Every weight, row-major, expanded in parallel.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out);
        out
    }
}

/// The scale (and minimum) of a block.
#[inline(always)]
fn half_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

fn dequantize_portable(kind: BlockKind, row: &[u8], out: &mut [f32]) {
    {
        let bb = kind.block_bytes();
        for (block, ys) in row.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
            let d = half_at(block, 0);
            match kind {
                BlockKind::Q4_1 => {
                    let m = half_at(block, 2);
                    let (lo, hi) = ys.split_at_mut(BLOCK / 2);
                    for (j, &q) in block[4..].iter().enumerate() {
                        lo[j] = f32::from(q & 0x0F) * d + m;
                        hi[j] = f32::from(q >> 4) * d + m;
                    }
                }
                BlockKind::Q8_0 => {
                    for (y, &q) in ys.iter_mut().zip(&block[2..]) {
                        *y = f32::from(q as i8) * d;
                    }
                }
            }
        }
    }
}

/// Eight values at a time: bytes widened to i32, converted (exactly: they are small integers),
/// multiplied by the scale and the minimum added, as the portable loop does.
///
/// The blocks stream from memory once per decoding step, so the next ones are prefetched a few
/// cache lines ahead; the f16 scales convert with F16C (exact, as every f16 is an f32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dequantize_avx2(kind: BlockKind, row: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let bb = kind.block_bytes();
    for (block, ys) in row.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
        prefetch_ahead(block);
        let yp = ys.as_mut_ptr();
        for (at, v) in block_avx2(kind, block).into_iter().enumerate() {
            _mm256_storeu_ps(yp.add(8 * at), v);
        }
    }
}

/// Asks for the blocks a few cache lines past `block` (a prefetch never faults, so the address
/// may run past the row).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(block: &[u8]) {
    use std::arch::x86_64::*;
    const AHEAD: usize = 768;
    // SAFETY: a prefetch reads nothing the program sees and never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().wrapping_add(AHEAD) as *const i8) };
}

/// The 32 weights of one block (`block` holds at least its bytes), in order, as four vectors of
/// eight: bytes widened to i32, converted (exactly: they are small integers), multiplied by the
/// scale and, for Q4_1, the minimum added, two roundings as in the portable loop. Shared by the
/// expansion into a row and by the decoding kernel that multiplies blocks in registers
/// ([`crate::ops::kernels`]), so both use the very same numbers.
///
/// # Safety
/// The CPU has AVX2 and F16C, and `block` holds the block's bytes (20 for Q4_1, 34 for Q8_0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(crate) unsafe fn block_avx2(kind: BlockKind, block: &[u8]) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    // d (and m for Q4_1) from the block's first four bytes.
    let scales = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
        block[0], block[1], block[2], block[3],
    ])));
    let d = _mm256_broadcastss_ps(scales);
    match kind {
        BlockKind::Q4_1 => {
            debug_assert!(block.len() >= 20);
            let m = _mm256_broadcastss_ps(_mm_shuffle_ps::<0b01>(scales, scales));
            let qs = _mm_loadu_si128(block.as_ptr().add(4) as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let mut out = [_mm256_setzero_ps(); 4];
            // No closures here: they would not inherit this function's target features.
            for (v, bytes) in
                out.iter_mut()
                    .zip([lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)])
            {
                let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                *v = _mm256_add_ps(_mm256_mul_ps(q, d), m);
            }
            out
        }
        BlockKind::Q8_0 => {
            debug_assert!(block.len() >= 34);
            let mut out = [_mm256_setzero_ps(); 4];
            for (i, v) in out.iter_mut().enumerate() {
                let bytes = _mm_loadl_epi64(block.as_ptr().add(2 + 8 * i) as *const __m128i);
                *v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), d);
            }
            out
        }
    }
}

/// `values` (rows, cols) quantized by candle to `kind`, and candle's f32 dequantization of it.
#[cfg(test)]
pub fn quantized_for_tests(
    kind: BlockKind,
    values: Vec<f32>,
    rows: usize,
    cols: usize,
) -> (BlockMatrix, candle_core::Tensor) {
    use candle_core::quantized::{GgmlDType, QTensor};
    let dev = candle_core::Device::Cpu;
    let t = candle_core::Tensor::from_vec(values, (rows, cols), &dev).unwrap();
    let dtype = match kind {
        BlockKind::Q4_1 => GgmlDType::Q4_1,
        BlockKind::Q8_0 => GgmlDType::Q8_0,
    };
    let q = QTensor::quantize(&t, dtype).unwrap();
    let m = BlockMatrix::new(kind, rows, cols, q.data().unwrap().into_owned()).unwrap();
    (m, q.dequantize(&dev).unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// A matrix quantized by candle, and candle's own dequantization of it.
    fn quantized(dtype: GgmlDType, rows: usize, cols: usize) -> (BlockMatrix, Vec<f32>) {
        let dev = Device::Cpu;
        let t = Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let want = q.dequantize(&dev).unwrap().flatten_all().unwrap();
        let kind = BlockKind::of_gguf(dtype).unwrap();
        let m = BlockMatrix::new(kind, rows, cols, q.data().unwrap().into_owned()).unwrap();
        (m, want.to_vec1().unwrap())
    }

    #[test]
    fn rows_expand_to_candles_f32_bit_for_bit() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, want) = quantized(dtype, 7, 96);
            let got = m.dequantize();
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} weight {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn vector_and_portable_expansion_agree_bit_for_bit() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, _) = quantized(dtype, 3, 128);
            let rb = m.row_bytes();
            for r in 0..3 {
                let mut want = vec![0f32; 128];
                dequantize_portable(m.kind, &m.bytes[r * rb..(r + 1) * rb], &mut want);
                let mut got = vec![0f32; 128];
                m.dequantize_row(r, &mut got);
                assert!(want
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn permuted_rows_follow_the_order() {
        let (m, want) = quantized(GgmlDType::Q4_1, 4, 64);
        let p = m.permute_rows(&[2, 0, 3, 1]).dequantize();
        for (i, &r) in [2usize, 0, 3, 1].iter().enumerate() {
            assert_eq!(&p[i * 64..(i + 1) * 64], &want[r * 64..(r + 1) * 64]);
        }
    }

    #[test]
    fn sizes_that_are_not_whole_blocks_are_refused() {
        assert!(BlockMatrix::new(BlockKind::Q4_1, 2, 48, vec![0; 40]).is_none());
        assert!(BlockMatrix::new(BlockKind::Q8_0, 2, 32, vec![0; 67]).is_none());
        assert!(BlockMatrix::new(BlockKind::Q8_0, 2, 32, vec![0; 68]).is_some());
    }
}
