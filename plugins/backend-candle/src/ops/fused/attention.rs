//! Causal grouped-query attention with rotary embeddings.

use super::*;

/// A rotary table: d/2 values per position, positions 0.. .
pub type RopeTable = Arc<Vec<f32>>;

/// What one key head's backward task produces: dq of each of its query heads, dk, dv.
type GroupGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Causal grouped-query attention with rotary embeddings, for sequences that start at position
/// 0 with no cache: q (B, T, heads·d), k and v (B, T, kv_heads·d), as the projections emit
/// them, to y (B, T, heads·d). Rotate-half rotary tables `cos`/`sin` hold d/2 values per
/// position, positions 0.. . Padding at the end of a row is harmless: causality keeps it out of
/// every real position.
#[derive(Clone)]
pub struct CausalAttention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub cos: RopeTable,
    pub sin: RopeTable,
}

/// Rotates `x` (a head's d values) by the rotate-half rotary embedding with tables `c`, `s`
/// (d/2 each); `inverse` applies the transpose (the rotation's backward pass).
pub(super) fn rotate_half(x: &mut [f32], c: &[f32], s: &[f32], inverse: bool) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        if inverse {
            x1[i] = a * c[i] + b * s[i];
            x2[i] = b * c[i] - a * s[i];
        } else {
            x1[i] = a * c[i] - b * s[i];
            x2[i] = b * c[i] + a * s[i];
        }
    }
}

/// One head's rows of a (B, T, H·d) tensor: (T, d).
fn head_rows(src: &[f32], b: usize, t: usize, heads: usize, d: usize, h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * d);
    for p in 0..t {
        let at = ((b * t + p) * heads + h) * d;
        out.extend_from_slice(&src[at..at + d]);
    }
    out
}

/// Writes one head's rows (T, d) back into a (B, T, H·d) tensor.
fn put_head(dst: &mut [f32], rows: &[f32], b: usize, t: usize, heads: usize, d: usize, h: usize) {
    for p in 0..t {
        let at = ((b * t + p) * heads + h) * d;
        dst[at..at + d].copy_from_slice(&rows[p * d..(p + 1) * d]);
    }
}

impl CausalAttention {
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> R<Tensor> {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, self.clone())
    }

    /// Rotates each row (position p) of `x` (T, d) in place; `inverse` applies the transpose
    /// (the backward pass of the rotation).
    fn rotate(&self, x: &mut [f32], inverse: bool) {
        let half = self.head_dim / 2;
        for (p, row) in x.chunks_mut(self.head_dim).enumerate() {
            let rows = p * half..(p + 1) * half;
            rotate_half(row, &self.cos[rows.clone()], &self.sin[rows], inverse);
        }
    }

    /// Causal softmax probabilities P (T, T) of rotated, scaled queries against rotated keys:
    /// row p holds p + 1 probabilities, then zeros.
    fn probs(&self, qr: &[f32], kr: &[f32], t: usize) -> Vec<f32> {
        let d = self.head_dim;
        let mut p = vec![0f32; t * t];
        matmul_serial(
            &mut p,
            t,
            View::rows(qr, t, d),
            View::rows(kr, t, d).t(),
            1.0,
            false,
        );
        for (i, row) in p.chunks_mut(t).enumerate() {
            let (live, masked) = row.split_at_mut(i + 1);
            let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0;
            for v in live.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in live.iter_mut() {
                *v /= sum;
            }
            masked.fill(0.0);
        }
        p
    }

    /// Rotated, scaled queries of head h and rotated keys of its key head, each (T, d).
    fn rotated(&self, q: &[f32], k: &[f32], b: usize, t: usize, h: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.head_dim;
        let g = h / (self.heads / self.kv_heads);
        let mut qr = head_rows(q, b, t, self.heads, d, h);
        self.rotate(&mut qr, false);
        let scale = 1.0 / (d as f32).sqrt();
        qr.iter_mut().for_each(|v| *v *= scale);
        let mut kr = head_rows(k, b, t, self.kv_heads, d, g);
        self.rotate(&mut kr, false);
        (qr, kr)
    }

    /// The attention output (B, T, heads·d) of q, k and v over slices: the op's forward pass.
    pub(super) fn attend(&self, q: &[f32], k: &[f32], v: &[f32], b: usize, t: usize) -> Vec<f32> {
        let (nh, d) = (self.heads, self.head_dim);
        let rep = nh / self.kv_heads;
        let heads: Vec<Vec<f32>> = (0..b * nh)
            .into_par_iter()
            .map(|bh| {
                let (bi, h) = (bh / nh, bh % nh);
                let (qr, kr) = self.rotated(q, k, bi, t, h);
                let vr = head_rows(v, bi, t, self.kv_heads, d, h / rep);
                let p = self.probs(&qr, &kr, t);
                let mut y = vec![0f32; t * d];
                matmul_serial(
                    &mut y,
                    d,
                    View::rows(&p, t, t),
                    View::rows(&vr, t, d),
                    1.0,
                    false,
                );
                y
            })
            .collect();
        let mut y = zeros(b * t * nh * d);
        for (bh, rows) in heads.iter().enumerate() {
            put_head(&mut y, rows, bh / nh, t, nh, d, bh % nh);
        }
        y
    }

    /// The gradients (dq, dk, dv) of [`CausalAttention::attend`] for the output gradient `dy`.
    pub(super) fn attend_backward(
        &self,
        qs: &[f32],
        ks: &[f32],
        vs: &[f32],
        dy: &[f32],
        b: usize,
        t: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let rep = nh / nkv;
        let scale = 1.0 / (d as f32).sqrt();
        // One task per key head: it owns dk and dv of that head and dq of its query heads.
        let groups: Vec<GroupGrads> = (0..b * nkv)
            .into_par_iter()
            .map(|bg| {
                let (bi, g) = (bg / nkv, bg % nkv);
                let vr = head_rows(vs, bi, t, nkv, d, g);
                let mut dk = vec![0f32; t * d];
                let mut dv = vec![0f32; t * d];
                let mut dqs = Vec::with_capacity(rep);
                let mut dp = vec![0f32; t * t];
                for h in g * rep..(g + 1) * rep {
                    let (qr, kr) = self.rotated(qs, ks, bi, t, h);
                    let dyh = head_rows(dy, bi, t, nh, d, h);
                    let p = self.probs(&qr, &kr, t);
                    let (pv, dyv) = (View::rows(&p, t, t), View::rows(&dyh, t, d));
                    // dV += Pᵀ dY;  dP = dY Vᵀ;  dS = P ⊙ (dP - rowsum(P ⊙ dP));
                    // d(qr) = dS K;  d(kr) += dSᵀ qr.
                    matmul_serial(&mut dv, d, pv.t(), dyv, 1.0, true);
                    matmul_serial(&mut dp, t, dyv, View::rows(&vr, t, d).t(), 1.0, false);
                    for (i, (ds, pr)) in dp.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                        let mean: f32 = ds[..=i].iter().zip(&pr[..=i]).map(|(a, b)| a * b).sum();
                        for (v, pv) in ds[..=i].iter_mut().zip(&pr[..=i]) {
                            *v = pv * (*v - mean);
                        }
                        ds[i + 1..].fill(0.0);
                    }
                    let dsv = View::rows(&dp, t, t);
                    let mut dq = vec![0f32; t * d];
                    matmul_serial(&mut dq, d, dsv, View::rows(&kr, t, d), 1.0, false);
                    matmul_serial(&mut dk, d, dsv.t(), View::rows(&qr, t, d), 1.0, true);
                    // The queries were scaled after rotation.
                    dq.iter_mut().for_each(|v| *v *= scale);
                    self.rotate(&mut dq, true);
                    dqs.push(dq);
                }
                self.rotate(&mut dk, true);
                (dqs, dk, dv)
            })
            .collect();
        let mut dq = zeros(qs.len());
        let mut dk = zeros(ks.len());
        let mut dv = zeros(vs.len());
        for (bg, (dqs, dkg, dvg)) in groups.iter().enumerate() {
            let (bi, g) = (bg / nkv, bg % nkv);
            for (i, rows) in dqs.iter().enumerate() {
                put_head(&mut dq, rows, bi, t, nh, d, g * rep + i);
            }
            put_head(&mut dk, dkg, bi, t, nkv, d, g);
            put_head(&mut dv, dvg, bi, t, nkv, d, g);
        }
        (dq, dk, dv)
    }

    fn check(&self, q: &Layout, k: &Layout, v: &Layout) -> R<(usize, usize)> {
        let (b, t, qw) = q.shape().dims3()?;
        let d = self.head_dim;
        let ok = qw == self.heads * d
            && k.shape().dims3()? == (b, t, self.kv_heads * d)
            && v.shape().dims3()? == (b, t, self.kv_heads * d)
            && self.heads.is_multiple_of(self.kv_heads)
            && self.cos.len() >= t * d / 2
            && self.sin.len() >= t * d / 2;
        if !ok {
            candle_core::bail!(
                "causal-attention: q {:?}, k {:?}, v {:?} do not fit {} heads, {} key heads of {d}",
                q.shape(),
                k.shape(),
                v.shape(),
                self.heads,
                self.kv_heads
            );
        }
        Ok((b, t))
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
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
        let (b, t) = self.check(l1, l2, l3)?;
        let (q, k, v) = (
            input(s1, l1, self.name())?,
            input(s2, l2, self.name())?,
            input(s3, l3, self.name())?,
        );
        Ok((
            CpuStorage::F32(self.attend(q, k, v, b, t)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> R<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, _) = q.dims3()?;
        let (qs, ks, vs, dy) = (
            Values::of(q)?,
            Values::of(k)?,
            Values::of(v)?,
            Values::of(grad)?,
        );
        let (dq, dk, dv) = self.attend_backward(&qs, &ks, &vs, &dy, b, t);
        Ok((
            Some(tensor(dq, q.shape())?),
            Some(tensor(dk, k.shape())?),
            Some(tensor(dv, v.shape())?),
        ))
    }
}
