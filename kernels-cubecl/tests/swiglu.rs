//! SwiGLU's gating on every device (Flex's loop, and the CubeCL kernels on wgpu/cuda when built
//! with them): `silu(gate) · up` and both inputs' gradients against the same computed on the
//! host in f64.

mod common;

use burn::tensor::{DType, Distribution, Tensor};
use common::{devices, f32_values, max_relative_error};
use kernels_cubecl::swiglu;

fn sigmoid(g: f64) -> f64 {
    1.0 / (1.0 + (-g).exp())
}

/// Widths 64 (16-byte vectors) and 301 (one element at a time), a batch of 2 x 5 rows, values
/// around [-4, 4] so the sigmoid's tails count; in f32 and, where the device has them, bf16 and
/// f16 (the output rounded once, the gradients each once).
#[test]
fn swiglu_and_its_gradients_equal_the_host() {
    for (name, device) in devices() {
        for width in [64, 301] {
            for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 8e-3), (DType::F16, 1e-3)]
            {
                if !device.supports_dtype(dtype) {
                    println!("{name}: no {dtype:?}, skipped");
                    continue;
                }
                let autodiff = device.clone().autodiff();
                let random = || {
                    Tensor::<3>::random([2, 5, width], Distribution::Uniform(-4.0, 4.0), &autodiff)
                        .cast(dtype)
                };
                let (gate, up, upstream) =
                    (random().require_grad(), random().require_grad(), random());
                let out = swiglu(gate.clone(), up.clone());
                assert_eq!(out.dims(), [2, 5, width]);
                assert_eq!(out.dtype(), dtype);
                let grads = (out.clone() * upstream.clone()).sum().backward();
                let grad_gate = gate.grad(&grads).expect("gate has a gradient");
                let grad_up = up.grad(&grads).expect("up has a gradient");

                let widen = |tensor: Tensor<3>| -> Vec<f64> {
                    f32_values(&tensor.to_data())
                        .into_iter()
                        .map(f64::from)
                        .collect()
                };
                let (g, u, d) = (widen(gate), widen(up), widen(upstream));
                let terms = || g.iter().zip(&u).zip(&d);
                let expected: Vec<f64> = terms().map(|((&g, &u), _)| g * sigmoid(g) * u).collect();
                let expected_gate: Vec<f64> = terms()
                    .map(|((&g, &u), &d)| {
                        let s = sigmoid(g);
                        d * u * s * (1.0 + g * (1.0 - s))
                    })
                    .collect();
                let expected_up: Vec<f64> =
                    terms().map(|((&g, _), &d)| d * g * sigmoid(g)).collect();
                let what = format!("{name} {dtype:?} width {width}");
                for (label, actual, expected) in [
                    ("output", out.to_data(), expected),
                    ("gate gradient", grad_gate.to_data(), expected_gate),
                    ("up gradient", grad_up.to_data(), expected_up),
                ] {
                    let error = max_relative_error(&f32_values(&actual), &expected);
                    assert!(error < tolerance, "{what}: {label} relative error {error}");
                }
            }
        }
    }
}
