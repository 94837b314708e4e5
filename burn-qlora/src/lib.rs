//! LoRA and 4-bit QLoRA layers for Burn models.
//!
//! - [`LoraLinear`] wraps Burn's `nn::Linear`: `y = base(x) + scaling * B(A(dropout(x)))`,
//!   computed in activation space; the base is frozen, only A and B train.
//! - [`PeftAdapter`] reads and writes PEFT's `adapter_config.json` + `adapter_model.safetensors`.
//! - The 4-bit weight type the QLoRA base builds on is [`kernels_cubecl::Packed4bit`].

mod error;
mod lora;
mod peft;

pub use error::AdapterError;
pub use kernels_cubecl::{Packed4bit, QuantConfig, QuantType};
pub use lora::{LoraConfig, LoraLinear, linear_from_torch};
pub use peft::{PeftAdapter, PeftConfig};
