use std::path::Path;

use burn::module::Param;
use burn::nn::Embedding;
use burn::tensor::{DType, Device, Distribution, Tensor};
use burn_qlora::{FrozenLinear, Projection, QloraConfig, linear_from_torch};

use burn::tensor::TensorData;

use crate::gguf::{GgufCheckpoint, GgufFile};
use crate::meta::MetaCheckpoint;
use crate::{
    Attention, DecoderLayer, Llama, LlamaConfig, LlamaError, LlamaModel, Mlp, RmsNorm, Rope,
    SafetensorsCheckpoint,
};

/// Where a model's tensors come from, by Hugging Face's names, each checked against its shape.
pub trait Checkpoint: Sync {
    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData, LlamaError>;
}

impl Checkpoint for SafetensorsCheckpoint {
    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData, LlamaError> {
        SafetensorsCheckpoint::read(self, name, shape)
    }
}

impl Checkpoint for MetaCheckpoint {
    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData, LlamaError> {
        MetaCheckpoint::read(self, name, shape)
    }
}

impl Checkpoint for GgufCheckpoint {
    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData, LlamaError> {
        GgufCheckpoint::read(self, name, shape)
    }
}

/// How a checkpoint is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The dtype of the weights and of the computation: f32, f16 or bf16. Default f32.
    pub dtype: DType,
    /// Adapters and 4-bit bases per projection; `None` keeps every projection dense and frozen.
    pub qlora: Option<QloraConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            qlora: None,
        }
    }
}

impl Llama {
    /// Loads a Hugging Face checkpoint folder (see [`Llama::from_hf`]), a Meta one (a folder
    /// with `params.json`, see [`Llama::from_meta`]) or a `.gguf` file (see
    /// [`Llama::from_gguf`]).
    pub fn load(
        path: &Path,
        options: &LoadOptions,
        device: &Device,
    ) -> Result<(Self, LlamaConfig), LlamaError> {
        if path.is_dir() && path.join("params.json").is_file() {
            Self::from_meta(path, options, device)
        } else if path.is_dir() {
            Self::from_hf(path, options, device)
        } else if path.extension().is_some_and(|ext| ext == "gguf") {
            Self::from_gguf(path, options, device)
        } else {
            Err(LlamaError::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "expected a Hugging Face or Meta model folder, or a .gguf file",
                ),
            ))
        }
    }

    /// Loads a GGUF file (llama architecture): the config from its metadata, the tensors
    /// dequantized to f32 one at a time, then converted (and quantized) as the options say.
    pub fn from_gguf(
        path: &Path,
        options: &LoadOptions,
        device: &Device,
    ) -> Result<(Self, LlamaConfig), LlamaError> {
        let file = GgufFile::open(path)?;
        let config = file.llama_config()?;
        let checkpoint = GgufCheckpoint::new(file, &config);
        Loader::build(Source::Checkpoint(&checkpoint), config, options, device)
    }

    /// Loads Meta's release layout: `params.json` and `consolidated.NN.pth` (one shard per
    /// model-parallel rank, joined here), tensor by tensor like the other formats.
    pub fn from_meta(
        dir: &Path,
        options: &LoadOptions,
        device: &Device,
    ) -> Result<(Self, LlamaConfig), LlamaError> {
        let (checkpoint, config) = MetaCheckpoint::open(dir)?;
        Loader::build(Source::Checkpoint(&checkpoint), config, options, device)
    }

    /// Loads a Hugging Face checkpoint folder (`config.json` and `model.safetensors`, or its
    /// shards). Tensors are read, converted and, where the options say so, quantized one at a
    /// time, so the peak stays near the size of the loaded model.
    pub fn from_hf(
        dir: &Path,
        options: &LoadOptions,
        device: &Device,
    ) -> Result<(Self, LlamaConfig), LlamaError> {
        let config = LlamaConfig::from_hf_json(&dir.join("config.json"))?;
        let checkpoint = SafetensorsCheckpoint::open(dir)?;
        Loader::build(Source::Checkpoint(&checkpoint), config, options, device)
    }

    /// A model of `config` with random weights, drawn on the device from N(0, `std`²) (Hugging
    /// Face initialises LLaMA with 0.02) and norms at 1: for benchmarks at real shapes. Built
    /// tensor by tensor like a loaded checkpoint, so with 4-bit options the dense weights never
    /// exist all at once.
    pub fn random(
        config: LlamaConfig,
        std: f64,
        options: &LoadOptions,
        device: &Device,
    ) -> Result<Self, LlamaError> {
        config.validate()?;
        let (model, _) = Loader::build(Source::Random { std }, config, options, device)?;
        Ok(model)
    }
}

/// Where [`Loader`] takes the tensors from.
#[derive(Clone, Copy)]
enum Source<'a> {
    Checkpoint(&'a dyn Checkpoint),
    /// Weights drawn on the device from N(0, std²), norms at 1.
    Random {
        std: f64,
    },
}

struct Loader<'a> {
    source: Source<'a>,
    config: &'a LlamaConfig,
    options: &'a LoadOptions,
    device: &'a Device,
}

impl Loader<'_> {
    fn build(
        source: Source,
        config: LlamaConfig,
        options: &LoadOptions,
        device: &Device,
    ) -> Result<(Llama, LlamaConfig), LlamaError> {
        let loader = Loader {
            source,
            config: &config,
            options,
            device,
        };
        // The weights live as long as the model: in the persistent pool (one buffer each, found
        // by size) they stay out of the pages the step's activations are carved from, which the
        // allocator walks, slice by slice, for every allocation. The cleanup returns the
        // loader's temporaries (a projection's dense weight before quantization) to the device.
        let model = device.memory_persistent_allocations(&loader, |loader| loader.load());
        device.memory_cleanup();
        Ok((model?, config))
    }

    fn load(&self) -> Result<Llama, LlamaError> {
        let c = self.config;
        if let Some(qlora) = &self.options.qlora {
            qlora
                .validate()
                .map_err(|err| LlamaError::Config(err.to_string()))?;
        }
        let embed_tokens = Embedding {
            weight: Param::from_tensor(
                self.tensor::<2>("model.embed_tokens.weight", [c.vocab_size, c.hidden_size])?,
            )
            .set_require_grad(false),
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| self.layer(i))
            .collect::<Result<_, _>>()?;
        let norm = self.norm("model.norm.weight")?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(self.projection("lm_head", c.vocab_size, c.hidden_size)?)
        };
        let rope = Rope::new(
            c.head_dim(),
            c.max_position_embeddings,
            c.rope_theta,
            self.device,
        );
        Ok(Llama {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
                rope,
            },
            lm_head,
        })
    }

    fn layer(&self, i: usize) -> Result<DecoderLayer, LlamaError> {
        let c = self.config;
        let prefix = format!("model.layers.{i}");
        let (hidden, head_dim) = (c.hidden_size, c.head_dim());
        let attn = |name: &str, out: usize, input: usize| {
            self.projection(&format!("{prefix}.self_attn.{name}"), out, input)
        };
        let mlp = |name: &str, out: usize, input: usize| {
            self.projection(&format!("{prefix}.mlp.{name}"), out, input)
        };
        let self_attn = Attention {
            q_proj: attn("q_proj", c.num_attention_heads * head_dim, hidden)?,
            k_proj: attn("k_proj", c.num_kv_heads() * head_dim, hidden)?,
            v_proj: attn("v_proj", c.num_kv_heads() * head_dim, hidden)?,
            o_proj: attn("o_proj", hidden, c.num_attention_heads * head_dim)?,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_kv_heads(),
            head_dim,
        };
        Ok(DecoderLayer {
            input_layernorm: self.norm(&format!("{prefix}.input_layernorm.weight"))?,
            self_attn,
            post_attention_layernorm: self
                .norm(&format!("{prefix}.post_attention_layernorm.weight"))?,
            mlp: Mlp {
                gate_proj: mlp("gate_proj", c.intermediate_size, hidden)?,
                up_proj: mlp("up_proj", c.intermediate_size, hidden)?,
                down_proj: mlp("down_proj", hidden, c.intermediate_size)?,
            },
        })
    }

    fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<D>, LlamaError> {
        let on_device = (self.device, self.options.dtype);
        match self.source {
            Source::Checkpoint(checkpoint) => {
                Ok(Tensor::from_data(checkpoint.read(name, &shape)?, on_device))
            }
            Source::Random { .. } if name.ends_with("norm.weight") => {
                Ok(Tensor::ones(shape, on_device))
            }
            Source::Random { std } => Ok(Tensor::random(
                shape,
                Distribution::Normal(0.0, std),
                on_device,
            )),
        }
    }

    fn norm(&self, name: &str) -> Result<RmsNorm, LlamaError> {
        let weight = self.tensor::<1>(name, [self.config.hidden_size])?;
        Ok(RmsNorm::new(weight, self.config.rms_norm_eps))
    }

    /// The linear at `path` (`path.weight`, torch's `[out, in]`), built as the QLoRA options say.
    fn projection(&self, path: &str, out: usize, input: usize) -> Result<Projection, LlamaError> {
        let name = format!("{path}.weight");
        let linear = linear_from_torch(self.tensor::<2>(&name, [out, input])?);
        match &self.options.qlora {
            Some(qlora) => qlora
                .apply(path, linear)
                .map_err(|source| LlamaError::Quant { name, source }),
            None => Ok(Projection::Frozen(FrozenLinear::from(linear))),
        }
    }
}
