//! Plain-Rust reference of every quantization function, written to follow bitsandbytes' CUDA
//! kernels step by step. CPU backends run it, and the tests hold the CubeCL kernels to it.

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};

use crate::codebook::{dynamic_map, quantize_dynamic};
use crate::config::NESTED_BLOCK_SIZE;
use crate::{Absmax, NestedAbsmax, QuantConfig, QuantError, QuantState, QuantType};

/// Quantizes an f32, f16 or bf16 tensor to 4 bits (`bitsandbytes.functional.quantize_4bit`).
pub fn quantize(data: &TensorData, config: QuantConfig) -> Result<QuantState, QuantError> {
    config.validate()?;
    let shape = data.shape().to_vec();
    let values = to_f32(data)?;
    if values.is_empty() {
        return Err(QuantError::Empty { shape });
    }
    let (packed, absmax) = quantize_blocks(&values, config.quant_type, config.block_size);
    let absmax = if config.double_quant {
        Absmax::Double(double_quantize(&absmax, mean_offset(&absmax)))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(QuantState {
        quant_type: config.quant_type,
        block_size: config.block_size,
        shape,
        dtype: data.dtype(),
        packed,
        absmax,
    })
}

/// Dequantizes to the dtype the weight had (`dequantize_4bit`): each value is computed in f32,
/// then rounded to nearest-even, as bitsandbytes' kernel does.
pub fn dequantize(state: &QuantState) -> Result<TensorData, QuantError> {
    state.validate()?;
    let values = dequantize_f32(state);
    let shape = state.shape.clone();
    Ok(match state.dtype {
        DType::F16 => TensorData::new(values.into_iter().map(f16::from_f32).collect(), shape),
        DType::BF16 => TensorData::new(values.into_iter().map(bf16::from_f32).collect(), shape),
        _ => TensorData::new(values, shape),
    })
}

/// The dequantized values in f32, before any rounding to the weight's dtype.
pub fn dequantize_f32(state: &QuantState) -> Vec<f32> {
    let absmax = absmax_values(state);
    let code = state.quant_type.code();
    let n = state.num_elements();
    (0..n)
        .map(|i| {
            let byte = state.packed[i / 2];
            let nibble = if i.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0F
            };
            code[nibble as usize] * absmax[i / state.block_size]
        })
        .collect()
}

/// The f32 absmax of every block, decoding the double quantization if there is one.
pub fn absmax_values(state: &QuantState) -> Vec<f32> {
    match &state.absmax {
        Absmax::Plain(absmax) => absmax.clone(),
        Absmax::Double(nested) => dequantize_absmax(nested),
    }
}

/// `dequantize_blockwise(codes) + offset`, as two f32 steps like bitsandbytes (no fused multiply-add).
pub fn dequantize_absmax(nested: &NestedAbsmax) -> Vec<f32> {
    let map = dynamic_map();
    nested
        .codes
        .iter()
        .enumerate()
        .map(|(i, &code)| {
            let scaled = map[code as usize] * nested.nested_absmax[i / NESTED_BLOCK_SIZE];
            scaled + nested.offset
        })
        .collect()
}

/// The offset subtracted before double quantization: the mean of the absmax, summed in f64 and
/// rounded once, so every backend computes the same value. (torch's f32 reduction, which
/// bitsandbytes uses, can differ from it in the last bit.)
pub fn mean_offset(absmax: &[f32]) -> f32 {
    let sum: f64 = absmax.iter().map(|&a| f64::from(a)).sum();
    (sum / absmax.len() as f64) as f32
}

/// `quantize_blockwise(absmax - offset, blocksize=256)` with the signed dynamic map.
pub fn double_quantize(absmax: &[f32], offset: f32) -> NestedAbsmax {
    let map = dynamic_map();
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut codes = Vec::with_capacity(centered.len());
    let mut nested_absmax = Vec::with_capacity(centered.len().div_ceil(NESTED_BLOCK_SIZE));
    for block in centered.chunks(NESTED_BLOCK_SIZE) {
        let block_max = block_absmax(block);
        nested_absmax.push(block_max);
        let inverse = 1.0 / block_max;
        codes.extend(block.iter().map(|&x| quantize_dynamic(&map, x * inverse)));
    }
    NestedAbsmax {
        codes,
        nested_absmax,
        offset,
    }
}

/// `kQuantizeBlockwise` for NF4/FP4: per block the absmax, then each value times its inverse
/// is coded. A missing last element of an odd-sized tensor is coded as 0 * inverse.
fn quantize_blocks(
    values: &[f32],
    quant_type: QuantType,
    block_size: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut packed = Vec::with_capacity(values.len().div_ceil(2));
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block_size));
    for block in values.chunks(block_size) {
        let block_max = block_absmax(block);
        absmax.push(block_max);
        let inverse = 1.0 / block_max;
        for pair in block.chunks(2) {
            let high = quant_type.quantize(pair[0] * inverse);
            let low = quant_type.quantize(pair.get(1).copied().unwrap_or(0.0) * inverse);
            packed.push((high << 4) | low);
        }
    }
    (packed, absmax)
}

/// Largest magnitude in a block; NaN is skipped as `fmaxf` skips it.
fn block_absmax(block: &[f32]) -> f32 {
    block.iter().fold(f32::MIN, |acc, &x| acc.max(x.abs()))
}

/// The tensor's values widened to f32 (exact for f16 and bf16).
pub(crate) fn to_f32(data: &TensorData) -> Result<Vec<f32>, QuantError> {
    let values = match data.dtype() {
        DType::F32 => data.as_slice::<f32>().map(<[f32]>::to_vec),
        DType::F16 => data
            .as_slice::<f16>()
            .map(|v| v.iter().map(|x| x.to_f32()).collect()),
        DType::BF16 => data
            .as_slice::<bf16>()
            .map(|v| v.iter().map(|x| x.to_f32()).collect()),
        other => return Err(QuantError::Dtype(other)),
    };
    values.map_err(|err| QuantError::Format {
        what: "tensor data".into(),
        detail: format!("{err:?}"),
    })
}
