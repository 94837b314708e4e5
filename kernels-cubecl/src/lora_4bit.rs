//! A LoRA projection over a 4-bit base, `x·Wᵀ + (x·A)·(s·B)`, as one Burn operation forward
//! and one backward.
//!
//! The products are those of [`crate::matmul`] and [`crate::low_rank`]; composing them at the
//! tensor level records about a dozen operations a projection (casts and scaling of the f32
//! adapter, reshapes, the products, the backward's add of the two input gradients), and every
//! one costs the host: autodiff bookkeeping, then Burn fusion's thread, which sets the pace of a
//! 7B step without activation checkpointing. Here the host records one. On Hopper the forward
//! and the input gradient are two kernels each (`wgmma::lora_product`): `thin_product` streams
//! the input once for the rank-r hidden (`x·A`, or `g·(s·B)ᵀ`), and the `wgmma` product adds
//! the adapter's term (`h·(s·B)`, or `h'·Aᵀ`) to its accumulator before it rounds; elsewhere
//! the `x·A`- and `h·B`-shaped kernels of [`crate::low_rank`] do, the latter reading the base
//! product's output. The cast of the adapter to the compute dtype takes one small kernel, both
//! matrices in one launch; so does the cast of its gradients back, except on Hopper, where the
//! gradients' kernel (`thin_gradient`) writes an f32 adapter's gradients in f32 itself. The
//! numbers are the composed layer's but for the order of the hidden's sums and that one
//! rounding: the adapter cast to the input's dtype (the scaling applied in f32 first), its
//! gradients in f32 and scaled there (on Hopper never rounded to bf16).

#[cfg(all(feature = "cube", feature = "fusion"))]
use burn::backend::fusion::custom::TensorSpec;
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

    /// [`Self::lora_4bit_linear`] with what [`Self::lora_4bit_linear_keeping`] kept for this
    /// input: the adapter's hidden `input · lora_a`, `lora_aᵀ` and `scaling · lora_b` in the
    /// compute dtype, neither computed nor cast again.
    #[fusion(meta = |input, weight, _lora_a, _lora_b, _scaling, _hidden, _transposed_a, _scaled_b| {
        output_spec(input, weight.shape[0])
    })]
    #[allow(clippy::too_many_arguments)]
    fn lora_4bit_linear_kept(
        input: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scaling: f64,
        hidden: FloatTensor<Self>,
        transposed_a: FloatTensor<Self>,
        scaled_b: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// [`Self::lora_4bit_linear`]'s output, the adapter's hidden `input · lora_a` (`[rows of
    /// input, r]`), `lora_aᵀ` and `scaling · lora_b` (the last three in the compute dtype),
    /// without a graph: for a forward whose layer runs again over the same input (activation
    /// checkpointing's), which then takes the last three.
    #[fusion(meta = |input, weight, lora_a, lora_b, _scaling| {
        let (hidden, transposed_a, scaled_b) = adapter_specs(input, lora_a, lora_b);
        (output_spec(input, weight.shape[0]), hidden, transposed_a, scaled_b)
    })]
    fn lora_4bit_linear_keeping(
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

    /// Zeros in `grad`'s shape whose backward gives the gradients of `lora_4bit_linear(..) ·
    /// grad` without computing the layer's output: `y·grad − stop_gradient(y·grad)` for its
    /// output `y`, the forward only the adapter's hidden. `grad` is a constant of the graph.
    #[fusion(meta = |_input, _weight, _lora_a, _lora_b, _scaling, grad| grad.clone())]
    fn lora_4bit_pullback(
        input: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scaling: f64,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// [`Self::lora_4bit_pullback`] with what the forward kept (see
    /// [`Self::lora_4bit_linear_kept`]): its forward computes nothing.
    #[fusion(meta = |_input, _weight, _lora_a, _lora_b, _scaling, grad, _hidden, _transposed_a, _scaled_b| {
        grad.clone()
    })]
    #[allow(clippy::too_many_arguments)]
    fn lora_4bit_pullback_kept(
        input: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scaling: f64,
        grad: FloatTensor<Self>,
        hidden: FloatTensor<Self>,
        transposed_a: FloatTensor<Self>,
        scaled_b: FloatTensor<Self>,
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
    /// hidden `input · lora_a` (`[rows of input, r]`), `lora_aᵀ` (`[r, cols]`, contiguous) and
    /// `scaling · lora_b` in `input`'s dtype.
    #[fusion(meta = |input, weight, lora_a, lora_b, _scaling| {
        let (hidden, transposed_a, scaled_b) = adapter_specs(input, lora_a, lora_b);
        (output_spec(input, weight.shape[0]), hidden, transposed_a, scaled_b)
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

    /// [`Self::lora_4bit_forward`]'s output from what it kept before (the hidden, `lora_aᵀ`
    /// and `scaling · lora_b`).
    #[fusion(meta = |input, weight, _hidden, _transposed_a, _scaled_b| {
        output_spec(input, weight.shape[0])
    })]
    fn lora_4bit_forward_kept(
        input: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        hidden: FloatTensor<Self>,
        transposed_a: FloatTensor<Self>,
        scaled_b: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// What [`Self::lora_4bit_forward`] gives but the output: the hidden, `lora_aᵀ` and
    /// `scaling · lora_b`, for a backward that needs no output.
    #[fusion(meta = |input, lora_a, lora_b, _scaling| adapter_specs(input, lora_a, lora_b))]
    fn lora_4bit_adapter(
        input: FloatTensor<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scaling: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients of `input`, `lora_a` and `lora_b` (the last two in `adapter_dtype`) from
    /// the output's `grad` and what the forward kept (`transposed_a`, `scaled_b` in the compute
    /// dtype).
    #[fusion(meta = |_grad, input, _hidden, _weight, transposed_a, scaled_b, _scaling, adapter_dtype| {
        gradient_specs(input, transposed_a, scaled_b, *adapter_dtype)
    })]
    #[allow(clippy::too_many_arguments)]
    fn lora_4bit_backward(
        grad: FloatTensor<Self>,
        input: FloatTensor<Self>,
        hidden: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        transposed_a: FloatTensor<Self>,
        scaled_b: FloatTensor<Self>,
        scaling: f64,
        adapter_dtype: DType,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// [`Self::lora_4bit_backward`] with the input's gradient added to `prior`, the sum other
    /// layers already gave the same input (q, k and v share theirs): one rounding, and no add
    /// of the whole input's size after.
    #[fusion(meta = |_grad, input, _hidden, _weight, transposed_a, scaled_b, _scaling, adapter_dtype, _prior| {
        gradient_specs(input, transposed_a, scaled_b, *adapter_dtype)
    })]
    #[allow(clippy::too_many_arguments)]
    fn lora_4bit_backward_adding(
        grad: FloatTensor<Self>,
        input: FloatTensor<Self>,
        hidden: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        transposed_a: FloatTensor<Self>,
        scaled_b: FloatTensor<Self>,
        scaling: f64,
        adapter_dtype: DType,
        prior: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// [`Self::lora_4bit_backward`] without the input's gradient, for an input that needs none
    /// (the first layer's, under frozen embeddings): the gradients of `lora_a` and `lora_b`
    /// alone, so the input gradient's product (the weight's whole size) is never computed.
    #[fusion(meta = |_grad, input, _hidden, scaled_b, _scaling, adapter_dtype| {
        let mut grad_a = spec_in(scaled_b, *adapter_dtype);
        grad_a.shape = Shape::new([input.shape[input.shape.len() - 1], scaled_b.shape[0]]);
        (grad_a, spec_in(scaled_b, *adapter_dtype))
    })]
    fn lora_4bit_adapter_backward(
        grad: FloatTensor<Self>,
        input: FloatTensor<Self>,
        hidden: FloatTensor<Self>,
        scaled_b: FloatTensor<Self>,
        scaling: f64,
        adapter_dtype: DType,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// The layer's output as fusion records it: `input`'s spec with `rows` output features.
#[cfg(all(feature = "cube", feature = "fusion"))]
fn output_spec(input: &TensorSpec, rows: usize) -> TensorSpec {
    let mut spec = input.clone();
    let last = spec.shape.len() - 1;
    spec.shape[last] = rows;
    spec
}

/// The adapter's tensors as fusion records them: the hidden `[rows of input, r]`, `lora_aᵀ`
/// `[r, cols]` and `scaling · lora_b`, in `input`'s dtype.
#[cfg(all(feature = "cube", feature = "fusion"))]
fn adapter_specs(
    input: &TensorSpec,
    lora_a: &TensorSpec,
    lora_b: &TensorSpec,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    let rows = input.shape.num_elements() / input.shape[input.shape.len() - 1];
    let [cols, rank] = [lora_a.shape[0], lora_a.shape[1]];
    let mut hidden = input.clone();
    hidden.shape = Shape::new([rows, rank]);
    let mut transposed_a = spec_in(lora_a, input.dtype);
    transposed_a.shape = Shape::new([rank, cols]);
    (hidden, transposed_a, spec_in(lora_b, input.dtype))
}

/// The backward's gradients as fusion records them: the input's spec, `A`'s (`transposed_a`
/// transposed) and `B`'s (`scaled_b`'s shape), the last two in `adapter_dtype`.
#[cfg(all(feature = "cube", feature = "fusion"))]
fn gradient_specs(
    input: &TensorSpec,
    transposed_a: &TensorSpec,
    scaled_b: &TensorSpec,
    adapter_dtype: DType,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    let mut grad_a = spec_in(transposed_a, adapter_dtype);
    grad_a.shape = Shape::new([transposed_a.shape[1], transposed_a.shape[0]]);
    (input.clone(), grad_a, spec_in(scaled_b, adapter_dtype))
}

/// `spec` in `dtype`.
#[cfg(all(feature = "cube", feature = "fusion"))]
fn spec_in(spec: &TensorSpec, dtype: DType) -> TensorSpec {
    let mut spec = spec.clone();
    spec.dtype = dtype;
    spec
}

/// `input · Wᵀ + (input · lora_a) · (scaling · lora_b)` over `input`'s last dimension, for this
/// frozen `[out_features, in_features]` 4-bit weight and a trainable adapter in Burn's layout
/// (`lora_a` `[in_features, r]`, `lora_b` `[r, out_features]`, any float dtype: the products
/// run in `input`'s). A LoRA layer's forward without dropout, as one operation each way.
///
/// `kept`, where given, is what [`lora_4bit_linear_keeping`] returned for this very input and
/// adapter (a checkpointed layer's recomputation over its first forward's input): taken instead
/// of computed again.
pub fn lora_4bit_linear<const D: usize>(
    input: Tensor<D>,
    weight: &Packed4bit,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    scaling: f64,
    kept: Option<KeptAdapter>,
) -> Result<Tensor<D>, QuantError> {
    check_adapter(&input, weight, &lora_a, &lora_b)?;
    check_kept(&input, weight, &lora_a, kept.as_ref())?;
    let primitive = weight.primitive()?;
    let (input, lora_a, lora_b) = (
        input.into_dispatch(),
        lora_a.into_dispatch(),
        lora_b.into_dispatch(),
    );
    Ok(Tensor::from_dispatch(match kept {
        Some(kept) => Dispatch::lora_4bit_linear_kept(
            input,
            primitive,
            lora_a,
            lora_b,
            scaling,
            kept.hidden.into_dispatch(),
            kept.transposed_a.into_dispatch(),
            kept.scaled_b.into_dispatch(),
        ),
        None => Dispatch::lora_4bit_linear(input, primitive, lora_a, lora_b, scaling),
    }))
}

/// What a LoRA projection's forward without a graph keeps for its recomputation over the same
/// input (activation checkpointing's): the adapter's hidden and the adapter in the compute
/// dtype, so that the recomputation neither reads the input for the hidden nor casts the
/// adapter again. Valid while the adapter's parameters stay as they were.
#[derive(Clone, Debug)]
pub struct KeptAdapter {
    /// `input · lora_a`, `[rows of input, r]` (flattened over the leading dimensions).
    pub hidden: Tensor<2>,
    /// `lora_aᵀ`, `[r, in_features]`.
    pub transposed_a: Tensor<2>,
    /// `scaling · lora_b`, `[r, out_features]`.
    pub scaled_b: Tensor<2>,
}

/// [`lora_4bit_linear`]'s output and what its recomputation over the same input can take
/// instead of computing ([`KeptAdapter`], in `input`'s dtype), with no graph recorded: the
/// forward of a layer that runs again.
pub fn lora_4bit_linear_keeping<const D: usize>(
    input: Tensor<D>,
    weight: &Packed4bit,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    scaling: f64,
) -> Result<(Tensor<D>, KeptAdapter), QuantError> {
    check_adapter(&input, weight, &lora_a, &lora_b)?;
    let primitive = weight.primitive()?;
    let (output, hidden, transposed_a, scaled_b) = Dispatch::lora_4bit_linear_keeping(
        input.into_dispatch(),
        primitive,
        lora_a.into_dispatch(),
        lora_b.into_dispatch(),
        scaling,
    );
    let kept = KeptAdapter {
        hidden: Tensor::from_dispatch(hidden),
        transposed_a: Tensor::from_dispatch(transposed_a),
        scaled_b: Tensor::from_dispatch(scaled_b),
    };
    Ok((Tensor::from_dispatch(output), kept))
}

/// Zeros in `grad`'s shape whose backward gives the gradients (of `input`, `lora_a` and
/// `lora_b`) of `lora_4bit_linear(input, ..) · grad`, the layer's vector-Jacobian product for
/// `grad`, without the base product's forward: for a backward that needs a layer's gradients
/// but never its output, as activation checkpointing's recomputed last projection of a block
/// (its output reaches only the block's output, whose gradient is known). `grad`, the output's
/// gradient, gets none itself. `kept` as for [`lora_4bit_linear`].
pub fn lora_4bit_pullback<const D: usize>(
    input: Tensor<D>,
    weight: &Packed4bit,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    scaling: f64,
    grad: Tensor<D>,
    kept: Option<KeptAdapter>,
) -> Result<Tensor<D>, QuantError> {
    check_adapter(&input, weight, &lora_a, &lora_b)?;
    check_kept(&input, weight, &lora_a, kept.as_ref())?;
    let mut output_dims = input.dims();
    output_dims[D - 1] = weight.matrix_shape("LoRA linear")?[0];
    let what = "the gradient (the layer's output's)";
    check_fits("LoRA pullback", what, &grad, output_dims, input.dtype())?;
    let primitive = weight.primitive()?;
    let (input, lora_a, lora_b, grad) = (
        input.into_dispatch(),
        lora_a.into_dispatch(),
        lora_b.into_dispatch(),
        grad.into_dispatch(),
    );
    Ok(Tensor::from_dispatch(match kept {
        Some(kept) => Dispatch::lora_4bit_pullback_kept(
            input,
            primitive,
            lora_a,
            lora_b,
            scaling,
            grad,
            kept.hidden.into_dispatch(),
            kept.transposed_a.into_dispatch(),
            kept.scaled_b.into_dispatch(),
        ),
        None => Dispatch::lora_4bit_pullback(input, primitive, lora_a, lora_b, scaling, grad),
    }))
}

/// That what a forward kept fits this input, weight and adapter: the hidden `[rows of input,
/// r]`, `lora_aᵀ` `[r, in_features]` and `scaling · lora_b` `[r, out_features]`, each in
/// `input`'s dtype.
fn check_kept<const D: usize>(
    input: &Tensor<D>,
    weight: &Packed4bit,
    lora_a: &Tensor<2>,
    kept: Option<&KeptAdapter>,
) -> Result<(), QuantError> {
    let Some(kept) = kept else {
        return Ok(());
    };
    let dims = input.dims();
    let [out_features, in_features] = weight.matrix_shape("LoRA linear")?;
    let rank = lora_a.dims()[1];
    let expected = [
        (
            "the kept hidden",
            &kept.hidden,
            [dims[..D - 1].iter().product(), rank],
        ),
        ("the kept lora_aᵀ", &kept.transposed_a, [rank, in_features]),
        (
            "the kept scaling · lora_b",
            &kept.scaled_b,
            [rank, out_features],
        ),
    ];
    for (name, tensor, shape) in expected {
        check_fits("LoRA kept adapter", name, tensor, shape, input.dtype())?;
    }
    Ok(())
}

/// That `tensor` is `shape` in `dtype`; else an error for `what` naming it as `name`.
fn check_fits<const D: usize>(
    what: &str,
    name: &str,
    tensor: &Tensor<D>,
    shape: [usize; D],
    dtype: DType,
) -> Result<(), QuantError> {
    if tensor.dims() == shape && tensor.dtype() == dtype {
        return Ok(());
    }
    Err(QuantError::Format {
        what: what.into(),
        detail: format!(
            "{name} is {:?} {:?}, expected {shape:?} {dtype:?}",
            tensor.dims(),
            tensor.dtype()
        ),
    })
}

/// That `input` and the adapter (`lora_a` `[in_features, r]`, `lora_b` `[r, out_features]`, one
/// dtype) fit the weight.
fn check_adapter<const D: usize>(
    input: &Tensor<D>,
    weight: &Packed4bit,
    lora_a: &Tensor<2>,
    lora_b: &Tensor<2>,
) -> Result<(), QuantError> {
    weight.check_input(input, true)?;
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
    Ok(())
}

/// [`LoraPass::adapter_gradients`] as the backend's products and the cast.
fn composed_adapter_gradients<B: LoraPass>(
    grad: FloatTensor<B>,
    input: FloatTensor<B>,
    hidden: FloatTensor<B>,
    grad_hidden: FloatTensor<B>,
    scaling: f64,
    adapter_dtype: DType,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let grad_a = B::low_rank_gradient(input, grad_hidden);
    let grad_b = B::float_transpose(B::low_rank_gradient(grad, hidden));
    B::cast_adapter(grad_a, grad_b, scaling, adapter_dtype)
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

    /// `xᵀ·h'` for `A` and `s·(hᵀ·g)ᵀ` for `B` in `adapter_dtype`, from the flat output gradient
    /// `grad` `[rows, out]`, the flat `input` `[rows, in]`, the hidden `h` and the gradient's
    /// hidden `h'`: by default the two products, then the cast of both in one launch.
    fn adapter_gradients(
        grad: FloatTensor<Self>,
        input: FloatTensor<Self>,
        hidden: FloatTensor<Self>,
        grad_hidden: FloatTensor<Self>,
        scaling: f64,
        adapter_dtype: DType,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_adapter_gradients::<Self>(grad, input, hidden, grad_hidden, scaling, adapter_dtype)
    }

    /// A LoRA layer's product and its hidden: `lhs · Wᵀ` (`transpose`) or `lhs · W`, plus
    /// `(lhs · downᵀ) · up` and `prior` (where given), and `lhs · downᵀ` (`hidden` where
    /// given), for a `[rows, k]` `lhs`, `down` `[r, k]` and `up` `[r, n]`.
    #[allow(clippy::too_many_arguments)]
    fn lora_product(
        lhs: FloatTensor<Self>,
        weight: Weight4bitPrimitive<Self>,
        transpose: bool,
        down: FloatTensor<Self>,
        up: FloatTensor<Self>,
        hidden: Option<FloatTensor<Self>>,
        prior: Option<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (output, hidden) = composed_lora_product::<Self>(lhs, down, up, hidden, |lhs| {
            Self::matmul_4bit(lhs, weight, transpose)
        });
        (plus::<Self>(output, prior), hidden)
    }

    /// [`Self::lora_product`]'s hidden alone: `lhs · downᵀ`.
    fn lora_hidden(lhs: FloatTensor<Self>, down: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::low_rank_down(lhs, Self::float_transpose(down))
    }
}

/// `tensor + prior`, or `tensor` without one.
fn plus<B: Backend>(tensor: FloatTensor<B>, prior: Option<FloatTensor<B>>) -> FloatTensor<B> {
    match prior {
        Some(prior) => B::float_add(tensor, prior),
        None => tensor,
    }
}

/// [`LoraPass::lora_product`] as the separate kernels: `x·A`-shaped (unless `hidden` is
/// given), then `base` (the 4-bit product) and the `h·B`-shaped kernel adding the term to its
/// output.
fn composed_lora_product<B: LowRankOps>(
    lhs: FloatTensor<B>,
    down: FloatTensor<B>,
    up: FloatTensor<B>,
    hidden: Option<FloatTensor<B>>,
    base: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let hidden = hidden.unwrap_or_else(|| B::low_rank_down(lhs.clone(), B::float_transpose(down)));
    let output = B::low_rank_up_add(base(lhs), hidden.clone(), up);
    (output, hidden)
}

/// `lora_aᵀ` and `scaling · lora_b` in `dtype`, as the products read the adapter.
fn cast<B: LoraPass>(
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    scaling: f64,
    dtype: DType,
) -> (FloatTensor<B>, FloatTensor<B>) {
    B::cast_adapter(B::float_transpose(lora_a), lora_b, scaling, dtype)
}

/// [`Lora4bitPassOps::lora_4bit_forward`] through the backend's products: the output, the
/// hidden (computed unless given), `lora_aᵀ` and `scaling · lora_b` (cast unless given with the
/// hidden).
#[allow(clippy::type_complexity)]
fn forward<B: LoraPass>(
    input: FloatTensor<B>,
    weight: Weight4bitPrimitive<B>,
    adapter: Adapter<B>,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
) {
    let mut dims = input.shape();
    let (hidden, transposed_a, scaled_b) = match adapter {
        Adapter::Parameters(lora_a, lora_b, scaling) => {
            let (transposed_a, scaled_b) = cast::<B>(lora_a, lora_b, scaling, input.dtype());
            (None, transposed_a, scaled_b)
        }
        Adapter::Kept(hidden, transposed_a, scaled_b) => (Some(hidden), transposed_a, scaled_b),
    };
    let input = flat_rows::<B>(input);
    let (output, hidden) = B::lora_product(
        input,
        weight,
        true,
        transposed_a.clone(),
        scaled_b.clone(),
        hidden,
        None,
    );
    let last = dims.num_dims() - 1;
    dims[last] = output.shape()[1];
    (
        B::float_reshape(output, dims),
        hidden,
        transposed_a,
        scaled_b,
    )
}

/// The adapter as [`forward`] takes it.
enum Adapter<B: Backend> {
    /// `lora_a`, `lora_b` and the scaling, as the layer holds them.
    Parameters(FloatTensor<B>, FloatTensor<B>, f64),
    /// The hidden for this input, `lora_aᵀ` and `scaling · lora_b` in the compute dtype.
    Kept(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
}

/// [`Lora4bitPassOps::lora_4bit_adapter`]: [`forward`] but the base product.
fn adapter<B: LoraPass>(
    input: FloatTensor<B>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    scaling: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (transposed_a, scaled_b) = cast::<B>(lora_a, lora_b, scaling, input.dtype());
    let hidden = B::lora_hidden(flat_rows::<B>(input), transposed_a.clone());
    (hidden, transposed_a, scaled_b)
}

/// [`Lora4bitPassOps::lora_4bit_backward`] through the backend's products: `g·W + (g·(s·B)ᵀ)·Aᵀ`
/// for the input (plus `prior`, flat, where given), `xᵀ·(g·(s·B)ᵀ)` for `A` and `s·(hᵀ·g)` for
/// `B`.
#[allow(clippy::too_many_arguments)]
fn backward<B: LoraPass>(
    grad: FloatTensor<B>,
    input: FloatTensor<B>,
    hidden: FloatTensor<B>,
    weight: Weight4bitPrimitive<B>,
    transposed_a: FloatTensor<B>,
    scaled_b: FloatTensor<B>,
    scaling: f64,
    adapter_dtype: DType,
    prior: Option<FloatTensor<B>>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let dims = input.shape();
    let grad = flat_rows::<B>(grad);
    let prior = prior.map(flat_rows::<B>);
    let (grad_input, grad_hidden) = B::lora_product(
        grad.clone(),
        weight,
        false,
        scaled_b,
        transposed_a,
        None,
        prior,
    );
    let input = flat_rows::<B>(input);
    let (grad_a, grad_b) =
        B::adapter_gradients(grad, input, hidden, grad_hidden, scaling, adapter_dtype);
    (B::float_reshape(grad_input, dims), grad_a, grad_b)
}

/// [`Lora4bitPassOps::lora_4bit_adapter_backward`]: [`backward`] but the input's gradient, the
/// hidden `g·(s·B)ᵀ` by the kernel [`LoraPass::lora_product`] computes it with.
fn adapter_backward<B: LoraPass>(
    grad: FloatTensor<B>,
    input: FloatTensor<B>,
    hidden: FloatTensor<B>,
    scaled_b: FloatTensor<B>,
    scaling: f64,
    adapter_dtype: DType,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let grad = flat_rows::<B>(grad);
    let grad_hidden = B::lora_hidden(grad.clone(), scaled_b);
    let input = flat_rows::<B>(input);
    B::adapter_gradients(grad, input, hidden, grad_hidden, scaling, adapter_dtype)
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
                let adapter = Adapter::Parameters(lora_a, lora_b, scaling);
                forward::<Self>(input, weight, adapter).0
            }

            #[allow(clippy::too_many_arguments)]
            fn lora_4bit_linear_kept(
                input: $tensor,
                weight: Weight4bitPrimitive<Self>,
                _lora_a: $tensor,
                _lora_b: $tensor,
                _scaling: f64,
                hidden: $tensor,
                transposed_a: $tensor,
                scaled_b: $tensor,
            ) -> $tensor {
                Self::lora_4bit_forward_kept(input, weight, hidden, transposed_a, scaled_b)
            }

            fn lora_4bit_linear_keeping(
                input: $tensor,
                weight: Weight4bitPrimitive<Self>,
                lora_a: $tensor,
                lora_b: $tensor,
                scaling: f64,
            ) -> ($tensor, $tensor, $tensor, $tensor) {
                Self::lora_4bit_forward(input, weight, lora_a, lora_b, scaling)
            }

            /// Without a graph there is no gradient to give: the zeros alone.
            fn lora_4bit_pullback(
                _input: $tensor,
                _weight: Weight4bitPrimitive<Self>,
                _lora_a: $tensor,
                _lora_b: $tensor,
                _scaling: f64,
                grad: $tensor,
            ) -> $tensor {
                Self::float_zeros(grad.shape(), &grad.device(), grad.dtype().into())
            }

            #[allow(clippy::too_many_arguments)]
            fn lora_4bit_pullback_kept(
                _input: $tensor,
                _weight: Weight4bitPrimitive<Self>,
                _lora_a: $tensor,
                _lora_b: $tensor,
                _scaling: f64,
                grad: $tensor,
                _hidden: $tensor,
                _transposed_a: $tensor,
                _scaled_b: $tensor,
            ) -> $tensor {
                Self::float_zeros(grad.shape(), &grad.device(), grad.dtype().into())
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
                let adapter = Adapter::Parameters(lora_a, lora_b, scaling);
                forward::<Self>(input, weight, adapter)
            }

            fn lora_4bit_forward_kept(
                input: $tensor,
                weight: Weight4bitPrimitive<Self>,
                hidden: $tensor,
                transposed_a: $tensor,
                scaled_b: $tensor,
            ) -> $tensor {
                let adapter = Adapter::Kept(hidden, transposed_a, scaled_b);
                forward::<Self>(input, weight, adapter).0
            }

            fn lora_4bit_adapter(
                input: $tensor,
                lora_a: $tensor,
                lora_b: $tensor,
                scaling: f64,
            ) -> ($tensor, $tensor, $tensor) {
                adapter::<Self>(input, lora_a, lora_b, scaling)
            }

            #[allow(clippy::too_many_arguments)]
            fn lora_4bit_backward(
                grad: $tensor,
                input: $tensor,
                hidden: $tensor,
                weight: Weight4bitPrimitive<Self>,
                transposed_a: $tensor,
                scaled_b: $tensor,
                scaling: f64,
                adapter_dtype: burn::tensor::DType,
            ) -> ($tensor, $tensor, $tensor) {
                backward::<Self>(
                    grad,
                    input,
                    hidden,
                    weight,
                    transposed_a,
                    scaled_b,
                    scaling,
                    adapter_dtype,
                    None,
                )
            }

            #[allow(clippy::too_many_arguments)]
            fn lora_4bit_backward_adding(
                grad: $tensor,
                input: $tensor,
                hidden: $tensor,
                weight: Weight4bitPrimitive<Self>,
                transposed_a: $tensor,
                scaled_b: $tensor,
                scaling: f64,
                adapter_dtype: burn::tensor::DType,
                prior: $tensor,
            ) -> ($tensor, $tensor, $tensor) {
                backward::<Self>(
                    grad,
                    input,
                    hidden,
                    weight,
                    transposed_a,
                    scaled_b,
                    scaling,
                    adapter_dtype,
                    Some(prior),
                )
            }

            fn lora_4bit_adapter_backward(
                grad: $tensor,
                input: $tensor,
                hidden: $tensor,
                scaled_b: $tensor,
                scaling: f64,
                adapter_dtype: burn::tensor::DType,
            ) -> ($tensor, $tensor) {
                adapter_backward::<Self>(grad, input, hidden, scaled_b, scaling, adapter_dtype)
            }
        }
    };
}
use impl_lora_4bit_ops;

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::DType;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::{
        Adapter, Lora4bitOps, Lora4bitPassOps, LoraPass, adapter, adapter_backward, backward,
        forward,
    };
    use crate::extension::{empty_output, launch_dims};
    use crate::low_rank::LowRankOps;
    use crate::low_rank::cube::thin_weight;
    use crate::matmul::{Matmul4bitOps, Weight4bitPrimitive};

    super::impl_lora_4bit_ops!(CubeBackend, CubeTensor);

    impl LoraPass for CubeBackend {
        fn cast_adapter(
            first: CubeTensor,
            second: CubeTensor,
            scale: f64,
            dtype: DType,
        ) -> (CubeTensor, CubeTensor) {
            // The forward's `Aᵀ` and the backward's gradient of B are transposes of contiguous
            // matrices: read in place, written contiguous in their own shape.
            let first_shape: [usize; 2] = first.shape().dims();
            let second_shape: [usize; 2] = second.shape().dims();
            let (first, first_transposed) = thin_weight(first);
            let (second, second_transposed) = thin_weight(second);
            let first_out = empty_output(&first, first_shape, dtype);
            let second_out = empty_output(&second, second_shape, dtype);
            let first_len = first_shape[0] * first_shape[1];
            let second_len = second_shape[0] * second_shape[1];
            let (cube_count, cube_dim) = launch_dims(&first_out, first_len + second_len);
            let (input_dtype, output_dtype) = (first.dtype, dtype);
            // SAFETY: one unit per element of either output, guarded by the two lengths; a
            // transposed input is read at the mirrored index of its storage.
            unsafe {
                cast_adapter_kernel::launch_unchecked(
                    &first_out.client,
                    cube_count,
                    cube_dim,
                    first.into_buffer_arg(),
                    second.into_buffer_arg(),
                    first_out.clone().into_buffer_arg(),
                    second_out.clone().into_buffer_arg(),
                    first_shape[0],
                    first_shape[1],
                    second_shape[0],
                    second_shape[1],
                    scale as f32,
                    first_transposed,
                    second_transposed,
                    dtype_to_storage_type(input_dtype),
                    dtype_to_storage_type(output_dtype),
                );
            }
            (first_out, second_out)
        }

        /// On Hopper, for f32 adapters: each gradient as one `thin_gradient` launch writing
        /// the f32 sums, scaled, in the adapter's own layout (B's transposed), never rounded to
        /// bf16 and with no cast after.
        fn adapter_gradients(
            grad: CubeTensor,
            input: CubeTensor,
            hidden: CubeTensor,
            grad_hidden: CubeTensor,
            scaling: f64,
            adapter_dtype: DType,
        ) -> (CubeTensor, CubeTensor) {
            let [grad, input, hidden, grad_hidden] =
                [grad, input, hidden, grad_hidden].map(into_contiguous);
            #[cfg(feature = "cuda")]
            {
                use crate::thin_product::{scaled_gradient, takes_gradient};
                if adapter_dtype == DType::F32
                    && takes_gradient(&input, &grad_hidden)
                    && takes_gradient(&grad, &hidden)
                {
                    return (
                        scaled_gradient(&input, &grad_hidden, 1.0, false),
                        scaled_gradient(&grad, &hidden, scaling as f32, true),
                    );
                }
            }
            super::composed_adapter_gradients::<Self>(
                grad,
                input,
                hidden,
                grad_hidden,
                scaling,
                adapter_dtype,
            )
        }

        /// The `wgmma` kernel with the weight dequantized inside it (`wgmma_4bit`) where it
        /// applies, else the `wgmma` kernel over the dense weight; both add the adapter's term
        /// on their accumulator (its hidden from `thin_product`, where not given). Elsewhere
        /// the separate kernels.
        #[allow(clippy::too_many_arguments)]
        fn lora_product(
            lhs: CubeTensor,
            weight: Weight4bitPrimitive<Self>,
            transpose: bool,
            down: CubeTensor,
            up: CubeTensor,
            hidden: Option<CubeTensor>,
            prior: Option<CubeTensor>,
        ) -> (CubeTensor, CubeTensor) {
            #[cfg(feature = "cuda")]
            if lhs.shape()[0] > crate::matmul::cube::MATVEC_MAX_ROWS && lhs.dtype() == DType::BF16 {
                let mut prior = prior;
                let adapter = crate::wgmma::Adapter {
                    down: &down,
                    up: &up,
                    hidden: hidden.as_ref(),
                };
                if let Some((out, Some(hidden))) =
                    crate::wgmma_4bit::product(&lhs, &weight, transpose, Some(adapter))
                {
                    return (super::plus::<Self>(out, prior), hidden);
                }
                let dense = crate::matmul::cube::dequantized(weight, lhs.dtype());
                let rhs = crate::matmul::oriented::<Self>(dense, transpose);
                if let Some((out, hidden)) =
                    crate::wgmma::lora_product(&lhs, &rhs, adapter, &mut prior)
                {
                    return (super::plus::<Self>(out, prior), hidden);
                }
                let (out, hidden) =
                    super::composed_lora_product::<Self>(lhs, down, up, hidden, |lhs| {
                        crate::matmul::cube::dense_product(lhs, rhs)
                    });
                return (super::plus::<Self>(out, prior), hidden);
            }
            let (out, hidden) =
                super::composed_lora_product::<Self>(lhs, down, up, hidden, |lhs| {
                    Self::matmul_4bit(lhs, weight, transpose)
                });
            (super::plus::<Self>(out, prior), hidden)
        }

        /// `thin_product`, as [`Self::lora_product`] takes it, where it applies.
        fn lora_hidden(lhs: CubeTensor, down: CubeTensor) -> CubeTensor {
            #[cfg(feature = "cuda")]
            if lhs.shape()[0] > crate::matmul::cube::MATVEC_MAX_ROWS
                && let Some(hidden) = crate::wgmma::lora_hidden(&lhs, &down)
            {
                return hidden;
            }
            Self::low_rank_down(lhs, Self::float_transpose(down))
        }
    }

    /// `first_out = first` and `second_out = scale · second`, converted to `O` and written
    /// contiguous: the units past `first`'s elements take `second`'s. A `transposed` input of
    /// shape `[rows, cols]` is stored `[cols, rows]`.
    #[allow(clippy::too_many_arguments)]
    #[cube(launch_unchecked)]
    fn cast_adapter_kernel<I: Float, O: Float>(
        first: &[I],
        second: &[I],
        first_out: &mut [O],
        second_out: &mut [O],
        first_rows: usize,
        first_cols: usize,
        second_rows: usize,
        second_cols: usize,
        scale: f32,
        #[comptime] first_transposed: bool,
        #[comptime] second_transposed: bool,
        #[define(I)] _input: ElemType,
        #[define(O)] _output: ElemType,
    ) {
        let index = ABSOLUTE_POS;
        let first_len = first_rows * first_cols;
        if index < first_len {
            let source = stored_index(index, first_rows, first_cols, first_transposed);
            first_out[index] = O::cast_from(f32::cast_from(first[source]));
        } else if index < first_len + second_rows * second_cols {
            let position = index - first_len;
            let source = stored_index(position, second_rows, second_cols, second_transposed);
            second_out[position] = O::cast_from(f32::cast_from(second[source]) * scale);
        }
    }

    /// Where element `position` (row-major) of a `[rows, cols]` matrix is stored.
    #[cube]
    fn stored_index(
        position: usize,
        rows: usize,
        cols: usize,
        #[comptime] transposed: bool,
    ) -> usize {
        if comptime![transposed] {
            (position % cols) * rows + position / cols
        } else {
            position
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::{Flex, TensorMetadata};
    use burn::tensor::DType;

    use super::{
        Adapter, Lora4bitOps, Lora4bitPassOps, LoraPass, adapter, adapter_backward, backward,
        forward,
    };
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
    use burn::backend::AutodiffBackend;
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

    /// What the backward needs: the input (its value, and its node: the backward adds the input
    /// gradient to what its other consumers gave it), what the forward kept in the compute
    /// dtype (the adapter's hidden `[rows, r]`, `Aᵀ` and `s·B`: a few rows each), the frozen
    /// weight, the scaling and the adapter's own dtype.
    #[derive(Debug, Clone)]
    struct State<B: Lora4bitPassOps> {
        input: FloatTensor<Autodiff<B>>,
        hidden: FloatTensor<B>,
        transposed_a: FloatTensor<B>,
        scaled_b: FloatTensor<B>,
        weight: Weight4bitPrimitive<B>,
        scaling: f64,
        adapter_dtype: DType,
    }

    impl<B: Lora4bitPassOps> State<B> {
        /// The state from the input and the forward's `(hidden, transposed_a, scaled_b)`.
        fn new(
            input: FloatTensor<Autodiff<B>>,
            (hidden, transposed_a, scaled_b): (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
            weight: Weight4bitPrimitive<B>,
            scaling: f64,
            adapter_dtype: DType,
        ) -> Self {
            Self {
                input,
                hidden,
                transposed_a,
                scaled_b,
                weight,
                scaling,
                adapter_dtype,
            }
        }
    }

    #[derive(Debug)]
    struct Lora4bitBackward;

    impl<B: Lora4bitPassOps> Backward<B, 3> for Lora4bitBackward {
        type State = State<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = grads.consume::<B>(&ops.node);
            let parents = ops.parents.map(|node| node.map(|node| node.id));
            register_gradients(ops.state, parents, grad, grads);
        }
    }

    /// The pullback's backward: the layer's, for the output gradient it was given (times the
    /// zeros' own, ones when they are what the backward started from).
    #[derive(Debug)]
    struct Lora4bitPullbackBackward;

    impl<B: Lora4bitPassOps> Backward<B, 3> for Lora4bitPullbackBackward {
        type State = (State<B>, FloatTensor<B>);

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let (state, output_grad) = ops.state;
            let grad = B::float_mul(grads.consume::<B>(&ops.node), output_grad);
            let parents = ops.parents.map(|node| node.map(|node| node.id));
            register_gradients(state, parents, grad, grads);
        }
    }

    /// The gradients of the input and the adapter for the output's `grad`, registered for the
    /// parents that are tracked (a frozen adapter drops its own). One launch sequence gives all
    /// three; an input that is not tracked (the embeddings' output, under frozen embeddings)
    /// skips its gradient's product, and one whose other consumers gave it a gradient already
    /// (q, k and v share their input) gets the sum from the product's kernel.
    fn register_gradients<B: Lora4bitPassOps>(
        state: State<B>,
        parents: [Option<NodeId>; 3],
        grad: FloatTensor<B>,
        grads: &mut Gradients,
    ) {
        let prior = parents[0].and_then(|_| grads.remove::<B>(&state.input));
        let input = state.input.into_primitive();
        if parents[0].is_none() {
            let (of_a, of_b) = B::lora_4bit_adapter_backward(
                grad,
                input,
                state.hidden,
                state.scaled_b,
                state.scaling,
                state.adapter_dtype,
            );
            for (node, of) in parents[1..].iter().zip([of_a, of_b]) {
                if let Some(node) = node {
                    grads.register::<B>(*node, of);
                }
            }
            return;
        }
        let (of_input, of_a, of_b) = match prior {
            Some(prior) => B::lora_4bit_backward_adding(
                grad,
                input,
                state.hidden,
                state.weight,
                state.transposed_a,
                state.scaled_b,
                state.scaling,
                state.adapter_dtype,
                prior,
            ),
            None => B::lora_4bit_backward(
                grad,
                input,
                state.hidden,
                state.weight,
                state.transposed_a,
                state.scaled_b,
                state.scaling,
                state.adapter_dtype,
            ),
        };
        for (node, of) in parents.into_iter().zip([of_input, of_a, of_b]) {
            if let Some(node) = node {
                grads.register::<B>(node, of);
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
            linear::<B, C>(input, weight, lora_a, lora_b, scaling, None)
        }

        #[allow(clippy::too_many_arguments)]
        fn lora_4bit_linear_kept(
            input: FloatTensor<Self>,
            weight: Weight4bitPrimitive<Self>,
            lora_a: FloatTensor<Self>,
            lora_b: FloatTensor<Self>,
            scaling: f64,
            hidden: FloatTensor<Self>,
            transposed_a: FloatTensor<Self>,
            scaled_b: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let kept = inner_kept::<B, C>(hidden, transposed_a, scaled_b);
            linear::<B, C>(input, weight, lora_a, lora_b, scaling, Some(kept))
        }

        /// Every result untracked, whatever the inputs: the forward of a layer that runs again.
        fn lora_4bit_linear_keeping(
            input: FloatTensor<Self>,
            weight: Weight4bitPrimitive<Self>,
            lora_a: FloatTensor<Self>,
            lora_b: FloatTensor<Self>,
            scaling: f64,
        ) -> (
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
        ) {
            let (output, hidden, transposed_a, scaled_b) = B::lora_4bit_linear_keeping(
                input.into_primitive(),
                weight.into_inner(),
                lora_a.into_primitive(),
                lora_b.into_primitive(),
                scaling,
            );
            (
                Self::from_inner(output),
                Self::from_inner(hidden),
                Self::from_inner(transposed_a),
                Self::from_inner(scaled_b),
            )
        }

        fn lora_4bit_pullback(
            input: FloatTensor<Self>,
            weight: Weight4bitPrimitive<Self>,
            lora_a: FloatTensor<Self>,
            lora_b: FloatTensor<Self>,
            scaling: f64,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            pullback::<B, C>(input, weight, lora_a, lora_b, scaling, grad, None)
        }

        #[allow(clippy::too_many_arguments)]
        fn lora_4bit_pullback_kept(
            input: FloatTensor<Self>,
            weight: Weight4bitPrimitive<Self>,
            lora_a: FloatTensor<Self>,
            lora_b: FloatTensor<Self>,
            scaling: f64,
            grad: FloatTensor<Self>,
            hidden: FloatTensor<Self>,
            transposed_a: FloatTensor<Self>,
            scaled_b: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let kept = inner_kept::<B, C>(hidden, transposed_a, scaled_b);
            pullback::<B, C>(input, weight, lora_a, lora_b, scaling, grad, Some(kept))
        }
    }

    /// What a forward kept (the hidden, `lora_aᵀ`, `scaling · lora_b`), on the inner backend:
    /// constants of the graph.
    type Kept<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn inner_kept<B: Lora4bitPassOps, C: CheckpointStrategy>(
        hidden: FloatTensor<Autodiff<B, C>>,
        transposed_a: FloatTensor<Autodiff<B, C>>,
        scaled_b: FloatTensor<Autodiff<B, C>>,
    ) -> Kept<B> {
        (
            hidden.into_primitive(),
            transposed_a.into_primitive(),
            scaled_b.into_primitive(),
        )
    }

    /// The layer's output, recording its backward where anything is tracked; the adapter's
    /// hidden and cast computed unless `kept` gives them.
    fn linear<B, C>(
        input: FloatTensor<Autodiff<B, C>>,
        weight: Weight4bitPrimitive<Autodiff<B, C>>,
        lora_a: FloatTensor<Autodiff<B, C>>,
        lora_b: FloatTensor<Autodiff<B, C>>,
        scaling: f64,
        kept: Option<Kept<B>>,
    ) -> FloatTensor<Autodiff<B, C>>
    where
        B: Lora4bitOps + Lora4bitPassOps,
        C: CheckpointStrategy,
    {
        let weight = weight.into_inner();
        match Lora4bitBackward
            .prepare::<C>([input.node(), lora_a.node(), lora_b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let kept_input = input.clone();
                let adapter_dtype = lora_a.dtype();
                let (input, lora_a, lora_b) = (
                    input.into_primitive(),
                    lora_a.into_primitive(),
                    lora_b.into_primitive(),
                );
                let (output, kept) = match kept {
                    Some(kept) => {
                        let (hidden, transposed_a, scaled_b) = kept.clone();
                        let output = B::lora_4bit_forward_kept(
                            input,
                            weight.clone(),
                            hidden,
                            transposed_a,
                            scaled_b,
                        );
                        (output, kept)
                    }
                    None => {
                        let (output, hidden, transposed_a, scaled_b) =
                            B::lora_4bit_forward(input, weight.clone(), lora_a, lora_b, scaling);
                        (output, (hidden, transposed_a, scaled_b))
                    }
                };
                let state = State::new(kept_input, kept, weight, scaling, adapter_dtype);
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => {
                let (input, lora_a, lora_b) = (
                    input.into_primitive(),
                    lora_a.into_primitive(),
                    lora_b.into_primitive(),
                );
                prep.finish(match kept {
                    Some((hidden, transposed_a, scaled_b)) => B::lora_4bit_linear_kept(
                        input,
                        weight,
                        lora_a,
                        lora_b,
                        scaling,
                        hidden,
                        transposed_a,
                        scaled_b,
                    ),
                    None => B::lora_4bit_linear(input, weight, lora_a, lora_b, scaling),
                })
            }
        }
    }

    /// The pullback's zeros, recording its backward where anything is tracked; the adapter's
    /// hidden and cast computed unless `kept` gives them.
    fn pullback<B, C>(
        input: FloatTensor<Autodiff<B, C>>,
        weight: Weight4bitPrimitive<Autodiff<B, C>>,
        lora_a: FloatTensor<Autodiff<B, C>>,
        lora_b: FloatTensor<Autodiff<B, C>>,
        scaling: f64,
        grad: FloatTensor<Autodiff<B, C>>,
        kept: Option<Kept<B>>,
    ) -> FloatTensor<Autodiff<B, C>>
    where
        B: Lora4bitOps + Lora4bitPassOps,
        C: CheckpointStrategy,
    {
        let weight = weight.into_inner();
        let grad = grad.into_primitive();
        let zeros = B::float_zeros(grad.shape(), &grad.device(), grad.dtype().into());
        match Lora4bitPullbackBackward
            .prepare::<C>([input.node(), lora_a.node(), lora_b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let kept_input = input.clone();
                let adapter_dtype = lora_a.dtype();
                let (input, lora_a, lora_b) = (
                    input.into_primitive(),
                    lora_a.into_primitive(),
                    lora_b.into_primitive(),
                );
                let kept =
                    kept.unwrap_or_else(|| B::lora_4bit_adapter(input, lora_a, lora_b, scaling));
                let state = State::new(kept_input, kept, weight, scaling, adapter_dtype);
                prep.finish((state, grad), zeros)
            }
            OpsKind::UnTracked(prep) => prep.finish(zeros),
        }
    }
}
