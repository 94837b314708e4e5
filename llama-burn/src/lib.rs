//! The LLaMA-2 family on Burn: one model code for every backend and dtype, multi-head and
//! grouped-query attention (LLaMA-2 7B to 70B, TinyLlama, SmolLM), Hugging Face, Meta and GGUF
//! checkpoints, and generation with a KV cache. Its projections are `burn-qlora` layers, so adapters and
//! 4-bit bases are chosen per projection at load time.

mod attention;
mod chat;
mod checkpoint;
mod config;
mod error;
mod generate;
pub mod gguf;
mod load;
mod meta;
mod mlp;
mod model;
mod norm;
mod rope;
mod safetensors;
mod save;
mod tokenizer;

pub use attention::{Attention, LayerCache};
pub use chat::{ChatTemplate, Message, Role};
pub use checkpoint::CheckpointedStep;
pub use config::LlamaConfig;
pub use error::LlamaError;
pub use generate::{Sampler, SamplingConfig, generate};
pub use load::{Checkpoint, LoadOptions};
pub use meta::MetaCheckpoint;
pub use mlp::Mlp;
pub use model::{DecoderLayer, KvCache, Llama, LlamaModel};
pub use norm::RmsNorm;
pub use rope::Rope;
pub use safetensors::SafetensorsCheckpoint;
pub use save::SaveOptions;
pub use tokenizer::{Tokenizer, save_tokenizer_files};
