//! A LoRA layer's weight gradient `xᵀ · t` for a thin `t` (rank 8 or 16) on `mma.sync`,
//! hand-written in CUDA (`thin_gradient.cu`) and entering CubeCL as a precompiled kernel as
//! `thin_product` does: one stream of `x`'s bytes with whole sums per block, where the portable
//! kernel ([`crate::low_rank`]) writes partial sums and adds them in a second launch.

use burn::backend::TensorMetadata;
use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::attributes::BufferIOAttr;
use cubecl::prelude::*;
use cubecl::server::{KernelArguments, MetadataBindingInfo};

use crate::extension::empty_output;
use crate::precompiled::{CudaKernel, Precompiled};

const SOURCE: &str = include_str!("thin_gradient.cu");
/// A block's columns of `x` (`COLUMNS` in the source); its threads are 16 warps.
const BLOCK_COLUMNS: usize = 32;
/// The rows one MMA step covers (`STEP_ROWS`).
const STEP_ROWS: usize = 16;

/// The kernel for one rank and depth, both compiled in; the rows travel as its info.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ThinGradient {
    rank: usize,
    depth: usize,
}

impl CudaKernel for ThinGradient {
    const THREADS: u32 = 512;

    fn entry_point(&self) -> &'static str {
        "thin_gradient"
    }

    fn text(&self) -> String {
        format!(
            "#define RANK {}\n#define DEPTH {}\n{SOURCE}",
            self.rank, self.depth
        )
    }
}

/// `inputᵀ · thin` (`[depth, rank]`, bf16, one rounding of the f32 sum) for contiguous bf16
/// `input` `[rows, depth]` and `thin` `[rows, rank]` on sm_90; `None` where the kernel does not
/// take them (another dtype or device, rows not whole steps, a depth not whole blocks, a rank
/// other than 8 or 16, an offset off 16 bytes).
pub(crate) fn gradient(input: &CubeTensor, thin: &CubeTensor) -> Option<CubeTensor> {
    let [rows, depth] = input.shape().dims();
    let rank = thin.shape()[1];
    let contiguous = |tensor: &CubeTensor, cols: usize| {
        tensor.dtype == DType::BF16
            && tensor.meta.strides()[..] == [cols, 1]
            && !tensor.meta.is_tiled()
            && crate::wgmma::aligned(tensor)
    };
    let fits = input.client.properties().identity.fingerprint == "ptx_sm90"
        && matches!(rank, 8 | 16)
        && thin.shape()[0] == rows
        && rows.is_multiple_of(STEP_ROWS)
        && depth.is_multiple_of(BLOCK_COLUMNS)
        && contiguous(input, depth)
        && contiguous(thin, rank);
    if !fits {
        return None;
    }
    let output = empty_output(input, [depth, rank], DType::BF16);
    let arguments = KernelArguments::new()
        .with_buffer_io(input.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(thin.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(output.handle.clone().binding(), BufferIOAttr::WriteOnly);
    // The rows in the kernel's parameter block (`Params`), none in a metadata buffer.
    let info = MetadataBindingInfo {
        dynamic_metadata_offset: 1,
        data: vec![rows as u64],
    };
    let count = CubeCount::Static((depth / BLOCK_COLUMNS) as u32, 1, 1);
    let kernel = Precompiled(ThinGradient { rank, depth });
    input
        .client
        .launch(Box::new(kernel), count, arguments.with_info(info));
    Some(output)
}

#[cfg(test)]
mod tests {
    use super::ThinGradient;
    use crate::precompiled::nvrtc_check::compiles_without_spills;

    #[test]
    fn the_kernel_compiles_for_hopper() {
        for rank in [8, 16] {
            for depth in [4096, 11008] {
                compiles_without_spills(&ThinGradient { rank, depth });
            }
        }
    }
}
