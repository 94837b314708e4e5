//! The causal softmax on every device (Flex's loop, and the CubeCL kernels on wgpu/cuda when
//! built with them): probabilities and the scores' gradient against the same computed on the
//! host in f64.

mod common;

use burn::tensor::{DType, Distribution, Tensor};
use common::{devices, f32_values, max_relative_error};
use kernels_cubecl::causal_softmax;

/// `(softmax(scale · row[..visible]) then zeros, scale · p · (upstream - Σ upstream · p))`.
fn host_row(row: &[f64], upstream: &[f64], visible: usize, scale: f64) -> (Vec<f64>, Vec<f64>) {
    let max = row[..visible]
        .iter()
        .fold(f64::NEG_INFINITY, |m, x| m.max(x * scale));
    let exps: Vec<f64> = (0..row.len())
        .map(|k| {
            if k < visible {
                (row[k] * scale - max).exp()
            } else {
                0.0
            }
        })
        .collect();
    let sum: f64 = exps.iter().sum();
    let probs: Vec<f64> = exps.iter().map(|e| e / sum).collect();
    let dot: f64 = probs.iter().zip(upstream).map(|(p, u)| p * u).sum();
    let grad = probs
        .iter()
        .zip(upstream)
        .map(|(p, u)| scale * p * (u - dot))
        .collect();
    (probs, grad)
}

/// Training's square scores (no cache), a prefill after cached keys, and one decoded token;
/// 2 x 3 heads of rows (30 rows: not a whole number of the kernel's 8-row cubes), 41 keys at
/// most (not a multiple of its 32 lanes); in f32 and, where the device has it, bf16 (8 bits of
/// mantissa in the probabilities and the gradient).
#[test]
fn causal_softmax_and_its_gradient_equal_the_host() {
    let scale = 0.125;
    for (name, device) in devices() {
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            for (queries, offset) in [(41, 0), (5, 36), (1, 40)] {
                let keys = offset + queries;
                let shape = [2, 3, queries, keys];
                let autodiff = device.clone().autodiff();
                let scores = Tensor::<4>::random(shape, Distribution::Normal(0.0, 8.0), &autodiff)
                    .cast(dtype)
                    .require_grad();
                let upstream =
                    Tensor::<4>::random(shape, Distribution::Default, &autodiff).cast(dtype);
                let probs = causal_softmax(scores.clone(), scale, offset);
                assert_eq!(probs.dtype(), dtype);
                let grads = (probs.clone() * upstream.clone()).sum().backward();
                let grad = scores.grad(&grads).expect("the scores have a gradient");
                assert_eq!(grad.dtype(), dtype);

                let widen = |t: &Tensor<4>| -> Vec<f64> {
                    f32_values(&t.to_data())
                        .into_iter()
                        .map(f64::from)
                        .collect()
                };
                let (rows, upstream) = (widen(&scores), widen(&upstream));
                let mut expected_probs = Vec::new();
                let mut expected_grad = Vec::new();
                for (index, (row, upstream)) in
                    rows.chunks(keys).zip(upstream.chunks(keys)).enumerate()
                {
                    let visible = offset + index % queries + 1;
                    let (probs, grad) = host_row(row, upstream, visible, scale);
                    expected_probs.extend(probs);
                    expected_grad.extend(grad);
                }
                let what = format!("{name} {dtype:?} {queries} queries after {offset}");
                let error = max_relative_error(&f32_values(&probs.to_data()), &expected_probs);
                assert!(
                    error < tolerance,
                    "{what}: probabilities relative error {error}"
                );
                let error = max_relative_error(&f32_values(&grad.to_data()), &expected_grad);
                assert!(error < tolerance, "{what}: gradient relative error {error}");
            }
        }
    }
}
