//! A matrix product with a 4-bit weight, as a Burn operation: the weight is dequantized on the
//! fly for the product and dropped right after, in the forward pass and again in the backward
//! pass. Its `Autodiff` implementation keeps only the packed weight for backward, never the
//! dense one (torchao's `linear_nf4` does the same; a plain `x.matmul(w)` would keep `w`),
//! unless the caller made one to share ([`DenseCopy`]).
//!
//! CubeCL devices dequantize with the kernels; Flex (the CPU backend) on the host
//! (`host_dequantize`).

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, ExtensionType, TensorMetadata, backend_extension};
use burn::tensor::{Shape, Tensor};

use crate::{DeviceAbsmax, Packed4bit, QuantError, QuantType};

/// The device state of a `[rows, cols]` 4-bit weight, as backend primitives.
#[derive(ExtensionType, Clone, Debug)]
#[extension_type(fusion: cfg(all(feature = "cube", feature = "fusion")))]
pub struct Weight4bitPrimitive<B: Backend> {
    /// Packed codes, eight to a `u32` word, first element in the high nibble of each byte.
    pub words: IntTensor<B>,
    #[extension_type]
    pub absmax: AbsmaxPrimitive<B>,
    /// The 16 code-book values, f32.
    pub code: FloatTensor<B>,
    pub quant_type: QuantType,
    pub block_size: usize,
    /// `[rows, cols]`, torch's `[out_features, in_features]` for a linear layer.
    pub shape: [usize; 2],
    #[extension_type]
    pub dense: DenseCopy<B>,
}

/// The weight already dequantized, `[rows, cols]`, where a caller made it once for several
/// products in a row (a checkpointed layer's recomputation and its backward): the products that
/// would dequantize the weight whole read it instead.
#[derive(ExtensionType, Clone, Debug)]
#[extension_type(fusion: cfg(all(feature = "cube", feature = "fusion")))]
pub enum DenseCopy<B: Backend> {
    Absent,
    Kept(FloatTensor<B>),
}

impl<B: Backend> DenseCopy<B> {
    /// The copy in `dtype`, cast where it was made in another.
    fn in_dtype(self, dtype: burn::tensor::DType) -> Option<FloatTensor<B>> {
        match self {
            Self::Absent => None,
            Self::Kept(dense) if dense.dtype() == dtype => Some(dense),
            Self::Kept(dense) => Some(B::float_cast(dense, dtype.into())),
        }
    }
}

/// Plain f32 absmax, or bitsandbytes' double-quantized form.
#[derive(ExtensionType, Clone, Debug)]
#[extension_type(fusion: cfg(all(feature = "cube", feature = "fusion")))]
pub enum AbsmaxPrimitive<B: Backend> {
    Plain(FloatTensor<B>),
    Double {
        /// 8-bit codes, four to a `u32` word.
        codes: IntTensor<B>,
        nested_absmax: FloatTensor<B>,
        /// The dynamic map the codes index.
        map: FloatTensor<B>,
        offset: f32,
    },
}

impl<B: Backend> Weight4bitPrimitive<B> {
    fn num_elements(&self) -> usize {
        self.shape[0] * self.shape[1]
    }
}

impl AbsmaxPrimitive<Dispatch> {
    /// The primitives of a packed weight's device absmax.
    pub(crate) fn new(absmax: &DeviceAbsmax) -> Self {
        match absmax {
            DeviceAbsmax::Plain(absmax) => Self::Plain(absmax.clone().into_dispatch()),
            DeviceAbsmax::Double {
                codes,
                nested_absmax,
                offset,
                map,
            } => Self::Double {
                codes: codes.clone().into_dispatch(),
                nested_absmax: nested_absmax.clone().into_dispatch(),
                map: map.clone().into_dispatch(),
                offset: *offset,
            },
        }
    }
}

/// The absmax as f32 values and the offset still to add: double-quantized absmax decoded first.
#[cfg(feature = "cube")]
pub(crate) fn decoded_absmax<B: crate::extension::Quant4bitOps>(
    absmax: AbsmaxPrimitive<B>,
    num_elements: usize,
    block_size: usize,
) -> (FloatTensor<B>, f32) {
    match absmax {
        AbsmaxPrimitive::Plain(absmax) => (absmax, 0.0),
        AbsmaxPrimitive::Double {
            codes,
            nested_absmax,
            map,
            offset,
        } => {
            let blocks = num_elements.div_ceil(block_size);
            (
                B::dequantize_absmax(codes, nested_absmax, map, blocks),
                offset,
            )
        }
    }
}

/// The flat dense weight in `dtype` from its packed words, absmax and code book, through the
/// CubeCL kernels: one launch, a double-quantized absmax decoded inside it.
#[cfg(feature = "cube")]
pub(crate) fn dequantize_flat<B: crate::extension::Quant4bitOps>(
    words: IntTensor<B>,
    absmax: AbsmaxPrimitive<B>,
    code: FloatTensor<B>,
    num_elements: usize,
    block_size: usize,
    dtype: burn::tensor::DType,
) -> FloatTensor<B> {
    match absmax {
        AbsmaxPrimitive::Plain(absmax) => {
            B::dequantize_4bit(words, absmax, code, 0.0, num_elements, block_size, dtype)
        }
        AbsmaxPrimitive::Double {
            codes,
            nested_absmax,
            map,
            offset,
        } => B::dequantize_4bit_double(
            words,
            codes,
            nested_absmax,
            map,
            code,
            offset,
            num_elements,
            block_size,
            dtype,
        ),
    }
}

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex"),
    Autodiff
)]
pub trait Matmul4bitOps: Backend {
    /// `lhs · Wᵀ` when `transpose` (a linear layer's forward, `lhs` `[.., cols]`), else `lhs · W`
    /// (its input gradient, `lhs` `[.., rows]`), in `lhs`' dtype.
    #[fusion(meta = |lhs, weight, transpose| {
        let [rows, cols] = weight.shape;
        let mut spec = lhs.clone();
        let last = spec.shape.len() - 1;
        spec.shape[last] = if *transpose { rows } else { cols };
        spec
    })]
    fn matmul_4bit(
        lhs: FloatTensor<Self>,
        #[extension_type] weight: Weight4bitPrimitive<Self>,
        transpose: bool,
    ) -> FloatTensor<Self>;
}

/// `product` of `lhs` flattened to `[rows, last dimension]`, its `[rows, n]` result given
/// `lhs`' leading dimensions back.
pub(crate) fn over_rows<B: Backend>(
    lhs: FloatTensor<B>,
    product: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<B> {
    let mut dims = lhs.shape().to_vec();
    let inner = dims
        .pop()
        .expect("a matmul input has at least one dimension");
    let rows = dims.iter().product::<usize>();
    let out = product(B::float_reshape(lhs, Shape::new([rows, inner])));
    dims.push(out.shape()[1]);
    B::float_reshape(out, Shape::from(dims))
}

/// A dense `[rows, cols]` weight as the right-hand side of `lhs · Wᵀ` (`transpose`) or `lhs · W`.
pub(crate) fn oriented<B: Backend>(dense: FloatTensor<B>, transpose: bool) -> FloatTensor<B> {
    if transpose {
        B::float_transpose(dense)
    } else {
        dense
    }
}

/// `lhs · W` (or `Wᵀ`) over `lhs`' last dimension, for a dense `[rows, cols]` weight, with
/// `product` doing the 2-D matmul of the flattened `lhs` and the (transposed) weight.
fn matmul_dense<B: Backend>(
    lhs: FloatTensor<B>,
    dense: FloatTensor<B>,
    transpose: bool,
    product: impl FnOnce(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<B> {
    let rhs = oriented::<B>(dense, transpose);
    over_rows::<B>(lhs, |lhs| product(lhs, rhs))
}

#[cfg(feature = "cube")]
pub(crate) mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::matmul::init_matmul_output;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::ir::features::Tma;
    use cubecl::ir::{ElemType, FloatKind};
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems, MatmulProblem};
    use cubek::matmul::multi_level::components::global::{InputLoadFlow, LoadFlows};
    use cubek::matmul::multi_level::components::stage::PartitionBuffering;
    use cubek::matmul::multi_level::components::tile::TileMatmulKind;
    use cubek::matmul::multi_level::definition::{BatchMatmulBlueprint, TilingScheme};
    use cubek::matmul::multi_level::routines::select_swizzle;
    use cubek::matmul::multi_level::stage::SwizzleModes;
    use cubek::matmul::multi_level::{PartitionSize, StageSize, Strategy, TileSize};
    use cubek::matmul::routine::BlueprintStrategy;
    use cubek::std::cube_count::{
        CubeCountStrategy, GlobalOrder, HypercubeBlueprint, SmAllocation,
    };
    use cubek::std::{InputBinding, MatrixLayout};

    use super::{
        Matmul4bitOps, Weight4bitPrimitive, decoded_absmax, dequantize_flat, matmul_dense,
        over_rows,
    };
    use crate::extension::Quant4bitOps;
    use crate::kernels::WORD_ELEMENTS;

    impl Matmul4bitOps for CubeBackend {
        fn matmul_4bit(
            lhs: CubeTensor,
            weight: Weight4bitPrimitive<Self>,
            transpose: bool,
        ) -> CubeTensor {
            let [features, cols] = weight.shape;
            let rows = lhs.shape().num_elements() / cols;
            if transpose && rows <= MATVEC_MAX_ROWS && cols.is_multiple_of(WORD_ELEMENTS) {
                let num_elements = weight.num_elements();
                let (absmax, offset) =
                    decoded_absmax::<Self>(weight.absmax, num_elements, weight.block_size);
                return over_rows::<Self>(lhs, |lhs| {
                    Self::matvec_4bit(
                        lhs,
                        weight.words,
                        absmax,
                        weight.code,
                        offset,
                        features,
                        weight.block_size,
                    )
                });
            }
            // Over 2-D rows: the weight dequantized inside the product where that kernel takes
            // the operands.
            #[cfg(feature = "cuda")]
            if lhs.dtype() == DType::BF16 && lhs.is_contiguous() {
                let dtype = lhs.dtype();
                return over_rows::<Self>(lhs, |lhs| {
                    if let Some((out, _)) =
                        crate::wgmma_4bit::product(&lhs, &weight, transpose, None)
                    {
                        return out;
                    }
                    dense_product(
                        lhs,
                        super::oriented::<Self>(dequantized(weight, dtype), transpose),
                    )
                });
            }
            let dense = dequantized(weight, lhs.dtype());
            matmul_dense::<Self>(lhs, dense, transpose, dense_product)
        }
    }

    /// The weight dequantized whole, `[rows, cols]` in `dtype` (its dense copy where it has one).
    pub(crate) fn dequantized(
        weight: Weight4bitPrimitive<CubeBackend>,
        dtype: DType,
    ) -> CubeTensor {
        let num_elements = weight.num_elements();
        if let Some(dense) = weight.dense.in_dtype(dtype) {
            return dense;
        }
        let dense = dequantize_flat::<CubeBackend>(
            weight.words,
            weight.absmax,
            weight.code,
            num_elements,
            weight.block_size,
            dtype,
        );
        CubeBackend::float_reshape(dense, Shape::new(weight.shape))
    }

    /// `lhs · rhs` for operands of one rank with the same batch dimensions: the `wgmma` kernel
    /// where it applies, else the TMA routine where that does, else Burn's matmul.
    pub(crate) fn dense_product(lhs: CubeTensor, rhs: CubeTensor) -> CubeTensor {
        #[cfg(feature = "cuda")]
        if let Some(out) = crate::wgmma::product(&lhs, &rhs) {
            return out;
        }
        matmul_tma(&lhs, &rhs).unwrap_or_else(|| CubeBackend::float_matmul(lhs, rhs))
    }

    /// Up to this many rows (decoding: one per sequence of the batch), a linear layer's forward
    /// reads the packed weight inside a matrix-vector kernel instead of dequantizing it whole.
    pub(crate) const MATVEC_MAX_ROWS: usize = 4;

    /// Smallest dimension, and the multiple every dimension must be, for the TMA routine: smaller
    /// or ragged products (decoding's one row, odd model widths) stay on Burn's matmul, where
    /// cubecl-cuda's TMA launch checks can panic instead of declining. 128 lets attention's
    /// products over a 128-wide head in.
    const TMA_MIN_DIM: usize = 128;
    const TMA_DIM_MULTIPLE: usize = 64;

    /// Whether the TMA routine can read `tensor` as it is laid out: its matrices row- or
    /// column-major and its batch dimensions one evenly strided run (cubek's tensor map
    /// collapses them to one), as a contiguous tensor or its transpose is.
    fn tma_readable(tensor: &CubeTensor) -> bool {
        let shape = tensor.shape();
        let strides = tensor.meta.strides();
        let rank = shape.num_dims();
        if tensor.meta.is_tiled() {
            return false;
        }
        let matrix = strides[rank - 1] == 1 || strides[rank - 2] == 1;
        let batches_even = (0..rank.saturating_sub(3))
            .all(|dim| strides[dim] == strides[dim + 1] * shape[dim + 1]);
        matrix && batches_even
    }

    /// The product through cubek's warp-specialized TMA routine with MMA tiles, on devices with
    /// TMA (Hopper and later) and large aligned shapes; `None` where it does not apply. Burn picks
    /// a routine only through autotune (which crashes on CUDA here) and otherwise takes the simple
    /// cyclic CMMA one; on an H100 at 2048 x 4096 x 11008 this one halves the forward (4.3 ms to
    /// 2.2) and makes 7B QLoRA training 1.5x faster (BENCHMARKS.md).
    fn matmul_tma(lhs: &CubeTensor, rhs: &CubeTensor) -> Option<CubeTensor> {
        // Measured in bf16 only; f16 shares its tiles, f32 is left to Burn.
        let half = matches!(lhs.dtype(), DType::BF16 | DType::F16);
        if !half
            || rhs.dtype() != lhs.dtype()
            || !lhs.client.properties().features.tma.contains(Tma::Base)
        {
            return None;
        }
        let fits = |dim: usize| dim >= TMA_MIN_DIM && dim.is_multiple_of(TMA_DIM_MULTIPLE);
        let (lhs_shape, rhs_shape) = (lhs.shape(), rhs.shape());
        let rank = lhs_shape.num_dims();
        if rhs_shape.num_dims() != rank
            || lhs_shape[..rank - 2] != rhs_shape[..rank - 2]
            || !(fits(lhs_shape[rank - 2]) && fits(lhs_shape[rank - 1]))
            || !fits(rhs_shape[rank - 1])
        {
            return None;
        }
        let lhs = &readable(lhs);
        let rhs = &readable(rhs);
        let dtype = lhs.dtype();
        let client = lhs.client.clone();
        let out = init_matmul_output(lhs, rhs, dtype);
        let storage = dtype_to_storage_type(dtype);
        let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
            lhs: storage,
            rhs: storage,
            out: storage,
        });
        let lhs = InputBinding::new(lhs.clone().binding(), storage);
        let rhs = InputBinding::new(rhs.clone().binding(), storage);
        let out_binding = out.clone().binding();
        let problem = MatmulProblem::from_shapes_and_strides(
            lhs.shape().into(),
            rhs.shape().into(),
            out_binding.shape.clone(),
            lhs.data().strides.clone(),
            rhs.data().strides.clone(),
            out_binding.strides.clone(),
            dtypes.as_global_elems(),
            lhs.required_address_type()
                .max(rhs.required_address_type())
                .max(out_binding.required_address_type(dtype.size())),
            None,
            None,
        )
        .ok()?;
        let num_sms = client.properties().hardware.num_streaming_multiprocessors;
        let tiling = TmaTiling::chosen(&problem, num_sms);
        let strategy = Strategy::SpecializedTmaMma(BlueprintStrategy::Forced(
            tiling.blueprint(&problem, num_sms),
        ));
        cubek::matmul::launch::launch_ref(
            &strategy.into(),
            &client,
            lhs,
            rhs,
            out_binding,
            &mut dtypes,
        )
        .inspect_err(|err| warn_once(&format!("the TMA matmul declined {tiling:?}: {err:?}")))
        .ok()?;
        Some(out)
    }

    /// `tensor`, copied to contiguous memory where the TMA routine could not read it in place.
    fn readable(tensor: &CubeTensor) -> CubeTensor {
        if tma_readable(tensor) {
            tensor.clone()
        } else {
            burn_cubecl::kernel::into_contiguous(tensor.clone())
        }
    }

    /// How the TMA routine tiles a product: each compute plane owns `rows` x `cols` MMA tiles
    /// (16 x 8 elements) of the output, `planes` planes stacked along the rows make a cube's
    /// tile, and each stage of the depth loop (two in flight) is `depth` x 16 deep.
    #[derive(Clone, Copy, Debug)]
    struct TmaTiling {
        rows: u32,
        cols: u32,
        depth: u32,
        planes: u32,
    }

    impl TmaTiling {
        /// Tuned on an H100 at 2048 tokens over 22 tilings (BENCHMARKS.md): planes of 32 x 128
        /// outputs, eight of them to a cube's 256 x 128, stages 64 deep. Against cubek's own
        /// choice (planes of 16 x 128 sixteen to a cube, stages 32 deep; 128 x 64 cubes for a
        /// row-major weight) the forward is 25% faster and the input gradient 40%.
        const TUNED: Self = Self {
            rows: 2,
            cols: 16,
            depth: 4,
            planes: 8,
        };

        /// Quarter-size cubes (128 x 64), for outputs the tuned ones would cover with fewer
        /// cubes than the device has SMs: the 7B head's input gradient, `[1024, 4096]`, is 128
        /// tuned cubes on 132 SMs, each running a 32000-deep loop alone.
        const SMALL: Self = Self {
            rows: 1,
            cols: 8,
            depth: 4,
            planes: 8,
        };

        /// The one `KERNELS_CUBECL_TMA_TILING=rows,cols,depth,planes` names (read once), to tune
        /// another device (`bench-kernels --tables matmul` times the products); else the tuned
        /// tiling, or the small one where the tuned one leaves SMs idle.
        fn chosen(problem: &MatmulProblem, num_sms: Option<u32>) -> Self {
            static FROM_ENV: std::sync::OnceLock<Option<TmaTiling>> = std::sync::OnceLock::new();
            if let Some(tiling) = *FROM_ENV.get_or_init(Self::from_env) {
                return tiling;
            }
            let cubes = Self::TUNED.cubes(problem);
            match num_sms {
                Some(num_sms) if cubes < num_sms as usize => Self::SMALL,
                _ => Self::TUNED,
            }
        }

        /// Cubes covering the product's output, every batch of it.
        fn cubes(self, problem: &MatmulProblem) -> usize {
            let cube_rows = (self.rows * MMA_ROWS * self.planes) as usize;
            let cube_cols = (self.cols * MMA_COLS) as usize;
            let batches = problem.out_batches.iter().product::<usize>();
            batches * problem.m.div_ceil(cube_rows) * problem.n.div_ceil(cube_cols)
        }

        fn from_env() -> Option<Self> {
            let text = std::env::var("KERNELS_CUBECL_TMA_TILING").ok()?;
            let parts: Vec<u32> = text
                .split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect();
            match parts[..] {
                [rows, cols, depth, planes] => Some(Self {
                    rows,
                    cols,
                    depth,
                    planes,
                }),
                _ => {
                    warn_once(&format!(
                        "KERNELS_CUBECL_TMA_TILING={text:?} is not rows,cols,depth,planes"
                    ));
                    None
                }
            }
        }

        /// cubek's blueprint for this tiling, otherwise as its own selector makes it for the
        /// specialized routine: double-buffered partitions, TMA boxes swizzled where they
        /// span 32, 64 or 128 bytes, load-only planes beside the compute planes.
        fn blueprint(self, problem: &MatmulProblem, num_sms: Option<u32>) -> BatchMatmulBlueprint {
            let tiling_scheme = TilingScheme::builder()
                .with_tile_size(TileSize::new(MMA_ROWS, MMA_COLS, MMA_DEPTH))
                .with_partition_size(PartitionSize::new(self.rows, self.cols, self.depth))
                .with_stage_size(StageSize::new(self.planes, 1, 1))
                .build()
                .expect("a tiling of whole tiles");
            let cube_count_strategy = match num_sms {
                Some(num_sms) => CubeCountStrategy::Sm {
                    num_sms,
                    sm_usage: SmAllocation::Exact,
                    cubes_first: true,
                },
                None => CubeCountStrategy::FromProblem,
            };
            let hypercube = HypercubeBlueprint::builder()
                .global_order(GlobalOrder::SwizzleRow(4))
                .cube_count_strategy(cube_count_strategy)
                .build();
            let swizzle =
                |dim: u32| select_swizzle(dim as usize, ElemType::Float(FloatKind::BF16), 1);
            let along_k = tiling_scheme.elements_per_stage_along_k();
            let lhs = match problem.lhs_layout {
                MatrixLayout::RowMajor => swizzle(along_k),
                MatrixLayout::ColMajor => swizzle(tiling_scheme.elements_per_stage_along_m()),
            };
            let rhs = match problem.rhs_layout {
                MatrixLayout::RowMajor => swizzle(tiling_scheme.elements_per_stage_along_n()),
                MatrixLayout::ColMajor => swizzle(along_k),
            };
            let buffering = if self.cols > 1 {
                PartitionBuffering::Double
            } else {
                PartitionBuffering::Single
            };
            BatchMatmulBlueprint::builder(TileMatmulKind::Mma, tiling_scheme, PLANE_DIM, problem)
                .partition_buffering(buffering)
                .stage_buffering(2)
                .hypercube_blueprint(hypercube)
                .load_specialization_config(LoadFlows {
                    lhs: InputLoadFlow::LoadOnly,
                    rhs: InputLoadFlow::LoadOnly,
                })
                .shared_swizzle(SwizzleModes {
                    lhs,
                    rhs,
                    ..Default::default()
                })
                .build()
        }
    }

    /// Lanes of a plane on the devices with TMA (NVIDIA's warps).
    const PLANE_DIM: u32 = 32;

    /// The MMA tile (`mma.sync` m16n8k16): output rows and columns, and depth.
    const MMA_ROWS: u32 = 16;
    const MMA_COLS: u32 = 8;
    const MMA_DEPTH: u32 = 16;

    fn warn_once(message: &str) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| eprintln!("kernels-cubecl: {message}; using Burn's matmul"));
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;

    use super::{AbsmaxPrimitive, Matmul4bitOps, Weight4bitPrimitive, matmul_dense};
    use crate::packed::words_to_bytes;
    use crate::{Absmax, NestedAbsmax, QuantState, host_dequantize};

    impl Matmul4bitOps for Flex {
        fn matmul_4bit(
            lhs: FlexTensor,
            weight: Weight4bitPrimitive<Self>,
            transpose: bool,
        ) -> FlexTensor {
            let dense = match weight.dense.clone().in_dtype(lhs.dtype()) {
                Some(dense) => dense,
                None => {
                    let state = host_state(weight, lhs.dtype());
                    let dense = host_dequantize::dequantize(&state)
                        .expect("the weight's state was validated");
                    FlexTensor::from_data(dense)
                }
            };
            matmul_dense::<Self>(lhs, dense, transpose, Self::float_matmul)
        }
    }

    /// The weight as a host state: Flex tensors live in host memory already.
    fn host_state(weight: Weight4bitPrimitive<Flex>, dtype: burn::tensor::DType) -> QuantState {
        let n = weight.num_elements();
        let blocks = n.div_ceil(weight.block_size);
        let absmax = match weight.absmax {
            AbsmaxPrimitive::Plain(absmax) => Absmax::Plain(f32s(absmax)),
            AbsmaxPrimitive::Double {
                codes,
                nested_absmax,
                offset,
                ..
            } => Absmax::Double(NestedAbsmax {
                codes: words_to_bytes(&u32s(codes), blocks),
                nested_absmax: f32s(nested_absmax),
                offset,
            }),
        };
        QuantState {
            quant_type: weight.quant_type,
            block_size: weight.block_size,
            shape: weight.shape.to_vec(),
            dtype,
            packed: words_to_bytes(&u32s(weight.words), n.div_ceil(2)),
            absmax,
        }
    }

    fn f32s(tensor: FlexTensor) -> Vec<f32> {
        tensor
            .into_data()
            .try_into_vec()
            .expect("absmax tensors are f32")
    }

    fn u32s(tensor: FlexTensor) -> Vec<u32> {
        tensor
            .into_data()
            .try_into_vec()
            .expect("packed words are u32")
    }
}

mod autodiff {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend};

    use super::{AbsmaxPrimitive, DenseCopy, Matmul4bitOps, Weight4bitPrimitive};

    impl<B: Backend, C: CheckpointStrategy> Weight4bitPrimitive<Autodiff<B, C>> {
        /// The weight on the inner backend: it is frozen, its float parts constants of the graph.
        pub(crate) fn into_inner(self) -> Weight4bitPrimitive<B> {
            Weight4bitPrimitive {
                words: self.words,
                absmax: match self.absmax {
                    AbsmaxPrimitive::Plain(absmax) => {
                        AbsmaxPrimitive::Plain(absmax.into_primitive())
                    }
                    AbsmaxPrimitive::Double {
                        codes,
                        nested_absmax,
                        map,
                        offset,
                    } => AbsmaxPrimitive::Double {
                        codes,
                        nested_absmax: nested_absmax.into_primitive(),
                        map: map.into_primitive(),
                        offset,
                    },
                },
                code: self.code.into_primitive(),
                quant_type: self.quant_type,
                block_size: self.block_size,
                shape: self.shape,
                dense: match self.dense {
                    DenseCopy::Absent => DenseCopy::Absent,
                    DenseCopy::Kept(dense) => DenseCopy::Kept(dense.into_primitive()),
                },
            }
        }
    }

    /// The backward of `matmul_4bit` with respect to `lhs`: the same product the other way
    /// round, dequantizing the packed weight once more.
    #[derive(Debug)]
    struct Matmul4bitBackward;

    impl<B: Matmul4bitOps> Backward<B, 1> for Matmul4bitBackward {
        type State = (Weight4bitPrimitive<B>, bool);

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let (weight, transpose) = ops.state;
            unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                B::matmul_4bit(grad, weight, !transpose)
            });
        }
    }

    impl<B: Matmul4bitOps, C: CheckpointStrategy> Matmul4bitOps for Autodiff<B, C> {
        fn matmul_4bit(
            lhs: FloatTensor<Self>,
            weight: Weight4bitPrimitive<Self>,
            transpose: bool,
        ) -> FloatTensor<Self> {
            let weight = weight.into_inner();
            match Matmul4bitBackward
                .prepare::<C>([lhs.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let output = B::matmul_4bit(lhs.into_primitive(), weight.clone(), transpose);
                    prep.finish((weight, transpose), output)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::matmul_4bit(lhs.into_primitive(), weight, transpose))
                }
            }
        }
    }
}

/// [`crate::Packed4bit::linear`] (`transpose`) and [`crate::Packed4bit::matmul`], their
/// arguments checked.
pub(crate) fn product<const D: usize>(
    input: Tensor<D>,
    weight: &Packed4bit,
    transpose: bool,
) -> Result<Tensor<D>, QuantError> {
    Ok(Tensor::from_dispatch(Dispatch::matmul_4bit(
        input.into_dispatch(),
        weight.primitive()?,
        transpose,
    )))
}

impl Packed4bit {
    /// The weight as the operations' primitive; an error on devices without them.
    pub(crate) fn primitive(&self) -> Result<Weight4bitPrimitive<Dispatch>, QuantError> {
        if !crate::has_extensions(&self.device()) {
            return Err(QuantError::Device(format!(
                "no 4-bit matmul for {:?}: use a CubeCL (cuda, wgpu) or Flex device",
                self.device()
            )));
        }
        Ok(Weight4bitPrimitive {
            words: self.words.clone().into_dispatch(),
            absmax: AbsmaxPrimitive::new(&self.absmax),
            code: self.code.clone().into_dispatch(),
            quant_type: self.quant_type,
            block_size: self.block_size,
            shape: self.matrix_shape("linear")?,
            dense: match &self.dense {
                Some(dense) => DenseCopy::Kept(dense.clone().into_dispatch()),
                None => DenseCopy::Absent,
            },
        })
    }
}
