//! RMSNorm with a frozen weight.

use super::*;

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

    /// The op's value over slices: each row of `x` normalised.
    pub(super) fn rows(&self, x: &[f32]) -> R<Vec<f32>> {
        Ok(rms_norm_rows(x, &values(&self.weight)?, self.eps))
    }

    /// The gradient of [`RmsNorm::rows`] at `x` for the output gradient `dy`.
    pub(super) fn rows_backward(&self, x: &[f32], dy: &[f32]) -> R<Vec<f32>> {
        Ok(rms_norm_rows_backward(
            x,
            dy,
            &values(&self.weight)?,
            self.eps,
        ))
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// RMSNorm of each row of `x` (rows of `w.len()`), over slices.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut y = zeros(x.len());
    y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
        let r = inv_rms(x, eps);
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = x * r * w;
        }
    });
    y
}

/// The gradient of [`rms_norm_rows`] at `x` for the output gradient `dy`.
fn rms_norm_rows_backward(x: &[f32], dy: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut dx = zeros(x.len());
    // With r = 1/sqrt(mean(x²) + eps) and g = dy ⊙ w: dx = r · (g - x · r² · mean(g ⊙ x)).
    dx.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
        .for_each(|(dx, (x, dy))| {
            let r = inv_rms(x, eps);
            let gx: f32 = x.iter().zip(dy).zip(w).map(|((x, d), w)| x * d * w).sum();
            let c = r * r * gx / n as f32;
            for (((dx, x), dy), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                *dx = r * (dy * w - x * c);
            }
        });
    dx
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> R<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let y = rms_norm_rows(x, &values(&self.weight)?, self.eps);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> R<Option<Tensor>> {
        let (xs, dy, w) = (Values::of(x)?, Values::of(grad)?, Values::of(&self.weight)?);
        let dx = rms_norm_rows_backward(&xs, &dy, &w, self.eps);
        Ok(Some(tensor(dx, x.shape())?))
    }
}
