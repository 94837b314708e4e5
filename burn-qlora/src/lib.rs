//! LoRA and 4-bit QLoRA layers for Burn (issue 3). The 4-bit weight type they build on is
//! [`kernels_cubecl::Packed4bit`].

pub use kernels_cubecl::{Packed4bit, QuantConfig, QuantType};
