//! A LoRA adapter's products as Burn operations: `x·A` and `h·B`, whose rank side is a few
//! columns wide. Burn's matmul tiles them like any product and gets a handful of cubes for a
//! long depth (`[2048, 4096] x [4096, 8]` runs on 16 cubes in 165 µs on an H100, where reading
//! `x` once takes about 6 µs), and `h·B` on tiles mostly idle over its depth of `r`. The kernels
//! here stream the wide operand once instead, in 16-byte vectors, and the `Autodiff`
//! implementation sends the backward's products back through them:
//!
//! | product | forward | lhs gradient | rhs gradient |
//! |---|---|---|---|
//! | `x·A`, `[m, k] x [k, r]` | kernel | `g·Aᵀ` (`low_rank_up`) | `xᵀ·g` (`low_rank_gradient`) |
//! | `h·B`, `[m, r] x [r, n]` | kernel | `g·Bᵀ` (`low_rank_down`) | `(gᵀ·h)ᵀ` (`low_rank_gradient`) |
//! | `xᵀ·g`, `[m, k]ᵀ x [m, r]` | kernel | `g·dOutᵀ` (`low_rank_up`) | `x·dOut` (`low_rank_down`) |
//!
//! Ranks above [`MAX_RANK`] take Burn's matmul; Flex (the CPU backend) always does. On CUDA
//! (sm_90) a bf16 `xᵀ·g` of whole 16-row steps takes `thin_product.cu`'s `thin_gradient`
//! instead: whole sums in one launch.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

/// The widest rank the kernels take: each unit keeps one f32 sum per rank column.
pub const MAX_RANK: usize = 16;

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait LowRankOps: Backend {
    /// `input · weight` for a `[m, k]` input and a thin `[k, r]` weight, in the input's dtype.
    #[fusion(meta = |input, weight| {
        let mut out = input.clone();
        out.shape = burn::tensor::Shape::new([input.shape[0], weight.shape[1]]);
        out
    })]
    fn low_rank_down(input: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `hidden · weight` for a thin `[m, r]` hidden and a `[r, n]` weight.
    #[fusion(meta = |hidden, weight| {
        let mut out = hidden.clone();
        out.shape = burn::tensor::Shape::new([hidden.shape[0], weight.shape[1]]);
        out
    })]
    fn low_rank_up(hidden: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `base + hidden · weight` for a `[m, n]` base: a LoRA layer's output (the base layer's
    /// plus the adapter's), summed in f32 and rounded once.
    #[fusion(meta = |base, _, _| base.clone())]
    fn low_rank_up_add(
        base: FloatTensor<Self>,
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// `inputᵀ · grad` for a `[m, k]` input and a thin `[m, r]` gradient: `[k, r]`, the
    /// gradient of a thin weight.
    #[fusion(meta = |input, grad| {
        let mut out = input.clone();
        out.shape = burn::tensor::Shape::new([input.shape[1], grad.shape[1]]);
        out
    })]
    fn low_rank_gradient(input: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `input · weight` over `input`'s last dimension, for a thin `[k, r]` weight (a LoRA `A` in
/// Burn's layout), in `input`'s dtype.
///
/// # Panics
///
/// If `input` does not end in `k` features, as `Tensor::matmul` would.
pub fn low_rank_down<const D: usize>(input: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    low_rank_product(input, weight, Dispatch::low_rank_down)
}

/// `hidden · weight` over `hidden`'s last dimension, for a thin hidden `[.., r]` and a
/// `[r, n]` weight (a LoRA `B` in Burn's layout), in `hidden`'s dtype.
///
/// # Panics
///
/// If `hidden` does not end in `r` features, as `Tensor::matmul` would.
pub fn low_rank_up<const D: usize>(hidden: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    low_rank_product(hidden, weight, Dispatch::low_rank_up)
}

/// `base + hidden · weight` over `hidden`'s last dimension for a thin hidden `[.., r]`, a `[r,
/// n]` weight (a LoRA `B`, scaling included) and a base output `[.., n]` (the frozen layer's):
/// [`low_rank_up`] and the add as one kernel, in `base`'s dtype.
///
/// # Panics
///
/// If `hidden` does not end in `r` features or `base` is not `hidden`'s rows by `n`.
pub fn low_rank_up_add<const D: usize>(
    base: Tensor<D>,
    hidden: Tensor<D>,
    weight: Tensor<2>,
) -> Tensor<D> {
    let dims = base.dims();
    let [rank, cols] = weight.dims();
    let hidden_dims = hidden.dims();
    assert!(
        dims[D - 1] == cols && hidden_dims[D - 1] == rank && dims[..D - 1] == hidden_dims[..D - 1],
        "low-rank product: base {dims:?} is not hidden {hidden_dims:?} times [{rank}, {cols}]"
    );
    if !crate::has_extensions(&base.device()) {
        let hidden = hidden.cast(base.dtype());
        return base + low_rank_up(hidden, weight);
    }
    let rows = dims[..D - 1].iter().product::<usize>();
    let weight = weight.cast(base.dtype());
    let hidden = hidden.cast(base.dtype()).reshape([rows, rank]);
    let base = base.reshape([rows, cols]);
    Tensor::<2>::from_dispatch(Dispatch::low_rank_up_add(
        base.into_dispatch(),
        hidden.into_dispatch(),
        weight.into_dispatch(),
    ))
    .reshape(dims)
}

/// `product` of `lhs` flattened to rows and the weight cast to `lhs`' dtype; Burn's matmul on
/// devices without the extension.
fn low_rank_product<const D: usize>(
    lhs: Tensor<D>,
    weight: Tensor<2>,
    product: fn(FloatTensor<Dispatch>, FloatTensor<Dispatch>) -> FloatTensor<Dispatch>,
) -> Tensor<D> {
    let weight = weight.cast(lhs.dtype());
    let [inner, outer] = weight.dims();
    let mut dims = lhs.dims();
    assert_eq!(
        dims[D - 1],
        inner,
        "low-rank product: input {dims:?} does not end in the weight's {inner} rows"
    );
    if !crate::has_extensions(&lhs.device()) {
        return lhs.matmul(weight.unsqueeze());
    }
    let rows = dims[..D - 1].iter().product::<usize>();
    let lhs = lhs.reshape([rows, inner]);
    let out = Tensor::<2>::from_dispatch(product(lhs.into_dispatch(), weight.into_dispatch()));
    dims[D - 1] = outer;
    out.reshape(dims)
}

#[cfg(feature = "cube")]
pub(crate) mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::DType;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::{LowRankOps, MAX_RANK};
    use crate::extension::{empty_output, launch_dims, vector_size};

    /// Rows per cube in [`rank_down_kernel`], one per lane of a plane, and its planes, each
    /// summing its own run of `LANE_DEPTH` columns: a cube covers `CUBE_DEPTH` of the depth, and
    /// the cubes along the depth leave partial sums.
    const DOWN_ROWS: usize = 32;
    const DOWN_PLANES: usize = 8;
    const LANE_DEPTH: usize = 64;
    const CUBE_DEPTH: usize = DOWN_PLANES * LANE_DEPTH;

    /// Units per cube in [`rank_up_kernel`] (one output vector of a row each), and the rows each
    /// unit writes with its columns of the weight held in registers.
    const UP_UNITS: usize = 256;
    const UP_ROWS: usize = 8;

    /// Units per cube in [`rank_gradient_kernel`], the input columns a unit takes at most (two:
    /// 256 cubes for a 4096-wide input on the H200's 132 multiprocessors), the rows a cube sums,
    /// and the rows whose loads a unit keeps in flight (32: 12.5 -> 11.5 µs on the H200 at 4096
    /// columns, 25.1 -> 22.1 µs at 11008, against 8; 32 rows a cube gave no more).
    const GRADIENT_UNITS: usize = 256;
    const GRADIENT_COLUMNS: usize = 2;
    const GRADIENT_ROWS: usize = 64;
    const GRADIENT_BATCH: usize = 32;
    /// The partial sums [`sum_parts_kernel`] adds at a time.
    const UNROLL: usize = 8;

    /// Cubes along one dimension that every runtime launches (wgpu's limit).
    const MAX_CUBES: usize = 65_535;

    impl LowRankOps for CubeBackend {
        fn low_rank_down(input: CubeTensor, weight: CubeTensor) -> CubeTensor {
            let [rows, depth] = input.shape().dims();
            let rank = weight.shape()[1];
            if rank > MAX_RANK
                || rows == 0
                || depth == 0
                || rows.div_ceil(DOWN_ROWS) > MAX_CUBES
                || depth.div_ceil(CUBE_DEPTH) > MAX_CUBES
            {
                return Self::float_matmul(input, weight);
            }
            rank_down(into_contiguous(input), weight)
        }

        fn low_rank_up(hidden: CubeTensor, weight: CubeTensor) -> CubeTensor {
            let rows = hidden.shape()[0];
            let [rank, cols] = weight.shape().dims();
            if !rank_up_fits(rows, rank, cols) {
                return Self::float_matmul(hidden, weight);
            }
            rank_up(into_contiguous(hidden), weight, None)
        }

        fn low_rank_up_add(base: CubeTensor, hidden: CubeTensor, weight: CubeTensor) -> CubeTensor {
            let rows = hidden.shape()[0];
            let [rank, cols] = weight.shape().dims();
            if !rank_up_fits(rows, rank, cols) {
                return Self::float_add(base, Self::float_matmul(hidden, weight));
            }
            rank_up(into_contiguous(hidden), weight, Some(into_contiguous(base)))
        }

        fn low_rank_gradient(input: CubeTensor, grad: CubeTensor) -> CubeTensor {
            let [rows, depth] = input.shape().dims();
            let rank = grad.shape()[1];
            if rank > MAX_RANK
                || depth.div_ceil(GRADIENT_UNITS) > MAX_CUBES
                || rows.div_ceil(GRADIENT_ROWS) > MAX_CUBES
            {
                return Self::float_matmul(Self::float_transpose(input), grad);
            }
            let (input, grad) = (into_contiguous(input), into_contiguous(grad));
            #[cfg(feature = "cuda")]
            if let Some(gradient) = crate::thin_product::gradient(&input, &grad) {
                return gradient;
            }
            rank_gradient(input, grad)
        }
    }

    /// A thin weight as the kernels read it, and whether it is read transposed: the backward's
    /// `Aᵀ` and `Bᵀ` are views of contiguous adapter weights, read in place rather than copied
    /// (a launch and a copy each, 14 a layer and step); any other layout is made contiguous.
    pub(crate) fn thin_weight(weight: CubeTensor) -> (CubeTensor, bool) {
        let [rows, _] = weight.shape().dims();
        let transposed = !weight.meta.is_tiled() && weight.meta.strides()[..] == [1, rows];
        if transposed {
            (weight, true)
        } else {
            (into_contiguous(weight), false)
        }
    }

    /// An f32 buffer for the partial sums of `parts` slices, and the `[rows, cols]` output.
    fn partial_and_output(
        reference: &CubeTensor,
        parts: usize,
        [rows, cols]: [usize; 2],
    ) -> (CubeTensor, CubeTensor) {
        (
            empty_output(reference, [parts, rows * cols], DType::F32),
            empty_output(reference, [rows, cols], reference.dtype),
        )
    }

    /// `input · weight` through [`rank_down_kernel`] (f32 sums per slice of the depth) and
    /// [`sum_parts_kernel`]; the input contiguous, the weight contiguous or transposed.
    fn rank_down(input: CubeTensor, weight: CubeTensor) -> CubeTensor {
        let [rows, depth] = input.shape().dims();
        let rank = weight.shape()[1];
        let (weight, transposed) = thin_weight(weight);
        let splits = depth.div_ceil(CUBE_DEPTH);
        let (partial, output) = partial_and_output(&input, splits, [rows, rank]);
        let dtype = input.dtype;
        // Rows start on whole vectors; vector sizes and `LANE_DEPTH` are powers of two, so a
        // lane's run of the depth is whole vectors too. A transposed weight's rank rows are
        // `depth` long, read in the input's vectors.
        let input_vector = vector_size(&input, depth).min(LANE_DEPTH);
        let weight_vector = if transposed {
            input_vector
        } else {
            vector_size(&weight, rank)
        };
        let cube_count = CubeCount::new_2d(rows.div_ceil(DOWN_ROWS) as u32, splits as u32);
        let cube_dim = CubeDim::new_2d(DOWN_ROWS as u32, DOWN_PLANES as u32);
        // SAFETY: each unit reads whole vectors of its row of `input` (`depth` is a multiple of
        // the vector) in its run of the depth, guarded by `rows` and `depth`, and whole vectors
        // of those rows of `weight`; the cube writes `rank` sums per row it owns.
        unsafe {
            rank_down_kernel::launch_unchecked(
                &output.client,
                cube_count,
                cube_dim,
                input_vector,
                weight_vector,
                input.into_buffer_arg(),
                weight.into_buffer_arg(),
                partial.clone().into_buffer_arg(),
                rows,
                depth,
                rank,
                transposed,
                dtype_to_storage_type(dtype),
            );
        }
        sum_parts(partial, output, splits, rank, false)
    }

    /// Whether [`rank_up_kernel`] takes a `[rows, rank] x [rank, cols]` product (else Burn's
    /// matmul does).
    fn rank_up_fits(rows: usize, rank: usize, cols: usize) -> bool {
        rank <= MAX_RANK
            && rows > 0
            && cols > 0
            && rows.div_ceil(UP_ROWS) <= MAX_CUBES
            && cols.div_ceil(UP_UNITS) <= MAX_CUBES
    }

    /// `hidden · weight` through [`rank_up_kernel`]; the hidden contiguous, the weight
    /// contiguous or transposed.
    fn rank_up(hidden: CubeTensor, weight: CubeTensor, base: Option<CubeTensor>) -> CubeTensor {
        let rows = hidden.shape()[0];
        let [rank, cols] = weight.shape().dims();
        let (weight, transposed) = thin_weight(weight);
        let output = empty_output(&hidden, [rows, cols], hidden.dtype);
        let add = base.is_some();
        // Without a base the kernel reads none: the weight stands in for the argument (a
        // buffer may not be bound twice, read and written, in one wgpu dispatch).
        let base = base.unwrap_or_else(|| weight.clone());
        let dtype = hidden.dtype;
        let vector = vector_size(&output, cols);
        let vectors = cols / vector;
        // A transposed weight is read a column's `rank` values at a time.
        let weight_vector = if transposed {
            vector_size(&weight, rank)
        } else {
            vector
        };
        let cube_count = CubeCount::new_2d(
            vectors.div_ceil(UP_UNITS) as u32,
            rows.div_ceil(UP_ROWS) as u32,
        );
        // SAFETY: each unit reads its column vector of every weight row and the `rank` values
        // of its rows of `hidden`, and writes that vector of those rows, guarded by `vectors`
        // and `rows`; `cols` is a multiple of the vector.
        unsafe {
            rank_up_kernel::launch_unchecked(
                &output.client,
                cube_count,
                CubeDim::new_1d(UP_UNITS as u32),
                vector,
                weight_vector,
                hidden.into_buffer_arg(),
                weight.into_buffer_arg(),
                base.into_buffer_arg(),
                output.clone().into_buffer_arg(),
                rows,
                vectors,
                rank,
                add,
                transposed,
                dtype_to_storage_type(dtype),
            );
        }
        output
    }

    /// `inputᵀ · grad` through [`rank_gradient_kernel`] (f32 sums per block of rows) and
    /// [`sum_parts_kernel`]; both contiguous.
    fn rank_gradient(input: CubeTensor, grad: CubeTensor) -> CubeTensor {
        let [rows, depth] = input.shape().dims();
        let rank = grad.shape()[1];
        let blocks = rows.div_ceil(GRADIENT_ROWS);
        let (partial, output) = partial_and_output(&input, blocks, [depth, rank]);
        let dtype = input.dtype;
        let column_vector = vector_size(&input, depth).min(GRADIENT_COLUMNS);
        let rank_vector = [4, 2, 1]
            .into_iter()
            .find(|&width| rank.is_multiple_of(width))
            .unwrap_or(1);
        let cube_count = CubeCount::new_2d(
            depth.div_ceil(GRADIENT_UNITS * column_vector) as u32,
            blocks as u32,
        );
        // SAFETY: each cube reads its block of rows of `grad` and whole vectors of `input`'s
        // rows (`depth` is a multiple of the vector; guarded by `rows`, `depth`) and writes those
        // columns' sums of its block in `partial`.
        unsafe {
            rank_gradient_kernel::launch_unchecked(
                &output.client,
                cube_count,
                CubeDim::new_1d(GRADIENT_UNITS as u32),
                column_vector,
                rank_vector,
                input.into_buffer_arg(),
                grad.into_buffer_arg(),
                partial.clone().into_buffer_arg(),
                rows,
                depth,
                rank,
                dtype_to_storage_type(dtype),
            );
        }
        sum_parts(partial, output, blocks, rank, true)
    }

    /// `output` from its `parts` partial sums through [`sum_parts_kernel`].
    fn sum_parts(
        partial: CubeTensor,
        output: CubeTensor,
        parts: usize,
        rank: usize,
        rank_major: bool,
    ) -> CubeTensor {
        let len = output.shape().num_elements();
        let dtype = output.dtype;
        let (cube_count, cube_dim) = launch_dims(&output, len);
        // SAFETY: one unit per output, reading its `parts` partial sums.
        unsafe {
            sum_parts_kernel::launch_unchecked(
                &output.client,
                cube_count,
                cube_dim,
                partial.into_buffer_arg(),
                output.clone().into_buffer_arg(),
                parts,
                len,
                rank,
                rank_major,
                dtype_to_storage_type(dtype),
            );
        }
        output
    }

    /// `partial[split, row, r] = Σ_{k in split} input[row, k] · weight[k, r]` for a thin weight.
    ///
    /// Each lane owns a row: the lanes of a plane read their rows' vectors side by side and all
    /// read the same weight row at once (one broadcast load of `R` ranks), so no sums cross
    /// lanes. The planes sum neighbouring runs of the depth and meet in shared memory. A
    /// `transposed` weight is stored `[rank, depth]`: each rank row is read in the input's
    /// vectors (`R` = `N`), as many loads as the row-major weight takes.
    #[allow(clippy::too_many_arguments)]
    #[cube(launch_unchecked)]
    fn rank_down_kernel<F: Float, N: Size, R: Size>(
        input: &[Vector<F, N>],
        weight: &[Vector<F, R>],
        partial: &mut [f32],
        rows: usize,
        depth: usize,
        #[comptime] rank: usize,
        #[comptime] transposed: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let lane = UNIT_POS_X as usize;
        let plane = UNIT_POS_Y as usize;
        let first_row = CUBE_POS_X as usize * DOWN_ROWS;
        let row = first_row + lane;
        let split = CUBE_POS_Y as usize;
        let width = N::value();
        let rank_width = R::value();
        let parts = comptime![rank / rank_width];
        let mut sums = Array::<f32>::new(rank);
        #[unroll]
        for r in 0..rank {
            sums[r] = f32::new(0.0);
        }
        let start = split * CUBE_DEPTH + plane * LANE_DEPTH;
        if row < rows {
            #[unroll]
            for v in 0..comptime![LANE_DEPTH / width] {
                let k = start + v * width;
                if k < depth {
                    let x = input[(row * depth + k) / width];
                    if comptime![transposed] {
                        #[unroll]
                        for r in 0..rank {
                            let w = weight[(r * depth + k) / width];
                            #[unroll]
                            for e in 0..width {
                                sums[r] +=
                                    f32::cast_from(x.extract(e)) * f32::cast_from(w.extract(e));
                            }
                        }
                    } else {
                        #[unroll]
                        for e in 0..width {
                            let value = f32::cast_from(x.extract(e));
                            #[unroll]
                            for part in 0..parts {
                                let w = weight[(k + e) * parts + part];
                                #[unroll]
                                for l in 0..rank_width {
                                    sums[part * rank_width + l] +=
                                        value * f32::cast_from(w.extract(l));
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut shared = Shared::<[f32]>::new_slice(comptime!(DOWN_PLANES * rank * DOWN_ROWS));
        #[unroll]
        for r in 0..rank {
            shared[(plane * rank + r) * DOWN_ROWS + lane] = sums[r];
        }
        sync_cube();
        // `rank x DOWN_ROWS` totals, `r`-major, shared by the cube's units.
        let mut slot = UNIT_POS as usize;
        while slot < rank * DOWN_ROWS {
            let mut total = f32::new(0.0);
            #[unroll]
            for p in 0..DOWN_PLANES {
                total += shared[p * rank * DOWN_ROWS + slot];
            }
            let out_row = first_row + slot % DOWN_ROWS;
            if out_row < rows {
                partial[(split * rows + out_row) * rank + slot / DOWN_ROWS] = total;
            }
            slot += DOWN_ROWS * DOWN_PLANES;
        }
    }

    /// `output[row, c] = Σ_r hidden[row, r] · weight[r, c]` for a thin hidden, plus `base[row,
    /// c]` when `add`: each unit holds one column vector of every weight row in registers and
    /// writes it for `UP_ROWS` rows, the hidden row the same for every unit of a cube (a
    /// broadcast load). A `transposed` weight is stored `[cols, rank]`: a unit's columns are
    /// then one contiguous run, read `R` ranks at a time (`R` = `N` otherwise).
    #[allow(clippy::too_many_arguments)]
    #[cube(launch_unchecked)]
    fn rank_up_kernel<F: Float, N: Size, R: Size>(
        hidden: &[F],
        weight: &[Vector<F, R>],
        base: &[Vector<F, N>],
        output: &mut [Vector<F, N>],
        rows: usize,
        vectors: usize,
        #[comptime] rank: usize,
        #[comptime] add: bool,
        #[comptime] transposed: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let column = CUBE_POS_X as usize * UP_UNITS + UNIT_POS as usize;
        if column >= vectors {
            terminate!();
        }
        let width = N::value();
        let rank_width = R::value();
        let mut columns = Array::<f32>::new(comptime!(rank * width));
        if comptime![transposed] {
            let parts = comptime![rank / rank_width];
            #[unroll]
            for e in 0..width {
                #[unroll]
                for part in 0..parts {
                    let w = weight[(column * width + e) * parts + part];
                    #[unroll]
                    for l in 0..rank_width {
                        columns[(part * rank_width + l) * width + e] = f32::cast_from(w.extract(l));
                    }
                }
            }
        } else {
            #[unroll]
            for r in 0..rank {
                let w = weight[r * vectors + column];
                #[unroll]
                for e in 0..width {
                    columns[r * width + e] = f32::cast_from(w.extract(e));
                }
            }
        }
        let first_row = CUBE_POS_Y as usize * UP_ROWS;
        #[unroll]
        for i in 0..UP_ROWS {
            let row = first_row + i;
            if row < rows {
                let mut h = Array::<f32>::new(rank);
                #[unroll]
                for r in 0..rank {
                    h[r] = f32::cast_from(hidden[row * rank + r]);
                }
                let mut out = Vector::<F, N>::empty();
                let mut start = Vector::<f32, N>::empty().fill(f32::new(0.0));
                if comptime![add] {
                    start = Vector::<f32, N>::cast_from(base[row * vectors + column]);
                }
                #[unroll]
                for e in 0..width {
                    let mut sum = start.extract(e);
                    #[unroll]
                    for r in 0..rank {
                        sum += h[r] * columns[r * width + e];
                    }
                    out.insert(e, F::cast_from(sum));
                }
                output[row * vectors + column] = out;
            }
        }
    }

    /// `partial[block, r * depth + k] = Σ_{row in block} input[row, k] · grad[row, r]`: a unit
    /// takes `N` neighbouring input columns (a vector a row; coalesced loads), a cube row a block
    /// of `GRADIENT_ROWS` rows, whose gradient rows sit in shared memory as vectors of `R` ranks.
    /// Every unit reads the same vector (a broadcast), so one shared load serves `R` ranks of `N`
    /// columns.
    #[cube(launch_unchecked)]
    fn rank_gradient_kernel<F: Float, N: Size, R: Size>(
        input: &[Vector<F, N>],
        grad: &[F],
        partial: &mut [f32],
        rows: usize,
        depth: usize,
        #[comptime] rank: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let width = N::value();
        let rank_width = R::value();
        let parts = comptime![rank / rank_width];
        let vectors = depth / width;
        let column = CUBE_POS_X as usize * GRADIENT_UNITS + UNIT_POS as usize;
        let block = CUBE_POS_Y as usize;
        let first_row = block * GRADIENT_ROWS;
        // Vector i holds ranks [R (i % parts), R (i % parts + 1)) of the block's row i / parts,
        // zero past the last row.
        let mut staged = Shared::<[Vector<f32, R>]>::new_slice(comptime!(GRADIENT_ROWS * parts));
        let mut i = UNIT_POS as usize;
        while i < GRADIENT_ROWS * parts {
            let mut value = Vector::<f32, R>::empty().fill(f32::new(0.0));
            if first_row + i / parts < rows {
                #[unroll]
                for l in 0..rank_width {
                    value.insert(
                        l,
                        f32::cast_from(grad[first_row * rank + i * rank_width + l]),
                    );
                }
            }
            staged[i] = value;
            i += GRADIENT_UNITS;
        }
        sync_cube();
        if column < vectors {
            // sums[r * N + e]: rank r of column e.
            let mut sums = Array::<f32>::new(comptime!(rank * width));
            #[unroll]
            for j in 0..comptime!(rank * width) {
                sums[j] = f32::new(0.0);
            }
            let remaining = rows - first_row;
            let block_rows = select(remaining < GRADIENT_ROWS, remaining, GRADIENT_ROWS);
            let mut m = 0usize;
            while m < block_rows {
                #[unroll]
                for u in 0..GRADIENT_BATCH {
                    // Past the block's last row the vector stays zero, as the staged rows are.
                    let mut x = Vector::<F, N>::empty().fill(F::new(0.0));
                    if m + u < block_rows {
                        x = input[(first_row + m + u) * vectors + column];
                    }
                    #[unroll]
                    for part in 0..parts {
                        let g = staged[(m + u) * parts + part];
                        #[unroll]
                        for l in 0..rank_width {
                            #[unroll]
                            for e in 0..width {
                                sums[(part * rank_width + l) * width + e] +=
                                    f32::cast_from(x.extract(e)) * g.extract(l);
                            }
                        }
                    }
                }
                m += GRADIENT_BATCH;
            }
            #[unroll]
            for r in 0..rank {
                #[unroll]
                for e in 0..width {
                    partial[(block * rank + r) * depth + column * width + e] = sums[r * width + e];
                }
            }
        }
    }

    /// `output[i] = Σ_part partial[part, i]` in the output's dtype, `UNROLL` parts at a time.
    /// With `rank_major` the sums are laid out `[rank, n]` and the output is `[n, rank]`.
    #[cube(launch_unchecked)]
    fn sum_parts_kernel<F: Float>(
        partial: &[f32],
        output: &mut [F],
        parts: usize,
        len: usize,
        #[comptime] rank: usize,
        #[comptime] rank_major: bool,
        #[define(F)] _dtype: ElemType,
    ) {
        let index = ABSOLUTE_POS;
        if index >= len {
            terminate!();
        }
        let mut sum = f32::new(0.0);
        let whole = parts / UNROLL * UNROLL;
        let mut part = 0usize;
        while part < whole {
            #[unroll]
            for u in 0..UNROLL {
                sum += partial[(part + u) * len + index];
            }
            part += UNROLL;
        }
        while part < parts {
            sum += partial[part * len + index];
            part += 1;
        }
        let mut target = index;
        if comptime![rank_major] {
            let n = len / rank;
            target = (index % n) * rank + index / n;
        }
        output[target] = F::cast_from(sum);
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;

    use super::LowRankOps;

    impl LowRankOps for Flex {
        fn low_rank_down(input: FlexTensor, weight: FlexTensor) -> FlexTensor {
            Self::float_matmul(input, weight)
        }

        fn low_rank_up(hidden: FlexTensor, weight: FlexTensor) -> FlexTensor {
            Self::float_matmul(hidden, weight)
        }

        fn low_rank_up_add(base: FlexTensor, hidden: FlexTensor, weight: FlexTensor) -> FlexTensor {
            Self::float_add(base, Self::float_matmul(hidden, weight))
        }

        fn low_rank_gradient(input: FlexTensor, grad: FlexTensor) -> FlexTensor {
            Self::float_matmul(Self::float_transpose(input), grad)
        }
    }
}

mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::NodeId;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
    use burn::backend::tensor::FloatTensor;

    use super::LowRankOps;

    /// Which of the three products a node is.
    #[derive(Debug, Clone, Copy)]
    enum Product {
        Down,
        Up,
        Gradient,
    }

    /// The two operands a backward kept (each only where the other's gradient needs it).
    fn retrieve<B: LowRankOps>(
        checkpointer: &mut Checkpointer,
        (lhs, rhs): (Option<NodeId>, Option<NodeId>),
    ) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>) {
        let mut retrieve = |id| checkpointer.retrieve_node_output::<FloatTensor<B>>(id);
        (lhs.map(&mut retrieve), rhs.map(&mut retrieve))
    }

    /// The backward of a low-rank product `lhs · rhs` (`lhsᵀ · rhs` for [`Product::Gradient`]):
    /// each side's gradient is again a product with one thin side (the table in the module's
    /// documentation).
    #[derive(Debug)]
    struct LowRankBackward(Product);

    impl<B: LowRankOps> Backward<B, 2> for LowRankBackward {
        type State = (Option<NodeId>, Option<NodeId>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            checkpointer: &mut Checkpointer,
        ) {
            let (lhs, rhs) = retrieve::<B>(checkpointer, ops.state);
            let product = self.0;
            binary::<B, _, _>(
                ops.parents,
                ops.node,
                grads,
                |grad| {
                    let rhs = rhs.expect("the rhs is kept when the lhs is tracked");
                    match product {
                        Product::Down => B::low_rank_up(grad, B::float_transpose(rhs)),
                        Product::Up => B::low_rank_down(grad, B::float_transpose(rhs)),
                        Product::Gradient => B::low_rank_up(rhs, B::float_transpose(grad)),
                    }
                },
                |grad| {
                    let lhs = lhs.expect("the lhs is kept when the rhs is tracked");
                    match product {
                        Product::Down => B::low_rank_gradient(lhs, grad),
                        Product::Up => B::float_transpose(B::low_rank_gradient(grad, lhs)),
                        Product::Gradient => B::low_rank_down(lhs, grad),
                    }
                },
            );
        }
    }

    /// Runs `forward` on the inner backend and records the node, keeping each side only when
    /// the other side's gradient needs it.
    fn record<B: LowRankOps, C: CheckpointStrategy>(
        product: Product,
        lhs: FloatTensor<Autodiff<B, C>>,
        rhs: FloatTensor<Autodiff<B, C>>,
        forward: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
    ) -> FloatTensor<Autodiff<B, C>> {
        let lhs_tracked = lhs.is_tracked();
        let rhs_tracked = rhs.is_tracked();
        match LowRankBackward(product)
            .prepare::<C>([lhs.node(), rhs.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                let output = forward(lhs.into_primitive(), rhs.into_primitive());
                prep.finish((lhs_state, rhs_state), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward(lhs.into_primitive(), rhs.into_primitive()))
            }
        }
    }

    /// The backward of `low_rank_up_add`: the base's gradient is the output's, the other two
    /// those of `low_rank_up`.
    #[derive(Debug)]
    struct LowRankUpAddBackward;

    impl<B: LowRankOps> Backward<B, 3> for LowRankUpAddBackward {
        type State = (Option<NodeId>, Option<NodeId>);

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            checkpointer: &mut Checkpointer,
        ) {
            let (hidden, weight) = retrieve::<B>(checkpointer, ops.state);
            let grad = grads.consume::<B>(&ops.node);
            let [base_node, hidden_node, weight_node] = ops.parents;
            if let Some(node) = hidden_node {
                let weight = weight.expect("the weight is kept when the hidden is tracked");
                let of_hidden = B::low_rank_down(grad.clone(), B::float_transpose(weight));
                grads.register::<B>(node.id, of_hidden);
            }
            if let Some(node) = weight_node {
                let hidden = hidden.expect("the hidden is kept when the weight is tracked");
                let of_weight = B::float_transpose(B::low_rank_gradient(grad.clone(), hidden));
                grads.register::<B>(node.id, of_weight);
            }
            if let Some(node) = base_node {
                grads.register::<B>(node.id, grad);
            }
        }
    }

    impl<B: LowRankOps, C: CheckpointStrategy> LowRankOps for Autodiff<B, C> {
        fn low_rank_down(input: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
            record::<B, C>(Product::Down, input, weight, B::low_rank_down)
        }

        fn low_rank_up(hidden: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
            record::<B, C>(Product::Up, hidden, weight, B::low_rank_up)
        }

        fn low_rank_gradient(
            input: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            record::<B, C>(Product::Gradient, input, grad, B::low_rank_gradient)
        }

        fn low_rank_up_add(
            base: FloatTensor<Self>,
            hidden: FloatTensor<Self>,
            weight: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let hidden_tracked = hidden.is_tracked();
            let weight_tracked = weight.is_tracked();
            match LowRankUpAddBackward
                .prepare::<C>([base.node(), hidden.node(), weight.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let hidden_state = weight_tracked.then(|| prep.checkpoint(&hidden));
                    let weight_state = hidden_tracked.then(|| prep.checkpoint(&weight));
                    let output = B::low_rank_up_add(
                        base.into_primitive(),
                        hidden.into_primitive(),
                        weight.into_primitive(),
                    );
                    prep.finish((hidden_state, weight_state), output)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::low_rank_up_add(
                    base.into_primitive(),
                    hidden.into_primitive(),
                    weight.into_primitive(),
                )),
            }
        }
    }
}
