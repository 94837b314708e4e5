//! NF4 and FP4 4-bit block quantization, byte-compatible with bitsandbytes.
//!
//! - [`reference`]: plain-Rust quantize/dequantize, step for step bitsandbytes' kernels.
//! - [`Packed4bit`]: a quantized weight on a Burn device; `quantize`/`dequantize` run the CubeCL
//!   kernels (`kernels`, features `cuda`/`wgpu`) on CubeCL devices and the reference elsewhere.
//! - [`low_rank_down`], [`low_rank_up`], [`low_rank_up_add`]: a LoRA adapter's rank-wide
//!   products (the last adding the base layer's output), with kernels for their thin sides and a
//!   backward through the same kernels.
//! - [`lora_4bit_linear`]: a LoRA projection over a 4-bit base as one operation each way.
//! - [`batched_matmul`], [`batched_matmul_transposed`]: a batched product of two activations
//!   (attention's `p·v` and `q·kᵀ`), through the same routine, with the gradients of both.
//! - [`frozen_matmul`]: a product with a frozen dense weight (an untied LM head), through the
//!   4-bit products' matmul routine, with the input's gradient only.
//! - [`cross_entropy`]: the loss over a vocabulary and its backward, one cube per row.
//! - [`causal_attention`]: causal attention with grouped-query heads: on CUDA FlashAttention-2-style
//!   kernels (`flash_attention.cu`, no scores in memory), elsewhere the batched products and the
//!   causal softmax.
//! - [`causal_softmax`], [`rms_norm`]: attention's causal softmax and RMSNorm (frozen weight)
//!   with their backwards, a row to a group of units.
//! - [`rotary`]: rotary position embeddings read from the strided heads, written contiguous.
//! - [`swap_heads`]: attention's head transposes (`[batch, seq, heads, width]` and back),
//!   written contiguous a vector at a time.
//! - [`swiglu`]: SwiGLU's gating `silu(gate) · up`, and both gradients from one kernel.
//! - [`bnb_format`]: the safetensors layout transformers writes for 4-bit weights.
//! - [`adamw_update`]: one AdamW update of a parameter and its moments as one operation.

mod adamw;
mod attention;
mod batched;
pub mod bnb_format;
pub mod codebook;
mod config;
mod cross_entropy;
mod error;
#[cfg(feature = "cube")]
mod extension;
#[cfg(feature = "cuda")]
mod flash_attention;
#[cfg(feature = "flex")]
mod flex_host;
mod frozen;
mod heads;
mod host_dequantize;
#[cfg(feature = "cube")]
pub mod kernels;
#[cfg(any(feature = "cube", feature = "flex"))]
mod lora_4bit;
mod low_rank;
#[cfg(any(feature = "cube", feature = "flex"))]
mod matmul;
mod packed;
#[cfg(feature = "cuda")]
mod precompiled;
pub mod reference;
mod rms_norm;
mod rotary;
#[cfg(feature = "cube")]
mod rows;
mod softmax;
mod state;
mod swiglu;
#[cfg(feature = "cuda")]
mod thin_product;
#[cfg(feature = "cuda")]
mod wgmma;
#[cfg(feature = "cuda")]
mod wgmma_4bit;

pub use adamw::{AdamWOps, AdamWScalars, adamw_update, fused_adamw_supported};
#[cfg(feature = "cuda")]
pub use attention::FlashAttentionOps;
pub use attention::causal_attention;
pub use batched::{BatchedMatmulOps, batched_matmul, batched_matmul_transposed};
pub use codebook::QuantType;
pub use config::{NESTED_BLOCK_SIZE, QuantConfig};
pub use cross_entropy::{CrossEntropyOps, cross_entropy};
pub use error::QuantError;
pub use frozen::{FrozenMatmulOps, frozen_matmul};
pub use heads::{SwapHeadsOps, swap_heads};
#[cfg(any(feature = "cube", feature = "flex"))]
pub use lora_4bit::{
    KeptAdapter, Lora4bitOps, Lora4bitPassOps, lora_4bit_linear, lora_4bit_linear_keeping,
    lora_4bit_pullback,
};
pub use low_rank::{LowRankOps, MAX_RANK, low_rank_down, low_rank_up, low_rank_up_add};
#[cfg(any(feature = "cube", feature = "flex"))]
pub use matmul::{AbsmaxPrimitive, DenseCopy, Matmul4bitOps, Weight4bitPrimitive};
pub use packed::{DeviceAbsmax, Packed4bit};
pub use rms_norm::{RmsNormOps, rms_norm, rms_norm_passing};
pub use rotary::{RotaryOps, rotary};
pub use softmax::{CausalSoftmaxOps, causal_softmax};
pub use state::{Absmax, NestedAbsmax, QuantState};
pub use swiglu::{SwigluOps, swiglu};

/// Whether the device's backend has this crate's backend extensions (the 4-bit matmul, the
/// low-rank products) in this build: CubeCL devices with `cuda`/`wgpu`, Flex with `flex`.
pub(crate) fn has_extensions(device: &burn::tensor::Device) -> bool {
    match device.clone().without_autodiff().as_dispatch() {
        #[cfg(feature = "cube")]
        burn::backend::DispatchDevice::Cube(_) => true,
        #[cfg(feature = "flex")]
        burn::backend::DispatchDevice::Flex(_) => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}
