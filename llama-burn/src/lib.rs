//! The LLaMA-2 model family on Burn (issue 4); its projections will be `burn-qlora` layers.

pub use burn_qlora::QuantConfig;
