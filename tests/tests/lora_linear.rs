//! The LoRA layer against peft: `../shared/golden/lora_linear.safetensors` holds a peft LoRA
//! layer (r 8, alpha 16) on a bias-free Linear 96 -> 80, an input, its output and the gradients
//! of `sum(y * loss_weights)` with respect to lora_A and lora_B. Ours must agree to 1e-5, relative.

use burn::nn::DropoutConfig;
use burn::tensor::{DType, Device, Distribution, Tensor};
use burn_qlora::{
    FrozenLinear, LoraConfig, PeftAdapter, QuantConfig, linear_from_torch as torch_linear,
};
use integration_tests::{GoldenFile, golden_dir, relative_error};

const TOLERANCE: f32 = 1e-5;

#[test]
fn lora_linear_matches_peft() {
    let Some(dir) = golden_dir() else { return };
    let golden = GoldenFile::open(&dir.join("lora_linear.safetensors"));
    let device = Device::flex().autodiff();
    let config = LoraConfig::new(8).with_alpha(16.0);
    assert_eq!(config.scaling(), 2.0);
    let layer = config.with_adapter(
        torch_linear(golden.tensor("base_weight", &device)),
        torch_linear(golden.tensor("lora_A", &device)),
        torch_linear(golden.tensor("lora_B", &device)),
    );

    let y = layer.forward(golden.tensor::<2>("x", &device));
    let error = relative_error(y.clone().inner(), golden.tensor("y", &Device::flex()));
    assert!(error < TOLERANCE, "y: relative error {error}");

    let loss_weights = golden.tensor::<1>("loss_weights", &device).unsqueeze::<2>();
    let grads = (y * loss_weights).sum().backward();
    let grad_a = layer
        .lora_a
        .weight
        .grad(&grads)
        .expect("lora_A has a gradient");
    let grad_b = layer
        .lora_b
        .weight
        .grad(&grads)
        .expect("lora_B has a gradient");
    let error_a = relative_error(
        grad_a.transpose(),
        golden.tensor("grad_lora_A", &Device::flex()),
    );
    let error_b = relative_error(
        grad_b.transpose(),
        golden.tensor("grad_lora_B", &Device::flex()),
    );
    assert!(error_a < TOLERANCE, "grad lora_A: relative error {error_a}");
    assert!(error_b < TOLERANCE, "grad lora_B: relative error {error_b}");
    let FrozenLinear::Dense(base) = &layer.base else {
        panic!("a dense base")
    };
    assert!(
        base.weight.grad(&grads).is_none(),
        "the base weight is frozen and gets no gradient"
    );
}

/// A bf16 layer (`model.dtype = "bf16"`): the adapters stay f32 and are cast to bf16 for the
/// products (torch's autocast), so the output is bf16 and the adapters' gradients f32, both
/// peft's f32 numbers to bf16's precision (relative 1e-2: 8 bits of mantissa, sums of 96 and 8).
#[test]
fn a_bf16_layer_keeps_f32_adapters_and_gives_peft_numbers() {
    let Some(dir) = golden_dir() else { return };
    let golden = GoldenFile::open(&dir.join("lora_linear.safetensors"));
    let device = Device::flex().autodiff();
    let bf16 = |tensor: Tensor<2>| tensor.cast(DType::BF16);
    let layer = LoraConfig::new(8).with_alpha(16.0).with_adapter(
        torch_linear(bf16(golden.tensor("base_weight", &device))),
        torch_linear(golden.tensor("lora_A", &device)),
        torch_linear(golden.tensor("lora_B", &device)),
    );

    let y = layer.forward(bf16(golden.tensor("x", &device)));
    assert_eq!(y.dtype(), DType::BF16);
    let error = relative_error(
        y.clone().inner().cast(DType::F32),
        golden.tensor("y", &Device::flex()),
    );
    assert!(error < 1e-2, "y: relative error {error}");

    let loss_weights = golden.tensor::<1>("loss_weights", &device).unsqueeze::<2>();
    let grads = (y.cast(DType::F32) * loss_weights).sum().backward();
    for (name, weight) in [
        ("lora_A", &layer.lora_a.weight),
        ("lora_B", &layer.lora_b.weight),
    ] {
        let grad = weight.grad(&grads).expect("the adapter has a gradient");
        assert_eq!(grad.dtype(), DType::F32, "{name}: gradient dtype");
        let expected = golden.tensor(&format!("grad_{name}"), &Device::flex());
        let error = relative_error(grad.transpose(), expected);
        assert!(error < 1e-2, "grad {name}: relative error {error}");
    }
}

/// `pullback` gives the layer's gradients for an output gradient without using its output:
/// zeros whose backward gives peft's gradients of `sum(y * loss_weights)` on the dense base, and
/// on a 4-bit base (the fused path that never computes the base's product; with dropout, the
/// composed one) exactly those of the layer's own forward and backward, the input's included;
/// likewise with the 4-bit base's dense copy (`with_dense_copy`).
#[test]
fn pullback_gives_the_layers_gradients_without_its_output() {
    let Some(dir) = golden_dir() else { return };
    let golden = GoldenFile::open(&dir.join("lora_linear.safetensors"));
    let device = Device::flex().autodiff();
    let mut layer = LoraConfig::new(8).with_alpha(16.0).with_adapter(
        torch_linear(golden.tensor("base_weight", &device)),
        torch_linear(golden.tensor("lora_A", &device)),
        torch_linear(golden.tensor("lora_B", &device)),
    );
    let x = golden.tensor::<2>("x", &device);
    let upstream = golden
        .tensor::<1>("loss_weights", &device)
        .unsqueeze::<2>()
        .expand([x.dims()[0], 80]);
    // The gradients of x, A and B (Burn's layouts) from a backward.
    let gradients = |layer: &burn_qlora::LoraLinear, run: &dyn Fn(Tensor<2>) -> Tensor<2>| {
        let x = x.clone().require_grad();
        let grads = run(x.clone()).backward();
        [
            x.grad(&grads).expect("x has a gradient"),
            layer.lora_a.weight.grad(&grads).expect("A has a gradient"),
            layer.lora_b.weight.grad(&grads).expect("B has a gradient"),
        ]
    };

    let pulled = gradients(&layer, &|x| {
        let zeros = layer.pullback(x, upstream.clone());
        assert_eq!(zeros.clone().abs().max().into_scalar::<f32>(), 0.0);
        zeros
    });
    for (name, grad) in [("grad_lora_A", &pulled[1]), ("grad_lora_B", &pulled[2])] {
        let error = relative_error(
            grad.clone().transpose(),
            golden.tensor(name, &Device::flex()),
        );
        assert!(error < TOLERANCE, "{name}: relative error {error}");
    }

    layer.base = layer.base.quantize(QuantConfig::default()).unwrap();
    for dropout in [0.0, 0.5] {
        layer.dropout = DropoutConfig::new(dropout).init();
        let expected = gradients(&layer, &|x| {
            device.seed(5);
            layer.forward(x) * upstream.clone()
        });
        let pulled = gradients(&layer, &|x| {
            device.seed(5);
            layer.pullback(x, upstream.clone())
        });
        // The base carrying its dequantized copy (as a checkpointed layer's recomputation
        // makes it): the same gradients, registered for the original's parameters.
        let copied = layer.with_dense_copy(DType::F32).unwrap();
        let through_copy = gradients(&layer, &|x| {
            device.seed(5);
            copied.pullback(x, upstream.clone())
        });
        for (part, ((ours, copy), expected)) in ["x", "A", "B"]
            .iter()
            .zip(pulled.into_iter().zip(through_copy).zip(expected))
        {
            let difference = (ours - expected.clone()).abs().max().into_scalar::<f32>();
            assert_eq!(difference, 0.0, "dropout {dropout}: gradient of {part}");
            let difference = (copy - expected).abs().max().into_scalar::<f32>();
            assert_eq!(
                difference, 0.0,
                "dropout {dropout}, dense copy: gradient of {part}"
            );
        }
    }
}

#[test]
fn a_new_adapter_leaves_the_base_unchanged() {
    let device = Device::flex();
    let base = torch_linear(Tensor::random([80, 96], Distribution::Default, &device));
    let x = Tensor::<2>::random([4, 96], Distribution::Default, &device);
    let expected = base.forward(x.clone());
    let layer = LoraConfig::new(8).init(base);
    let error = relative_error(layer.forward(x), expected);
    assert_eq!(error, 0.0, "B starts at zero, so the adapter adds nothing");
    assert_eq!(
        LoraConfig::new(16)
            .with_use_rslora(true)
            .with_alpha(8.0)
            .scaling(),
        2.0
    );
    assert_eq!(LoraConfig::new(16).with_scaling(Some(1.0)).scaling(), 1.0);
}

#[test]
fn peft_adapter_imports_and_round_trips() {
    let Some(dir) = golden_dir() else { return };
    let golden = GoldenFile::open(&dir.join("lora_linear.safetensors"));
    let device = Device::flex();
    let adapter = PeftAdapter::load(&dir.join("peft_adapter"), &device).unwrap();
    assert_eq!(adapter.lora_config().scaling(), 2.0);
    let base = || torch_linear(golden.tensor("base_weight", &device));
    let layer = adapter.apply("proj", base()).unwrap();
    let error = relative_error(
        layer.forward(golden.tensor::<2>("x", &device)),
        golden.tensor("y", &device),
    );
    assert!(
        error < TOLERANCE,
        "y through the imported adapter: relative error {error}"
    );

    // Export, import: the same numbers, bit for bit.
    let out = std::env::temp_dir().join(format!("peft-export-{}", std::process::id()));
    let mut exported = PeftAdapter {
        config: adapter.config.clone(),
        weights: Default::default(),
        biases: Default::default(),
    };
    exported.insert("proj", &layer);
    exported.save(&out).unwrap();
    let again = PeftAdapter::load(&out, &device).unwrap();
    for (a, b) in [
        (&again.weights["proj"].0, &adapter.weights["proj"].0),
        (&again.weights["proj"].1, &adapter.weights["proj"].1),
    ] {
        assert_eq!(a.clone().into_data(), b.clone().into_data());
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 8);
    assert_eq!(json["target_modules"], serde_json::json!(["proj"]));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn an_adapter_that_does_not_fit_names_the_tensor() {
    let Some(dir) = golden_dir() else { return };
    let device = Device::flex();
    let adapter = PeftAdapter::load(&dir.join("peft_adapter"), &device).unwrap();
    let wrong = torch_linear(Tensor::zeros([80, 64], &device));
    let err = adapter.apply("proj", wrong).unwrap_err().to_string();
    assert!(
        err.contains("base_model.model.proj.lora_A.weight") && err.contains("[8, 64]"),
        "{err}"
    );
    let err = adapter
        .apply("mlp", torch_linear(Tensor::zeros([80, 96], &device)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("base_model.model.mlp.lora_A.weight"), "{err}");
    let err = PeftAdapter::load(&dir.join("no_such_adapter"), &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_such_adapter/adapter_config.json"), "{err}");
}

/// AdamW keeps two moments for each parameter it updates; with the base frozen it must hold
/// them for A and B alone: 4 tensors, where training the base too would make 6.
#[test]
fn the_optimizer_holds_state_for_the_adapter_alone() {
    use burn::module::Module;
    use burn::optim::{AdamWConfig, GradientsParams};

    let device = Device::flex().autodiff();
    let base = torch_linear(Tensor::random([80, 96], Distribution::Default, &device));
    let x = Tensor::<2>::random([4, 96], Distribution::Default, &device);
    let state_tensors = |layer: burn_qlora::LoraLinear| {
        let mut optimizer = AdamWConfig::new().init();
        let grads = layer.forward(x.clone()).sum().backward();
        let grads = GradientsParams::from_grads(grads, &layer);
        let _ = optimizer.step(1e-3, layer, grads);
        optimizer.to_record().len()
    };
    let frozen_base = LoraConfig::new(8).init(base.clone());
    let mut trained_base = LoraConfig::new(8).init(base);
    trained_base.base = trained_base.base.set_require_grad(true);
    let (adapter_only, everything) = (state_tensors(frozen_base), state_tensors(trained_base));
    assert_eq!(
        adapter_only * 3,
        everything * 2,
        "{adapter_only} vs {everything} state tensors"
    );
    assert!(adapter_only > 0);
}
