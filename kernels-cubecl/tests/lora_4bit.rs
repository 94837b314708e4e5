//! A LoRA projection over a 4-bit base as one operation (`lora_4bit_linear`) on every device:
//! against bitsandbytes' dequantized weights with the adapter in f32, and against the same layer
//! composed of the separate operations in bf16 (f16 on wgpu, whose WGSL has no bf16).

mod common;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use common::{burn_f32_matmul_tolerance, devices, golden_matrices, half_dtype};
use integration_tests::relative_error;
use kernels_cubecl::{
    KeptAdapter, Packed4bit, QuantConfig, lora_4bit_linear, lora_4bit_linear_keeping,
    lora_4bit_pullback, low_rank_down, low_rank_up_add,
};

/// PEFT's scaling for alpha 16, rank 8.
const SCALING: f64 = 2.0;

/// A layer's inputs: `x` `[2, sequence, cols]`, the adapter (f32) and the output's upstream
/// gradient, all on `device` (an autodiff one).
struct Inputs {
    x: Tensor<3>,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    upstream: Tensor<3>,
}

impl Inputs {
    fn random(
        sequence: usize,
        [rows, cols]: [usize; 2],
        rank: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let normal = |std| Distribution::Normal(0.0, std);
        let activations = |features| {
            Tensor::<3>::random([2, sequence, features], Distribution::Default, device).cast(dtype)
        };
        Self {
            x: activations(cols),
            lora_a: Tensor::random([cols, rank], normal(0.1), device),
            lora_b: Tensor::random([rank, rows], normal(0.1), device),
            upstream: activations(rows),
        }
    }

    /// `layer`'s output and the gradients of `x`, `A` and `B` of `sum(upstream · output)`.
    fn run(&self, layer: impl Fn(Tensor<3>, Tensor<2>, Tensor<2>) -> Tensor<3>) -> [Tensor<3>; 4] {
        let (x, lora_a, lora_b) = (
            self.x.clone().require_grad(),
            self.lora_a.clone().require_grad(),
            self.lora_b.clone().require_grad(),
        );
        let y = layer(x.clone(), lora_a.clone(), lora_b.clone());
        let grads = (y.clone() * self.upstream.clone()).sum().backward();
        let grad_a = lora_a.grad(&grads).expect("A has a gradient");
        let grad_b = lora_b.grad(&grads).expect("B has a gradient");
        [
            y.inner(),
            x.grad(&grads).expect("x has a gradient"),
            grad_a.unsqueeze(),
            grad_b.unsqueeze(),
        ]
    }
}

impl Inputs {
    /// The pullback's zeros for `upstream` (over `packed`, with `kept` where given) and the
    /// gradients of `x`, `A` and `B` its backward gives.
    fn pullback(
        &self,
        packed: &Packed4bit,
        kept: Option<KeptAdapter>,
    ) -> (Tensor<3>, [Tensor<3>; 3]) {
        let (x, lora_a, lora_b) = (
            self.x.clone().require_grad(),
            self.lora_a.clone().require_grad(),
            self.lora_b.clone().require_grad(),
        );
        let zeros = lora_4bit_pullback(
            x.clone(),
            packed,
            lora_a.clone(),
            lora_b.clone(),
            SCALING,
            self.upstream.clone(),
            kept,
        )
        .unwrap();
        let grads = zeros.clone().backward();
        let pulled = [
            x.grad(&grads).expect("x has a gradient"),
            lora_a.grad(&grads).expect("A has a gradient").unsqueeze(),
            lora_b.grad(&grads).expect("B has a gradient").unsqueeze(),
        ];
        (zeros, pulled)
    }
}

const PARTS: [&str; 4] = ["y", "grad x", "grad A", "grad B"];

/// The random weights' shape: with 256 rows of input, tiles of the `wgmma` kernels on CUDA (the
/// forward's that dequantizes the weight inside the product takes 128 features a tile).
const SHAPE: [usize; 2] = [384, 512];

/// A random `SHAPE` weight packed in NF4, its scale making the adapter's term (from `Inputs`)
/// as large as the base's, so a wrong term shows.
fn random_weight(device: &Device) -> Packed4bit {
    let weight = Tensor::<2>::random(SHAPE, Distribution::Normal(0.0, 0.05), device);
    Packed4bit::quantize(weight, QuantConfig::default()).unwrap()
}

/// For every 2-D f32 golden state (NF4 and FP4, with and without double quantization), the
/// fused layer's output and gradients equal those of `x·Wᵀ + (x·A)·(s·B)` with bitsandbytes'
/// dequantized `W`, through Burn's f32 matmul on the CPU.
#[test]
fn lora_4bit_linear_with_golden_states_equals_the_dense_lora_layer() {
    let cases = golden_matrices(DType::F32, |_| true);
    if cases.is_empty() {
        return;
    }
    let host = Device::flex().autodiff();
    for (name, plain) in devices() {
        let device = plain.clone().autodiff();
        // The kernels sum in f32 as the reference does; CUDA's f32 base product is TF32's.
        let tolerance = burn_f32_matmul_tolerance(name, 1e-5) as f32;
        for case in &cases {
            let shape = [case.shape[0], case.shape[1]];
            let packed = Packed4bit::from_state(&case.state(), &plain).unwrap();
            let theirs =
                Tensor::<2>::from_data(TensorData::new(case.dequant.clone(), shape), &host);
            let inputs = Inputs::random(3, shape, 8, DType::F32, &device);
            let ours =
                inputs.run(|x, a, b| lora_4bit_linear(x, &packed, a, b, SCALING, None).unwrap());
            let on_host = Inputs {
                x: inputs.x.to_device(&host),
                lora_a: inputs.lora_a.to_device(&host),
                lora_b: inputs.lora_b.to_device(&host),
                upstream: inputs.upstream.to_device(&host),
            };
            let expected = on_host.run(|x, a, b| {
                let base = x.clone().matmul(theirs.clone().transpose().unsqueeze());
                base + x
                    .matmul(a.unsqueeze())
                    .matmul(b.mul_scalar(SCALING).unsqueeze())
            });
            for ((part, ours), expected) in PARTS.iter().zip(ours).zip(expected) {
                let error = relative_error(ours.to_device(&host), expected);
                assert!(
                    error < tolerance,
                    "{name} {} {part}: relative error {error}",
                    case.name
                );
            }
        }
    }
}

/// In bf16 the fused layer gives the numbers of the layer composed of the separate operations
/// (4-bit product, `x·A`, `h·B` with the add, each with its own backward): the output and the
/// adapter's gradients bitwise, the input's gradient within a unit of the last place (it
/// rounds once where the composed layer rounds its two parts before adding them). On CUDA the
/// `wgmma` kernel sums the hidden in another order on its tiles and adds the adapter's term
/// before it rounds: all four within a unit of the last place there.
#[test]
fn lora_4bit_linear_gives_the_composed_layers_numbers() {
    for (name, plain) in devices() {
        let dtype = half_dtype(name);
        let device = plain.clone().autodiff();
        let packed = random_weight(&plain);
        // Ranks 8 and 16: the two widths the CUDA kernels' hidden (`thin_product`) takes.
        for rank in [8, 16] {
            let inputs = Inputs::random(128, SHAPE, rank, dtype, &device);
            let ours =
                inputs.run(|x, a, b| lora_4bit_linear(x, &packed, a, b, SCALING, None).unwrap());
            let composed = inputs.run(|x, a, b| {
                let hidden = low_rank_down(x.clone(), a);
                low_rank_up_add(packed.linear(x).unwrap(), hidden, b.mul_scalar(SCALING))
            });
            for ((part, ours), composed) in PARTS.iter().zip(ours).zip(composed) {
                assert_eq!(ours.dtype(), composed.dtype(), "{name} {part}");
                if name == "cuda" || *part == "grad x" {
                    // Two roundings against one: within a unit of the last place, about 2^-8.
                    let error = relative_error(ours.cast(DType::F32), composed.cast(DType::F32));
                    assert!(
                        error < 1e-2,
                        "{name} rank {rank} {part}: relative error {error}"
                    );
                } else {
                    let difference = largest_difference(ours, composed);
                    assert_eq!(difference, 0.0, "{name} rank {rank} {part}");
                }
            }
        }
    }
}

/// The pullback is zeros whose backward gives the fused layer's gradients for the output
/// gradient it is handed: the gradients of `x`, `A` and `B` equal those of `sum(upstream · y)`
/// bit for bit (the same hidden, the same backward launches), in bf16 (f16 on wgpu), ranks 8
/// and 16, on every device.
#[test]
fn lora_4bit_pullback_gives_the_layers_gradients_without_its_output() {
    for (name, plain) in devices() {
        let dtype = half_dtype(name);
        let device = plain.clone().autodiff();
        let packed = random_weight(&plain);
        for rank in [8, 16] {
            let inputs = Inputs::random(128, SHAPE, rank, dtype, &device);
            let layer =
                inputs.run(|x, a, b| lora_4bit_linear(x, &packed, a, b, SCALING, None).unwrap());
            let (zeros, pulled) = inputs.pullback(&packed, None);
            assert_eq!(zeros.dims(), inputs.upstream.dims(), "{name}");
            assert_eq!(zeros.dtype(), dtype, "{name}");
            let largest = zeros.abs().max().into_scalar::<f32>();
            assert_eq!(largest, 0.0, "{name} rank {rank}: the pullback's value");
            for ((part, ours), expected) in PARTS[1..].iter().zip(pulled).zip(&layer[1..]) {
                assert_eq!(ours.dtype(), expected.dtype(), "{name} {part}");
                let difference = largest_difference(ours, expected.clone());
                assert_eq!(difference, 0.0, "{name} rank {rank} {part}");
            }
        }
    }
}

/// What `lora_4bit_linear_keeping` keeps (a checkpointed layer's first forward: the adapter's
/// hidden and cast), handed back to `lora_4bit_linear` and `lora_4bit_pullback` for the same
/// input (its recomputation), changes no number: the output, and the gradients of `x`, `A` and
/// `B`, bit for bit, in bf16 (f16 on wgpu), on every device; the kept forward records no graph.
#[test]
fn a_kept_adapter_changes_no_number() {
    for (name, plain) in devices() {
        let dtype = half_dtype(name);
        let device = plain.clone().autodiff();
        let packed = random_weight(&plain);
        let inputs = Inputs::random(128, SHAPE, 8, dtype, &device);
        let fresh =
            inputs.run(|x, a, b| lora_4bit_linear(x, &packed, a, b, SCALING, None).unwrap());
        let (kept_output, kept) = lora_4bit_linear_keeping(
            inputs.x.clone().require_grad(),
            &packed,
            inputs.lora_a.clone().require_grad(),
            inputs.lora_b.clone().require_grad(),
            SCALING,
        )
        .unwrap();
        let KeptAdapter {
            hidden,
            transposed_a,
            scaled_b,
        } = &kept;
        for tensor in [hidden, transposed_a, scaled_b] {
            assert!(!tensor.is_require_grad(), "{name}");
            assert_eq!(tensor.dtype(), dtype, "{name}");
        }
        assert!(!kept_output.is_require_grad(), "{name}");
        assert_eq!(hidden.dims(), [2 * 128, 8], "{name}");
        assert_eq!(transposed_a.dims(), [8, SHAPE[1]], "{name}");
        assert_eq!(scaled_b.dims(), [8, SHAPE[0]], "{name}");
        let difference = largest_difference(kept_output, fresh[0].clone());
        assert_eq!(difference, 0.0, "{name}: the kept forward's output");
        let given = inputs.run(|x, a, b| {
            lora_4bit_linear(x, &packed, a, b, SCALING, Some(kept.clone())).unwrap()
        });
        for ((part, ours), expected) in PARTS.iter().zip(given).zip(&fresh) {
            assert_eq!(
                largest_difference(ours, expected.clone()),
                0.0,
                "{name} {part}"
            );
        }
        let (_, pulled) = inputs.pullback(&packed, Some(kept));
        for ((part, ours), expected) in PARTS[1..].iter().zip(pulled).zip(&fresh[1..]) {
            let difference = largest_difference(ours, expected.clone());
            assert_eq!(difference, 0.0, "{name} pullback {part}");
        }
    }
}

/// Projections sharing their input, as q, k and v do: the input's gradient is the sum of each
/// one's, the earlier projection's backward adding its product to what the later one gave (on
/// CUDA inside the `wgmma` kernel, before its one rounding). Against the two gradients taken
/// apart and added in f32: within 2^-7 of the sum's largest magnitude (a bf16 rounding or two),
/// where a lost or doubled term would be of its size; in bf16 (f16 on wgpu), on every device.
#[test]
fn projections_sharing_an_input_sum_its_gradient() {
    for (name, plain) in devices() {
        let dtype = half_dtype(name);
        let device = plain.clone().autodiff();
        let (first, second) = (random_weight(&plain), random_weight(&plain));
        let inputs = Inputs::random(128, SHAPE, 8, dtype, &device);
        let other = Inputs::random(128, SHAPE, 8, dtype, &device);
        let layer = |x: Tensor<3>, packed: &Packed4bit, inputs: &Inputs| {
            let y = lora_4bit_linear(
                x,
                packed,
                inputs.lora_a.clone(),
                inputs.lora_b.clone(),
                SCALING,
                None,
            )
            .unwrap();
            (y * inputs.upstream.clone()).sum()
        };
        let grad_of = |loss: Tensor<1>, x: &Tensor<3>| {
            x.grad(&loss.backward())
                .expect("x has a gradient")
                .cast(DType::F32)
        };
        let x = inputs.x.clone().require_grad();
        let together = grad_of(
            layer(x.clone(), &first, &inputs) + layer(x.clone(), &second, &other),
            &x,
        );
        let apart = grad_of(layer(x.clone(), &first, &inputs), &x)
            + grad_of(layer(x.clone(), &second, &other), &x);
        let scale = apart.clone().abs().max().into_scalar::<f32>();
        let difference = largest_difference(together, apart);
        assert!(
            difference <= scale / 128.0,
            "{name}: the summed gradient is {difference} off (largest {scale})"
        );
    }
}

/// An input that needs no gradient (the first layer's, under frozen embeddings) skips the input
/// gradient's product; the adapter's gradients are those of a tracked input bit for bit (the
/// same hidden, the same kernels), in bf16 (f16 on wgpu), on every device.
#[test]
fn an_untracked_input_leaves_the_adapters_gradients_unchanged() {
    for (name, plain) in devices() {
        let dtype = half_dtype(name);
        let device = plain.clone().autodiff();
        let packed = random_weight(&plain);
        let inputs = Inputs::random(128, SHAPE, 8, dtype, &device);
        let tracked =
            inputs.run(|x, a, b| lora_4bit_linear(x, &packed, a, b, SCALING, None).unwrap());
        let (lora_a, lora_b) = (
            inputs.lora_a.clone().require_grad(),
            inputs.lora_b.clone().require_grad(),
        );
        let y = lora_4bit_linear(
            inputs.x.clone(),
            &packed,
            lora_a.clone(),
            lora_b.clone(),
            SCALING,
            None,
        )
        .unwrap();
        let grads = (y * inputs.upstream.clone()).sum().backward();
        assert!(inputs.x.grad(&grads).is_none(), "{name}: x has no gradient");
        let untracked: [Tensor<3>; 2] = [
            lora_a.grad(&grads).expect("A has a gradient").unsqueeze(),
            lora_b.grad(&grads).expect("B has a gradient").unsqueeze(),
        ];
        for ((part, ours), expected) in PARTS[2..].iter().zip(untracked).zip(&tracked[2..]) {
            assert_eq!(ours.dtype(), expected.dtype(), "{name} {part}");
            let difference = largest_difference(ours, expected.clone());
            assert_eq!(difference, 0.0, "{name} {part}");
        }
    }
}

/// A weight carrying its dequantized copy (`Packed4bit::with_dense_copy`, as a checkpointed
/// layer's recomputation makes it) gives the layer's output and gradients bit for bit, and the
/// 4-bit product's likewise: the copy is what each product would have dequantized. On CUDA with
/// `KERNELS_CUBECL_4BIT_PRODUCTS=fused` the forward and the input gradient without the copy
/// dequantize inside their products (`wgmma_4bit`) and with it take the dense `wgmma` kernel, so
/// this holds the two kernels to the same numbers too.
#[test]
fn a_dense_copy_of_the_weight_changes_no_number() {
    for (name, plain) in devices() {
        let dtype = half_dtype(name);
        let device = plain.clone().autodiff();
        let packed = random_weight(&plain);
        let with_copy = packed.with_dense_copy(dtype).unwrap();
        assert_eq!(
            with_copy.dense.as_ref().map(Tensor::dims),
            Some(SHAPE),
            "{name}"
        );
        let inputs = Inputs::random(128, SHAPE, 8, dtype, &device);
        let layer = |weight: &Packed4bit| {
            inputs.run(|x, a, b| lora_4bit_linear(x, weight, a, b, SCALING, None).unwrap())
        };
        for ((part, ours), expected) in PARTS.iter().zip(layer(&with_copy)).zip(layer(&packed)) {
            assert_eq!(largest_difference(ours, expected), 0.0, "{name} {part}");
        }
        let product = |weight: &Packed4bit| weight.linear(inputs.x.clone().inner()).unwrap();
        let difference = largest_difference(product(&with_copy), product(&packed));
        assert_eq!(difference, 0.0, "{name}: the 4-bit product");
    }
}

/// A gradient that is not the layer's output shape is refused, naming both shapes.
#[test]
fn lora_4bit_pullback_refuses_a_gradient_of_another_shape() {
    for (name, device) in devices() {
        let weight = Tensor::<2>::random([64, 128], Distribution::Default, &device);
        let packed = Packed4bit::quantize(weight, QuantConfig::default()).unwrap();
        let x = Tensor::<2>::zeros([4, 128], &device);
        let lora_a = Tensor::<2>::zeros([128, 8], &device);
        let lora_b = Tensor::<2>::zeros([8, 64], &device);
        let grad = Tensor::<2>::zeros([4, 128], &device);
        let err = lora_4bit_pullback(x, &packed, lora_a, lora_b, SCALING, grad, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("LoRA pullback") && err.contains("[4, 128]") && err.contains("[4, 64]"),
            "{name}: {err}"
        );
    }
}

#[test]
fn lora_4bit_linear_refuses_an_adapter_that_does_not_fit() {
    for (name, device) in devices() {
        let weight = Tensor::<2>::random([64, 128], Distribution::Default, &device);
        let packed = Packed4bit::quantize(weight, QuantConfig::default()).unwrap();
        let x = Tensor::<2>::zeros([4, 128], &device);
        let lora_a = Tensor::<2>::zeros([128, 8], &device);
        let lora_b = Tensor::<2>::zeros([8, 48], &device);
        let err = lora_4bit_linear(x.clone(), &packed, lora_a.clone(), lora_b, SCALING, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("LoRA adapter") && err.contains("B [8, 48]"),
            "{name}: {err}"
        );
        let lora_b = Tensor::<2>::zeros([8, 64], &device);
        let err = lora_4bit_linear(
            x.clone().narrow(1, 0, 100),
            &packed,
            lora_a.clone(),
            lora_b.clone(),
            SCALING,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("128 input features"), "{name}: {err}");
        let kept = KeptAdapter {
            hidden: Tensor::<2>::zeros([4, 16], &device),
            transposed_a: lora_a.clone().transpose(),
            scaled_b: lora_b.clone(),
        };
        let err = lora_4bit_linear(
            x.clone(),
            &packed,
            lora_a.clone(),
            lora_b.clone(),
            SCALING,
            Some(kept),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("LoRA kept adapter")
                && err.contains("hidden")
                && err.contains("[4, 16]")
                && err.contains("[4, 8]"),
            "{name}: {err}"
        );
        let kept = KeptAdapter {
            hidden: Tensor::<2>::zeros([4, 8], &device),
            transposed_a: lora_a.clone(),
            scaled_b: lora_b.clone(),
        };
        let err = lora_4bit_linear(x, &packed, lora_a, lora_b, SCALING, Some(kept))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lora_aᵀ") && err.contains("[128, 8]") && err.contains("[8, 128]"),
            "{name}: {err}"
        );
    }
}

/// The largest absolute difference of two tensors' elements, in f32.
fn largest_difference(ours: Tensor<3>, theirs: Tensor<3>) -> f32 {
    (ours.cast(DType::F32) - theirs.cast(DType::F32))
        .abs()
        .max()
        .into_scalar::<f32>()
}
