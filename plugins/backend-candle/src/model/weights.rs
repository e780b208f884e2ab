//! A named set of tensors in HF naming, taken out one by one as the model is built, so that a
//! name the model expects but the checkpoint lacks is reported by name.
//!
//! When the base is to be packed to NF4 (QLoRA training), each projection weight is quantized
//! the moment the loader hands it over, and its f32 values are dropped: at no point does a
//! full-precision copy of all projections exist.

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
}

pub struct Weights {
    tensors: HashMap<String, Tensor>,
    packed: HashMap<String, Arc<Nf4Matrix>>,
    /// The checkpoint's quantized blocks of f32 tensors read from them, for decoding; a tensor
    /// changed after loading (an adapter merged, NF4 rounding) loses its blocks.
    blocks: HashMap<String, Arc<BlockMatrix>>,
    /// `Some(double_quant)`: projections are packed to NF4 as they are inserted.
    pack: Option<bool>,
}

/// Whether `name` is the weight of a linear projection (the layers QLoRA quantizes).
fn is_projection(name: &str) -> bool {
    name.ends_with("_proj.weight")
}

impl Weights {
    /// An empty set; with `pack = Some(double_quant)` projections are stored as NF4.
    pub fn empty(pack: Option<bool>) -> Self {
        Weights {
            tensors: HashMap::new(),
            packed: HashMap::new(),
            blocks: HashMap::new(),
            pack,
        }
    }

    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Weights {
            tensors,
            ..Weights::empty(None)
        }
    }

    /// Adds a tensor (f32); a projection is packed now when packing is on.
    pub fn insert(&mut self, name: String, tensor: Tensor) -> Result<()> {
        // New values: any blocks kept for the name no longer hold them.
        self.blocks.remove(&name);
        match self.pack {
            Some(double_quant) if is_projection(&name) => {
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

    /// Keeps `blocks`, the checkpoint's own encoding of the f32 tensor `name` just inserted.
    pub fn insert_blocks(&mut self, name: String, blocks: BlockMatrix) {
        if self.tensors.contains_key(&name) {
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

    /// A projection weight, packed or f32.
    pub fn take_projection(&mut self, name: &str) -> Result<Projection> {
        match self.packed.remove(name) {
            Some(q) => Ok(Projection::Nf4(q)),
            None => self.take(name).map(Projection::F32),
        }
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
        dense + packed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packing_stores_projections_as_nf4_and_keeps_the_rest() {
        let mut w = Weights::empty(Some(true));
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
