//! Flex tensors to and from host vectors of f32, for the plain-Rust loops that stand in for the
//! row kernels on the CPU backend.

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, TensorData};

/// A tensor's values widened to f32, with its shape and dtype.
pub(crate) fn to_host(tensor: FlexTensor) -> (Vec<f32>, Vec<usize>, DType) {
    let dtype = tensor.dtype();
    let data = tensor.into_data();
    let shape = data.shape().to_vec();
    let values = data
        .convert::<f32>()
        .try_to_vec()
        .expect("float data widens to f32");
    (values, shape, dtype)
}

/// f32 values as a tensor of `shape` in `dtype`.
pub(crate) fn from_host(values: Vec<f32>, shape: Vec<usize>, dtype: DType) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape).convert_dtype(dtype))
}

/// `dtype`'s rounding of an f32 value, for loops that round where the kernels compute in `dtype`.
pub(crate) fn round(value: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(value).to_f32(),
        DType::F16 => half::f16::from_f32(value).to_f32(),
        _ => value,
    }
}
