//! LoRA over a 4-bit base (on Flex, the CPU backend CI runs): the same numbers as the dense layer
//! built from the dequantized weight, the QLoRA switches, merging, and adapter-only files for a
//! whole model.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{DType, Device, Distribution, Tensor};
use burn_qlora::{
    FrozenLinear, KeptHidden, Linear4bit, LoraBias, LoraConfig, LoraLinear, MergeError,
    PeftAdapter, PeftConfig, Projection, QloraConfig, QuantConfig, QuantType, linear_from_torch,
};
use integration_tests::relative_error;

/// Float tolerance, relative: the two sides run the same f32 operations, maybe in another
/// summation order.
const TOLERANCE: f32 = 1e-5;

/// A linear layer with random weight and bias, frozen by nothing yet.
fn random_linear(d_input: usize, d_output: usize, device: &Device) -> Linear {
    let mut linear = linear_from_torch(Tensor::random(
        [d_output, d_input],
        Distribution::Normal(0.0, 0.5),
        device,
    ));
    let bias = Tensor::random([d_output], Distribution::Normal(0.0, 0.5), device);
    linear.bias = Some(burn::module::Param::from_tensor(bias));
    linear
}

/// A trained-looking adapter: B random instead of PEFT's zeros, so the update is not zero.
fn with_random_b(layer: LoraLinear) -> LoraLinear {
    let mut layer = layer;
    layer.lora_b.weight = layer.lora_b.weight.map(|w| {
        Tensor::random(w.shape(), Distribution::Normal(0.0, 0.1), &w.device())
            .set_require_grad(w.is_require_grad())
    });
    layer
}

/// The same layer with its 4-bit base swapped for the dense one dequantized from it.
fn dense_twin(layer: &LoraLinear) -> LoraLinear {
    let FrozenLinear::Packed(packed) = &layer.base else {
        panic!("a packed base")
    };
    let mut twin = layer.clone();
    twin.base = FrozenLinear::Dense(packed.dequantize(DType::F32).unwrap());
    twin
}

#[test]
fn a_4bit_base_computes_the_dense_layer_of_its_dequantized_weight() {
    let device = Device::flex();
    for config in [
        QuantConfig::default(),
        QuantConfig::new(QuantType::Fp4, 64, false),
        QuantConfig::new(QuantType::Nf4, 128, true),
    ] {
        // 96 x 80: the last absmax block is partial for block sizes that do not divide 7680.
        let packed = Linear4bit::quantize(random_linear(96, 80, &device), config).unwrap();
        let dense = packed.dequantize(DType::F32).unwrap();
        let x = Tensor::<3>::random([2, 5, 96], Distribution::Default, &device);
        let error = relative_error(packed.forward(x.clone()), dense.forward(x));
        assert!(error < TOLERANCE, "{config:?}: relative error {error}");
    }
}

#[test]
fn lora_gradients_over_a_4bit_base_equal_the_dense_case() {
    let device = Device::flex().autodiff();
    // The adapter is made on the dense layer's (autodiff) device, then the base is packed.
    let mut layer = with_random_b(LoraConfig::new(8).init(random_linear(96, 80, &device)));
    layer.base = layer.base.quantize(QuantConfig::default()).unwrap();
    let twin = dense_twin(&layer);
    let x = Tensor::<2>::random([6, 96], Distribution::Default, &device).require_grad();
    let weights = Tensor::<2>::random([6, 80], Distribution::Default, &device);

    let run = |layer: &LoraLinear| {
        let y = layer.forward(x.clone());
        let grads = (y.clone() * weights.clone()).sum().backward();
        let grad = |p: &burn::module::Param<Tensor<2>>| p.grad(&grads).expect("a gradient");
        (
            y.inner(),
            grad(&layer.lora_a.weight),
            grad(&layer.lora_b.weight),
            x.grad(&grads).expect("the input has a gradient"),
        )
    };
    let (y, grad_a, grad_b, grad_x) = run(&layer);
    let (y_dense, grad_a_dense, grad_b_dense, grad_x_dense) = run(&twin);
    for (what, ours, dense) in [
        ("y", y, y_dense),
        ("grad lora_A", grad_a, grad_a_dense),
        ("grad lora_B", grad_b, grad_b_dense),
        ("grad x", grad_x, grad_x_dense),
    ] {
        let error = relative_error(ours, dense);
        assert!(error < TOLERANCE, "{what}: relative error {error}");
    }
}

/// Activation checkpointing's two copies of a layer (`LoraLinear::with_kept_hidden`): the
/// keeping copy's forward without a graph puts the adapter's hidden where the taking copy finds
/// it with the adapter's cast, once; both give the layer's output, and the taking copy its
/// gradients, bit for bit.
#[test]
fn a_kept_hidden_reaches_the_recomputation_and_changes_no_number() {
    let device = Device::flex().autodiff();
    let mut layer = with_random_b(LoraConfig::new(8).init(random_linear(96, 80, &device)));
    layer.base = layer.base.quantize(QuantConfig::default()).unwrap();
    let (keeping, taking) = layer.with_kept_hidden();
    let x = Tensor::<3>::random([2, 3, 96], Distribution::Default, &device);
    let weights = Tensor::<3>::random([2, 3, 80], Distribution::Default, &device);
    let slot = match &taking.kept_hidden {
        Some(KeptHidden::Take(slot)) => slot.clone(),
        other => panic!("the taking copy holds {other:?}"),
    };
    let run = |layer: &LoraLinear| {
        let (x, a, b) = (
            x.clone().require_grad(),
            layer.lora_a.weight.val().require_grad(),
            layer.lora_b.weight.val().require_grad(),
        );
        let mut layer = layer.clone();
        layer.lora_a.weight = burn::module::Param::from_tensor(a.clone());
        layer.lora_b.weight = burn::module::Param::from_tensor(b.clone());
        let y = layer.forward(x.clone());
        let grads = (y.clone() * weights.clone()).sum().backward();
        [
            y.inner(),
            x.grad(&grads).unwrap(),
            a.grad(&grads).unwrap().unsqueeze(),
            b.grad(&grads).unwrap().unsqueeze(),
        ]
    };
    let expected = run(&layer);

    let kept_output = keeping.clone().no_grad().forward(x.clone());
    assert!(!kept_output.is_require_grad());
    assert_eq!(
        max_difference(kept_output.inner(), expected[0].clone()),
        0.0
    );
    let kept = slot.take().expect("the keeping forward fills the slot");
    assert_eq!(kept.hidden.dims(), [6, 8]);
    assert_eq!(kept.transposed_a.dims(), [8, 96]);
    assert_eq!(kept.scaled_b.dims(), [8, 80]);
    slot.put(kept);
    for (part, (ours, theirs)) in run(&taking).into_iter().zip(expected).enumerate() {
        assert_eq!(
            max_difference(ours, theirs),
            0.0,
            "output, grads of x, A, B: {part}"
        );
    }
    assert!(
        slot.take().is_none(),
        "the recomputation takes what was kept once"
    );
}

/// The largest absolute difference of two tensors' elements.
fn max_difference<const D: usize>(ours: Tensor<D>, theirs: Tensor<D>) -> f32 {
    (ours - theirs).abs().max().into_scalar::<f32>()
}

/// Dropout over a 4-bit base: it changes the output while training (an autodiff device, the
/// layer in training mode) and nothing in evaluation, where the layer takes the one-operation
/// path and gives the dropout-free layer's numbers exactly.
#[test]
fn lora_dropout_over_a_4bit_base_acts_only_while_training() {
    let device = Device::flex().autodiff();
    let config = LoraConfig::new(8).with_dropout(0.5);
    let mut layer = with_random_b(config.init(random_linear(96, 80, &device)));
    layer.base = layer.base.quantize(QuantConfig::default()).unwrap();
    let mut without = layer.clone();
    without.dropout.prob = 0.0;
    let x = Tensor::<2>::random([6, 96], Distribution::Default, &device);
    let difference = |a: Tensor<2>, b: Tensor<2>| (a - b).abs().max().into_scalar::<f32>();

    let training = difference(layer.forward(x.clone()), without.forward(x.clone()));
    assert!(
        training > 1e-3,
        "dropout changed nothing while training: {training}"
    );
    let evaluated = difference(
        layer.valid().forward(x.clone().inner()),
        without.valid().forward(x.inner()),
    );
    assert_eq!(evaluated, 0.0, "dropout changed the evaluated output");
}

#[test]
fn the_switches_choose_adapters_and_4bit_bases_by_projection_name() {
    let device = Device::flex();
    let config = QloraConfig::new().with_targets(vec!["q_proj".into(), "v".into()]);
    config.validate().unwrap();
    let build = |config: &QloraConfig, path: &str| {
        config.apply(path, random_linear(64, 64, &device)).unwrap()
    };
    let is_packed = |base: &FrozenLinear| matches!(base, FrozenLinear::Packed(_));

    let Projection::Lora(q) = build(&config, "layers.0.self_attn.q_proj") else {
        panic!("q is a target")
    };
    assert!(is_packed(&q.base), "quantize_lora_base is on by default");
    assert!(matches!(build(&config, "v_proj"), Projection::Lora(_)));
    let Projection::Frozen(k) = build(&config, "layers.0.self_attn.k_proj") else {
        panic!("k is not a target")
    };
    assert!(is_packed(&k), "quantize_frozen is on by default");

    let dense = config
        .clone()
        .with_quantize_frozen(false)
        .with_quantize_lora_base(false);
    let Projection::Lora(q) = build(&dense, "q_proj") else {
        panic!("q is a target")
    };
    assert!(!is_packed(&q.base));
    assert!(!matches!(
        build(&dense, "o_proj"),
        Projection::Frozen(FrozenLinear::Packed(_))
    ));

    let fp4 = config
        .clone()
        .with_quant_type(QuantType::Fp4)
        .with_double_quant(false);
    let Projection::Frozen(FrozenLinear::Packed(k)) = build(&fp4, "k_proj") else {
        panic!("a packed k")
    };
    assert_eq!(k.weight.quant_type, QuantType::Fp4);
    assert!(matches!(
        k.weight.absmax,
        burn_qlora::kernels::DeviceAbsmax::Plain(_)
    ));

    let err = QloraConfig::new()
        .with_targets(vec!["qq".into()])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("targets") && err.contains("\"qq\""), "{err}");
    let err = QloraConfig::new()
        .with_block_size(48)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("block_size"), "{err}");
}

#[test]
fn merging_gives_the_adapted_outputs_and_never_requantizes() {
    let device = Device::flex();
    let x = Tensor::<2>::random([4, 96], Distribution::Default, &device);

    // A 4-bit base: the merged layer is dense, and computes what the adapted layer computes.
    let packed = FrozenLinear::new(random_linear(96, 80, &device), Some(QuantConfig::default()));
    let layer = with_random_b(LoraConfig::new(8).init(packed.unwrap()));
    let merged = layer.to_merged_linear(DType::F32).unwrap();
    let error = relative_error(merged.forward(x.clone()), layer.forward(x.clone()));
    assert!(
        error < TOLERANCE,
        "merged 4-bit layer: relative error {error}"
    );
    let bf16 = layer.to_merged_linear(DType::BF16).unwrap();
    assert_eq!(bf16.weight.val().dtype(), DType::BF16);
    assert!(matches!(layer.merge(), Err(MergeError::PackedBase)));

    // A dense base: merge in place, then unmerge back to the original weight.
    let layer = with_random_b(LoraConfig::new(8).init(random_linear(96, 80, &device)));
    let before = layer.forward(x.clone());
    let FrozenLinear::Dense(original) = &layer.base else {
        panic!("a dense base")
    };
    let original = original.weight.val();
    let merged = layer.merge().unwrap();
    assert!(merged.merged);
    let error = relative_error(merged.forward(x.clone()), before);
    assert!(error < TOLERANCE, "merged in place: relative error {error}");
    assert!(matches!(
        merged.clone().merge(),
        Err(MergeError::AlreadyMerged)
    ));
    let unmerged = merged.unmerge().unwrap();
    let FrozenLinear::Dense(restored) = &unmerged.base else {
        panic!("a dense base")
    };
    let error = relative_error(restored.weight.val(), original);
    assert!(error < 1e-6, "unmerged weight: relative error {error}");
}

/// A small model named the way Hugging Face names LLaMA's attention.
#[derive(Module, Debug)]
struct Layer {
    self_attn: Attention,
}

#[derive(Module, Debug)]
struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
}

#[derive(Module, Debug)]
struct Toy {
    layers: Vec<Layer>,
}

impl Toy {
    fn new(config: &QloraConfig, device: &Device) -> Self {
        let layers = (0..2)
            .map(|i| {
                let proj = |name: &str| {
                    let path = format!("layers.{i}.self_attn.{name}");
                    config.apply(&path, random_linear(32, 32, device)).unwrap()
                };
                let self_attn = Attention {
                    q_proj: proj("q_proj"),
                    k_proj: proj("k_proj"),
                    v_proj: proj("v_proj"),
                };
                Layer { self_attn }
            })
            .collect();
        Self { layers }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.layers.iter().fold(x, |x, layer| {
            let attn = &layer.self_attn;
            attn.q_proj.forward(x.clone()) + attn.k_proj.forward(x.clone()) + attn.v_proj.forward(x)
        })
    }

    /// This model's adapters (fresh) over `trained`'s frozen weights, as a base checkpoint
    /// would give them; with `zero_bias`, the adapted projections' biases zeroed.
    fn with_bases_of(mut self, trained: &Toy, zero_bias: bool) -> Self {
        for (fresh, trained) in self.layers.iter_mut().zip(&trained.layers) {
            let (fresh, trained) = (&mut fresh.self_attn, &trained.self_attn);
            fresh.k_proj = trained.k_proj.clone();
            for (f, t) in [
                (&mut fresh.q_proj, &trained.q_proj),
                (&mut fresh.v_proj, &trained.v_proj),
            ] {
                if let (Projection::Lora(f), Projection::Lora(t)) = (f, t) {
                    f.base = t.base.clone();
                    if zero_bias && let FrozenLinear::Packed(base) = &mut f.base {
                        base.bias = base.bias.take().map(|b| b.map(|t| t.zeros_like()));
                    }
                }
            }
        }
        self
    }

    fn randomize_adapters(self) -> Self {
        let layers = self
            .layers
            .into_iter()
            .map(|mut layer| {
                let attn = &mut layer.self_attn;
                for proj in [&mut attn.q_proj, &mut attn.v_proj] {
                    if let Projection::Lora(lora) = proj {
                        *lora = with_random_b(lora.clone());
                    }
                }
                layer
            })
            .collect();
        Self { layers }
    }
}

#[test]
fn adapter_only_files_round_trip_through_a_whole_model() {
    let device = Device::flex();
    let config = QloraConfig::new().with_targets(vec!["q".into(), "v".into()]);
    let trained = Toy::new(&config, &device).randomize_adapters();
    let peft = PeftConfig::from_lora(&config.lora, vec!["q_proj".into(), "v_proj".into()]);
    let adapter = PeftAdapter::from_model(&trained, peft);
    assert_eq!(
        adapter.weights.keys().collect::<Vec<_>>(),
        [
            "layers.0.self_attn.q_proj",
            "layers.0.self_attn.v_proj",
            "layers.1.self_attn.q_proj",
            "layers.1.self_attn.v_proj"
        ]
    );
    assert_eq!(
        adapter.weights["layers.1.self_attn.q_proj"].0.dims(),
        [8, 32]
    );

    let dir = std::env::temp_dir().join(format!("adapter-only-{}", std::process::id()));
    adapter.save(&dir).unwrap();
    let loaded = PeftAdapter::load(&dir, &device).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(loaded.lora_config().scaling(), config.lora.scaling());

    // The frozen weights come from the base checkpoint; the adapter from its file.
    let fresh = Toy::new(&config, &device).with_bases_of(&trained, false);
    let restored = loaded.load_into(fresh).unwrap();
    let x = Tensor::<2>::random([3, 32], Distribution::Default, &device);
    let (ours, expected) = (restored.forward(x.clone()), trained.forward(x));
    assert_eq!(ours.into_data(), expected.into_data(), "bit for bit");

    // An adapter for other modules, or of another rank, names the tensor that does not fit.
    let mut extra = loaded.clone();
    let pair = extra.weights["layers.0.self_attn.q_proj"].clone();
    extra
        .weights
        .insert("layers.0.self_attn.o_proj".into(), pair);
    let err = extra
        .load_into(Toy::new(&config, &device))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("base_model.model.layers.0.self_attn.o_proj.lora_A.weight"),
        "{err}"
    );
    let mut missing = loaded.clone();
    missing.weights.remove("layers.1.self_attn.v_proj");
    let err = missing
        .load_into(Toy::new(&config, &device))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.1.self_attn.v_proj.lora_A.weight"),
        "{err}"
    );
    let rank4 = config.clone().with_lora(LoraConfig::new(4));
    let err = loaded
        .load_into(Toy::new(&rank4, &device))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_A.weight") && err.contains("[8, 32]"),
        "{err}"
    );
}

/// The bias of a projection's base.
fn base_bias(projection: &Projection) -> burn::module::Param<Tensor<1>> {
    let base = match projection {
        Projection::Lora(lora) => &lora.base,
        Projection::Frozen(frozen) => frozen,
    };
    let bias = match base {
        FrozenLinear::Dense(linear) => &linear.bias,
        FrozenLinear::Packed(linear) => &linear.bias,
    };
    bias.clone().expect("a bias")
}

#[test]
fn the_bias_option_chooses_which_biases_train_as_peft_does() {
    let device = Device::flex().autodiff();
    let x = Tensor::<2>::random([3, 32], Distribution::Default, &device);
    for (bias, adapted_trains, frozen_trains) in [
        (LoraBias::None, false, false),
        (LoraBias::LoraOnly, true, false),
        (LoraBias::All, true, true),
    ] {
        let config = QloraConfig::new()
            .with_lora(LoraConfig::new(8).with_bias(bias))
            .with_targets(vec!["q".into()]);
        let q = config
            .apply("q_proj", random_linear(32, 32, &device))
            .unwrap();
        let k = config
            .apply("k_proj", random_linear(32, 32, &device))
            .unwrap();
        let grads = (q.forward(x.clone()) + k.forward(x.clone()))
            .sum()
            .backward();
        assert_eq!(
            base_bias(&q).grad(&grads).is_some(),
            adapted_trains,
            "{bias:?}: the adapted projection's bias"
        );
        assert_eq!(
            base_bias(&k).grad(&grads).is_some(),
            frozen_trains,
            "{bias:?}: the frozen projection's bias"
        );
    }
}

#[test]
fn trained_biases_travel_in_the_adapter_file_under_peft_names() {
    let device = Device::flex();
    let lora = LoraConfig::new(8).with_bias(LoraBias::LoraOnly);
    let config = QloraConfig::new()
        .with_lora(lora.clone())
        .with_targets(vec!["q".into(), "v".into()]);
    let mut trained = Toy::new(&config, &device).randomize_adapters();
    for layer in &mut trained.layers {
        if let Projection::Lora(q) = &mut layer.self_attn.q_proj
            && let FrozenLinear::Packed(base) = &mut q.base
        {
            base.bias = base
                .bias
                .take()
                .map(|b| b.map(|t| Tensor::random(t.shape(), Distribution::Default, &t.device())));
        }
    }
    let peft = PeftConfig::from_lora(&lora, vec!["q_proj".into(), "v_proj".into()]);
    let adapter = PeftAdapter::from_model(&trained, peft);
    assert_eq!(
        adapter.biases.keys().collect::<Vec<_>>(),
        [
            "layers.0.self_attn.q_proj.base_layer.bias",
            "layers.0.self_attn.v_proj.base_layer.bias",
            "layers.1.self_attn.q_proj.base_layer.bias",
            "layers.1.self_attn.v_proj.base_layer.bias"
        ]
    );

    let dir = std::env::temp_dir().join(format!("adapter-bias-{}", std::process::id()));
    adapter.save(&dir).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["bias"], "lora_only");
    let loaded = PeftAdapter::load(&dir, &device).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(loaded.lora_config().bias, LoraBias::LoraOnly);

    let fresh = Toy::new(&config, &device).with_bases_of(&trained, true);
    let restored = loaded.load_into(fresh).unwrap();
    let x = Tensor::<2>::random([3, 32], Distribution::Default, &device);
    assert_eq!(
        restored.forward(x.clone()).into_data(),
        trained.forward(x).into_data(),
        "the biases came back from the file"
    );
}
