//! A LoRA layer's thin products on `mma.sync`, hand-written in CUDA (`thin_product.cu`) and
//! entering CubeCL as precompiled kernels as the `wgmma` product does, each one stream of its
//! wide operand's bytes: the hidden `x · downᵀ`, which the `wgmma` product's epilogue then
//! multiplies by `up`, and the weight gradients `xᵀ · t` with whole sums per block, where the
//! portable kernel ([`crate::low_rank`]) writes partial sums and adds them in a second launch.

use burn::backend::TensorMetadata;
use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::attributes::BufferIOAttr;
use cubecl::prelude::*;
use cubecl::server::{KernelArguments, MetadataBindingInfo};

use crate::extension::empty_output;
use crate::precompiled::{CudaKernel, Precompiled};

const SOURCE: &str = include_str!("thin_product.cu");
/// `thin_product`'s rows a block (`ROWS`: one MMA's); both kernels' blocks are 16 warps.
const BLOCK_ROWS: usize = 16;
/// The depth one warp's step covers in `thin_product`, and `thin_gradient`'s columns a block
/// (`COLUMNS`): the depth is a multiple of both.
const CHUNK_DEPTH: usize = 32;

/// The source's two entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Entry {
    /// `x · downᵀ`.
    Product,
    /// `xᵀ · t`.
    Gradient,
}

/// One entry point for one rank and depth, both compiled in; `thin_gradient`'s rows travel as
/// its info.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ThinKernel {
    entry: Entry,
    rank: usize,
    depth: usize,
}

impl CudaKernel for ThinKernel {
    const THREADS: u32 = 512;

    fn entry_point(&self) -> &'static str {
        match self.entry {
            Entry::Product => "thin_product",
            Entry::Gradient => "thin_gradient",
        }
    }

    fn text(&self) -> String {
        format!(
            "#define RANK {}\n#define DEPTH {}\n{SOURCE}",
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
    let kernel = Precompiled(ThinKernel {
        entry: Entry::Product,
        rank,
        depth,
    });
    x.client.launch(Box::new(kernel), count, arguments);
    hidden
}

/// `inputᵀ · thin` (`[depth, rank]`, bf16, one rounding of the f32 sum) for contiguous bf16
/// `input` `[rows, depth]` and `thin` `[rows, rank]` on sm_90; `None` where the kernel does not
/// take them (another dtype or device, rows not whole 16-row steps, a depth not whole blocks, a
/// rank other than 8 or 16, an offset off 16 bytes).
pub(crate) fn gradient(input: &CubeTensor, thin: &CubeTensor) -> Option<CubeTensor> {
    let [rows, depth] = input.shape().dims();
    let rank = thin.shape()[1];
    let takes = input.client.properties().identity.fingerprint == "ptx_sm90"
        && thin.shape()[0] == rows
        && fits(rows, depth, rank)
        && crate::wgmma::bf16_rows(input, depth)
        && crate::wgmma::bf16_rows(thin, rank);
    if !takes {
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
    let count = CubeCount::Static((depth / CHUNK_DEPTH) as u32, 1, 1);
    let kernel = Precompiled(ThinKernel {
        entry: Entry::Gradient,
        rank,
        depth,
    });
    input
        .client
        .launch(Box::new(kernel), count, arguments.with_info(info));
    Some(output)
}

#[cfg(test)]
mod tests {
    use super::{Entry, ThinKernel};
    use crate::precompiled::nvrtc_check::compiles_without_spills;

    #[test]
    fn the_kernels_compile_for_hopper() {
        for entry in [Entry::Product, Entry::Gradient] {
            for rank in [8, 16] {
                for depth in [4096, 11008] {
                    compiles_without_spills(&ThinKernel { entry, rank, depth });
                }
            }
        }
    }
}
