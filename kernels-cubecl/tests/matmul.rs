//! The 4-bit matmul on every device (Flex, and the CubeCL kernels on wgpu/cuda when built with
//! them): its forward (and the untransposed product `g·W`) equals the product with the
//! dequantized weight, and its backward gives the input the gradient the dense product gives,
//! dequantizing again instead of keeping the dense weight; and the frozen dense head's product.

mod common;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use common::{GoldenCase, devices, golden_matrices, half_dtype};
use integration_tests::relative_error;
use kernels_cubecl::{Packed4bit, QuantConfig, QuantType, frozen_matmul};

/// Relative, for f32: both sides multiply the same dense weight, maybe in another order.
const TOLERANCE: f32 = 1e-5;

#[test]
fn matmul_4bit_equals_the_dense_product_forward_and_backward() {
    for (name, device) in devices() {
        for config in [
            QuantConfig::default(),
            QuantConfig::new(QuantType::Fp4, 32, false),
        ] {
            // 72 x 100: not a multiple of the block, the word, or the nested block.
            let weight = Tensor::<2>::random([72, 100], Distribution::Default, &device);
            let packed = Packed4bit::quantize(weight, config).unwrap();
            let dense = packed.dequantize::<2>().unwrap();
            let autodiff = device.clone().autodiff();
            let x = Tensor::<3>::random([2, 3, 100], Distribution::Default, &autodiff);
            let upstream = Tensor::<3>::random([2, 3, 72], Distribution::Default, &autodiff);

            let x_ours = x.clone().require_grad();
            let y = packed.linear(x_ours.clone()).unwrap();
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let grad = x_ours.grad(&grads).expect("the input has a gradient");

            let x_dense = x.require_grad();
            let dense = dense.to_device(&autodiff);
            let y_dense = x_dense
                .clone()
                .matmul(dense.clone().transpose().unsqueeze());
            let grads = (y_dense.clone() * upstream.clone()).sum().backward();
            let grad_dense = x_dense.grad(&grads).expect("the input has a gradient");

            let what = format!("{name} {config:?}");
            // The backward's product on its own: `g · W`, the weight untransposed.
            let upstream = upstream.inner();
            let error = relative_error(
                packed.matmul(upstream.clone()).unwrap(),
                upstream.matmul(dense.clone().inner().unsqueeze()),
            );
            assert!(error < TOLERANCE, "{what}: g·W relative error {error}");
            let error = relative_error(y.inner(), y_dense.inner());
            assert!(error < TOLERANCE, "{what}: y relative error {error}");
            let error = relative_error(grad, grad_dense);
            assert!(error < TOLERANCE, "{what}: grad x relative error {error}");
        }
    }
}

/// Decoding's products (up to four rows, whole words per row) take the fused matrix-vector
/// kernel on CubeCL devices: it must give the product with the dequantized weight, blocks
/// straddling rows included (136 columns: whole words, not whole blocks).
#[test]
fn matmul_4bit_with_few_rows_equals_the_dense_product() {
    for (name, device) in devices() {
        for config in [
            QuantConfig::default(),
            QuantConfig::new(QuantType::Fp4, 32, false),
        ] {
            let weight = Tensor::<2>::random([72, 136], Distribution::Default, &device);
            let packed = Packed4bit::quantize(weight, config).unwrap();
            let dense = packed.dequantize::<2>().unwrap();
            // The reference product runs on the CPU: Burn's f32 matmul on CUDA rounds its
            // inputs to TF32 (10 mantissa bits), which the kernel does not.
            let host = Device::flex();
            let dense = dense.to_device(&host);
            for rows in 1..=4 {
                let x = Tensor::<3>::random([1, rows, 136], Distribution::Default, &device);
                let y = packed.linear(x.clone()).unwrap().to_device(&host);
                let y_dense = x
                    .to_device(&host)
                    .matmul(dense.clone().transpose().unsqueeze());
                let error = relative_error(y, y_dense);
                assert!(
                    error < TOLERANCE,
                    "{name} {config:?} {rows} rows: relative error {error}"
                );
            }
        }
    }
}

/// A decoding step's product against bitsandbytes' own dequantized weights: for every 2-D golden
/// state (f32 input, NF4 and FP4, with and without double quantization), one row times the
/// state's weight equals that row times bitsandbytes' `dequant` values.
#[test]
fn matvec_with_golden_states_equals_bitsandbytes_dequantized_product() {
    let cases = golden_matrices(DType::F32, |_| true);
    if cases.is_empty() {
        return;
    }
    // The reference product runs on the CPU, as above: on CUDA Burn's f32 matmul is TF32's.
    let host = Device::flex();
    for (name, device) in devices() {
        for case in &cases {
            let (packed, theirs) = golden_weight(case, &device);
            let x = Tensor::<2>::random([1, case.shape[1]], Distribution::Default, &device);
            let y = packed.linear(x.clone()).unwrap().to_device(&host);
            let reference = x
                .to_device(&host)
                .matmul(theirs.to_device(&host).transpose());
            let error = relative_error(y, reference);
            assert!(
                error < TOLERANCE,
                "{name} {}: relative error {error}",
                case.name
            );
        }
    }
}

#[test]
fn matmul_4bit_runs_in_the_input_dtype_and_refuses_a_wrong_shape() {
    for (name, device) in devices() {
        let weight = Tensor::<2>::random([64, 128], Distribution::Default, &device);
        let packed = Packed4bit::quantize(weight, QuantConfig::default()).unwrap();
        if device.supports_dtype(DType::F16) {
            let x = Tensor::<2>::random([4, 128], Distribution::Default, (&device, DType::F16));
            let y = packed.linear(x).unwrap();
            assert_eq!(y.dtype(), DType::F16, "{name}");
            assert_eq!(y.dims(), [4, 64], "{name}");
        }
        let x = Tensor::<2>::zeros([4, 100], &device);
        let err = packed.linear(x.clone()).unwrap_err().to_string();
        assert!(err.contains("128 input features"), "{name}: {err}");
        let err = packed.matmul(x).unwrap_err().to_string();
        assert!(err.contains("64 rows"), "{name}: {err}");
    }
}

/// The frozen head's product: Burn's matmul forward, the input gradient of Burn's matmul, and no
/// gradient for the weight even where it requires one (the 4-bit products' routine on CubeCL
/// devices, which lavapipe declines for lack of TMA: Burn's matmul then, as on Flex).
#[test]
fn frozen_matmul_equals_the_dense_product_and_leaves_the_weight_without_gradient() {
    for (name, device) in devices() {
        let autodiff = device.clone().autodiff();
        let weight = Tensor::<2>::random([96, 40], Distribution::Default, &autodiff);
        let x = Tensor::<3>::random([2, 5, 96], Distribution::Default, &autodiff);
        let upstream = Tensor::<3>::random([2, 5, 40], Distribution::Default, &autodiff);

        let (x_ours, weight_ours) = (x.clone().require_grad(), weight.clone().require_grad());
        let y = frozen_matmul(x_ours.clone(), weight_ours.clone());
        let grads = (y.clone() * upstream.clone()).sum().backward();
        let grad = x_ours.grad(&grads).expect("the input has a gradient");
        assert!(
            weight_ours.grad(&grads).is_none(),
            "{name}: the frozen weight got a gradient"
        );

        let x_dense = x.require_grad();
        let y_dense = x_dense.clone().matmul(weight.unsqueeze());
        let grads = (y_dense.clone() * upstream).sum().backward();
        let grad_dense = x_dense.grad(&grads).expect("the input has a gradient");

        let error = relative_error(y.inner(), y_dense.inner());
        assert!(error < TOLERANCE, "{name}: y relative error {error}");
        let error = relative_error(grad, grad_dense);
        assert!(error < TOLERANCE, "{name}: grad x relative error {error}");
    }
}

/// bf16 products at tile-aligned sizes, where an H100 takes the hand-written `wgmma` kernel (the
/// TMA routine or Burn's matmul elsewhere): the forward `x·Wᵀ` (a column-major right-hand side),
/// the input gradient `g·W` and the frozen head's `x·W` (row-major ones), each equal to the f32
/// product of the same bf16 values on Flex up to the output's bf16 rounding. Outputs 512 and 256
/// wide take the kernel's 256-wide tiles, 384 wide its 128-wide ones, each layout both; a depth
/// of 512 is eight 64-deep stages, twice round the kernel's four-stage ring.
/// WGSL has no bf16, so wgpu runs the same products in f16.
#[test]
fn bf16_products_at_tile_sizes_equal_the_f32_product() {
    // bf16 keeps 8 significant bits (f16 11): each output rounds by up to 2^-9 relative.
    const BF16_TOLERANCE: f32 = 4e-3;
    let reference = Device::flex();
    for (name, device) in devices() {
        let dtype = half_dtype(name);
        let half_values = |tensor: Tensor<2>| {
            let data = tensor.cast(dtype).into_data();
            Tensor::<2>::from_data(data.convert::<f32>(), &reference)
        };
        let quantized = |rows: usize| {
            let weight = Tensor::<2>::random([rows, 512], Distribution::Default, &device);
            let packed = Packed4bit::quantize(weight, QuantConfig::default()).unwrap();
            let dense = half_values(packed.dequantize::<2>().unwrap());
            (packed, dense)
        };
        let (wide, wide_dense) = quantized(512);
        let (narrow, narrow_dense) = quantized(384);
        let x = Tensor::<2>::random([256, 512], Distribution::Default, &device).cast(dtype);
        let g = Tensor::<2>::random([256, 512], Distribution::Default, &device).cast(dtype);
        let head = Tensor::<2>::random([512, 384], Distribution::Default, &device).cast(dtype);
        let cases = [
            (
                "x·Wᵀ 512 wide",
                wide.linear(x.clone()).unwrap(),
                half_values(x.clone()).matmul(wide_dense.clone().transpose()),
            ),
            (
                "x·Wᵀ 384 wide",
                narrow.linear(x.clone()).unwrap(),
                half_values(x.clone()).matmul(narrow_dense.transpose()),
            ),
            (
                "g·W 512 wide",
                wide.matmul(g.clone()).unwrap(),
                half_values(g).matmul(wide_dense),
            ),
            (
                "head x·W 384 wide",
                frozen_matmul(x.clone(), head.clone()),
                half_values(x).matmul(half_values(head)),
            ),
        ];
        for (product, ours, expected) in cases {
            assert_eq!(ours.dtype(), dtype, "{name} {product}");
            let ours = half_values(ours);
            let error = relative_error(ours, expected);
            assert!(
                error < BF16_TOLERANCE,
                "{name} {product}: relative error {error}"
            );
        }
    }
}

/// A linear layer's 4-bit products, the forward `x · Wᵀ` and the input gradient's `g · W`, are
/// bitwise the products with the dequantized weight through the dense routine (`frozen_matmul`),
/// for NF4 with and without double quantization and FP4, at both `wgmma` tile widths on CUDA
/// (512 and 384 rows), over a 3-D input: the dequantization rounds each value once and nothing
/// else differs. On CUDA with `KERNELS_CUBECL_4BIT_PRODUCTS=fused` both dequantize inside their
/// product (`wgmma_4bit`, computing the transpose) and the reference is the dense `wgmma` kernel:
/// the same sums. WGSL has no bf16, so wgpu runs it in f16.
#[test]
fn products_4bit_equal_the_dequantized_products_bitwise() {
    for (name, device) in devices() {
        let dtype = half_dtype(name);
        for config in [
            QuantConfig::default(),
            QuantConfig::new(QuantType::Nf4, 64, false),
            QuantConfig::new(QuantType::Fp4, 64, true),
        ] {
            for rows in [512, 384] {
                let weight = Tensor::<2>::random([rows, 512], Distribution::Default, &device);
                let packed = Packed4bit::quantize(weight, config).unwrap();
                let dense = packed.dequantize::<2>().unwrap().cast(dtype);
                let x =
                    Tensor::<3>::random([2, 128, 512], Distribution::Default, &device).cast(dtype);
                let ours = packed.linear(x.clone()).unwrap();
                let theirs = frozen_matmul(x, dense.clone().transpose());
                let difference = largest_difference(ours, theirs);
                assert_eq!(difference, 0.0, "{name} {config:?} {rows} rows: x · Wᵀ");
                let g =
                    Tensor::<3>::random([2, 128, rows], Distribution::Default, &device).cast(dtype);
                let ours = packed.matmul(g.clone()).unwrap();
                let difference = largest_difference(ours, frozen_matmul(g, dense));
                assert_eq!(difference, 0.0, "{name} {config:?} {rows} rows: g · W");
            }
        }
    }
}

/// The same forward against bitsandbytes' own dequantized bf16 weights: for the golden bf16
/// states whose sizes the `wgmma` kernel's tiles divide (128 x 64 and 256 x 320), NF4 and FP4,
/// with and without double quantization, `x · Wᵀ` equals `x` times bitsandbytes' `dequant`
/// values through the dense routine, bitwise. wgpu is left out: WGSL has no bf16.
#[test]
fn forward_4bit_with_golden_states_equals_bitsandbytes_dequantized_product() {
    let cases = golden_matrices(DType::BF16, |case| {
        case.shape[0] % 128 == 0 && case.shape[1] % 64 == 0
    });
    if cases.is_empty() {
        return;
    }
    for (name, device) in devices().into_iter().filter(|(name, _)| *name != "wgpu") {
        for case in &cases {
            let (packed, theirs) = golden_weight(case, &device);
            let theirs = theirs.cast(DType::BF16);
            let x = Tensor::<2>::random([256, case.shape[1]], Distribution::Default, &device)
                .cast(DType::BF16);
            let ours = packed.linear(x.clone()).unwrap();
            let expected = frozen_matmul(x, theirs.transpose());
            let difference = largest_difference(ours, expected);
            assert_eq!(difference, 0.0, "{name} {}", case.name);
        }
    }
}

/// The largest absolute difference between two tensors of one shape, in f32.
fn largest_difference<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a.cast(DType::F32) - b.cast(DType::F32))
        .abs()
        .max()
        .into_scalar::<f32>()
}

/// A 2-D golden case's state on `device`, and bitsandbytes' dequantized weight beside it.
fn golden_weight(case: &GoldenCase, device: &Device) -> (Packed4bit, Tensor<2>) {
    let packed = Packed4bit::from_state(&case.state(), device).unwrap();
    let shape = [case.shape[0], case.shape[1]];
    let theirs = Tensor::<2>::from_data(TensorData::new(case.dequant.clone(), shape), device);
    (packed, theirs)
}

/// At the 7B MLP's width (11008 outputs from 2048 rows: 688 tiles 256 wide) the `wgmma` product
/// takes its last columns in a second launch of 64-wide tiles (on 114 or 132 multiprocessors):
/// the forward `x·Wᵀ` and the input gradient `g·W` equal the f32 product of the same bf16 values,
/// over all columns and over the last 512 alone. CUDA only: the other devices take other routines.
#[cfg(feature = "cuda")]
#[test]
fn bf16_products_split_into_two_tile_widths_equal_the_f32_product() {
    const BF16_TOLERANCE: f32 = 4e-3;
    let device = Device::cuda(0usize);
    let reference = Device::flex();
    let to_reference = |tensor: Tensor<2>| {
        let data = tensor.cast(DType::BF16).into_data();
        Tensor::<2>::from_data(data.convert::<f32>(), &reference)
    };
    let quantized = |shape: [usize; 2]| {
        let weight = Tensor::<2>::random(shape, Distribution::Default, &device);
        let packed = Packed4bit::quantize(weight, QuantConfig::default()).unwrap();
        let dense = to_reference(packed.dequantize::<2>().unwrap());
        (packed, dense)
    };
    let (up, up_dense) = quantized([11008, 512]);
    let (down, down_dense) = quantized([512, 11008]);
    let x = Tensor::<2>::random([2048, 512], Distribution::Default, &device).cast(DType::BF16);
    let cases = [
        (
            "x·Wᵀ",
            up.linear(x.clone()).unwrap(),
            to_reference(x.clone()).matmul(up_dense.transpose()),
        ),
        (
            "g·W",
            down.matmul(x.clone()).unwrap(),
            to_reference(x).matmul(down_dense),
        ),
    ];
    for (product, ours, expected) in cases {
        let ours = to_reference(ours);
        let error = relative_error(ours.clone(), expected.clone());
        assert!(error < BF16_TOLERANCE, "{product}: relative error {error}");
        let last = |tensor: Tensor<2>| tensor.slice([0..2048, 10496..11008]);
        let error = relative_error(last(ours), last(expected));
        assert!(
            error < BF16_TOLERANCE,
            "{product}, last 512 columns: relative error {error}"
        );
    }
}
