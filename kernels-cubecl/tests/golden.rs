//! Every `bnb_*.safetensors` case of the golden folder, reproduced by the reference and by the
//! device path (the CubeCL kernels on wgpu/CUDA devices): packed bytes, absmax and dequantized
//! values equal bitsandbytes' bit for bit.

mod common;

use burn::tensor::Tensor;
use common::{assert_bits_eq, assert_bytes_eq, devices, f32_values, golden_cases};
use kernels_cubecl::codebook::{FP4_THRESHOLDS, NF4_THRESHOLDS, dynamic_map};
use kernels_cubecl::reference::{self, double_quantize};
use kernels_cubecl::{Absmax, Packed4bit, QuantConfig, QuantType};

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
    assert_packed_matches(case, &state.packed, &name);
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
                assert_bytes_eq(
                    &format!("{name}: absmax_u8"),
                    &nested.codes,
                    case.absmax_u8.as_ref().unwrap(),
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

/// bitsandbytes is built with `--use_fast_math`: its `1.0f / absmax` is the hardware's
/// approximate reciprocal, one ulp off at times, which moves a value sitting exactly on a decision
/// threshold (bf16 inputs make such exact ties, e.g. 0.4296875 / 2.0625 = 5/24) to the other
/// side. Bytes must be equal except where a code differs on such a tie: the scaled value within
/// two ulps of a threshold. At most one element in a thousand may be such a tie.
fn assert_packed_matches(case: &common::GoldenCase, ours: &[u8], name: &str) {
    assert_eq!(ours.len(), case.packed.len(), "{name}: packed length");
    let n = case.input.len();
    let mut ties = 0;
    for i in (0..n).filter(|&i| nibble(ours, i) != nibble(&case.packed, i)) {
        let block = &case.input[i / 64 * 64..((i / 64 + 1) * 64).min(n)];
        let absmax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scaled = case.input[i] * (1.0 / absmax);
        let (value, thresholds): (f32, &[f32]) = match case.quant_type {
            QuantType::Nf4 => (scaled, &NF4_THRESHOLDS),
            QuantType::Fp4 => (scaled.abs(), &FP4_THRESHOLDS),
        };
        let on_tie = thresholds
            .iter()
            .any(|t| (value.to_bits() as i64 - t.to_bits() as i64).abs() <= 2);
        assert!(
            on_tie,
            "{name}: element {i} coded {} vs {} off any threshold ({value})",
            nibble(ours, i),
            nibble(&case.packed, i)
        );
        ties += 1;
    }
    assert!(
        ties * 1000 <= n,
        "{name}: {ties} threshold ties in {n} elements"
    );
}

fn nibble(packed: &[u8], i: usize) -> u8 {
    if i.is_multiple_of(2) {
        packed[i / 2] >> 4
    } else {
        packed[i / 2] & 0x0F
    }
}

#[test]
fn code_books_are_bitsandbytes() {
    for case in golden_cases() {
        // By value: the kernel's FP4 code 8 is -0.0, bitsandbytes' Python table has 0.0.
        assert_eq!(
            case.quant_type.code().as_slice(),
            case.code.as_slice(),
            "{}",
            case.name
        );
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
            assert_bytes_eq(
                &format!("{}: absmax_u8", case.name),
                &nested.codes,
                case.absmax_u8.as_ref().unwrap(),
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
            if !device.supports_dtype(case.input_dtype) {
                println!(
                    "{} skipped on {device_name}: no {:?} there",
                    case.name, case.input_dtype
                );
                continue;
            }
            let input = Tensor::<1>::from_data(case.input_data(), (&device, case.input_dtype));
            let packed = Packed4bit::quantize(input, config(&case)).unwrap();
            assert_state_matches(&case, &packed.to_state().unwrap(), device_name);
        }
    }
}

#[test]
fn devices_dequantize_like_bitsandbytes() {
    for (device_name, device) in devices() {
        for case in golden_cases() {
            if !device.supports_dtype(case.input_dtype) {
                println!(
                    "{} skipped on {device_name}: no {:?} there",
                    case.name, case.input_dtype
                );
                continue;
            }
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
