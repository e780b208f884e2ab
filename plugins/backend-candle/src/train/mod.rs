//! Training: QLoRA on the loaded model ([`qlora`]: options, NF4 base, adapters attached, run),
//! the optimiser loop ([`trainer`]), the LoRA layers ([`lora`]) and PEFT adapter files
//! ([`adapter`]).

pub mod adapter;
pub mod lora;
pub mod qlora;
pub mod trainer;
