//! Attention's head transposes on every device (Flex's view, and the CubeCL kernel on wgpu/cuda
//! when built with it): the transposed heads and their gradient equal the host's transpose to
//! the bit, from contiguous heads (whole vectors) and from strided ones (a swapped view, and rows
//! too narrow for a vector).

mod common;

use burn::tensor::{DType, Distribution, Tensor};
use common::{assert_bits_eq, devices, f32_values};
use kernels_cubecl::swap_heads;

/// `values` of a contiguous `[d0, d1, d2, width]` tensor, dimensions 1 and 2 swapped.
fn host_swap(values: &[f32], [d0, d1, d2, width]: [usize; 4]) -> Vec<f32> {
    let mut out = Vec::with_capacity(values.len());
    for a in 0..d0 {
        for j in 0..d2 {
            for i in 0..d1 {
                let row = ((a * d1 + i) * d2 + j) * width;
                out.extend_from_slice(&values[row..row + width]);
            }
        }
    }
    out
}

#[test]
fn swapped_heads_and_their_gradient_equal_the_host() {
    for (name, device) in devices() {
        for dtype in [DType::F32, DType::BF16] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            // Heads of 16 and 8 (whole vectors), of 3 (one element at a time), and a swapped
            // view of the first (strided rows).
            for (dims, from_view) in [
                ([2, 5, 3, 16], false),
                ([2, 5, 3, 8], true),
                ([1, 4, 6, 3], false),
            ] {
                let autodiff = device.clone().autodiff();
                let source =
                    Tensor::<4>::random(dims, Distribution::Default, &autodiff).cast(dtype);
                let (x, x_dims) = if from_view {
                    let [d0, d1, d2, width] = dims;
                    (source.clone().swap_dims(1, 2), [d0, d2, d1, width])
                } else {
                    (source.clone(), dims)
                };
                let x = x.require_grad();
                let [d0, d1, d2, width] = x_dims;
                let upstream =
                    Tensor::<4>::random([d0, d2, d1, width], Distribution::Default, &autodiff)
                        .cast(dtype);
                let out = swap_heads(x.clone());
                assert_eq!(out.dims(), [d0, d2, d1, width]);
                assert_eq!(out.dtype(), dtype);
                let grads = (out.clone() * upstream.clone()).sum().backward();
                let grad = x.grad(&grads).expect("x has a gradient");

                let what = format!("{name} {dtype:?} {x_dims:?} from a view: {from_view}");
                // The host's values of `x` in its logical order.
                let x_values = f32_values(&x.clone().into_data());
                assert_bits_eq(
                    &format!("{what}: output"),
                    &f32_values(&out.into_data()),
                    &host_swap(&x_values, x_dims),
                );
                assert_bits_eq(
                    &format!("{what}: gradient"),
                    &f32_values(&grad.into_data()),
                    &host_swap(&f32_values(&upstream.into_data()), [d0, d2, d1, width]),
                );
            }
        }
    }
}
