//! One AdamW update as one operation on every device (Flex's loop, and the CubeCL kernel on
//! wgpu/cuda when built with them): the parameter and both moments after a first and a second
//! step against the same arithmetic on the host in f64.

mod common;

use burn::tensor::{DType, Device, Distribution, Tensor};
use common::{devices, f32_values, half_dtype, max_relative_error};
use kernels_cubecl::{AdamWScalars, adamw_update};

const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;

/// Step `time`'s scalars at learning rate 1e-2 and weight decay 0.1; the first step's moments
/// start from zero.
fn scalars(time: i32) -> AdamWScalars {
    let keep = if time == 1 { 0.0 } else { 1.0 };
    AdamWScalars {
        keep_1: keep * BETA_1,
        keep_2: keep * BETA_2,
        beta_1: BETA_1,
        beta_2: BETA_2,
        correction_1: 1.0 - BETA_1.powi(time),
        correction_2: 1.0 - BETA_2.powi(time),
        epsilon: 1e-5,
        lr: 1e-2,
        decay: 1.0 - 1e-2 * 0.1,
    }
}

/// The update in f64 from the same (rounded) inputs.
fn host_update(p: &[f64], g: &[f64], m1: &[f64], m2: &[f64], s: &AdamWScalars) -> [Vec<f64>; 3] {
    let mut out = [vec![], vec![], vec![]];
    for i in 0..p.len() {
        let new_m1 = m1[i] * f64::from(s.keep_1) + g[i] * (1.0 - f64::from(s.beta_1));
        let new_m2 = m2[i] * f64::from(s.keep_2) + g[i] * g[i] * (1.0 - f64::from(s.beta_2));
        let delta = (new_m1 / f64::from(s.correction_1))
            / ((new_m2 / f64::from(s.correction_2)).sqrt() + f64::from(s.epsilon));
        out[0].push(p[i] * f64::from(s.decay) - delta * f64::from(s.lr));
        out[1].push(new_m1);
        out[2].push(new_m2);
    }
    out
}

fn widen(tensor: &Tensor<2>) -> Vec<f64> {
    f32_values(&tensor.to_data())
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Two steps on `[rows, width]` tensors of `dtype`; each output's largest error relative to the
/// host's, per step.
fn two_steps(device: &Device, rows: usize, width: usize, dtype: DType) -> Vec<[f64; 3]> {
    let random = |scale: f64| {
        Tensor::<2>::random([rows, width], Distribution::Uniform(-scale, scale), device).cast(dtype)
    };
    let mut param = random(1.0);
    let grad = random(0.1);
    // The first step's moment inputs are never read for their values: the gradient stands in.
    let (mut moment_1, mut moment_2) = (grad.clone(), grad.clone());
    let mut errors = vec![];
    for time in 1..=2 {
        let grad = if time == 1 { grad.clone() } else { random(0.1) };
        let s = scalars(time);
        let expected = host_update(
            &widen(&param),
            &widen(&grad),
            &widen(&moment_1),
            &widen(&moment_2),
            &s,
        );
        let (new_param, new_moment_1, new_moment_2) =
            adamw_update(param, grad, moment_1, moment_2, s);
        let mut step_errors = [0.0; 3];
        for (error, (actual, expected)) in step_errors.iter_mut().zip(
            [&new_param, &new_moment_1, &new_moment_2]
                .iter()
                .zip(&expected),
        ) {
            assert_eq!(actual.dims(), [rows, width]);
            assert_eq!(actual.dtype(), dtype);
            *error = max_relative_error(&f32_values(&actual.to_data()), expected);
        }
        errors.push(step_errors);
        (param, moment_1, moment_2) = (new_param, new_moment_1, new_moment_2);
    }
    errors
}

/// Widths 64 (16-byte vectors) and 67 (one element at a time); f32 within 1e-5 of the host's
/// f64, the 16-bit dtype (each output rounded once) within its rounding.
#[test]
fn adamw_update_equals_the_host() {
    for (name, device) in devices() {
        for width in [64, 67] {
            for (dtype, tolerance) in [(DType::F32, 1e-5), (half_dtype(name), 8e-3)] {
                if !device.supports_dtype(dtype) {
                    println!("{name}: no {dtype:?}, skipped");
                    continue;
                }
                for (step, errors) in two_steps(&device, 3, width, dtype).iter().enumerate() {
                    for (label, error) in ["parameter", "first moment", "second moment"]
                        .iter()
                        .zip(errors)
                    {
                        assert!(
                            *error < tolerance,
                            "{name} {dtype:?} width {width} step {}: {label} relative error \
                             {error}",
                            step + 1
                        );
                    }
                }
            }
        }
    }
}
