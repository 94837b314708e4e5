//! A product with a frozen dense weight (an untied LM head kept in bf16, as QLoRA keeps it), as
//! a Burn operation: the forward goes through the TMA routine the 4-bit products use on CUDA
//! (Burn's own matmul takes its simple cyclic routine there: the 7B head's `[1024, 4096] x
//! [4096, 32000]` chunk runs in 1.21 ms instead of 0.22 on an H100), and the `Autodiff` backward gives the
//! input its gradient through the same routine and the weight none.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait FrozenMatmulOps: Backend {
    /// `lhs · weight` over `lhs`' last dimension for a `[inner, outer]` weight of `lhs`' dtype.
    #[fusion(meta = |lhs, weight| {
        let mut out = lhs.clone();
        let last = out.shape.len() - 1;
        out.shape[last] = weight.shape[1];
        out
    })]
    fn frozen_matmul(lhs: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `input · weight` over `input`'s last dimension for a frozen `[inner, outer]` weight (Burn's
/// `Linear` layout). The result has no gradient path to the weight, whether it requires one or
/// not; devices without this crate's extensions take Burn's matmul (and its weight gradient).
///
/// # Panics
///
/// If `input` does not end in `inner` features, as `Tensor::matmul` would.
pub fn frozen_matmul<const D: usize>(input: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    let weight = weight.cast(input.dtype());
    let dims = input.dims();
    let inner = weight.dims()[0];
    assert_eq!(
        dims[D - 1],
        inner,
        "frozen matmul: input {dims:?} does not end in the weight's {inner} rows"
    );
    if !crate::has_extensions(&input.device()) {
        return input.matmul(weight.unsqueeze());
    }
    Tensor::from_dispatch(Dispatch::frozen_matmul(
        input.into_dispatch(),
        weight.into_dispatch(),
    ))
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::CubeBackend;
    use burn_cubecl::tensor::CubeTensor;

    use super::FrozenMatmulOps;
    use crate::matmul::cube::dense_product;
    use crate::matmul::over_rows;

    impl FrozenMatmulOps for CubeBackend {
        fn frozen_matmul(lhs: CubeTensor, weight: CubeTensor) -> CubeTensor {
            over_rows::<Self>(lhs, |lhs| dense_product(lhs, weight))
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;

    use super::FrozenMatmulOps;
    use crate::matmul::over_rows;

    impl FrozenMatmulOps for Flex {
        fn frozen_matmul(lhs: FlexTensor, weight: FlexTensor) -> FlexTensor {
            over_rows::<Self>(lhs, |lhs| Self::float_matmul(lhs, weight))
        }
    }
}

mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
    use burn::backend::tensor::FloatTensor;

    use super::FrozenMatmulOps;

    /// The backward of `frozen_matmul` with respect to `lhs`: `grad · weightᵀ`, the weight a
    /// constant of the graph.
    #[derive(Debug)]
    struct FrozenMatmulBackward;

    impl<B: FrozenMatmulOps> Backward<B, 1> for FrozenMatmulBackward {
        type State = FloatTensor<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let weight = ops.state;
            unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                B::frozen_matmul(grad, B::float_transpose(weight))
            });
        }
    }

    impl<B: FrozenMatmulOps, C: CheckpointStrategy> FrozenMatmulOps for Autodiff<B, C> {
        fn frozen_matmul(lhs: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
            let weight = weight.into_primitive();
            match FrozenMatmulBackward
                .prepare::<C>([lhs.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let output = B::frozen_matmul(lhs.into_primitive(), weight.clone());
                    prep.finish(weight, output)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::frozen_matmul(lhs.into_primitive(), weight))
                }
            }
        }
    }
}
