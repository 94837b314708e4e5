//! The bf16 product `A · B` on Hopper's warpgroup MMA (`wgmma`), `B` laid out either way,
//! hand-written in CUDA (`wgmma.cu`): cubek 0.3's tiles are `mma.sync`, which reach about a third
//! of an H100's bf16 peak. It enters CubeCL as a precompiled kernel, compiled by NVRTC for
//! `sm_90a` like the generated ones and launched on the same stream.

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

/// A block's output tile (`BM` x `BN` in the source) and the depth of one slice (`BK`).
const BLOCK_ROWS: usize = 128;
const BLOCK_COLS: usize = 128;
const SLICE_DEPTH: usize = 32;
const THREADS: u32 = 256;
/// f32 accumulator registers per thread: a warpgroup's 64 x 128 tile over its 128 threads.
const ACCUMULATORS: usize = 64;

/// The product for one shape and right-hand layout: both are compiled in.
struct WgmmaProduct {
    cols: usize,
    depth: usize,
    /// Whether the `[depth, cols]` right-hand side has contiguous rows (else contiguous columns).
    rhs_row_major: bool,
}

impl WgmmaProduct {
    /// The CUDA text: `wgmma.cu` behind the sizes, the layout and the accumulator's operands.
    fn text(&self) -> String {
        let registers = (0..ACCUMULATORS)
            .map(|i| format!("%{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let operands = (0..ACCUMULATORS)
            .map(|i| format!("\"+f\"(d[{i}])"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "#define N_DIM {}\n#define K_DIM {}\n#define B_MN_MAJOR {}\n\
             #define ACC_REGS \"{{{registers}}}\"\n#define ACC_OPERANDS {operands}\n{SOURCE}",
            self.cols,
            self.depth,
            u8::from(self.rhs_row_major)
        )
    }
}

impl KernelMetadata for WgmmaProduct {
    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.cols, self.depth, self.rhs_row_major))
    }

    fn address_type(&self) -> ElemType {
        UIntKind::U32.into()
    }
}

impl CubeKernel for WgmmaProduct {
    /// No IR: the definition carries the block size the launch uses.
    fn define(&self) -> KernelDefinition {
        let settings = KernelSettings::new(
            CubeDim::new_1d(THREADS).0,
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
/// kernel's tiles do not divide (rows and cols multiples of 128, depth of 32).
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
    let fits = rhs_depth == depth
        && rows.is_multiple_of(BLOCK_ROWS)
        && cols.is_multiple_of(BLOCK_COLS)
        && depth.is_multiple_of(SLICE_DEPTH)
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
    let count = CubeCount::Static((rows / BLOCK_ROWS) as u32, (cols / BLOCK_COLS) as u32, 1);
    let kernel = WgmmaProduct {
        cols,
        depth,
        rhs_row_major,
    };
    lhs.client.launch(Box::new(kernel), count, arguments);
    Some(out)
}
