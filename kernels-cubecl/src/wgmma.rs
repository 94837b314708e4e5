//! The bf16 product `A · B` on Hopper's warpgroup MMA (`wgmma`) fed by the TMA, `B` laid out
//! either way, hand-written in CUDA (`wgmma.cu`): cubek 0.3's tiles are `mma.sync`, which reach
//! about a third of an H100's bf16 peak. It enters CubeCL as a precompiled kernel, compiled by
//! NVRTC for `sm_90a` like the generated ones and launched on the same stream, with the dynamic
//! shared memory its text declares (our patch of cubecl-cuda: `third_party/cubecl-cuda/PATCH.md`)
//! and its operands' tensor maps, which cubecl-cuda encodes at launch and passes by value.

use burn::backend::TensorMetadata;
use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::attributes::BufferIOAttr;
use cubecl::ir::{ElemType, FloatKind, UIntKind};
use cubecl::prelude::*;
use cubecl::server::{KernelArguments, TensorMapBinding, TensorMapMeta};
use cubecl::zspace::metadata::Metadata;
use cubecl::zspace::{Shape, Strides};

use crate::extension::{PriorRead, empty_output, output_over_prior};
use crate::precompiled::{CudaKernel, Precompiled};

/// The kernel's text; the sizes and the accumulator's asm operands are prepended per product.
const SOURCE: &str = concat!(include_str!("wgmma_common.cu"), include_str!("wgmma.cu"));
const ENTRY_POINT: &str = "wgmma_bf16_tn";

/// The bf16 elements of one 128-byte row, the span of the TMA's widest swizzle: every box is that
/// wide along its matrix's contiguous dimension.
const SWIZZLE_ELEMENTS: usize = 64;
/// A block's output rows (`BM` in the source) and the depth of one stage (`BK`): one swizzled row.
const BLOCK_ROWS: usize = 128;
pub(crate) const STAGE_DEPTH: usize = SWIZZLE_ELEMENTS;
/// Two consumer warpgroups and one producer warp.
const THREADS: u32 = 256 + 32;
/// The ring's stages: 193 KiB at 256 wide, one block an SM. The narrower tiles use the same (eight
/// stages for 64-wide tiles measured no faster).
const STAGES: usize = 4;

/// A block's output columns (`BN`): 256 where they divide the product, else 128.
fn tile_cols(cols: usize) -> Option<usize> {
    [256, 128]
        .into_iter()
        .find(|&tile| cols.is_multiple_of(tile))
}

/// One launch's share of a product's columns: `tiles` tiles `tile_cols` wide from `first`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ColumnSpan {
    first: usize,
    tile_cols: usize,
    tiles: usize,
}

/// The launches that cover `cols` columns of `rows / BLOCK_ROWS` row tiles on `processors`
/// multiprocessors (a block each). One launch of `tile_cols`-wide tiles, unless its last wave
/// would leave most multiprocessors idle for a whole tile's time: then as many whole columns of
/// tiles as fill the full waves, and the rest in the narrowest tiles that fit in one wave, which
/// take a fraction of that time. The 7B MLP's 11008-wide products on 132 multiprocessors: 688
/// tiles, 5.2 waves, become 656 tiles (5 waves) and 128 tiles 64 wide.
fn column_spans(
    row_tiles: usize,
    cols: usize,
    tile_cols: usize,
    processors: usize,
) -> Vec<ColumnSpan> {
    let whole = vec![ColumnSpan {
        first: 0,
        tile_cols,
        tiles: cols / tile_cols,
    }];
    let full_waves = row_tiles * (cols / tile_cols) / processors;
    let main_tiles = full_waves * processors / row_tiles;
    let rest = cols - main_tiles * tile_cols;
    if full_waves == 0 || rest == 0 {
        return whole;
    }
    let narrow = [64, 128]
        .into_iter()
        .filter(|&narrow| narrow < tile_cols && rest.is_multiple_of(narrow))
        .find(|&narrow| row_tiles * (rest / narrow) <= processors);
    match narrow {
        Some(narrow) => vec![
            ColumnSpan {
                first: 0,
                tile_cols,
                tiles: main_tiles,
            },
            ColumnSpan {
                first: main_tiles * tile_cols,
                tile_cols: narrow,
                tiles: rest / narrow,
            },
        ],
        None => whole,
    }
}

/// The product for one shape and right-hand layout: both are compiled in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct WgmmaProduct {
    cols: usize,
    depth: usize,
    /// Whether the `[depth, cols]` right-hand side has contiguous rows (else contiguous columns).
    rhs_row_major: bool,
    tile_cols: usize,
    /// The first column of the launch's tiles.
    first_col: usize,
    /// A LoRA layer's rank (the hidden's columns), or 0 for the product alone.
    rank: usize,
    /// Where the kernel reads a prior sum it adds (`ACCUMULATE`).
    prior: PriorSum,
}

/// A prior sum the product adds before its one rounding, and where the kernel reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PriorSum {
    None,
    /// The output's own buffer: the prior, taken.
    InPlace,
    /// A buffer of its own, held elsewhere too: the output is new.
    Separate,
}

impl From<&PriorRead> for PriorSum {
    fn from(read: &PriorRead) -> Self {
        match read {
            PriorRead::None => Self::None,
            PriorRead::InPlace => Self::InPlace,
            PriorRead::Separate(_) => Self::Separate,
        }
    }
}

impl WgmmaProduct {
    /// The ring's bytes, and 1 KiB to align its start.
    fn shared_memory_bytes(&self) -> usize {
        STAGES * STAGE_DEPTH * (BLOCK_ROWS + self.tile_cols) * 2 + 1024
    }
}

impl CudaKernel for WgmmaProduct {
    const THREADS: u32 = THREADS;

    fn entry_point(&self) -> &'static str {
        ENTRY_POINT
    }

    /// The CUDA text: `wgmma.cu` behind the sizes, the layout and the accumulator's operands.
    fn text(&self) -> String {
        // A warpgroup's 64 x BN f32 tile over its 128 threads.
        let tile = self.tile_cols / 2;
        let registers = (0..tile).map(|i| format!("%{i}")).collect::<Vec<_>>();
        let operands = (0..tile).map(|i| format!("\"+f\"(d[{i}])"));
        format!(
            "#define N_DIM {}\n#define K_DIM {}\n#define B_MN_MAJOR {}\n#define BN {}\n\
             #define COL_OFFSET {}\n#define LOW_RANK {}\n#define ACCUMULATE {}\n\
             #define STAGES {STAGES}\n\
             #define DYNAMIC_SHARED_MEMORY_BYTES {}\n\
             #define ACC_REGS \"{{{}}}\"\n#define ACC_OPERANDS {}\n\
             #define DESCRIPTORS \"%{tile}, %{}\"\n#define SCALE \"%{}\"\n{SOURCE}",
            self.cols,
            self.depth,
            u8::from(self.rhs_row_major),
            self.tile_cols,
            self.first_col,
            self.rank,
            self.prior as u8,
            self.shared_memory_bytes(),
            registers.join(", "),
            operands.collect::<Vec<_>>().join(", "),
            tile + 1,
            tile + 2,
        )
    }
}

/// `lhs · rhs` for a bf16 `[rows, depth]` `lhs` with contiguous rows and a contiguous `[depth,
/// cols]` `rhs` or the transpose of a contiguous `[cols, depth]` (a linear layer's `Wᵀ`), on
/// devices of compute capability 9.0; `None` elsewhere, for other layouts, and for sizes the
/// kernel's tiles do not divide (rows and cols multiples of 128, depth of 64).
pub(crate) fn product(lhs: &CubeTensor, rhs: &CubeTensor) -> Option<CubeTensor> {
    launch(lhs, rhs, None, &mut None).map(|(out, _)| out)
}

/// A LoRA layer's adapter as the kernels take it: contiguous bf16 `down` `[r, depth]` and `up`
/// `[r, cols]` with r 8 or 16, and the hidden `lhs · downᵀ` where it is known already (a
/// checkpointed layer's recomputation, from the first forward over the same input).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Adapter<'a> {
    pub down: &'a CubeTensor,
    pub up: &'a CubeTensor,
    pub hidden: Option<&'a CubeTensor>,
}

impl Adapter<'_> {
    /// The hidden `lhs · downᵀ` for a rank-`rank` adapter: the known one where it is the
    /// kernels' `[rows, rank]` bf16 rows, else `thin_product`'s.
    pub(crate) fn hidden(&self, lhs: &CubeTensor, rank: usize) -> CubeTensor {
        match self.hidden {
            Some(hidden)
                if hidden.shape()[..] == [lhs.shape()[0], rank] && bf16_rows(hidden, rank) =>
            {
                hidden.clone()
            }
            _ => crate::thin_product::hidden(lhs, self.down),
        }
    }
}

/// A LoRA layer's product, `lhs · rhs + (lhs · downᵀ) · up`, and its rank-`r` hidden `lhs ·
/// downᵀ` (`[rows, r]`, rounded to bf16 before it multiplies `up`): the forward (`down` = `Aᵀ`,
/// `up` = `s·B`) or the input gradient (`down` = `s·B`, `up` = `Aᵀ`). The hidden is its own
/// kernel (`thin_product`) unless the adapter brings it; the `wgmma` kernel adds its term to
/// the f32 accumulator before its one rounding, and `prior` with it where it has the output's
/// layout (then taken: written over where nothing else holds it, else read beside a new
/// output; else left for the caller to add). `None` where [`product`] declines or the adapter
/// does not fit.
pub(crate) fn lora_product(
    lhs: &CubeTensor,
    rhs: &CubeTensor,
    adapter: Adapter,
    prior: &mut Option<CubeTensor>,
) -> Option<(CubeTensor, CubeTensor)> {
    let (out, hidden) = launch(lhs, rhs, Some(adapter), prior)?;
    Some((out, hidden?))
}

/// The kernel for [`product`] or, with an adapter, [`lora_product`].
fn launch(
    lhs: &CubeTensor,
    rhs: &CubeTensor,
    adapter: Option<Adapter>,
    prior: &mut Option<CubeTensor>,
) -> Option<(CubeTensor, Option<CubeTensor>)> {
    let rhs_shape = rhs.shape();
    if !lhs_fits(lhs) || rhs.dtype() != DType::BF16 || rhs_shape.num_dims() != 2 {
        return None;
    }
    let [rows, depth] = lhs.shape().dims();
    let [rhs_depth, cols] = [rhs_shape[0], rhs_shape[1]];
    let rhs_strides = rhs.meta.strides();
    let rhs_row_major = rhs_strides[..] == [cols, 1];
    let tile_cols = tile_cols(cols)?;
    let fits = rhs_depth == depth
        && depth.is_multiple_of(STAGE_DEPTH)
        && (rhs_row_major || rhs_strides[..] == [1, depth])
        && !rhs.meta.is_tiled()
        && aligned(rhs);
    if !fits {
        return None;
    }
    let rank = match adapter {
        Some(adapter) => adapter_rank(adapter.down, adapter.up, rows, depth, cols)?,
        None => 0,
    };
    let hidden = adapter.map(|adapter| adapter.hidden(lhs, rank));
    // The kernel adds a prior of the output's layout, in place where it can.
    let fitting =
        prior.take_if(|prior| prior.shape()[..] == [rows, cols] && bf16_rows(prior, cols));
    let (out, prior_read) =
        output_over_prior(fitting, || empty_output(lhs, [rows, cols], DType::BF16));
    let lhs_map = tensor_map(
        lhs,
        [rows, depth],
        [BLOCK_ROWS, STAGE_DEPTH],
        TensorMapLayout::SwizzledBf16,
    );
    let processors = lhs
        .client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(1) as usize;
    for span in column_spans(rows / BLOCK_ROWS, cols, tile_cols, processors) {
        // The weight's boxes: `tile_cols` of its contiguous `[cols, depth]` rows for the forward,
        // stage-deep panels one swizzled row wide of the `[depth, cols]` matrix for the input
        // gradient.
        let rhs_map = if rhs_row_major {
            tensor_map(
                rhs,
                [depth, cols],
                [STAGE_DEPTH, SWIZZLE_ELEMENTS],
                TensorMapLayout::SwizzledBf16,
            )
        } else {
            tensor_map(
                rhs,
                [cols, depth],
                [span.tile_cols, STAGE_DEPTH],
                TensorMapLayout::SwizzledBf16,
            )
        };
        let mut arguments = KernelArguments::new().with_tensor_maps(vec![lhs_map.clone(), rhs_map]);
        arguments.declared_io = vec![BufferIOAttr::ReadOnly; 2];
        // With an adapter: the hidden, then `up`.
        if let (Some(adapter), Some(hidden)) = (adapter, &hidden) {
            arguments = arguments
                .with_buffer_io(hidden.handle.clone().binding(), BufferIOAttr::ReadOnly)
                .with_buffer_io(adapter.up.handle.clone().binding(), BufferIOAttr::ReadOnly);
        }
        if let PriorRead::Separate(prior) = &prior_read {
            arguments =
                arguments.with_buffer_io(prior.handle.clone().binding(), BufferIOAttr::ReadOnly);
        }
        let io = match prior_read {
            PriorRead::InPlace => BufferIOAttr::ReadWrite,
            _ => BufferIOAttr::WriteOnly,
        };
        let arguments = arguments.with_buffer_io(out.handle.clone().binding(), io);
        let count = CubeCount::Static((rows / BLOCK_ROWS) as u32, span.tiles as u32, 1);
        let kernel = WgmmaProduct {
            cols,
            depth,
            rhs_row_major,
            tile_cols: span.tile_cols,
            first_col: span.first,
            rank,
            prior: PriorSum::from(&prior_read),
        };
        lhs.client
            .launch(Box::new(Precompiled(kernel)), count, arguments);
    }
    Some((out, hidden))
}

/// Whether `tensor` starts on 16 bytes, as the TMA and the kernel's vector loads need.
pub(crate) fn aligned(tensor: &CubeTensor) -> bool {
    tensor.handle.offset_start.unwrap_or(0).is_multiple_of(16)
}

/// Whether `tensor` is bf16 rows of `cols` elements, contiguous and [`aligned`]: how the
/// hand-written kernels read their row-major operands.
pub(crate) fn bf16_rows(tensor: &CubeTensor, cols: usize) -> bool {
    tensor.dtype() == DType::BF16
        && tensor.meta.strides()[..] == [cols, 1]
        && !tensor.meta.is_tiled()
        && aligned(tensor)
}

/// The rank of an adapter `down` `[r, depth]`, `up` `[r, cols]` the kernels take: bf16, both
/// contiguous, r a width every thread's registers hold and `thin_product` computes.
pub(crate) fn adapter_rank(
    down: &CubeTensor,
    up: &CubeTensor,
    rows: usize,
    depth: usize,
    cols: usize,
) -> Option<usize> {
    let rank = down_rank(down, rows, depth)?;
    let up_shape = up.shape();
    let fits =
        up_shape.num_dims() == 2 && up_shape.dims::<2>() == [rank, cols] && bf16_rows(up, cols);
    fits.then_some(rank)
}

/// The rank of a `down` `[r, depth]` that `thin_product` takes for `rows` rows: bf16,
/// contiguous, 16-byte aligned, r 8 or 16.
fn down_rank(down: &CubeTensor, rows: usize, depth: usize) -> Option<usize> {
    let shape = down.shape();
    if shape.num_dims() != 2 {
        return None;
    }
    let rank = shape[0];
    let fits =
        crate::thin_product::fits(rows, depth, rank) && shape[1] == depth && bf16_rows(down, depth);
    fits.then_some(rank)
}

/// The adapter's hidden `lhs · downᵀ` as [`lora_product`] computes it (`thin_product`), for a
/// backward that needs no product; `None` where the kernels would not take `lhs` and `down`.
pub(crate) fn lora_hidden(lhs: &CubeTensor, down: &CubeTensor) -> Option<CubeTensor> {
    if !lhs_fits(lhs) {
        return None;
    }
    let [rows, depth] = lhs.shape().dims();
    down_rank(down, rows, depth)?;
    Some(crate::thin_product::hidden(lhs, down))
}

/// Whether the kernels take `lhs` as their `[rows, depth]` input: bf16 on sm_90, rows whole
/// blocks, contiguous and 16-byte aligned.
pub(crate) fn lhs_fits(lhs: &CubeTensor) -> bool {
    let shape = lhs.shape();
    lhs.client.properties().identity.fingerprint == "ptx_sm90"
        && shape.num_dims() == 2
        && shape[0].is_multiple_of(BLOCK_ROWS)
        && bf16_rows(lhs, shape[1])
}

/// What a tensor map's elements are and how its boxes land in shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TensorMapLayout {
    /// bf16 in boxes `SWIZZLE_ELEMENTS` wide (one 128-byte row each), rows swizzled as the
    /// `wgmma` descriptors name them.
    SwizzledBf16,
    /// A 4-bit weight's packed `u32` words, rows of the box contiguous (`wgmma_4bit.cu`).
    PackedWords,
    /// Packed words in boxes of 64-byte rows with the 64-byte swizzle (`wgmma_4bit.cu`'s
    /// transposed weight: the rows a thread reads at once fall on different banks).
    SwizzledPackedWords,
    /// f32, rows of the box contiguous (`wgmma_4bit.cu`'s absmax).
    Floats,
}

/// The tensor map of a contiguous `[rows, cols]` matrix read in `box_shape` boxes, with the L2
/// promotion CUTLASS uses.
pub(crate) fn tensor_map(
    tensor: &CubeTensor,
    [rows, cols]: [usize; 2],
    box_shape: [usize; 2],
    layout: TensorMapLayout,
) -> TensorMapBinding {
    let (elem_ty, swizzle) = match layout {
        TensorMapLayout::SwizzledBf16 => (ElemType::Float(FloatKind::BF16), TensorMapSwizzle::B128),
        TensorMapLayout::PackedWords => (ElemType::UInt(UIntKind::U32), TensorMapSwizzle::None),
        TensorMapLayout::SwizzledPackedWords => {
            (ElemType::UInt(UIntKind::U32), TensorMapSwizzle::B64)
        }
        TensorMapLayout::Floats => (ElemType::Float(FloatKind::F32), TensorMapSwizzle::None),
    };
    let metadata = Metadata::new(Shape::new([rows, cols]), Strides::new(&[cols, 1]));
    let map = TensorMapMeta {
        format: TensorMapFormat::Tiled(TiledArgs {
            tile_size: Shape::new(box_shape),
        }),
        metadata,
        elem_stride: Strides::new(&[1, 1]),
        interleave: TensorMapInterleave::None,
        swizzle,
        prefetch: TensorMapPrefetch::B256,
        oob_fill: OobFill::Zero,
        elem_ty,
    };
    TensorMapBinding::new(tensor.handle.clone().binding(), map)
}

#[cfg(test)]
mod tests {
    use super::{ColumnSpan, PriorSum, WgmmaProduct, column_spans};
    use crate::precompiled::nvrtc_check::{compile_for_hopper, compiles_without_spills};

    fn product(rhs_row_major: bool, tile_cols: usize, rank: usize) -> WgmmaProduct {
        WgmmaProduct {
            cols: 11008,
            depth: 4096,
            rhs_row_major,
            tile_cols,
            first_col: 0,
            rank,
            prior: PriorSum::None,
        }
    }

    /// The 7B step's products (the forward and the input gradient, with and without an adapter
    /// of rank 8, wide and narrow tiles; the input gradient adding a prior sum) compile without
    /// spills; the other tiles and rank 16 compile.
    #[test]
    fn the_kernel_compiles_for_hopper() {
        for rhs_row_major in [false, true] {
            for rank in [0, 8] {
                for tile_cols in [256, 64] {
                    compiles_without_spills(&product(rhs_row_major, tile_cols, rank));
                }
            }
            compile_for_hopper(&product(rhs_row_major, 128, 16));
        }
        for tile_cols in [256, 64] {
            for prior in [PriorSum::InPlace, PriorSum::Separate] {
                compiles_without_spills(&WgmmaProduct {
                    prior,
                    ..product(true, tile_cols, 8)
                });
            }
        }
    }

    #[test]
    fn a_short_last_wave_becomes_narrow_tiles() {
        let span = |first, tile_cols, tiles| ColumnSpan {
            first,
            tile_cols,
            tiles,
        };
        // The 7B MLP: 16 x 43 tiles on 132 multiprocessors, 5.2 waves.
        assert_eq!(
            column_spans(16, 11008, 256, 132),
            [span(0, 256, 41), span(10496, 64, 8)]
        );
        // On 114 (an H100 PCIe): 6.04 waves.
        assert_eq!(
            column_spans(16, 11008, 256, 114),
            [span(0, 256, 42), span(10752, 64, 4)]
        );
        // 4096 wide: 1.94 waves, the last nearly full; no narrow tiles would fit one wave.
        assert_eq!(column_spans(16, 4096, 256, 132), [span(0, 256, 16)]);
        // The head, 32000 wide: 15.2 waves.
        assert_eq!(
            column_spans(16, 32000, 256, 132),
            [span(0, 256, 123), span(31488, 64, 8)]
        );
        // Fewer tiles than a wave.
        assert_eq!(column_spans(2, 512, 256, 132), [span(0, 256, 2)]);
    }
}
