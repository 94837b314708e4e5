//! Decode speed at batch 1 and LLaMA-2-7B shapes with random weights: the QLoRA model as a
//! trained run is served unmerged (NF4 double-quantized bases with LoRA r 8 on q, k, v, o, gate,
//! up, down; dense head), or the same shapes dense in bf16. Prefill of a random prompt through the
//! KV cache, then one token at a time, greedy, each token's logits read back as `chat` does.
//!
//! `bench-decode --backend cuda --weights qlora` and `bench-decode --backend cuda --weights bf16`

use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{Result, bail, ensure};
use apps::bench::{FUSION, gib, memory_in_use};
use burn_qlora::QloraConfig;
use clap::Parser;
use llama_burn::{Llama, LlamaConfig, LoadOptions, SamplingConfig, generate};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[derive(Parser)]
#[command(about = "Decode tokens/s at batch 1 at LLaMA-2-7B shapes")]
struct Args {
    /// Backend: auto, cuda, vulkan, wgpu or flex.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Compute dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// `qlora` (4-bit bases and adapters) or `bf16` (dense weights in the compute dtype).
    #[arg(long, default_value = "qlora")]
    weights: String,
    /// Decoder layers (32 for LLaMA-2-7B).
    #[arg(long, default_value_t = 32)]
    layers: usize,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated; the first (after the prefill) is not timed.
    #[arg(long, default_value_t = 129)]
    new_tokens: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.new_tokens >= 2, "--new-tokens must be at least 2");
    let device = apps::device(&args.backend)?;
    device.seed(0);
    // No end-of-sequence token: random weights would stop anywhere.
    let config = LlamaConfig {
        num_hidden_layers: args.layers,
        eos_token_id: None,
        ..LlamaConfig::llama2_7b()
    };
    let qlora = match args.weights.as_str() {
        "qlora" => Some(QloraConfig::new().with_quantize_frozen(false)),
        "bf16" => None,
        other => bail!("--weights {other:?}: use qlora or bf16"),
    };
    let options = LoadOptions {
        dtype: apps::parse_dtype(&args.dtype)?,
        qlora,
    };
    let model = Llama::random(config.clone(), 0.02, &options, &device)?;
    device.sync()?;
    let resident = memory_in_use(&device)?;

    let mut rng = StdRng::seed_from_u64(0);
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|_| rng.random_range(0..config.vocab_size as u32))
        .collect();
    let sampling = SamplingConfig::new().with_max_new_tokens(args.new_tokens);
    let start = Instant::now();
    let mut token_times = Vec::with_capacity(args.new_tokens);
    generate(&model, &config, &prompt, sampling, |_| {
        token_times.push(start.elapsed().as_secs_f64());
        ControlFlow::Continue(())
    })?;
    let (first, last) = (token_times[0], token_times[token_times.len() - 1]);
    let decoded = (token_times.len() - 1) as f64;
    println!(
        "{} weights, {} layers, {:?}, fusion {}, batch 1: prefill of {} tokens + first token {:.0} ms, \
         decode {:.1} tokens/s ({:.2} ms/token over {} tokens), model {:.2} GiB",
        args.weights,
        args.layers,
        options.dtype,
        FUSION,
        args.prompt_tokens,
        first * 1e3,
        decoded / (last - first),
        (last - first) / decoded * 1e3,
        decoded,
        gib(resident),
    );
    Ok(())
}
