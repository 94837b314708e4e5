//! Every `bnb_*.safetensors` case of the golden folder, reproduced by the reference and by the
//! device path (the CubeCL kernels on wgpu/CUDA devices): packed bytes, absmax and dequantized
//! values equal bitsandbytes' bit for bit.

mod common;

use burn::tensor::Tensor;
use common::{assert_bits_eq, devices, f32_values, golden_cases};
use kernels_cubecl::codebook::dynamic_map;
use kernels_cubecl::reference::{self, double_quantize};
use kernels_cubecl::{Absmax, Packed4bit, QuantConfig};

fn config(case: &common::GoldenCase) -> QuantConfig {
    QuantConfig::new(case.quant_type, 64, case.double_quant)
}

/// The offset is the f64-rounded mean (every backend agrees on it); torch's f32 reduction can
/// land one ulp away, so it is compared to 1 ulp.
fn assert_offset_close(name: &str, ours: f32, theirs: f32) {
    let ulps = (ours.to_bits() as i64 - theirs.to_bits() as i64).abs();
    assert!(ulps <= 1, "{name}: offset {ours} vs {theirs} ({ulps} ulp)");
}

/// Checks a state against bitsandbytes' for one case; with double quantization, the 8-bit
/// codes and nested absmax are compared after quantizing with bitsandbytes' own offset, so the
/// comparison is exact whatever the last bit of the mean.
fn assert_state_matches(case: &common::GoldenCase, state: &kernels_cubecl::QuantState, what: &str) {
    let name = format!("{} [{what}]", case.name);
    assert_eq!(state.packed, case.packed, "{name}: packed bytes");
    match &state.absmax {
        Absmax::Plain(absmax) => assert_bits_eq(
            &format!("{name}: absmax"),
            absmax,
            case.absmax.as_ref().unwrap(),
        ),
        Absmax::Double(nested) => {
            let theirs = case.offset.unwrap();
            assert_offset_close(&name, nested.offset, theirs);
            if nested.offset == theirs {
                assert_eq!(
                    &nested.codes,
                    case.absmax_u8.as_ref().unwrap(),
                    "{name}: absmax_u8"
                );
                assert_bits_eq(
                    &format!("{name}: nested_absmax"),
                    &nested.nested_absmax,
                    case.nested_absmax.as_ref().unwrap(),
                );
            }
        }
    }
}

#[test]
fn code_books_are_bitsandbytes() {
    for case in golden_cases() {
        assert_bits_eq(&case.name, case.quant_type.code(), &case.code);
        if let Some(nested_code) = &case.nested_code {
            assert_bits_eq(
                &format!("{}: nested_code", case.name),
                &dynamic_map(),
                nested_code,
            );
        }
    }
}

#[test]
fn reference_quantizes_like_bitsandbytes() {
    let cases = golden_cases();
    for case in &cases {
        let state = reference::quantize(&case.input_data(), config(case)).unwrap();
        assert_state_matches(case, &state, "reference");
        if case.double_quant {
            // The first-level absmax, double-quantized with bitsandbytes' offset: exact.
            let plain = reference::quantize(
                &case.input_data(),
                QuantConfig::new(case.quant_type, 64, false),
            )
            .unwrap();
            let Absmax::Plain(absmax) = plain.absmax else {
                unreachable!()
            };
            let nested = double_quantize(&absmax, case.offset.unwrap());
            assert_eq!(
                &nested.codes,
                case.absmax_u8.as_ref().unwrap(),
                "{}: absmax_u8",
                case.name
            );
            assert_bits_eq(
                &format!("{}: nested_absmax", case.name),
                &nested.nested_absmax,
                case.nested_absmax.as_ref().unwrap(),
            );
        }
    }
    println!("{} golden cases checked", cases.len());
}

#[test]
fn reference_dequantizes_like_bitsandbytes() {
    for case in golden_cases() {
        let data = reference::dequantize(&case.state()).unwrap();
        assert_eq!(data.dtype(), case.input_dtype, "{}", case.name);
        assert_bits_eq(&case.name, &f32_values(&data), &case.dequant);
    }
}

#[test]
fn devices_quantize_like_bitsandbytes() {
    for (device_name, device) in devices() {
        for case in golden_cases() {
            let input =
                Tensor::<1>::from_data(case.input_data().reshape([case.input.len()]), &device);
            let packed = Packed4bit::quantize(input, config(&case)).unwrap();
            assert_state_matches(&case, &packed.to_state().unwrap(), device_name);
        }
    }
}

#[test]
fn devices_dequantize_like_bitsandbytes() {
    for (device_name, device) in devices() {
        for case in golden_cases() {
            let packed = Packed4bit::from_state(&case.state(), &device).unwrap();
            let values = match case.shape.len() {
                1 => packed.dequantize::<1>().unwrap().into_data(),
                _ => packed.dequantize::<2>().unwrap().into_data(),
            };
            assert_eq!(
                values.shape().to_vec(),
                case.shape,
                "{} [{device_name}]",
                case.name
            );
            assert_bits_eq(
                &format!("{} [{device_name}]", case.name),
                &f32_values(&values),
                &case.dequant,
            );
        }
    }
}
