use thiserror::Error;

/// Why a quantization request, or a quantized state read from a file, was refused.
#[derive(Debug, Error)]
pub enum QuantError {
    #[error("block size {0} is not supported: use a power of two from 32 to 4096")]
    BlockSize(usize),
    #[error("cannot quantize an empty tensor (shape {shape:?})")]
    Empty { shape: Vec<usize> },
    #[error("unsupported dtype {0:?}: quantize takes f32, f16 or bf16 and dequantizes to the same")]
    Dtype(burn::tensor::DType),
    #[error("{what} has {actual} entries but shape {shape:?} needs {expected}")]
    Length {
        what: &'static str,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("{what}: {detail}")]
    Format { what: String, detail: String },
    #[error(
        "{0} does not match bitsandbytes' standard code book; custom code books are not supported"
    )]
    CodeBook(&'static str),
    #[error("device: {0}")]
    Device(String),
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("quant_state JSON: {0}")]
    Json(#[from] serde_json::Error),
}
