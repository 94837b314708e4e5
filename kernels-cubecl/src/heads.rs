//! Attention's head transposes as one Burn operation: `[batch, seq, heads, width]` to
//! `[batch, heads, seq, width]` and back, written contiguous. A head's row of `width` values is
//! contiguous on both sides, so each unit moves one 16-byte vector of it.
//!
//! Through Burn's operations the transpose is a view, copied where the next product or reshape
//! needs its memory in order: the values before `p·v`, its output before the output projection,
//! and their gradients. Burn's copy walks every element through the view's strides (32 µs for a
//! 7B layer's `[4, 512, 32, 128]` bf16 heads on an H100, 3x the bytes' time).
//!
//! Flex (the CPU backend) takes the view: its operations read any strides.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait SwapHeadsOps: Backend {
    /// `x` (4 dimensions, any strides) with its dimensions 1 and 2 swapped.
    #[fusion(meta = |x| {
        let mut out = x.clone();
        out.shape = burn::tensor::Shape::new([x.shape[0], x.shape[2], x.shape[1], x.shape[3]]);
        out
    })]
    fn swap_heads(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `x.swap_dims(1, 2)`, contiguous in memory where the device has this crate's kernels (a view
/// elsewhere). Its gradient is the same transpose of the output's.
pub fn swap_heads(x: Tensor<4>) -> Tensor<4> {
    if !crate::has_extensions(&x.device()) {
        return x.swap_dims(1, 2);
    }
    Tensor::from_dispatch(Dispatch::swap_heads(x.into_dispatch()))
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::SwapHeadsOps;
    use crate::extension::{empty_output, strided_runs};
    use crate::rows::{grid, grid_cube};

    /// Units per cube, one vector each.
    const CUBE_UNITS: usize = 256;

    impl SwapHeadsOps for CubeBackend {
        fn swap_heads(x: CubeTensor) -> CubeTensor {
            let [d0, d1, d2, width] = x.shape().dims();
            let (x, strides, vector) = strided_runs(x, width);
            let output = empty_output(&x, [d0, d2, d1, width], x.dtype);
            let vectors = output.shape().num_elements() / vector;
            if vectors == 0 {
                return output;
            }
            let dtype = x.dtype;
            // SAFETY: each unit writes one vector of the contiguous output (guarded by
            // `vectors`) and reads the same vector of `x` through its strides, in vectors: a
            // row of `width / vector` whole vectors, each row starting on one.
            unsafe {
                swap_heads_kernel::launch_unchecked(
                    &output.client,
                    grid(vectors.div_ceil(CUBE_UNITS)),
                    CubeDim::new_1d(CUBE_UNITS as u32),
                    vector,
                    x.into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    vectors,
                    d1,
                    d2,
                    width / vector,
                    strides[0] / vector,
                    strides[1] / vector,
                    strides[2] / vector,
                    strides[3],
                    dtype_to_storage_type(dtype),
                );
            }
            output
        }
    }

    /// Output vector `[a, j, i, k]` (contiguous `[d0, d2, d1, row]`) from `x[a, i, j, k]`, with
    /// `x`'s strides counted in vectors.
    #[allow(clippy::too_many_arguments)]
    #[cube(launch_unchecked)]
    fn swap_heads_kernel<F: Float, N: Size>(
        x: &[Vector<F, N>],
        output: &mut [Vector<F, N>],
        vectors: usize,
        d1: usize,
        d2: usize,
        row: usize,
        stride_0: usize,
        stride_1: usize,
        stride_2: usize,
        stride_3: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let unit = grid_cube() * CUBE_UNITS + UNIT_POS as usize;
        if unit >= vectors {
            terminate!();
        }
        let k = unit % row;
        let rest = unit / row;
        let i = rest % d1;
        let j = (rest / d1) % d2;
        let a = rest / (d1 * d2);
        output[unit] = x[a * stride_0 + i * stride_1 + j * stride_2 + k * stride_3];
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;

    use super::SwapHeadsOps;

    impl SwapHeadsOps for Flex {
        fn swap_heads(x: FlexTensor) -> FlexTensor {
            Self::float_swap_dims(x, 1, 2)
        }
    }
}

mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, unary};
    use burn::backend::tensor::FloatTensor;

    use super::SwapHeadsOps;

    /// The backward of `swap_heads`: the gradient transposed back.
    #[derive(Debug)]
    struct SwapHeadsBackward;

    impl<B: SwapHeadsOps> Backward<B, 1> for SwapHeadsBackward {
        type State = ();

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            unary::<B, _>(ops.parents, ops.node, grads, B::swap_heads);
        }
    }

    impl<B: SwapHeadsOps, C: CheckpointStrategy> SwapHeadsOps for Autodiff<B, C> {
        fn swap_heads(x: FloatTensor<Self>) -> FloatTensor<Self> {
            SwapHeadsBackward
                .prepare::<C>([x.node()])
                .compute_bound()
                .stateless(B::swap_heads(x.into_primitive()))
        }
    }
}
