//! LoRA and 4-bit QLoRA layers for Burn models.
//!
//! - [`LoraLinear`]: `y = base(x) + scaling * B(A(dropout(x)))`, computed in activation space;
//!   the base ([`FrozenLinear`]: dense, or [`Linear4bit`] packed in NF4/FP4) is frozen, only A
//!   and B train. Merge into a dense layer, never back into 4 bits.
//! - [`Linear4bit`]: a frozen 4-bit linear whose backward re-dequantizes the packed weight
//!   instead of keeping the dense one.
//! - [`QloraConfig`] and [`Projection`]: build any model's linears by projection name (q, k, v,
//!   o, gate, up, down, lm_head) with the QLoRA switches.
//! - [`PeftAdapter`]: adapter-only files in PEFT's layout (`adapter_config.json` +
//!   `adapter_model.safetensors`), read from and written to any model holding `LoraLinear`s.
//! - [`FusedAdamWConfig`]: AdamW with one operation a parameter, Burn's arithmetic and records.
//! - [`write_atomically`]: files written whole or not at all, for adapters and checkpoints.

mod adamw;
mod adapter;
mod atomic;
mod error;
mod frozen;
mod kept_hidden;
mod linear4bit;
mod lora;
mod peft;
mod projection;

pub use adamw::{FusedAdamW, FusedAdamWConfig};
pub use adapter::trainable_params;
pub use atomic::{write_atomically, write_atomically_with};
pub use error::{AdapterError, ConfigError, MergeError};
pub use frozen::FrozenLinear;
pub use kept_hidden::{HiddenSlot, KeptHidden};
pub use kernels_cubecl::{self as kernels, Packed4bit, QuantConfig, QuantError, QuantType};
pub use linear4bit::Linear4bit;
pub use lora::{LoraBias, LoraConfig, LoraLinear, linear_from_torch};
pub use peft::{PeftAdapter, PeftConfig};
pub use projection::{Projection, QloraConfig};
