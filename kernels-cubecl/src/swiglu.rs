//! SwiGLU's gating, `silu(gate) · up`, as one Burn operation, and its backward as one more: the
//! two gradients from one pass over `gate`, `up` and the upstream gradient, in f32 inside.
//!
//! Through Burn's operations the forward was a sigmoid, two products and casts, and the backward
//! five of Burn's fused element-wise kernels over the 7B MLP's `[2048, 11008]` (12 ms of a
//! checkpointed step on an H100, about 2.5x the bytes these two kernels move).
//!
//! Flex (the CPU backend) runs a plain-Rust loop beside the kernels.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait SwigluOps: Backend {
    /// `silu(gate) · up` for two tensors of one shape and dtype, contiguous, in their dtype.
    #[fusion(meta = |gate, _| gate.clone())]
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradients of [`swiglu`](SwigluOps::swiglu) for the upstream `grad`, stacked along
    /// the first dimension (`[2 d0, d1, ..]`): the gate's first, then the up projection's, so
    /// each half is contiguous.
    #[fusion(meta = |gate, _, _| {
        let mut out = gate.clone();
        out.shape[0] *= 2;
        out
    })]
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `silu(gate) · up`, the gating of a SwiGLU feed-forward block, computed in f32 and rounded
/// once to the inputs' dtype. Devices without this crate's extensions take Burn's operations.
///
/// # Panics
///
/// If `gate` and `up` differ in shape.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(
        gate.dims(),
        up.dims(),
        "swiglu: gate {:?} and up {:?} differ in shape",
        gate.dims(),
        up.dims()
    );
    if !crate::has_extensions(&gate.device()) {
        return silu(gate) * up;
    }
    let up = up.cast(gate.dtype());
    Tensor::from_dispatch(Dispatch::swiglu(gate.into_dispatch(), up.into_dispatch()))
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::tensor::Shape;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::SwigluOps;
    use crate::extension::{empty_output, launch_dims, vector_size};

    /// A unit per vector of the contiguous `gate`: the widest vector that divides it, how many,
    /// and the launch's cubes.
    struct Layout {
        vector: usize,
        units: usize,
        cube_count: CubeCount,
        cube_dim: CubeDim,
    }

    impl Layout {
        /// `None` for an empty tensor.
        fn of(gate: &CubeTensor) -> Option<Self> {
            let elements = gate.shape().num_elements();
            let vector = vector_size(gate, elements);
            let units = elements / vector;
            let (cube_count, cube_dim) = launch_dims(gate, units);
            (units > 0).then_some(Self {
                vector,
                units,
                cube_count,
                cube_dim,
            })
        }
    }

    impl SwigluOps for CubeBackend {
        fn swiglu(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
            let (gate, up) = (into_contiguous(gate), into_contiguous(up));
            let output = empty_output(&gate, gate.shape(), gate.dtype);
            let Some(layout) = Layout::of(&gate) else {
                return output;
            };
            let dtype = gate.dtype;
            // SAFETY: each of `units` units reads one vector of the contiguous `gate` and `up`
            // and writes the same vector of the output, all `units` vectors long.
            unsafe {
                swiglu_kernel::launch_unchecked(
                    &output.client,
                    layout.cube_count,
                    layout.cube_dim,
                    layout.vector,
                    gate.into_buffer_arg(),
                    up.into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    layout.units,
                    dtype_to_storage_type(dtype),
                );
            }
            output
        }

        fn swiglu_backward(gate: CubeTensor, up: CubeTensor, grad: CubeTensor) -> CubeTensor {
            let (gate, up, grad) = (
                into_contiguous(gate),
                into_contiguous(up),
                into_contiguous(grad),
            );
            let mut dims = gate.shape().to_vec();
            dims[0] *= 2;
            let output = empty_output(&gate, Shape::from(dims), gate.dtype);
            let Some(layout) = Layout::of(&gate) else {
                return output;
            };
            let dtype = gate.dtype;
            // SAFETY: each of `units` units reads one vector of the contiguous `gate`, `up` and
            // `grad` and writes it in both halves of the output, `2 units` vectors long.
            unsafe {
                swiglu_backward_kernel::launch_unchecked(
                    &output.client,
                    layout.cube_count,
                    layout.cube_dim,
                    layout.vector,
                    gate.into_buffer_arg(),
                    up.into_buffer_arg(),
                    grad.into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    layout.units,
                    dtype_to_storage_type(dtype),
                );
            }
            output
        }
    }

    /// `1 / (1 + e^-g)`, lane by lane.
    #[cube]
    fn sigmoid<N: Size>(g: Vector<f32, N>) -> Vector<f32, N> {
        let mut out = Vector::<f32, N>::empty();
        #[unroll]
        for e in 0..N::value() {
            out.insert(
                e,
                f32::new(1.0) / (f32::new(1.0) + f32::exp(f32::new(0.0) - g.extract(e))),
            );
        }
        out
    }

    /// One vector of `silu(gate) · up`.
    #[cube(launch_unchecked)]
    fn swiglu_kernel<F: Float, N: Size>(
        gate: &[Vector<F, N>],
        up: &[Vector<F, N>],
        output: &mut [Vector<F, N>],
        units: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let unit = ABSOLUTE_POS;
        if unit >= units {
            terminate!();
        }
        let g = Vector::<f32, N>::cast_from(gate[unit]);
        let u = Vector::<f32, N>::cast_from(up[unit]);
        output[unit] = Vector::<F, N>::cast_from(g * sigmoid(g) * u);
    }

    /// One vector of each gradient: `grad · up · σ(g) · (1 + g · (1 - σ(g)))` for the gate at
    /// `unit`, `grad · silu(g)` for `up` at `units + unit`.
    #[cube(launch_unchecked)]
    fn swiglu_backward_kernel<F: Float, N: Size>(
        gate: &[Vector<F, N>],
        up: &[Vector<F, N>],
        grad: &[Vector<F, N>],
        output: &mut [Vector<F, N>],
        units: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let unit = ABSOLUTE_POS;
        if unit >= units {
            terminate!();
        }
        let g = Vector::<f32, N>::cast_from(gate[unit]);
        let u = Vector::<f32, N>::cast_from(up[unit]);
        let d = Vector::<f32, N>::cast_from(grad[unit]);
        let s = sigmoid(g);
        let one = Vector::<f32, N>::empty().fill(f32::new(1.0));
        output[unit] = Vector::<F, N>::cast_from(d * u * s * (one + g * (one - s)));
        output[units + unit] = Vector::<F, N>::cast_from(d * g * s);
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;

    use super::SwigluOps;
    use crate::flex_host::{from_host, to_host};

    fn sigmoid(g: f32) -> f32 {
        1.0 / (1.0 + (-g).exp())
    }

    impl SwigluOps for Flex {
        fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
            let (gate, shape, dtype) = to_host(gate);
            let (up, _, _) = to_host(up);
            let out = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| g * sigmoid(g) * u)
                .collect();
            from_host(out, shape, dtype)
        }

        fn swiglu_backward(gate: FlexTensor, up: FlexTensor, grad: FlexTensor) -> FlexTensor {
            let (gate, mut shape, dtype) = to_host(gate);
            let (up, _, _) = to_host(up);
            let (grad, _, _) = to_host(grad);
            let terms = || gate.iter().zip(&up).zip(&grad);
            let of_gate = terms().map(|((&g, &u), &d)| {
                let s = sigmoid(g);
                d * u * s * (1.0 + g * (1.0 - s))
            });
            let of_up = terms().map(|((&g, _), &d)| d * g * sigmoid(g));
            shape[0] *= 2;
            from_host(of_gate.chain(of_up).collect(), shape, dtype)
        }
    }
}

mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::TensorMetadata;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::Slice;

    use super::SwigluOps;

    /// The backward of `swiglu`: both gradients from one kernel, each half of its output.
    #[derive(Debug)]
    struct SwigluBackward;

    impl<B: SwigluOps> Backward<B, 2> for SwigluBackward {
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let (gate, up) = ops.state;
            let grad = grads.consume::<B>(&ops.node);
            let both = B::swiglu_backward(gate, up, grad);
            let half = both.shape()[0] / 2;
            for (index, parent) in ops.parents.into_iter().enumerate() {
                if let Some(parent) = parent {
                    let start = (index * half) as isize;
                    let part = Slice::new(start, Some(start + half as isize), 1);
                    grads.register::<B>(parent.id, B::float_slice(both.clone(), &[part]));
                }
            }
        }
    }

    impl<B: SwigluOps, C: CheckpointStrategy> SwigluOps for Autodiff<B, C> {
        fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
            match SwigluBackward
                .prepare::<C>([gate.node(), up.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (gate, up) = (gate.into_primitive(), up.into_primitive());
                    let output = B::swiglu(gate.clone(), up.clone());
                    prep.finish((gate, up), output)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::swiglu(gate.into_primitive(), up.into_primitive()))
                }
            }
        }

        /// Called only inside the backward above, on the inner backend; here its result is a
        /// constant of the graph (no second-order gradients).
        fn swiglu_backward(
            gate: FloatTensor<Self>,
            up: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            FloatTensor::<Self>::new(B::swiglu_backward(
                gate.into_primitive(),
                up.into_primitive(),
                grad.into_primitive(),
            ))
        }
    }
}
