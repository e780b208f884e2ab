//! A CPU kernel for the matmuls of decoding: a few rows of activations times a large weight.
//!
//! candle's matmul (the gemm crate) packs the weight matrix on every call, which dominates when
//! only a handful of rows multiply it (one row per sequence being decoded). Here every weight row
//! is read once, straight from memory, and dotted with each activation row while it is in cache;
//! the work is split across threads by weight rows. The inner dot product is compiled for
//! AVX2+FMA and AVX-512 and chosen at run time, with a portable fallback.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Row counts up to this use [`skinny_matmul`]; above it the weight is reused enough that gemm's
/// packing pays off.
pub const SKINNY_MAX_ROWS: usize = 16;

/// Weight rows handled per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `x` (m, k) times `w` (n, k) transposed, for contiguous f32 CPU tensors with small m; `None`
/// when the inputs do not qualify (the caller then uses candle's matmul).
pub fn skinny_matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if m > SKINNY_MAX_ROWS
        || k != k2
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !matches!(x.device(), Device::Cpu)
        || !x.is_contiguous()
        || !w.is_contiguous()
    {
        return Ok(None);
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let all = cpu.as_slice::<f32>()?;
    let ws = &all[layout.start_offset()..layout.start_offset() + n * k];
    let out_t = skinny_matmul(&xs, m, k, ws, n);
    drop(storage);
    // out_t is (n, m): transpose to (m, n).
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
}

/// Computes `out_t[j * m + i] = dot(x[i], w[j])` for x (m, k) and w (n, k), row-major.
pub fn skinny_matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    let dot = dot_fn();
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, dst)| {
            let first = task * ROWS_PER_TASK;
            for (r, cells) in dst.chunks_mut(m).enumerate() {
                let row = &w[(first + r) * k..(first + r + 1) * k];
                for (i, cell) in cells.iter_mut().enumerate() {
                    *cell = dot(&x[i * k..(i + 1) * k], row);
                }
            }
        });
    out_t
}

type DotFn = fn(&[f32], &[f32]) -> f32;

fn dot_fn() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |a, b| unsafe { dot_avx512(a, b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |a, b| unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable
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

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in a.iter().zip(b) {
        sum += x * y;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
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
    fn portable_and_vector_paths_agree() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let (p, v) = (dot_portable(&a, &b), dot_fn()(&a, &b));
        assert!((p - v).abs() < 1e-3, "{p} vs {v}");
    }

    #[test]
    fn tall_inputs_are_left_to_candle() {
        let x = Tensor::zeros((17, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(skinny_matmul_t(&x, &w).unwrap().is_none());
    }
}
