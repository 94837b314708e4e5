//! A LoRA layer's hidden `x · downᵀ` for a thin `down` (rank 8 or 16) on `mma.sync`, hand-written
//! in CUDA (`thin_product.cu`) and entering CubeCL as a precompiled kernel as the `wgmma` product
//! does: a stream of `x`'s bytes, which the `wgmma` product's epilogue then multiplies by `up`.

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

const SOURCE: &str = include_str!("thin_product.cu");
/// A block's rows (`ROWS`: one MMA's) and threads (`WARPS` = 16 warps).
const BLOCK_ROWS: usize = 16;
const THREADS: u32 = 512;
/// The depth one warp's step covers (`32` in the source).
const CHUNK_DEPTH: usize = 32;

/// The kernel for one rank and depth, both compiled in.
struct ThinProduct {
    rank: usize,
    depth: usize,
}

impl KernelMetadata for ThinProduct {
    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.rank, self.depth))
    }

    fn address_type(&self) -> ElemType {
        UIntKind::U32.into()
    }
}

impl CubeKernel for ThinProduct {
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
            source: format!(
                "#define RANK {}\n#define K_DIM {}\n{SOURCE}",
                self.rank, self.depth
            ),
            entrypoint_name: "thin_product".to_string(),
            lang: "cuda",
        })
    }
}

/// Whether [`hidden`] takes `[rows, depth]` inputs and a rank-`rank` adapter (both already
/// contiguous bf16, 16-byte aligned: the `wgmma` product's checks).
pub(crate) fn fits(rows: usize, depth: usize, rank: usize) -> bool {
    matches!(rank, 8 | 16) && rows.is_multiple_of(BLOCK_ROWS) && depth.is_multiple_of(CHUNK_DEPTH)
}

/// `x · downᵀ` (`[rows, rank]`, bf16, one rounding of the f32 sum) for a contiguous bf16 `x`
/// `[rows, depth]` and `down` `[rank, depth]` that [`fits`] takes.
pub(crate) fn hidden(x: &CubeTensor, down: &CubeTensor) -> CubeTensor {
    let [rows, depth] = x.shape().dims();
    let rank = down.shape()[0];
    let hidden = empty_output(x, [rows, rank], DType::BF16);
    let arguments = KernelArguments::new()
        .with_buffer_io(x.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(down.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(hidden.handle.clone().binding(), BufferIOAttr::WriteOnly);
    let count = CubeCount::Static((rows / BLOCK_ROWS) as u32, 1, 1);
    x.client
        .launch(Box::new(ThinProduct { rank, depth }), count, arguments);
    hidden
}
