//! Dequantization on the CPU, as the Flex backend runs it: the reference's arithmetic (each code
//! times its block's absmax in f32, rounded once to the weight's dtype) a block at a time across
//! the CPU's threads. The reference indexes and divides per element, which on Flex took about
//! as long as a 4-bit layer's product in every forward and backward; the tests hold this to it
//! bit for bit.

use burn::tensor::TensorData;
use rayon::prelude::*;

use crate::{QuantError, QuantState, reference};

/// Blocks a thread takes at a time.
const CHUNK_BLOCKS: usize = 64;

/// [`reference::dequantize`]'s result, computed as above.
pub(crate) fn dequantize(state: &QuantState) -> Result<TensorData, QuantError> {
    state.validate()?;
    let values = dequantize_f32(state);
    Ok(TensorData::new(values, state.shape.clone()).convert_dtype(state.dtype))
}

/// [`reference::dequantize_f32`]'s values.
fn dequantize_f32(state: &QuantState) -> Vec<f32> {
    let absmax = reference::absmax_values(state);
    let code = state.quant_type.code();
    // Each byte's two values, the high nibble's first.
    let pairs: [[f32; 2]; 256] = std::array::from_fn(|byte| [code[byte >> 4], code[byte & 0x0F]]);
    let block = state.block_size;
    let mut values = vec![0.0; state.num_elements()];
    // Block sizes are even: a block's values are whole bytes of `packed`.
    values
        .par_chunks_mut(CHUNK_BLOCKS * block)
        .zip(state.packed.par_chunks(CHUNK_BLOCKS * block / 2))
        .zip(absmax.par_chunks(CHUNK_BLOCKS))
        .for_each(|((values, packed), absmax)| {
            for ((values, packed), &scale) in values
                .chunks_mut(block)
                .zip(packed.chunks(block / 2))
                .zip(absmax)
            {
                let mut pairs_out = values.chunks_exact_mut(2);
                for (pair, &byte) in (&mut pairs_out).zip(packed) {
                    let [high, low] = pairs[usize::from(byte)];
                    pair[0] = high * scale;
                    pair[1] = low * scale;
                }
                // An odd-sized tensor's last value: the high nibble of the last byte.
                if let [last] = pairs_out.into_remainder() {
                    *last = pairs[usize::from(packed[packed.len() - 1])][0] * scale;
                }
            }
        });
    values
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, TensorData};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::dequantize;
    use crate::{QuantConfig, QuantType, reference};

    /// Bit for bit the reference's values, over odd sizes (a last block and a last byte cut
    /// short), an all-zero block, every block size class, both code books, with and without
    /// double quantization, into each float dtype.
    #[test]
    fn equals_the_reference_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(11);
        for (i, n) in [1, 7, 64, 65, 1000, 4097, 300_007].into_iter().enumerate() {
            let block_size = [32, 64, 128, 4096][i % 4];
            let mut values: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
            if n >= 2 * block_size {
                values[block_size..2 * block_size].fill(0.0);
            }
            let data = TensorData::new(values, [n]);
            for quant_type in [QuantType::Nf4, QuantType::Fp4] {
                for double_quant in [false, true] {
                    let config = QuantConfig::new(quant_type, block_size, double_quant);
                    let mut state = reference::quantize(&data, config).unwrap();
                    for dtype in [DType::F32, DType::BF16, DType::F16] {
                        state.dtype = dtype;
                        let expected = reference::dequantize(&state).unwrap();
                        let actual = dequantize(&state).unwrap();
                        assert_eq!(actual.dtype(), dtype);
                        assert_eq!(
                            actual.as_bytes(),
                            expected.as_bytes(),
                            "n={n} {config:?} {dtype:?}"
                        );
                    }
                }
            }
        }
    }
}
