//! A frozen projection with its LoRA adapter, as one op.

use super::*;

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
            crate::ops::bf16::product
        } else {
            matmul
        }
    }

    /// The adapter's input: x with dropout applied, or x itself.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        if self.dropout <= 0.0 {
            return std::borrow::Cow::Borrowed(x);
        }
        let mut xd = zeros(x.len());
        apply_dropout(&mut xd, x, self.dropout, self.seed, false);
        std::borrow::Cow::Owned(xd)
    }
}

/// An adapter's matrices as slices: A (r, in) and B (out, r).
#[derive(Clone, Copy)]
pub(super) struct AdapterRef<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
}

impl LoraLinear {
    /// `y` (m, out) = x · Wᵀ + scale · dropout(x) · Aᵀ · Bᵀ, over slices: the op's forward pass,
    /// shared with the ops that fuse a projection with its neighbours.
    pub(super) fn project(&self, x: &[f32], m: usize, ad: AdapterRef, y: &mut [f32]) -> R<()> {
        let (out, inp) = self.base.dims()?;
        let mm = self.adapter_product();
        self.base.forward(x, m, y, self.bf16)?;
        let xd = self.dropped(x);
        let mut u = vec![0f32; m * ad.r];
        mm(
            &mut u,
            ad.r,
            View::rows(&xd, m, inp),
            View::rows(ad.a, ad.r, inp).t(),
            1.0,
            false,
        );
        let bt = View::rows(ad.b, out, ad.r).t();
        mm(y, out, View::rows(&u, m, ad.r), bt, self.scale, true);
        Ok(())
    }

    /// The backward pass of [`LoraLinear::project`] for the output gradient `dy`: adds the
    /// input's gradient into `dx` (m, in) and returns (dA, dB).
    pub(super) fn project_backward(
        &self,
        x: &[f32],
        m: usize,
        ad: AdapterRef,
        dy: &[f32],
        dx: &mut [f32],
    ) -> R<(Vec<f32>, Vec<f32>)> {
        let (out, inp) = self.base.dims()?;
        let r = ad.r;
        let mm = self.adapter_product();
        self.base.backward(dy, m, dx, self.bf16)?;
        let xd = self.dropped(x);
        let mut u = vec![0f32; m * r];
        mm(
            &mut u,
            r,
            View::rows(&xd, m, inp),
            View::rows(ad.a, r, inp).t(),
            1.0,
            false,
        );
        let dyv = View::rows(dy, m, out);
        // dB = scale · dyᵀ · u;  du = scale · dy · B;  dA = duᵀ · xd;  dx += mask ⊙ (du · A).
        let mut db = vec![0f32; out * r];
        mm(&mut db, r, dyv.t(), View::rows(&u, m, r), self.scale, false);
        let mut du = vec![0f32; m * r];
        mm(&mut du, r, dyv, View::rows(ad.b, out, r), self.scale, false);
        let mut da = vec![0f32; r * inp];
        mm(
            &mut da,
            inp,
            View::rows(&du, m, r).t(),
            View::rows(&xd, m, inp),
            1.0,
            false,
        );
        let av = View::rows(ad.a, r, inp);
        if self.dropout <= 0.0 {
            mm(dx, inp, View::rows(&du, m, r), av, 1.0, true);
        } else {
            let mut dxd = zeros(m * inp);
            mm(&mut dxd, inp, View::rows(&du, m, r), av, 1.0, false);
            apply_dropout(dx, &dxd, self.dropout, self.seed, true);
        }
        Ok((da, db))
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
        let mut y = zeros(m * out);
        self.project(x, m, AdapterRef { a, b, r }, &mut y)?;
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
        let (_, inp) = self.base.dims()?;
        let r = a.dim(0)?;
        let (xs, av, bv, dy) = (
            Values::of(x)?,
            Values::of(a)?,
            Values::of(b)?,
            Values::of(grad)?,
        );
        let m = xs.len() / inp;
        let mut dx = zeros(m * inp);
        let ad = AdapterRef { a: &av, b: &bv, r };
        let (da, db) = self.project_backward(&xs, m, ad, &dy, &mut dx)?;
        Ok((
            Some(tensor(dx, x.shape())?),
            Some(tensor(da, a.shape())?),
            Some(tensor(db, b.shape())?),
        ))
    }
}
