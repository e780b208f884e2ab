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

    /// Total number of scalar parameters.
    pub fn parameter_count(&self) -> u64 {
        self.tensors.values().map(|t| t.elem_count() as u64).sum()
    }
}
