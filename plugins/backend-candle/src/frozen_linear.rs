//! `x · Wᵀ` for a frozen f32 weight, differentiable in `x` only.
//!
//! candle's matmul backward computes the gradient of both operands; for a frozen weight (the
//! tied output projection: 49152 x 576 for SmolLM2) that is a full weight-sized matmul and a
//! weight-sized gradient per step that nobody reads. This op gives `grad_x = grad_y · W` alone.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

/// The op; `weight` is (out, in).
#[derive(Clone)]
pub struct FrozenMatMul {
    pub weight: Tensor,
}

impl FrozenMatMul {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1(self.clone())
    }
}

impl CustomOp1 for FrozenMatMul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, k) = self.weight.dims2()?;
        let (x, dims) = input_rows(storage, layout, k, self.name())?;
        let y = x.matmul(&self.weight.t()?)?;
        output(y, &dims, out)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let out = self.weight.dim(0)?;
        let g = grad_res.reshape(((), out))?.contiguous()?;
        Ok(Some(g.matmul(&self.weight)?.reshape(arg.shape())?))
    }
}

/// The input of a matmul-like custom op as a (rows, k) tensor, with its original dims.
pub(crate) fn input_rows(
    storage: &CpuStorage,
    layout: &Layout,
    k: usize,
    op: &str,
) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let dims = layout.shape().dims().to_vec();
    if dims.last() != Some(&k) {
        candle_core::bail!("{op}: input has shape {dims:?}, the weight expects {k} features");
    }
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op} needs a contiguous input")))?;
    let m = layout.shape().elem_count() / k;
    let x = Tensor::from_slice(
        &storage.as_slice::<f32>()?[start..end],
        (m, k),
        &Device::Cpu,
    )?;
    Ok((x, dims))
}

/// The (rows, out) result as storage of the input's dims with the last one replaced by `out`.
pub(crate) fn output(
    y: Tensor,
    dims: &[usize],
    out: usize,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("checked non-empty") = out;
    let y = y.flatten_all()?.to_vec1::<f32>()?;
    Ok((CpuStorage::F32(y), Shape::from(out_dims)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_reaches_x_and_matches_the_plain_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let x = candle_core::Var::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let op = FrozenMatMul { weight: w.clone() };
        let y = op.forward(x.as_tensor()).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let diff = (y.clone() - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5);
        let g1 = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let a = g1
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = g2
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5);
        }
        assert!(g1.get(&w).is_none(), "no gradient for the frozen weight");
    }
}
