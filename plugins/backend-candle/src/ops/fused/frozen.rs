//! Frozen weights and the product with one, differentiable in its input only.

use super::*;
use crate::ops::blocks::BlockMatrix;

/// A frozen weight (out, in) that products read without a gradient of its own.
#[derive(Clone)]
pub enum Frozen {
    /// Row-major f32.
    Dense(Tensor),
    /// NF4, decoded one tile of rows at a time (no full-precision copy is ever made).
    Nf4(Arc<Nf4Matrix>),
    /// NF4 as tensors on any device, for the portable path (tensor ops, not the ops here).
    Nf4Tensors(Arc<Nf4Tensors>),
    /// The checkpoint's own quantized blocks (GGUF Q4_1, Q8_0), decoded one tile of rows at a
    /// time into exactly the values of the f32 copy the loader makes (see `ops::blocks`).
    Blocks(Arc<BlockMatrix>),
}

impl Frozen {
    /// (out, in).
    pub fn dims(&self) -> R<(usize, usize)> {
        match self {
            Frozen::Dense(w) => w.dims2(),
            Frozen::Nf4(q) => Ok((q.rows, q.cols)),
            Frozen::Nf4Tensors(q) => Ok(q.dims()),
            Frozen::Blocks(b) => Ok((b.rows, b.cols)),
        }
    }

    /// The whole weight (out, in) as one tensor, for the portable path: an NF4 weight is
    /// dequantized for the length of one product.
    pub fn weight(&self) -> R<Tensor> {
        match self {
            Frozen::Dense(w) => Ok(w.clone()),
            Frozen::Nf4(q) => Tensor::from_vec(q.dequantize(), (q.rows, q.cols), &Device::Cpu),
            Frozen::Nf4Tensors(q) => q.dequantize(),
            Frozen::Blocks(b) => Tensor::from_vec(b.dequantize(), (b.rows, b.cols), &Device::Cpu),
        }
    }

    /// Calls `f` with each block of rows of the weight, as (first row, rows, values): `per_tile`
    /// rows decoded at a time (an f32 weight is one block).
    pub fn tiles(&self, per_tile: usize, mut f: impl FnMut(usize, usize, &[f32])) -> R<()> {
        match self {
            Frozen::Dense(w) => {
                let (out, inp) = w.dims2()?;
                let (storage, layout) = w.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("frozen weights must live on the CPU");
                };
                let data = input(cpu, layout, "frozen weight")?;
                f(0, out, &data[..out * inp]);
            }
            Frozen::Nf4(q) => {
                decoded_tiles(q.rows, q.cols, per_tile, |r, t| q.dequantize_rows(r, t), f)
            }
            Frozen::Blocks(b) => {
                decoded_tiles(b.rows, b.cols, per_tile, |r, t| b.dequantize_rows(r, t), f)
            }
            Frozen::Nf4Tensors(_) => {
                candle_core::bail!(
                    "NF4 tensors are multiplied by the portable path, not the fused CPU ops"
                )
            }
        }
        Ok(())
    }
}

/// Calls `f` with each tile of `per_tile` rows of a (rows, cols) weight that
/// `decode(first row, tile)` expands, every value, into the thread's kept buffer
/// ([`crate::ops::matmul::with_expanded`]: no memset per product).
fn decoded_tiles(
    rows: usize,
    cols: usize,
    per_tile: usize,
    decode: impl Fn(usize, &mut [f32]),
    mut f: impl FnMut(usize, usize, &[f32]),
) {
    crate::ops::matmul::with_expanded(per_tile.min(rows) * cols, |buf| {
        for (first, n) in tile_rows(rows, per_tile) {
            let tile = &mut buf[..n * cols];
            decode(first, tile);
            f(first, n, tile);
        }
    })
}

impl Frozen {
    /// The NF4 matrix, if this is one whose tiles bf16 products can read from its codes
    /// directly ([`crate::ops::bf16::PackedB::nf4_transposed`] and `nf4_rows`): rows starting on
    /// quantization blocks, and every tile of rows a multiple of 32 (the kernels' blocks).
    fn nf4_in_bf16_tiles(&self) -> Option<&Nf4Matrix> {
        match self {
            Frozen::Nf4(q)
                if crate::ops::bf16::PackedB::reads_nf4(q) && q.rows.is_multiple_of(32) =>
            {
                Some(q)
            }
            _ => None,
        }
    }

    /// `y` (m, out) = `x` (m, in) · Wᵀ; with `bf16`, in bf16 where the CPU has a kernel for it
    /// (see [`crate::ops::bf16`]).
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32], bf16: bool) -> R<()> {
        use crate::ops::bf16::{fits, matmul as bf16_matmul, PackedA, PackedB};
        let (out, inp) = self.dims()?;
        let xv = View::rows(x, m, inp);
        let packed = (bf16 && crate::ops::bf16::available()).then(|| PackedA::new(xv));
        if let (Some(a), Some(q)) = (&packed, self.nf4_in_bf16_tiles()) {
            for (first, rows) in tile_rows(out, TILE_ROWS) {
                let b = PackedB::nf4_transposed(q, first, rows);
                bf16_matmul(&mut y[first..], out, a, &b, false);
            }
            return Ok(());
        }
        let per_tile = match packed {
            Some(_) => TILE_ROWS,
            None => f32_tile_rows(inp),
        };
        self.tiles(per_tile, |first, rows, w| match &packed {
            Some(a) if fits(inp, rows) => {
                let b = PackedB::transposed(w, rows, inp);
                bf16_matmul(&mut y[first..], out, a, &b, false);
            }
            _ => {
                let w = View::rows(w, rows, inp).t();
                matmul(&mut y[first..], out, xv, w, 1.0, false);
            }
        })
    }

    /// `dx` (m, in) += `dy` (m, out) · W; with `bf16`, in bf16 where the CPU has a kernel.
    pub fn backward(&self, dy: &[f32], m: usize, dx: &mut [f32], bf16: bool) -> R<()> {
        use crate::ops::bf16::{fits, matmul as bf16_matmul, PackedA, PackedB};
        let (out, inp) = self.dims()?;
        let low = bf16 && crate::ops::bf16::available();
        if let Some(q) = self.nf4_in_bf16_tiles().filter(|_| low) {
            for (first, rows) in tile_rows(out, TILE_ROWS) {
                let a = PackedA::new(View::rows(dy, m, out).cols_range(first, rows));
                bf16_matmul(dx, inp, &a, &PackedB::nf4_rows(q, first, rows), true);
            }
            return Ok(());
        }
        let per_tile = if low { TILE_ROWS } else { f32_tile_rows(inp) };
        self.tiles(per_tile, |first, rows, w| {
            let dy = View::rows(dy, m, out).cols_range(first, rows);
            if low && fits(rows, inp) {
                let a = PackedA::new(dy);
                bf16_matmul(dx, inp, &a, &PackedB::rows(w, rows, inp), true);
            } else {
                matmul(dx, inp, dy, View::rows(w, rows, inp), 1.0, true);
            }
        })
    }
}

/// `y = x · Wᵀ` for a frozen weight, differentiable in `x` only: candle's matmul backward would
/// also compute a weight-sized gradient nobody reads (for the tied output projection, 49152 x 576
/// per step), and a dequantized NF4 weight would be a full-precision copy. Inference uses it too
/// for NF4 and block weights, with the few-row kernel of decoding.
#[derive(Clone)]
pub struct FrozenLinear(pub Frozen);

impl FrozenLinear {
    pub fn forward(&self, x: &Tensor) -> R<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }

    /// `x` (m, in) · Wᵀ over slices, in f32: the op's forward pass.
    pub(super) fn product(&self, x: &[f32], m: usize) -> R<Vec<f32>> {
        let (out, inp) = self.0.dims()?;
        let mut y = zeros(m * out);
        if m <= crate::ops::kernels::SKINNY_MAX_ROWS {
            // Decoding: each weight row read once, dotted with the few input rows; the kernel
            // gives rows `first..` of the output transposed.
            let mut put = |first: usize, yt: Vec<f32>| {
                for (j, col) in yt.chunks(m).enumerate() {
                    for (i, v) in col.iter().enumerate() {
                        y[i * out + first + j] = *v;
                    }
                }
            };
            match &self.0 {
                // Block rows are expanded into L1 as the kernel reaches them.
                Frozen::Blocks(b) => {
                    put(0, crate::ops::kernels::skinny_matmul(x, m, inp, &**b, out))
                }
                frozen => frozen.tiles(TILE_ROWS, |first, rows, w| {
                    put(
                        first,
                        crate::ops::kernels::skinny_matmul(x, m, inp, w, rows),
                    )
                })?,
            }
        } else {
            self.0.forward(x, m, &mut y, false)?;
        }
        Ok(y)
    }

    /// Adds the input's gradient for the output gradient `dy` (m, out) into `dx` (m, in).
    pub(super) fn product_backward(&self, dy: &[f32], m: usize, dx: &mut [f32]) -> R<()> {
        self.0.backward(dy, m, dx, false)
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> R<(CpuStorage, Shape)> {
        let (out, inp) = self.0.dims()?;
        let x = input(storage, layout, self.name())?;
        let dims = layout.shape().dims();
        if dims.last() != Some(&inp) {
            candle_core::bail!("frozen-linear: input {dims:?} does not fit a {out}x{inp} weight");
        }
        let y = self.product(x, x.len() / inp)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked") = out;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> R<Option<Tensor>> {
        let (_, inp) = self.0.dims()?;
        let dy = Values::of(grad)?;
        let m = x.elem_count() / inp;
        let mut dx = zeros(m * inp);
        self.product_backward(&dy, m, &mut dx)?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}
