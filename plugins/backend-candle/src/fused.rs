//! Training ops with hand-written backward passes.
//!
//! Composed from candle's primitive ops, one transformer layer is a few hundred small tensors,
//! each kept alive by autograd until the backward pass and each a pass over memory of its own.
//! The ops here fuse what belongs together (a frozen projection with its LoRA adapter, rotary
//! embedding with causal attention, RMSNorm, SwiGLU), compute in parallel on slices, and keep
//! for the backward pass only their inputs: cheap intermediates (dropout masks, the adapter's
//! rank-r activations, attention probabilities) are recomputed there. A layer's graph is then
//! small enough that a short micro-batch can keep the whole graph instead of recomputing every
//! layer (see `trainer::loss_and_grads`).
//!
//! Each op is checked against the same function composed of candle ops, values and gradients.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::lora::apply_dropout;
use crate::matmul::{matmul, matmul_serial, View};
use crate::nf4::Nf4Matrix;
use crate::portable::Nf4Tensors;

type R<T> = candle_core::Result<T>;

/// Output rows of an NF4 weight decoded at once (into f32 for gemm, or straight into bf16 panels
/// for the bf16 kernels): enough for the product to run well, small enough to stay in cache
/// (256 x 1536 f32 is 1.5 MiB).
const TILE_ROWS: usize = 256;
// Every tile but the last is a whole number of the bf16 kernels' 32-row blocks.
const _: () = assert!(TILE_ROWS.is_multiple_of(32));

/// The tiles of a weight with `rows` rows, as (first row, rows).
fn tile_rows(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(TILE_ROWS)
        .map(move |first| (first, TILE_ROWS.min(rows - first)))
}

/// Elements per parallel task of the element-wise ops.
const CHUNK: usize = 8 * 1024;

/// The contiguous f32 data of a custom op's input.
fn input<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> R<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op} needs contiguous inputs")))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// A tensor's values, row-major.
fn values(t: &Tensor) -> R<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// A tensor's values, row-major, read in place when it is a contiguous f32 tensor on the CPU
/// (the inputs and gradients that backward passes read nearly always are), else copied: a copy
/// of each would be a pass over memory on the calling thread, about a gigabyte a training step.
/// The storage stays read-locked while this lives; nothing writes tensors during a backward pass.
enum Values<'a> {
    InPlace(candle_core::StorageRef<'a>, std::ops::Range<usize>),
    Copied(Vec<f32>),
}

impl<'a> Values<'a> {
    fn of(t: &'a Tensor) -> R<Self> {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(_)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(Values::InPlace(storage, start..end));
        }
        drop(storage);
        Ok(Values::Copied(values(t)?))
    }
}

impl std::ops::Deref for Values<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Values::InPlace(storage, range) => match &**storage {
                candle_core::Storage::Cpu(CpuStorage::F32(v)) => &v[range.clone()],
                _ => unreachable!("Values::of borrows CPU f32 storage only"),
            },
            Values::Copied(v) => v,
        }
    }
}

fn tensor(data: Vec<f32>, shape: &Shape) -> R<Tensor> {
    Tensor::from_vec(data, shape.clone(), &Device::Cpu)
}

/// A frozen weight (out, in) that products read without a gradient of its own.
#[derive(Clone)]
pub enum Frozen {
    /// Row-major f32.
    Dense(Tensor),
    /// NF4, decoded one tile of rows at a time (no full-precision copy is ever made).
    Nf4(Arc<Nf4Matrix>),
    /// NF4 as tensors on any device, for the portable path (tensor ops, not the ops here).
    Nf4Tensors(Arc<Nf4Tensors>),
}

impl Frozen {
    /// (out, in).
    pub fn dims(&self) -> R<(usize, usize)> {
        match self {
            Frozen::Dense(w) => w.dims2(),
            Frozen::Nf4(q) => Ok((q.rows, q.cols)),
            Frozen::Nf4Tensors(q) => Ok(q.dims()),
        }
    }

    /// The whole weight (out, in) as one tensor, for the portable path: an NF4 weight is
    /// dequantized for the length of one product.
    pub fn weight(&self) -> R<Tensor> {
        match self {
            Frozen::Dense(w) => Ok(w.clone()),
            Frozen::Nf4(q) => Tensor::from_vec(q.dequantize(), (q.rows, q.cols), &Device::Cpu),
            Frozen::Nf4Tensors(q) => q.dequantize(),
        }
    }

    /// Calls `f` with each block of rows of the weight, as (first row, rows, values).
    pub fn tiles(&self, mut f: impl FnMut(usize, usize, &[f32])) -> R<()> {
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
                let mut buf = vec![0f32; TILE_ROWS.min(q.rows) * q.cols];
                for (first, rows) in tile_rows(q.rows) {
                    let tile = &mut buf[..rows * q.cols];
                    q.dequantize_rows(first, tile);
                    f(first, rows, tile);
                }
            }
            Frozen::Nf4Tensors(_) => {
                candle_core::bail!(
                    "NF4 tensors are multiplied by the portable path, not the fused CPU ops"
                )
            }
        }
        Ok(())
    }

    /// The NF4 matrix, if this is one whose tiles bf16 products can read from its codes
    /// directly ([`crate::bf16::PackedB::nf4_transposed`] and `nf4_rows`): rows starting on
    /// quantization blocks, and every tile of rows a multiple of 32 (the kernels' blocks).
    fn nf4_in_bf16_tiles(&self) -> Option<&Nf4Matrix> {
        match self {
            Frozen::Nf4(q) if crate::bf16::PackedB::reads_nf4(q) && q.rows.is_multiple_of(32) => {
                Some(q)
            }
            _ => None,
        }
    }

    /// `y` (m, out) = `x` (m, in) · Wᵀ; with `bf16`, in bf16 where the CPU has a kernel for it
    /// (see [`crate::bf16`]).
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32], bf16: bool) -> R<()> {
        use crate::bf16::{fits, matmul as bf16_matmul, PackedA, PackedB};
        let (out, inp) = self.dims()?;
        let xv = View::rows(x, m, inp);
        let packed = (bf16 && crate::bf16::available()).then(|| PackedA::new(xv));
        if let (Some(a), Some(q)) = (&packed, self.nf4_in_bf16_tiles()) {
            for (first, rows) in tile_rows(out) {
                let b = PackedB::nf4_transposed(q, first, rows);
                bf16_matmul(&mut y[first..], out, a, &b, false);
            }
            return Ok(());
        }
        self.tiles(|first, rows, w| match &packed {
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
        use crate::bf16::{fits, matmul as bf16_matmul, PackedA, PackedB};
        let (out, inp) = self.dims()?;
        let low = bf16 && crate::bf16::available();
        if let Some(q) = self.nf4_in_bf16_tiles().filter(|_| low) {
            for (first, rows) in tile_rows(out) {
                let a = PackedA::new(View::rows(dy, m, out).cols_range(first, rows));
                bf16_matmul(dx, inp, &a, &PackedB::nf4_rows(q, first, rows), true);
            }
            return Ok(());
        }
        self.tiles(|first, rows, w| {
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
/// for NF4 weights, with the few-row kernel of decoding.
#[derive(Clone)]
pub struct FrozenLinear(pub Frozen);

impl FrozenLinear {
    pub fn forward(&self, x: &Tensor) -> R<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
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
        let m = x.len() / inp;
        let mut y = vec![0f32; m * out];
        if m <= crate::kernels::SKINNY_MAX_ROWS {
            // Decoding: each weight row read once, dotted with the few input rows.
            self.0.tiles(|first, rows, w| {
                let yt = crate::kernels::skinny_matmul(x, m, inp, w, rows);
                for (j, col) in yt.chunks(m).enumerate() {
                    for (i, v) in col.iter().enumerate() {
                        y[i * out + first + j] = *v;
                    }
                }
            })?;
        } else {
            self.0.forward(x, m, &mut y, false)?;
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked") = out;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> R<Option<Tensor>> {
        let (_, inp) = self.0.dims()?;
        let dy = Values::of(grad)?;
        let m = x.elem_count() / inp;
        let mut dx = vec![0f32; m * inp];
        self.0.backward(&dy, m, &mut dx, false)?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// A frozen projection with a LoRA adapter: `y = x · Wᵀ + scale · dropout(x) · Aᵀ · Bᵀ`, as one
/// op on (x, A, B). The backward pass gives gradients to x, A and B and rebuilds the dropout
/// mask from `seed` and the rank-r activations from x.
#[derive(Clone)]
pub struct LoraLinear {
    pub base: Frozen,
    pub scale: f32,
    /// Dropout probability; 0 outside training.
    pub dropout: f32,
    pub seed: u64,
    /// The products in bf16 (where the CPU has a bf16 kernel and the shapes fit it).
    pub bf16: bool,
}

impl LoraLinear {
    /// Applies the op to `x` (.., in) with A (r, in) and B (out, r).
    pub fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> R<Tensor> {
        x.contiguous()?
            .apply_op3(&a.contiguous()?, &b.contiguous()?, self.clone())
    }

    /// The product the adapter's matrices take: bf16 with the frozen ones (as QLoRA's bf16
    /// compute dtype does), else f32.
    fn adapter_product(&self) -> fn(&mut [f32], usize, View, View, f32, bool) {
        if self.bf16 {
            crate::bf16::product
        } else {
            matmul
        }
    }

    /// The adapter's input: x with dropout applied, or x itself.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        if self.dropout <= 0.0 {
            return std::borrow::Cow::Borrowed(x);
        }
        let mut xd = vec![0f32; x.len()];
        apply_dropout(&mut xd, x, self.dropout, self.seed, false);
        std::borrow::Cow::Owned(xd)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let (out, inp) = self.base.dims()?;
        let x = input(s1, l1, self.name())?;
        let a = input(s2, l2, self.name())?;
        let b = input(s3, l3, self.name())?;
        let r = l2.shape().dims2()?.0;
        if l1.shape().dims().last() != Some(&inp) || l3.shape().dims2()? != (out, r) {
            candle_core::bail!(
                "lora-linear: input {:?}, A {:?}, B {:?} do not fit a {out}x{inp} weight",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let m = x.len() / inp;
        let mm = self.adapter_product();
        let mut y = vec![0f32; m * out];
        self.base.forward(x, m, &mut y, self.bf16)?;
        let xd = self.dropped(x);
        let mut u = vec![0f32; m * r];
        mm(
            &mut u,
            r,
            View::rows(&xd, m, inp),
            View::rows(a, r, inp).t(),
            1.0,
            false,
        );
        let bt = View::rows(b, out, r).t();
        mm(&mut y, out, View::rows(&u, m, r), bt, self.scale, true);
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("checked") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = self.base.dims()?;
        let r = a.dim(0)?;
        let (xs, av, bv, dy) = (
            Values::of(x)?,
            Values::of(a)?,
            Values::of(b)?,
            Values::of(grad)?,
        );
        let m = xs.len() / inp;
        let mm = self.adapter_product();
        let mut dx = vec![0f32; m * inp];
        self.base.backward(&dy, m, &mut dx, self.bf16)?;
        let xd = self.dropped(&xs);
        let mut u = vec![0f32; m * r];
        mm(
            &mut u,
            r,
            View::rows(&xd, m, inp),
            View::rows(&av, r, inp).t(),
            1.0,
            false,
        );
        let dyv = View::rows(&dy, m, out);
        // dB = scale · dyᵀ · u;  du = scale · dy · B;  dA = duᵀ · xd;  dx += mask ⊙ (du · A).
        let mut db = vec![0f32; out * r];
        mm(&mut db, r, dyv.t(), View::rows(&u, m, r), self.scale, false);
        let mut du = vec![0f32; m * r];
        mm(&mut du, r, dyv, View::rows(&bv, out, r), self.scale, false);
        let mut da = vec![0f32; r * inp];
        mm(
            &mut da,
            inp,
            View::rows(&du, m, r).t(),
            View::rows(&xd, m, inp),
            1.0,
            false,
        );
        let av = View::rows(&av, r, inp);
        if self.dropout <= 0.0 {
            mm(&mut dx, inp, View::rows(&du, m, r), av, 1.0, true);
        } else {
            let mut dxd = vec![0f32; m * inp];
            mm(&mut dxd, inp, View::rows(&du, m, r), av, 1.0, false);
            apply_dropout(&mut dx, &dxd, self.dropout, self.seed, true);
        }
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(da, a.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}

/// RMSNorm with a frozen weight: `y = w ⊙ x / sqrt(mean(x²) + eps)` over the last dimension.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> R<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> R<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let w = values(&self.weight)?;
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let r = inv_rms(x, self.eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(&w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> R<Option<Tensor>> {
        let (xs, dy, w) = (Values::of(x)?, Values::of(grad)?, Values::of(&self.weight)?);
        let n = w.len();
        let mut dx = vec![0f32; xs.len()];
        // With r = 1/sqrt(mean(x²) + eps) and g = dy ⊙ w: dx = r · (g - x · r² · mean(g ⊙ x)).
        dx.par_chunks_mut(n)
            .zip(xs.par_chunks(n).zip(dy.par_chunks(n)))
            .for_each(|(dx, (x, dy))| {
                let r = inv_rms(x, self.eps);
                let gx: f32 = x
                    .iter()
                    .zip(dy)
                    .zip(w.iter())
                    .map(|((x, d), w)| x * d * w)
                    .sum();
                let c = r * r * gx / n as f32;
                for (((dx, x), dy), w) in dx.iter_mut().zip(x).zip(dy).zip(w.iter()) {
                    *dx = r * (dy * w - x * c);
                }
            });
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// SwiGLU's gate: `silu(g) ⊙ u`.
#[derive(Clone, Copy)]
pub struct SwiGlu;

impl SwiGlu {
    pub fn forward(g: &Tensor, u: &Tensor) -> R<Tensor> {
        g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let (g, u) = (input(s1, l1, self.name())?, input(s2, l2, self.name())?);
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "swiglu: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(*g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let (gs, us, dy) = (Values::of(g)?, Values::of(u)?, Values::of(grad)?);
        let mut dg = vec![0f32; gs.len()];
        let mut du = vec![0f32; gs.len()];
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(
                gs.par_chunks(CHUNK)
                    .zip(us.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))),
            )
            .for_each(|((dg, du), (g, (u, dy)))| {
                for i in 0..g.len() {
                    let s = sigmoid(g[i]);
                    du[i] = dy[i] * g[i] * s;
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            });
        Ok((Some(tensor(dg, g.shape())?), Some(tensor(du, u.shape())?)))
    }
}

/// A rotary table: d/2 values per position, positions 0.. .
pub type RopeTable = Arc<Vec<f32>>;

/// What one key head's backward task produces: dq of each of its query heads, dk, dv.
type GroupGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Causal grouped-query attention with rotary embeddings, for sequences that start at position
/// 0 with no cache: q (B, T, heads·d), k and v (B, T, kv_heads·d), as the projections emit
/// them, to y (B, T, heads·d). Rotate-half rotary tables `cos`/`sin` hold d/2 values per
/// position, positions 0.. . Padding at the end of a row is harmless: causality keeps it out of
/// every real position.
#[derive(Clone)]
pub struct CausalAttention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub cos: RopeTable,
    pub sin: RopeTable,
}

/// One head's rows of a (B, T, H·d) tensor: (T, d).
fn head_rows(src: &[f32], b: usize, t: usize, heads: usize, d: usize, h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * d);
    for p in 0..t {
        let at = ((b * t + p) * heads + h) * d;
        out.extend_from_slice(&src[at..at + d]);
    }
    out
}

/// Writes one head's rows (T, d) back into a (B, T, H·d) tensor.
fn put_head(dst: &mut [f32], rows: &[f32], b: usize, t: usize, heads: usize, d: usize, h: usize) {
    for p in 0..t {
        let at = ((b * t + p) * heads + h) * d;
        dst[at..at + d].copy_from_slice(&rows[p * d..(p + 1) * d]);
    }
}

impl CausalAttention {
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> R<Tensor> {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, self.clone())
    }

    /// Rotates each row (position p) of `x` (T, d) in place; `inverse` applies the transpose
    /// (the backward pass of the rotation).
    fn rotate(&self, x: &mut [f32], inverse: bool) {
        let d = self.head_dim;
        let half = d / 2;
        for (p, row) in x.chunks_mut(d).enumerate() {
            let (c, s) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            let (x1, x2) = row.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                if inverse {
                    x1[i] = a * c[i] + b * s[i];
                    x2[i] = b * c[i] - a * s[i];
                } else {
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[i] + a * s[i];
                }
            }
        }
    }

    /// Causal softmax probabilities P (T, T) of rotated, scaled queries against rotated keys:
    /// row p holds p + 1 probabilities, then zeros.
    fn probs(&self, qr: &[f32], kr: &[f32], t: usize) -> Vec<f32> {
        let d = self.head_dim;
        let mut p = vec![0f32; t * t];
        matmul_serial(
            &mut p,
            t,
            View::rows(qr, t, d),
            View::rows(kr, t, d).t(),
            1.0,
            false,
        );
        for (i, row) in p.chunks_mut(t).enumerate() {
            let (live, masked) = row.split_at_mut(i + 1);
            let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0;
            for v in live.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in live.iter_mut() {
                *v /= sum;
            }
            masked.fill(0.0);
        }
        p
    }

    /// Rotated, scaled queries of head h and rotated keys of its key head, each (T, d).
    fn rotated(&self, q: &[f32], k: &[f32], b: usize, t: usize, h: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.head_dim;
        let g = h / (self.heads / self.kv_heads);
        let mut qr = head_rows(q, b, t, self.heads, d, h);
        self.rotate(&mut qr, false);
        let scale = 1.0 / (d as f32).sqrt();
        qr.iter_mut().for_each(|v| *v *= scale);
        let mut kr = head_rows(k, b, t, self.kv_heads, d, g);
        self.rotate(&mut kr, false);
        (qr, kr)
    }

    fn check(&self, q: &Layout, k: &Layout, v: &Layout) -> R<(usize, usize)> {
        let (b, t, qw) = q.shape().dims3()?;
        let d = self.head_dim;
        let ok = qw == self.heads * d
            && k.shape().dims3()? == (b, t, self.kv_heads * d)
            && v.shape().dims3()? == (b, t, self.kv_heads * d)
            && self.heads.is_multiple_of(self.kv_heads)
            && self.cos.len() >= t * d / 2
            && self.sin.len() >= t * d / 2;
        if !ok {
            candle_core::bail!(
                "causal-attention: q {:?}, k {:?}, v {:?} do not fit {} heads, {} key heads of {d}",
                q.shape(),
                k.shape(),
                v.shape(),
                self.heads,
                self.kv_heads
            );
        }
        Ok((b, t))
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        let (b, t) = self.check(l1, l2, l3)?;
        let (q, k, v) = (
            input(s1, l1, self.name())?,
            input(s2, l2, self.name())?,
            input(s3, l3, self.name())?,
        );
        let (nh, d) = (self.heads, self.head_dim);
        let rep = nh / self.kv_heads;
        let heads: Vec<Vec<f32>> = (0..b * nh)
            .into_par_iter()
            .map(|bh| {
                let (bi, h) = (bh / nh, bh % nh);
                let (qr, kr) = self.rotated(q, k, bi, t, h);
                let vr = head_rows(v, bi, t, self.kv_heads, d, h / rep);
                let p = self.probs(&qr, &kr, t);
                let mut y = vec![0f32; t * d];
                matmul_serial(
                    &mut y,
                    d,
                    View::rows(&p, t, t),
                    View::rows(&vr, t, d),
                    1.0,
                    false,
                );
                y
            })
            .collect();
        let mut y = vec![0f32; b * t * nh * d];
        for (bh, rows) in heads.iter().enumerate() {
            put_head(&mut y, rows, bh / nh, t, nh, d, bh % nh);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, _) = q.dims3()?;
        let (qs, ks, vs, dy) = (
            Values::of(q)?,
            Values::of(k)?,
            Values::of(v)?,
            Values::of(grad)?,
        );
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let rep = nh / nkv;
        let scale = 1.0 / (d as f32).sqrt();
        // One task per key head: it owns dk and dv of that head and dq of its query heads.
        let groups: Vec<GroupGrads> = (0..b * nkv)
            .into_par_iter()
            .map(|bg| {
                let (bi, g) = (bg / nkv, bg % nkv);
                let vr = head_rows(&vs, bi, t, nkv, d, g);
                let mut dk = vec![0f32; t * d];
                let mut dv = vec![0f32; t * d];
                let mut dqs = Vec::with_capacity(rep);
                let mut dp = vec![0f32; t * t];
                for h in g * rep..(g + 1) * rep {
                    let (qr, kr) = self.rotated(&qs, &ks, bi, t, h);
                    let dyh = head_rows(&dy, bi, t, nh, d, h);
                    let p = self.probs(&qr, &kr, t);
                    let (pv, dyv) = (View::rows(&p, t, t), View::rows(&dyh, t, d));
                    // dV += Pᵀ dY;  dP = dY Vᵀ;  dS = P ⊙ (dP - rowsum(P ⊙ dP));
                    // d(qr) = dS K;  d(kr) += dSᵀ qr.
                    matmul_serial(&mut dv, d, pv.t(), dyv, 1.0, true);
                    matmul_serial(&mut dp, t, dyv, View::rows(&vr, t, d).t(), 1.0, false);
                    for (i, (ds, pr)) in dp.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                        let mean: f32 = ds[..=i].iter().zip(&pr[..=i]).map(|(a, b)| a * b).sum();
                        for (v, pv) in ds[..=i].iter_mut().zip(&pr[..=i]) {
                            *v = pv * (*v - mean);
                        }
                        ds[i + 1..].fill(0.0);
                    }
                    let dsv = View::rows(&dp, t, t);
                    let mut dq = vec![0f32; t * d];
                    matmul_serial(&mut dq, d, dsv, View::rows(&kr, t, d), 1.0, false);
                    matmul_serial(&mut dk, d, dsv.t(), View::rows(&qr, t, d), 1.0, true);
                    // The queries were scaled after rotation.
                    dq.iter_mut().for_each(|v| *v *= scale);
                    self.rotate(&mut dq, true);
                    dqs.push(dq);
                }
                self.rotate(&mut dk, true);
                (dqs, dk, dv)
            })
            .collect();
        let mut dq = vec![0f32; qs.len()];
        let mut dk = vec![0f32; ks.len()];
        let mut dv = vec![0f32; vs.len()];
        for (bg, (dqs, dkg, dvg)) in groups.iter().enumerate() {
            let (bi, g) = (bg / nkv, bg % nkv);
            for (i, rows) in dqs.iter().enumerate() {
                put_head(&mut dq, rows, bi, t, nh, d, g * rep + i);
            }
            put_head(&mut dk, dkg, bi, t, nkv, d, g);
            put_head(&mut dv, dvg, bi, t, nkv, d, g);
        }
        Ok((
            Some(tensor(dq, q.shape())?),
            Some(tensor(dk, k.shape())?),
            Some(tensor(dv, v.shape())?),
        ))
    }
}

/// Mean cross-entropy of hidden states (N, H) through a frozen output projection (V, H) against
/// `targets`, as a scalar. The logits are made a few rows at a time and never kept: the gradient
/// to the hidden states, (softmax - one-hot) · W / N, is computed in the same pass and held for
/// the backward pass (N x H values instead of several N x V tensors).
#[derive(Clone)]
pub struct CrossEntropy {
    pub weight: Frozen,
    pub targets: Arc<Vec<u32>>,
    grad: Arc<std::sync::Mutex<Option<Vec<f32>>>>,
}

/// Rows of logits made at once (64 x 49152 f32 is 12 MiB). Each batch of rows reads the whole
/// output projection (113 MB for SmolLM2) twice, so fewer, larger batches move less memory.
const LOGIT_ROWS: usize = 64;

impl CrossEntropy {
    pub fn new(weight: Frozen, targets: Vec<u32>) -> Self {
        CrossEntropy {
            weight,
            targets: Arc::new(targets),
            grad: Arc::default(),
        }
    }

    pub fn forward(&self, hidden: &Tensor) -> R<Tensor> {
        hidden.contiguous()?.apply_op1(self.clone())
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> R<(CpuStorage, Shape)> {
        let h = input(storage, layout, self.name())?;
        let (vocab, dim) = self.weight.dims()?;
        let (n, hd) = layout.shape().dims2()?;
        if hd != dim || self.targets.len() != n || n == 0 {
            candle_core::bail!(
                "cross-entropy: {n} rows of {hd} for {} targets and a {vocab}x{dim} projection",
                self.targets.len()
            );
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("cross-entropy: target {t} is outside the vocabulary of {vocab}");
        }
        let mut grad = vec![0f32; n * dim];
        let mut logits = vec![0f32; LOGIT_ROWS.min(n) * vocab];
        let mut total = 0f64;
        for first in (0..n).step_by(LOGIT_ROWS) {
            let rows = LOGIT_ROWS.min(n - first);
            let z = &mut logits[..rows * vocab];
            self.weight
                .forward(&h[first * dim..(first + rows) * dim], rows, z, false)?;
            let losses: Vec<f64> = z
                .par_chunks_mut(vocab)
                .zip(&self.targets[first..first + rows])
                .map(|(z, &t)| {
                    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let sum: f64 = z.iter().map(|&v| f64::from((v - max).exp())).sum();
                    let lse = max as f64 + sum.ln();
                    let loss = lse - f64::from(z[t as usize]);
                    // z becomes (softmax - one-hot) / n, this row's gradient of the mean loss.
                    for v in z.iter_mut() {
                        *v = ((f64::from(*v) - lse).exp() / n as f64) as f32;
                    }
                    z[t as usize] -= 1.0 / n as f32;
                    loss
                })
                .collect();
            total += losses.iter().sum::<f64>();
            self.weight
                .backward(z, rows, &mut grad[first * dim..(first + rows) * dim], false)?;
        }
        *self
            .grad
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = Some(grad);
        let loss = (total / n as f64) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, hidden: &Tensor, _res: &Tensor, grad: &Tensor) -> R<Option<Tensor>> {
        let upstream = grad.to_scalar::<f32>()?;
        let saved = self
            .grad
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("cross-entropy: no forward pass".into()))?;
        let scaled: Vec<f32> = saved.iter().map(|g| g * upstream).collect();
        Ok(Some(tensor(scaled, hidden.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Var, D};

    #[test]
    fn lora_linear_in_bf16_stays_close_to_f32() {
        // Shapes that every product of the op takes in bf16 (inner sizes multiples of 32, outputs
        // of 16), the weight gradients dA and dB included.
        let (out, inp, r, m) = (48, 64, 32, 32);
        let w = crate::llama::testing::uniform(out * inp, 0.5, 7);
        let q = Arc::new(Nf4Matrix::quantize(&w, out, inp, true));
        let run = |bf16: bool| {
            let op = LoraLinear {
                base: Frozen::Nf4(q.clone()),
                scale: 0.5,
                dropout: 0.1,
                seed: 3,
                bf16,
            };
            let x = candle_core::Var::from_tensor(&rand(&[2, m, inp], 1)).unwrap();
            let a = candle_core::Var::from_tensor(&rand(&[r, inp], 2)).unwrap();
            let b = candle_core::Var::from_tensor(&rand(&[out, r], 3)).unwrap();
            let y = op.forward(&x, &a, &b).unwrap();
            let loss = (&y * rand(&[2, m, out], 4)).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let grad = |v: &candle_core::Var| grads.get(v).unwrap().clone();
            [y.clone(), grad(&x), grad(&a), grad(&b)]
        };
        let (low, full) = (run(true), run(false));
        if !crate::bf16::available() {
            eprintln!("no bf16 kernel on this machine: skipped");
            return;
        }
        for (what, (l, f)) in ["y", "dx", "dA", "dB"].iter().zip(low.iter().zip(&full)) {
            let (l, f) = (values(l).unwrap(), values(f).unwrap());
            // Equal values would mean the f32 path ran: the test would check nothing.
            assert_ne!(l, f, "{what} did not run in bf16");
            let diff: f32 = l.iter().zip(&f).map(|(a, b)| (a - b).powi(2)).sum();
            let norm: f32 = f.iter().map(|b| b * b).sum();
            let rel = (diff / norm).sqrt();
            // Operands keep 8 bits of mantissa: errors of a few parts in a thousand.
            assert!(rel < 1e-2, "{what}: {rel:.2e} off in relative norm");
            eprintln!("{what}: {rel:.2e} off in relative norm");
        }
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v = crate::llama::testing::uniform(n, 1.0, seed);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let (a, b) = (values(a).unwrap(), values(b).unwrap());
        assert_eq!(a.len(), b.len(), "{what}: sizes");
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0f32, f32::max);
        assert!(worst < tol, "{what}: off by {worst}");
    }

    /// Checks an op's value and its gradients against a composed reference on the same inputs,
    /// through a random linear read-out of the output.
    fn check(
        inputs: &[Tensor],
        fused: impl Fn(&[&Tensor]) -> Tensor,
        composed: impl Fn(&[&Tensor]) -> Tensor,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let (yf, yc) = (fused(&ts), composed(&ts));
        close(&yf, &yc, 1e-4, "value");
        let c = rand(yf.dims(), 99);
        let gf = (yf * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &c).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            close(
                gf.get(t).expect("fused gradient"),
                gc.get(t).expect("composed gradient"),
                1e-4,
                &format!("gradient of input {i}"),
            );
        }
    }

    #[test]
    fn lora_linear_matches_the_composed_layer_with_and_without_dropout() {
        let (out, inp, r, m) = (300, 64, 4, 5);
        let w = crate::llama::testing::uniform(out * inp, 0.5, 7);
        let q = Arc::new(Nf4Matrix::quantize(&w, out, inp, true));
        let deq = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
        let dense = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
        for (base, weight, dropout) in [
            (Frozen::Nf4(q.clone()), deq.clone(), 0.0),
            (Frozen::Nf4(q), deq, 0.25),
            (Frozen::Dense(dense.clone()), dense, 0.1),
        ] {
            let op = LoraLinear {
                base,
                scale: 2.0,
                dropout,
                seed: 11,
                bf16: false,
            };
            let inputs = [
                rand(&[2, m, inp], 1),
                rand(&[r, inp], 2),
                rand(&[out, r], 3),
            ];
            check(
                &inputs,
                |t| op.forward(t[0], t[1], t[2]).unwrap(),
                |t| {
                    let x = t[0].reshape((2 * m, inp)).unwrap();
                    let mask = crate::lora::dropout_mask(x.elem_count(), dropout, 11);
                    let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu).unwrap();
                    let xd = if dropout > 0.0 {
                        (&x * mask).unwrap()
                    } else {
                        x.clone()
                    };
                    let base = x.matmul(&weight.t().unwrap()).unwrap();
                    let lora = xd
                        .matmul(&t[1].t().unwrap())
                        .unwrap()
                        .matmul(&t[2].t().unwrap())
                        .unwrap();
                    (base + (lora * 2.0).unwrap())
                        .unwrap()
                        .reshape((2, m, out))
                        .unwrap()
                },
            );
        }
    }

    #[test]
    fn rms_norm_and_swiglu_match_candle() {
        let w = rand(&[48], 4);
        let op = RmsNorm {
            weight: w.clone(),
            eps: 1e-5,
        };
        check(
            &[rand(&[3, 5, 48], 5)],
            |t| op.forward(t[0]).unwrap(),
            |t| candle_nn::ops::rms_norm_slow(t[0], &w, 1e-5).unwrap(),
        );
        check(
            &[rand(&[4, 70], 6), rand(&[4, 70], 7)],
            |t| SwiGlu::forward(t[0], t[1]).unwrap(),
            |t| (candle_nn::ops::silu(t[0]).unwrap() * t[1]).unwrap(),
        );
    }

    #[test]
    fn causal_attention_matches_the_composed_attention() {
        let (b, t, nh, nkv, d) = (2, 7, 6, 2, 8);
        let half = d / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..t {
            for i in 0..half {
                let a = p as f32 / 10f32.powf(i as f32 / half as f32);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let op = CausalAttention {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            cos: Arc::new(cos.clone()),
            sin: Arc::new(sin.clone()),
        };
        let cos = Tensor::from_vec(cos, (1, 1, t, half), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(sin, (1, 1, t, half), &Device::Cpu).unwrap();
        let rope = |x: &Tensor| -> Tensor {
            let x1 = x.narrow(D::Minus1, 0, half).unwrap();
            let x2 = x.narrow(D::Minus1, half, half).unwrap();
            let r1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
            let r2 = (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
            Tensor::cat(&[r1, r2], D::Minus1).unwrap()
        };
        let mut mask = vec![0f32; t * t];
        for i in 0..t {
            for j in i + 1..t {
                mask[i * t + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        check(
            &[
                rand(&[b, t, nh * d], 8),
                rand(&[b, t, nkv * d], 9),
                rand(&[b, t, nkv * d], 10),
            ],
            |x| op.forward(x[0], x[1], x[2]).unwrap(),
            |x| {
                let split = |x: &Tensor, h: usize| {
                    x.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap()
                };
                let q = rope(&split(x[0], nh));
                let k = rope(&split(x[1], nkv));
                let v = split(x[2], nkv);
                let rep = nh / nkv;
                // Repeat each key head for its query heads: (B, nh, T, d).
                let expand = |x: &Tensor| {
                    x.unsqueeze(2)
                        .unwrap()
                        .expand((b, nkv, rep, t, d))
                        .unwrap()
                        .reshape((b, nh, t, d))
                        .unwrap()
                };
                let (k, v) = (expand(&k), expand(&v));
                let att = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
                let att = att.broadcast_add(&mask).unwrap();
                let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
                att.matmul(&v.contiguous().unwrap())
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, t, nh * d))
                    .unwrap()
            },
        );
    }

    #[test]
    fn cross_entropy_matches_log_softmax_and_gather() {
        let (n, h, v) = (70, 16, 40); // more rows than one batch of logits
        let w = rand(&[v, h], 12);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let op = CrossEntropy::new(Frozen::Dense(w.clone()), targets.clone());
        check(
            &[rand(&[n, h], 13)],
            |t| op.forward(t[0]).unwrap(),
            |t| {
                let logp =
                    candle_nn::ops::log_softmax(&t[0].matmul(&w.t().unwrap()).unwrap(), D::Minus1)
                        .unwrap();
                let idx = Tensor::new(targets.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap();
                (logp.gather(&idx, 1).unwrap().mean_all().unwrap() * -1.0).unwrap()
            },
        );
    }

    #[test]
    fn frozen_linear_matches_the_dense_layer_in_value_and_input_gradient() {
        // 300 output rows: two NF4 tiles, the second partial; few rows take the decoding kernel.
        let (out, inp) = (300, 64);
        let w = crate::llama::testing::uniform(out * inp, 0.5, 21);
        let q = Arc::new(Nf4Matrix::quantize(&w, out, inp, true));
        let deq = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
        let dense = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
        for (base, weight) in [(Frozen::Nf4(q), deq), (Frozen::Dense(dense.clone()), dense)] {
            let op = FrozenLinear(base);
            for m in [1usize, 3, 40] {
                check(
                    &[rand(&[m, inp], 22 + m as u64)],
                    |t| op.forward(t[0]).unwrap(),
                    |t| t[0].matmul(&weight.t().unwrap()).unwrap(),
                );
            }
        }
    }
}
