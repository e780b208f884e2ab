//! Grouped-query attention of new tokens over a key/value cache, for evaluation.

use std::mem::MaybeUninit;

use super::attention::rotate_half;
use super::*;

/// Attention of new tokens over the keys and values already cached, in one pass over slices:
/// rotary embedding of the new queries and keys, the grown cache, the scaled scores, the masked
/// softmax and the weighted values. It replaces about twenty tensor ops (rotation, transposes,
/// concatenation, mask, softmax), each a pass over memory of its own, which cost prompt
/// processing about a sixth of its time; it has no backward pass and runs in evaluation only.
///
/// The arithmetic is the composed ops': the same rotation expression, the scores scaled after
/// their product, softmax over the unmasked keys (masked keys have probability exactly 0, as
/// `exp(-inf)` gives there), and the values weighted by gemm, one output element accumulated
/// along the keys.
#[derive(Clone, Copy)]
pub struct CachedAttention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What [`CachedAttention::forward`] reads besides the projections.
pub struct CacheInputs<'a> {
    /// Rotate-half tables of each new token's position, (B·T, d/2) each.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// The cached rotated keys and values, (B, kv_heads, P, d) each.
    pub past: Option<(&'a Tensor, &'a Tensor)>,
    /// Which cached positions of each row are real (the rest is padding, never attended to);
    /// `None`: all of them.
    pub key_valid: Option<&'a [Vec<bool>]>,
}

impl CachedAttention {
    /// New tokens' queries `q` (B, T, heads·d) and keys and values `k`, `v` (B, T, kv_heads·d),
    /// unrotated as the projections emit them, attend causally to themselves and to every
    /// valid cached position. Returns the output (B, T, heads·d) and the grown cache's keys and
    /// values (B, kv_heads, P + T, d).
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &CacheInputs,
    ) -> R<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let (b, t, qw) = q.dims3()?;
        let past = match cache.past {
            Some((pk, _)) => pk.dim(2)?,
            None => 0,
        };
        let total = past + t;
        let fits = qw == nh * d
            && nh.is_multiple_of(nkv)
            && d.is_multiple_of(2)
            && k.dims3()? == (b, t, nkv * d)
            && v.dims3()? == (b, t, nkv * d)
            && cache.cos.elem_count() == b * t * d / 2
            && cache.sin.elem_count() == b * t * d / 2
            && cache.past.is_none_or(|(pk, pv)| {
                pk.dims() == [b, nkv, past, d] && pv.dims() == [b, nkv, past, d]
            })
            && cache
                .key_valid
                .is_none_or(|kv| kv.len() == b && kv.iter().all(|r| r.len() >= past));
        if !fits {
            candle_core::bail!(
                "cached-attention: q {:?}, k {:?}, v {:?} and a cache of {past} do not fit {nh} heads, {nkv} key heads of {d}",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        let (qs, ks, vs) = (Values::of(q)?, Values::of(k)?, Values::of(v)?);
        let (cos, sin) = (Values::of(cache.cos)?, Values::of(cache.sin)?);
        let past_kv = match cache.past {
            Some((pk, pv)) => Some((Values::of(pk)?, Values::of(pv)?)),
            None => None,
        };
        let half = d / 2;
        let rep = nh / nkv;
        let scale = 1.0 / (d as f32).sqrt();
        let span = total * d;
        // The grown cache is written in full below (the past, then the new positions), so it
        // is not zeroed first: zeroing it was a serial pass over the whole cache in every layer
        // of every decoding step.
        let mut k_all: Vec<f32> = Vec::with_capacity(b * nkv * span);
        let mut v_all: Vec<f32> = Vec::with_capacity(b * nkv * span);
        // One task per (row, key head): it grows that head's cache, then computes the outputs
        // of its query heads.
        let groups: Vec<Vec<f32>> = k_all.spare_capacity_mut()[..b * nkv * span]
            .par_chunks_mut(span)
            .zip(v_all.spare_capacity_mut()[..b * nkv * span].par_chunks_mut(span))
            .enumerate()
            .map(|(bg, (kc, vc))| {
                let (bi, g) = (bg / nkv, bg % nkv);
                let old = bg * past * d..(bg + 1) * past * d;
                let (pk, pv): (&[f32], &[f32]) = match &past_kv {
                    Some((pk, pv)) => (&pk[old.clone()], &pv[old]),
                    None => (&[], &[]),
                };
                let at = (bi, g, t, nkv, d);
                let (kc, vc) = (filled(kc, pk, &ks, at), filled(vc, pv, &vs, at));
                let rows = |p: usize| (bi * t + p) * half..(bi * t + p + 1) * half;
                for p in 0..t {
                    let key = &mut kc[(past + p) * d..(past + p + 1) * d];
                    rotate_half(key, &cos[rows(p)], &sin[rows(p)], false);
                }
                // The group's queries, rotated: rows (head, position), rep·T of them.
                let mut qr = vec![0f32; rep * t * d];
                for (r, row) in qr.chunks_mut(d).enumerate() {
                    let (h, p) = (g * rep + r / t, r % t);
                    let at = ((bi * t + p) * nh + h) * d;
                    row.copy_from_slice(&qs[at..at + d]);
                    rotate_half(row, &cos[rows(p)], &sin[rows(p)], false);
                }
                let mut probs = vec![0f32; rep * t * total];
                matmul_serial(
                    &mut probs,
                    total,
                    View::rows(&qr, rep * t, d),
                    View::rows(kc, total, d).t(),
                    scale,
                    false,
                );
                let valid = cache.key_valid.map(|kv| &kv[bi]);
                for (r, row) in probs.chunks_mut(total).enumerate() {
                    // Query position p sees the valid cached keys and new keys 0..=p.
                    let live = past + r % t + 1;
                    let seen = |j: usize| j >= past || valid.is_none_or(|kv| kv[j]);
                    let max = (0..live)
                        .filter(|&j| seen(j))
                        .fold(f32::NEG_INFINITY, |m, j| m.max(row[j]));
                    let mut sum = 0.0;
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if j < live && seen(j) {
                            (*x - max).exp()
                        } else {
                            0.0
                        };
                        sum += *x;
                    }
                    row.iter_mut().for_each(|x| *x /= sum);
                }
                let mut y = vec![0f32; rep * t * d];
                matmul_serial(
                    &mut y,
                    d,
                    View::rows(&probs, rep * t, total),
                    View::rows(vc, total, d),
                    1.0,
                    false,
                );
                y
            })
            .collect();
        // SAFETY: every task initialised its whole chunk (`filled`), and the chunks cover the
        // first b·nkv·span values.
        unsafe {
            k_all.set_len(b * nkv * span);
            v_all.set_len(b * nkv * span);
        }
        let mut y = zeros(b * t * nh * d);
        for (bg, rows) in groups.iter().enumerate() {
            let (bi, g) = (bg / nkv, bg % nkv);
            for (r, row) in rows.chunks(d).enumerate() {
                let (h, p) = (g * rep + r / t, r % t);
                let at = ((bi * t + p) * nh + h) * d;
                y[at..at + d].copy_from_slice(row);
            }
        }
        Ok((
            Tensor::from_vec(y, (b, t, nh * d), &Device::Cpu)?,
            Tensor::from_vec(k_all, (b, nkv, total, d), &Device::Cpu)?,
            Tensor::from_vec(v_all, (b, nkv, total, d), &Device::Cpu)?,
        ))
    }
}

/// One (row, key head) of the grown cache, `span` values not yet initialised: the `past`
/// positions, then the head's `t` new ones from `new` (B, T, kv_heads·d) as the projection
/// emitted them. Returns the chunk, now initialised in full.
fn filled<'a>(
    chunk: &'a mut [MaybeUninit<f32>],
    past: &[f32],
    new: &[f32],
    (bi, g, t, nkv, d): (usize, usize, usize, usize, usize),
) -> &'a mut [f32] {
    assert_eq!(
        chunk.len(),
        past.len() + t * d,
        "cache chunk of the wrong size"
    );
    let (old, fresh) = chunk.split_at_mut(past.len());
    for (dst, &src) in old.iter_mut().zip(past) {
        dst.write(src);
    }
    for (p, position) in fresh.chunks_exact_mut(d).enumerate() {
        let at = ((bi * t + p) * nkv + g) * d;
        for (dst, &src) in position.iter_mut().zip(&new[at..at + d]) {
            dst.write(src);
        }
    }
    // SAFETY: the assert and the two loops wrote every element of `chunk`: `past.len()` of
    // them, then t positions of d, and MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(chunk as *mut [MaybeUninit<f32>] as *mut [f32]) }
}
