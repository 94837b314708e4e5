//! NF4 and FP4 4-bit block quantization, byte-compatible with bitsandbytes.
//!
//! - [`reference`]: plain-Rust quantize/dequantize, step for step bitsandbytes' kernels.
//! - [`Packed4bit`]: a quantized weight on a Burn device; `quantize`/`dequantize` run the CubeCL
//!   kernels (`kernels`, features `cuda`/`wgpu`) on CubeCL devices and the reference elsewhere.
//! - [`bnb_format`]: the safetensors layout transformers writes for 4-bit weights.

pub mod bnb_format;
pub mod codebook;
mod config;
mod error;
#[cfg(feature = "cube")]
mod extension;
#[cfg(feature = "cube")]
pub mod kernels;
#[cfg(any(feature = "cube", feature = "flex"))]
mod matmul;
mod packed;
pub mod reference;
mod state;

pub use codebook::QuantType;
pub use config::{NESTED_BLOCK_SIZE, QuantConfig};
pub use error::QuantError;
#[cfg(any(feature = "cube", feature = "flex"))]
pub use matmul::{AbsmaxPrimitive, Matmul4bitOps, Weight4bitPrimitive};
pub use packed::{DeviceAbsmax, Packed4bit};
pub use state::{Absmax, NestedAbsmax, QuantState};
