//! What the ops that fuse half a layer ([`super::SelfAttention`], [`super::SwiGluMlp`]) share:
//! their projections, how their adapters' matrices take part in the graph, what they keep for
//! the backward pass, and their place in candle's graph.

use super::lora_linear::AdapterRef;
use super::*;

/// A value an op's forward pass leaves for its backward pass, or a backward pass for another
/// op's: held by the op (autograd keeps the op until the backward pass) and taken there, so its
/// memory goes back to the allocator as the backward pass leaves the layer, not when it ends.
pub(super) type Kept<T> = Arc<std::sync::Mutex<Option<T>>>;

pub(super) fn keep<T>(kept: &Kept<T>, value: T) {
    *kept.lock().expect("not poisoned") = Some(value);
}

/// The kept value, taken; none when a backward pass runs a second time over the same graph
/// (the op then recomputes it).
pub(super) fn take<T>(kept: &Kept<T>) -> Option<T> {
    kept.lock().expect("not poisoned").take()
}

/// A LoRA adapter's matrices A (r, in) and B (out, r) as a fused op reads them.
///
/// The op reads them in place and computes their gradients in its backward pass. They reach
/// autograd through [`Adapter::stand_in`], a one-element tensor made from A and B that the op
/// takes as an input in their stead: the op leaves the gradients here and the stand-in's own
/// backward pass, which autograd runs after the op's (it comes earlier in the graph), hands
/// them to A and B. So one op takes any number of adapters (candle's custom ops take three
/// inputs at most) without copying them into one tensor that the graph would keep until the
/// step ends.
#[derive(Clone)]
pub struct Adapter {
    a: Tensor,
    b: Tensor,
    grads: Kept<(Vec<f32>, Vec<f32>)>,
}

impl Adapter {
    pub fn new(a: &Tensor, b: &Tensor) -> Self {
        Adapter {
            a: a.clone(),
            b: b.clone(),
            grads: Arc::default(),
        }
    }

    /// The one-element tensor that stands for A and B in the graph.
    pub fn stand_in(&self) -> R<Tensor> {
        self.a.apply_op2(&self.b, StandIn(self.grads.clone()))
    }

    /// `f` of the matrices, read in place.
    fn read<T>(&self, f: impl FnOnce(AdapterRef) -> R<T>) -> R<T> {
        let (a, b) = (Values::of(&self.a)?, Values::of(&self.b)?);
        f(AdapterRef {
            a: &a,
            b: &b,
            r: self.a.dim(0)?,
        })
    }
}

/// The op behind [`Adapter::stand_in`].
struct StandIn(Kept<(Vec<f32>, Vec<f32>)>);

impl CustomOp2 for StandIn {
    fn name(&self) -> &'static str {
        "adapter-stand-in"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = take(&self.0).ok_or_else(|| {
            candle_core::Error::Msg("adapter-stand-in: its op left no gradients".into())
        })?;
        Ok((Some(tensor(da, a.shape())?), Some(tensor(db, b.shape())?)))
    }
}

/// One projection of a fused half layer: a frozen weight alone, or one with a LoRA adapter.
#[derive(Clone)]
pub enum LayerProjection {
    Frozen(FrozenLinear),
    /// The projection's op (weight, scale, dropout and its seed, bf16) and its adapter.
    Lora(LoraLinear, Adapter),
}

impl LayerProjection {
    /// (out, in).
    pub(super) fn dims(&self) -> R<(usize, usize)> {
        match self {
            LayerProjection::Frozen(f) => f.0.dims(),
            LayerProjection::Lora(op, _) => op.base.dims(),
        }
    }

    /// The adapter's stand-in, if this projection has one.
    pub fn stand_in(&self) -> R<Option<Tensor>> {
        match self {
            LayerProjection::Frozen(_) => Ok(None),
            LayerProjection::Lora(_, adapter) => adapter.stand_in().map(Some),
        }
    }

    /// `x` (m, in) projected to (m, out).
    pub(super) fn forward(&self, x: &[f32], m: usize) -> R<Vec<f32>> {
        match self {
            LayerProjection::Frozen(f) => f.product(x, m),
            LayerProjection::Lora(op, adapter) => {
                let mut y = zeros(m * self.dims()?.0);
                adapter.read(|ad| op.project(x, m, ad, &mut y))?;
                Ok(y)
            }
        }
    }

    /// The input's gradient (m, in) for the output gradient `dy`; the adapter's are left for its
    /// stand-in.
    pub(super) fn backward(&self, x: &[f32], m: usize, dy: &[f32]) -> R<Vec<f32>> {
        let mut dx = zeros(m * self.dims()?.1);
        match self {
            LayerProjection::Frozen(f) => f.product_backward(dy, m, &mut dx)?,
            LayerProjection::Lora(op, adapter) => {
                let grads = adapter.read(|ad| op.project_backward(x, m, ad, dy, &mut dx))?;
                keep(&adapter.grads, grads);
            }
        }
        Ok(dx)
    }
}

/// The stand-in of all of `parts`' adapters: their sum (autograd hands the op's gradient to
/// each), or none where no part has an adapter.
pub(super) fn stand_ins(parts: &[&LayerProjection]) -> R<Option<Tensor>> {
    let mut sum: Option<Tensor> = None;
    for part in parts {
        if let Some(s) = part.stand_in()? {
            sum = Some(match sum {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
    }
    Ok(sum)
}

/// A fused half layer over slices; [`apply`] makes it a node of candle's graph.
pub(super) trait HalfLayer: Clone + Send + Sync + 'static {
    const NAME: &'static str;

    /// The projections, whose adapters' stand-ins the op takes.
    fn projections(&self) -> Vec<&LayerProjection>;

    /// The output for the input `x` of `shape`.
    fn fwd(&self, x: &[f32], shape: &Shape) -> R<Vec<f32>>;

    /// x's gradient for the output gradient `dy`, leaving the adapters' with them.
    fn bwd(&self, x: &Tensor, dy: &[f32]) -> R<Vec<f32>>;
}

/// `op` applied to `x`, with its adapters' stand-ins as a second input where it has adapters.
pub(super) fn apply<T: HalfLayer>(op: &T, x: &Tensor) -> R<Tensor> {
    let x = x.contiguous()?;
    match stand_ins(&op.projections())? {
        Some(s) => x.apply_op2(&s, Node(op.clone())),
        None => x.apply_op1(Node(op.clone())),
    }
}

/// A [`HalfLayer`] as candle's custom op.
struct Node<T>(T);

impl<T: HalfLayer> CustomOp1 for Node<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> R<(CpuStorage, Shape)> {
        let y = self
            .0
            .fwd(input(storage, layout, T::NAME)?, layout.shape())?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> R<Option<Tensor>> {
        let dx = self.0.bwd(x, &Values::of(grad)?)?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

impl<T: HalfLayer> CustomOp2 for Node<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> R<(CpuStorage, Shape)> {
        CustomOp1::cpu_fwd(self, s1, l1)
    }

    fn bwd(
        &self,
        x: &Tensor,
        stand_in: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>)> {
        let dx = CustomOp1::bwd(self, x, res, grad)?;
        Ok((dx, Some(stand_in.ones_like()?)))
    }
}

/// The gradient of a half layer's input `x`, `y = x + f(norm(x))`, given the gradient `dn` that
/// reached the normalised input and the output gradient `dy` (the residual path's share).
pub(super) fn input_gradient(norm: &RmsNorm, x: &[f32], dn: &[f32], dy: &[f32]) -> R<Vec<f32>> {
    let mut dx = norm.rows_backward(x, dn)?;
    add_residual(&mut dx, dy);
    Ok(dx)
}

/// `y += x`, the residual connection, in parallel chunks.
pub(super) fn add_residual(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, x) in y.iter_mut().zip(x) {
                *y += x;
            }
        });
}
