//! The kernels as Burn operations: a backend extension implemented for the CubeCL backend, so
//! they run on whichever runtime (CUDA, wgpu) a tensor's device names.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, backend_extension};
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::Client;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use crate::NESTED_BLOCK_SIZE;
use crate::kernels::{
    DEQUANTIZE_CUBE_UNITS, DEQUANTIZE_UNIT_WORDS, MATVEC_FEATURES_PER_CUBE, MATVEC_LANES,
    WORD_ELEMENTS, dequantize_4bit_double_kernel, dequantize_4bit_kernel,
    dequantize_4bit_vector_kernel, dequantize_absmax_kernel, matvec_4bit_kernel,
    quantize_4bit_kernel, quantize_absmax_kernel,
};

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion"))
)]
pub trait Quant4bitOps: Backend {
    /// `code[nibble] * (absmax[block] + offset)` for `num_elements` values, as `dtype`.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |_, _, _, _, num_elements, _, dtype| spec([*num_elements], *dtype))]
    fn dequantize_4bit(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        code: FloatTensor<Self>,
        offset: f32,
        num_elements: usize,
        block_size: usize,
        dtype: DType,
    ) -> FloatTensor<Self>;

    /// [`Self::dequantize_4bit`] of a weight whose absmax is double-quantized (`absmax_codes`,
    /// `nested_absmax`, `map`, `offset`: [`Self::dequantize_absmax`]'s inputs), decoding the
    /// absmax in the same launch where the kernel takes the shape; the same values.
    #[allow(clippy::too_many_arguments)]
    #[fusion(meta = |_, _, _, _, _, _, num_elements, _, dtype| spec([*num_elements], *dtype))]
    fn dequantize_4bit_double(
        packed: IntTensor<Self>,
        absmax_codes: IntTensor<Self>,
        nested_absmax: FloatTensor<Self>,
        map: FloatTensor<Self>,
        code: FloatTensor<Self>,
        offset: f32,
        num_elements: usize,
        block_size: usize,
        dtype: DType,
    ) -> FloatTensor<Self>;

    /// `input · Wᵀ` for a `[rows, cols]` input and a packed `[features, cols]` weight (`cols` a
    /// multiple of 8), dequantizing inside the product: decoding's matrix-vector products.
    #[fusion(meta = |input, _, _, _, _, features, _| spec([input.shape[0], *features], input.dtype))]
    fn matvec_4bit(
        input: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        code: FloatTensor<Self>,
        offset: f32,
        features: usize,
        block_size: usize,
    ) -> FloatTensor<Self>;

    /// The nested absmax decoded, without the offset: `map[code] * nested_absmax[i / 256]`.
    #[fusion(meta = |_, _, _, num_blocks| spec([*num_blocks], DType::F32))]
    fn dequantize_absmax(
        codes: IntTensor<Self>,
        nested_absmax: FloatTensor<Self>,
        map: FloatTensor<Self>,
        num_blocks: usize,
    ) -> FloatTensor<Self>;

    /// Packed words and absmax of a flat tensor.
    #[fusion(meta = |input, _, _, block_size, _| {
        let (words, blocks) = quantized_lens(input.shape.num_elements(), *block_size);
        (spec([words], DType::U32), spec([blocks], DType::F32))
    })]
    fn quantize_4bit(
        input: FloatTensor<Self>,
        thresholds: FloatTensor<Self>,
        remap: IntTensor<Self>,
        block_size: usize,
        signed_magnitude: bool,
    ) -> (IntTensor<Self>, FloatTensor<Self>);

    /// Packed 8-bit codes and nested absmax of `absmax - offset`.
    #[fusion(meta = |absmax, _, _| {
        let (code_words, nested_blocks) = double_quantized_lens(absmax.shape.num_elements());
        (spec([code_words], DType::U32), spec([nested_blocks], DType::F32))
    })]
    fn quantize_absmax(
        absmax: FloatTensor<Self>,
        map: FloatTensor<Self>,
        offset: f32,
    ) -> (IntTensor<Self>, FloatTensor<Self>);
}

/// Packed words and absmax blocks of `num_elements` values quantized in blocks of `block_size`:
/// the lengths `quantize_4bit` returns (and tells fusion before running).
fn quantized_lens(num_elements: usize, block_size: usize) -> (usize, usize) {
    (
        num_elements.div_ceil(WORD_ELEMENTS),
        num_elements.div_ceil(block_size),
    )
}

/// Code words (four 8-bit codes each) and nested absmax of `num_blocks` double-quantized absmax:
/// the lengths `quantize_absmax` returns.
fn double_quantized_lens(num_blocks: usize) -> (usize, usize) {
    (
        num_blocks.div_ceil(4),
        num_blocks.div_ceil(NESTED_BLOCK_SIZE),
    )
}

/// The shape and dtype of an operation's output, for Burn's fusion, which records the operation
/// before running it.
#[cfg(feature = "fusion")]
pub(crate) fn spec<const D: usize>(
    dims: [usize; D],
    dtype: DType,
) -> burn::backend::fusion::custom::TensorSpec {
    burn::backend::fusion::custom::TensorSpec::new(Shape::new(dims), dtype)
}

/// An uninitialized output of `shape` and `dtype` on `reference`'s device, for a kernel.
///
/// Contiguous, as every kernel here writes its output as flat memory: Burn's default allocation
/// may pitch the rows of a 2-D or wider tensor on CUDA (each padded to a multiple of up to 32
/// bytes), which would misplace ragged rows.
pub(crate) fn empty_output(
    reference: &CubeTensor,
    shape: impl Into<Shape>,
    dtype: DType,
) -> CubeTensor {
    empty_device_contiguous_dtype(
        reference.client.clone(),
        reference.device.clone(),
        shape.into(),
        dtype,
    )
}

/// Where a kernel that sums a prior gradient into its result reads that prior.
pub(crate) enum PriorRead {
    /// No prior to add.
    None,
    /// The output's own buffer holds it: the prior was taken as the output.
    InPlace,
    /// Something else holds the prior too: it is read from its own buffer beside a new output.
    Separate(Box<CubeTensor>),
}

/// The output of a kernel that adds `prior` (one that fits its output) before its one rounding,
/// and where it reads the prior: in place where nothing else holds it, else beside a new output
/// from `new_output`. The numbers are the same either way, so the prior's other holders, which
/// depend on timing, never change a result.
pub(crate) fn output_over_prior(
    prior: Option<CubeTensor>,
    new_output: impl FnOnce() -> CubeTensor,
) -> (CubeTensor, PriorRead) {
    match prior {
        Some(prior) if prior.can_mut() => (prior, PriorRead::InPlace),
        Some(prior) => (new_output(), PriorRead::Separate(Box::new(prior))),
        None => (new_output(), PriorRead::None),
    }
}

/// One unit per element: the cube count and size for `units` units.
pub(crate) fn launch_dims(tensor: &CubeTensor, units: usize) -> (cubecl::CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(&tensor.client, units);
    let cube_count = calculate_cube_count_elemwise(&tensor.client, units, cube_dim);
    (cube_count, cube_dim)
}

/// The widest vector of `tensor`'s dtype the runtime likes whose length divides `len` (1 if
/// none).
pub(crate) fn vector_size(tensor: &CubeTensor, len: usize) -> usize {
    io_vector_size(&tensor.client, tensor.dtype, len)
}

/// [`vector_size`] for a `dtype` tensor not allocated yet.
fn io_vector_size(client: &Client, dtype: DType, len: usize) -> usize {
    client
        .io_optimized_vector_sizes(dtype.size())
        .filter(|size| len.is_multiple_of(*size))
        .max()
        .unwrap_or(1)
}

/// `tensor` as a kernel walks it through its strides (a storage-tiled one, which has none,
/// copied contiguous), its strides, and the vector size for its runs of `len` elements along
/// the last dimension: the widest [`vector_size`] where that dimension is contiguous and every
/// other stride a multiple of `len` (each run starts on a vector), else 1.
pub(crate) fn strided_runs(tensor: CubeTensor, len: usize) -> (CubeTensor, Vec<usize>, usize) {
    let tensor = if tensor.meta.is_tiled() {
        into_contiguous(tensor)
    } else {
        tensor
    };
    let strides = tensor.meta.strides().to_vec();
    let (last, outer) = strides.split_last().expect("at least one dimension");
    let vector = if *last == 1 && outer.iter().all(|s| s % len.max(1) == 0) {
        vector_size(&tensor, len)
    } else {
        1
    };
    (tensor, strides, vector)
}

impl Quant4bitOps for CubeBackend {
    fn dequantize_4bit(
        packed: CubeTensor,
        absmax: CubeTensor,
        code: CubeTensor,
        offset: f32,
        num_elements: usize,
        block_size: usize,
        dtype: DType,
    ) -> CubeTensor {
        let output = empty_output(&packed, [num_elements], dtype);
        let words = num_elements.div_ceil(WORD_ELEMENTS);
        let (cube_count, cube_dim) = launch_dims(&packed, words);
        let block_shift = block_size.trailing_zeros();
        // The widest store the runtime likes that divides a word's eight values.
        let lanes = io_vector_size(&packed.client, dtype, WORD_ELEMENTS);
        if num_elements.is_multiple_of(WORD_ELEMENTS) && lanes > 1 {
            // SAFETY: `words` units each read one word, the absmax of its block and 16 codes, and
            // write the eight values of that word, all inside the output.
            unsafe {
                dequantize_4bit_vector_kernel::launch_unchecked(
                    &output.client,
                    cube_count,
                    cube_dim,
                    lanes,
                    into_contiguous(packed).into_buffer_arg(),
                    into_contiguous(absmax).into_buffer_arg(),
                    into_contiguous(code).into_buffer_arg(),
                    output.clone().into_buffer_arg(),
                    offset,
                    words,
                    block_shift,
                    dtype_to_storage_type(dtype),
                );
            }
            return output;
        }
        // SAFETY: `words` units each read one word of `packed` (ceil(n / 8) long), the absmax of
        // its block and 16 codes, and write only in-bounds outputs.
        unsafe {
            dequantize_4bit_kernel::launch_unchecked(
                &output.client,
                cube_count,
                cube_dim,
                into_contiguous(packed).into_buffer_arg(),
                into_contiguous(absmax).into_buffer_arg(),
                into_contiguous(code).into_buffer_arg(),
                output.clone().into_buffer_arg(),
                offset,
                num_elements,
                block_shift,
                dtype_to_storage_type(dtype),
            );
        }
        output
    }

    fn dequantize_4bit_double(
        packed: CubeTensor,
        absmax_codes: CubeTensor,
        nested_absmax: CubeTensor,
        map: CubeTensor,
        code: CubeTensor,
        offset: f32,
        num_elements: usize,
        block_size: usize,
        dtype: DType,
    ) -> CubeTensor {
        let num_blocks = num_elements.div_ceil(block_size);
        let lanes = io_vector_size(&packed.client, dtype, WORD_ELEMENTS);
        if !num_elements.is_multiple_of(WORD_ELEMENTS) || lanes == 1 {
            let absmax = Self::dequantize_absmax(absmax_codes, nested_absmax, map, num_blocks);
            return Self::dequantize_4bit(
                packed,
                absmax,
                code,
                offset,
                num_elements,
                block_size,
                dtype,
            );
        }
        let output = empty_output(&packed, [num_elements], dtype);
        let words = num_elements / WORD_ELEMENTS;
        let cube_dim = CubeDim::new_1d(DEQUANTIZE_CUBE_UNITS as u32);
        let units = words.div_ceil(DEQUANTIZE_UNIT_WORDS);
        let cube_count = calculate_cube_count_elemwise(&output.client, units, cube_dim);
        // SAFETY: a cube's units read the absmax codes and nested absmax of the cube's blocks
        // (guarded by `num_blocks`); each unit then reads its words, 16 codes and its blocks'
        // decoded absmax, and writes those words' eight values each, all guarded by `words`.
        unsafe {
            dequantize_4bit_double_kernel::launch_unchecked(
                &output.client,
                cube_count,
                cube_dim,
                lanes,
                into_contiguous(packed).into_buffer_arg(),
                into_contiguous(absmax_codes).into_buffer_arg(),
                into_contiguous(nested_absmax).into_buffer_arg(),
                into_contiguous(map).into_buffer_arg(),
                into_contiguous(code).into_buffer_arg(),
                output.clone().into_buffer_arg(),
                offset,
                words,
                num_blocks,
                block_size.trailing_zeros(),
                dtype_to_storage_type(dtype),
            );
        }
        output
    }

    fn matvec_4bit(
        input: CubeTensor,
        packed: CubeTensor,
        absmax: CubeTensor,
        code: CubeTensor,
        offset: f32,
        features: usize,
        block_size: usize,
    ) -> CubeTensor {
        let [rows, cols] = input.meta.shape().dims();
        assert!(
            cols.is_multiple_of(WORD_ELEMENTS),
            "matvec_4bit needs whole words per row, got {cols} columns"
        );
        let dtype = input.dtype;
        let output = empty_output(&input, [rows, features], dtype);
        let cube_count = CubeCount::new_2d(
            features.div_ceil(MATVEC_FEATURES_PER_CUBE as usize) as u32,
            rows as u32,
        );
        let cube_dim = CubeDim::new_2d(MATVEC_LANES, MATVEC_FEATURES_PER_CUBE);
        // SAFETY: each cube reads one input row and the packed rows of its features (guarded by
        // `features`), and writes those features' outputs in that row.
        unsafe {
            matvec_4bit_kernel::launch_unchecked(
                &output.client,
                cube_count,
                cube_dim,
                into_contiguous(input).into_buffer_arg(),
                into_contiguous(packed).into_buffer_arg(),
                into_contiguous(absmax).into_buffer_arg(),
                into_contiguous(code).into_buffer_arg(),
                output.clone().into_buffer_arg(),
                offset,
                features,
                cols,
                block_size.trailing_zeros(),
                dtype_to_storage_type(dtype),
            );
        }
        output
    }

    fn dequantize_absmax(
        codes: CubeTensor,
        nested_absmax: CubeTensor,
        map: CubeTensor,
        num_blocks: usize,
    ) -> CubeTensor {
        let output = empty_output(&codes, [num_blocks], DType::F32);
        let (cube_count, cube_dim) = launch_dims(&codes, num_blocks);
        // SAFETY: one unit per absmax, each reading its code word, its nested absmax and the map.
        unsafe {
            dequantize_absmax_kernel::launch_unchecked(
                &output.client,
                cube_count,
                cube_dim,
                into_contiguous(codes).into_buffer_arg(),
                into_contiguous(nested_absmax).into_buffer_arg(),
                into_contiguous(map).into_buffer_arg(),
                output.clone().into_buffer_arg(),
                num_blocks,
            );
        }
        output
    }

    fn quantize_4bit(
        input: CubeTensor,
        thresholds: CubeTensor,
        remap: CubeTensor,
        block_size: usize,
        signed_magnitude: bool,
    ) -> (CubeTensor, CubeTensor) {
        let num_elements = input.meta.shape().num_elements();
        let (words, blocks) = quantized_lens(num_elements, block_size);
        let packed = empty_output(&input, [words], DType::U32);
        let absmax = empty_output(&input, [blocks], DType::F32);
        let (cube_count, cube_dim) = launch_dims(&input, blocks);
        let dtype = input.dtype;
        let num_thresholds = thresholds.meta.shape().num_elements();
        // SAFETY: one unit per block; it reads its block and writes its absmax and the words
        // that start inside it.
        unsafe {
            quantize_4bit_kernel::launch_unchecked(
                &packed.client,
                cube_count,
                cube_dim,
                into_contiguous(input).into_buffer_arg(),
                into_contiguous(thresholds).into_buffer_arg(),
                into_contiguous(remap).into_buffer_arg(),
                packed.clone().into_buffer_arg(),
                absmax.clone().into_buffer_arg(),
                num_elements,
                block_size,
                signed_magnitude,
                num_thresholds,
                dtype_to_storage_type(dtype),
            );
        }
        (packed, absmax)
    }

    fn quantize_absmax(
        absmax: CubeTensor,
        map: CubeTensor,
        offset: f32,
    ) -> (CubeTensor, CubeTensor) {
        let num_blocks = absmax.meta.shape().num_elements();
        let (code_words, nested_blocks) = double_quantized_lens(num_blocks);
        let codes = empty_output(&absmax, [code_words], DType::U32);
        let nested_absmax = empty_output(&absmax, [nested_blocks], DType::F32);
        let (cube_count, cube_dim) = launch_dims(&absmax, nested_blocks);
        // SAFETY: one unit per nested block of 256; it writes its nested absmax and its code words.
        unsafe {
            quantize_absmax_kernel::launch_unchecked(
                &codes.client,
                cube_count,
                cube_dim,
                into_contiguous(absmax).into_buffer_arg(),
                into_contiguous(map).into_buffer_arg(),
                codes.clone().into_buffer_arg(),
                nested_absmax.clone().into_buffer_arg(),
                offset,
                num_blocks,
            );
        }
        (codes, nested_absmax)
    }
}
