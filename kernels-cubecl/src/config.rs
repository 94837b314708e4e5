use serde::{Deserialize, Serialize};

use crate::{QuantError, QuantType};

/// Block size of the second-level (double) quantization of the absmax, as in bitsandbytes.
pub const NESTED_BLOCK_SIZE: usize = 256;

/// How a weight is quantized to 4 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantConfig {
    /// NF4 or FP4. Default: NF4, the QLoRA choice.
    pub quant_type: QuantType,
    /// Elements sharing one absmax: a power of two from 32 to 4096. Default: 64.
    pub block_size: usize,
    /// Quantize the absmax too (8-bit, blocks of 256, mean subtracted). Default: true.
    pub double_quant: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            block_size: 64,
            double_quant: true,
        }
    }
}

impl QuantConfig {
    pub fn new(quant_type: QuantType, block_size: usize, double_quant: bool) -> Self {
        Self {
            quant_type,
            block_size,
            double_quant,
        }
    }

    /// Checks the block size; every entry point calls this first.
    pub fn validate(&self) -> Result<(), QuantError> {
        validate_block_size(self.block_size)
    }
}

pub(crate) fn validate_block_size(block_size: usize) -> Result<(), QuantError> {
    if block_size.is_power_of_two() && (32..=4096).contains(&block_size) {
        Ok(())
    } else {
        Err(QuantError::BlockSize(block_size))
    }
}
