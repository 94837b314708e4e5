use std::path::Path;

use burn::config::Config;
use serde::Deserialize;

use crate::LlamaError;

/// The shape of a LLaMA-family model, as Hugging Face's `config.json` gives it.
#[derive(Config, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` for grouped-query attention. Default: as many (MHA).
    #[config(default = "None")]
    pub num_key_value_heads: Option<usize>,
    /// Default: `hidden_size / num_attention_heads`.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    /// Default 1e-5 (LLaMA-2 uses 1e-5, LLaMA-1 1e-6).
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    /// RoPE base. Default 10000.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Longest sequence the rotary tables cover. Default 4096.
    #[config(default = 4096)]
    pub max_position_embeddings: usize,
    /// The output head shares the embedding matrix. Default false.
    #[config(default = false)]
    pub tie_word_embeddings: bool,
    /// Default 1.
    #[config(default = "Some(1)")]
    pub bos_token_id: Option<u32>,
    /// Default 2.
    #[config(default = "Some(2)")]
    pub eos_token_id: Option<u32>,
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Checks that the head counts divide as attention needs.
    pub fn validate(&self) -> Result<(), LlamaError> {
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(LlamaError::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(LlamaError::Config(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            )));
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json` (`LlamaForCausalLM`).
    pub fn from_hf_json(path: &Path) -> Result<Self, LlamaError> {
        let text = std::fs::read(path).map_err(|source| LlamaError::io(path, source))?;
        let hf: HfConfig = serde_json::from_slice(&text)
            .map_err(|err| LlamaError::Config(format!("{}: {err}", path.display())))?;
        let rope_theta = hf
            .rope_theta
            .or(hf.rope_parameters.and_then(|rope| rope.rope_theta))
            .unwrap_or(10000.0);
        let config = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads,
            head_dim: hf.head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            rope_theta,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: hf.bos_token_id,
            eos_token_id: hf.eos_token_id.and_then(|ids| ids.first()),
        };
        config.validate()?;
        Ok(config)
    }

    /// Hugging Face's `config.json` for this shape (`LlamaForCausalLM`), weights in `dtype`
    /// (`float32`, `float16` or `bfloat16`); `attention_bias` and `mlp_bias` say whether those
    /// projections carry biases.
    pub fn to_hf_json(
        &self,
        dtype: &str,
        attention_bias: bool,
        mlp_bias: bool,
    ) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads(),
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": attention_bias,
            "mlp_bias": mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": dtype,
        })
    }

    /// LLaMA-2 7B: 32 layers, 4096 wide, 32 heads, MLP 11008, vocab 32000.
    pub fn llama2_7b() -> Self {
        Self::new(32000, 4096, 11008, 32, 32)
    }

    /// LLaMA-2 13B: 40 layers, 5120 wide, 40 heads, MLP 13824.
    pub fn llama2_13b() -> Self {
        Self::new(32000, 5120, 13824, 40, 40)
    }

    /// LLaMA-2 70B: 80 layers, 8192 wide, 64 heads sharing 8 KV heads, MLP 28672.
    pub fn llama2_70b() -> Self {
        Self::new(32000, 8192, 28672, 80, 64).with_num_key_value_heads(Some(8))
    }
}

/// The keys of `config.json` read here; the others are ignored.
#[derive(Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
}

/// `eos_token_id` is one id or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn first(self) -> Option<u32> {
        match self {
            Self::One(id) => Some(id),
            Self::Many(ids) => ids.first().copied(),
        }
    }
}
