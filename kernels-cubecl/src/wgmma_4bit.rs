//! A linear layer's products over a 4-bit weight, the forward's `x · Wᵀ` and the input
//! gradient's `g · W`, with the weight dequantized inside Hopper's `wgmma` product
//! (`wgmma_4bit.cu`), hand-written in CUDA and launched as `wgmma.rs` launches the dense product.
//! Computed as `Cᵀ = W · xᵀ` (`Wᵀ · gᵀ`): `wgmma` reads its A operand from registers, so the
//! consumer warps decode the packed codes straight into it, and the dense weight never exists.
//! It replaces the dequantization pass and the dense product (the dequantization alone cost a
//! tenth of the product: BENCHMARKS.md); the numbers are the dense path's (the same rounded
//! weights, the same adapter term in the same order).

use burn::backend::TensorMetadata;
use burn::tensor::DType;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::attributes::BufferIOAttr;
use cubecl::prelude::*;
use cubecl::server::{KernelArguments, MetadataBindingInfo};

use crate::extension::empty_output;
use crate::matmul::{DenseCopy, Weight4bitPrimitive, decoded_absmax};
use crate::precompiled::{CudaKernel, Precompiled};
use crate::wgmma::{
    Adapter, STAGE_DEPTH, TensorMapLayout, adapter_rank, aligned, lhs_fits, tensor_map,
};

/// The kernel's text; the sizes and the accumulator's asm operands are prepended per product.
const SOURCE: &str = concat!(
    include_str!("wgmma_common.cu"),
    include_str!("wgmma_4bit.cu")
);
const ENTRY_POINT: &str = "wgmma_4bit_tn";

/// A block's features (`BM` in the source): two warpgroups of 64 weight rows.
const BLOCK_FEATURES: usize = 128;
/// The quantization block the kernel takes: one stage deep (`BK`), so one absmax a row a stage.
const BLOCK_SIZE: usize = STAGE_DEPTH;
/// A tile's tokens (`BN`, the MMA's N): 256, and 64 for the columns of a short last wave.
const WIDE_TOKENS: usize = 256;
const NARROW_TOKENS: usize = 64;
/// Two consumer warpgroups and a producer warpgroup (its registers given to the consumers).
const THREADS: u32 = 384;
/// The ring's stages: 5 of 36 KiB at 256 tokens.
const STAGES: usize = 5;

/// The packed words' box for the forward: a block's weight rows, one stage of each (32 bytes).
const WORDS_BOX: [usize; 2] = [BLOCK_FEATURES, BLOCK_SIZE / 8];
/// For the input gradient: a stage's weight rows, a block's features of each (64 bytes).
const MN_MAJOR_WORDS_BOX: [usize; 2] = [STAGE_DEPTH, BLOCK_FEATURES / 8];
/// The input gradient's absmax box: a stage's weight rows, four blocks of each (16 bytes, the
/// least a box row may be; a tile's features are two blocks).
const MN_MAJOR_ABSMAX_BOX: [usize; 2] = [STAGE_DEPTH, 4];

/// Which products take this kernel by default (else the dequantization pass and the dense
/// `wgmma` product). None: both pass their tests (H100, H200) but take 1.18 to 1.49x the dense
/// product's time, more than the dequantization pass adds to it (BENCHMARKS.md).
const FUSED_BY_DEFAULT: FusedProducts = FusedProducts::None;

/// The products that dequantize inside `wgmma`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FusedProducts {
    None,
    /// The forward's `x · Wᵀ` only.
    Forward,
    /// The forward's and the input gradient's.
    Both,
}

/// Whether the product (`x · Wᵀ` for `transpose`) takes this kernel where it fits:
/// `KERNELS_CUBECL_4BIT_PRODUCTS` (read once) may say `fused` (both products), `forward` or
/// `dequantize`, to compare them on one build or to step around the kernel.
fn fused(transpose: bool) -> bool {
    static FUSED: std::sync::OnceLock<FusedProducts> = std::sync::OnceLock::new();
    let fused = *FUSED.get_or_init(|| {
        match std::env::var("KERNELS_CUBECL_4BIT_PRODUCTS").as_deref() {
            Ok("fused") => FusedProducts::Both,
            Ok("forward") => FusedProducts::Forward,
            Ok("dequantize") => FusedProducts::None,
            Ok(other) => panic!(
                "KERNELS_CUBECL_4BIT_PRODUCTS={other:?} is not `fused`, `forward` or `dequantize`"
            ),
            Err(_) => FUSED_BY_DEFAULT,
        }
    });
    match fused {
        FusedProducts::None => false,
        FusedProducts::Forward => transpose,
        FusedProducts::Both => true,
    }
}

/// One compilation: the product, the shape, the tile and the adapter's rank.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Wgmma4bitProduct {
    /// The input gradient's `g · W` (its depth along the weight's rows), else `x · Wᵀ`.
    mn_major: bool,
    /// The output's features: the weight's rows, or its columns for `g · W`.
    features: usize,
    depth: usize,
    tile_tokens: usize,
    /// The first feature of the launch's tiles.
    first_feature: usize,
    /// A LoRA layer's rank, or 0 for the product alone.
    rank: usize,
}

impl Wgmma4bitProduct {
    /// The ring's bytes (x's box, the packed weight and for `g · W` the absmax a stage), and 1
    /// KiB to align its start.
    fn shared_memory_bytes(&self) -> usize {
        let absmax_box = if self.mn_major {
            MN_MAJOR_ABSMAX_BOX[0] * MN_MAJOR_ABSMAX_BOX[1] * 4
        } else {
            0
        };
        STAGES * (self.tile_tokens * BLOCK_SIZE * 2 + BLOCK_FEATURES * BLOCK_SIZE / 2 + absmax_box)
            + 1024
    }
}

impl CudaKernel for Wgmma4bitProduct {
    const THREADS: u32 = THREADS;

    fn entry_point(&self) -> &'static str {
        ENTRY_POINT
    }

    /// The CUDA text: the shared helpers and `wgmma_4bit.cu` behind the sizes and the operands.
    fn text(&self) -> String {
        // A warpgroup's 64 x BN f32 tile over its 128 threads, then the four A registers.
        let tile = self.tile_tokens / 2;
        let registers = (0..tile).map(|i| format!("%{i}")).collect::<Vec<_>>();
        let operands = (0..tile).map(|i| format!("\"+f\"(d[{i}])"));
        let fragment = (tile..tile + 4)
            .map(|i| format!("%{i}"))
            .collect::<Vec<_>>();
        format!(
            "#define MN_MAJOR {}\n#define N_DIM {}\n#define K_DIM {}\n#define BN {}\n\
             #define FEATURE_OFFSET {}\n\
             #define LOW_RANK {}\n#define STAGES {STAGES}\n\
             #define DYNAMIC_SHARED_MEMORY_BYTES {}\n\
             #define ACC_REGS \"{{{}}}\"\n#define ACC_OPERANDS {}\n\
             #define FRAGMENT \"{{{}}}\"\n#define DESCRIPTOR \"%{}\"\n#define SCALE \"%{}\"\n\
             {SOURCE}",
            u8::from(self.mn_major),
            self.features,
            self.depth,
            self.tile_tokens,
            self.first_feature,
            self.rank,
            self.shared_memory_bytes(),
            registers.join(", "),
            operands.collect::<Vec<_>>().join(", "),
            fragment.join(", "),
            tile + 4,
            tile + 5,
        )
    }
}

/// One launch's share of the features: `feature_tiles` tiles from `first_feature`, each
/// `tile_tokens` tokens wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FeatureSpan {
    first_feature: usize,
    feature_tiles: usize,
    tile_tokens: usize,
}

/// The launches over `feature_tiles` tiles of `token_tiles` 256-token tiles on `processors`
/// multiprocessors: one, unless its last wave would leave most of them idle for a whole tile's
/// time; then the features of the full waves, and the rest in 64-token tiles that fit one wave
/// (`wgmma.rs` narrows its tiles' columns for the same reason).
fn feature_spans(token_tiles: usize, feature_tiles: usize, processors: usize) -> Vec<FeatureSpan> {
    let span = |first_tile: usize, feature_tiles, tile_tokens| FeatureSpan {
        first_feature: first_tile * BLOCK_FEATURES,
        feature_tiles,
        tile_tokens,
    };
    let full_waves = token_tiles * feature_tiles / processors;
    let main_tiles = full_waves * processors / token_tiles;
    let rest = feature_tiles - main_tiles;
    let narrow_blocks = rest * token_tiles * WIDE_TOKENS / NARROW_TOKENS;
    if full_waves == 0 || rest == 0 || narrow_blocks > processors {
        return vec![span(0, feature_tiles, WIDE_TOKENS)];
    }
    vec![
        span(0, main_tiles, WIDE_TOKENS),
        span(main_tiles, rest, NARROW_TOKENS),
    ]
}

/// `x · Wᵀ` (`transpose`) or `x · W` for a bf16 `x` `[rows, depth]` and a packed `[features,
/// depth]` (`[depth, features]`) weight in blocks of 64 without a dense copy, on devices of
/// compute capability 9.0; with an adapter (`down` `[r, depth]`, `up` `[r, features]`, the
/// hidden where known, as `wgmma::lora_product` takes them) `+ (x · downᵀ) · up`, and the
/// hidden. `None` where the kernel does not take them: rows a multiple of 256, features of 128 (of 256 for `x · W`, whose
/// absmax rows the tensor map reads in 16-byte steps), depth of 64.
pub(crate) fn product(
    x: &CubeTensor,
    weight: &Weight4bitPrimitive<CubeBackend>,
    transpose: bool,
    adapter: Option<Adapter>,
) -> Option<(CubeTensor, Option<CubeTensor>)> {
    let [features, depth] = if transpose {
        weight.shape
    } else {
        let [rows, cols] = weight.shape;
        [cols, rows]
    };
    if !fused(transpose) || !lhs_fits(x) || !matches!(weight.dense, DenseCopy::Absent) {
        return None;
    }
    let rows = x.shape()[0];
    let words = &weight.words;
    let feature_multiple = if transpose {
        BLOCK_FEATURES
    } else {
        2 * BLOCK_FEATURES
    };
    let fits = rows.is_multiple_of(WIDE_TOKENS)
        && x.shape()[1] == depth
        && weight.block_size == BLOCK_SIZE
        && features.is_multiple_of(feature_multiple)
        && depth.is_multiple_of(BLOCK_SIZE)
        && words.dtype() == DType::U32
        && words.shape().num_elements() == features * depth / 8
        && words.is_contiguous()
        && aligned(words)
        && weight.code.dtype() == DType::F32
        && weight.code.shape().num_elements() == 16
        && weight.code.is_contiguous();
    if !fits {
        return None;
    }
    let rank = match adapter {
        Some(adapter) => adapter_rank(adapter.down, adapter.up, rows, depth, features)?,
        None => 0,
    };
    let (absmax, offset) =
        decoded_absmax::<CubeBackend>(weight.absmax.clone(), features * depth, BLOCK_SIZE);
    if absmax.dtype() != DType::F32 || !absmax.is_contiguous() || !aligned(&absmax) {
        return None;
    }
    let hidden = adapter.map(|adapter| adapter.hidden(x, rank));
    let out = empty_output(x, [rows, features], DType::BF16);
    // The weight's tensor maps, and for the forward its absmax as a buffer.
    let (weight_maps, absmax_buffer) = if transpose {
        let words_map = tensor_map(
            words,
            [features, depth / 8],
            WORDS_BOX,
            TensorMapLayout::PackedWords,
        );
        (vec![words_map], Some(absmax.handle.clone().binding()))
    } else {
        let words_map = tensor_map(
            words,
            [depth, features / 8],
            MN_MAJOR_WORDS_BOX,
            TensorMapLayout::SwizzledPackedWords,
        );
        let absmax_map = tensor_map(
            &absmax,
            [depth, features / BLOCK_SIZE],
            MN_MAJOR_ABSMAX_BOX,
            TensorMapLayout::Floats,
        );
        (vec![words_map, absmax_map], None)
    };
    let processors = x
        .client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(1) as usize;
    for span in feature_spans(rows / WIDE_TOKENS, features / BLOCK_FEATURES, processors) {
        let x_map = tensor_map(
            x,
            [rows, depth],
            [span.tile_tokens, STAGE_DEPTH],
            TensorMapLayout::SwizzledBf16,
        );
        let maps = [vec![x_map], weight_maps.clone()].concat();
        let mut arguments = KernelArguments::new();
        arguments.declared_io = vec![BufferIOAttr::ReadOnly; maps.len()];
        arguments = arguments.with_tensor_maps(maps);
        if let Some(absmax) = &absmax_buffer {
            arguments = arguments.with_buffer_io(absmax.clone(), BufferIOAttr::ReadOnly);
        }
        arguments =
            arguments.with_buffer_io(weight.code.handle.clone().binding(), BufferIOAttr::ReadOnly);
        if let (Some(adapter), Some(hidden)) = (adapter, &hidden) {
            arguments = arguments
                .with_buffer_io(hidden.handle.clone().binding(), BufferIOAttr::ReadOnly)
                .with_buffer_io(adapter.up.handle.clone().binding(), BufferIOAttr::ReadOnly);
        }
        let mut arguments =
            arguments.with_buffer_io(out.handle.clone().binding(), BufferIOAttr::WriteOnly);
        // The offset, the kernel's last parameter: CubeCL passes the info words by value where
        // the device takes grid constants (every device this kernel runs on).
        arguments.info = MetadataBindingInfo::new(vec![u64::from(offset.to_bits())], 1);
        let count = CubeCount::Static(
            (rows / span.tile_tokens) as u32,
            span.feature_tiles as u32,
            1,
        );
        let kernel = Wgmma4bitProduct {
            mn_major: !transpose,
            features,
            depth,
            tile_tokens: span.tile_tokens,
            first_feature: span.first_feature,
            rank,
        };
        x.client
            .launch(Box::new(Precompiled(kernel)), count, arguments);
    }
    Some((out, hidden))
}

#[cfg(test)]
mod tests {
    use super::{FeatureSpan, Wgmma4bitProduct, feature_spans};
    use crate::precompiled::nvrtc_check::{compile_for_hopper, compiles_without_spills};

    /// The 7B step's tiles (the forward and the input gradient, rank 8 and none) compile
    /// without spills; rank 16 compiles.
    #[test]
    fn the_kernel_compiles_for_hopper() {
        let product = |mn_major, tile_tokens, rank| Wgmma4bitProduct {
            mn_major,
            features: 11008,
            depth: 4096,
            tile_tokens,
            first_feature: 0,
            rank,
        };
        for mn_major in [false, true] {
            for rank in [0, 8] {
                for tile_tokens in [256, 64] {
                    compiles_without_spills(&product(mn_major, tile_tokens, rank));
                }
            }
            compile_for_hopper(&product(mn_major, 256, 16));
        }
    }

    #[test]
    fn a_short_last_wave_becomes_narrow_tiles() {
        let span = |first_feature, feature_tiles, tile_tokens| FeatureSpan {
            first_feature,
            feature_tiles,
            tile_tokens,
        };
        // The 7B MLP's gate and up at 2048 tokens: 8 x 86 tiles on 132 multiprocessors, 5.2
        // waves; the last 4 columns of tiles in 128 narrow blocks.
        assert_eq!(
            feature_spans(8, 86, 132),
            [span(0, 82, 256), span(10496, 4, 64)]
        );
        // 4096 features: 1.94 waves, the rest would not fit one wave narrow.
        assert_eq!(feature_spans(8, 32, 132), [span(0, 32, 256)]);
        // Fewer tiles than a wave.
        assert_eq!(feature_spans(1, 3, 132), [span(0, 3, 256)]);
    }
}
