//! A batched product of two activations (attention's scores `q·kᵀ` and its weighted values
//! `p·v`), as a Burn operation: on CUDA it goes through the TMA routine the 4-bit products use
//! (Burn's own matmul takes its simple cyclic routine there: the 7B scores, `[4, 32, 512, 128] x
//! [4, 32, 128, 512]`, ran at about 30 TFLOP/s on an H100), and its `Autodiff` backward gives
//! both operands their gradients through the same routine.

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
    /// `lhs · rhs` over the last two dimensions, for operands of one rank, one dtype and the
    /// same leading (batch) dimensions.
    #[fusion(meta = |lhs, rhs| {
        let mut out = lhs.clone();
        let last = out.shape.len() - 1;
        out.shape[last] = rhs.shape[last];
        out
    })]
    fn batched_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `lhs · rhs` over the last two dimensions, as `Tensor::matmul`, with the gradients of both.
/// Operands whose batch dimensions differ (broadcasting), or of different dtypes, and devices
/// without this crate's extensions take Burn's matmul.
///
/// # Panics
///
/// If `lhs`' last dimension is not `rhs`' second to last, as `Tensor::matmul` would.
pub fn batched_matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    let (lhs_dims, rhs_dims) = (lhs.dims(), rhs.dims());
    assert!(
        D >= 2 && lhs_dims[D - 1] == rhs_dims[D - 2],
        "batched matmul: {lhs_dims:?} x {rhs_dims:?} do not chain"
    );
    let same_batches = lhs_dims[..D - 2] == rhs_dims[..D - 2];
    if !same_batches || lhs.dtype() != rhs.dtype() || !crate::has_extensions(&lhs.device()) {
        return lhs.matmul(rhs);
    }
    Tensor::from_dispatch(Dispatch::batched_matmul(
        lhs.into_dispatch(),
        rhs.into_dispatch(),
    ))
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::CubeBackend;
    use burn_cubecl::tensor::CubeTensor;

    use super::BatchedMatmulOps;
    use crate::matmul::cube::dense_product;

    impl BatchedMatmulOps for CubeBackend {
        fn batched_matmul(lhs: CubeTensor, rhs: CubeTensor) -> CubeTensor {
            dense_product(lhs, rhs)
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;

    use super::BatchedMatmulOps;

    impl BatchedMatmulOps for Flex {
        fn batched_matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
            Self::float_matmul(lhs, rhs)
        }
    }
}

mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::TensorMetadata;
    use burn::backend::autodiff::NodeId;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
    use burn::backend::tensor::FloatTensor;

    use super::BatchedMatmulOps;

    /// The backward of `batched_matmul`: `grad · rhsᵀ` for `lhs` and `lhsᵀ · grad` for `rhs`,
    /// each operand kept (or recomputed) only where the other needs a gradient, as Burn's
    /// matmul does.
    #[derive(Debug)]
    struct BatchedMatmulBackward;

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
            let transposed = |tensor: Option<FloatTensor<B>>| {
                let tensor = tensor.expect("kept for the other operand's gradient");
                let rank = tensor.shape().num_dims();
                B::float_swap_dims(tensor, rank - 2, rank - 1)
            };
            binary::<B, _, _>(
                ops.parents,
                ops.node,
                grads,
                |grad| B::batched_matmul(grad, transposed(rhs)),
                |grad| B::batched_matmul(transposed(lhs), grad),
            );
        }
    }

    impl<B: BatchedMatmulOps, C: CheckpointStrategy> BatchedMatmulOps for Autodiff<B, C> {
        fn batched_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
            let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
            match BatchedMatmulBackward
                .prepare::<C>([lhs.node(), rhs.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                    let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                    let output = B::batched_matmul(lhs.into_primitive(), rhs.into_primitive());
                    prep.finish((lhs_state, rhs_state), output)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::batched_matmul(
                    lhs.into_primitive(),
                    rhs.into_primitive(),
                )),
            }
        }
    }
}
