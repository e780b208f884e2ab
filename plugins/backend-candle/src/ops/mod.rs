//! The products and layer ops the model runs, in two op sets: the fused CPU ops with
//! hand-written backward passes ([`fused`], on [`matmul`]'s gemm and [`kernels`], NF4 weights
//! from [`nf4`], bf16 products from [`bf16`] where the CPU has them), and the [`portable`] ops
//! composed of candle tensor ops, which run on any device.

pub mod bf16;
pub mod fused;
pub mod kernels;
pub mod matmul;
pub mod nf4;
pub mod portable;
