//! The products and layer ops the model runs, in two op sets: the fused CPU ops with
//! hand-written backward passes ([`fused`], on [`matmul`]'s gemm and [`kernels`], NF4 weights
//! from [`nf4`], bf16 products from [`bf16`] where the CPU has them), and the [`portable`] ops
//! composed of candle tensor ops, which run on any device.

pub mod bf16;
pub mod blocks;
pub mod fused;
pub mod kernels;
pub mod matmul;
pub mod nf4;
pub mod portable;
pub mod zeros;

use candle_core::Tensor;

/// Which ops a model's layers run, chosen once when the model is placed on its device and held
/// by it: every layer asks its op set rather than testing a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpSet {
    /// The CPU's [`fused`] ops: hand-written backward passes that keep little for the backward
    /// pass, NF4 weights decoded tile by tile, bf16 products where the CPU has them.
    #[default]
    Fused,
    /// The [`portable`] ops composed of candle tensor ops: any device (CUDA), in f32; on the CPU
    /// the fused ops' cross-check.
    Portable,
}

impl OpSet {
    /// RMSNorm of `x` over its last dimension with a frozen `weight`. candle's own fused op has
    /// no backward pass, so when a gradient must flow through `x` (training LoRA) the op set's
    /// differentiable one runs.
    pub fn rms_norm(self, x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        match (x.track_op(), self) {
            (false, _) => candle_nn::ops::rms_norm(x, weight, eps as f32),
            (true, OpSet::Fused) => fused::RmsNorm {
                weight: weight.clone(),
                eps: eps as f32,
            }
            .forward(x),
            (true, OpSet::Portable) => portable::rms_norm(x, weight, eps),
        }
    }

    /// SwiGLU's gate `silu(gate) ⊙ up`.
    pub fn swiglu(self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            OpSet::Fused if gate.track_op() || up.track_op() => fused::SwiGlu::forward(gate, up),
            OpSet::Fused if gate.device().is_cpu() && gate.dtype() == candle_core::DType::F32 => {
                fused::SiluMul::forward(gate, up)
            }
            _ => portable::swiglu(gate, up),
        }
    }

    /// Whether the model runs the portable ops (which compute in f32 only).
    pub fn is_portable(self) -> bool {
        self == OpSet::Portable
    }
}
