use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{DType, Device, Tensor};
use kernels_cubecl::{QuantConfig, QuantError, frozen_matmul};

use crate::Linear4bit;

/// The frozen base of a projection: a dense linear, or one packed in 4 bits.
// One per projection, so the variants' sizes do not matter (and `Module` cannot derive
// through a `Box`).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FrozenLinear {
    Dense(Linear),
    Packed(Linear4bit),
}

impl FrozenLinear {
    /// Freezes `linear`, packing it in 4 bits when `quantize` is given.
    pub fn new(linear: Linear, quantize: Option<QuantConfig>) -> Result<Self, QuantError> {
        let frozen = Self::from(linear);
        match quantize {
            Some(config) => frozen.quantize(config),
            None => Ok(frozen),
        }
    }

    /// The same base with its bias (if any) trainable; the weight stays frozen.
    pub fn with_trainable_bias(self) -> Self {
        let train = |bias: Option<Param<Tensor<1>>>| bias.map(|b| b.set_require_grad(true));
        match self {
            Self::Dense(linear) => Self::Dense(Linear {
                weight: linear.weight,
                bias: train(linear.bias),
            }),
            Self::Packed(linear) => Self::Packed(Linear4bit {
                weight: linear.weight,
                bias: train(linear.bias),
            }),
        }
    }

    /// Packs a dense base in 4 bits, its bias as it was; a packed base stays as it is.
    pub fn quantize(self, config: QuantConfig) -> Result<Self, QuantError> {
        match self {
            Self::Dense(linear) => Ok(Self::Packed(Linear4bit::quantize(linear, config)?)),
            packed => Ok(packed),
        }
    }

    /// The device of the weight. A 4-bit weight lives outside autodiff (it is frozen), so this
    /// is the plain device for it.
    pub fn device(&self) -> Device {
        match self {
            Self::Dense(linear) => linear.weight.device(),
            Self::Packed(linear) => linear.weight.device(),
        }
    }

    pub fn has_bias(&self) -> bool {
        match self {
            Self::Dense(linear) => linear.bias.is_some(),
            Self::Packed(linear) => linear.bias.is_some(),
        }
    }

    /// `[d_input, d_output]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Self::Dense(linear) => linear.weight.shape().dims(),
            Self::Packed(linear) => linear.dims(),
        }
    }

    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        match self {
            // A weight made trainable by hand keeps Burn's product and its weight gradient.
            Self::Dense(linear) if linear.weight.is_require_grad() => linear.forward(input),
            Self::Dense(linear) => {
                let output = frozen_matmul(input, linear.weight.val());
                match &linear.bias {
                    Some(bias) => output + bias.val().unsqueeze(),
                    None => output,
                }
            }
            Self::Packed(linear) => linear.forward(input),
        }
    }

    /// The same base, a 4-bit one carrying its dequantized copy in `dtype` (see
    /// [`Linear4bit::with_dense_copy`]); a dense base as it is.
    pub fn with_dense_copy(&self, dtype: DType) -> Result<Self, QuantError> {
        match self {
            Self::Dense(_) => Ok(self.clone()),
            Self::Packed(linear) => Ok(Self::Packed(linear.with_dense_copy(dtype)?)),
        }
    }

    /// The dense layer, its weight in `dtype`: a 4-bit base is dequantized, never re-quantized.
    pub fn to_dense(&self, dtype: DType) -> Result<Linear, QuantError> {
        match self {
            Self::Dense(linear) => Ok(Linear {
                weight: linear.weight.clone().map(|weight| weight.cast(dtype)),
                bias: linear.bias.clone(),
            }),
            Self::Packed(linear) => linear.dequantize(dtype),
        }
    }
}

impl From<Linear> for FrozenLinear {
    fn from(linear: Linear) -> Self {
        Self::Dense(linear.no_grad())
    }
}

impl From<Linear4bit> for FrozenLinear {
    fn from(linear: Linear4bit) -> Self {
        Self::Packed(linear)
    }
}
