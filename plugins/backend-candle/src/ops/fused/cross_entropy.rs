//! Mean cross-entropy through a frozen output projection.

use super::*;

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
        let mut grad = zeros(n * dim);
        let mut logits = zeros(LOGIT_ROWS.min(n) * vocab);
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
