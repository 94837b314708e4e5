use burn::module::Module;
use burn::tensor::{DType, Tensor};
use burn_qlora::kernels::causal_attention;
use burn_qlora::{Projection, QuantError};

use crate::Rope;

/// Multi-head attention with grouped-query sharing of the key/value heads (MHA when the
/// counts are equal), causal, with rotary positions.
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Projection,
    pub k_proj: Projection,
    pub v_proj: Projection,
    pub o_proj: Projection,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Keys and values of the tokens seen so far, for one layer: `[batch, kv_heads, seq, head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    keys_values: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    pub fn len(&self) -> usize {
        self.keys_values.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Attention {
    /// Two copies for activation checkpointing: the first keeps each adapter's hidden in its
    /// forward without a graph, the second takes them in the recomputation (see
    /// `LoraLinear::with_kept_hidden`).
    pub fn with_kept_hiddens(&self) -> (Self, Self) {
        let (q_keep, q_take) = self.q_proj.with_kept_hidden();
        let (k_keep, k_take) = self.k_proj.with_kept_hidden();
        let (v_keep, v_take) = self.v_proj.with_kept_hidden();
        let (o_keep, o_take) = self.o_proj.with_kept_hidden();
        (
            Self {
                q_proj: q_keep,
                k_proj: k_keep,
                v_proj: v_keep,
                o_proj: o_keep,
                ..self.clone()
            },
            Self {
                q_proj: q_take,
                k_proj: k_take,
                v_proj: v_take,
                o_proj: o_take,
                ..self.clone()
            },
        )
    }

    /// The same block, its 4-bit bases carrying their dequantized copies in `dtype`.
    pub fn with_dense_copies(&self, dtype: DType) -> Result<Self, QuantError> {
        Ok(Self {
            q_proj: self.q_proj.with_dense_copy(dtype)?,
            k_proj: self.k_proj.with_dense_copy(dtype)?,
            v_proj: self.v_proj.with_dense_copy(dtype)?,
            o_proj: self.o_proj.with_dense_copy(dtype)?,
            ..self.clone()
        })
    }

    /// `x`: `[batch, seq, hidden]`. With a cache, `x` continues the cached tokens and its keys
    /// and values are appended to it.
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        // `[batch, seq, heads, head_dim]`, read through the swapped view: the rotary kernel
        // writes the queries' and keys' heads contiguous, attention reads the values' in place.
        let heads = |projection: &Projection, count: usize| {
            projection
                .forward(x.clone())
                .reshape([batch, seq, count, self.head_dim])
                .swap_dims(1, 2)
        };
        let offset = cache.as_ref().map_or(0, |cache| cache.len());
        let q = rope.apply(heads(&self.q_proj, self.num_heads), offset);
        let mut k = rope.apply(heads(&self.k_proj, self.num_kv_heads), offset);
        let mut v = heads(&self.v_proj, self.num_kv_heads);
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.keys_values.take() {
                k = Tensor::cat(vec![past_k, k], 2);
                v = Tensor::cat(vec![past_v, v], 2);
            }
            cache.keys_values = Some((k.clone(), v.clone()));
        }

        // The softmax in f32, as transformers' attention does for half precision.
        let scale = (self.head_dim as f64).sqrt().recip();
        let output = causal_attention(q, k, v, scale, offset).reshape([
            batch,
            seq,
            self.num_heads * self.head_dim,
        ]);
        self.o_proj.forward(output)
    }
}
