//! The fused cross-entropy on every device (Flex's reference, and the CubeCL kernels on
//! wgpu/cuda when built with them): per-position loss and the logits' gradient against the
//! same computed on the host in f64.

mod common;

use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use common::{devices, f32_values, max_relative_error};
use kernels_cubecl::cross_entropy;

/// `(-log softmax(row)[target], softmax(row) - onehot(target))` in f64; a target outside the
/// row picks nothing.
fn host_row(row: &[f64], target: i64) -> (f64, Vec<f64>) {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let logsumexp = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    let target = usize::try_from(target).ok().filter(|t| *t < row.len());
    let picked = target.map_or(0.0, |t| row[t]);
    let grad = (0..row.len())
        .map(|v| (row[v] - logsumexp).exp() - if Some(v) == target { 1.0 } else { 0.0 })
        .collect();
    (logsumexp - picked, grad)
}

/// 2 x 3 positions over a vocabulary of 1000 (not a multiple of the 256 units of a row), spread
/// logits, one target outside the vocabulary; in f32 and, where the device has it, bf16 (the
/// gradient then in bf16: 8 bits of mantissa).
#[test]
fn cross_entropy_and_its_gradient_equal_the_host() {
    const VOCAB: usize = 1000;
    let targets = [7i64, 999, 0, 512, 1000, 3];
    for (name, device) in devices() {
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            let autodiff = device.clone().autodiff();
            let logits =
                Tensor::<3>::random([2, 3, VOCAB], Distribution::Normal(0.0, 4.0), &autodiff)
                    .cast(dtype)
                    .require_grad();
            let target_ids =
                Tensor::<2, Int>::from_data(TensorData::new(targets.to_vec(), [2, 3]), &autodiff);
            let upstream = Tensor::<2>::random([2, 3], Distribution::Default, &autodiff);
            let nll = cross_entropy(logits.clone(), target_ids);
            assert_eq!(nll.dtype(), DType::F32);
            let grads = (nll.clone() * upstream.clone()).sum().backward();
            let grad = logits.grad(&grads).expect("the logits have a gradient");
            assert_eq!(grad.dtype(), dtype);

            let rows: Vec<f64> = f32_values(&logits.to_data())
                .into_iter()
                .map(f64::from)
                .collect();
            let scales = f32_values(&upstream.to_data());
            let mut expected_nll = Vec::new();
            let mut expected_grad = Vec::new();
            for ((row, &target), scale) in rows.chunks(VOCAB).zip(&targets).zip(&scales) {
                let (nll, grad) = host_row(row, target);
                expected_nll.push(nll);
                expected_grad.extend(grad.into_iter().map(|g| g * f64::from(*scale)));
            }
            let what = format!("{name} {dtype:?}");
            // The loss in f32 from the same (possibly bf16) logits: f32 rounding only.
            let error = max_relative_error(&f32_values(&nll.to_data()), &expected_nll);
            assert!(error < 1e-5, "{what}: loss relative error {error}");
            let error = max_relative_error(&f32_values(&grad.to_data()), &expected_grad);
            assert!(error < tolerance, "{what}: gradient relative error {error}");
        }
    }
}
