//! llama-burn against transformers: `../shared/golden/llama_tiny/` is a random GQA LLaMA in
//! Hugging Face layout with the logits `LlamaForCausalLM` gives for fixed tokens, and
//! `llama_tiny_adapter/` a PEFT adapter on all seven projections with the adapted logits; the
//! adapted model merged and written back in Hugging Face's layout gives them too.

use std::ops::ControlFlow;

use std::path::Path;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_qlora::{PeftAdapter, QloraConfig};
use integration_tests::{GoldenFile, golden_dir, golden_input_ids, model_devices, relative_error};
use llama_burn::{KvCache, Llama, LlamaConfig, LoadOptions, SamplingConfig, SaveOptions, generate};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

/// Max absolute error on the logits, f32.
const TOLERANCE: f32 = 1e-4;

/// Held by every test here: Flex has one random generator for the process, tests run on
/// parallel threads, and the dropout test seeds it between draws that must repeat.
static DEVICE_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn take_rng() -> std::sync::MutexGuard<'static, ()> {
    DEVICE_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn max_abs_error(actual: Tensor<3>, expected: Tensor<3>) -> f32 {
    (actual - expected).abs().max().into_scalar::<f32>()
}

#[test]
fn logits_match_transformers() {
    let _rng = take_rng();
    let Some(golden) = golden_dir() else { return };
    let dir = golden.join("llama_tiny");
    let expected_path = dir.join("expected.safetensors");
    let expected = GoldenFile::open(&expected_path);
    for (name, device) in model_devices() {
        let (model, config) = Llama::from_hf(&dir, &LoadOptions::default(), &device).unwrap();
        assert_eq!((config.num_attention_heads, config.num_kv_heads()), (8, 4));
        let logits = model.forward(golden_input_ids(&expected_path, &device), None);
        let error = max_abs_error(logits, expected.tensor("logits", &device));
        assert!(error <= TOLERANCE, "{name}: max abs error {error}");
    }
}

/// The golden tiny LLaMA with the golden PEFT adapter, its bases dense or (`quantize`) NF4, its
/// LoRA dropout the adapter's unless `dropout` says otherwise.
fn adapted_model(
    golden: &Path,
    quantize: bool,
    dropout: Option<f64>,
    device: &Device,
) -> (Llama, LlamaConfig) {
    let adapter = PeftAdapter::load(&golden.join("llama_tiny_adapter"), device).unwrap();
    let mut lora = adapter.lora_config();
    if let Some(dropout) = dropout {
        lora = lora.with_dropout(dropout);
    }
    let qlora = QloraConfig::new()
        .with_lora(lora)
        .with_targets(adapter.config.target_modules.clone())
        .with_quantize_frozen(quantize)
        .with_quantize_lora_base(quantize);
    let options = LoadOptions {
        qlora: Some(qlora),
        ..LoadOptions::default()
    };
    let (model, config) = Llama::from_hf(&golden.join("llama_tiny"), &options, device).unwrap();
    (adapter.load_into(model).unwrap(), config)
}

/// peft's adapted logits, over dense bases; on CubeCL devices also over NF4 bases (the 4-bit
/// matmul's kernels), against the same model on Flex.
#[test]
fn adapted_logits_match_peft() {
    let _rng = take_rng();
    let Some(golden) = golden_dir() else { return };
    let expected_path = golden.join("llama_tiny_adapter/expected.safetensors");
    let expected = GoldenFile::open(&expected_path);
    let flex = Device::flex();
    let (quantized, _) = adapted_model(&golden, true, None, &flex);
    let quantized_logits = quantized.forward(golden_input_ids(&expected_path, &flex), None);
    for (name, device) in model_devices() {
        let tokens = golden_input_ids(&expected_path, &device);
        let (model, _) = adapted_model(&golden, false, None, &device);
        let logits = model.forward(tokens.clone(), None);
        let error = max_abs_error(logits, expected.tensor("logits", &device));
        assert!(error <= TOLERANCE, "{name}: max abs error {error}");

        if name == "flex" {
            continue; // the NF4 reference itself
        }
        let (model, _) = adapted_model(&golden, true, None, &device);
        let logits = model.forward(tokens, None).to_device(&flex);
        let error = max_abs_error(logits, quantized_logits.clone());
        assert!(error <= TOLERANCE, "{name} NF4: max abs error {error}");
    }
}

/// A merged checkpoint written in Hugging Face's layout loads as a plain model (no adapter) and
/// gives peft's adapted logits; sharded, the same numbers; merged over 4-bit bases, the 4-bit
/// model's numbers; in bf16, bf16 weights.
#[test]
fn merged_checkpoints_compute_the_adapted_model() {
    let _rng = take_rng();
    let Some(golden) = golden_dir() else { return };
    let device = Device::flex();
    let dir = std::env::temp_dir().join(format!("llama-merged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let expected_path = golden.join("llama_tiny_adapter/expected.safetensors");
    let tokens = golden_input_ids(&expected_path, &device);
    let f32_options = SaveOptions {
        dtype: DType::F32,
        ..SaveOptions::default()
    };
    let merged_logits = |out: &Path| {
        let (model, config) = Llama::from_hf(out, &LoadOptions::default(), &device).unwrap();
        (model.forward(tokens.clone(), None), config)
    };

    let (model, config) = adapted_model(&golden, false, None, &device);
    let single = dir.join("single");
    let written = model.save_hf(&config, &single, &f32_options).unwrap();
    assert_eq!(written.len(), 2, "{written:?}");
    let (logits, merged_config) = merged_logits(&single);
    assert_eq!(merged_config, config);
    let expected = GoldenFile::open(&expected_path).tensor("logits", &device);
    let error = max_abs_error(logits.clone(), expected);
    assert!(error <= TOLERANCE, "merged vs peft: max abs error {error}");
    let bytes = std::fs::read(single.join("model.safetensors")).unwrap();
    let names = SafeTensors::deserialize(&bytes).unwrap().names().len();
    assert_eq!(
        names,
        3 + 3 * 9,
        "embedding, norm, head and 9 tensors a layer"
    );

    // Shards of at most ~300 kB, with transformers' index.
    let sharded = dir.join("sharded");
    let options = SaveOptions {
        max_shard_bytes: 300_000,
        ..f32_options.clone()
    };
    let written = model.save_hf(&config, &sharded, &options).unwrap();
    assert!(sharded.join("model.safetensors.index.json").is_file());
    assert!(written.len() > 3, "{written:?}");
    let (sharded_logits, _) = merged_logits(&sharded);
    assert_eq!(max_abs_error(sharded_logits, logits), 0.0);

    // Over NF4 bases: the dequantized base plus the update, what the 4-bit model computes.
    let (model, config) = adapted_model(&golden, true, None, &device);
    let quantized = dir.join("quantized");
    model.save_hf(&config, &quantized, &f32_options).unwrap();
    let adapted = model.forward(tokens.clone(), None);
    let error = max_abs_error(merged_logits(&quantized).0, adapted.clone());
    assert!(error <= TOLERANCE, "merged vs 4-bit: max abs error {error}");

    // bf16 weights, named so in config.json; the logits within bf16's precision.
    let bf16 = dir.join("bf16");
    model
        .save_hf(&config, &bf16, &SaveOptions::default())
        .unwrap();
    let bytes = std::fs::read(bf16.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert!(file.iter().all(|(_, view)| view.dtype() == Dtype::BF16));
    let json = std::fs::read_to_string(bf16.join("config.json")).unwrap();
    assert!(json.contains("\"torch_dtype\": \"bfloat16\""), "{json}");
    let error = relative_error(merged_logits(&bf16).0, adapted);
    assert!(
        error <= 1e-2,
        "bf16 merged vs 4-bit: relative error {error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    let _rng = take_rng();
    let Some(golden) = golden_dir() else { return };
    let dir = golden.join("llama_tiny");
    let device = Device::flex();
    let (model, config) = Llama::from_hf(&dir, &LoadOptions::default(), &device).unwrap();
    let tokens = golden_input_ids(&dir.join("expected.safetensors"), &device);
    let full = model.forward(tokens.clone(), None);

    // A prefix in one call, then one token a call.
    let mut cache = KvCache::new(&config);
    let mut pieces = vec![model.forward(tokens.clone().narrow(1, 0, 20), Some(&mut cache))];
    for position in 20..48 {
        pieces.push(model.forward(tokens.clone().narrow(1, position, 1), Some(&mut cache)));
    }
    assert_eq!(cache.len(), 48);
    let error = max_abs_error(Tensor::cat(pieces, 1), full);
    assert!(error <= TOLERANCE, "max abs error {error}");

    // Greedy generation through the cache picks the full forward's argmax at each step.
    let prompt: Vec<u32> = vec![1, 17, 42, 99];
    let sampling = SamplingConfig::new().with_max_new_tokens(6);
    let generated = generate(&model, &config, &prompt, sampling, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let mut sequence = prompt.clone();
    for &token in &generated {
        let ids: Vec<i64> = sequence.iter().map(|&t| i64::from(t)).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, sequence.len()]), &device);
        let logits = model.forward(input, None);
        let last = logits.narrow(1, sequence.len() - 1, 1).argmax(2);
        assert_eq!(last.into_scalar::<i64>(), i64::from(token));
        sequence.push(token);
    }
}

#[test]
fn a_checkpoint_that_does_not_fit_names_the_tensor() {
    let _rng = take_rng();
    let Some(golden) = golden_dir() else { return };
    let source = golden.join("llama_tiny");
    let device = Device::flex();
    let dir = std::env::temp_dir().join(format!("llama-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // One tensor left out of the checkpoint.
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "model.layers.1.mlp.up_proj.weight")
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(kept, None).unwrap(),
    )
    .unwrap();
    std::fs::copy(source.join("config.json"), dir.join("config.json")).unwrap();
    let err = Llama::from_hf(&dir, &LoadOptions::default(), &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");

    // A config that does not match the checkpoint.
    std::fs::copy(
        source.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(source.join("config.json")).unwrap();
    let config = config.replace("\"intermediate_size\": 352", "\"intermediate_size\": 300");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = Llama::from_hf(&dir, &LoadOptions::default(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[300, 128]"),
        "{err}"
    );

    // A truncated file.
    let truncated = &bytes[..bytes.len() / 2];
    std::fs::write(dir.join("model.safetensors"), truncated).unwrap();
    std::fs::copy(source.join("config.json"), dir.join("config.json")).unwrap();
    let err = Llama::from_hf(&dir, &LoadOptions::default(), &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_qlora_model_loads_4bit_and_trains_only_its_adapters() {
    let _rng = take_rng();
    let Some(golden) = golden_dir() else { return };
    let dir = golden.join("llama_tiny");
    let device = Device::flex().autodiff();
    let options = LoadOptions {
        qlora: Some(QloraConfig::new()),
        ..LoadOptions::default()
    };
    let (model, _) = Llama::from_hf(&dir, &options, &device).unwrap();
    let tokens = golden_input_ids(&dir.join("expected.safetensors"), &device);
    let logits = model.forward(tokens, None);

    // The same model with every 4-bit base swapped for its dequantized dense weight computes
    // the same logits.
    let dense = |projection: &burn_qlora::Projection| match projection {
        burn_qlora::Projection::Lora(lora) => {
            let mut lora = lora.clone();
            lora.base = burn_qlora::FrozenLinear::Dense(lora.base.to_dense(DType::F32).unwrap());
            burn_qlora::Projection::Lora(lora)
        }
        burn_qlora::Projection::Frozen(frozen) => burn_qlora::Projection::Frozen(
            burn_qlora::FrozenLinear::Dense(frozen.to_dense(DType::F32).unwrap()),
        ),
    };
    let mut twin = model.clone();
    for layer in &mut twin.model.layers {
        let attn = &mut layer.self_attn;
        for projection in [
            &mut attn.q_proj,
            &mut attn.k_proj,
            &mut attn.v_proj,
            &mut attn.o_proj,
        ] {
            *projection = dense(projection);
        }
        let mlp = &mut layer.mlp;
        for projection in [&mut mlp.gate_proj, &mut mlp.up_proj, &mut mlp.down_proj] {
            *projection = dense(projection);
        }
    }
    twin.lm_head = twin.lm_head.as_ref().map(dense);
    let tokens = golden_input_ids(&dir.join("expected.safetensors"), &device);
    let error = max_abs_error(logits.clone().inner(), twin.forward(tokens, None).inner());
    assert!(
        error <= TOLERANCE,
        "4-bit vs dequantized dense: max abs error {error}"
    );

    let grads = logits.mean().backward();
    let q = &model.model.layers[0].self_attn.q_proj;
    let burn_qlora::Projection::Lora(q) = q else {
        panic!("q_proj has an adapter")
    };
    assert!(matches!(q.base, burn_qlora::FrozenLinear::Packed(_)));
    assert!(q.lora_a.weight.grad(&grads).is_some(), "lora_A trains");
    assert!(
        model.model.embed_tokens.weight.grad(&grads).is_none(),
        "the embedding is frozen"
    );
}

#[test]
fn a_random_model_has_the_config_shapes_and_the_asked_spread() {
    let _rng = take_rng();
    // Needs no golden files: the benchmarks' model, at a small size.
    let device = Device::flex();
    device.seed(7);
    let config = LlamaConfig::new(512, 256, 688, 2, 4).with_num_key_value_heads(Some(2));
    let options = LoadOptions {
        qlora: Some(QloraConfig::new().with_quantize_frozen(false)),
        ..LoadOptions::default()
    };
    let model = Llama::random(config, 0.02, &options, &device).unwrap();

    let layer = &model.model.layers[1];
    let burn_qlora::Projection::Lora(k) = &layer.self_attn.k_proj else {
        panic!("k_proj has an adapter")
    };
    assert!(matches!(k.base, burn_qlora::FrozenLinear::Packed(_)));
    assert_eq!(k.base.dims(), [256, 2 * 64], "k_proj: 2 KV heads of 64");
    let Some(burn_qlora::Projection::Frozen(head)) = &model.lm_head else {
        panic!("the head is frozen")
    };
    assert!(
        matches!(head, burn_qlora::FrozenLinear::Dense(_)),
        "head kept dense"
    );

    // N(0, 0.02): the sample standard deviation of 512 x 256 draws is within 2% of it.
    let embedding = model.model.embed_tokens.weight.val();
    let std = embedding
        .clone()
        .powi_scalar(2)
        .mean()
        .sqrt()
        .into_scalar::<f32>();
    assert!((std - 0.02).abs() < 0.02 * 0.02, "embedding std {std}");
    let norm = layer.input_layernorm.weight.val();
    assert_eq!(
        norm.clone().min().into_scalar::<f32>(),
        1.0,
        "norms start at 1"
    );
    assert_eq!(norm.max().into_scalar::<f32>(), 1.0, "norms start at 1");

    let tokens = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9], [1, 3]), &device);
    assert_eq!(model.forward(tokens, None).dims(), [1, 3, 512]);
}

/// Activation checkpointing per layer (`Llama::checkpointed_backward`) runs the backward in
/// stages (the head and loss in chunks of positions, then each layer from its input) and must
/// give the loss and adapter gradients of one backward through the whole model: the golden tiny
/// LLaMA with the golden adapter on 4-bit bases, chunks of positions not dividing the length; on
/// every test device.
#[test]
fn checkpointed_backward_gives_the_full_backward_gradients() {
    let _rng = take_rng();
    let Some(golden) = golden_dir() else { return };
    for (name, device) in model_devices() {
        let device = device.autodiff();
        let (model, config) = adapted_model(&golden, true, None, &device);
        let tokens = golden_input_ids(&golden.join("llama_tiny/expected.safetensors"), &device);
        let [batch, seq] = tokens.dims();
        let chunk = (2..seq)
            .find(|c| seq % c != 0)
            .expect("a chunk not dividing the length");
        let targets = Tensor::<2, Int>::random(
            [batch, seq],
            burn::tensor::Distribution::Uniform(0.0, config.vocab_size as f64),
            &device,
        );
        // Mean negative log-likelihood of the targets, over `positions`' share of them.
        let nll = |logits: Tensor<3>, positions: std::ops::Range<usize>| {
            let picked = burn::tensor::activation::log_softmax(logits, 2)
                .gather(
                    2,
                    targets
                        .clone()
                        .narrow(1, positions.start, positions.len())
                        .unsqueeze_dim(2),
                )
                .sum();
            -picked / (batch * seq) as f64
        };
        let scale = 0.5;

        let loss = nll(model.forward(tokens.clone(), None), 0..seq);
        let full = (loss.clone() * scale).backward();
        let step = model.checkpointed_backward(tokens, chunk, scale, nll);

        let loss_error = (step.loss.inner() - loss.inner())
            .abs()
            .into_scalar::<f32>();
        assert!(loss_error < 1e-5, "{name}: loss differs by {loss_error}");
        let compared = assert_same_adapter_grads(&model, &full, &step.grads);
        assert_eq!(compared, 14 * config.num_hidden_layers);
    }
}

/// The step over the weights' dense copies, kept from each layer's forward to its backward, has
/// the logits and adapter gradients of the step over the packed weights: the copies are the
/// dequantization the products would make themselves.
#[test]
fn dense_copies_give_the_logits_and_gradients_of_the_packed_weights() {
    let _rng = take_rng();
    let Some(golden) = golden_dir() else { return };
    for (name, device) in model_devices() {
        let device = device.autodiff();
        let (model, config) = adapted_model(&golden, true, None, &device);
        let tokens = golden_input_ids(&golden.join("llama_tiny/expected.safetensors"), &device);

        let packed = model.forward(tokens.clone(), None);
        let dense = model.forward_over_dense_copies(tokens).unwrap();
        let error = relative_error(dense.clone(), packed.clone());
        assert!(error < 1e-6, "{name}: logits differ by {error} (relative)");
        let full = packed.sum().backward();
        let over_copies = burn::optim::GradientsParams::from_grads(dense.sum().backward(), &model);
        let compared = assert_same_adapter_grads(&model, &full, &over_copies);
        assert_eq!(compared, 14 * config.num_hidden_layers);
    }
}

/// With LoRA dropout, the recomputation of each layer must draw the masks its first forward
/// drew: the checkpointed gradients equal those of a whole-model backward whose forward seeds
/// the device as `checkpointed_backward` does (one draw from the device, plus the layer index).
#[test]
fn checkpointed_backward_recomputes_the_same_dropout_masks() {
    let _rng = take_rng();
    let Some(golden) = golden_dir() else { return };
    let device = Device::flex().autodiff();
    let (model, _) = adapted_model(&golden, true, Some(0.5), &device);
    let tokens = golden_input_ids(&golden.join("llama_tiny/expected.safetensors"), &device);
    let sum = |logits: Tensor<3>, _: std::ops::Range<usize>| logits.sum();

    device.seed(11);
    let step = model.checkpointed_backward(tokens.clone(), 4, 1.0, sum);

    device.seed(11);
    let seed = Tensor::<1, Int>::random([1], burn::tensor::Distribution::Uniform(0.0, 1e9), &device)
        .into_scalar::<i64>() as u64;
    let inner = &model.model;
    let mut hidden = inner.embed_tokens.forward(tokens);
    for (index, layer) in inner.layers.iter().enumerate() {
        device.seed(seed + index as u64);
        hidden = layer.forward(hidden, &inner.rope, None);
    }
    let full = model.logits(inner.norm.forward(hidden)).sum().backward();

    assert_same_adapter_grads(&model, &full, &step.grads);
}

/// Asserts that every adapter weight's checkpointed gradient (or another step's) equals its
/// whole-model backward one (relative 1e-5, f32: the same products in another grouping); returns
/// how many it compared.
fn assert_same_adapter_grads(
    model: &Llama,
    full: &burn::tensor::Gradients,
    checkpointed: &burn::optim::GradientsParams,
) -> usize {
    let mut compared = 0;
    for layer in &model.model.layers {
        let (attn, mlp) = (&layer.self_attn, &layer.mlp);
        for projection in [
            &attn.q_proj,
            &attn.k_proj,
            &attn.v_proj,
            &attn.o_proj,
            &mlp.gate_proj,
            &mlp.up_proj,
            &mlp.down_proj,
        ] {
            let burn_qlora::Projection::Lora(lora) = projection else {
                panic!("every projection has an adapter")
            };
            for weight in [&lora.lora_a.weight, &lora.lora_b.weight] {
                let expected = weight.val().grad(full).expect("a full-backward gradient");
                let actual = checkpointed
                    .get::<2>(weight.id)
                    .expect("a checkpointed gradient");
                let error = relative_error(actual.unsqueeze::<3>(), expected.unsqueeze::<3>());
                assert!(error < 1e-5, "{:?}: relative error {error}", weight.id);
                compared += 1;
            }
        }
    }
    compared
}
