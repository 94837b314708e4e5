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
    #[error("adapter tensor {tensor} has no LoRA module of that name in the model")]
    Unexpected { tensor: String },
    #[error("adapter tensor {tensor} has shape {actual:?}, the model needs {expected:?}")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("adapter tensor {tensor} has shape {actual:?}; it should have {expected} dimensions")]
    Rank {
        tensor: String,
        expected: usize,
        actual: Vec<usize>,
    },
    #[error("adapter tensor {tensor} has dtype {dtype}; f32, f16 and bf16 are read")]
    Dtype { tensor: String, dtype: String },
}

/// Why an adapter could not be merged into, or taken out of, its base.
#[derive(Debug, Error)]
pub enum MergeError {
    #[error(
        "cannot merge into a 4-bit base without re-quantizing it, which changes the model's \
         outputs: build the dense merged layer with to_merged_linear"
    )]
    PackedBase,
    #[error("the adapter is merged already")]
    AlreadyMerged,
    #[error("the adapter is not merged")]
    NotMerged,
    #[error(transparent)]
    Quant(#[from] kernels_cubecl::QuantError),
}

/// A configuration value that cannot be used, named by its key.
#[derive(Debug, Error)]
#[error("config key `{key}`: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
