use burn::config::Config;
use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{DType, Tensor};
use kernels_cubecl::{QuantConfig, QuantError, QuantType};

use crate::lora::pullback_through;
use crate::{ConfigError, FrozenLinear, LoraBias, LoraConfig, LoraLinear, MergeError};

/// The projection names a target may use, short or as Hugging Face names the modules.
const PROJECTIONS: [&str; 8] = ["q", "k", "v", "o", "gate", "up", "down", "lm_head"];

/// How a model's linears are built for QLoRA: which projections get an adapter, and the
/// independent quantization switches of the QLoRA-LLM seed.
#[derive(Config, Debug, PartialEq)]
pub struct QloraConfig {
    /// The adapters' hyper-parameters. Default: rank 8, alpha 16, no dropout.
    #[config(default = "LoraConfig::new(8)")]
    pub lora: LoraConfig,
    /// The projections that get an adapter: `q`, `k`, `v`, `o`, `gate`, `up`, `down`,
    /// `lm_head` (or `q_proj` and so on). Default: the seven of every decoder layer.
    #[config(
        default = "vec![\"q\".into(), \"k\".into(), \"v\".into(), \"o\".into(), \"gate\".into(), \"up\".into(), \"down\".into()]"
    )]
    pub targets: Vec<String>,
    /// `quant_4bit`: pack the frozen linears that have no adapter in 4 bits. Default true.
    #[config(default = true)]
    pub quantize_frozen: bool,
    /// `quant_lora_4bit`: pack the bases of the adapted linears in 4 bits. Default true.
    #[config(default = true)]
    pub quantize_lora_base: bool,
    /// NF4 or FP4. Default NF4.
    #[config(default = "QuantType::Nf4")]
    pub quant_type: QuantType,
    /// Double quantization of the absmax. Default true.
    #[config(default = true)]
    pub double_quant: bool,
    /// Elements per absmax. Default 64.
    #[config(default = 64)]
    pub block_size: usize,
}

impl QloraConfig {
    /// Checks the rank, dropout, block size and target names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lora.rank == 0 {
            return Err(ConfigError::new("lora.rank", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return Err(ConfigError::new("lora.dropout", "must be in [0, 1)"));
        }
        self.quant_config()
            .validate()
            .map_err(|err| ConfigError::new("block_size", err.to_string()))?;
        for target in &self.targets {
            if !PROJECTIONS.contains(&short_name(target)) {
                return Err(ConfigError::new(
                    "targets",
                    format!(
                        "unknown projection {target:?}: use {}",
                        PROJECTIONS.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn quant_config(&self) -> QuantConfig {
        QuantConfig::new(self.quant_type, self.block_size, self.double_quant)
    }

    /// Whether the linear at `module_path` (`layers.3.self_attn.q_proj`, or just `q`) gets an
    /// adapter: its last segment names a target, as PEFT matches `target_modules`.
    pub fn targets(&self, module_path: &str) -> bool {
        let name = short_name(module_path.rsplit('.').next().unwrap_or(module_path));
        self.targets.iter().any(|target| short_name(target) == name)
    }

    /// Builds the projection at `module_path` from its dense layer: an adapter if it is a
    /// target, a 4-bit base where the switches say so. The dense weight is dropped once packed.
    pub fn apply(&self, module_path: &str, linear: Linear) -> Result<Projection, QuantError> {
        if self.targets(module_path) {
            let mut layer = self.lora.init(linear);
            if self.quantize_lora_base {
                layer.base = layer.base.quantize(self.quant_config())?;
            }
            Ok(Projection::Lora(layer))
        } else {
            let quantize = self.quantize_frozen.then(|| self.quant_config());
            let frozen = FrozenLinear::new(linear, quantize)?;
            Ok(Projection::Frozen(match self.lora.bias {
                LoraBias::All => frozen.with_trainable_bias(),
                LoraBias::None | LoraBias::LoraOnly => frozen,
            }))
        }
    }
}

/// `q_proj` -> `q`; other names unchanged.
fn short_name(name: &str) -> &str {
    name.strip_suffix("_proj").unwrap_or(name)
}

/// One linear projection of a model, built by [`QloraConfig::apply`]: frozen, or with an adapter.
// One per projection, so the variants' sizes do not matter (and `Module` cannot derive
// through a `Box`).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Projection {
    Frozen(FrozenLinear),
    Lora(LoraLinear),
}

impl Projection {
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Frozen(linear) => linear.forward(input),
            Self::Lora(linear) => linear.forward(input),
        }
    }

    /// Zeros whose backward gives the projection's gradients for the output gradient `grad`
    /// (see [`LoraLinear::pullback`]).
    pub fn pullback<const D: usize>(&self, input: Tensor<D>, grad: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Frozen(linear) => pullback_through(linear.forward(input), grad),
            Self::Lora(linear) => linear.pullback(input, grad),
        }
    }

    /// Two copies for activation checkpointing, the first keeping the adapter's hidden, the
    /// second taking it (see [`LoraLinear::with_kept_hidden`]); a frozen projection's copies
    /// are itself.
    pub fn with_kept_hidden(&self) -> (Self, Self) {
        match self {
            Self::Frozen(_) => (self.clone(), self.clone()),
            Self::Lora(linear) => {
                let (keep, take) = linear.with_kept_hidden();
                (Self::Lora(keep), Self::Lora(take))
            }
        }
    }

    /// The same projection (its parameters shared), a 4-bit base carrying its dequantized copy
    /// in `dtype` (see [`crate::Linear4bit::with_dense_copy`]).
    pub fn with_dense_copy(&self, dtype: DType) -> Result<Self, QuantError> {
        Ok(match self {
            Self::Frozen(linear) => Self::Frozen(linear.with_dense_copy(dtype)?),
            Self::Lora(linear) => Self::Lora(linear.with_dense_copy(dtype)?),
        })
    }

    /// `[d_input, d_output]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Self::Frozen(linear) => linear.dims(),
            Self::Lora(linear) => linear.base.dims(),
        }
    }

    pub fn has_bias(&self) -> bool {
        match self {
            Self::Frozen(linear) => linear.has_bias(),
            Self::Lora(linear) => linear.base.has_bias(),
        }
    }

    /// The dense layer with any adapter merged, its weight in `dtype` (never re-quantized).
    pub fn to_merged_linear(&self, dtype: DType) -> Result<Linear, MergeError> {
        match self {
            Self::Frozen(linear) => Ok(linear.to_dense(dtype)?),
            Self::Lora(linear) => linear.to_merged_linear(dtype),
        }
    }
}
