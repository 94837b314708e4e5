//! QLoRA training throughput and peak device memory at LLaMA-2-7B shapes (vocab 32000, dim 4096,
//! 32 layers, 32 heads, MLP 11008) with random N(0, 0.02) weights drawn directly into 4-bit
//! bases (NF4, double quantization; no dense copy of the model ever exists), LoRA r 8 alpha 16 on
//! q, k, v, o, gate, up and down, AdamW (`FusedAdamW`), random tokens. The output head stays
//! dense in the compute dtype, as bitsandbytes and torchtune keep it.
//!
//! One setting per process, so each peak is its own:
//! `bench-train --backend cuda` and `bench-train --backend cuda --activation-checkpointing`

use std::time::Instant;

use anyhow::{Result, ensure};
use apps::bench::{FUSION, gib, median, memory_in_use, peak_reserved};
use apps::train::{CausalLm, LmBatch};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::tensor::{Device, Distribution, Int, Tensor};
use burn::train::TrainStep;
use burn_qlora::{FusedAdamWConfig, LoraBias, LoraConfig, QloraConfig};
use clap::Parser;
use llama_burn::{Llama, LlamaConfig, LoadOptions};

#[derive(Parser)]
#[command(about = "Tokens/s and peak memory of QLoRA training at LLaMA-2-7B shapes")]
struct Args {
    /// Backend: auto, cuda, vulkan, wgpu or flex.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Compute dtype of the model: bf16, f16 or f32 (the adapters stay f32).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Decoder layers (32 for LLaMA-2-7B; fewer for a quick look).
    #[arg(long, default_value_t = 32)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Recompute each layer's activations in the backward instead of keeping them.
    #[arg(long)]
    activation_checkpointing: bool,
    /// Without checkpointing: keep each layer's dequantized weights from its forward to its
    /// backward (one dequantization a weight and step, 2 bytes a frozen weight of memory).
    #[arg(long)]
    dense_weights: bool,
    /// Steps before timing starts (kernel compilation and autotuning happen here).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps; the median is reported.
    #[arg(long, default_value_t = 10)]
    steps: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.steps > 0, "--steps must be at least 1");
    let device = apps::device(&args.backend)?;
    device.seed(0);
    let train_device = device.clone().autodiff();

    let config = LlamaConfig {
        num_hidden_layers: args.layers,
        ..LlamaConfig::llama2_7b()
    };
    let qlora = QloraConfig::new()
        .with_lora(LoraConfig::new(args.rank).with_alpha(args.alpha))
        .with_quantize_frozen(false);
    let options = LoadOptions {
        dtype: apps::parse_dtype(&args.dtype)?,
        qlora: Some(qlora),
    };
    let vocab = config.vocab_size;
    let start = Instant::now();
    let model = Llama::random(config, 0.02, &options, &train_device)?;
    device.sync()?;
    let resident = memory_in_use(&device)?;
    eprintln!(
        "built {} layers in {:.1} s: {:.2} GiB resident",
        args.layers,
        start.elapsed().as_secs_f64(),
        gib(resident)
    );

    let trainable = burn_qlora::trainable_params(&model, LoraBias::None);
    let mut model = CausalLm::new(model, trainable, 1)
        .with_activation_checkpointing(args.activation_checkpointing)
        .with_dense_weights(args.dense_weights);
    let mut optimizer = FusedAdamWConfig::new().init();
    let batch = random_batch(&args, vocab, &train_device);
    let tokens = (args.batch * args.seq_len) as f64;

    let mut step_seconds = Vec::with_capacity(args.steps);
    for step in 0..args.warmup + args.steps {
        let start = Instant::now();
        let output = model.step(batch.clone());
        let loss = output.item.loss.clone();
        let optimizer_start = Instant::now();
        model = model.optimize(&mut optimizer, ModuleLearningRate::from(1e-4), output.grads);
        // The host's share: when it has issued the whole step, the device may still be busy.
        let host_seconds = start.elapsed().as_secs_f64();
        let optimizer_seconds = optimizer_start.elapsed().as_secs_f64();
        device.sync()?;
        let seconds = start.elapsed().as_secs_f64();
        let loss = loss.into_scalar::<f32>();
        eprintln!(
            "step {step}: {:.0} ms (host {:.0} ms, optimizer {:.1} ms), {:.0} tokens/s, loss \
             {loss:.4}{}",
            seconds * 1e3,
            host_seconds * 1e3,
            optimizer_seconds * 1e3,
            tokens / seconds,
            if step < args.warmup { " (warm-up)" } else { "" }
        );
        if step >= args.warmup {
            step_seconds.push(seconds);
        }
    }
    let seconds = median(step_seconds);
    println!(
        "{} layers, batch {} x {}, {:?}, activation checkpointing {}, dense weights {}, fusion \
         {}: {:.0} tokens/s ({:.0} ms/step, median of {}), peak reserved {:.3} GiB, model {:.2} GiB",
        args.layers,
        args.batch,
        args.seq_len,
        options.dtype,
        on_off(args.activation_checkpointing),
        on_off(args.dense_weights),
        FUSION,
        tokens / seconds,
        seconds * 1e3,
        args.steps,
        gib(peak_reserved(&device)?),
        gib(resident),
    );
    Ok(())
}

/// A switch as the summary line prints it.
fn on_off(switch: bool) -> &'static str {
    if switch { "on" } else { "off" }
}

/// Uniform random tokens of the model's vocabulary, every target trained.
fn random_batch(args: &Args, vocab: usize, device: &Device) -> LmBatch {
    let tokens = Tensor::<2, Int>::random(
        [args.batch, args.seq_len + 1],
        Distribution::Uniform(0.0, vocab as f64),
        device,
    );
    LmBatch {
        inputs: tokens.clone().narrow(1, 0, args.seq_len),
        targets: tokens.narrow(1, 1, args.seq_len),
        weights: Tensor::ones([args.batch, args.seq_len], device),
    }
}
