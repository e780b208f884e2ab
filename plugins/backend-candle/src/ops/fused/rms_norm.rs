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
