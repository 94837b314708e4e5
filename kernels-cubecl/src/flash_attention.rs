//! The launches of the causal attention kernels (`flash_attention.cu`): hand-written CUDA on
//! `mma.sync` (compute capability 8.0 and later), entering CubeCL as precompiled kernels as the
//! `wgmma` product does, on the same stream and allocator. Sizes and strides travel as the
//! kernel's info (by value), so one compilation per entry point and head width serves every
//! length.

use burn::backend::TensorMetadata;
use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::attributes::BufferIOAttr;
use cubecl::prelude::*;
use cubecl::server::{KernelArguments, MetadataBindingInfo};

use crate::extension::empty_output;
use crate::precompiled::{CudaKernel, Precompiled};

const SOURCE: &str = include_str!("flash_attention.cu");

/// The head widths the kernels are built for (`HEAD_DIM`): LLaMA-2's 128, SmolLM2's 64.
pub(crate) const HEAD_DIMS: [usize; 2] = [64, 128];
/// Rows of a block's tiles (`BLOCK`: queries or keys) and its threads (four warps).
const BLOCK: usize = 64;
const THREADS: u32 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Entry {
    Forward,
    BackwardDq,
    BackwardDkDv,
}

/// One entry point of `flash_attention.cu` for one head width.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FlashKernel {
    entry: Entry,
    head_dim: usize,
}

impl FlashKernel {
    fn name(&self) -> &'static str {
        match self.entry {
            Entry::Forward => "attention_forward",
            Entry::BackwardDq => "attention_backward_dq",
            Entry::BackwardDkDv => "attention_backward_dkdv",
        }
    }

    /// The tiles of `BLOCK` padded rows (the forward's queries, keys and values; the
    /// backward's six, two of them double-buffered) and the backward's per-row statistics (two
    /// buffers of two).
    fn shared_memory_bytes(&self) -> usize {
        let tile = BLOCK * (self.head_dim + 8) * 2;
        match self.entry {
            Entry::Forward => 3 * tile,
            Entry::BackwardDq | Entry::BackwardDkDv => 6 * tile + 4 * BLOCK * 4,
        }
    }
}

impl CudaKernel for FlashKernel {
    const THREADS: u32 = THREADS;

    fn entry_point(&self) -> &'static str {
        self.name()
    }

    fn text(&self) -> String {
        format!(
            "#define HEAD_DIM {}\n#define DYNAMIC_SHARED_MEMORY_BYTES {}\n{SOURCE}",
            self.head_dim,
            self.shared_memory_bytes()
        )
    }
}

/// `tensor` as the kernels read a head's rows: the last dimension contiguous, the other strides
/// whole 16-byte chunks, the start aligned to one; copied contiguous otherwise.
fn rows_of(tensor: CubeTensor) -> CubeTensor {
    let strides = tensor.meta.strides();
    let readable = !tensor.meta.is_tiled()
        && strides[3] == 1
        && strides[..3].iter().all(|stride| stride % 8 == 0)
        && tensor.handle.offset_start.unwrap_or(0).is_multiple_of(16);
    if readable {
        tensor
    } else {
        into_contiguous(tensor)
    }
}

/// The batch, head and row strides of a `[batch, heads, seq, head_dim]` view.
fn head_strides(tensor: &CubeTensor) -> [u64; 3] {
    let strides = tensor.meta.strides();
    [strides[0] as u64, strides[1] as u64, strides[2] as u64]
}

/// `Params` of the kernels: sizes, the scale, and the strides of q, k, v, the output (as
/// `[batch, heads, seq, head_dim]`: its memory is `[batch, seq, heads, head_dim]`) and its
/// gradient.
fn params(q: &CubeTensor, k: &CubeTensor, v: &CubeTensor, grad: [u64; 3], scale: f32) -> Vec<u64> {
    let [_, heads, seq, head_dim] = q.shape().dims();
    let kv_heads = k.shape()[1];
    let output = [
        (seq * heads * head_dim) as u64,
        head_dim as u64,
        (heads * head_dim) as u64,
    ];
    let mut params = vec![
        seq as u64,
        heads as u64,
        (heads / kv_heads) as u64,
        u64::from((scale * std::f32::consts::LOG2_E).to_bits()),
        u64::from(scale.to_bits()),
    ];
    for strides in [
        head_strides(q),
        head_strides(k),
        head_strides(v),
        output,
        grad,
    ] {
        params.extend(strides);
    }
    params
}

fn launch(
    reference: &CubeTensor,
    kernel: FlashKernel,
    blocks: [usize; 3],
    buffers: Vec<(&CubeTensor, BufferIOAttr)>,
    params: Vec<u64>,
) {
    let mut arguments = KernelArguments::new();
    for (tensor, io) in buffers {
        arguments = arguments.with_buffer_io(tensor.handle.clone().binding(), io);
    }
    // All of it in the kernel's parameter block, none in a metadata buffer.
    let info = MetadataBindingInfo {
        dynamic_metadata_offset: params.len(),
        data: params,
    };
    let count = CubeCount::Static(blocks[0] as u32, blocks[1] as u32, blocks[2] as u32);
    reference.client.launch(
        Box::new(Precompiled(kernel)),
        count,
        arguments.with_info(info),
    );
}

/// The attention output (`[batch, seq, heads, head_dim]`) and the queries' base-2 log-sum-exp
/// (f32 `[batch, heads, seq]`) of bf16 `q` `[batch, heads, seq, head_dim]` and `k`, `v`
/// `[batch, kv_heads, seq, head_dim]`.
pub(crate) fn forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    scale: f32,
) -> (CubeTensor, CubeTensor) {
    let (q, k, v) = (rows_of(q), rows_of(k), rows_of(v));
    let [batch, heads, seq, head_dim] = q.shape().dims();
    let output = empty_output(&q, [batch, seq, heads, head_dim], DType::BF16);
    let logsumexp = empty_output(&q, [batch, heads, seq], DType::F32);
    if seq == 0 {
        return (output, logsumexp);
    }
    let params = params(&q, &k, &v, [0; 3], scale);
    let buffers = vec![
        (&q, BufferIOAttr::ReadOnly),
        (&k, BufferIOAttr::ReadOnly),
        (&v, BufferIOAttr::ReadOnly),
        (&output, BufferIOAttr::WriteOnly),
        (&logsumexp, BufferIOAttr::WriteOnly),
    ];
    let kernel = FlashKernel {
        entry: Entry::Forward,
        head_dim,
    };
    launch(
        &q,
        kernel,
        [seq.div_ceil(BLOCK), heads, batch],
        buffers,
        params,
    );
    (output, logsumexp)
}

/// The gradients of `q` (`[batch, heads, seq, head_dim]`), `k` (`[batch, kv_heads, seq,
/// head_dim]`) and `v` (laid out `[batch, seq, kv_heads, head_dim]`) for the output's gradient
/// `grad` (`[batch, seq, heads, head_dim]`, any strides).
pub(crate) fn backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    output: CubeTensor,
    logsumexp: CubeTensor,
    grad: CubeTensor,
    scale: f32,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let (q, k, v) = (rows_of(q), rows_of(k), rows_of(v));
    let [batch, heads, seq, head_dim] = q.shape().dims();
    let kv_heads = k.shape()[1];
    let dq = empty_output(&q, [batch, heads, seq, head_dim], DType::BF16);
    let dk = empty_output(&q, [batch, kv_heads, seq, head_dim], DType::BF16);
    let dv = empty_output(&q, [batch, seq, kv_heads, head_dim], DType::BF16);
    if seq == 0 {
        return (dq, dk, dv);
    }
    // The output's gradient read as `[batch, heads, seq, head_dim]`, like the output.
    let grad = rows_of(grad);
    let grad_strides = grad.meta.strides();
    let grad_strides = [grad_strides[0], grad_strides[2], grad_strides[1]].map(|s| s as u64);
    let params = params(&q, &k, &v, grad_strides, scale);
    let delta = empty_output(&q, [batch, heads, seq], DType::F32);
    let blocks = seq.div_ceil(BLOCK);
    let read = BufferIOAttr::ReadOnly;
    launch(
        &q,
        FlashKernel {
            entry: Entry::BackwardDq,
            head_dim,
        },
        [blocks, heads, batch],
        vec![
            (&q, read),
            (&k, read),
            (&v, read),
            (&output, read),
            (&grad, read),
            (&logsumexp, read),
            (&delta, BufferIOAttr::WriteOnly),
            (&dq, BufferIOAttr::WriteOnly),
        ],
        params.clone(),
    );
    launch(
        &q,
        FlashKernel {
            entry: Entry::BackwardDkDv,
            head_dim,
        },
        [blocks, kv_heads, batch],
        vec![
            (&q, read),
            (&k, read),
            (&v, read),
            (&grad, read),
            (&logsumexp, read),
            (&delta, read),
            (&dk, BufferIOAttr::WriteOnly),
            (&dv, BufferIOAttr::WriteOnly),
        ],
        params,
    );
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::{Entry, FlashKernel, HEAD_DIMS};
    use crate::precompiled::nvrtc_check::compile_for_hopper;

    #[test]
    fn the_kernels_compile_for_hopper() {
        for head_dim in HEAD_DIMS {
            for entry in [Entry::Forward, Entry::BackwardDq, Entry::BackwardDkDv] {
                compile_for_hopper(&FlashKernel { entry, head_dim });
            }
        }
    }
}
