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
