//! The code books of bitsandbytes: the 16 values of NF4 and FP4, the decision trees that
//! quantize to them, and the signed 8-bit dynamic map used to quantize the absmax.
//!
//! Every constant and every comparison here is the one in bitsandbytes' `csrc/kernels.cu`, so
//! that our packed bytes equal theirs bit for bit.

// The literals carry the digits bitsandbytes writes; each rounds to the same f32 as there.
#![allow(clippy::excessive_precision, clippy::unreadable_literal)]

use serde::{Deserialize, Serialize};

/// Which 4-bit data type the weights are quantized to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat4: the quantiles of N(0, 1), the QLoRA default.
    Nf4,
    /// 4-bit float with a sign bit, two exponent bits and one mantissa bit.
    Fp4,
}

impl QuantType {
    /// The name bitsandbytes uses (`"nf4"`, `"fp4"`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parses the name bitsandbytes uses.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// The 16 values a 4-bit code stands for, scaled to [-1, 1].
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        }
    }

    /// The 4-bit code of `x`, a value already divided by its block's absmax.
    pub fn quantize(self, x: f32) -> u8 {
        match self {
            QuantType::Nf4 => quantize_nf4(x),
            QuantType::Fp4 => quantize_fp4(x),
        }
    }
}

/// NF4 values, index = code (`nf4_dequantization_lut`).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// FP4 magnitudes for the three low bits (`fp4_dequantization_lut`); bit 3 is the sign.
const FP4_MAGNITUDES: [f32; 8] = [
    0.0,
    0.005208333333,
    0.66666667,
    1.0,
    0.33333333,
    0.5,
    0.16666667,
    0.25,
];

/// FP4 values, index = code: the magnitude times the sign, as bitsandbytes' kernel computes them
/// (so code 8 is -0.0, where its Python table writes 0.0).
pub const FP4_CODE: [f32; 16] = {
    let mut code = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        let sign = if i & 0b1000 != 0 { -1.0 } else { 1.0 };
        code[i] = FP4_MAGNITUDES[i & 0b111] * sign;
        i += 1;
    }
    code
};

/// The comparisons of bitsandbytes' `dQuantizeNF4` tree, in increasing order: the NF4 code of
/// `x` is the number of them that `x` exceeds.
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// The comparisons of `dQuantizeFP4` on |x|, in increasing order.
pub const FP4_THRESHOLDS: [f32; 7] = [
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333,
];

/// The FP4 magnitude code for each count of [`FP4_THRESHOLDS`] exceeded.
pub const FP4_COUNT_TO_CODE: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// `dQuantizeNF4`, bitsandbytes' binary tree over [`NF4_THRESHOLDS`]. NaN falls to code 0.
pub fn quantize_nf4(x: f32) -> u8 {
    let t = &NF4_THRESHOLDS;
    if x > t[7] {
        if x > t[11] {
            if x > t[13] {
                if x > t[14] { 0b1111 } else { 0b1110 }
            } else if x > t[12] {
                0b1101
            } else {
                0b1100
            }
        } else if x > t[9] {
            if x > t[10] { 0b1011 } else { 0b1010 }
        } else if x > t[8] {
            0b1001
        } else {
            0b1000
        }
    } else if x > t[3] {
        if x > t[5] {
            if x > t[6] { 0b0111 } else { 0b0110 }
        } else if x > t[4] {
            0b0101
        } else {
            0b0100
        }
    } else if x > t[1] {
        if x > t[2] { 0b0011 } else { 0b0010 }
    } else if x > t[0] {
        0b0001
    } else {
        0b0000
    }
}

/// `dQuantizeFP4`: the sign bit, then bitsandbytes' tree over |x| and [`FP4_THRESHOLDS`].
pub fn quantize_fp4(x: f32) -> u8 {
    let t = &FP4_THRESHOLDS;
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let x = x.abs();
    let magnitude = if x > t[3] {
        if x > t[5] {
            if x > t[6] { 0b0011 } else { 0b0010 }
        } else if x > t[4] {
            0b0101
        } else {
            0b0100
        }
    } else if x > t[1] {
        if x > t[2] { 0b0111 } else { 0b0110 }
    } else if x > t[0] {
        0b0001
    } else {
        0b0000
    };
    magnitude + sign
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), sorted: 127
/// negative values, 0, 127 positive values and 1.0, each `10^e * mean` of a float32 `linspace`.
pub fn dynamic_map() -> [f32; 256] {
    // Python's `10 ** (i - 6)`, rounded to f32 when torch multiplies it into a float tensor.
    const POWERS: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut values = Vec::with_capacity(256);
    for (i, power) in POWERS.iter().enumerate() {
        let scale = *power as f32;
        let bounds = linspace_f32(0.1, 1.0, (1 << i) + 1);
        for pair in bounds.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            values.push(scale * mean);
            values.push(-scale * mean);
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(f32::total_cmp);
    values.try_into().expect("the dynamic map has 256 values")
}

/// `torch.linspace(start, end, steps, dtype=float32)` as it runs on CUDA, where bitsandbytes
/// builds the map: the first half counts up from `start`, the second half down from `end`, each
/// value one fused multiply-add.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `dQuantize<0>`: nearest value of the sorted 256-entry `code` by bitsandbytes' seven-step
/// binary search, ties and all.
pub fn quantize_dynamic(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let chosen = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    chosen as u8
}
