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

/// What `thin_gradient` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum GradientOutput {
    /// bf16 `[depth, rank]`, one rounding of the f32 sums (`thin_product`'s one output).
    Bf16,
    /// f32 `[depth, rank]`, the sums times the scale.
    F32,
    /// f32 `[rank, depth]`, the sums times the scale.
    F32Transposed,
}

/// One entry point for one rank, depth and output, all compiled in; `thin_gradient`'s rows and
/// scale travel as its info.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ThinKernel {
    entry: Entry,
    rank: usize,
    depth: usize,
    output: GradientOutput,
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
        let (f32_output, transposed) = match self.output {
            GradientOutput::Bf16 => (0, 0),
            GradientOutput::F32 => (1, 0),
            GradientOutput::F32Transposed => (1, 1),
        };
        format!(
            "#define RANK {}\n#define DEPTH {}\n#define F32_OUTPUT {f32_output}\n\
             #define TRANSPOSED {transposed}\n{SOURCE}",
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
        output: GradientOutput::Bf16,
    });
    x.client.launch(Box::new(kernel), count, arguments);
    hidden
}

/// `inputᵀ · thin` (`[depth, rank]`, bf16, one rounding of the f32 sum) for contiguous bf16
/// `input` `[rows, depth]` and `thin` `[rows, rank]` that [`takes_gradient`]; `None` elsewhere.
pub(crate) fn gradient(input: &CubeTensor, thin: &CubeTensor) -> Option<CubeTensor> {
    takes_gradient(input, thin).then(|| launch_gradient(input, thin, GradientOutput::Bf16, 1.0))
}

/// `scale · inputᵀ · thin` in f32, `[depth, rank]` or (`transposed`) `[rank, depth]`, for
/// operands that [`takes_gradient`]: a LoRA adapter's weight gradient in its f32 master weight's
/// layout, never rounded to bf16 and with no cast after.
pub(crate) fn scaled_gradient(
    input: &CubeTensor,
    thin: &CubeTensor,
    scale: f32,
    transposed: bool,
) -> CubeTensor {
    let output = if transposed {
        GradientOutput::F32Transposed
    } else {
        GradientOutput::F32
    };
    launch_gradient(input, thin, output, scale)
}

/// Whether `thin_gradient` takes `input` `[rows, depth]` and `thin` `[rows, rank]`: contiguous
/// bf16 on sm_90, rows whole 16-row steps, a depth of whole blocks, rank 8 or 16, offsets on 16
/// bytes.
pub(crate) fn takes_gradient(input: &CubeTensor, thin: &CubeTensor) -> bool {
    let [rows, depth] = input.shape().dims();
    let rank = thin.shape()[1];
    input.client.properties().identity.fingerprint == "ptx_sm90"
        && thin.shape()[0] == rows
        && fits(rows, depth, rank)
        && crate::wgmma::bf16_rows(input, depth)
        && crate::wgmma::bf16_rows(thin, rank)
}

fn launch_gradient(
    input: &CubeTensor,
    thin: &CubeTensor,
    output: GradientOutput,
    scale: f32,
) -> CubeTensor {
    let [rows, depth] = input.shape().dims();
    let rank = thin.shape()[1];
    let out = match output {
        GradientOutput::Bf16 => empty_output(input, [depth, rank], DType::BF16),
        GradientOutput::F32 => empty_output(input, [depth, rank], DType::F32),
        GradientOutput::F32Transposed => empty_output(input, [rank, depth], DType::F32),
    };
    let arguments = KernelArguments::new()
        .with_buffer_io(input.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(thin.handle.clone().binding(), BufferIOAttr::ReadOnly)
        .with_buffer_io(out.handle.clone().binding(), BufferIOAttr::WriteOnly);
    // The rows and the scale in the kernel's parameter block (`Params`), none in a metadata
    // buffer.
    let params = vec![rows as u64, u64::from(scale.to_bits())];
    let info = MetadataBindingInfo {
        dynamic_metadata_offset: params.len(),
        data: params,
    };
    let count = CubeCount::Static((depth / CHUNK_DEPTH) as u32, 1, 1);
    let kernel = Precompiled(ThinKernel {
        entry: Entry::Gradient,
        rank,
        depth,
        output,
    });
    input
        .client
        .launch(Box::new(kernel), count, arguments.with_info(info));
    out
}

#[cfg(test)]
mod tests {
    use super::{Entry, GradientOutput, ThinKernel};
    use crate::precompiled::nvrtc_check::compiles_without_spills;

    #[test]
    fn the_kernels_compile_for_hopper() {
        let outputs = [
            (Entry::Product, GradientOutput::Bf16),
            (Entry::Gradient, GradientOutput::Bf16),
            (Entry::Gradient, GradientOutput::F32),
            (Entry::Gradient, GradientOutput::F32Transposed),
        ];
        for (entry, output) in outputs {
            for rank in [8, 16] {
                for depth in [4096, 11008] {
                    compiles_without_spills(&ThinKernel {
                        entry,
                        rank,
                        depth,
                        output,
                    });
                }
            }
        }
    }
}
