//! Helpers shared by the kernel tests: the golden folder, golden cases, and the devices to test.
#![allow(dead_code)] // each test binary uses its own part of these helpers

use std::collections::HashMap;

use burn::tensor::{DType, Device, TensorData};
use half::bf16;
use kernels_cubecl::{Absmax, NestedAbsmax, QuantState, QuantType};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

pub use integration_tests::golden_dir;

/// One `bnb_*.safetensors` case: what bitsandbytes was given and what it produced.
pub struct GoldenCase {
    pub name: String,
    pub quant_type: QuantType,
    pub double_quant: bool,
    pub shape: Vec<usize>,
    pub input_dtype: DType,
    pub input: Vec<f32>,
    pub packed: Vec<u8>,
    pub absmax: Option<Vec<f32>>,
    pub absmax_u8: Option<Vec<u8>>,
    pub nested_absmax: Option<Vec<f32>>,
    pub nested_code: Option<Vec<f32>>,
    pub offset: Option<f32>,
    pub code: Vec<f32>,
    pub dequant: Vec<f32>,
}

impl GoldenCase {
    /// The input as bitsandbytes got it (bf16 cases narrowed back from the widened f32,
    /// exactly), flattened: the packed bytes follow the row-major order alone.
    pub fn input_data(&self) -> TensorData {
        let n = self.input.len();
        match self.input_dtype {
            DType::BF16 => {
                TensorData::new(self.input.iter().map(|&x| bf16::from_f32(x)).collect(), [n])
            }
            _ => TensorData::new(self.input.clone(), [n]),
        }
    }

    /// bitsandbytes' quantized state, as ours.
    pub fn state(&self) -> QuantState {
        let absmax = match (&self.absmax, &self.absmax_u8) {
            (Some(absmax), _) => Absmax::Plain(absmax.clone()),
            (None, Some(codes)) => Absmax::Double(NestedAbsmax {
                codes: codes.clone(),
                nested_absmax: self.nested_absmax.clone().expect("nested_absmax"),
                offset: self.offset.expect("offset"),
            }),
            (None, None) => panic!("{}: no absmax", self.name),
        };
        QuantState {
            quant_type: self.quant_type,
            block_size: 64,
            shape: self.shape.clone(),
            dtype: self.input_dtype,
            packed: self.packed.clone(),
            absmax,
        }
    }
}

/// The 2-D golden cases whose input was `dtype` that `keep` accepts; none, with the reason
/// printed, without the golden folder.
pub fn golden_matrices(dtype: DType, keep: impl Fn(&GoldenCase) -> bool) -> Vec<GoldenCase> {
    let cases: Vec<_> = golden_cases()
        .into_iter()
        .filter(|case| case.shape.len() == 2 && case.input_dtype == dtype && keep(case))
        .collect();
    if cases.is_empty() {
        println!("skipped: no golden folder");
    }
    cases
}

pub fn golden_cases() -> Vec<GoldenCase> {
    let Some(dir) = golden_dir() else {
        return Vec::new();
    };
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("read golden dir")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with("bnb_") && name.ends_with(".safetensors")
        })
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "no bnb_*.safetensors in {}",
        dir.display()
    );
    paths.iter().map(|path| load_case(path)).collect()
}

fn load_case(path: &std::path::Path) -> GoldenCase {
    let bytes = std::fs::read(path).expect("read golden file");
    let (_, metadata) = SafeTensors::read_metadata(&bytes).expect("golden header");
    let meta: HashMap<String, String> = metadata.metadata().clone().unwrap_or_default();
    let tensors = SafeTensors::deserialize(&bytes).expect("golden file");
    let f32s = |name: &str| -> Option<Vec<f32>> {
        let view = tensors.tensor(name).ok()?;
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        Some(
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    };
    let u8s = |name: &str| -> Option<Vec<u8>> { Some(tensors.tensor(name).ok()?.data().to_vec()) };
    let shape: Vec<usize> = serde_json::from_str(&meta["shape"]).expect("shape metadata");
    GoldenCase {
        name: path.file_name().unwrap().to_string_lossy().into_owned(),
        quant_type: QuantType::from_name(&meta["quant_type"]).expect("quant_type"),
        double_quant: meta["double_quant"] == "True",
        shape,
        input_dtype: match meta["input_dtype"].trim_start_matches("torch.") {
            "bfloat16" => DType::BF16,
            "float16" => DType::F16,
            _ => DType::F32,
        },
        input: f32s("input").expect("input"),
        packed: u8s("packed").expect("packed"),
        absmax: f32s("absmax"),
        absmax_u8: u8s("absmax_u8"),
        nested_absmax: f32s("nested_absmax"),
        nested_code: f32s("nested_code"),
        offset: f32s("offset").map(|v| v[0]),
        code: f32s("code").expect("code"),
        dequant: f32s("dequant").expect("dequant"),
    }
}

/// The devices the kernels are tested on: Flex (the reference path) always, and with the `wgpu`
/// feature the default wgpu adapter (lavapipe in CI), which runs the CubeCL kernels.
pub fn devices() -> Vec<(&'static str, Device)> {
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_mut))]
    let mut devices = vec![("flex", Device::flex())];
    #[cfg(feature = "wgpu")]
    devices.push((
        "wgpu",
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    ));
    #[cfg(feature = "cuda")]
    devices.push(("cuda", Device::cuda(0usize)));
    devices
}

/// The 16-bit float a half-precision test runs in on `name`'s device: bf16, but f16 on wgpu,
/// whose WGSL has no bf16.
pub fn half_dtype(name: &str) -> DType {
    if name == "wgpu" {
        DType::F16
    } else {
        DType::BF16
    }
}

/// The CubeCL devices alone (empty without the `wgpu`/`cuda` features).
pub fn cube_devices() -> Vec<(&'static str, Device)> {
    devices()
        .into_iter()
        .filter(|(name, _)| *name != "flex")
        .collect()
}

/// Values read back from tensor data of any float dtype, widened to f32.
pub fn f32_values(data: &TensorData) -> Vec<f32> {
    data.clone()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")
}

/// Asserts two f32 slices are equal bit for bit, naming the first difference.
pub fn assert_bits_eq(what: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = (0..actual.len()).find(|&i| actual[i].to_bits() != expected[i].to_bits()) {
        panic!(
            "{what}: first difference at {i}: {} vs {} ({} differ)",
            actual[i],
            expected[i],
            (0..actual.len())
                .filter(|&i| actual[i].to_bits() != expected[i].to_bits())
                .count()
        );
    }
}

/// Asserts two byte slices are equal, naming the first difference.
pub fn assert_bytes_eq(what: &str, actual: &[u8], expected: &[u8]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let differ: Vec<usize> = (0..actual.len())
        .filter(|&i| actual[i] != expected[i])
        .collect();
    if let Some(&i) = differ.first() {
        panic!(
            "{what}: first difference at byte {i}: {:#04x} vs {:#04x} ({} differ)",
            actual[i],
            expected[i],
            differ.len()
        );
    }
}

/// Largest `|actual - expected|` over `max |expected|`.
pub fn max_relative_error(actual: &[f32], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let scale = expected.iter().fold(0f64, |m, e| m.max(e.abs()));
    let diff =
        (actual.iter().zip(expected)).fold(0f64, |m, (a, e)| m.max((f64::from(*a) - e).abs()));
    diff / scale
}

/// The tolerance for an f32 product through Burn's matmul on `name`'s device: CUDA's rounds the
/// inputs to TF32 (10 mantissa bits, errors up to about 1e-3 relative), the others compute in
/// f32 and keep `exact`.
pub fn burn_f32_matmul_tolerance(name: &str, exact: f64) -> f64 {
    if name == "cuda" { 2e-3 } else { exact }
}
