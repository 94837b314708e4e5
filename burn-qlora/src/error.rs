use std::path::PathBuf;

use thiserror::Error;

/// Why an adapter could not be read, written or applied.
#[derive(Debug, Error)]
pub enum AdapterError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Safetensors {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    #[error("adapter tensor {tensor} is missing")]
    Missing { tensor: String },
    #[error("adapter tensor {tensor} has shape {actual:?}, the model needs {expected:?}")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("adapter tensor {tensor} has shape {actual:?}; LoRA weights are matrices")]
    Rank { tensor: String, actual: Vec<usize> },
    #[error("adapter tensor {tensor} has dtype {dtype}; f32, f16 and bf16 are read")]
    Dtype { tensor: String, dtype: String },
}
