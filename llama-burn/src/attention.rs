use burn::module::Module;
use burn::tensor::Tensor;
use burn_qlora::Projection;
use burn_qlora::kernels::{batched_matmul, batched_matmul_transposed, causal_softmax, swap_heads};

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
    /// `x`: `[batch, seq, hidden]`. With a cache, `x` continues the cached tokens and its keys
    /// and values are appended to it.
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, cache: Option<&mut LayerCache>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        // `[batch, seq, heads, head_dim]`; the rotary kernel reads the queries' and keys' heads
        // through the swapped view, the values' are transposed whole for `p·v`.
        let heads = |projection: &Projection, count: usize| {
            projection
                .forward(x.clone())
                .reshape([batch, seq, count, self.head_dim])
        };
        let offset = cache.as_ref().map_or(0, |cache| cache.len());
        let q = rope.apply(heads(&self.q_proj, self.num_heads).swap_dims(1, 2), offset);
        let mut k = rope.apply(
            heads(&self.k_proj, self.num_kv_heads).swap_dims(1, 2),
            offset,
        );
        let mut v = swap_heads(heads(&self.v_proj, self.num_kv_heads));
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.keys_values.take() {
                k = Tensor::cat(vec![past_k, k], 2);
                v = Tensor::cat(vec![past_v, v], 2);
            }
            cache.keys_values = Some((k.clone(), v.clone()));
        }
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));

        // Scores in the model's dtype, their softmax in f32, as transformers' attention does
        // for half precision.
        let scale = (self.head_dim as f64).sqrt().recip();
        let scores = batched_matmul_transposed(q, k);
        let attention = causal_softmax(scores, scale, offset);
        let output = swap_heads(batched_matmul(attention, v)).reshape([
            batch,
            seq,
            self.num_heads * self.head_dim,
        ]);
        self.o_proj.forward(output)
    }

    /// Each key/value head repeated for the query heads that share it.
    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let groups = self.num_heads / self.num_kv_heads;
        if groups == 1 {
            return x;
        }
        let [batch, kv_heads, seq, head_dim] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([batch, kv_heads, groups, seq, head_dim])
            .reshape([batch, kv_heads * groups, seq, head_dim])
    }
}
