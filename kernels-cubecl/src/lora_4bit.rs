//! A LoRA projection over a 4-bit base, `x·Wᵀ + (x·A)·(s·B)`, as one Burn operation forward
//! and one backward.
//!
//! The products are those of [`crate::matmul`] and [`crate::low_rank`]; composing them at the
//! tensor level records about a dozen operations a projection (casts and scaling of the f32
//! adapter, reshapes, the products, the backward's add of the two input gradients), and every
//! one costs the host: autodiff bookkeeping, then Burn fusion's thread, which sets the pace of a
//! 7B step without activation checkpointing. Here the host records one, and the adapter's
//! term (`h·(s·B)` forward, the input gradient's `(g·(s·B)ᵀ)·Aᵀ` backward) is added to the base
//! product's accumulator by the `wgmma` kernel before it rounds (elsewhere by the `h·B`-shaped
//! kernel, which reads the base product's output). The casts of the adapter to the compute
//! dtype (and of its gradients back) take one small kernel each way, both matrices in one
//! launch. The numbers are the composed layer's but for that one rounding: the adapter cast to
//! the input's dtype (the scaling applied in f32 first), its gradients cast back to f32 and
//! scaled there.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor};

use crate::low_rank::LowRankOps;
use crate::matmul::{Matmul4bitOps, Weight4bitPrimitive};
use crate::{Packed4bit, QuantError};

/// The differentiable operation.
#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait Lora4bitOps: Backend {
    /// `input · Wᵀ + (input · lora_a) · (scaling · lora_b)` for a `[rows, cols]` weight, `input`
    /// `[.., cols]`, `lora_a` `[cols, r]`, `lora_b` `[r, rows]`, in `input`'s dtype.
    #[fusion(meta = |input, weight, _lora_a, _lora_b, _scaling| output_spec(input, weight.shape[0]))]
    fn lora_4bit_linear(
        input: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scaling: f64,
    ) -> FloatTensor<Self>;
}

/// The two halves its `Autodiff` implementation runs on the inner backend.
#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex")
)]
pub trait Lora4bitPassOps: Backend {
    /// [`Lora4bitOps::lora_4bit_linear`]'s output, and what its backward needs: the adapter's
    /// hidden `input · lora_a` (`[rows of input, r]`), `lora_a` and `scaling · lora_b` in
    /// `input`'s dtype.
    #[fusion(meta = |input, weight, lora_a, lora_b, _scaling| {
        let rows = input.shape.num_elements() / input.shape[input.shape.len() - 1];
        let mut hidden = input.clone();
        hidden.shape = Shape::new([rows, lora_a.shape[1]]);
        (
            output_spec(input, weight.shape[0]),
            hidden,
            spec_in(lora_a, input.dtype),
            spec_in(lora_b, input.dtype),
        )
    })]
    fn lora_4bit_forward(
        input: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scaling: f64,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// The gradients of `input`, `lora_a` and `lora_b` (the last two in `adapter_dtype`) from
    /// the output's `grad` and what the forward kept (`lora_a`, `scaled_b` in the compute dtype).
    #[fusion(meta = |_grad, input, _hidden, _weight, lora_a, scaled_b, _scaling, adapter_dtype| {
        (input.clone(), spec_in(lora_a, *adapter_dtype), spec_in(scaled_b, *adapter_dtype))
    })]
    #[allow(clippy::too_many_arguments)]
    fn lora_4bit_backward(
        grad: FloatTensor<Self>,
        input: FloatTensor<Self>,
        hidden: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        lora_a: FloatTensor<Self>,
        scaled_b: FloatTensor<Self>,
        scaling: f64,
        adapter_dtype: DType,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The layer's output as fusion records it: `input`'s spec with `rows` output features.
#[cfg(all(feature = "cube", feature = "fusion"))]
fn output_spec(
    input: &burn::backend::fusion::custom::TensorSpec,
    rows: usize,
) -> burn::backend::fusion::custom::TensorSpec {
    let mut spec = input.clone();
    let last = spec.shape.len() - 1;
    spec.shape[last] = rows;
    spec
}

/// `spec` in `dtype`.
#[cfg(all(feature = "cube", feature = "fusion"))]
fn spec_in(
    spec: &burn::backend::fusion::custom::TensorSpec,
    dtype: DType,
) -> burn::backend::fusion::custom::TensorSpec {
    let mut spec = spec.clone();
    spec.dtype = dtype;
    spec
}

/// `input · Wᵀ + (input · lora_a) · (scaling · lora_b)` over `input`'s last dimension, for this
/// frozen `[out_features, in_features]` 4-bit weight and a trainable adapter in Burn's layout
/// (`lora_a` `[in_features, r]`, `lora_b` `[r, out_features]`, any float dtype: the products
/// run in `input`'s). A LoRA layer's forward without dropout, as one operation each way.
pub fn lora_4bit_linear<const D: usize>(
    input: Tensor<D>,
    weight: &Packed4bit,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    scaling: f64,
) -> Result<Tensor<D>, QuantError> {
    weight.check_input(&input, true)?;
    let [rows, cols] = weight.matrix_shape("LoRA linear")?;
    let [a_rows, rank] = lora_a.dims();
    let [b_rows, b_cols] = lora_b.dims();
    if a_rows != cols || b_rows != rank || b_cols != rows {
        return Err(QuantError::Format {
            what: "LoRA adapter".into(),
            detail: format!(
                "A [{a_rows}, {rank}] and B [{b_rows}, {b_cols}] do not fit a [{rows}, {cols}] \
                 weight: A must be [{cols}, r] and B [r, {rows}]"
            ),
        });
    }
    if lora_a.dtype() != lora_b.dtype() {
        return Err(QuantError::Format {
            what: "LoRA adapter".into(),
            detail: format!(
                "A is {:?} and B {:?}: both must share a dtype",
                lora_a.dtype(),
                lora_b.dtype()
            ),
        });
    }
    let primitive = weight.primitive()?;
    Ok(Tensor::from_dispatch(Dispatch::lora_4bit_linear(
        input.into_dispatch(),
        primitive,
        lora_a.into_dispatch(),
        lora_b.into_dispatch(),
        scaling,
    )))
}

/// `tensor` flattened to `[rows, last dimension]`.
fn flat_rows<B: Backend>(tensor: FloatTensor<B>) -> FloatTensor<B> {
    let dims = tensor.shape();
    let inner = dims[dims.num_dims() - 1];
    let rows = dims.num_elements() / inner;
    B::float_reshape(tensor, Shape::new([rows, inner]))
}

/// What [`forward`] and [`backward`] need beyond the products' operations: the adapter's casts,
/// and the base product with the adapter's term added.
trait LoraPass: Matmul4bitOps + LowRankOps {
    /// `first` and `scale · second` in `dtype`, both given in one dtype; the product `scale ·
    /// second` in f32, rounded once. One launch for both where the backend launches kernels.
    fn cast_adapter(
        first: FloatTensor<Self>,
        second: FloatTensor<Self>,
        scale: f64,
        dtype: DType,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `lhs · Wᵀ` (`transpose`) or `lhs · W`, plus `hidden · adapter`, for a `[rows, k]` `lhs`
    /// and a thin `[rows, r]` `hidden`: the 4-bit product, then `low_rank_up_add`.
    fn matmul_4bit_plus_low_rank(
        lhs: FloatTensor<Self>,
        weight: Weight4bitPrimitive<Self>,
        transpose: bool,
        hidden: FloatTensor<Self>,
        adapter: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let base = Self::matmul_4bit(lhs, weight, transpose);
        Self::low_rank_up_add(base, hidden, adapter)
    }
}

/// [`Lora4bitPassOps::lora_4bit_forward`] through the backend's products.
fn forward<B: LoraPass>(
    input: FloatTensor<B>,
    weight: Weight4bitPrimitive<B>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    scaling: f64,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
) {
    let mut dims = input.shape();
    let (lora_a, scaled_b) = B::cast_adapter(lora_a, lora_b, scaling, input.dtype());
    let input = flat_rows::<B>(input);
    let hidden = B::low_rank_down(input.clone(), lora_a.clone());
    let output =
        B::matmul_4bit_plus_low_rank(input, weight, true, hidden.clone(), scaled_b.clone());
    let last = dims.num_dims() - 1;
    dims[last] = output.shape()[1];
    (B::float_reshape(output, dims), hidden, lora_a, scaled_b)
}

/// [`Lora4bitPassOps::lora_4bit_backward`] through the backend's products: `g·W + (g·(s·B)ᵀ)·Aᵀ`
/// for the input, `xᵀ·(g·(s·B)ᵀ)` for `A` and `s·(hᵀ·g)` for `B`.
#[allow(clippy::too_many_arguments)]
fn backward<B: LoraPass>(
    grad: FloatTensor<B>,
    input: FloatTensor<B>,
    hidden: FloatTensor<B>,
    weight: Weight4bitPrimitive<B>,
    lora_a: FloatTensor<B>,
    scaled_b: FloatTensor<B>,
    scaling: f64,
    adapter_dtype: DType,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let dims = input.shape();
    let grad = flat_rows::<B>(grad);
    let input = flat_rows::<B>(input);
    let grad_hidden = B::low_rank_down(grad.clone(), B::float_transpose(scaled_b));
    let grad_input = B::matmul_4bit_plus_low_rank(
        grad.clone(),
        weight,
        false,
        grad_hidden.clone(),
        B::float_transpose(lora_a),
    );
    let grad_a = B::low_rank_gradient(input, grad_hidden);
    let grad_b = B::float_transpose(B::low_rank_gradient(grad, hidden));
    let (grad_a, grad_b) = B::cast_adapter(grad_a, grad_b, scaling, adapter_dtype);
    (B::float_reshape(grad_input, dims), grad_a, grad_b)
}

/// The two traits for a backend whose products and [`LoraPass`] run [`forward`] and
/// [`backward`] (CubeCL's and Flex).
macro_rules! impl_lora_4bit_ops {
    ($backend:ty, $tensor:ty) => {
        impl Lora4bitOps for $backend {
            fn lora_4bit_linear(
                input: $tensor,
                weight: Weight4bitPrimitive<Self>,
                lora_a: $tensor,
                lora_b: $tensor,
                scaling: f64,
            ) -> $tensor {
                forward::<Self>(input, weight, lora_a, lora_b, scaling).0
            }
        }

        impl Lora4bitPassOps for $backend {
            fn lora_4bit_forward(
                input: $tensor,
                weight: Weight4bitPrimitive<Self>,
                lora_a: $tensor,
                lora_b: $tensor,
                scaling: f64,
            ) -> ($tensor, $tensor, $tensor, $tensor) {
                forward::<Self>(input, weight, lora_a, lora_b, scaling)
            }

            #[allow(clippy::too_many_arguments)]
            fn lora_4bit_backward(
                grad: $tensor,
                input: $tensor,
                hidden: $tensor,
                weight: Weight4bitPrimitive<Self>,
                lora_a: $tensor,
                scaled_b: $tensor,
                scaling: f64,
                adapter_dtype: burn::tensor::DType,
            ) -> ($tensor, $tensor, $tensor) {
                backward::<Self>(
                    grad,
                    input,
                    hidden,
                    weight,
                    lora_a,
                    scaled_b,
                    scaling,
                    adapter_dtype,
                )
            }
        }
    };
}
use impl_lora_4bit_ops;

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::tensor::DType;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::{Lora4bitOps, Lora4bitPassOps, LoraPass, backward, forward};
    use crate::extension::{empty_output, launch_dims};
    use crate::low_rank::cube::thin_weight;
    use crate::matmul::Weight4bitPrimitive;

    super::impl_lora_4bit_ops!(CubeBackend, CubeTensor);

    impl LoraPass for CubeBackend {
        fn cast_adapter(
            first: CubeTensor,
            second: CubeTensor,
            scale: f64,
            dtype: DType,
        ) -> (CubeTensor, CubeTensor) {
            let first = into_contiguous(first);
            // The backward's gradient of B is the transpose of a contiguous `[cols, r]`: read
            // in place, written in B's own layout.
            let [rows, cols] = second.shape().dims();
            let (second, transposed) = thin_weight(second);
            let first_out = empty_output(&first, first.shape(), dtype);
            let second_out = empty_output(&second, [rows, cols], dtype);
            let first_len = first.shape().num_elements();
            let (cube_count, cube_dim) = launch_dims(&first_out, first_len + rows * cols);
            let (input_dtype, output_dtype) = (first.dtype, dtype);
            // SAFETY: one unit per element of either output, guarded by the two lengths; a
            // transposed `second` is read at the mirrored index of its `[cols, rows]` storage.
            unsafe {
                cast_adapter_kernel::launch_unchecked(
                    &first_out.client,
                    cube_count,
                    cube_dim,
                    first.into_buffer_arg(),
                    second.into_buffer_arg(),
                    first_out.clone().into_buffer_arg(),
                    second_out.clone().into_buffer_arg(),
                    first_len,
                    rows,
                    cols,
                    scale as f32,
                    transposed,
                    dtype_to_storage_type(input_dtype),
                    dtype_to_storage_type(output_dtype),
                );
            }
            (first_out, second_out)
        }

        fn matmul_4bit_plus_low_rank(
            lhs: CubeTensor,
            weight: Weight4bitPrimitive<Self>,
            transpose: bool,
            hidden: CubeTensor,
            adapter: CubeTensor,
        ) -> CubeTensor {
            crate::matmul::cube::matmul_4bit_plus_low_rank(lhs, weight, transpose, hidden, adapter)
        }
    }

    /// `first_out = first` and `second_out = scale · second`, converted to `O`: the units past
    /// `first_len` take `second`'s `[rows, cols]`, stored `[cols, rows]` when `transposed`.
    #[allow(clippy::too_many_arguments)]
    #[cube(launch_unchecked)]
    fn cast_adapter_kernel<I: Float, O: Float>(
        first: &[I],
        second: &[I],
        first_out: &mut [O],
        second_out: &mut [O],
        first_len: usize,
        rows: usize,
        cols: usize,
        scale: f32,
        #[comptime] transposed: bool,
        #[define(I)] _input: ElemType,
        #[define(O)] _output: ElemType,
    ) {
        let index = ABSOLUTE_POS;
        if index < first_len {
            first_out[index] = O::cast_from(f32::cast_from(first[index]));
        } else if index < first_len + rows * cols {
            let position = index - first_len;
            let source = if comptime![transposed] {
                (position % cols) * rows + position / cols
            } else {
                position
            };
            second_out[position] = O::cast_from(f32::cast_from(second[source]) * scale);
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::DType;

    use super::{Lora4bitOps, Lora4bitPassOps, LoraPass, backward, forward};
    use crate::matmul::Weight4bitPrimitive;

    super::impl_lora_4bit_ops!(Flex, FlexTensor);

    impl LoraPass for Flex {
        fn cast_adapter(
            first: FlexTensor,
            second: FlexTensor,
            scale: f64,
            dtype: DType,
        ) -> (FlexTensor, FlexTensor) {
            let cast = |tensor: FlexTensor, dtype: DType| {
                if tensor.dtype() == dtype {
                    tensor
                } else {
                    Self::float_cast(tensor, dtype.into())
                }
            };
            let scaled = Self::float_mul_scalar(cast(second, DType::F32), scale.into());
            (cast(first, dtype), cast(scaled, dtype))
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
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::DType;

    use super::{Lora4bitOps, Lora4bitPassOps};
    use crate::matmul::Weight4bitPrimitive;

    /// What the backward needs: the input (by node), what the forward kept in the compute dtype
    /// (the adapter's hidden `[rows, r]`, `A` and `s·B`: a few rows each), the frozen weight,
    /// the scaling and the adapter's own dtype.
    #[derive(Debug, Clone)]
    struct State<B: Lora4bitPassOps> {
        input: NodeId,
        hidden: FloatTensor<B>,
        lora_a: FloatTensor<B>,
        scaled_b: FloatTensor<B>,
        weight: Weight4bitPrimitive<B>,
        scaling: f64,
        adapter_dtype: DType,
    }

    #[derive(Debug)]
    struct Lora4bitBackward;

    impl<B: Lora4bitPassOps> Backward<B, 3> for Lora4bitBackward {
        type State = State<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            checkpointer: &mut Checkpointer,
        ) {
            let state = ops.state;
            let input = checkpointer.retrieve_node_output::<FloatTensor<B>>(state.input);
            let grad = grads.consume::<B>(&ops.node);
            // One launch sequence gives all three; a parent that is not tracked (a frozen
            // adapter, the embeddings' output) drops its gradient.
            let (of_input, of_a, of_b) = B::lora_4bit_backward(
                grad,
                input,
                state.hidden,
                state.weight,
                state.lora_a,
                state.scaled_b,
                state.scaling,
                state.adapter_dtype,
            );
            let [input_node, a_node, b_node] = ops.parents;
            for (node, of) in [(input_node, of_input), (a_node, of_a), (b_node, of_b)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, of);
                }
            }
        }
    }

    impl<B, C> Lora4bitOps for Autodiff<B, C>
    where
        B: Lora4bitOps + Lora4bitPassOps,
        C: CheckpointStrategy,
    {
        fn lora_4bit_linear(
            input: FloatTensor<Self>,
            weight: Weight4bitPrimitive<Self>,
            lora_a: FloatTensor<Self>,
            lora_b: FloatTensor<Self>,
            scaling: f64,
        ) -> FloatTensor<Self> {
            let weight = weight.into_inner();
            match Lora4bitBackward
                .prepare::<C>([input.node(), lora_a.node(), lora_b.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let input_id = prep.checkpoint(&input);
                    let adapter_dtype = lora_a.dtype();
                    let (output, hidden, lora_a, scaled_b) = B::lora_4bit_forward(
                        input.into_primitive(),
                        weight.clone(),
                        lora_a.into_primitive(),
                        lora_b.into_primitive(),
                        scaling,
                    );
                    let state = State {
                        input: input_id,
                        hidden,
                        lora_a,
                        scaled_b,
                        weight,
                        scaling,
                        adapter_dtype,
                    };
                    prep.finish(state, output)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::lora_4bit_linear(
                    input.into_primitive(),
                    weight,
                    lora_a.into_primitive(),
                    lora_b.into_primitive(),
                    scaling,
                )),
            }
        }
    }
}
