//! A batched product of two activations (attention's scores `q·kᵀ` and its weighted values
//! `p·v`), as a Burn operation: on CUDA it goes through the TMA routine the 4-bit products use
//! (Burn's own matmul takes its simple cyclic routine there: the 7B scores, `[4, 32, 512, 128] x
//! [4, 32, 128, 512]`, ran at about 30 TFLOP/s on an H100), and its `Autodiff` backward gives
//! both operands their gradients through the same routine.
//!
//! `q·kᵀ` is its own form ([`batched_matmul_transposed`]) so that the backward can lay the keys'
//! gradient out as the keys are (`gradᵀ·q`, contiguous) rather than as `kᵀ` is: the rotary
//! backward then reads it in whole vectors instead of one element at a time through a transpose.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait BatchedMatmulOps: Backend {
    /// `lhs · rhs` over the last two dimensions (`lhs · rhsᵀ` with `rhs_transposed`), for
    /// operands of one rank, one dtype and the same leading (batch) dimensions.
    #[fusion(meta = |lhs, rhs, rhs_transposed| {
        let mut out = lhs.clone();
        let last = out.shape.len() - 1;
        out.shape[last] = rhs.shape[if *rhs_transposed { last - 1 } else { last }];
        out
    })]
    fn batched_matmul(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        rhs_transposed: bool,
    ) -> FloatTensor<Self>;
}

/// `lhs · rhs` over the last two dimensions, as `Tensor::matmul`, with the gradients of both.
/// Operands whose batch dimensions differ (broadcasting), or of different dtypes, and devices
/// without this crate's extensions take Burn's matmul.
///
/// # Panics
///
/// If `lhs`' last dimension is not `rhs`' second to last, as `Tensor::matmul` would.
pub fn batched_matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    product(lhs, rhs, false)
}

/// `lhs · rhsᵀ` over the last two dimensions (attention's `q·kᵀ` from the keys as they are),
/// as [`batched_matmul`] with `rhs.swap_dims(D - 2, D - 1)`, except that `rhs`' gradient comes
/// in `rhs`' own orientation.
///
/// # Panics
///
/// If `lhs` and `rhs` do not end in the same dimension.
pub fn batched_matmul_transposed<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    product(lhs, rhs, true)
}

fn product<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>, rhs_transposed: bool) -> Tensor<D> {
    let (lhs_dims, rhs_dims) = (lhs.dims(), rhs.dims());
    let inner = if rhs_transposed { D - 1 } else { D - 2 };
    assert!(
        D >= 2 && lhs_dims[D - 1] == rhs_dims[inner],
        "batched matmul: {lhs_dims:?} x {rhs_dims:?}{} do not chain",
        if rhs_transposed { "ᵀ" } else { "" }
    );
    let same_batches = lhs_dims[..D - 2] == rhs_dims[..D - 2];
    if !same_batches || lhs.dtype() != rhs.dtype() || !crate::has_extensions(&lhs.device()) {
        let rhs = if rhs_transposed {
            rhs.swap_dims(D - 2, D - 1)
        } else {
            rhs
        };
        return lhs.matmul(rhs);
    }
    Tensor::from_dispatch(Dispatch::batched_matmul(
        lhs.into_dispatch(),
        rhs.into_dispatch(),
        rhs_transposed,
    ))
}

/// `tensor` with its last two dimensions swapped (a view).
fn transposed<B: Backend>(tensor: FloatTensor<B>) -> FloatTensor<B> {
    use burn::backend::TensorMetadata;
    let rank = tensor.shape().num_dims();
    B::float_swap_dims(tensor, rank - 2, rank - 1)
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::CubeBackend;
    use burn_cubecl::tensor::CubeTensor;

    use super::{BatchedMatmulOps, transposed};
    use crate::matmul::cube::dense_product;

    impl BatchedMatmulOps for CubeBackend {
        fn batched_matmul(lhs: CubeTensor, rhs: CubeTensor, rhs_transposed: bool) -> CubeTensor {
            // The TMA routine reads a transposed operand in place.
            let rhs = if rhs_transposed {
                transposed::<Self>(rhs)
            } else {
                rhs
            };
            dense_product(lhs, rhs)
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;

    use super::{BatchedMatmulOps, transposed};

    impl BatchedMatmulOps for Flex {
        fn batched_matmul(lhs: FlexTensor, rhs: FlexTensor, rhs_transposed: bool) -> FlexTensor {
            let rhs = if rhs_transposed {
                transposed::<Self>(rhs)
            } else {
                rhs
            };
            Self::float_matmul(lhs, rhs)
        }
    }
}

mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::NodeId;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
    use burn::backend::tensor::FloatTensor;

    use super::{BatchedMatmulOps, transposed};

    /// The backward of `batched_matmul`: for `lhs · rhs`, `grad · rhsᵀ` and `lhsᵀ · grad`; for
    /// `lhs · rhsᵀ`, `grad · rhs` and `gradᵀ · lhs` (the gradient in `rhs`' orientation). Each
    /// operand is kept (or recomputed) only where the other needs a gradient, as Burn's matmul
    /// does.
    #[derive(Debug)]
    struct BatchedMatmulBackward {
        rhs_transposed: bool,
    }

    impl<B: BatchedMatmulOps> Backward<B, 2> for BatchedMatmulBackward {
        type State = (Option<NodeId>, Option<NodeId>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            checkpointer: &mut Checkpointer,
        ) {
            let (lhs, rhs) = ops.state;
            let lhs: Option<FloatTensor<B>> = lhs.map(|id| checkpointer.retrieve_node_output(id));
            let rhs: Option<FloatTensor<B>> = rhs.map(|id| checkpointer.retrieve_node_output(id));
            let kept = |tensor: Option<FloatTensor<B>>| {
                tensor.expect("kept for the other operand's gradient")
            };
            let rhs_transposed = self.rhs_transposed;
            binary::<B, _, _>(
                ops.parents,
                ops.node,
                grads,
                |grad| B::batched_matmul(grad, kept(rhs), !rhs_transposed),
                |grad| {
                    if rhs_transposed {
                        B::batched_matmul(transposed::<B>(grad), kept(lhs), false)
                    } else {
                        B::batched_matmul(transposed::<B>(kept(lhs)), grad, false)
                    }
                },
            );
        }
    }

    impl<B: BatchedMatmulOps, C: CheckpointStrategy> BatchedMatmulOps for Autodiff<B, C> {
        fn batched_matmul(
            lhs: FloatTensor<Self>,
            rhs: FloatTensor<Self>,
            rhs_transposed: bool,
        ) -> FloatTensor<Self> {
            let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
            match (BatchedMatmulBackward { rhs_transposed })
                .prepare::<C>([lhs.node(), rhs.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                    let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                    let output = B::batched_matmul(
                        lhs.into_primitive(),
                        rhs.into_primitive(),
                        rhs_transposed,
                    );
                    prep.finish((lhs_state, rhs_state), output)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::batched_matmul(
                    lhs.into_primitive(),
                    rhs.into_primitive(),
                    rhs_transposed,
                )),
            }
        }
    }
}
