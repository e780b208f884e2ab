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
//! Training runs each layer as two ops built from those ([`SelfAttention`], [`SwiGluMlp`]),
//! which keep less still: their input and the projections a product would recompute. The
//! one-step ops ([`LoraLinear`], [`CausalAttention`], [`SwiGlu`]) remain the pieces they are
//! made of, and in the tests the composition they must match bit for bit.
//!
//! Each op is checked against the same function composed of candle ops, values and gradients.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::matmul::{matmul, matmul_serial, View};
use crate::ops::nf4::Nf4Matrix;
use crate::ops::portable::Nf4Tensors;
use crate::ops::zeros::zeros;
use crate::train::lora::apply_dropout;

type R<T> = candle_core::Result<T>;

/// Output rows of a weight decoded at once into bf16 panels for the bf16 kernels, or into f32 for
/// the few-row kernel of decoding: enough for the product to run well, small enough to stay in
/// cache (256 x 1536 is 0.75 MiB of bf16, 1.5 MiB of f32).
pub(crate) const TILE_ROWS: usize = 256;
// Every tile but the last is a whole number of the bf16 kernels' 32-row blocks, and starts on an
// NF4 quantization block whatever the width.
const _: () = assert!(TILE_ROWS.is_multiple_of(64));

/// The values of a weight decoded into f32 at once for a gemm (4 MiB), unless 64 rows hold more:
/// a whole projection of a model of SmolLM2's size, a few tiles of a larger one's, and the
/// output projection in tiles. Fewer, larger gemm calls pack their operands and wake the pool
/// fewer times: a training step's gemm calls took about 10% less time in all over whole
/// projections than over 256-row tiles (two AVX2 cores, each call timed).
const F32_TILE_VALUES: usize = 1 << 20;

/// Rows per tile of a weight with `cols` columns decoded into f32 for a gemm: a multiple of 64
/// (so a tile starts on an NF4 quantization block whatever the width) within
/// [`F32_TILE_VALUES`], and at least 64.
fn f32_tile_rows(cols: usize) -> usize {
    (F32_TILE_VALUES / cols.max(1) / 64 * 64).max(64)
}

/// The tiles of a weight with `rows` rows, `per_tile` rows each but the last, as (first row,
/// rows).
fn tile_rows(rows: usize, per_tile: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(per_tile)
        .map(move |first| (first, per_tile.min(rows - first)))
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

mod attention;
mod cached_attention;
mod cross_entropy;
mod frozen;
mod layer_half;
mod lora_linear;
mod mlp;
mod rms_norm;
mod self_attention;
mod swiglu;
#[cfg(test)]
mod tests;

pub use attention::{CausalAttention, RopeTable};
pub use cached_attention::{CacheInputs, CachedAttention};
pub use cross_entropy::CrossEntropy;
pub use frozen::{Frozen, FrozenLinear};
pub use layer_half::{Adapter, LayerProjection};
pub use lora_linear::LoraLinear;
pub use mlp::SwiGluMlp;
pub use rms_norm::RmsNorm;
pub use self_attention::SelfAttention;
pub use swiglu::{SiluMul, SwiGlu};
