//! A named set of tensors in HF naming, taken out one by one as the model is built, so that a
//! name the model expects but the checkpoint lacks is reported by name.
//!
//! When the base is to be packed to NF4 (QLoRA training), each projection weight is quantized
//! the moment the loader hands it over, and its f32 values are dropped: at no point does a
//! full-precision copy of all projections exist. When it is to stay in the checkpoint's own
//! blocks, a projection's f32 copy is dropped as soon as its blocks are kept.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{BackendError, Result};
use crate::ops::blocks::BlockMatrix;
use crate::ops::nf4::Nf4Matrix;

/// A projection weight as the model will hold it.
pub enum Projection {
    F32(Tensor),
    Nf4(Arc<Nf4Matrix>),
    /// The checkpoint's own blocks, the only copy.
    Blocks(Arc<BlockMatrix>),
}

/// How projection weights are stored as the loader hands them over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// f32 (a GGUF's blocks kept beside, for decoding).
    F32,
    /// Packed to NF4 at once (with double quantization of the block maxima or not). With
    /// `tables_in_blocks` (on the CPU), the embedding and output projection are held in a GGUF's
    /// own blocks alone, as [`Packing::Blocks`] holds them: they are frozen and not quantized by
    /// QLoRA, their values are those of the f32 copy, and for SmolLM2 the copy was the largest
    /// part of a training step's memory (113 MB against 30 for its Q8_0 blocks).
    Nf4 {
        double_quant: bool,
        tables_in_blocks: bool,
    },
    /// In the GGUF's own blocks where it has a kind we keep, the f32 copy dropped (the
    /// embedding and output projection too).
    Blocks,
}

impl Packing {
    /// Whether the weight `name` is held in the checkpoint's blocks alone, where it has them.
    pub fn blocks_alone(self, name: &str) -> bool {
        match self {
            Packing::F32 => false,
            Packing::Nf4 {
                tables_in_blocks, ..
            } => tables_in_blocks && is_embedding(name),
            Packing::Blocks => is_projection(name) || is_embedding(name),
        }
    }
}

pub struct Weights {
    tensors: HashMap<String, Tensor>,
    packed: HashMap<String, Arc<Nf4Matrix>>,
    /// The checkpoint's quantized blocks of f32 tensors read from them, for decoding; a tensor
    /// changed after loading (an adapter merged, NF4 rounding) loses its blocks.
    blocks: HashMap<String, Arc<BlockMatrix>>,
    /// Projections held in their blocks alone ([`Packing::Blocks`]).
    block_projections: HashMap<String, Arc<BlockMatrix>>,
    packing: Packing,
}

/// Whether `name` is the weight of a linear projection (the layers QLoRA quantizes).
fn is_projection(name: &str) -> bool {
    name.ends_with("_proj.weight")
}

/// Whether `name` is the token embedding or the output projection, which [`Packing::Blocks`]
/// also holds in blocks alone.
fn is_embedding(name: &str) -> bool {
    name == "model.embed_tokens.weight" || name == "lm_head.weight"
}

impl Weights {
    /// An empty set storing projections as `packing` says.
    pub fn empty(packing: Packing) -> Self {
        Weights {
            tensors: HashMap::new(),
            packed: HashMap::new(),
            blocks: HashMap::new(),
            block_projections: HashMap::new(),
            packing,
        }
    }

    /// How projections are stored.
    pub fn packing(&self) -> Packing {
        self.packing
    }

    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Weights {
            tensors,
            ..Weights::empty(Packing::F32)
        }
    }

    /// Adds a tensor (f32); a projection is packed now when packing is on.
    pub fn insert(&mut self, name: String, tensor: Tensor) -> Result<()> {
        // New values: any blocks kept for the name no longer hold them.
        self.blocks.remove(&name);
        match self.packing {
            Packing::Nf4 { double_quant, .. } if is_projection(&name) => {
                let (rows, cols) = tensor.dims2()?;
                let data = tensor.flatten_all()?.to_vec1::<f32>()?;
                drop(tensor);
                let q = Nf4Matrix::quantize(&data, rows, cols, double_quant);
                self.packed.insert(name, Arc::new(q));
            }
            _ => {
                self.tensors.insert(name, tensor);
            }
        }
        Ok(())
    }

    /// Keeps `blocks`, the checkpoint's own encoding of the f32 tensor `name` just inserted:
    /// beside it, or instead of it where the packing holds that weight in blocks alone.
    pub fn insert_blocks(&mut self, name: String, blocks: BlockMatrix) {
        if !self.tensors.contains_key(&name) {
            return;
        }
        if self.packing.blocks_alone(&name) {
            self.tensors.remove(&name);
            self.block_projections.insert(name, Arc::new(blocks));
        } else {
            self.blocks.insert(name, Arc::new(blocks));
        }
    }

    /// The blocks kept for `name`, if any.
    pub fn take_blocks(&mut self, name: &str) -> Option<Arc<BlockMatrix>> {
        self.blocks.remove(name)
    }

    /// The dimensions of every f32 tensor, by name.
    #[cfg(test)]
    pub fn shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        self.tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect()
    }

    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| BackendError::Checkpoint(format!("tensor `{name}` is missing")))
    }

    /// Whether a weight named `name` is held, in any form.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
            || self.packed.contains_key(name)
            || self.block_projections.contains_key(name)
    }

    /// A projection weight (or, for [`Packing::Blocks`], the embedding), packed, in blocks or f32.
    pub fn take_projection(&mut self, name: &str) -> Result<Projection> {
        if let Some(q) = self.packed.remove(name) {
            return Ok(Projection::Nf4(q));
        }
        if let Some(b) = self.block_projections.remove(name) {
            return Ok(Projection::Blocks(b));
        }
        self.take(name).map(Projection::F32)
    }

    pub fn try_take(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Replaces every f32 projection weight by its NF4 round trip: the values a QLoRA base
    /// holds, kept in f32 so inference runs at full speed on exactly those numbers.
    pub fn round_projections_to_nf4(&mut self, double_quant: bool) -> Result<()> {
        for (name, t) in self.tensors.iter_mut() {
            if !is_projection(name) {
                continue;
            }
            self.blocks.remove(name);
            let (rows, cols) = t.dims2()?;
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            let q = Nf4Matrix::quantize(&data, rows, cols, double_quant);
            *t = Tensor::from_vec(q.dequantize(), (rows, cols), t.device())?;
        }
        Ok(())
    }

    /// The f32 tensors by name (tests write them out as checkpoints).
    #[cfg(test)]
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// Total number of scalar parameters.
    pub fn parameter_count(&self) -> u64 {
        let dense: u64 = self.tensors.values().map(|t| t.elem_count() as u64).sum();
        let packed: u64 = self.packed.values().map(|q| (q.rows * q.cols) as u64).sum();
        let blocks: u64 = (self.block_projections.values())
            .map(|b| (b.rows * b.cols) as u64)
            .sum();
        dense + packed + blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packing_stores_projections_as_nf4_and_keeps_the_rest() {
        let mut w = Weights::empty(Packing::Nf4 {
            double_quant: true,
            tables_in_blocks: true,
        });
        let t = |n: usize| Tensor::ones((n, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        w.insert("model.layers.0.self_attn.q_proj.weight".into(), t(64))
            .unwrap();
        w.insert("model.embed_tokens.weight".into(), t(10)).unwrap();
        assert_eq!(w.parameter_count(), 64 * 64 + 10 * 64);
        assert!(matches!(
            w.take_projection("model.layers.0.self_attn.q_proj.weight")
                .unwrap(),
            Projection::Nf4(_)
        ));
        assert!(w.take("model.embed_tokens.weight").is_ok());
        let e = w.take_projection("model.layers.0.mlp.up_proj.weight");
        assert!(e.is_err_and(|e| e.to_string().contains("up_proj")));
    }
}
