//! The bf16 product `A · B` on Hopper's warpgroup MMA (`wgmma`), `B` laid out either way,
//! hand-written in CUDA (`wgmma.cu`): cubek 0.3's tiles are `mma.sync`, which reach about a third
//! of an H100's bf16 peak. It enters CubeCL as a precompiled kernel, compiled by NVRTC for
//! `sm_90a` like the generated ones and launched on the same stream, with the dynamic shared
//! memory its text declares (our patch of cubecl-cuda: `third_party/cubecl-cuda/PATCH.md`).

use burn::backend::TensorMetadata;
use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::attributes::BufferIOAttr;
use cubecl::ir::metadata::Info;
use cubecl::ir::{AddressType, ElemType, UIntKind};
use cubecl::prelude::*;
use cubecl::server::KernelArguments;
use cubecl::{CubeKernel, PrecompiledSource};

use crate::extension::empty_output;

/// The kernel's text; the sizes and the accumulator's asm operands are prepended per product.
const SOURCE: &str = include_str!("wgmma.cu");
const ENTRY_POINT: &str = "wgmma_bf16_tn";

/// A block's output rows (`BM` in the source) and the depth of one slice (`BK`).
const BLOCK_ROWS: usize = 128;
const SLICE_DEPTH: usize = 32;
/// Two consumer warpgroups, and two producer warps where the main loop is warp-specialized.
const CONSUMER_THREADS: u32 = 256;
const PRODUCER_THREADS: u32 = 64;
/// The ring: four stages of two slices (a 64-deep stage; 193 KiB at 256 wide, one block an SM),
/// the best of the shapes tried at 256 wide on an H100 (BENCHMARKS.md). 128-wide tiles, which no
/// 7B product takes, use the same.
const STAGES: usize = 4;
const SLICES_PER_STAGE: usize = 2;

/// A block's output columns (`BN`): 256 where they divide the product, else 128.
fn tile_cols(cols: usize) -> Option<usize> {
    [256, 128]
        .into_iter()
        .find(|&tile| cols.is_multiple_of(tile))
}

/// The product for one shape and right-hand layout: both are compiled in.
struct WgmmaProduct {
    cols: usize,
    depth: usize,
    /// Whether the `[depth, cols]` right-hand side has contiguous rows (else contiguous columns).
    rhs_row_major: bool,
    tile_cols: usize,
}

impl WgmmaProduct {
    /// Producer warps feed the consumers for a K-major right-hand side (a linear layer's forward);
    /// for an N-major one (its input gradient) the consumers copy themselves, which measured
    /// faster there (BENCHMARKS.md).
    fn warp_specialized(&self) -> bool {
        !self.rhs_row_major
    }

    fn threads(&self) -> u32 {
        CONSUMER_THREADS
            + if self.warp_specialized() {
                PRODUCER_THREADS
            } else {
                0
            }
    }

    /// The ring's bytes, and 1 KiB to align its start.
    fn shared_memory_bytes(&self) -> usize {
        STAGES * SLICES_PER_STAGE * SLICE_DEPTH * (BLOCK_ROWS + self.tile_cols) * 2 + 1024
    }

    /// The CUDA text: `wgmma.cu` behind the sizes, the layout and the accumulator's operands.
    fn text(&self) -> String {
        // A warpgroup's 64 x BN f32 tile over its 128 threads.
        let accumulators = self.tile_cols / 2;
        let registers = (0..accumulators)
            .map(|i| format!("%{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let operands = (0..accumulators)
            .map(|i| format!("\"+f\"(d[{i}])"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "#define N_DIM {}\n#define K_DIM {}\n#define B_MN_MAJOR {}\n#define BN {}\n\
             #define STAGES {STAGES}\n#define SUBSLICES {SLICES_PER_STAGE}\n\
             #define WARP_SPECIALIZED {}\n\
             #define DYNAMIC_SHARED_MEMORY_BYTES {}\n#define ACC_REGS \"{{{registers}}}\"\n\
             #define ACC_OPERANDS {operands}\n#define DESCRIPTORS \"%{}, %{}\"\n\
             #define SCALE \"%{}\"\n{SOURCE}",
            self.cols,
            self.depth,
            u8::from(self.rhs_row_major),
            self.tile_cols,
            u8::from(self.warp_specialized()),
            self.shared_memory_bytes(),
            accumulators,
            accumulators + 1,
            accumulators + 2,
        )
    }
}

impl KernelMetadata for WgmmaProduct {
    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.cols, self.depth, self.rhs_row_major, self.tile_cols))
    }

    fn address_type(&self) -> ElemType {
        UIntKind::U32.into()
    }
}

impl CubeKernel for WgmmaProduct {
    /// No IR: the definition carries the block size the launch uses.
    fn define(&self) -> KernelDefinition {
        let settings = KernelSettings::new(
            CubeDim::new_1d(self.threads()).0,
            ExecutionMode::Unchecked,
            AddressType::U32,
        );
        KernelDefinition {
            body: Scope::root(settings.clone()),
            settings,
            info: Info::default(),
        }
    }

    fn source(&self) -> Option<PrecompiledSource> {
        Some(PrecompiledSource {
            source: self.text(),
            entrypoint_name: ENTRY_POINT.to_string(),
            lang: "cuda",
        })
    }
}

/// `lhs · rhs` for a bf16 `[rows, depth]` `lhs` with contiguous rows and a contiguous `[depth,
/// cols]` `rhs` or the transpose of a contiguous `[cols, depth]` (a linear layer's `Wᵀ`), on
/// devices of compute capability 9.0; `None` elsewhere, for other layouts, and for sizes the
/// kernel's tiles do not divide (rows and cols multiples of 128, depth of 64).
pub(crate) fn product(lhs: &CubeTensor, rhs: &CubeTensor) -> Option<CubeTensor> {
    if lhs.dtype() != DType::BF16
        || rhs.dtype() != DType::BF16
        || lhs.client.properties().identity.fingerprint != "ptx_sm90"
    {
        return None;
    }
    let (lhs_shape, rhs_shape) = (lhs.shape(), rhs.shape());
    if lhs_shape.num_dims() != 2 || rhs_shape.num_dims() != 2 {
        return None;
    }
    let [rows, depth] = [lhs_shape[0], lhs_shape[1]];
    let [rhs_depth, cols] = [rhs_shape[0], rhs_shape[1]];
    let aligned = |tensor: &CubeTensor| tensor.handle.offset_start.unwrap_or(0).is_multiple_of(16);
    let rhs_strides = rhs.meta.strides();
    let rhs_row_major = rhs_strides[..] == [cols, 1];
    let tile_cols = tile_cols(cols)?;
    let fits = rhs_depth == depth
        && rows.is_multiple_of(BLOCK_ROWS)
        && depth.is_multiple_of(SLICES_PER_STAGE * SLICE_DEPTH)
        && lhs.meta.strides()[..] == [depth, 1]
        && (rhs_row_major || rhs_strides[..] == [1, depth])
        && !lhs.meta.is_tiled()
        && !rhs.meta.is_tiled()
        && aligned(lhs)
        && aligned(rhs);
    if !fits {
        return None;
    }
    let out = empty_output(lhs, [rows, cols], DType::BF16);
    let arguments = KernelArguments::new()
        .with_buffer_io(lhs.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(rhs.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(out.handle.clone().binding(), BufferIOAttr::WriteOnly);
    let count = CubeCount::Static((rows / BLOCK_ROWS) as u32, (cols / tile_cols) as u32, 1);
    let kernel = WgmmaProduct {
        cols,
        depth,
        rhs_row_major,
        tile_cols,
    };
    lhs.client.launch(Box::new(kernel), count, arguments);
    Some(out)
}
