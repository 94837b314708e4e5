use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a model could not be configured or loaded.
#[derive(Debug, Error)]
pub enum LlamaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("checkpoint {path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {actual:?}, the config needs {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor {name} has dtype {dtype}; F32, F16 and BF16 are read")]
    Dtype { name: String, dtype: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor {name}: {source}")]
    Quant {
        name: String,
        source: burn_qlora::QuantError,
    },
}

impl LlamaError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// `Ok` when a tensor's `actual` shape is the `expected` one the config needs, else the
    /// error naming it (`name` is only built then).
    pub(crate) fn check_shape(
        actual: &[usize],
        expected: &[usize],
        name: impl FnOnce() -> String,
    ) -> Result<(), Self> {
        if actual == expected {
            Ok(())
        } else {
            Err(Self::Shape {
                name: name(),
                expected: expected.to_vec(),
                actual: actual.to_vec(),
            })
        }
    }

    pub(crate) fn checkpoint(path: &Path, detail: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}
