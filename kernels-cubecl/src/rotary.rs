//! Rotary position embeddings as one Burn operation, in Hugging Face's layout (the two halves
//! of a head are the rotated pairs): `x · cos + rotate_half(x) · sin`, read straight from the
//! heads as the projection left them (`[batch, seq, heads, width]` with its middle dimensions
//! swapped) and written contiguous, ready for attention's products. Its backward is the same
//! rotation transposed (`sin` negated), so it keeps nothing but the tables.
//!
//! Through Burn's operations this was two slices, a negation, a concatenation, the tables'
//! slices and casts, and a copy of the strided heads: some ten launches per head tensor.
//!
//! Flex (the CPU backend) runs a plain-Rust loop beside the kernel.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Tensor};

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait RotaryOps: Backend {
    /// `x` (`[batch, heads, seq, width]`, any strides) rotated by the angles of positions
    /// `offset..offset + seq` of the f32 `[positions, width]` tables, contiguous, in `x`'s
    /// dtype; `transposed` rotates the other way (the backward), its output laid out as the
    /// projections leave the heads (`[batch, seq, heads, width]` in memory) for their backward.
    #[fusion(meta = |x, _, _, _, _| x.clone())]
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        offset: usize,
        transposed: bool,
    ) -> FloatTensor<Self>;
}

/// Rotates `x` (`[batch, heads, seq, width]`) whose first token is at position `offset`, with
/// f32 `cos`/`sin` tables `[positions, width]` whose two halves hold the same angles
/// (`cat(freqs, freqs)`), as transformers' `apply_rotary_pos_emb` in `x`'s dtype (the tables
/// rounded to it, each product rounded). Devices without this crate's extensions take Burn's
/// operations.
///
/// # Panics
///
/// If the tables are not `[positions, width]` with `offset + seq <= positions`.
pub fn rotary(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>, offset: usize) -> Tensor<4> {
    let [_, _, seq, width] = x.dims();
    let [positions, table_width] = cos.dims();
    assert!(
        table_width == width && sin.dims() == cos.dims() && offset + seq <= positions,
        "rotary: tables {:?} do not cover {seq} positions from {offset} of width {width}",
        cos.dims()
    );
    if !crate::has_extensions(&x.device()) {
        return composed(x, cos, sin, offset);
    }
    let (cos, sin) = (cos.cast(DType::F32), sin.cast(DType::F32));
    Tensor::from_dispatch(Dispatch::rotary(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        offset,
        false,
    ))
}

/// The same through Burn's operations.
fn composed(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>, offset: usize) -> Tensor<4> {
    let [_, _, seq, width] = x.dims();
    let dtype = x.dtype();
    let cos = cos.narrow(0, offset, seq).cast(dtype);
    let sin = sin.narrow(0, offset, seq).cast(dtype);
    let half = width / 2;
    let first = x.clone().narrow(3, 0, half);
    let second = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos.unsqueeze() + rotated * sin.unsqueeze()
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::Shape;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::RotaryOps;
    use crate::extension::{empty_output, strided_runs};
    use crate::rows::{grid, grid_cube};

    /// Units per cube, one pair of vectors each.
    const CUBE_UNITS: usize = 256;

    impl RotaryOps for CubeBackend {
        fn rotary(
            x: CubeTensor,
            cos: CubeTensor,
            sin: CubeTensor,
            offset: usize,
            transposed: bool,
        ) -> CubeTensor {
            let shape = x.shape();
            let [batch, heads, seq, width] = shape.dims();
            let half = width / 2;
            // Whole vectors of each half-row where the rows allow (the tables' rows then do too).
            let (x, strides, vector) = strided_runs(x, half);
            // The backward writes `[batch, seq, heads, width]` memory, returned as its
            // `[batch, heads, seq, width]` view.
            let memory = if transposed {
                Shape::new([batch, seq, heads, width])
            } else {
                shape.clone()
            };
            let output = empty_output(&x, memory, x.dtype);
            let units = shape.num_elements() / 2 / vector;
            let view = |output: CubeTensor| {
                if transposed {
                    Self::float_swap_dims(output, 1, 2)
                } else {
                    output
                }
            };
            if units == 0 {
                return view(output);
            }
            let row = width / vector;
            let (out_stride_head, out_stride_seq) = if transposed {
                (row, heads * row)
            } else {
                (seq * row, row)
            };
            let dtype = x.dtype;
            // SAFETY: each unit owns one vector of each half of a row (guarded by `units`),
            // reads them through `x`'s strides (in vectors; whole vectors per half-row) and
            // their angles at `offset + position` (checked against the tables' length by
            // `rotary`), and writes them to its row of the output, whose strides cover it.
            unsafe {
                rotary_kernel::launch_unchecked(
                    &output.client,
                    grid(units.div_ceil(CUBE_UNITS)),
                    CubeDim::new_1d(CUBE_UNITS as u32),
                    vector,
                    x.into_buffer_arg(),
                    into_contiguous(cos).into_buffer_arg(),
                    into_contiguous(sin).into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    units,
                    heads,
                    seq,
                    half / vector,
                    strides[0] / vector,
                    strides[1] / vector,
                    strides[2] / vector,
                    strides[3],
                    out_stride_head,
                    out_stride_seq,
                    offset,
                    transposed,
                    dtype_to_storage_type(dtype),
                );
            }
            view(output)
        }
    }

    /// One pair of vectors `(x[i], x[i + half])` of one row (strides and `half` in vectors,
    /// the output's batch stride `heads * seq * 2 * half`):
    /// `(x₁c - x₂s, x₂c + x₁s)`, or transposed `(x₁c + x₂s, x₂c - x₁s)`, in `F` (each product
    /// rounded, as Burn's operations round).
    #[allow(clippy::too_many_arguments)]
    #[cube(launch_unchecked)]
    fn rotary_kernel<F: Float, N: Size>(
        x: &[Vector<F, N>],
        cos: &[Vector<f32, N>],
        sin: &[Vector<f32, N>],
        output: &mut [Vector<F, N>],
        units: usize,
        heads: usize,
        seq: usize,
        half: usize,
        stride_batch: usize,
        stride_head: usize,
        stride_seq: usize,
        stride_width: usize,
        out_stride_head: usize,
        out_stride_seq: usize,
        offset: usize,
        #[comptime] transposed: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let unit = grid_cube() * CUBE_UNITS + UNIT_POS as usize;
        if unit >= units {
            terminate!();
        }
        let i = unit % half;
        let row = unit / half;
        let position = row % seq;
        let head = (row / seq) % heads;
        let batch = row / (seq * heads);
        let base = batch * stride_batch + head * stride_head + position * stride_seq;
        let first = x[base + i * stride_width];
        let second = x[base + (i + half) * stride_width];
        let angles = (offset + position) * 2 * half + i;
        let cos_first = Vector::<F, N>::cast_from(cos[angles]);
        let sin_first = Vector::<F, N>::cast_from(sin[angles]);
        let cos_second = Vector::<F, N>::cast_from(cos[angles + half]);
        let sin_second = Vector::<F, N>::cast_from(sin[angles + half]);
        let out =
            batch * heads * seq * 2 * half + head * out_stride_head + position * out_stride_seq + i;
        if comptime![transposed] {
            output[out] = first * cos_first + second * sin_second;
            output[out + half] = second * cos_second - first * sin_first;
        } else {
            output[out] = first * cos_first - second * sin_first;
            output[out + half] = second * cos_second + first * sin_second;
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;

    use super::RotaryOps;
    use crate::flex_host::{from_host, round, to_host};

    impl RotaryOps for Flex {
        fn rotary(
            x: FlexTensor,
            cos: FlexTensor,
            sin: FlexTensor,
            offset: usize,
            transposed: bool,
        ) -> FlexTensor {
            let (x, shape, dtype) = to_host(x);
            let (cos, table_shape, _) = to_host(cos);
            let (sin, _, _) = to_host(sin);
            let (seq, width) = (shape[2], shape[3]);
            let half = width / 2;
            let r = |value: f32| round(value, dtype);
            let mut out = vec![0.0; x.len()];
            for (row, (x, out)) in x.chunks(width).zip(out.chunks_mut(width)).enumerate() {
                let angles = (offset + row % seq) * table_shape[1];
                let c = |k: usize| r(cos[angles + k]);
                let s = |k: usize| r(sin[angles + k]);
                for i in 0..half {
                    let (first, second) = (x[i], x[i + half]);
                    let (c1, s1, c2, s2) = (c(i), s(i), c(i + half), s(i + half));
                    if transposed {
                        out[i] = r(r(first * c1) + r(second * s2));
                        out[i + half] = r(r(second * c2) - r(first * s1));
                    } else {
                        out[i] = r(r(first * c1) - r(second * s1));
                        out[i + half] = r(r(second * c2) + r(first * s2));
                    }
                }
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

    use super::RotaryOps;

    /// The backward of `rotary`: the gradient rotated the other way, by the same tables.
    #[derive(Debug)]
    struct RotaryBackward {
        offset: usize,
        transposed: bool,
    }

    impl<B: RotaryOps> Backward<B, 1> for RotaryBackward {
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let (cos, sin) = ops.state;
            unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                B::rotary(grad, cos, sin, self.offset, !self.transposed)
            });
        }
    }

    impl<B: RotaryOps, C: CheckpointStrategy> RotaryOps for Autodiff<B, C> {
        fn rotary(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            offset: usize,
            transposed: bool,
        ) -> FloatTensor<Self> {
            // The tables are constants of the graph.
            let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
            let backward = RotaryBackward { offset, transposed };
            match backward.prepare::<C>([x.node()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let output = B::rotary(
                        x.into_primitive(),
                        cos.clone(),
                        sin.clone(),
                        offset,
                        transposed,
                    );
                    prep.finish((cos, sin), output)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::rotary(x.into_primitive(), cos, sin, offset, transposed))
                }
            }
        }
    }
}
