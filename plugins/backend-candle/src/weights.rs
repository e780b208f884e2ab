//! A named set of f32 tensors in HF naming, taken out one by one as the model is built, so
//! that a name the model expects but the checkpoint lacks is reported by name.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::{BackendError, Result};

pub struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Weights { tensors }
    }

    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| BackendError::Checkpoint(format!("tensor `{name}` is missing")))
    }

    pub fn try_take(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    pub fn insert(&mut self, name: String, tensor: Tensor) {
        self.tensors.insert(name, tensor);
    }

    /// Replaces every projection weight (`*_proj.weight`) by its NF4 round trip: the values a
    /// QLoRA base holds, kept in f32 so inference runs at full speed on exactly those numbers.
    pub fn round_projections_to_nf4(&mut self, double_quant: bool) -> Result<()> {
        for (name, t) in self.tensors.iter_mut() {
            if !name.ends_with("_proj.weight") {
                continue;
            }
            let (rows, cols) = t.dims2()?;
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            let q = crate::nf4::Nf4Matrix::quantize(&data, rows, cols, double_quant);
            *t = Tensor::from_vec(q.dequantize(), (rows, cols), t.device())?;
        }
        Ok(())
    }

    /// Total number of scalar parameters.
    pub fn parameter_count(&self) -> u64 {
        self.tensors.values().map(|t| t.elem_count() as u64).sum()
    }
}
