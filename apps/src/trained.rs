//! Loading a model with its adapter, for the binaries that use a training run's result (`chat`,
//! `merge`, `export-peft`): the base comes from the model file, built with the LoRA and
//! quantization settings of the config saved in the run folder (one copy of the
//! hyper-parameters, never a second to keep in sync), and the adapter from the run's final
//! adapter or one of its checkpoints.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::Device;
use burn_qlora::{PeftAdapter, PeftConfig, QloraConfig};
use llama_burn::{Llama, LlamaConfig, LoadOptions, Tokenizer};

use crate::config::TrainConfig;
use crate::train::{ADAPTER_DIR, CHECKPOINT_DIR, latest_checkpoint, record_path};

/// A loaded model and where it came from.
pub struct Loaded {
    pub model: Llama,
    pub config: LlamaConfig,
    /// The model file or folder it was read from.
    pub model_path: PathBuf,
}

/// The base a run's adapter is applied to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Base {
    /// Built as training built it: 4-bit where the run's config quantized.
    AsTrained,
    /// Every projection dense, in the run's dtype (faster to run, and the original weights).
    Dense,
}

/// The model of `config` with adapters built from `qlora`, on `device`.
pub fn load_base(config: &TrainConfig, qlora: QloraConfig, device: &Device) -> Result<Loaded> {
    let model_path = crate::model_path(&config.model.path)?;
    let options = LoadOptions {
        dtype: crate::parse_dtype(&config.model.dtype)?,
        qlora: Some(qlora),
    };
    eprintln!("loading {}", model_path.display());
    let (model, llama_config) = Llama::load(&model_path, &options, device)
        .with_context(|| format!("loading {}", model_path.display()))?;
    Ok(Loaded {
        model,
        config: llama_config,
        model_path,
    })
}

/// The tokenizer of `config`'s model: `model.tokenizer` if set, else the model's own.
pub fn tokenizer(config: &TrainConfig, loaded: &Loaded) -> Result<Tokenizer> {
    let (bos, eos) = (loaded.config.bos_token_id, loaded.config.eos_token_id);
    Ok(match config.model.tokenizer.as_str() {
        "" => Tokenizer::for_model(&loaded.model_path, &loaded.config)?,
        path => Tokenizer::from_file(Path::new(path), bos, eos)?,
    })
}

/// The model of the run in `run` with its trained adapter: that of checkpoint `checkpoint` when
/// given, else the final adapter, else (a run that stopped early) its newest checkpoint.
pub fn load_run(
    run: &Path,
    checkpoint: Option<usize>,
    base: Base,
    device: &Device,
) -> Result<(Loaded, TrainConfig)> {
    let config = TrainConfig::from_run(run)?;
    let mut qlora = config.qlora_config()?;
    if base == Base::Dense {
        qlora.quantize_frozen = false;
        qlora.quantize_lora_base = false;
    }
    let checkpoint_dir = run.join(CHECKPOINT_DIR);
    let adapter_dir = run.join(ADAPTER_DIR);
    let checkpoint = match checkpoint {
        Some(epoch) => Some(epoch),
        None if adapter_dir.is_dir() => None,
        None => Some(latest_checkpoint(&checkpoint_dir).with_context(|| {
            format!(
                "{}: no final adapter and no complete checkpoint in {}",
                run.display(),
                checkpoint_dir.display()
            )
        })?),
    };
    let mut loaded = load_base(&config, qlora, device)?;
    loaded.model = match checkpoint {
        Some(epoch) => {
            let path = record_path(&checkpoint_dir, "model", epoch);
            if !path.is_file() {
                bail!(
                    "checkpoint {epoch}: {} does not exist (the newest complete one is {:?})",
                    path.display(),
                    latest_checkpoint(&checkpoint_dir)
                );
            }
            eprintln!("adapter from {}", path.display());
            load_checkpoint(loaded.model, &path)?
        }
        None => {
            eprintln!("adapter from {}", adapter_dir.display());
            let adapter = PeftAdapter::load(&adapter_dir, device)
                .with_context(|| format!("reading {}", adapter_dir.display()))?;
            adapter
                .load_into(loaded.model)
                .with_context(|| format!("applying {}", adapter_dir.display()))?
        }
    };
    Ok((loaded, config))
}

/// `model` with the adapter weights of a training checkpoint's model record; a truncated or
/// foreign record is an error naming the file.
pub fn load_checkpoint(model: Llama, path: &Path) -> Result<Llama> {
    let record = ModuleRecord::load(path)
        .map_err(|err| anyhow::anyhow!("checkpoint {}: {err}", path.display()))?;
    model
        .try_load_record(record.allow_partial(true))
        .map_err(|err| anyhow::anyhow!("checkpoint {}: {err}", path.display()))
}

/// A model with no adapter or with a PEFT adapter from anywhere (trained here, or by peft):
/// dense projections in `dtype`, LoRA layers where the adapter has them.
pub fn load_with_adapter(
    model_path: &Path,
    adapter_dir: Option<&Path>,
    dtype: burn::tensor::DType,
    device: &Device,
) -> Result<Loaded> {
    let adapter = adapter_dir
        .map(|dir| {
            PeftAdapter::load(dir, device)
                .with_context(|| format!("reading the adapter {}", dir.display()))
        })
        .transpose()?;
    let options = LoadOptions {
        dtype,
        qlora: adapter.as_ref().map(|adapter| {
            QloraConfig::new()
                .with_lora(adapter.lora_config())
                .with_targets(adapter.config.target_modules.clone())
                .with_quantize_frozen(false)
                .with_quantize_lora_base(false)
        }),
    };
    eprintln!("loading {}", model_path.display());
    let (model, config) = Llama::load(model_path, &options, device)
        .with_context(|| format!("loading {}", model_path.display()))?;
    let model = match &adapter {
        Some(adapter) => adapter
            .load_into(model)
            .context("applying the adapter to the model")?,
        None => model,
    };
    Ok(Loaded {
        model,
        config,
        model_path: model_path.to_path_buf(),
    })
}

/// The PEFT config of a run's adapters, naming the base model as peft expects.
pub fn peft_config(config: &TrainConfig, model_path: &Path) -> Result<PeftConfig> {
    let qlora = config.qlora_config()?;
    Ok(PeftConfig::from_lora(&qlora.lora, qlora.targets)
        .with_base_model(model_path.display().to_string()))
}
