//! Attention's causal softmax as one Burn operation: `softmax(scale · scores)` over the keys,
//! each query seeing the keys up to its own position, computed in f32 and returned in the
//! scores' dtype; its backward `scale · p · (grad - Σ grad · p)`.
//!
//! Through Burn's operations the same takes a cast of the bf16 scores to f32, a scale, a mask,
//! a max, an exponential, a sum and a division, each a pass over `[batch, heads, queries, keys]`
//! f32 values (134 MB a layer for the 7B shapes at 4 x 512 positions), with the max and the sum
//! on one thread per row; `Autodiff` keeps f32 copies for the backward. Here a pass reads the
//! scores in their dtype and writes the probabilities, and the backward keeps nothing but those
//! probabilities, which the product with the values keeps anyway.
//!
//! Flex (the CPU backend) runs a plain-Rust loop beside the kernels.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Tensor};

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait CausalSoftmaxOps: Backend {
    /// `softmax(scale · scores)` over the last dimension of `[.., queries, keys]` scores, query
    /// `q` seeing keys `0..=offset + q` (the others get 0), in f32, returned in the scores'
    /// dtype.
    #[fusion(meta = |scores, _, _| scores.clone())]
    fn causal_softmax(scores: FloatTensor<Self>, scale: f32, offset: usize) -> FloatTensor<Self>;

    /// The gradient of [`Self::causal_softmax`] for the scores, from its output `probs`:
    /// `scale · probs · (grad - Σ_keys grad · probs)`, in the probabilities' dtype.
    #[fusion(meta = |probs, _, _| probs.clone())]
    fn causal_softmax_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;
}

/// `softmax(scale · scores)` over the keys of `[batch, heads, queries, keys]` attention scores,
/// causal: query `q` follows `offset` cached keys and sees keys `0..=offset + q`. Computed in
/// f32 (as transformers' attention does for half precision) and returned in the scores' dtype.
pub fn causal_softmax(scores: Tensor<4>, scale: f64, offset: usize) -> Tensor<4> {
    if !crate::has_extensions(&scores.device()) {
        return composed(scores, scale, offset);
    }
    Tensor::from_dispatch(Dispatch::causal_softmax(
        scores.into_dispatch(),
        scale as f32,
        offset,
    ))
}

/// The same through Burn's operations, for devices without this crate's extensions.
fn composed(scores: Tensor<4>, scale: f64, offset: usize) -> Tensor<4> {
    let [_, _, queries, keys] = scores.dims();
    let dtype = scores.dtype();
    let scores = scores.cast(DType::F32).mul_scalar(scale);
    let mask = Tensor::<2, Bool>::tril_mask([queries, keys], offset as i64, &scores.device());
    let scores = scores.mask_fill(mask.unsqueeze(), f32::NEG_INFINITY);
    softmax(scores, 3).cast(dtype)
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::CausalSoftmaxOps;
    use crate::rows::{grid, grid_cube, row_layout, row_reduce};

    /// Units per row: a row of 512 keys (the 7B benchmark's) is 16 loads a unit.
    const LANES: usize = 32;
    /// Rows per cube.
    const ROWS_PER_CUBE: usize = 8;

    /// The launch that gives each of `rows` rows `LANES` units.
    fn launch_shape(rows: usize) -> (CubeCount, CubeDim) {
        (
            grid(rows.div_ceil(ROWS_PER_CUBE)),
            CubeDim::new_2d(LANES as u32, ROWS_PER_CUBE as u32),
        )
    }

    impl CausalSoftmaxOps for CubeBackend {
        fn causal_softmax(scores: CubeTensor, scale: f32, offset: usize) -> CubeTensor {
            let queries = scores.shape()[scores.shape().num_dims() - 2];
            let (scores, output, rows, keys) = row_layout(scores);
            if rows == 0 || keys == 0 {
                return output;
            }
            let (cube_count, cube_dim) = launch_shape(rows);
            let dtype = scores.dtype;
            // SAFETY: each `LANES` units of a cube own one row (guarded by `rows`), read its
            // scores and write its probabilities.
            unsafe {
                causal_softmax_kernel::launch_unchecked(
                    &output.client,
                    cube_count,
                    cube_dim,
                    scores.into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    rows,
                    queries,
                    keys,
                    offset,
                    scale,
                    dtype_to_storage_type(dtype),
                );
            }
            output
        }

        fn causal_softmax_backward(probs: CubeTensor, grad: CubeTensor, scale: f32) -> CubeTensor {
            let (probs, output, rows, keys) = row_layout(probs);
            if rows == 0 || keys == 0 {
                return output;
            }
            let (cube_count, cube_dim) = launch_shape(rows);
            let dtype = probs.dtype;
            let grad_dtype = grad.dtype;
            // SAFETY: as the forward, reading the row of `probs` and of `grad` (same shape).
            unsafe {
                causal_softmax_backward_kernel::launch_unchecked(
                    &output.client,
                    cube_count,
                    cube_dim,
                    probs.into_buffer_arg(),
                    into_contiguous(grad).into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    rows,
                    keys,
                    scale,
                    dtype_to_storage_type(dtype),
                    dtype_to_storage_type(grad_dtype),
                );
            }
            output
        }
    }

    /// This unit's row, `LANES` units to a row.
    #[cube]
    fn unit_row() -> usize {
        grid_cube() * ROWS_PER_CUBE + UNIT_POS_Y as usize
    }

    /// Each row's max, sum of exponentials, then probabilities: three passes over a row that
    /// stays in cache.
    #[cube(launch_unchecked)]
    fn causal_softmax_kernel<F: Float>(
        scores: &[F],
        output: &mut [F],
        rows: usize,
        queries: usize,
        keys: usize,
        offset: usize,
        scale: f32,
        #[define(F)] _dtype: ElemType,
    ) {
        let lane = UNIT_POS_X as usize;
        let row = unit_row();
        let first = row * keys;
        // The keys this row's query sees; none for the rows past the end, whose units still
        // take part in the reductions.
        let seen = offset + row % queries + 1;
        let mut visible = select(seen < keys, seen, keys);
        if row >= rows {
            visible = 0;
        }
        let mut local_max = f32::new(-3.402_823_5e38);
        let mut k = lane;
        while k < visible {
            local_max = f32::max(local_max, f32::cast_from(scores[first + k]) * scale);
            k += LANES;
        }
        let row_max = row_reduce(local_max, LANES, ROWS_PER_CUBE, true);
        let mut local_sum = f32::new(0.0);
        k = lane;
        while k < visible {
            local_sum += f32::exp(f32::cast_from(scores[first + k]) * scale - row_max);
            k += LANES;
        }
        let sum = row_reduce(local_sum, LANES, ROWS_PER_CUBE, false);
        if row < rows {
            k = lane;
            while k < keys {
                let mut p = f32::new(0.0);
                if k < visible {
                    p = f32::exp(f32::cast_from(scores[first + k]) * scale - row_max) / sum;
                }
                output[first + k] = F::cast_from(p);
                k += LANES;
            }
        }
    }

    /// Each row's `Σ grad · probs`, then `scale · probs · (grad - that)`.
    #[cube(launch_unchecked)]
    fn causal_softmax_backward_kernel<F: Float, G: Float>(
        probs: &[F],
        grad: &[G],
        output: &mut [F],
        rows: usize,
        keys: usize,
        scale: f32,
        #[define(F)] _dtype: ElemType,
        #[define(G)] _grad_dtype: ElemType,
    ) {
        let lane = UNIT_POS_X as usize;
        let row = unit_row();
        let first = row * keys;
        let mut end = keys;
        if row >= rows {
            end = 0;
        }
        let mut local_dot = f32::new(0.0);
        let mut k = lane;
        while k < end {
            local_dot += f32::cast_from(probs[first + k]) * f32::cast_from(grad[first + k]);
            k += LANES;
        }
        let dot = row_reduce(local_dot, LANES, ROWS_PER_CUBE, false);
        k = lane;
        while k < end {
            let p = f32::cast_from(probs[first + k]);
            let g = f32::cast_from(grad[first + k]);
            output[first + k] = F::cast_from(scale * p * (g - dot));
            k += LANES;
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;

    use super::CausalSoftmaxOps;
    use crate::flex_host::{from_host, to_host};

    impl CausalSoftmaxOps for Flex {
        fn causal_softmax(scores: FlexTensor, scale: f32, offset: usize) -> FlexTensor {
            let (mut values, shape, dtype) = to_host(scores);
            let keys = shape[shape.len() - 1];
            let queries = shape[shape.len() - 2];
            for (row, values) in values.chunks_mut(keys).enumerate() {
                let visible = (offset + row % queries + 1).min(keys);
                let (seen, hidden) = values.split_at_mut(visible);
                let max = seen.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x * scale));
                seen.iter_mut().for_each(|x| *x = (*x * scale - max).exp());
                let sum: f32 = seen.iter().sum();
                seen.iter_mut().for_each(|x| *x /= sum);
                hidden.fill(0.0);
            }
            from_host(values, shape, dtype)
        }

        fn causal_softmax_backward(probs: FlexTensor, grad: FlexTensor, scale: f32) -> FlexTensor {
            let (probs, shape, dtype) = to_host(probs);
            let (grad, _, _) = to_host(grad);
            let keys = shape[shape.len() - 1];
            let mut out = Vec::with_capacity(probs.len());
            for (probs, grad) in probs.chunks(keys).zip(grad.chunks(keys)) {
                let dot: f32 = probs.iter().zip(grad).map(|(p, g)| p * g).sum();
                out.extend(probs.iter().zip(grad).map(|(p, g)| scale * p * (g - dot)));
            }
            from_host(out, shape, dtype)
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

    use super::CausalSoftmaxOps;

    /// The backward of `causal_softmax` for the scores, from the forward's output.
    #[derive(Debug)]
    struct CausalSoftmaxBackward {
        scale: f32,
    }

    impl<B: CausalSoftmaxOps> Backward<B, 1> for CausalSoftmaxBackward {
        type State = FloatTensor<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let probs = ops.state;
            unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                B::causal_softmax_backward(probs, grad, self.scale)
            });
        }
    }

    impl<B: CausalSoftmaxOps, C: CheckpointStrategy> CausalSoftmaxOps for Autodiff<B, C> {
        fn causal_softmax(
            scores: FloatTensor<Self>,
            scale: f32,
            offset: usize,
        ) -> FloatTensor<Self> {
            let backward = CausalSoftmaxBackward { scale };
            match backward
                .prepare::<C>([scores.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let probs = B::causal_softmax(scores.into_primitive(), scale, offset);
                    prep.finish(probs.clone(), probs)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::causal_softmax(scores.into_primitive(), scale, offset))
                }
            }
        }

        /// Called only inside the backward above, on the inner backend; here its result is a
        /// constant of the graph (no second-order gradients).
        fn causal_softmax_backward(
            probs: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            scale: f32,
        ) -> FloatTensor<Self> {
            FloatTensor::<Self>::new(B::causal_softmax_backward(
                probs.into_primitive(),
                grad.into_primitive(),
                scale,
            ))
        }
    }
}
