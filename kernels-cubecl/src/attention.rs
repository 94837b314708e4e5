//! Causal attention, `softmax(scale · q·kᵀ) · v` with grouped-query sharing of the key/value
//! heads, as one operation where the device can: on CUDA (compute capability 8.0 and later, bf16,
//! heads 64 or 128 wide) the FlashAttention-2-style kernels of [`crate::flash_attention`] compute
//! it and its backward without ever writing the `[batch, heads, queries, keys]` scores (64 MiB a
//! layer in bf16 for the 7B shapes at 4 x 512 positions, written and read five times a step
//! through the composed path). Elsewhere, and for queries that follow cached keys, it is composed
//! of this crate's batched products and causal softmax.

use burn::tensor::Tensor;

use crate::{batched_matmul, batched_matmul_transposed, causal_softmax, swap_heads};

/// Causal attention of `q` (`[batch, heads, queries, head_dim]`) over `k` and `v`
/// (`[batch, kv_heads, offset + queries, head_dim]`, `heads` a multiple of `kv_heads`): query `i`
/// sees keys `0..=offset + i`, the scores scaled by `scale` and their softmax taken in f32. The
/// inputs may be strided views (the values usually are: the projection's output with its middle
/// dimensions swapped). Returns `[batch, queries, heads, head_dim]`, the layout the output
/// projection reads, in `q`'s dtype.
///
/// # Panics
///
/// If the shapes do not fit together as above.
pub fn causal_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    offset: usize,
) -> Tensor<4> {
    let [batch, heads, queries, head_dim] = q.dims();
    let [kv_batch, kv_heads, keys, kv_dim] = k.dims();
    assert!(
        v.dims() == k.dims()
            && kv_batch == batch
            && kv_dim == head_dim
            && keys == offset + queries
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads),
        "causal_attention: queries {:?}, keys {:?} and values {:?} do not fit (offset {offset})",
        q.dims(),
        k.dims(),
        v.dims()
    );
    #[cfg(feature = "cuda")]
    if offset == 0 && flash::available(&q, &k, &v) {
        return flash::attention(q, k, v, scale);
    }
    composed(q, k, v, scale, offset)
}

/// The same through the batched products and the causal softmax, the key/value heads repeated
/// for the query heads that share them.
fn composed(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64, offset: usize) -> Tensor<4> {
    let groups = q.dims()[1] / k.dims()[1];
    let scores = batched_matmul_transposed(q, repeat_kv(k, groups));
    let probabilities = causal_softmax(scores, scale, offset);
    swap_heads(batched_matmul(probabilities, repeat_kv(v, groups)))
}

/// Each of `x`'s heads repeated `groups` times, in place.
fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [batch, kv_heads, seq, head_dim] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([batch, kv_heads, groups, seq, head_dim])
        .reshape([batch, kv_heads * groups, seq, head_dim])
}

#[cfg(feature = "cuda")]
mod flash {
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Backend, Dispatch, backend_extension};
    use burn::tensor::{DType, Tensor};

    #[backend_extension(
        Cube: cfg(feature = "cuda"),
        Fusion: cfg(all(feature = "cuda", feature = "fusion")),
        Autodiff
    )]
    pub trait FlashAttentionOps: Backend {
        /// The attention of [`causal_attention`](super::causal_attention) without cached keys:
        /// `[batch, seq, heads, head_dim]`, and each query's log-sum-exp of its scaled scores in
        /// base 2 (f32 `[batch, heads, seq]`), which the backward needs.
        #[fusion(meta = |q, _, _, _| {
            let [batch, heads, seq, width] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
            (
                crate::extension::spec([batch, seq, heads, width], q.dtype),
                crate::extension::spec([batch, heads, seq], DType::F32),
            )
        })]
        fn flash_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            scale: f32,
        ) -> (FloatTensor<Self>, FloatTensor<Self>);

        /// The gradients of `q`, `k` and `v` for the output's gradient `grad`: `q`'s and `k`'s
        /// contiguous in their shapes, `v`'s laid out `[batch, seq, kv_heads, head_dim]` (as the
        /// value projection's output is).
        #[allow(clippy::too_many_arguments)]
        #[fusion(meta = |q, k, _, _, _, _, _| {
            let [batch, kv_heads, seq, width] = [k.shape[0], k.shape[1], k.shape[2], k.shape[3]];
            (
                q.clone(),
                k.clone(),
                crate::extension::spec([batch, seq, kv_heads, width], k.dtype),
            )
        })]
        fn flash_attention_backward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            output: FloatTensor<Self>,
            logsumexp: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            scale: f32,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    }

    /// Whether the kernels take these operands: bf16 on a CUDA device of compute capability 8.0
    /// or later (`mma.sync` on bf16), with a head width they are built for, as many keys as
    /// queries.
    pub(super) fn available(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> bool {
        let same_length = q.dims()[2] == k.dims()[2];
        let bf16 = [q, k, v].iter().all(|x| x.dtype() == DType::BF16);
        same_length
            && bf16
            && crate::flash_attention::HEAD_DIMS.contains(&q.dims()[3])
            && q.device()
                .as_dispatch()
                .identity()
                .is_some_and(|identity| sm_80_or_later(&identity.fingerprint))
    }

    /// A CUDA device's fingerprint (`ptx_sm90`) of compute capability 8.0 or later.
    fn sm_80_or_later(fingerprint: &str) -> bool {
        fingerprint
            .strip_prefix("ptx_sm")
            .and_then(|arch| {
                let digits = arch.trim_end_matches(|c: char| !c.is_ascii_digit());
                digits.parse::<u32>().ok()
            })
            .is_some_and(|arch| arch >= 80)
    }

    pub(super) fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64) -> Tensor<4> {
        let (output, _) = Dispatch::flash_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            scale as f32,
        );
        Tensor::from_dispatch(output)
    }

    mod cube {
        use burn_cubecl::CubeBackend;
        use burn_cubecl::tensor::CubeTensor;

        use super::FlashAttentionOps;
        use crate::flash_attention;

        impl FlashAttentionOps for CubeBackend {
            fn flash_attention(
                q: CubeTensor,
                k: CubeTensor,
                v: CubeTensor,
                scale: f32,
            ) -> (CubeTensor, CubeTensor) {
                flash_attention::forward(q, k, v, scale)
            }

            fn flash_attention_backward(
                q: CubeTensor,
                k: CubeTensor,
                v: CubeTensor,
                output: CubeTensor,
                logsumexp: CubeTensor,
                grad: CubeTensor,
                scale: f32,
            ) -> (CubeTensor, CubeTensor, CubeTensor) {
                flash_attention::backward(q, k, v, output, logsumexp, grad, scale)
            }
        }
    }

    mod autodiff {
        use burn::backend::Autodiff;
        use burn::backend::autodiff::checkpoint::base::Checkpointer;
        use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
        use burn::backend::autodiff::grads::Gradients;
        use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
        use burn::backend::tensor::FloatTensor;

        use super::FlashAttentionOps;

        /// The backward of `flash_attention`, from the inputs, the output and the log-sum-exp
        /// (the probabilities are recomputed, never kept).
        #[derive(Debug)]
        struct FlashAttentionBackward {
            scale: f32,
        }

        impl<B: FlashAttentionOps> Backward<B, 3> for FlashAttentionBackward {
            type State = [FloatTensor<B>; 5];

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [q, k, v, output, logsumexp] = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) =
                    B::flash_attention_backward(q, k, v, output, logsumexp, grad, self.scale);
                // The values' gradient as a view of their shape over its layout.
                let dv = B::float_swap_dims(dv, 1, 2);
                for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(parent) = parent {
                        grads.register::<B>(parent.id, grad);
                    }
                }
            }
        }

        impl<B: FlashAttentionOps, C: CheckpointStrategy> FlashAttentionOps for Autodiff<B, C> {
            fn flash_attention(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                scale: f32,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                let backward = FlashAttentionBackward { scale };
                match backward
                    .prepare::<C>([q.node(), k.node(), v.node()])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => {
                        let (q, k, v) =
                            (q.into_primitive(), k.into_primitive(), v.into_primitive());
                        let (output, logsumexp) =
                            B::flash_attention(q.clone(), k.clone(), v.clone(), scale);
                        let state = [q, k, v, output.clone(), logsumexp.clone()];
                        (
                            prep.finish(state, output),
                            FloatTensor::<Self>::new(logsumexp),
                        )
                    }
                    OpsKind::UnTracked(prep) => {
                        let (output, logsumexp) = B::flash_attention(
                            q.into_primitive(),
                            k.into_primitive(),
                            v.into_primitive(),
                            scale,
                        );
                        (prep.finish(output), FloatTensor::<Self>::new(logsumexp))
                    }
                }
            }

            /// Called only inside the backward above, on the inner backend; here its results
            /// are constants of the graph (no second-order gradients).
            fn flash_attention_backward(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                output: FloatTensor<Self>,
                logsumexp: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                scale: f32,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                let (dq, dk, dv) = B::flash_attention_backward(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    output.into_primitive(),
                    logsumexp.into_primitive(),
                    grad.into_primitive(),
                    scale,
                );
                (
                    FloatTensor::<Self>::new(dq),
                    FloatTensor::<Self>::new(dk),
                    FloatTensor::<Self>::new(dv),
                )
            }
        }
    }
}

#[cfg(feature = "cuda")]
pub use flash::FlashAttentionOps;
