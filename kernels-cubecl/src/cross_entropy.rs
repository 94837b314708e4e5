//! Cross-entropy over a vocabulary as one Burn operation: `-log softmax(logits)[target]` per
//! row, and its backward `softmax(logits) - onehot(target)` scaled by the row's gradient.
//!
//! Through Burn's operations the loss takes a log-softmax in f32 and a gather, and Burn without
//! autotune reduces each row of the vocabulary on one thread: for a chunk of 256 positions of a
//! 32000-word vocabulary, three reductions of 1.3 ms each and several f32 copies of the logits.
//! The kernels here give each row a cube, read the logits in their own dtype, and keep nothing
//! for the backward but the logits themselves (the backward recomputes the row's log-sum-exp).
//!
//! Flex (the CPU backend) runs the plain-Rust reference beside the kernels.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Int, Tensor};

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait CrossEntropyOps: Backend {
    /// `logsumexp(logits[row]) - logits[row, targets[row]]` for `[rows, vocab]` logits, in f32;
    /// a target outside the vocabulary picks nothing (the row's log-sum-exp alone).
    #[fusion(meta = |logits, _| {
        let mut out = logits.clone();
        out.shape = burn::tensor::Shape::new([logits.shape[0]]);
        out.dtype = burn::tensor::DType::F32;
        out
    })]
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;

    /// The gradient of [`Self::cross_entropy`] for the logits, in the logits' dtype:
    /// `grad[row] * (softmax(logits[row]) - onehot(targets[row]))`.
    #[fusion(meta = |logits, _, _| logits.clone())]
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `-log softmax(logits)[target]` per position, in f32, for `[batch, positions, vocab]` logits
/// and `[batch, positions]` targets: `[batch, positions]`.
///
/// # Panics
///
/// If the targets' shape is not the logits' without the vocabulary, or the device's backend
/// has no [`CrossEntropyOps`] in this build (CubeCL devices and Flex have).
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [batch, positions, vocab] = logits.dims();
    assert_eq!(
        targets.dims(),
        [batch, positions],
        "cross-entropy: targets {:?} for logits {:?}",
        targets.dims(),
        logits.dims()
    );
    let rows = batch * positions;
    let nll = Dispatch::cross_entropy(
        logits.reshape([rows, vocab]).into_dispatch(),
        targets.reshape([rows]).into_dispatch(),
    );
    Tensor::<1>::from_dispatch(nll).reshape([batch, positions])
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::tensor::DType;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::CrossEntropyOps;
    use crate::extension::empty_output;
    use crate::rows::{grid, grid_cube, row_reduce};

    /// Units per row: they stride over the vocabulary (coalesced loads) and meet in shared
    /// memory.
    const UNITS: usize = 256;

    impl CrossEntropyOps for CubeBackend {
        fn cross_entropy(logits: CubeTensor, targets: CubeTensor) -> CubeTensor {
            let logits = into_contiguous(logits);
            let [rows, vocab] = logits.shape().dims();
            let output = empty_output(&logits, [rows], DType::F32);
            let dtype = logits.dtype;
            let target_dtype = targets.dtype;
            // SAFETY: one cube per row (the grid's two dimensions give the row, guarded by
            // `rows`); it reads that row of `logits` and its target, and writes its output.
            unsafe {
                cross_entropy_kernel::launch_unchecked(
                    &output.client,
                    grid(rows),
                    CubeDim::new_1d(UNITS as u32),
                    logits.into_buffer_arg(),
                    into_contiguous(targets).into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    rows,
                    vocab,
                    dtype_to_storage_type(dtype),
                    dtype_to_storage_type(target_dtype),
                );
            }
            output
        }

        fn cross_entropy_backward(
            logits: CubeTensor,
            targets: CubeTensor,
            grad: CubeTensor,
        ) -> CubeTensor {
            let logits = into_contiguous(logits);
            let [rows, vocab] = logits.shape().dims();
            let output = empty_output(&logits, [rows, vocab], logits.dtype);
            let dtype = logits.dtype;
            let target_dtype = targets.dtype;
            let grad_dtype = grad.dtype;
            // SAFETY: as the forward; each cube writes its row of the output.
            unsafe {
                cross_entropy_backward_kernel::launch_unchecked(
                    &output.client,
                    grid(rows),
                    CubeDim::new_1d(UNITS as u32),
                    logits.into_buffer_arg(),
                    into_contiguous(targets).into_buffer_arg(),
                    into_contiguous(grad).into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    rows,
                    vocab,
                    dtype_to_storage_type(dtype),
                    dtype_to_storage_type(target_dtype),
                    dtype_to_storage_type(grad_dtype),
                );
            }
            output
        }
    }

    /// `log Σ exp(logits[row, v])`, stabilised by the row's maximum: two passes over the row.
    #[cube]
    fn row_logsumexp<F: Float>(logits: &[F], first: usize, vocab: usize) -> f32 {
        let unit = UNIT_POS as usize;
        let mut local_max = f32::new(-3.402_823_5e38);
        let mut v = unit;
        while v < vocab {
            local_max = f32::max(local_max, f32::cast_from(logits[first + v]));
            v += UNITS;
        }
        let row_max = row_reduce(local_max, UNITS, 1usize, true);
        let mut local_sum = f32::new(0.0);
        v = unit;
        while v < vocab {
            local_sum += f32::exp(f32::cast_from(logits[first + v]) - row_max);
            v += UNITS;
        }
        row_max + f32::ln(row_reduce(local_sum, UNITS, 1usize, false))
    }

    /// One cube per row: [`row_logsumexp`] minus the target's logit.
    #[cube(launch_unchecked)]
    fn cross_entropy_kernel<F: Float, I: Int>(
        logits: &[F],
        targets: &[I],
        output: &mut [f32],
        rows: usize,
        vocab: usize,
        #[define(F)] _dtype: ElemType,
        #[define(I)] _target_dtype: ElemType,
    ) {
        let row = grid_cube();
        if row >= rows {
            terminate!();
        }
        let first = row * vocab;
        let logsumexp = row_logsumexp::<F>(logits, first, vocab);
        if UNIT_POS == 0 {
            let target = i32::cast_from(targets[row]);
            let mut picked = f32::new(0.0);
            if target >= 0 && (target as usize) < vocab {
                picked = f32::cast_from(logits[first + target as usize]);
            }
            output[row] = logsumexp - picked;
        }
    }

    /// One cube per row: `grad[row] * (exp(logit - logsumexp) - [v == target])`.
    #[cube(launch_unchecked)]
    fn cross_entropy_backward_kernel<F: Float, I: Int, G: Float>(
        logits: &[F],
        targets: &[I],
        grad: &[G],
        output: &mut [F],
        rows: usize,
        vocab: usize,
        #[define(F)] _dtype: ElemType,
        #[define(I)] _target_dtype: ElemType,
        #[define(G)] _grad_dtype: ElemType,
    ) {
        let row = grid_cube();
        if row >= rows {
            terminate!();
        }
        let first = row * vocab;
        let logsumexp = row_logsumexp::<F>(logits, first, vocab);
        let scale = f32::cast_from(grad[row]);
        let target = i32::cast_from(targets[row]);
        let mut v = UNIT_POS as usize;
        while v < vocab {
            let mut value = f32::exp(f32::cast_from(logits[first + v]) - logsumexp);
            if target >= 0 && v == target as usize {
                value -= f32::new(1.0);
            }
            output[first + v] = F::cast_from(value * scale);
            v += UNITS;
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::DType;
    use rayon::prelude::*;

    use super::CrossEntropyOps;
    use crate::flex_host::{from_host, to_host};

    /// The rows of `[rows, vocab]` logits and their targets, on the host in f32 / i64.
    fn host(logits: FlexTensor, targets: FlexTensor) -> (Vec<f32>, Vec<i64>, Vec<usize>, DType) {
        let (values, shape, dtype) = to_host(logits);
        let targets = targets
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .expect("targets");
        (values, targets, shape, dtype)
    }

    /// `log Σ exp(row)`, stabilised by the row's maximum, in f32 as the kernels compute it.
    fn logsumexp(row: &[f32]) -> f32 {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln()
    }

    /// The target's index in a row, if it lies inside the vocabulary.
    fn target_index(target: i64, vocab: usize) -> Option<usize> {
        usize::try_from(target).ok().filter(|t| *t < vocab)
    }

    // Rows across the CPU's threads: with SmolLM2's 49,152-wide rows the loss on one thread made
    // the default CPU run 5% slower (BENCHMARKS.md).
    impl CrossEntropyOps for Flex {
        fn cross_entropy(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
            let (values, targets, shape, _) = host(logits, targets);
            let vocab = shape[1];
            let nll: Vec<f32> = values
                .par_chunks(vocab)
                .zip(&targets)
                .map(|(row, &target)| {
                    let picked = target_index(target, vocab).map_or(0.0, |t| row[t]);
                    logsumexp(row) - picked
                })
                .collect();
            let rows = nll.len();
            from_host(nll, vec![rows], DType::F32)
        }

        fn cross_entropy_backward(
            logits: FlexTensor,
            targets: FlexTensor,
            grad: FlexTensor,
        ) -> FlexTensor {
            let (values, targets, shape, dtype) = host(logits, targets);
            let vocab = shape[1];
            let (grad, _, _) = to_host(grad);
            let mut out = vec![0.0; values.len()];
            out.par_chunks_mut(vocab)
                .zip(values.par_chunks(vocab))
                .zip(&targets)
                .zip(grad)
                .for_each(|(((out, row), &target), scale)| {
                    let logsumexp = logsumexp(row);
                    let target = target_index(target, vocab);
                    for (v, (out, x)) in out.iter_mut().zip(row).enumerate() {
                        let onehot = if Some(v) == target { 1.0 } else { 0.0 };
                        *out = ((x - logsumexp).exp() - onehot) * scale;
                    }
                });
            from_host(out, shape, dtype)
        }
    }
}

mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::NodeId;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
    use burn::backend::tensor::{FloatTensor, IntTensor};

    use super::CrossEntropyOps;

    /// The backward of `cross_entropy` for the logits, through the backend's kernel.
    #[derive(Debug)]
    struct CrossEntropyBackward;

    impl<B: CrossEntropyOps> Backward<B, 1> for CrossEntropyBackward {
        type State = (NodeId, IntTensor<B>);

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            checkpointer: &mut Checkpointer,
        ) {
            let (logits, targets) = ops.state;
            let logits = checkpointer.retrieve_node_output::<FloatTensor<B>>(logits);
            unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                B::cross_entropy_backward(logits, targets, grad)
            });
        }
    }

    impl<B: CrossEntropyOps, C: CheckpointStrategy> CrossEntropyOps for Autodiff<B, C> {
        fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
            match CrossEntropyBackward
                .prepare::<C>([logits.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let state = prep.checkpoint(&logits);
                    let output = B::cross_entropy(logits.into_primitive(), targets.clone());
                    prep.finish((state, targets), output)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::cross_entropy(logits.into_primitive(), targets))
                }
            }
        }

        /// Called only inside the backward above, on the inner backend; here its result is a
        /// constant of the graph (no second-order gradients).
        fn cross_entropy_backward(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            FloatTensor::<Self>::new(B::cross_entropy_backward(
                logits.into_primitive(),
                targets,
                grad.into_primitive(),
            ))
        }
    }
}
