//! The low-rank update `x·A·B` of a LoRA layer, with its long products split along their depth.
//!
//! Three of its products are skinny: `x·A` (`[tokens, in] x [in, r]`) in the forward and, in the
//! backward, `dY·Bᵀ` (`[tokens, out] x [out, r]`) are r wide and thousands deep. A GPU matmul
//! spreads its work over tiles of the *output*, and a `[2048, 8]` output is a few tiles: on an
//! H100 cubek's matmul ran `[2048, 4096] x [4096, 8]` on 16 cubes in 165 µs, 20 times the time it
//! takes to read `x` once, and these products took a fifth of a 7B QLoRA step. So the deep
//! dimension is cut into `s` slices multiplied as one batched product, `s` times the tiles, whose
//! partial results are summed (split-K); the update's second product is batched per slice of its
//! output so that its backward `dY·Bᵀ` is split the same way by autodiff. Few rows (decoding) or a
//! short depth keep the plain products.

use burn::tensor::Tensor;

/// Fewer rows than this keep the plain products: they have little to read, and a split adds
/// launches.
const MIN_ROWS: usize = 256;
/// Depth of one slice at the least, so each slice's product still streams long rows.
const MIN_SLICE_DEPTH: usize = 256;
/// The most slices: 32 times a product's tiles fill an H100 for 2048 rows.
const MAX_SLICES: usize = 32;

/// `base + x · a · b` for `x` `[rows, in]`, `a` `[in, r]`, `b` `[r, out]`, `base` `[rows, out]`.
pub(crate) fn add_low_rank_update(
    base: Tensor<2>,
    x: Tensor<2>,
    a: Tensor<2>,
    b: Tensor<2>,
) -> Tensor<2> {
    let [rows, width] = base.dims();
    if rows < MIN_ROWS {
        return base + x.matmul(a).matmul(b);
    }
    let hidden = project_in(x, a);
    let s = slices(width);
    if s == 1 {
        return base + hidden.matmul(b);
    }
    // `hidden · b` batched per slice of the output, `[s, rows, r] x [s, r, out/s]`: no faster
    // in the forward, but autodiff's gradient of `hidden` becomes the split `Σ dYₛ · bₛᵀ`. The
    // slices are added to `base` as a strided view, so the update is never copied whole.
    let [_, rank] = hidden.dims();
    let b = b.reshape([rank, s, width / s]).swap_dims(0, 1);
    let update = hidden
        .unsqueeze::<3>()
        .expand([s, rows, rank])
        .matmul(b)
        .swap_dims(0, 1);
    (base.reshape([rows, s, width / s]) + update).reshape([rows, width])
}

/// The number of slices a product of `depth` is cut into: a power of two dividing it, each slice
/// at least `MIN_SLICE_DEPTH` deep; 1 (no split) where none fits.
fn slices(depth: usize) -> usize {
    let mut slices = MAX_SLICES;
    while slices > 1 && !(depth.is_multiple_of(slices) && depth / slices >= MIN_SLICE_DEPTH) {
        slices /= 2;
    }
    slices
}

/// `x · a`, its depth `in` cut into slices: `[s, rows, in/s] x [s, in/s, r]`, summed over `s`.
fn project_in(x: Tensor<2>, a: Tensor<2>) -> Tensor<2> {
    let [rows, depth] = x.dims();
    let [_, rank] = a.dims();
    let s = slices(depth);
    if s == 1 {
        return x.matmul(a);
    }
    // A strided view of `x`, no copy: slice `i` is columns `i·depth/s..` of every row.
    let x = x.reshape([rows, s, depth / s]).swap_dims(0, 1);
    let a = a.reshape([s, depth / s, rank]);
    x.matmul(a).sum_dim(0).reshape([rows, rank])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_divide_the_depth_and_keep_it_long() {
        assert_eq!(slices(4096), 16);
        assert_eq!(slices(11008), 32);
        assert_eq!(slices(576), 2);
        assert_eq!(slices(1024), 4);
        assert_eq!(slices(300), 1);
        assert_eq!(slices(257), 1);
    }
}
