//! Properties on random data: the CubeCL kernels agree with the reference bit for bit on any
//! shape, block size, code book and dtype; NF4's round-trip error on N(0, 1) data is in the
//! range the format predicts; bad input is refused with an error.

mod common;

use burn::tensor::{DType, Device, Tensor, TensorData};
use common::{assert_bits_eq, cube_devices, devices, f32_values};
use half::{bf16, f16};
use kernels_cubecl::{Packed4bit, QuantConfig, QuantError, QuantState, QuantType, reference};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// N(0, 1) samples by Box-Muller, scaled, with a zero block and a NaN-free tail.
fn normal(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
            scale * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

fn data(values: Vec<f32>, dtype: DType) -> TensorData {
    let n = values.len();
    match dtype {
        DType::F16 => TensorData::new(values.into_iter().map(f16::from_f32).collect(), [n]),
        DType::BF16 => TensorData::new(values.into_iter().map(bf16::from_f32).collect(), [n]),
        _ => TensorData::new(values, [n]),
    }
}

fn quantize_on(device: &Device, data: &TensorData, config: QuantConfig) -> QuantState {
    Packed4bit::quantize(
        Tensor::<1>::from_data(data.clone(), (device, data.dtype())),
        config,
    )
    .unwrap()
    .to_state()
    .unwrap()
}

#[test]
fn kernels_agree_with_reference_on_random_shapes() {
    let cube = cube_devices();
    if cube.is_empty() {
        println!("skipped: built without a CubeCL runtime feature (wgpu or cuda)");
        return;
    }
    let mut rng = StdRng::seed_from_u64(7);
    let sizes = [1, 2, 7, 33, 63, 64, 65, 255, 1000, 4097, 16_385, 300_007];
    let mut checked = 0;
    for (device_name, device) in &cube {
        for (i, &n) in sizes.iter().enumerate() {
            let quant_type = if i % 2 == 0 {
                QuantType::Nf4
            } else {
                QuantType::Fp4
            };
            let block_size = [32, 64, 128, 4096][i % 4];
            let dtype = [DType::F32, DType::BF16, DType::F16][i % 3];
            let mut values = normal(&mut rng, n, 0.02 + i as f32);
            // An all-zero block (absmax 0) where there is room for one.
            if n >= 3 * block_size {
                values[block_size..2 * block_size].fill(0.0);
            }
            if !device.supports_dtype(dtype) {
                println!("n={n}: {dtype:?} skipped on {device_name}");
                continue;
            }
            let input = data(values, dtype);
            for double_quant in [false, true] {
                let config = QuantConfig::new(quant_type, block_size, double_quant);
                let what = format!("n={n} {config:?} {dtype:?} [{device_name}]");
                let expected = reference::quantize(&input, config).unwrap();
                let actual = quantize_on(device, &input, config);
                assert_eq!(actual, expected, "{what}: quantized state");
                let on_device = Packed4bit::from_state(&expected, device).unwrap();
                let dequantized = on_device.dequantize::<1>().unwrap().into_data();
                let reference = reference::dequantize(&expected).unwrap();
                assert_eq!(dequantized.dtype(), dtype, "{what}");
                assert_bits_eq(&what, &f32_values(&dequantized), &f32_values(&reference));
                checked += 1;
            }
        }
    }
    println!("{checked} random cases agree bit for bit");
}

#[test]
fn nf4_round_trip_error_on_normal_data() {
    let mut rng = StdRng::seed_from_u64(3);
    let values = normal(&mut rng, 1 << 18, 1.0);
    for (device_name, device) in devices() {
        for double_quant in [false, true] {
            let config = QuantConfig::new(QuantType::Nf4, 64, double_quant);
            let input =
                Tensor::<1>::from_data(TensorData::new(values.clone(), [values.len()]), &device);
            let restored = Packed4bit::quantize(input, config)
                .unwrap()
                .dequantize::<1>()
                .unwrap();
            let restored = f32_values(&restored.into_data());
            let mae = values
                .iter()
                .zip(&restored)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / values.len() as f32;
            let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
            let relative = norm(&mut values.iter().zip(&restored).map(|(a, b)| a - b))
                / norm(&mut values.iter().copied());
            // NF4, blocks of 64, N(0,1): mean |error| about 0.073, relative L2 error about 0.092.
            assert!(
                (0.065..0.080).contains(&mae),
                "[{device_name}] dq={double_quant}: mean abs error {mae}"
            );
            assert!(
                (0.085..0.100).contains(&relative),
                "[{device_name}] dq={double_quant}: relative error {relative}"
            );
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    for (device_name, device) in devices() {
        let ones = Tensor::<1>::ones([100], &device);
        let bad_block =
            Packed4bit::quantize(ones.clone(), QuantConfig::new(QuantType::Nf4, 48, false));
        assert!(
            matches!(bad_block, Err(QuantError::BlockSize(48))),
            "[{device_name}] {bad_block:?}"
        );
        let too_big =
            Packed4bit::quantize(ones.clone(), QuantConfig::new(QuantType::Nf4, 8192, true));
        assert!(
            matches!(too_big, Err(QuantError::BlockSize(8192))),
            "[{device_name}]"
        );

        let empty = Packed4bit::quantize(Tensor::<1>::zeros([0], &device), QuantConfig::default());
        assert!(
            matches!(empty, Err(QuantError::Empty { .. })),
            "[{device_name}] {empty:?}"
        );

        let ints = reference::quantize(
            &TensorData::new(vec![1i64, 2, 3], [3]),
            QuantConfig::default(),
        );
        assert!(
            matches!(ints, Err(QuantError::Dtype(DType::I64))),
            "{ints:?}"
        );

        let mut state = reference::quantize(
            &TensorData::new(vec![1.0f32; 100], [10, 10]),
            QuantConfig::default(),
        )
        .unwrap();
        state.packed.pop();
        let err = Packed4bit::from_state(&state, &device).unwrap_err();
        assert!(
            err.to_string()
                .contains("packed weight has 49 entries but shape [10, 10] needs 50"),
            "{err}"
        );

        let packed = Packed4bit::quantize(ones, QuantConfig::default()).unwrap();
        assert!(
            packed.dequantize::<2>().is_err(),
            "[{device_name}] wrong rank accepted"
        );
        assert!(matches!(
            packed.dequantize_to::<1>(DType::I32),
            Err(QuantError::Dtype(DType::I32))
        ));
    }
}
