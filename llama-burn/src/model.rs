use burn::module::Module;
use burn::nn::Embedding;
use burn::tensor::{DType, Int, Tensor};
use burn_qlora::{Projection, QuantError};

use crate::{Attention, LayerCache, LlamaConfig, Mlp, RmsNorm, Rope};

/// A LLaMA-family causal language model. Modules are named as in Hugging Face's
/// `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`), so checkpoints and PEFT adapters map
/// onto it by name.
#[derive(Module, Debug)]
pub struct Llama {
    pub model: LlamaModel,
    /// The output head; `None` when it is tied to the embedding.
    pub lm_head: Option<Projection>,
}

#[derive(Module, Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    #[module(skip)]
    pub rope: Rope,
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// The keys and values of every layer for the tokens generated so far.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(config: &LlamaConfig) -> Self {
        Self {
            layers: vec![LayerCache::default(); config.num_hidden_layers],
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DecoderLayer {
    /// `x` `[batch, seq, hidden]` through the layer; with a cache, `x` continues the cached tokens.
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let h = self.attention_block(x, rope, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }

    /// `x` plus its attention: the MLP block's input and residual.
    fn attention_block(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, cache)
    }

    /// Two copies of the layer (its parameters shared) for activation checkpointing: the first,
    /// for the forward without a graph, keeps each adapter's hidden `x·A`; the second, for the
    /// recomputation over the same input, takes them instead of computing them again.
    pub fn with_kept_hiddens(&self) -> (Self, Self) {
        let (attention_keep, attention_take) = self.self_attn.with_kept_hiddens();
        let (mlp_keep, mlp_take) = self.mlp.with_kept_hiddens();
        (
            Self {
                self_attn: attention_keep,
                mlp: mlp_keep,
                ..self.clone()
            },
            Self {
                self_attn: attention_take,
                mlp: mlp_take,
                ..self.clone()
            },
        )
    }

    /// The same layer (its parameters shared), each 4-bit base carrying its dequantized copy in
    /// `dtype`: a checkpointed layer's recomputation and backward then dequantize each weight
    /// once instead of twice, for the layer's dense weights in memory while the copy lives.
    pub fn with_dense_copies(&self, dtype: DType) -> Result<Self, QuantError> {
        Ok(Self {
            self_attn: self.self_attn.with_dense_copies(dtype)?,
            mlp: self.mlp.with_dense_copies(dtype)?,
            ..self.clone()
        })
    }

    /// A tensor whose backward (from ones) gives the layer's gradients for its output gradient
    /// `grad`, as `(self.forward(x) * grad).backward()` would, without the MLP's last product:
    /// the output itself is never needed, only the MLP's input and `h`. The residual
    /// connection's gradient (`grad` itself, for `h`) is passed on inside the norm's backward,
    /// so nothing computes `h * grad`; the value is the MLP pullback's (zeros).
    pub fn pullback(&self, x: Tensor<3>, rope: &Rope, grad: Tensor<3>) -> Tensor<3> {
        let h = self.attention_block(x, rope, None);
        let mlp_input = self
            .post_attention_layernorm
            .forward_passing(h, grad.clone());
        self.mlp.pullback(mlp_input, grad)
    }
}

impl Llama {
    /// Logits `[batch, seq, vocab]` for `tokens` `[batch, seq]`. With a cache, `tokens` continue
    /// the cached ones, whose keys and values are reused and extended.
    pub fn forward(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.logits(self.hidden_states(tokens, cache))
    }

    /// [`Self::forward`] without a cache for a step whose backward follows: each layer's 4-bit
    /// weights are dequantized once, in the hidden states' dtype, for its forward and its
    /// backward both, instead of once for each. The dense copies live from the layer's forward
    /// until the backward reaches it, 2 bytes a frozen weight (12 GiB at LLaMA-2-7B's shapes in
    /// bf16). Activation checkpointing does the same a layer at a time
    /// ([`Self::checkpointed_backward`]).
    pub fn forward_over_dense_copies(
        &self,
        tokens: Tensor<2, Int>,
    ) -> Result<Tensor<3>, QuantError> {
        let model = &self.model;
        let mut x = model.embed_tokens.forward(tokens);
        for layer in &model.layers {
            x = layer
                .with_dense_copies(x.dtype())?
                .forward(x, &model.rope, None);
        }
        Ok(self.logits(model.norm.forward(x)))
    }

    /// The final normalised hidden states `[batch, seq, hidden]`.
    pub fn hidden_states(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        let model = &self.model;
        let mut x = model.embed_tokens.forward(tokens);
        match cache {
            Some(cache) => {
                for (layer, layer_cache) in model.layers.iter().zip(&mut cache.layers) {
                    x = layer.forward(x, &model.rope, Some(layer_cache));
                }
            }
            None => {
                for layer in &model.layers {
                    x = layer.forward(x, &model.rope, None);
                }
            }
        }
        model.norm.forward(x)
    }

    /// The output head over hidden states.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let embedding = self.model.embed_tokens.weight.val().cast(hidden.dtype());
                hidden.matmul(embedding.transpose().unsqueeze())
            }
        }
    }

    /// The longest sequence the rotary tables cover.
    pub fn max_positions(&self) -> usize {
        self.model.rope.max_positions()
    }
}
