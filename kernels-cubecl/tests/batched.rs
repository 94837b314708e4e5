//! The batched product of two activations on every device (Burn's matmul on Flex and wgpu, the
//! TMA routine on CUDA where the shapes allow): output and both operands' gradients against the
//! same computed on the host in f64, for attention's layouts (a transposed right-hand side, a
//! left-hand side whose batch dimensions are not one evenly strided run).

mod common;

use burn::tensor::{DType, Distribution, Tensor};
use common::{burn_f32_matmul_tolerance, devices, f32_values, max_relative_error};
use kernels_cubecl::{batched_matmul, batched_matmul_transposed};

/// `[batches, m, k] x [batches, k, n]` in f64, row-major.
fn host_product(lhs: &[f64], rhs: &[f64], batches: usize, [m, k, n]: [usize; 3]) -> Vec<f64> {
    let mut out = vec![0.0; batches * m * n];
    for b in 0..batches {
        for i in 0..m {
            for j in 0..n {
                out[(b * m + i) * n + j] = (0..k)
                    .map(|p| lhs[(b * m + i) * k + p] * rhs[(b * k + p) * n + j])
                    .sum();
            }
        }
    }
    out
}

/// `[batches, rows, cols]` to `[batches, cols, rows]`.
fn host_transpose(values: &[f64], batches: usize, rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; values.len()];
    for b in 0..batches {
        for i in 0..rows {
            for j in 0..cols {
                out[(b * cols + j) * rows + i] = values[(b * rows + i) * cols + j];
            }
        }
    }
    out
}

/// `lhs · rhsᵀ` with `lhs` `[2, heads, m, k]` taken from a `[2, m, heads, k]` tensor (as
/// attention's heads are) and `rhs` `[2, heads, n, k]`, transposed as a view or by
/// `batched_matmul_transposed`, in f32 and, where the device has it, bf16. Small ragged shapes,
/// and 128-aligned ones that CUDA sends through the TMA routine.
#[test]
fn batched_matmul_and_its_gradients_equal_the_host() {
    for (name, device) in devices() {
        // f32 takes Burn's matmul everywhere (the TMA routine is for bf16 and f16).
        let f32_tolerance = burn_f32_matmul_tolerance(name, 1e-4);
        for (dtype, tolerance) in [(DType::F32, f32_tolerance), (DType::BF16, 3e-2)] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            for ([heads, m, k, n], transposed_form) in [
                ([3, 5, 7, 9], false),
                ([3, 5, 7, 9], true),
                ([2, 256, 128, 256], false),
                ([2, 256, 128, 256], true),
            ] {
                let autodiff = device.clone().autodiff();
                let random = |shape: [usize; 4]| {
                    Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &autodiff)
                        .cast(dtype)
                };
                let lhs = random([2, m, heads, k]).swap_dims(1, 2).require_grad();
                let rhs = random([2, heads, n, k]).require_grad();
                let upstream = random([2, heads, m, n]);
                let out = if transposed_form {
                    batched_matmul_transposed(lhs.clone(), rhs.clone())
                } else {
                    batched_matmul(lhs.clone(), rhs.clone().swap_dims(2, 3))
                };
                assert_eq!(out.dims(), [2, heads, m, n]);
                assert_eq!(out.dtype(), dtype);
                let grads = (out.clone() * upstream.clone()).sum().backward();

                let widen = |tensor: Tensor<4>| -> Vec<f64> {
                    f32_values(&tensor.to_data())
                        .into_iter()
                        .map(f64::from)
                        .collect()
                };
                let batches = 2 * heads;
                let (lhs_values, rhs_values) = (widen(lhs.clone()), widen(rhs.clone()));
                let rhs_t = host_transpose(&rhs_values, batches, n, k);
                let upstream = widen(upstream);
                let expected = host_product(&lhs_values, &rhs_t, batches, [m, k, n]);
                // d/dlhs = upstream · rhs, d/drhs = (lhsᵀ · upstream)ᵀ = upstreamᵀ · lhs.
                let expected_lhs = host_product(&upstream, &rhs_values, batches, [m, n, k]);
                let upstream_t = host_transpose(&upstream, batches, m, n);
                let expected_rhs = host_product(&upstream_t, &lhs_values, batches, [n, m, k]);

                let what = format!(
                    "{name} {dtype:?} {heads}x{m}x{k}x{n}, transposed form: {transposed_form}"
                );
                let check = |label: &str, actual: Tensor<4>, expected: &[f64]| {
                    let error = max_relative_error(&f32_values(&actual.to_data()), expected);
                    assert!(error < tolerance, "{what}: {label} relative error {error}");
                };
                check("output", out, &expected);
                check(
                    "lhs gradient",
                    lhs.grad(&grads).expect("lhs grad"),
                    &expected_lhs,
                );
                check(
                    "rhs gradient",
                    rhs.grad(&grads).expect("rhs grad"),
                    &expected_rhs,
                );
            }
        }
    }
}
