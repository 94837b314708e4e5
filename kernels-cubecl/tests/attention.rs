//! Causal attention on every device (the composed products and softmax on Flex and wgpu, the
//! FlashAttention-2-style kernels on CUDA for bf16): the output and the gradients of the queries,
//! keys and values against the same computed on the host in f64.

mod common;

use burn::tensor::{DType, Distribution, Tensor};
use common::{burn_f32_matmul_tolerance, devices, f32_values, max_relative_error};
use kernels_cubecl::causal_attention;

/// The shapes of one case: `kv_heads` shared by `heads`, `queries` after `offset` cached keys.
#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    offset: usize,
    head_dim: usize,
}

impl Case {
    fn keys(&self) -> usize {
        self.offset + self.queries
    }
}

/// The output `[batch, queries, heads, head_dim]` and the gradients of `q` (`[batch, heads,
/// queries, head_dim]`), `k` (`[batch, kv_heads, keys, head_dim]`) and `v` (`[batch, keys,
/// kv_heads, head_dim]`, as the test lays the values out) for the loss `Σ output · upstream`.
fn host_attention(
    case: Case,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    upstream: &[f64],
    scale: f64,
) -> [Vec<f64>; 4] {
    let Case {
        batch,
        heads,
        kv_heads,
        queries,
        offset,
        head_dim: d,
    } = case;
    let keys = case.keys();
    let groups = heads / kv_heads;
    let q_at = |b: usize, h: usize, i: usize| ((b * heads + h) * queries + i) * d;
    let k_at = |b: usize, h: usize, j: usize| ((b * kv_heads + h) * keys + j) * d;
    let v_at = |b: usize, h: usize, j: usize| ((b * keys + j) * kv_heads + h) * d;
    let o_at = |b: usize, h: usize, i: usize| ((b * queries + i) * heads + h) * d;
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    let mut output = vec![0.0; q.len()];
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for b in 0..batch {
        for h in 0..heads {
            let kh = h / groups;
            for i in 0..queries {
                let visible = offset + i + 1;
                let query = &q[q_at(b, h, i)..][..d];
                let scores: Vec<f64> = (0..visible)
                    .map(|j| scale * dot(query, &k[k_at(b, kh, j)..][..d]))
                    .collect();
                let max = scores.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                let probs: Vec<f64> = exps.iter().map(|e| e / sum).collect();
                let up = &upstream[o_at(b, h, i)..][..d];
                let value_grads: Vec<f64> = (0..visible)
                    .map(|j| dot(up, &v[v_at(b, kh, j)..][..d]))
                    .collect();
                let delta = dot(&probs, &value_grads);
                for j in 0..visible {
                    let score_grad = scale * probs[j] * (value_grads[j] - delta);
                    for e in 0..d {
                        output[o_at(b, h, i) + e] += probs[j] * v[v_at(b, kh, j) + e];
                        dq[q_at(b, h, i) + e] += score_grad * k[k_at(b, kh, j) + e];
                        dk[k_at(b, kh, j) + e] += score_grad * query[e];
                        dv[v_at(b, kh, j) + e] += probs[j] * up[e];
                    }
                }
            }
        }
    }
    [output, dq, dk, dv]
}

/// Training's square attention with grouped heads and a ragged length (100 queries: the CUDA
/// kernels' 64-row blocks end inside it), a full one at the 7B's head width, and queries after
/// cached keys (composed on every device); in f32 and, where the device has it, bf16 (scores,
/// probabilities and output rounded to 8 bits of mantissa on the composed path).
#[test]
fn causal_attention_and_its_gradients_equal_the_host() {
    let cases = [
        Case {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            queries: 100,
            offset: 0,
            head_dim: 64,
        },
        Case {
            batch: 1,
            heads: 2,
            kv_heads: 2,
            queries: 128,
            offset: 0,
            head_dim: 128,
        },
        Case {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            queries: 3,
            offset: 7,
            head_dim: 64,
        },
    ];
    for (name, device) in devices() {
        for (dtype, tolerance) in [
            (DType::F32, burn_f32_matmul_tolerance(name, 1e-5)),
            (DType::BF16, 3e-2),
        ] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            for case in cases {
                let Case {
                    batch,
                    heads,
                    kv_heads,
                    queries,
                    head_dim,
                    ..
                } = case;
                let keys = case.keys();
                let scale = (head_dim as f64).sqrt().recip();
                let autodiff = device.clone().autodiff();
                let random = |shape: [usize; 4]| {
                    Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &autodiff)
                        .cast(dtype)
                };
                let q = random([batch, heads, queries, head_dim]).require_grad();
                let k = random([batch, kv_heads, keys, head_dim]).require_grad();
                // The values as the projection leaves them, read through the swapped view.
                let v = random([batch, keys, kv_heads, head_dim]).require_grad();
                let upstream = random([batch, queries, heads, head_dim]);
                let output = causal_attention(
                    q.clone(),
                    k.clone(),
                    v.clone().swap_dims(1, 2),
                    scale,
                    case.offset,
                );
                assert_eq!(output.dims(), [batch, queries, heads, head_dim]);
                assert_eq!(output.dtype(), dtype);
                let grads = (output.clone() * upstream.clone()).sum().backward();
                let gradient = |x: &Tensor<4>| x.grad(&grads).expect("a gradient").to_data();
                let actual = [output.to_data(), gradient(&q), gradient(&k), gradient(&v)];

                let widen = |x: &Tensor<4>| -> Vec<f64> {
                    f32_values(&x.to_data())
                        .into_iter()
                        .map(f64::from)
                        .collect()
                };
                let expected = host_attention(
                    case,
                    &widen(&q),
                    &widen(&k),
                    &widen(&v),
                    &widen(&upstream),
                    scale,
                );
                for ((label, actual), expected) in
                    ["output", "q gradient", "k gradient", "v gradient"]
                        .into_iter()
                        .zip(actual)
                        .zip(expected)
                {
                    let error = max_relative_error(&f32_values(&actual), &expected);
                    assert!(
                        error < tolerance,
                        "{name} {dtype:?} {case:?}: {label} relative error {error}"
                    );
                }
            }
        }
    }
}
