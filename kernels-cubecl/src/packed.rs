//! [`Packed4bit`]: a 4-bit weight held on a Burn device, with `quantize` and `dequantize`
//! running the CubeCL kernels on CubeCL devices and the reference's arithmetic elsewhere.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::{
    Absmax, NestedAbsmax, QuantConfig, QuantError, QuantState, QuantType, host_dequantize,
    reference,
};

/// A 4-bit quantized weight on a device: the packed codes, the absmax (plain or double-quantized),
/// the code book, the block size and the logical shape.
#[derive(Clone, Debug)]
pub struct Packed4bit {
    pub quant_type: QuantType,
    pub block_size: usize,
    pub shape: Vec<usize>,
    /// The dtype the weight had, and the one [`Packed4bit::dequantize`] returns.
    pub dtype: DType,
    /// The packed bytes as little-endian `u32` words (byte `k` = bits `8k..8k+8`), zero-padded.
    pub words: Tensor<1, Int>,
    pub absmax: DeviceAbsmax,
    /// The 16 values of the code book, kept on the device for the kernels.
    pub code: Tensor<1>,
    /// The weight dequantized, where [`Packed4bit::with_dense_copy`] made it: the products read
    /// it instead of dequantizing again. `None` for a weight as quantized or loaded.
    pub dense: Option<Tensor<2>>,
}

/// The absmax on the device. (One per weight, so the size of the larger variant does not matter.)
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum DeviceAbsmax {
    Plain(Tensor<1>),
    Double {
        /// 8-bit codes, four to a `u32` word.
        codes: Tensor<1, Int>,
        nested_absmax: Tensor<1>,
        offset: f32,
        /// bitsandbytes' dynamic map, on the device.
        map: Tensor<1>,
    },
}

impl Packed4bit {
    /// Quantizes a f32, f16 or bf16 tensor on its own device. The weight is frozen: it is kept
    /// outside autodiff even when `tensor` is on an autodiff device.
    pub fn quantize<const D: usize>(
        tensor: Tensor<D>,
        config: QuantConfig,
    ) -> Result<Self, QuantError> {
        config.validate()?;
        let tensor = tensor.without_autodiff();
        let (dtype, device) = (tensor.dtype(), tensor.device());
        check_float_dtype(dtype, &device)?;
        let shape = tensor.shape().to_vec();
        if tensor.shape().num_elements() == 0 {
            return Err(QuantError::Empty { shape });
        }
        #[cfg(feature = "cube")]
        if cube::runs_cubecl(&device) {
            return cube::quantize(tensor.reshape([-1]), shape, dtype, config);
        }
        let state = reference::quantize(&tensor.into_data(), config)?;
        Self::from_state(&state, &device)
    }

    /// Moves a host state onto `device` (outside autodiff: the weight is frozen).
    pub fn from_state(state: &QuantState, device: &Device) -> Result<Self, QuantError> {
        state.validate()?;
        let device = &device.clone().without_autodiff();
        let absmax = match &state.absmax {
            Absmax::Plain(absmax) => DeviceAbsmax::Plain(f32_tensor(absmax.clone(), device)),
            Absmax::Double(nested) => DeviceAbsmax::Double {
                codes: u32_tensor(bytes_to_words(&nested.codes), device),
                nested_absmax: f32_tensor(nested.nested_absmax.clone(), device),
                offset: nested.offset,
                map: f32_tensor(crate::codebook::dynamic_map().to_vec(), device),
            },
        };
        Ok(Self {
            quant_type: state.quant_type,
            block_size: state.block_size,
            shape: state.shape.clone(),
            dtype: state.dtype,
            words: u32_tensor(bytes_to_words(&state.packed), device),
            absmax,
            code: f32_tensor(state.quant_type.code().to_vec(), device),
            dense: None,
        })
    }

    /// Reads the state back to the host, in bitsandbytes' layout.
    pub fn to_state(&self) -> Result<QuantState, QuantError> {
        let n = self.num_elements();
        let absmax = match &self.absmax {
            DeviceAbsmax::Plain(absmax) => Absmax::Plain(read_f32(absmax.clone())?),
            DeviceAbsmax::Double {
                codes,
                nested_absmax,
                offset,
                ..
            } => Absmax::Double(NestedAbsmax {
                codes: words_to_bytes(&read_u32(codes.clone())?, n.div_ceil(self.block_size)),
                nested_absmax: read_f32(nested_absmax.clone())?,
                offset: *offset,
            }),
        };
        Ok(QuantState {
            quant_type: self.quant_type,
            block_size: self.block_size,
            shape: self.shape.clone(),
            dtype: self.dtype,
            packed: words_to_bytes(&read_u32(self.words.clone())?, n.div_ceil(2)),
            absmax,
        })
    }

    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn device(&self) -> Device {
        self.words.device()
    }

    /// The weight, dequantized to the dtype it had, in its logical shape.
    pub fn dequantize<const D: usize>(&self) -> Result<Tensor<D>, QuantError> {
        self.dequantize_to::<D>(self.dtype)
    }

    /// The weight dequantized to `dtype` (f32, f16 or bf16).
    pub fn dequantize_to<const D: usize>(&self, dtype: DType) -> Result<Tensor<D>, QuantError> {
        check_float_dtype(dtype, &self.device())?;
        if self.shape.len() != D {
            return Err(QuantError::Format {
                what: "dequantize".into(),
                detail: format!("asked for rank {D}, the weight has shape {:?}", self.shape),
            });
        }
        #[cfg(feature = "cube")]
        if cube::runs_cubecl(&self.device()) {
            let shape: [usize; D] = self.shape.clone().try_into().expect("rank checked above");
            return Ok(cube::dequantize(self, dtype).reshape(shape));
        }
        let mut state = self.to_state()?;
        state.dtype = dtype;
        let data = host_dequantize::dequantize(&state)?;
        Ok(Tensor::<D>::from_data(data, (&self.device(), dtype)))
    }
}

impl Packed4bit {
    /// The same weight carrying its dequantized copy in `dtype` (rank 2 only), for a run of
    /// products that would each dequantize it: a checkpointed layer's recomputation reads its
    /// weights in the forward and again for the input gradient. The copy is what dequantizing
    /// gives, so the products are unchanged; it costs the dense weight's memory while it lives.
    pub fn with_dense_copy(&self, dtype: DType) -> Result<Self, QuantError> {
        let dense = self.dequantize_to::<2>(dtype)?;
        Ok(Self {
            dense: Some(dense),
            ..self.clone()
        })
    }

    /// A linear layer's product `input · Wᵀ` for this `[out_features, in_features]` weight,
    /// in `input`'s dtype. The weight is dequantized for the product and dropped after it; on an
    /// autodiff device the backward dequantizes it again, so the dense weight is never kept for
    /// backward. Gradients flow to `input` only: the weight is frozen.
    pub fn linear<const D: usize>(&self, input: Tensor<D>) -> Result<Tensor<D>, QuantError> {
        self.product(input, true)
    }

    /// `input · W` for this `[rows, cols]` weight, `input` `[.., rows]`: the product a linear
    /// layer's backward makes for its input gradient, dequantizing as [`Self::linear`] does.
    pub fn matmul<const D: usize>(&self, input: Tensor<D>) -> Result<Tensor<D>, QuantError> {
        self.product(input, false)
    }

    /// `input · Wᵀ` when `transpose`, else `input · W`, its arguments checked.
    fn product<const D: usize>(
        &self,
        input: Tensor<D>,
        transpose: bool,
    ) -> Result<Tensor<D>, QuantError> {
        self.check_input(&input, transpose)?;
        #[cfg(any(feature = "cube", feature = "flex"))]
        return crate::matmul::product(input, self, transpose);
        #[cfg(not(any(feature = "cube", feature = "flex")))]
        Err(QuantError::Device(
            "built without a backend for the 4-bit matmul: enable flex, wgpu or cuda".into(),
        ))
    }

    /// Whether `input` can take the product `input · Wᵀ` (`transpose`) or `input · W`: its last
    /// dimension, dtype and device.
    pub(crate) fn check_input<const D: usize>(
        &self,
        input: &Tensor<D>,
        transpose: bool,
    ) -> Result<(), QuantError> {
        let [rows, cols] = self.matrix_shape("linear")?;
        let depth = if transpose { cols } else { rows };
        let dims = input.dims();
        if dims[D - 1] != depth {
            return Err(QuantError::Format {
                what: "4-bit matmul input".into(),
                detail: format!(
                    "shape {dims:?} does not end in the weight's {depth} {}",
                    if transpose { "input features" } else { "rows" }
                ),
            });
        }
        check_float_dtype(input.dtype(), &input.device())?;
        let device = input.device().without_autodiff();
        if device != self.device().without_autodiff() {
            return Err(QuantError::Device(format!(
                "the input is on {device:?}, the weight on {:?}",
                self.device()
            )));
        }
        Ok(())
    }

    /// `[rows, cols]` for a rank-2 weight.
    pub(crate) fn matrix_shape(&self, what: &str) -> Result<[usize; 2], QuantError> {
        self.shape
            .clone()
            .try_into()
            .map_err(|_| QuantError::Format {
                what: what.into(),
                detail: format!("needs a rank-2 weight, this one has shape {:?}", self.shape),
            })
    }
}

/// Weights are quantized from, and dequantized to, f32, f16 or bf16 that the device has.
fn check_float_dtype(dtype: DType, device: &Device) -> Result<(), QuantError> {
    if matches!(dtype, DType::F32 | DType::F16 | DType::BF16) && device.supports_dtype(dtype) {
        Ok(())
    } else {
        Err(QuantError::Dtype(dtype))
    }
}

fn f32_tensor(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), (device, DType::F32))
}

fn u32_tensor(values: Vec<u32>, device: &Device) -> Tensor<1, Int> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), (device, DType::U32))
}

fn read_f32(tensor: Tensor<1>) -> Result<Vec<f32>, QuantError> {
    tensor
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|err| QuantError::Device(format!("{err:?}")))
}

fn read_u32(tensor: Tensor<1, Int>) -> Result<Vec<u32>, QuantError> {
    tensor
        .into_data()
        .try_into_vec::<u32>()
        .map_err(|err| QuantError::Device(format!("{err:?}")))
}

/// Little-endian words of the bytes, the last one zero-padded.
pub(crate) fn bytes_to_words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|chunk| {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            u32::from_le_bytes(word)
        })
        .collect()
}

/// The first `len` bytes of the words.
pub(crate) fn words_to_bytes(words: &[u32], len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(4 * words.len());
    for word in words {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::{Dispatch, DispatchDevice};
    use burn::tensor::{DType, Device, Int, Tensor};

    use super::{DeviceAbsmax, Packed4bit, f32_tensor, read_f32, u32_tensor};
    use crate::codebook::{FP4_COUNT_TO_CODE, FP4_THRESHOLDS, NF4_THRESHOLDS, dynamic_map};
    use crate::extension::Quant4bitOps;
    use crate::matmul::{AbsmaxPrimitive, dequantize_flat};
    use crate::{QuantConfig, QuantError, QuantType, reference};

    pub fn runs_cubecl(device: &Device) -> bool {
        matches!(
            device.clone().without_autodiff().as_dispatch(),
            DispatchDevice::Cube(_)
        )
    }

    pub fn dequantize(packed: &Packed4bit, dtype: DType) -> Tensor<1> {
        Tensor::from_dispatch(dequantize_flat::<Dispatch>(
            packed.words.clone().into_dispatch(),
            AbsmaxPrimitive::new(&packed.absmax),
            packed.code.clone().into_dispatch(),
            packed.num_elements(),
            packed.block_size,
            dtype,
        ))
    }

    pub fn quantize(
        flat: Tensor<1>,
        shape: Vec<usize>,
        dtype: DType,
        config: QuantConfig,
    ) -> Result<Packed4bit, QuantError> {
        let device = flat.device();
        let (thresholds, remap, signed_magnitude) = tree_tables(config.quant_type);
        let (words, absmax) = Dispatch::quantize_4bit(
            flat.into_dispatch(),
            f32_tensor(thresholds, &device).into_dispatch(),
            u32_tensor(remap, &device).into_dispatch(),
            config.block_size,
            signed_magnitude,
        );
        let words: Tensor<1, Int> = Tensor::from_dispatch(words);
        let absmax: Tensor<1> = Tensor::from_dispatch(absmax);
        let absmax = if config.double_quant {
            // The mean is taken on the host in f64 so it is the reference's, bit for bit.
            let offset = reference::mean_offset(&read_f32(absmax.clone())?);
            let map = f32_tensor(dynamic_map().to_vec(), &device);
            let (codes, nested_absmax) = Dispatch::quantize_absmax(
                absmax.into_dispatch(),
                map.clone().into_dispatch(),
                offset,
            );
            DeviceAbsmax::Double {
                codes: Tensor::from_dispatch(codes),
                nested_absmax: Tensor::from_dispatch(nested_absmax),
                offset,
                map,
            }
        } else {
            DeviceAbsmax::Plain(absmax)
        };
        Ok(Packed4bit {
            quant_type: config.quant_type,
            block_size: config.block_size,
            shape,
            dtype,
            words,
            absmax,
            code: f32_tensor(config.quant_type.code().to_vec(), &device),
            dense: None,
        })
    }

    /// The sorted thresholds of bitsandbytes' decision tree and the code each count maps to.
    fn tree_tables(quant_type: QuantType) -> (Vec<f32>, Vec<u32>, bool) {
        match quant_type {
            QuantType::Nf4 => (NF4_THRESHOLDS.to_vec(), (0..16).collect(), false),
            QuantType::Fp4 => (
                FP4_THRESHOLDS.to_vec(),
                FP4_COUNT_TO_CODE.iter().map(|&c| u32::from(c)).collect(),
                true,
            ),
        }
    }
}
