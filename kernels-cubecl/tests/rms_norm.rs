//! RMSNorm on every device (Flex's loop, and the CubeCL kernels on wgpu/cuda when built with
//! them): output and the input's gradient against the same computed on the host in f64; a
//! weight that requires a gradient gets it through Burn's operations.

mod common;

use burn::backend::Dispatch;
use burn::tensor::{DType, Device, Distribution, Tensor};
use common::{devices, f32_values, half_dtype, max_relative_error};
use kernels_cubecl::{RmsNormOps, rms_norm, rms_norm_passing};

const EPS: f64 = 1e-5;

/// Per row: `(x / rms · w, (u·w - x · Σ(u·w·x) / (n·rms²)) / rms, x / rms)`.
fn host(x: &[f64], weight: &[f64], upstream: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let width = weight.len();
    let (mut out, mut grad, mut normed) = (Vec::new(), Vec::new(), Vec::new());
    for (row, upstream) in x.chunks(width).zip(upstream.chunks(width)) {
        let mean_square = row.iter().map(|x| x * x).sum::<f64>() / width as f64 + EPS;
        let rms = mean_square.sqrt();
        let scaled: Vec<f64> = upstream.iter().zip(weight).map(|(u, w)| u * w).collect();
        let dot: f64 = scaled.iter().zip(row).map(|(g, x)| g * x).sum();
        for k in 0..width {
            normed.push(row[k] / rms);
            out.push(row[k] / rms * weight[k]);
            grad.push((scaled[k] - row[k] * dot / (width as f64 * mean_square)) / rms);
        }
    }
    (out, grad, normed)
}

/// 7 rows (not a whole number of the kernel's 2-row cubes) of 300 features (not a multiple of
/// its 128 lanes; whole vectors of 4) and of 301 (one element at a time), frozen weight, in f32
/// and, where the device has it, bf16 (the normalised value, the output and the gradient
/// rounded to 8 bits of mantissa).
/// A norm's operands on an autodiff device: `x` `[7, 1, 300]` (tracked), the weight and the
/// output's upstream gradient, random, in one dtype.
struct Case {
    x: Tensor<3>,
    weight: Tensor<1>,
    upstream: Tensor<3>,
}

impl Case {
    fn random(device: &Device, dtype: DType) -> Self {
        let random = |distribution| Tensor::<3>::random([7, 1, 300], distribution, device);
        Self {
            x: random(Distribution::Normal(0.5, 2.0))
                .cast(dtype)
                .require_grad(),
            weight: Tensor::<1>::random([300], Distribution::Normal(1.0, 0.5), device).cast(dtype),
            upstream: random(Distribution::Default).cast(dtype),
        }
    }

    /// Another random tensor of `x`'s shape and dtype, untracked.
    fn random_like(&self, distribution: Distribution) -> Tensor<3> {
        Tensor::<3>::random(self.x.dims(), distribution, &self.x.device()).cast(self.x.dtype())
    }

    /// The host's f64 gradient of the norm for `x`.
    fn host_gradient(&self) -> Vec<f64> {
        let weight: Vec<f64> = f32_values(&self.weight.to_data())
            .into_iter()
            .map(f64::from)
            .collect();
        host(&widen(&self.x), &weight, &widen(&self.upstream)).1
    }
}

/// A tensor's values in f64.
fn widen(tensor: &Tensor<3>) -> Vec<f64> {
    f32_values(&tensor.to_data())
        .into_iter()
        .map(f64::from)
        .collect()
}

#[test]
fn rms_norm_and_its_gradient_equal_the_host() {
    for (name, device) in devices() {
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            for (width, trainable_weight) in [(300, false), (300, true), (301, false)] {
                let autodiff = device.clone().autodiff();
                let shape = [7, 1, width];
                let x = Tensor::<3>::random(shape, Distribution::Normal(0.5, 2.0), &autodiff)
                    .cast(dtype)
                    .require_grad();
                let mut weight =
                    Tensor::<1>::random([width], Distribution::Normal(1.0, 0.5), &autodiff)
                        .cast(dtype);
                if trainable_weight {
                    weight = weight.require_grad();
                }
                let upstream =
                    Tensor::<3>::random(shape, Distribution::Default, &autodiff).cast(dtype);
                let out = rms_norm(x.clone(), weight.clone(), EPS);
                assert_eq!(out.dtype(), dtype);
                let grads = (out.clone() * upstream.clone()).sum().backward();
                let grad = x.grad(&grads).expect("x has a gradient");

                let widen =
                    |data| -> Vec<f64> { f32_values(&data).into_iter().map(f64::from).collect() };
                let (expected_out, expected_grad, normed) = host(
                    &widen(x.to_data()),
                    &widen(weight.to_data()),
                    &widen(upstream.to_data()),
                );
                let what =
                    format!("{name} {dtype:?} width {width} trainable weight {trainable_weight}");
                let error = max_relative_error(&f32_values(&out.to_data()), &expected_out);
                assert!(error < tolerance, "{what}: output relative error {error}");
                let error = max_relative_error(&f32_values(&grad.to_data()), &expected_grad);
                assert!(error < tolerance, "{what}: gradient relative error {error}");
                match weight.grad(&grads) {
                    Some(weight_grad) => {
                        assert!(trainable_weight, "{what}: a frozen weight got a gradient");
                        // Σ over rows of upstream · x / rms.
                        let upstream = widen(upstream.to_data());
                        let mut expected = vec![0.0; width];
                        for (k, (u, n)) in upstream.iter().zip(&normed).enumerate() {
                            expected[k % width] += u * n;
                        }
                        let error =
                            max_relative_error(&f32_values(&weight_grad.to_data()), &expected);
                        assert!(
                            error < tolerance,
                            "{what}: weight gradient relative error {error}"
                        );
                    }
                    None => assert!(!trainable_weight, "{what}: the weight got no gradient"),
                }
            }
        }
    }
}

/// A residual connection beside the norm (`x + f(rms_norm(x))`, LLaMA's blocks): `x`'s gradient
/// is the norm's plus the residual's, the norm's backward adding to the gradient the residual
/// gave `x` first (one kernel on CubeCL). Against the host's sum, in f32 and bf16 as above.
#[test]
fn rms_norm_gradient_adds_to_a_residual_gradient() {
    for (name, device) in devices() {
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            let case = Case::random(&device.clone().autodiff(), dtype);
            let Case {
                x,
                weight,
                upstream,
            } = &case;
            let residual = case.random_like(Distribution::Default);
            // The norm first, the residual's use of `x` after it: its gradient comes first.
            let normed = rms_norm(x.clone(), weight.clone(), EPS) * upstream.clone();
            let loss = (normed + x.clone() * residual.clone()).sum();
            let grad = x.grad(&loss.backward()).expect("x has a gradient");
            let expected: Vec<f64> = case
                .host_gradient()
                .iter()
                .zip(widen(&residual))
                .map(|(norm, residual)| norm + residual)
                .collect();
            let error = max_relative_error(&f32_values(&grad.to_data()), &expected);
            assert!(
                error < tolerance,
                "{name} {dtype:?}: relative error {error}"
            );
        }
    }
}

/// `rms_norm_passing(x, w, passed)`: the norm's value exactly, and the gradient of `x` the norm's
/// plus `passed` (a residual connection's, summed inside the backward kernel), against the host's
/// f64 gradient plus `passed`: within 1e-5 in f32 and 2e-2 in bf16 (f16 on wgpu), as the norm's
/// own test; also when `x` has another consumer, whose gradient is added too.
#[test]
fn rms_norm_passing_gives_x_the_passed_gradient_too() {
    for (name, device) in devices() {
        for (dtype, tolerance) in [(DType::F32, 1e-5), (half_dtype(name), 2e-2)] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            let case = Case::random(&device.clone().autodiff(), dtype);
            let Case { x, weight, .. } = &case;
            let passed = case.random_like(Distribution::Default);
            let other = case.random_like(Distribution::Default);
            let normed = rms_norm_passing(x.clone(), weight.clone(), passed.clone(), EPS);
            let plain = rms_norm(x.clone(), weight.clone(), EPS);
            let difference = (normed - plain)
                .abs()
                .max()
                .cast(DType::F32)
                .into_scalar::<f32>();
            assert_eq!(difference, 0.0, "{name} {dtype:?}: the value");
            for with_other in [false, true] {
                let normed = rms_norm_passing(x.clone(), weight.clone(), passed.clone(), EPS);
                let mut loss = (normed * case.upstream.clone()).sum();
                if with_other {
                    loss = loss + (x.clone() * other.clone()).sum();
                }
                let grad = x.grad(&loss.backward()).expect("x has a gradient");
                let expected: Vec<f64> = case
                    .host_gradient()
                    .iter()
                    .zip(widen(&passed))
                    .zip(widen(&other))
                    .map(|((norm, passed), other)| {
                        norm + passed + if with_other { other } else { 0.0 }
                    })
                    .collect();
                let error = max_relative_error(&f32_values(&grad.to_data()), &expected);
                assert!(
                    error < tolerance,
                    "{name} {dtype:?} (another consumer: {with_other}): relative error {error}"
                );
            }
        }
    }
}

/// Whether the backward can add the residual's gradient in place (nothing else holds it)
/// depends on when the other holders let go; the sum must not. With the prior held elsewhere
/// too, the kernel reads it beside a new output: the same values bit for bit, the prior left as
/// it was.
#[test]
fn a_prior_held_elsewhere_gives_the_same_sum_and_stays_unchanged() {
    for (name, device) in devices() {
        let dtype = half_dtype(name);
        if !device.supports_dtype(dtype) {
            println!("{name}: no {dtype:?}, skipped");
            continue;
        }
        let shape = [7, 300];
        let random = |distribution| Tensor::<2>::random(shape, distribution, &device).cast(dtype);
        let x = random(Distribution::Normal(0.5, 2.0));
        let weight =
            Tensor::<1>::random([300], Distribution::Normal(1.0, 0.5), &device).cast(dtype);
        let grad = random(Distribution::Default);
        let prior = random(Distribution::Default);
        let prior_values = prior.to_data();
        let adding = |prior: Tensor<2>| {
            Tensor::<2>::from_dispatch(Dispatch::rms_norm_backward_adding(
                x.clone().into_dispatch(),
                weight.clone().into_dispatch(),
                grad.clone().into_dispatch(),
                prior.into_dispatch(),
                EPS as f32,
            ))
        };

        let beside = adding(prior.clone()).to_data();
        assert_eq!(
            prior.to_data(),
            prior_values,
            "{name}: the held prior changed"
        );
        let in_place = adding(prior).to_data();
        assert_eq!(beside, in_place, "{name}: the sums differ");
    }
}
