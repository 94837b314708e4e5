//! Export a training run's adapter, from its end or from any checkpoint (a run that stopped
//! early too), as a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`)
//! that peft's `PeftModel.from_pretrained`, vLLM and `chat --adapter` load.
//!
//! `cargo run --release -p apps --bin export-peft -- --run runs/default --checkpoint 2 --output adapter-2`

use std::path::PathBuf;

use anyhow::{Context, Result};
use apps::trained::{Base, load_run, peft_config};
use burn_qlora::PeftAdapter;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Export a training run's adapter in PEFT's format")]
struct Args {
    /// The training run folder.
    #[arg(long)]
    run: PathBuf,
    /// The checkpoint to export (a number in `<run>/checkpoint`). Default: the final adapter,
    /// else the newest checkpoint.
    #[arg(long)]
    checkpoint: Option<usize>,
    /// The output folder.
    #[arg(long)]
    output: PathBuf,
    /// Backend: auto, cuda, vulkan, wgpu or flex.
    #[arg(long, default_value = "auto")]
    backend: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = apps::device(&args.backend)?;
    let (loaded, config) = load_run(&args.run, args.checkpoint, Base::AsTrained, &device)?;
    let peft = peft_config(&config, &loaded.model_path)?;
    PeftAdapter::from_model(&loaded.model, peft)
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("{}", args.output.display());
    Ok(())
}
