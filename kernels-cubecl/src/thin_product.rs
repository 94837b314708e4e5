//! A LoRA layer's hidden `x · downᵀ` for a thin `down` (rank 8 or 16) on `mma.sync`, hand-written
//! in CUDA (`thin_product.cu`) and entering CubeCL as a precompiled kernel as the `wgmma` product
//! does: a stream of `x`'s bytes, which the `wgmma` product's epilogue then multiplies by `up`.

use burn::backend::TensorMetadata;
use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::attributes::BufferIOAttr;
use cubecl::prelude::*;
use cubecl::server::KernelArguments;

use crate::extension::empty_output;
use crate::precompiled::{CudaKernel, Precompiled};

const SOURCE: &str = include_str!("thin_product.cu");
/// A block's rows (`ROWS`: one MMA's); its threads are `WARPS` = 16 warps.
const BLOCK_ROWS: usize = 16;
/// The depth one warp's step covers (`32` in the source).
const CHUNK_DEPTH: usize = 32;

/// The kernel for one rank and depth, both compiled in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ThinProduct {
    rank: usize,
    depth: usize,
}

impl CudaKernel for ThinProduct {
    const THREADS: u32 = 512;

    fn entry_point(&self) -> &'static str {
        "thin_product"
    }

    fn text(&self) -> String {
        format!(
            "#define RANK {}\n#define K_DIM {}\n{SOURCE}",
            self.rank, self.depth
        )
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
    let kernel = Precompiled(ThinProduct { rank, depth });
    x.client.launch(Box::new(kernel), count, arguments);
    hidden
}

#[cfg(test)]
mod tests {
    use super::ThinProduct;
    use crate::precompiled::nvrtc_check::compiles_without_spills;

    #[test]
    fn the_kernel_compiles_for_hopper() {
        for rank in [8, 16] {
            for depth in [4096, 11008] {
                compiles_without_spills(&ThinProduct { rank, depth });
            }
        }
    }
}
