//! Each fused op against the same function composed of candle ops: values and gradients.

use super::*;
use crate::ops::blocks::BlockKind;
use candle_core::{Var, D};

#[test]
fn lora_linear_in_bf16_stays_close_to_f32() {
    // Shapes that every product of the op takes in bf16 (inner sizes multiples of 32, outputs
    // of 16), the weight gradients dA and dB included.
    let (out, inp, r, m) = (48, 64, 32, 32);
    let w = crate::model::llama::testing::uniform(out * inp, 0.5, 7);
    let q = Arc::new(Nf4Matrix::quantize(&w, out, inp, true));
    let run = |bf16: bool| {
        let op = LoraLinear {
            base: Frozen::Nf4(q.clone()),
            scale: 0.5,
            dropout: 0.1,
            seed: 3,
            bf16,
        };
        let x = candle_core::Var::from_tensor(&rand(&[2, m, inp], 1)).unwrap();
        let a = candle_core::Var::from_tensor(&rand(&[r, inp], 2)).unwrap();
        let b = candle_core::Var::from_tensor(&rand(&[out, r], 3)).unwrap();
        let y = op.forward(&x, &a, &b).unwrap();
        let loss = (&y * rand(&[2, m, out], 4)).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let grad = |v: &candle_core::Var| grads.get(v).unwrap().clone();
        [y.clone(), grad(&x), grad(&a), grad(&b)]
    };
    let (low, full) = (run(true), run(false));
    if !crate::ops::bf16::available() {
        eprintln!("no bf16 kernel on this machine: skipped");
        return;
    }
    for (what, (l, f)) in ["y", "dx", "dA", "dB"].iter().zip(low.iter().zip(&full)) {
        let (l, f) = (values(l).unwrap(), values(f).unwrap());
        // Equal values would mean the f32 path ran: the test would check nothing.
        assert_ne!(l, f, "{what} did not run in bf16");
        let diff: f32 = l.iter().zip(&f).map(|(a, b)| (a - b).powi(2)).sum();
        let norm: f32 = f.iter().map(|b| b * b).sum();
        let rel = (diff / norm).sqrt();
        // Operands keep 8 bits of mantissa: errors of a few parts in a thousand.
        assert!(rel < 1e-2, "{what}: {rel:.2e} off in relative norm");
        eprintln!("{what}: {rel:.2e} off in relative norm");
    }
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v = crate::model::llama::testing::uniform(n, 1.0, seed);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    let (a, b) = (values(a).unwrap(), values(b).unwrap());
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0f32, f32::max);
    assert!(worst < tol, "{what}: off by {worst}");
}

/// Checks an op's value and its gradients against a composed reference on the same inputs,
/// through a random linear read-out of the output.
fn check(
    inputs: &[Tensor],
    fused: impl Fn(&[&Tensor]) -> Tensor,
    composed: impl Fn(&[&Tensor]) -> Tensor,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let (yf, yc) = (fused(&ts), composed(&ts));
    close(&yf, &yc, 1e-4, "value");
    let c = rand(yf.dims(), 99);
    let gf = (yf * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (yc * &c).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, t) in ts.iter().enumerate() {
        close(
            gf.get(t).expect("fused gradient"),
            gc.get(t).expect("composed gradient"),
            1e-4,
            &format!("gradient of input {i}"),
        );
    }
}

#[test]
fn lora_linear_matches_the_composed_layer_with_and_without_dropout() {
    let (out, inp, r, m) = (300, 64, 4, 5);
    let w = crate::model::llama::testing::uniform(out * inp, 0.5, 7);
    let q = Arc::new(Nf4Matrix::quantize(&w, out, inp, true));
    let deq = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
    let (blocks, blocks_f32) =
        crate::ops::blocks::quantized_for_tests(BlockKind::Q4_1, w.clone(), out, inp);
    let dense = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
    for (base, weight, dropout) in [
        (Frozen::Nf4(q.clone()), deq.clone(), 0.0),
        (Frozen::Nf4(q), deq, 0.25),
        (Frozen::Dense(dense.clone()), dense, 0.1),
        (Frozen::Blocks(Arc::new(blocks)), blocks_f32, 0.1),
    ] {
        let op = LoraLinear {
            base,
            scale: 2.0,
            dropout,
            seed: 11,
            bf16: false,
        };
        let inputs = [
            rand(&[2, m, inp], 1),
            rand(&[r, inp], 2),
            rand(&[out, r], 3),
        ];
        check(
            &inputs,
            |t| op.forward(t[0], t[1], t[2]).unwrap(),
            |t| {
                let x = t[0].reshape((2 * m, inp)).unwrap();
                let mask = crate::train::lora::dropout_mask(x.elem_count(), dropout, 11);
                let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu).unwrap();
                let xd = if dropout > 0.0 {
                    (&x * mask).unwrap()
                } else {
                    x.clone()
                };
                let base = x.matmul(&weight.t().unwrap()).unwrap();
                let lora = xd
                    .matmul(&t[1].t().unwrap())
                    .unwrap()
                    .matmul(&t[2].t().unwrap())
                    .unwrap();
                (base + (lora * 2.0).unwrap())
                    .unwrap()
                    .reshape((2, m, out))
                    .unwrap()
            },
        );
    }
}

#[test]
fn rms_norm_and_swiglu_match_candle() {
    let w = rand(&[48], 4);
    let op = RmsNorm {
        weight: w.clone(),
        eps: 1e-5,
    };
    check(
        &[rand(&[3, 5, 48], 5)],
        |t| op.forward(t[0]).unwrap(),
        |t| candle_nn::ops::rms_norm_slow(t[0], &w, 1e-5).unwrap(),
    );
    check(
        &[rand(&[4, 70], 6), rand(&[4, 70], 7)],
        |t| SwiGlu::forward(t[0], t[1]).unwrap(),
        |t| (candle_nn::ops::silu(t[0]).unwrap() * t[1]).unwrap(),
    );
}

#[test]
fn causal_attention_matches_the_composed_attention() {
    let (b, t, nh, nkv, d) = (2, 7, 6, 2, 8);
    let half = d / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..t {
        for i in 0..half {
            let a = p as f32 / 10f32.powf(i as f32 / half as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let op = CausalAttention {
        heads: nh,
        kv_heads: nkv,
        head_dim: d,
        cos: Arc::new(cos.clone()),
        sin: Arc::new(sin.clone()),
    };
    let cos = Tensor::from_vec(cos, (1, 1, t, half), &Device::Cpu).unwrap();
    let sin = Tensor::from_vec(sin, (1, 1, t, half), &Device::Cpu).unwrap();
    let rope = |x: &Tensor| -> Tensor {
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let r1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
        let r2 = (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
        Tensor::cat(&[r1, r2], D::Minus1).unwrap()
    };
    let mut mask = vec![0f32; t * t];
    for i in 0..t {
        for j in i + 1..t {
            mask[i * t + j] = f32::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    check(
        &[
            rand(&[b, t, nh * d], 8),
            rand(&[b, t, nkv * d], 9),
            rand(&[b, t, nkv * d], 10),
        ],
        |x| op.forward(x[0], x[1], x[2]).unwrap(),
        |x| {
            let split =
                |x: &Tensor, h: usize| x.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap();
            let q = rope(&split(x[0], nh));
            let k = rope(&split(x[1], nkv));
            let v = split(x[2], nkv);
            let rep = nh / nkv;
            // Repeat each key head for its query heads: (B, nh, T, d).
            let expand = |x: &Tensor| {
                x.unsqueeze(2)
                    .unwrap()
                    .expand((b, nkv, rep, t, d))
                    .unwrap()
                    .reshape((b, nh, t, d))
                    .unwrap()
            };
            let (k, v) = (expand(&k), expand(&v));
            let att = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let att = att.broadcast_add(&mask).unwrap();
            let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
            att.matmul(&v.contiguous().unwrap())
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, nh * d))
                .unwrap()
        },
    );
}

#[test]
fn cross_entropy_matches_log_softmax_and_gather() {
    let (n, h, v) = (70, 16, 40); // more rows than one batch of logits
    let w = rand(&[v, h], 12);
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
    let op = CrossEntropy::new(Frozen::Dense(w.clone()), targets.clone());
    check(
        &[rand(&[n, h], 13)],
        |t| op.forward(t[0]).unwrap(),
        |t| {
            let logp =
                candle_nn::ops::log_softmax(&t[0].matmul(&w.t().unwrap()).unwrap(), D::Minus1)
                    .unwrap();
            let idx = Tensor::new(targets.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(1)
                .unwrap();
            (logp.gather(&idx, 1).unwrap().mean_all().unwrap() * -1.0).unwrap()
        },
    );
}

#[test]
fn frozen_linear_matches_the_dense_layer_in_value_and_input_gradient() {
    // 600 rows of 2048: an NF4 or block weight is decoded into f32 for gemm in two tiles (512
    // rows, then 88), and NF4 for the few rows of the decoding kernel in three (256, 256, 88).
    let (out, inp) = (600, 2048);
    assert_eq!(super::f32_tile_rows(inp), 512);
    let w = crate::model::llama::testing::uniform(out * inp, 0.5, 21);
    let q = Arc::new(Nf4Matrix::quantize(&w, out, inp, true));
    let deq = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
    let mut bases = vec![(Frozen::Nf4(q), deq)];
    for kind in [BlockKind::Q4_1, BlockKind::Q8_0] {
        let (b, f) = crate::ops::blocks::quantized_for_tests(kind, w.clone(), out, inp);
        bases.push((Frozen::Blocks(Arc::new(b)), f));
    }
    let dense = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
    bases.push((Frozen::Dense(dense.clone()), dense));
    for (base, weight) in bases {
        let op = FrozenLinear(base);
        for m in [1usize, 3, 40] {
            check(
                &[rand(&[m, inp], 22 + m as u64)],
                |t| op.forward(t[0]).unwrap(),
                |t| t[0].matmul(&weight.t().unwrap()).unwrap(),
            );
        }
    }
}

/// Values of a tensor, for bitwise comparison.
fn bits(t: &Tensor) -> Vec<u32> {
    values(t).unwrap().iter().map(|v| v.to_bits()).collect()
}

/// A layer half's projections for the bit-for-bit tests: each frozen weight (out, in) and, where
/// `adapted`, a LoRA adapter of rank 4 with dropout, as the composed layer and the fused op
/// take them.
struct Projections {
    bases: Vec<Frozen>,
    adapters: Vec<Option<(Var, Var)>>,
}

impl Projections {
    fn new(shapes: &[(usize, usize)], adapted: &[bool]) -> Self {
        let r = 4;
        let mut bases = Vec::new();
        let mut adapters = Vec::new();
        for (i, (&(out, inp), &on)) in shapes.iter().zip(adapted).enumerate() {
            let w = crate::model::llama::testing::uniform(out * inp, 0.5, 7 + i as u64);
            bases.push(Frozen::Dense(
                Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap(),
            ));
            adapters.push(on.then(|| {
                let a = Var::from_tensor(&rand(&[r, inp], 20 + i as u64)).unwrap();
                let b = Var::from_tensor(&rand(&[out, r], 30 + i as u64)).unwrap();
                (a, b)
            }));
        }
        Projections { bases, adapters }
    }

    fn lora(&self, i: usize) -> LoraLinear {
        LoraLinear {
            base: self.bases[i].clone(),
            scale: 2.0,
            dropout: 0.2,
            seed: 4 + i as u64,
            bf16: false,
        }
    }

    /// Projection `i` of `h` as the composed layer runs it.
    fn composed(&self, i: usize, h: &Tensor) -> Tensor {
        match &self.adapters[i] {
            Some((a, b)) => self.lora(i).forward(h, a, b).unwrap(),
            None => FrozenLinear(self.bases[i].clone()).forward(h).unwrap(),
        }
    }

    /// The fused op's projections.
    fn fused<const N: usize>(&self) -> [LayerProjection; N] {
        std::array::from_fn(|i| match &self.adapters[i] {
            Some((a, b)) => LayerProjection::Lora(self.lora(i), Adapter::new(a, b)),
            None => LayerProjection::Frozen(FrozenLinear(self.bases[i].clone())),
        })
    }

    /// Checks that `fused` gives `composed`'s value and gradients (x's and the adapters') bit
    /// for bit, also on a second backward pass over the same graph (where the fused ops find
    /// what they kept gone and recompute it).
    fn same_bits(&self, x: &Var, fused: &Tensor, composed: &Tensor, what: &str) {
        assert_eq!(bits(fused), bits(composed), "values, {what}");
        let c = rand(fused.dims(), 99);
        let loss = |y: &Tensor| (y * &c).unwrap().sum_all().unwrap();
        let gc = loss(composed).backward().unwrap();
        let gf = loss(fused).backward().unwrap();
        let gf2 = loss(fused).backward().unwrap();
        let mut vars = vec![x];
        for (a, b) in self.adapters.iter().flatten() {
            vars.extend([a, b]);
        }
        for (i, v) in vars.iter().enumerate() {
            let want = bits(gc.get(v).unwrap());
            assert_eq!(bits(gf.get(v).unwrap()), want, "gradient {i}, {what}");
            assert_eq!(
                bits(gf2.get(v).unwrap()),
                want,
                "recomputed gradient {i}, {what}"
            );
        }
    }
}

fn test_norm(hidden: usize) -> RmsNorm {
    RmsNorm {
        weight: (rand(&[hidden], 10) + 1.5).unwrap(),
        eps: 1e-5,
    }
}

#[test]
fn swiglu_mlp_gives_the_composed_layers_values_and_gradients_bit_for_bit() {
    // Rows 2 x 5: more than the decoding kernel's few, as in training.
    let (hidden, inter, m) = (64, 96, 5);
    let norm = test_norm(hidden);
    let shapes = [(inter, hidden), (inter, hidden), (hidden, inter)];
    // Which projections have an adapter: all, some, none.
    for adapted in [
        [true, true, true],
        [true, false, true],
        [false, false, false],
    ] {
        let p = Projections::new(&shapes, &adapted);
        let x = Var::from_tensor(&rand(&[2, m, hidden], 1)).unwrap();
        // The composition the model ran before: norm, three projections, gate, residual.
        let n = norm.forward(&x).unwrap();
        let g = SwiGlu::forward(&p.composed(0, &n), &p.composed(1, &n)).unwrap();
        let composed = (x.as_tensor() + p.composed(2, &g)).unwrap();
        let fused = SwiGluMlp::new(norm.clone(), p.fused()).forward(&x).unwrap();
        p.same_bits(&x, &fused, &composed, &format!("{adapted:?}"));
    }
}

#[test]
fn self_attention_gives_the_composed_layers_values_and_gradients_bit_for_bit() {
    let (nh, nkv, d, t) = (4, 2, 16, 7);
    let hidden = nh * d;
    let norm = test_norm(hidden);
    let attention = CausalAttention {
        heads: nh,
        kv_heads: nkv,
        head_dim: d,
        cos: Arc::new(crate::model::llama::testing::uniform(t * d / 2, 1.0, 40)),
        sin: Arc::new(crate::model::llama::testing::uniform(t * d / 2, 1.0, 41)),
    };
    let shapes = [
        (hidden, hidden),
        (nkv * d, hidden),
        (nkv * d, hidden),
        (hidden, hidden),
    ];
    for adapted in [[true; 4], [true, false, true, false], [false; 4]] {
        let p = Projections::new(&shapes, &adapted);
        let x = Var::from_tensor(&rand(&[2, t, hidden], 1)).unwrap();
        // The composition the model ran before: norm, q/k/v, attention, output, residual.
        let n = norm.forward(&x).unwrap();
        let (q, k, v) = (p.composed(0, &n), p.composed(1, &n), p.composed(2, &n));
        let y = attention.forward(&q, &k, &v).unwrap();
        let composed = (x.as_tensor() + p.composed(3, &y)).unwrap();
        let fused = SelfAttention::new(norm.clone(), attention.clone(), p.fused())
            .forward(&x)
            .unwrap();
        p.same_bits(&x, &fused, &composed, &format!("{adapted:?}"));
    }
}
