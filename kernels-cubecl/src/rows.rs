//! What the row-wise kernels share (cross-entropy, the causal softmax, RMSNorm): a grid of cubes
//! over rows, and a reduction among the units that share a row.
//!
//! Burn without its autotune reduces a dimension with one GPU thread per output row: for a row
//! of 4096 (RMSNorm's backward) or of 32000 (the loss) that thread walks the whole row. These
//! kernels give a row `lanes` units that stride over it (coalesced loads) and meet in shared
//! memory (rather than through plane operations: WGSL gets subgroups only behind a feature).

use crate::extension::empty_output;
use burn::backend::TensorMetadata;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Cubes one launch takes along the grid's first dimension (wgpu's limit); more wrap onto the
/// second.
const MAX_CUBES: usize = 65_535;

/// A row-wise operation's input made contiguous, an empty output of its shape and dtype, its
/// number of rows (every dimension but the last) and their length.
pub(crate) fn row_layout(input: CubeTensor) -> (CubeTensor, CubeTensor, usize, usize) {
    let (input, rows, width) = row_shape(input);
    let output = empty_output(&input, input.shape(), input.dtype);
    (input, output, rows, width)
}

/// [`row_layout`] without the output, for an operation that may write over another tensor.
pub(crate) fn row_shape(input: CubeTensor) -> (CubeTensor, usize, usize) {
    let input = into_contiguous(input);
    let shape = input.shape();
    let width = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / width.max(1);
    (input, rows, width)
}

/// A grid of at least `cubes` cubes (one where there are none), numbered by [`grid_cube`].
pub(crate) fn grid(cubes: usize) -> CubeCount {
    let x = cubes.clamp(1, MAX_CUBES);
    CubeCount::new_2d(x as u32, cubes.div_ceil(x).max(1) as u32)
}

/// This cube's number in a [`grid`].
#[cube]
pub(crate) fn grid_cube() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

/// Combines `value` over the `lanes` units of this unit's row of the cube (`UNIT_POS_Y`; the
/// cube is `lanes x rows` units) with `max`, else with a sum; every unit of the row gets the
/// result. Every unit of the cube must call it: it waits at the cube's barriers.
#[cube]
pub(crate) fn row_reduce(
    value: f32,
    #[comptime] lanes: usize,
    #[comptime] rows: usize,
    #[comptime] max: bool,
) -> f32 {
    let lane = UNIT_POS_X as usize;
    let base = UNIT_POS_Y as usize * lanes;
    let mut partial = Shared::<[f32]>::new_slice(comptime!(lanes * rows));
    partial[base + lane] = value;
    sync_cube();
    #[unroll]
    for step in 0..comptime!(lanes.trailing_zeros()) {
        let stride = comptime![lanes >> (step + 1)];
        if lane < stride {
            if comptime![max] {
                partial[base + lane] =
                    f32::max(partial[base + lane], partial[base + lane + stride]);
            } else {
                partial[base + lane] += partial[base + lane + stride];
            }
        }
        sync_cube();
    }
    let result = partial[base];
    sync_cube();
    result
}
