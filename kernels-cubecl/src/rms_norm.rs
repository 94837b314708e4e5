//! RMSNorm with a frozen weight as one Burn operation: `x / sqrt(mean(x²) + eps)` in f32,
//! rounded to `x`'s dtype, times the weight (transformers' `LlamaRMSNorm`), and its backward for
//! `x` alone: `(g·w - x · Σ(g·w·x) / (n·rms²)) / rms`.
//!
//! Through Burn's operations the backward sums the division's gradient over the row with one
//! GPU thread per row (Burn's reduce without its autotune): 168 µs per norm for the 7B shapes
//! at 4 x 512 positions on an H100, and `Autodiff` keeps an f32 copy of `x` and of the
//! normalised value. Here each row gets a cube's worth of units, and the backward keeps `x`
//! and the weight alone, recomputing the row's rms.
//!
//! Flex (the CPU backend) runs a plain-Rust loop beside the kernels.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Tensor};

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait RmsNormOps: Backend {
    /// `x / sqrt(mean(x²) + eps)` over the last dimension in f32, rounded to `x`'s dtype, times
    /// `weight` (its length the last dimension, in `x`'s dtype).
    #[fusion(meta = |x, _, _| x.clone())]
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;

    /// [`Self::rms_norm`] whose backward also gives `x` the gradient `passed` (`x`'s shape and
    /// dtype), summed in the backward's kernel. The forward alone on the inner backends.
    #[fusion(meta = |x, _, _, _| x.clone())]
    fn rms_norm_passing(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        passed: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;

    /// The gradient of [`Self::rms_norm`] for `x`, the weight held constant, in `x`'s dtype.
    #[fusion(meta = |x, _, _, _| x.clone())]
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;

    /// [`Self::rms_norm_backward`] plus `prior` (`x`'s shape and dtype), the gradient `x`'s
    /// other consumers gave it (a residual connection's): one pass, rounded once.
    #[fusion(meta = |x, _, _, _, _| x.clone())]
    fn rms_norm_backward_adding(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        prior: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
}

/// Root-mean-square norm of `x` over its last dimension, computed in f32 whatever `x`'s dtype,
/// times `weight`, as transformers' LLaMA does: `weight · (x / sqrt(mean(x²) + eps))` with the
/// normalised value rounded to `x`'s dtype. The weight gets a gradient only through Burn's
/// operations: a weight that requires one (or a device without this crate's extensions) takes
/// them.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let weight = weight.cast(x.dtype());
    if weight.is_require_grad() || !crate::has_extensions(&x.device()) {
        return composed(x, weight, eps);
    }
    Tensor::from_dispatch(Dispatch::rms_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        eps as f32,
    ))
}

/// [`rms_norm`] whose backward also gives `x` the gradient `passed`, as if `x` also reached the
/// output that gradient is for through a residual connection: a checkpointed block's pullback
/// passes the block's output gradient on to its residual stream this way, inside the norm's
/// backward kernel, instead of through `x · passed` and its backward (two passes over `x`'s
/// size whose values nothing reads).
///
/// # Panics
///
/// If `passed` is not `x`'s shape and dtype.
pub fn rms_norm_passing<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    passed: Tensor<D>,
    eps: f64,
) -> Tensor<D> {
    assert!(
        passed.dims() == x.dims() && passed.dtype() == x.dtype(),
        "rms_norm_passing: the passed gradient is {:?} {:?}, x {:?} {:?}",
        passed.dims(),
        passed.dtype(),
        x.dims(),
        x.dtype()
    );
    let weight = weight.cast(x.dtype());
    if weight.is_require_grad() || !crate::has_extensions(&x.device()) {
        // `x · passed − itself, detached`: zero, whose gradient for `x` is `passed`.
        let product = x.clone() * passed;
        return composed(x, weight, eps) + (product.clone() - product.detach());
    }
    Tensor::from_dispatch(Dispatch::rms_norm_passing(
        x.into_dispatch(),
        weight.into_dispatch(),
        passed.into_dispatch(),
        eps as f32,
    ))
}

/// The same through Burn's operations.
fn composed<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let rms = x
        .clone()
        .powi_scalar(2)
        .mean_dim(D - 1)
        .add_scalar(eps)
        .sqrt();
    (x / rms).cast(dtype) * weight.unsqueeze()
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::backend::ops::FloatTensorOps;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::RmsNormOps;
    use crate::extension::vector_size;
    use crate::extension::{PriorRead, empty_output, output_over_prior};
    use crate::rows::{grid, grid_cube, row_layout, row_reduce, row_shape};

    /// Units per row: a row of 4096 (the 7B hidden size) is 32 loads a unit.
    const LANES: usize = 128;
    /// Rows per cube.
    const ROWS_PER_CUBE: usize = 2;

    /// The launch that gives each of `rows` rows `LANES` units.
    fn launch_shape(rows: usize) -> (CubeCount, CubeDim) {
        (
            grid(rows.div_ceil(ROWS_PER_CUBE)),
            CubeDim::new_2d(LANES as u32, ROWS_PER_CUBE as u32),
        )
    }

    impl RmsNormOps for CubeBackend {
        fn rms_norm(x: CubeTensor, weight: CubeTensor, eps: f32) -> CubeTensor {
            let (x, output, rows, width) = row_layout(x);
            if rows == 0 || width == 0 {
                return output;
            }
            let (cube_count, cube_dim) = launch_shape(rows);
            let dtype = x.dtype;
            let vector = vector_size(&x, width);
            // SAFETY: each `LANES` units of a cube own one row (guarded by `rows`), read it and
            // the weight (`width` long, whole vectors) and write the row's output.
            unsafe {
                rms_norm_kernel::launch_unchecked(
                    &output.client,
                    cube_count,
                    cube_dim,
                    vector,
                    x.into_buffer_arg(),
                    into_contiguous(weight).into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    rows,
                    width / vector,
                    eps,
                    dtype_to_storage_type(dtype),
                );
            }
            output
        }

        fn rms_norm_passing(
            x: CubeTensor,
            weight: CubeTensor,
            _passed: CubeTensor,
            eps: f32,
        ) -> CubeTensor {
            Self::rms_norm(x, weight, eps)
        }

        fn rms_norm_backward(
            x: CubeTensor,
            weight: CubeTensor,
            grad: CubeTensor,
            eps: f32,
        ) -> CubeTensor {
            backward(x, weight, grad, None, eps)
        }

        fn rms_norm_backward_adding(
            x: CubeTensor,
            weight: CubeTensor,
            grad: CubeTensor,
            prior: CubeTensor,
            eps: f32,
        ) -> CubeTensor {
            backward(x, weight, grad, Some(prior), eps)
        }
    }

    /// The backward kernel, adding `prior` where it has `x`'s layout: in place where nothing else
    /// holds it, else read beside a new output (the same numbers either way, so its other
    /// holders, which depend on timing, never change a result); else after.
    fn backward(
        x: CubeTensor,
        weight: CubeTensor,
        grad: CubeTensor,
        mut prior: Option<CubeTensor>,
        eps: f32,
    ) -> CubeTensor {
        let (x, rows, width) = row_shape(x);
        let fitting = prior.take_if(|prior| {
            prior.is_contiguous_buffer() && prior.dtype == x.dtype && prior.shape() == x.shape()
        });
        let (output, prior_read) =
            output_over_prior(fitting, || empty_output(&x, x.shape(), x.dtype));
        if rows == 0 || width == 0 {
            return output;
        }
        let (cube_count, cube_dim) = launch_shape(rows);
        let dtype = x.dtype;
        let grad_dtype = grad.dtype;
        let vector = vector_size(&x, width).min(vector_size(&grad, width));
        let adding = !matches!(prior_read, PriorRead::None);
        // Read only where separate: `x` stands in for it elsewhere.
        let (separate_prior, prior_arg) = match prior_read {
            PriorRead::Separate(prior) => (true, *prior),
            _ => (false, x.clone()),
        };
        // SAFETY: as the forward, reading the row of `grad` and of a separate prior (`x`'s shape)
        // too.
        unsafe {
            rms_norm_backward_kernel::launch_unchecked(
                &output.client,
                cube_count,
                cube_dim,
                vector,
                x.into_buffer_arg(),
                into_contiguous(weight).into_buffer_arg(),
                into_contiguous(grad).into_buffer_arg(),
                prior_arg.into_buffer_arg(),
                output.clone().into_buffer_arg(),
                rows,
                width / vector,
                eps,
                adding,
                separate_prior,
                dtype_to_storage_type(dtype),
                dtype_to_storage_type(grad_dtype),
            );
        }
        match prior {
            Some(prior) => CubeBackend::float_add(output, prior),
            None => output,
        }
    }

    /// This unit's row, `LANES` units to a row, and the end of its walk: `vectors`, or 0 past
    /// the last row (whose units still take part in the reductions).
    #[cube]
    fn unit_row(rows: usize, vectors: usize) -> (usize, usize) {
        let row = grid_cube() * ROWS_PER_CUBE + UNIT_POS_Y as usize;
        let end = select(row < rows, vectors, 0);
        (row, end)
    }

    /// The sum of a vector's elements.
    #[cube]
    fn vector_sum<N: Size>(v: Vector<f32, N>) -> f32 {
        let mut sum = f32::new(0.0);
        #[unroll]
        for e in 0..N::value() {
            sum += v.extract(e);
        }
        sum
    }

    /// Each row's mean square, then `round(x / rms) · weight`; rows of `vectors` vectors.
    #[cube(launch_unchecked)]
    fn rms_norm_kernel<F: Float, N: Size>(
        x: &[Vector<F, N>],
        weight: &[Vector<F, N>],
        output: &mut [Vector<F, N>],
        rows: usize,
        vectors: usize,
        eps: f32,
        #[define(F)] _dtype: ElemType,
    ) {
        let (row, end) = unit_row(rows, vectors);
        let first = row * vectors;
        let mut local = f32::new(0.0);
        let mut k = UNIT_POS_X as usize;
        while k < end {
            let value = Vector::<f32, N>::cast_from(x[first + k]);
            local += vector_sum(value * value);
            k += LANES;
        }
        let squares = row_reduce(local, LANES, ROWS_PER_CUBE, false);
        let width = f32::cast_from(vectors * N::value());
        let rms = Vector::<f32, N>::empty().fill(f32::sqrt(squares / width + eps));
        k = UNIT_POS_X as usize;
        while k < end {
            let normed = Vector::<F, N>::cast_from(Vector::<f32, N>::cast_from(x[first + k]) / rms);
            output[first + k] = Vector::<F, N>::cast_from(
                Vector::<f32, N>::cast_from(normed) * Vector::<f32, N>::cast_from(weight[k]),
            );
            k += LANES;
        }
    }

    /// Each row's `Σ x²` and `Σ g·w·x`, then `(g·w - x · Σ(g·w·x) / (n·rms²)) / rms`, plus
    /// `output`'s own value where `adding` (`prior`'s where `separate_prior`); rows of `vectors`
    /// vectors.
    #[allow(clippy::too_many_arguments)]
    #[cube(launch_unchecked)]
    fn rms_norm_backward_kernel<F: Float, G: Float, N: Size>(
        x: &[Vector<F, N>],
        weight: &[Vector<F, N>],
        grad: &[Vector<G, N>],
        prior: &[Vector<F, N>],
        output: &mut [Vector<F, N>],
        rows: usize,
        vectors: usize,
        eps: f32,
        #[comptime] adding: bool,
        #[comptime] separate_prior: bool,
        #[define(F)] _dtype: ElemType,
        #[define(G)] _grad_dtype: ElemType,
    ) {
        let (row, end) = unit_row(rows, vectors);
        let first = row * vectors;
        let mut local_squares = f32::new(0.0);
        let mut local_dot = f32::new(0.0);
        let mut k = UNIT_POS_X as usize;
        while k < end {
            let value = Vector::<f32, N>::cast_from(x[first + k]);
            let scaled_grad = Vector::<f32, N>::cast_from(grad[first + k])
                * Vector::<f32, N>::cast_from(weight[k]);
            local_squares += vector_sum(value * value);
            local_dot += vector_sum(scaled_grad * value);
            k += LANES;
        }
        let squares = row_reduce(local_squares, LANES, ROWS_PER_CUBE, false);
        let dot = row_reduce(local_dot, LANES, ROWS_PER_CUBE, false);
        let width = f32::cast_from(vectors * N::value());
        let mean_square = squares / width + eps;
        let rms = Vector::<f32, N>::empty().fill(f32::sqrt(mean_square));
        let coefficient = Vector::<f32, N>::empty().fill(dot / (width * mean_square));
        k = UNIT_POS_X as usize;
        while k < end {
            let value = Vector::<f32, N>::cast_from(x[first + k]);
            let scaled_grad = Vector::<f32, N>::cast_from(grad[first + k])
                * Vector::<f32, N>::cast_from(weight[k]);
            let mut result = (scaled_grad - value * coefficient) / rms;
            if comptime![adding && separate_prior] {
                result += Vector::<f32, N>::cast_from(prior[first + k]);
            } else if comptime![adding] {
                result += Vector::<f32, N>::cast_from(output[first + k]);
            }
            output[first + k] = Vector::<F, N>::cast_from(result);
            k += LANES;
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;

    use super::RmsNormOps;
    use crate::flex_host::{from_host, round, to_host};

    /// `mean(row²) + eps`.
    fn mean_square(row: &[f32], eps: f32) -> f32 {
        row.iter().map(|x| x * x).sum::<f32>() / row.len() as f32 + eps
    }

    impl RmsNormOps for Flex {
        fn rms_norm(x: FlexTensor, weight: FlexTensor, eps: f32) -> FlexTensor {
            let (x, shape, dtype) = to_host(x);
            let (weight, _, _) = to_host(weight);
            let mut out = Vec::with_capacity(x.len());
            for row in x.chunks(weight.len()) {
                let rms = mean_square(row, eps).sqrt();
                out.extend(
                    row.iter()
                        .zip(&weight)
                        .map(|(x, w)| round(x / rms, dtype) * w),
                );
            }
            from_host(out, shape, dtype)
        }

        fn rms_norm_passing(
            x: FlexTensor,
            weight: FlexTensor,
            _passed: FlexTensor,
            eps: f32,
        ) -> FlexTensor {
            Self::rms_norm(x, weight, eps)
        }

        fn rms_norm_backward(
            x: FlexTensor,
            weight: FlexTensor,
            grad: FlexTensor,
            eps: f32,
        ) -> FlexTensor {
            let (x, shape, dtype) = to_host(x);
            let (weight, _, _) = to_host(weight);
            let (grad, _, _) = to_host(grad);
            let width = weight.len();
            let mut out = Vec::with_capacity(x.len());
            for (row, grad) in x.chunks(width).zip(grad.chunks(width)) {
                let mean_square = mean_square(row, eps);
                let rms = mean_square.sqrt();
                let scaled: Vec<f32> = grad.iter().zip(&weight).map(|(g, w)| g * w).collect();
                let dot: f32 = scaled.iter().zip(row).map(|(g, x)| g * x).sum();
                let coefficient = dot / (width as f32 * mean_square);
                out.extend(
                    scaled
                        .iter()
                        .zip(row)
                        .map(|(g, x)| (g - x * coefficient) / rms),
                );
            }
            from_host(out, shape, dtype)
        }

        fn rms_norm_backward_adding(
            x: FlexTensor,
            weight: FlexTensor,
            grad: FlexTensor,
            prior: FlexTensor,
            eps: f32,
        ) -> FlexTensor {
            let backward = Self::rms_norm_backward(x, weight, grad, eps);
            let (backward, shape, dtype) = to_host(backward);
            let (prior, _, _) = to_host(prior);
            let sum = backward.iter().zip(&prior).map(|(g, p)| g + p).collect();
            from_host(sum, shape, dtype)
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

    use super::RmsNormOps;

    /// The backward of `rms_norm` for `x`, the weight a constant of the graph.
    #[derive(Debug)]
    struct RmsNormBackward {
        eps: f32,
    }

    impl<B: RmsNormOps> Backward<B, 1> for RmsNormBackward {
        /// `x` (its value, and its node: the backward adds to what `x`'s other consumers, a
        /// residual connection, gave it), the weight, and a gradient passed to `x` as well
        /// (`rms_norm_passing`'s).
        type State = (
            FloatTensor<Autodiff<B>>,
            FloatTensor<B>,
            Option<FloatTensor<B>>,
        );

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let (x, weight, passed) = ops.state;
            let grad = grads.consume::<B>(&ops.node);
            let [Some(parent)] = ops.parents else {
                return;
            };
            let prior = match (grads.remove::<B>(&x), passed) {
                (Some(prior), Some(passed)) => Some(B::float_add(prior, passed)),
                (prior, passed) => prior.or(passed),
            };
            let of_x = match prior {
                Some(prior) => {
                    B::rms_norm_backward_adding(x.into_primitive(), weight, grad, prior, self.eps)
                }
                None => B::rms_norm_backward(x.into_primitive(), weight, grad, self.eps),
            };
            grads.register::<B>(parent.id, of_x);
        }
    }

    /// `rms_norm`, recording its backward (with `passed`, where given) if `x` is tracked.
    fn norm<B: RmsNormOps, C: CheckpointStrategy>(
        x: FloatTensor<Autodiff<B, C>>,
        weight: FloatTensor<B>,
        passed: Option<FloatTensor<B>>,
        eps: f32,
    ) -> FloatTensor<Autodiff<B, C>> {
        let backward = RmsNormBackward { eps };
        match backward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::rms_norm(x.clone().into_primitive(), weight.clone(), eps);
                prep.finish((x, weight, passed), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x.into_primitive(), weight, eps)),
        }
    }

    impl<B: RmsNormOps, C: CheckpointStrategy> RmsNormOps for Autodiff<B, C> {
        fn rms_norm(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            eps: f32,
        ) -> FloatTensor<Self> {
            norm::<B, C>(x, weight.into_primitive(), None, eps)
        }

        fn rms_norm_passing(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            passed: FloatTensor<Self>,
            eps: f32,
        ) -> FloatTensor<Self> {
            let passed = passed.into_primitive();
            norm::<B, C>(x, weight.into_primitive(), Some(passed), eps)
        }

        /// Called only inside the backward above, on the inner backend; here its result is a
        /// constant of the graph (no second-order gradients).
        fn rms_norm_backward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            eps: f32,
        ) -> FloatTensor<Self> {
            FloatTensor::<Self>::new(B::rms_norm_backward(
                x.into_primitive(),
                weight.into_primitive(),
                grad.into_primitive(),
                eps,
            ))
        }

        /// As [`Self::rms_norm_backward`]: only inside the backward, a constant of the graph.
        fn rms_norm_backward_adding(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            prior: FloatTensor<Self>,
            eps: f32,
        ) -> FloatTensor<Self> {
            FloatTensor::<Self>::new(B::rms_norm_backward_adding(
                x.into_primitive(),
                weight.into_primitive(),
                grad.into_primitive(),
                prior.into_primitive(),
                eps,
            ))
        }
    }
}
