//! The model: a checkpoint read ([`checkpoint`], its fields checked by [`architecture`], its
//! tensors held by [`weights`], its tokenizer built by [`tokenizer`]), the LLaMA network
//! ([`llama`]) and the engine that batches requests through it ([`engine`]).

pub mod architecture;
pub mod chat;
pub mod checkpoint;
pub mod engine;
pub mod llama;
pub mod tokenizer;
pub mod weights;
