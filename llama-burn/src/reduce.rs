//! Sums over a long last dimension, in two steps.
//!
//! Without its autotune (which crashes on CUDA here, see BENCHMARKS.md) Burn reduces a dimension
//! with one GPU thread per output: an RMSNorm over `[2048, 4096]` is 2048 threads each walking
//! 4096 values, 170 µs on an H100. Reducing `[rows, n]` as `[rows, n/c, c]`, over the `c` and
//! then over the `n/c`, puts `n/c` times as many threads on it: 18 + 12 µs. (The loss over the
//! vocabulary has its own kernels: `kernels_cubecl::cross_entropy`.)

use burn::tensor::Tensor;

/// Below this the first step would be too short to matter: one step.
const MIN_STEP: usize = 16;

/// `Σ x` over the last dimension, kept as a dimension of 1.
pub fn sum_last_dim<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let mut dims = x.dims();
    let len = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    let step = first_step(len);
    let sums = x.reshape([rows, len / step, step]).sum_dim(2).sum_dim(1);
    dims[D - 1] = 1;
    sums.reshape(dims)
}

/// The length of the first step: the divisor of `len` nearest below its square root, so both
/// steps are short; `len` itself (a plain one-step reduction) where that divisor is small.
fn first_step(len: usize) -> usize {
    let divisor = (1..=len.isqrt())
        .rev()
        .find(|c| len.is_multiple_of(*c))
        .unwrap_or(1);
    if divisor < MIN_STEP { len } else { divisor }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution};

    use super::*;

    #[test]
    fn steps_divide_the_length() {
        assert_eq!(first_step(32000), 160);
        assert_eq!(first_step(4096), 64);
        assert_eq!(first_step(49152), 192);
        assert_eq!(first_step(576), 24);
        assert_eq!(first_step(31), 31);
        assert_eq!(first_step(2 * 997), 2 * 997);
    }

    #[test]
    fn two_steps_give_the_sums() {
        let device = Device::flex();
        for len in [4096, 997] {
            let x = Tensor::<2>::random([3, len], Distribution::Default, &device);
            let values = x.to_data().try_to_vec::<f32>().unwrap();
            let sums = sum_last_dim(x).to_data().try_to_vec::<f32>().unwrap();
            for (row, values) in values.chunks(len).enumerate() {
                // f32 sums of [0, 1) values against an f64 sum: rounding stays under 1e-6.
                let expected = values.iter().map(|v| *v as f64).sum::<f64>();
                let error = (sums[row] as f64 - expected).abs() / expected;
                assert!(error < 1e-6, "len {len}, row {row}: relative error {error}");
            }
        }
    }
}
