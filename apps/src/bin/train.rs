//! Fine-tune a LLaMA-family model with LoRA adapters over a 4-bit base.
//!
//! `cargo run --release -p apps --bin train` trains SmolLM2-135M-Instruct on the chatterbot
//! corpus; `--config run.toml` and `section.key=value` overrides change any setting
//! (`train.steps=200 lora.r=16`). `--resume` continues the run in `train.output_dir` from its
//! newest checkpoint, with the config saved there.

use std::path::PathBuf;

use anyhow::Result;
use apps::config::TrainConfig;
use clap::Parser;

#[derive(Parser)]
#[command(about = "QLoRA fine-tuning of a LLaMA-family model")]
struct Args {
    /// A TOML config (see the README's config reference); defaults for what it leaves out.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in this output folder from its newest checkpoint, with its saved config
    /// (overrides still apply, e.g. a larger train.steps).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Overrides: `section.key=value`, e.g. `train.steps=100 lora.r=16 model.dtype=bf16`.
    overrides: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let config = match &args.resume {
        Some(dir) => {
            let saved = dir.join(apps::config::CONFIG_FILE);
            let mut config = TrainConfig::load(Some(&saved), &args.overrides)?;
            // The folder may have moved since the run began.
            config.train.output_dir = dir.display().to_string();
            config
        }
        None => TrainConfig::load(args.config.as_deref(), &args.overrides)?,
    };
    let summary = apps::train::run(&config, args.resume.is_some())?;
    println!(
        "trained on {} examples ({} held out); adapter in {}; chat with it: \
         cargo run --release -p apps --bin chat -- --run {}",
        summary.train_examples,
        summary.valid_examples,
        summary.adapter_dir.display(),
        summary.output_dir.display()
    );
    Ok(())
}
