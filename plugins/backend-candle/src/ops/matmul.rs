//! Matrix products on plain slices, through the gemm crate (the one candle's CPU matmul uses).
//!
//! The training ops in [`crate::ops::fused`] work on slices inside candle custom ops; going through
//! tensors there would allocate, copy for every transpose and concatenate tiles. Here operands are
//! strided views, so a transpose or a column block of a matrix costs nothing, and a product can
//! accumulate into its destination.

use gemm::Parallelism;

use crate::ops::zeros::zeros;

/// A read-only strided view of a matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `rows` x `cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Columns `first..first + n` (for a row-major matrix: a column block, without copying).
    pub fn cols_range(self, first: usize, n: usize) -> Self {
        View {
            data: &self.data[(first * self.cs).min(self.data.len())..],
            cols: n,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = scale · lhs · rhs`, or `dst += scale · lhs · rhs` when `accumulate`; `dst` is row-major
/// with row stride `dst_rs` (at least `rhs.cols`). Runs on rayon's threads.
pub fn matmul(dst: &mut [f32], dst_rs: usize, lhs: View, rhs: View, scale: f32, accumulate: bool) {
    product(
        dst,
        dst_rs,
        lhs,
        rhs,
        scale,
        accumulate,
        rayon::current_num_threads(),
    );
}

/// `x` (m, k) times the transpose of an f32 weight `w` (n, k): the very gemm call candle's
/// matmul makes for `x.matmul(&w.t())` (the same arguments, `wᵀ` a strided view). Every f32
/// prompt product goes through here, over the f32 copy or over a weight expanded from blocks
/// ([`matmul_t_expanded`]), so the two give the same bits by construction.
pub fn matmul_t(x: &[f32], m: usize, w: &[f32], (n, k): (usize, usize)) -> Vec<f32> {
    let mut y = zeros(m * n);
    matmul(
        &mut y,
        n,
        View::rows(x, m, k),
        View::rows(w, n, k).t(),
        1.0,
        false,
    );
    y
}

/// `x` (m, k) times the transpose of a weight (n, k) held in a compact form (the checkpoint's
/// blocks, bf16) that `expand` writes out in f32, row-major: the weight expanded into the calling
/// thread's [`with_expanded`] buffer, then [`matmul_t`], so the result is an f32 copy's to the
/// bit.
pub fn matmul_t_expanded(
    x: &[f32],
    m: usize,
    (n, k): (usize, usize),
    expand: impl Fn(&mut [f32]),
) -> Vec<f32> {
    with_expanded(n * k, |weight| {
        expand(weight);
        matmul_t(x, m, weight, (n, k))
    })
}

/// Calls `f` with `len` values of a buffer the calling thread keeps between calls, for a weight
/// expanded from a compact form (GGUF or NF4 blocks, bf16): `f` must write every value it reads,
/// since they hold what the last caller left. With one fresh allocation per product, zeroed (on
/// the calling thread, while the pool waits) and faulted in page by page, prompts over blocks ran
/// 8-15% slower than over the f32 copy. More than [`EXPANDED_KEPT`] values get a buffer of their
/// own, so a model's largest matrix (the output projection) does not stay expanded.
pub fn with_expanded<T>(len: usize, f: impl FnOnce(&mut [f32]) -> T) -> T {
    use std::cell::RefCell;
    thread_local! {
        static EXPANDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    EXPANDED.with(|cell| match cell.try_borrow_mut() {
        // Busy only if a rayon worker, waiting inside a product, took on another one.
        Ok(mut buf) if len <= EXPANDED_KEPT => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        _ => f(&mut zeros(len)),
    })
}

/// The most values [`with_expanded`] keeps between calls (64 MiB): every projection of a model
/// up to a few billion parameters.
const EXPANDED_KEPT: usize = 16 << 20;

/// [`matmul`] on the calling thread alone, for products inside a parallel task.
pub fn matmul_serial(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View,
    rhs: View,
    scale: f32,
    accumulate: bool,
) {
    product(dst, dst_rs, lhs, rhs, scale, accumulate, 1);
}

fn product(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View,
    rhs: View,
    scale: f32,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "matmul: inner dimensions differ");
    assert!(
        lhs.fits() && rhs.fits(),
        "matmul: a view reaches past its data"
    );
    assert!(
        dst_rs >= n && (m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len()),
        "matmul: the destination is too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every element the product reads or writes lies inside the slices, as checked
    // above, and `dst` is borrowed mutably, so it overlaps neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: View, b: View) -> Vec<f32> {
        let mut out = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|p| a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_views_multiply_and_accumulate() {
        let a: Vec<f32> = (0..35).map(|i| (i as f32 * 0.3).sin()).collect();
        let b: Vec<f32> = (0..40).map(|i| (i as f32 * 0.7).cos()).collect();
        let lhs = View::rows(&a, 5, 7);
        let rhs = View::rows(&b, 7, 5).cols_range(1, 4); // (7, 4), a column block
        let want = naive(lhs.t().t(), rhs);
        let lhs_t = View::rows(&a, 7, 5).t(); // a different (5, 7) matrix
        let mut dst = vec![1f32; 5 * 6];
        matmul(&mut dst, 6, lhs, rhs, 2.0, true);
        for i in 0..5 {
            for j in 0..4 {
                let got = dst[i * 6 + j];
                assert!((got - (1.0 + 2.0 * want[i * 4 + j])).abs() < 1e-4);
            }
            assert_eq!(dst[i * 6 + 4], 1.0, "columns past n are untouched");
        }
        let mut dst = vec![9f32; 5 * 4];
        matmul(&mut dst, 4, lhs_t, rhs, 1.0, false);
        for (g, w) in dst.iter().zip(naive(lhs_t, rhs)) {
            assert!((g - w).abs() < 1e-4);
        }
    }
}
