//! Rotary position embeddings on every device (Flex's loop, and the CubeCL kernel on wgpu/cuda
//! when built with it): the rotated heads and their gradient against the same computed on the
//! host in f64, reading the heads as attention gets them (middle dimensions swapped).

mod common;

use burn::tensor::{DType, Distribution, Tensor, TensorData};
use common::{devices, f32_values, max_relative_error};
use kernels_cubecl::rotary;

/// `[positions, width]` tables of `cat(freqs, freqs)` angles, as LLaMA's.
fn tables(positions: usize, width: usize) -> (Vec<f64>, Vec<f64>) {
    let half = width / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for position in 0..positions {
        for k in 0..width {
            let freq = 10_000f64.powf(-2.0 * (k % half) as f64 / width as f64);
            let angle = position as f64 * freq;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Each row of `x` (`[rows, width]`, row `r` at position `offset + r % seq`) rotated by the
/// angles, forward (`sign` 1) or transposed (`sign` -1).
fn host_rotate(
    x: &[f64],
    cos: &[f64],
    sin: &[f64],
    seq: usize,
    offset: usize,
    width: usize,
    sign: f64,
) -> Vec<f64> {
    let half = width / 2;
    let mut out = vec![0.0; x.len()];
    for (row, (x, out)) in x.chunks(width).zip(out.chunks_mut(width)).enumerate() {
        let angles = (offset + row % seq) * width;
        for i in 0..half {
            let (c, s) = (cos[angles + i], sign * sin[angles + i]);
            out[i] = x[i] * c - x[i + half] * s;
            out[i + half] = x[i + half] * c + x[i] * s;
        }
    }
    out
}

/// Training's heads from position 0 and a decoding step's from position 9, 2 x 3 heads of widths
/// 8 and 32 (whole vectors per half) and 6 (one element at a time), from `[batch, seq, heads,
/// width]` tensors; in f32 and, where the device has it, bf16 (each product rounded to 8 bits of
/// mantissa).
#[test]
fn rotary_and_its_gradient_equal_the_host() {
    let positions = 16;
    for (width, (name, device)) in [8, 6, 32]
        .into_iter()
        .flat_map(|width| devices().into_iter().map(move |device| (width, device)))
    {
        let (cos, sin) = tables(positions, width);
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            for (seq, offset) in [(5, 0), (1, 9)] {
                let autodiff = device.clone().autodiff();
                let table = |values: &[f64]| {
                    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
                    Tensor::<2>::from_data(
                        TensorData::new(values, [positions, width]),
                        (&autodiff, DType::F32),
                    )
                };
                let x = Tensor::<4>::random([2, seq, 3, width], Distribution::Default, &autodiff)
                    .cast(dtype)
                    .swap_dims(1, 2)
                    .require_grad();
                let upstream =
                    Tensor::<4>::random([2, 3, seq, width], Distribution::Default, &autodiff)
                        .cast(dtype);
                let out = rotary(x.clone(), table(&cos), table(&sin), offset);
                assert_eq!(out.dims(), [2, 3, seq, width]);
                assert_eq!(out.dtype(), dtype);
                let grads = (out.clone() * upstream.clone()).sum().backward();
                let grad = x.grad(&grads).expect("x has a gradient");

                let widen = |tensor: Tensor<4>| -> Vec<f64> {
                    f32_values(&tensor.to_data())
                        .into_iter()
                        .map(f64::from)
                        .collect()
                };
                let expected = host_rotate(&widen(x.clone()), &cos, &sin, seq, offset, width, 1.0);
                let expected_grad =
                    host_rotate(&widen(upstream), &cos, &sin, seq, offset, width, -1.0);
                let what = format!("{name} {dtype:?} width {width} seq {seq} offset {offset}");
                let error = max_relative_error(&f32_values(&out.to_data()), &expected);
                assert!(error < tolerance, "{what}: output relative error {error}");
                let error = max_relative_error(&f32_values(&grad.to_data()), &expected_grad);
                assert!(error < tolerance, "{what}: gradient relative error {error}");
            }
        }
    }
}
