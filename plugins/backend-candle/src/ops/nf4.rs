//! 4-bit NormalFloat (NF4) quantization with double quantization, as in QLoRA (Dettmers et al.
//! 2023): the frozen base weights of QLoRA training are stored this way.
//!
//! A weight matrix is cut, in row-major order, into blocks of 64 values. Each block keeps its
//! absolute maximum and, per value, the index (4 bits) of the nearest of 16 levels that split the
//! standard normal distribution into equal-probability halves around an exact zero. With double
//! quantization the block maxima are themselves stored in 8 bits: centred on their mean and scaled
//! per group of 256 blocks, so the cost per parameter falls from 4.5 to about 4.127 bits.

use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 64;
/// Block maxima per second-level block (double quantization).
pub const DQ_BLOCK: usize = 256;

/// The 16 NF4 levels, as bitsandbytes and the QLoRA reference define them (ascending, level 7 is
/// exactly zero). `normal_float_levels` derives them; a test checks the two agree.
#[allow(clippy::excessive_precision)] // the published values, digit for digit
pub const LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Derives the NF4 levels: quantiles of N(0, 1) at evenly spaced probabilities between
/// 1 - 0.9677 and 0.5 (8 positive, 7 negative), plus zero, normalised to [-1, 1].
pub fn normal_float_levels() -> [f64; 16] {
    const OFFSET: f64 = 0.967_708_333_333_333_3; // (1 - 1/(2*15) + 1 - 1/(2*16)) / 2
    let positive: Vec<f64> = (0..8)
        .map(|i| inverse_normal_cdf(OFFSET + (0.5 - OFFSET) * i as f64 / 8.0))
        .collect();
    let negative: Vec<f64> = (0..7)
        .map(|i| -inverse_normal_cdf(OFFSET + (0.5 - OFFSET) * i as f64 / 7.0))
        .collect();
    let mut v: Vec<f64> = positive.into_iter().chain([0.0]).chain(negative).collect();
    v.sort_by(f64::total_cmp);
    let max = v.iter().fold(0f64, |m, x| m.max(x.abs()));
    let mut out = [0f64; 16];
    for (o, x) in out.iter_mut().zip(v) {
        *o = x / max;
    }
    out
}

/// The standard normal quantile function (Acklam's rational approximation, relative error below
/// 1.2e-9: far below what 4-bit levels can tell apart).
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let low = 0.024_25;
    if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    }
}

/// The per-block maxima, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    /// `absmax[b] = codes[b] * scales[b / DQ_BLOCK] + mean`.
    Double {
        codes: Vec<i8>,
        scales: Vec<f32>,
        mean: f32,
    },
}

impl Absmax {
    /// The maximum of block `block`.
    pub fn get(&self, block: usize) -> f32 {
        match self {
            Absmax::F32(v) => v[block],
            Absmax::Double {
                codes,
                scales,
                mean,
            } => f32::from(codes[block]) * scales[block / DQ_BLOCK] + mean,
        }
    }

    fn bits(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len() * 32,
            Absmax::Double { codes, scales, .. } => codes.len() * 8 + scales.len() * 32 + 32,
        }
    }
}

/// A matrix in NF4: two 4-bit level indices per byte (the first value in the high nibble).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Matrix {
    pub rows: usize,
    pub cols: usize,
    packed: Vec<u8>,
    absmax: Absmax,
}

/// The index of the level nearest to `x` (in [-1, 1]).
fn nearest_level(x: f32) -> u8 {
    // Midpoints between consecutive levels split the line into 16 cells.
    let mut best = 0u8;
    for i in 1..16 {
        if x > (LEVELS[i - 1] + LEVELS[i]) / 2.0 {
            best = i as u8;
        } else {
            break;
        }
    }
    best
}

impl Nf4Matrix {
    /// Quantizes a row-major `rows` x `cols` matrix.
    pub fn quantize(data: &[f32], rows: usize, cols: usize, double_quant: bool) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix size");
        let n = data.len();
        // Blocks are independent, so both passes run in parallel: a checkpoint is packed as it
        // loads, and one serial pass took over a second of a training run's start.
        let absmax: Vec<f32> = data
            .par_chunks(BLOCK)
            .map(|block| block.iter().fold(0f32, |m, x| m.max(x.abs())))
            .collect();
        let absmax = if double_quant {
            double_quantize(&absmax)
        } else {
            Absmax::F32(absmax)
        };
        // Two codes a byte, the first in the high nibble; a block of 64 fills 32 bytes.
        let mut packed = vec![0u8; n.div_ceil(2)];
        packed
            .par_chunks_mut(BLOCK / 2)
            .zip(data.par_chunks(BLOCK))
            .enumerate()
            .for_each(|(b, (bytes, block))| {
                let scale = absmax.get(b);
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                let code = |x: f32| nearest_level((x * inv).clamp(-1.0, 1.0));
                for (byte, pair) in bytes.iter_mut().zip(block.chunks(2)) {
                    *byte = code(pair[0]) << 4 | pair.get(1).map_or(0, |&x| code(x));
                }
            });
        Nf4Matrix {
            rows,
            cols,
            packed,
            absmax,
        }
    }

    /// Dequantizes rows `first..first + out.len() / cols` into `out`, block by block (one
    /// absmax per 64 values, two codes per byte), split across threads for large tiles.
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        let start = first * self.cols;
        debug_assert!(start.is_multiple_of(BLOCK) || self.cols.is_multiple_of(2));
        let decode = |offset: usize, dst: &mut [f32]| {
            // `offset` is a multiple of BLOCK (and so even) for every chunk but a ragged tail.
            for (j, pair) in dst.chunks_mut(BLOCK).enumerate() {
                let i0 = offset + j * BLOCK;
                let scale = self.absmax.get(i0 / BLOCK);
                let bytes = &self.packed[i0 / 2..(i0 + pair.len()).div_ceil(2)];
                for (o, &byte) in pair.chunks_mut(2).zip(bytes) {
                    o[0] = LEVELS[(byte >> 4) as usize] * scale;
                    if let Some(second) = o.get_mut(1) {
                        *second = LEVELS[(byte & 0x0f) as usize] * scale;
                    }
                }
            }
        };
        if start.is_multiple_of(BLOCK) && out.len() >= 16 * 1024 {
            const CHUNK: usize = 64 * BLOCK;
            out.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, dst)| decode(start + c * CHUNK, dst));
        } else if start.is_multiple_of(BLOCK) {
            decode(start, out);
        } else {
            for (j, o) in out.iter_mut().enumerate() {
                let i = start + j;
                let byte = self.packed[i / 2];
                let code = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0f
                };
                *o = LEVELS[code as usize] * self.absmax.get(i / BLOCK);
            }
        }
    }

    /// The whole matrix in f32 (tests and merging only: training never holds it).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out);
        out
    }

    /// The level indices, two per byte (the first value in the high nibble).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The per-block maxima.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// Storage cost per parameter, in bits.
    pub fn bits_per_parameter(&self) -> f64 {
        (self.packed.len() * 8 + self.absmax.bits()) as f64 / (self.rows * self.cols) as f64
    }
}

fn double_quantize(absmax: &[f32]) -> Absmax {
    let mean = absmax.iter().map(|&x| f64::from(x)).sum::<f64>() / absmax.len().max(1) as f64;
    let mean = mean as f32;
    let mut codes = Vec::with_capacity(absmax.len());
    let mut scales = Vec::with_capacity(absmax.len().div_ceil(DQ_BLOCK));
    for group in absmax.chunks(DQ_BLOCK) {
        let max = group.iter().fold(0f32, |m, &x| m.max((x - mean).abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        scales.push(scale);
        codes.extend(
            group
                .iter()
                .map(|&x| ((x - mean) / scale).round().clamp(-127.0, 127.0) as i8),
        );
    }
    Absmax::Double {
        codes,
        scales,
        mean,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_table_is_the_normal_float_construction() {
        let derived = normal_float_levels();
        for (a, b) in LEVELS.iter().zip(derived) {
            assert!((f64::from(*a) - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(LEVELS[7], 0.0);
        assert!(LEVELS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn inverse_normal_cdf_known_values() {
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959_963_984_540_054),
            (0.841_344_746_068_542_9, 1.0),
            (0.001, -3.090_232_306_167_813),
        ] {
            assert!((inverse_normal_cdf(p) - z).abs() < 1e-8, "{p}");
        }
    }

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut uniform = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| inverse_normal_cdf(uniform()) as f32 * 0.02)
            .collect()
    }

    fn relative_error(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let den: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
        (num / den).sqrt()
    }

    #[test]
    fn round_trip_of_a_gaussian_matrix() {
        // Gaussian weights (std 0.02, like a transformer's): the relative Frobenius error is
        // 0.092 with and without double quantization (measured; the maxima lose ~1/127 of their
        // spread, which 4-bit levels cannot see).
        let (rows, cols) = (256, 576);
        let w = gaussian(rows * cols, 3);
        let single = Nf4Matrix::quantize(&w, rows, cols, false);
        let double = Nf4Matrix::quantize(&w, rows, cols, true);
        let e1 = relative_error(&w, &single.dequantize());
        let e2 = relative_error(&w, &double.dequantize());
        assert!(e1 < 0.11, "single: {e1}");
        assert!(e2 < 0.11 && (e2 - e1).abs() < 0.005, "double: {e2} vs {e1}");
    }

    #[test]
    fn parallel_packing_is_the_element_by_element_definition() {
        // Element i of block b is coded against b's (double-quantized) maximum and lands in
        // the high nibble of byte i / 2 when i is even; an odd length leaves a low nibble of 0.
        for (rows, cols) in [(3, 64), (5, 100), (1, 129), (7, 333)] {
            let data = gaussian(rows * cols, (rows * cols) as u64);
            for double_quant in [false, true] {
                let q = Nf4Matrix::quantize(&data, rows, cols, double_quant);
                let mut want = vec![0u8; data.len().div_ceil(2)];
                for (i, &x) in data.iter().enumerate() {
                    let scale = q.absmax.get(i / BLOCK);
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    let code = nearest_level((x * inv).clamp(-1.0, 1.0));
                    want[i / 2] |= if i % 2 == 0 { code << 4 } else { code };
                }
                assert_eq!(q.packed, want, "{rows}x{cols}, double {double_quant}");
                let maxima: Vec<f32> = data
                    .chunks(BLOCK)
                    .map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())))
                    .collect();
                if !double_quant {
                    assert_eq!(q.absmax, Absmax::F32(maxima));
                }
            }
        }
    }

    #[test]
    fn exact_levels_survive_and_zero_blocks_stay_zero() {
        let mut w: Vec<f32> = (0..BLOCK).map(|i| LEVELS[i % 16] * 3.0).collect();
        w.extend([0f32; BLOCK]);
        let q = Nf4Matrix::quantize(&w, 2, BLOCK, false);
        assert_eq!(q.dequantize(), w);
    }

    #[test]
    fn bits_per_parameter() {
        let w = gaussian(4096 * 1024, 1);
        let single = Nf4Matrix::quantize(&w, 4096, 1024, false);
        let double = Nf4Matrix::quantize(&w, 4096, 1024, true);
        assert!((single.bits_per_parameter() - 4.5).abs() < 1e-9);
        // 4 + 8/64 + 32/(64*256), plus one mean per matrix.
        assert!(
            (double.bits_per_parameter() - 4.127).abs() < 1e-3,
            "{}",
            double.bits_per_parameter()
        );
    }

    #[test]
    fn rows_dequantize_independently() {
        let w = gaussian(8 * 100, 9);
        let q = Nf4Matrix::quantize(&w, 8, 100, true);
        let full = q.dequantize();
        let mut rows = vec![0f32; 3 * 100];
        q.dequantize_rows(2, &mut rows);
        assert_eq!(rows, full[200..500]);
    }
}
