use burn::tensor::DType;

use crate::config::{NESTED_BLOCK_SIZE, validate_block_size};
use crate::{QuantConfig, QuantError, QuantType};

/// One 4-bit quantized weight on the host, holding exactly what bitsandbytes' `QuantState` holds.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantState {
    pub quant_type: QuantType,
    pub block_size: usize,
    /// Logical shape of the weight.
    pub shape: Vec<usize>,
    /// The dtype the weight had before quantization (f32, f16 or bf16); dequantization returns it.
    pub dtype: DType,
    /// Two codes a byte, the first element in the high nibble; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// The per-block scales: plain f32, or themselves quantized to 8 bits.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double(NestedAbsmax),
}

/// Double-quantized absmax: `absmax[i] = dynamic_map[codes[i]] * nested_absmax[i / 256] + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    pub codes: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    /// Mean of the absmax, subtracted before the 8-bit quantization.
    pub offset: f32,
}

impl QuantState {
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_elements().div_ceil(self.block_size)
    }

    pub fn config(&self) -> QuantConfig {
        QuantConfig::new(
            self.quant_type,
            self.block_size,
            matches!(self.absmax, Absmax::Double(_)),
        )
    }

    /// Checks that every buffer has the length the shape and block size call for.
    pub fn validate(&self) -> Result<(), QuantError> {
        validate_block_size(self.block_size)?;
        let n = self.num_elements();
        if n == 0 {
            return Err(QuantError::Empty {
                shape: self.shape.clone(),
            });
        }
        if !matches!(self.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(QuantError::Dtype(self.dtype));
        }
        let blocks = self.num_blocks();
        self.check_len("packed weight", n.div_ceil(2), self.packed.len())?;
        match &self.absmax {
            Absmax::Plain(absmax) => self.check_len("absmax", blocks, absmax.len()),
            Absmax::Double(nested) => {
                self.check_len("double-quantized absmax", blocks, nested.codes.len())?;
                self.check_len(
                    "nested absmax",
                    blocks.div_ceil(NESTED_BLOCK_SIZE),
                    nested.nested_absmax.len(),
                )
            }
        }
    }

    fn check_len(
        &self,
        what: &'static str,
        expected: usize,
        actual: usize,
    ) -> Result<(), QuantError> {
        if expected == actual {
            Ok(())
        } else {
            Err(QuantError::Length {
                what,
                shape: self.shape.clone(),
                expected,
                actual,
            })
        }
    }
}
