//! The CubeCL kernels, one source for CUDA and wgpu. Each follows a function of
//! [`crate::reference`] and must agree with it bit for bit.
//!
//! Packed data lives on the device as `u32` words (wgpu has no 8-bit storage): byte `k` of a
//! word is bits `8k..8k+8`, so the byte order on the host is unchanged, and the high nibble of
//! each byte is the element that comes first.

use cubecl::prelude::*;

use crate::NESTED_BLOCK_SIZE;

/// Elements in one packed word: four bytes of two 4-bit codes.
pub const WORD_ELEMENTS: usize = 8;

/// Dequantizes one packed word per unit: `code[nibble] * (absmax[block] + offset)`.
///
/// `absmax` is either the plain absmax (offset 0) or the decoded-but-not-offset nested absmax, so
/// the offset is added here as a separate f32 step, exactly as bitsandbytes adds it.
#[cube(launch_unchecked)]
pub fn dequantize_4bit_kernel<F: Float>(
    packed: &[u32],
    absmax: &[f32],
    code: &[f32],
    output: &mut [F],
    offset: f32,
    num_elements: usize,
    #[comptime] block_shift: u32,
    #[define(F)] _dtype: ElemType,
) {
    let first = ABSOLUTE_POS * WORD_ELEMENTS;
    if first >= num_elements {
        terminate!();
    }
    let word = packed[ABSOLUTE_POS];
    // A block holds at least 32 elements, so all eight share one absmax.
    let scale = absmax[first >> block_shift as usize] + offset;
    #[unroll]
    for byte_index in 0..4u32 {
        let byte = (word >> (byte_index * 8)) & 0xFF;
        let index = first + (byte_index as usize) * 2;
        if index < num_elements {
            output[index] = F::cast_from(code[(byte >> 4) as usize] * scale);
        }
        if index + 1 < num_elements {
            output[index + 1] = F::cast_from(code[(byte & 0x0F) as usize] * scale);
        }
    }
}

/// [`dequantize_4bit_kernel`] for whole words: each unit writes its eight values as vectors of
/// `N` (16-byte stores for bf16 on CUDA), the fast path when the element count is a multiple of 8.
#[cube(launch_unchecked)]
pub fn dequantize_4bit_vector_kernel<F: Float, N: Size>(
    packed: &[u32],
    absmax: &[f32],
    code: &[f32],
    output: &mut [Vector<F, N>],
    offset: f32,
    num_words: usize,
    #[comptime] block_shift: u32,
    #[define(F)] _dtype: ElemType,
) {
    let word_index = ABSOLUTE_POS;
    if word_index >= num_words {
        terminate!();
    }
    let scale = absmax[(word_index * WORD_ELEMENTS) >> block_shift as usize] + offset;
    write_word::<F, N>(packed[word_index], scale, code, output, word_index);
}

/// Units per cube of [`dequantize_4bit_double_kernel`], and the packed words each unit takes:
/// four loads in flight a unit took the H200's 11008 x 4096 dequantization from 40 to 29 µs.
pub const DEQUANTIZE_CUBE_UNITS: usize = 256;
pub const DEQUANTIZE_UNIT_WORDS: usize = 4;

/// [`dequantize_4bit_vector_kernel`] for a double-quantized absmax, decoded in the same launch:
/// the cube's first units decode the absmax of the cube's blocks, `map[code] *
/// nested[block / 256]`, into shared memory, then every unit adds the offset to its block's.
/// The product is rounded to f32 in shared memory before the offset is added, as bitsandbytes'
/// two steps round it: across the barrier no compiler can fuse them into one rounded
/// multiply-add.
///
/// A unit dequantizes `DEQUANTIZE_UNIT_WORDS` words a cube apart (every load and store of a plane
/// contiguous), and loads them before it decodes, so that the loads' latency and the decode's
/// overlap. Cubes are `DEQUANTIZE_CUBE_UNITS` units; blocks are powers of two of at least 32
/// elements, so a cube's words start on a block or lie inside one.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn dequantize_4bit_double_kernel<F: Float, N: Size>(
    packed: &[u32],
    absmax_codes: &[u32],
    nested_absmax: &[f32],
    map: &[f32],
    code: &[f32],
    output: &mut [Vector<F, N>],
    offset: f32,
    num_words: usize,
    num_blocks: usize,
    #[comptime] block_shift: u32,
    #[define(F)] _dtype: ElemType,
) {
    let unit = UNIT_POS as usize;
    let first_word = CUBE_POS * DEQUANTIZE_CUBE_UNITS * DEQUANTIZE_UNIT_WORDS;
    let mut words = Array::<u32>::new(DEQUANTIZE_UNIT_WORDS);
    #[unroll]
    for i in 0..DEQUANTIZE_UNIT_WORDS {
        let word_index = first_word + i * DEQUANTIZE_CUBE_UNITS + unit;
        if word_index < num_words {
            words[i] = packed[word_index];
        }
    }
    let first_block = (first_word * WORD_ELEMENTS) >> block_shift as usize;
    let cube_blocks = comptime![
        ((DEQUANTIZE_CUBE_UNITS * DEQUANTIZE_UNIT_WORDS * WORD_ELEMENTS) >> block_shift as usize)
            .max(1)
    ];
    let mut decoded = Shared::<[f32]>::new_slice(cube_blocks);
    let mut local_block = unit;
    while local_block < cube_blocks {
        let block = first_block + local_block;
        if block < num_blocks {
            decoded[local_block] = decode_absmax(absmax_codes, nested_absmax, map, block);
        }
        local_block += DEQUANTIZE_CUBE_UNITS;
    }
    // Every unit reaches the barrier; those past the end write nothing after it.
    sync_cube();
    #[unroll]
    for i in 0..DEQUANTIZE_UNIT_WORDS {
        let word_index = first_word + i * DEQUANTIZE_CUBE_UNITS + unit;
        if word_index < num_words {
            let local_block = ((word_index * WORD_ELEMENTS) >> block_shift as usize) - first_block;
            let scale = decoded[local_block] + offset;
            write_word::<F, N>(words[i], scale, code, output, word_index);
        }
    }
}

/// Writes the eight values of packed word `word_index`, `code[nibble] * scale`, as vectors of
/// `N`.
#[cube]
fn write_word<F: Float, N: Size>(
    word: u32,
    scale: f32,
    code: &[f32],
    output: &mut [Vector<F, N>],
    word_index: usize,
) {
    let lanes = N::value();
    let vectors = comptime![WORD_ELEMENTS / lanes];
    #[unroll]
    for v in 0..vectors {
        let mut values = Vector::<F, N>::empty();
        #[unroll]
        for lane in 0..lanes {
            // Element e sits in byte e / 2, in the high nibble when e is even.
            let shift = comptime![{
                let e = v * lanes + lane;
                (e / 2 * 8 + if e % 2 == 0 { 4 } else { 0 }) as u32
            }];
            let nibble = (word >> shift) & 0x0F;
            values.insert(lane, F::cast_from(code[nibble as usize] * scale));
        }
        output[word_index * vectors + v] = values;
    }
}

/// Units that share one output value of [`matvec_4bit_kernel`], and output values per cube.
pub const MATVEC_LANES: u32 = 32;
pub const MATVEC_FEATURES_PER_CUBE: u32 = 8;

/// `output[row, feature] = Σ input[row, col] · W[feature, col]` with `W` read packed: the
/// dequantization fused into a matrix-vector product, for decoding's few rows, where the
/// product is bound by reading the weight and a dense copy would cost four times its bytes.
///
/// A cube is `MATVEC_LANES x MATVEC_FEATURES_PER_CUBE` units; the `MATVEC_LANES` units of one
/// feature stride over its packed row a word at a time (coalesced loads), sum in f32, and meet in
/// shared memory. `cols` is a multiple of 8, so a row starts on a word; `absmax` and `offset` are
/// as in [`dequantize_4bit_kernel`]. The cube's `y` position is the row.
#[cube(launch_unchecked)]
pub fn matvec_4bit_kernel<F: Float>(
    input: &[F],
    packed: &[u32],
    absmax: &[f32],
    code: &[f32],
    output: &mut [F],
    offset: f32,
    features: usize,
    cols: usize,
    #[comptime] block_shift: u32,
    #[define(F)] _dtype: ElemType,
) {
    let lane = UNIT_POS_X as usize;
    let feature = (CUBE_POS_X * MATVEC_FEATURES_PER_CUBE + UNIT_POS_Y) as usize;
    let row = CUBE_POS_Y as usize;
    let words_per_row = cols / WORD_ELEMENTS;
    let mut sum = f32::new(0.0);
    // No unit leaves early: every one must reach the barriers below.
    if feature < features {
        let first_word = feature * words_per_row;
        let mut word_in_row = lane;
        while word_in_row < words_per_row {
            let word_index = first_word + word_in_row;
            let word = packed[word_index];
            let scale = absmax[(word_index * WORD_ELEMENTS) >> block_shift as usize] + offset;
            let x_first = row * cols + word_in_row * WORD_ELEMENTS;
            let mut word_sum = f32::new(0.0);
            #[unroll]
            for e in 0..WORD_ELEMENTS {
                // Element e sits in byte e / 2, in the high nibble when e is even.
                let shift = comptime![(e / 2 * 8 + if e % 2 == 0 { 4 } else { 0 }) as u32];
                let nibble = (word >> shift) & 0x0F;
                word_sum += code[nibble as usize] * f32::cast_from(input[x_first + e]);
            }
            sum += word_sum * scale;
            word_in_row += MATVEC_LANES as usize;
        }
    }
    let mut partial = Shared::<[f32]>::new_slice(comptime!(
        (MATVEC_LANES * MATVEC_FEATURES_PER_CUBE) as usize
    ));
    let slot = UNIT_POS_Y as usize * MATVEC_LANES as usize + lane;
    partial[slot] = sum;
    sync_cube();
    // Shared memory rather than plane sums: WGSL gets subgroups only behind a feature.
    #[unroll]
    for step in 0..comptime!(MATVEC_LANES.trailing_zeros()) {
        let stride = comptime![(MATVEC_LANES >> (step + 1)) as usize];
        if lane < stride {
            partial[slot] += partial[slot + stride];
        }
        sync_cube();
    }
    if lane == 0 && feature < features {
        output[row * features + feature] = F::cast_from(partial[slot]);
    }
}

/// Decodes the 8-bit absmax codes without the offset (see [`decode_absmax`]).
#[cube(launch_unchecked)]
pub fn dequantize_absmax_kernel(
    codes: &[u32],
    nested_absmax: &[f32],
    map: &[f32],
    output: &mut [f32],
    num_blocks: usize,
) {
    let index = ABSOLUTE_POS;
    if index >= num_blocks {
        terminate!();
    }
    output[index] = decode_absmax(codes, nested_absmax, map, index);
}

/// Block `block`'s absmax without the offset, from its 8-bit code (four a word):
/// `map[code] * nested[block / 256]`.
#[cube]
fn decode_absmax(codes: &[u32], nested_absmax: &[f32], map: &[f32], block: usize) -> f32 {
    let code = (codes[block / 4] >> (((block % 4) * 8) as u32)) & 0xFF;
    map[code as usize] * nested_absmax[block / NESTED_BLOCK_SIZE]
}

/// Quantizes one block per unit: its absmax, then every value times the absmax's inverse, coded.
///
/// A 4-bit code is the count of `thresholds` (the sorted midpoints between code values) below
/// the value, mapped through `remap` (identity for NF4). For FP4 (`signed_magnitude`) the count
/// is taken on |x| and the sign bit added. NaN counts nothing, as bitsandbytes' tree gives 0.
#[cube(launch_unchecked)]
pub fn quantize_4bit_kernel<F: Float>(
    input: &[F],
    thresholds: &[f32],
    remap: &[u32],
    packed: &mut [u32],
    absmax: &mut [f32],
    num_elements: usize,
    #[comptime] block_size: usize,
    #[comptime] signed_magnitude: bool,
    #[comptime] num_thresholds: usize,
    #[define(F)] _dtype: ElemType,
) {
    let block = ABSOLUTE_POS;
    let start = block * block_size;
    if start >= num_elements {
        terminate!();
    }
    let mut block_max = f32::new(-3.402_823_5e38);
    for i in 0..block_size {
        if start + i < num_elements {
            block_max = f32::max(block_max, f32::abs(f32::cast_from(input[start + i])));
        }
    }
    absmax[block] = block_max;
    let inverse = reciprocal(block_max);
    // Bytes past ceil(n / 2) stay zero; a missing odd element inside the last byte is coded as
    // 0 * inverse, as bitsandbytes codes it.
    let used_bytes = num_elements.div_ceil(2);
    for w in 0..block_size / WORD_ELEMENTS {
        let word_first = start + w * WORD_ELEMENTS;
        let mut word = 0u32;
        #[unroll]
        for e in 0..WORD_ELEMENTS {
            let index = word_first + e;
            if index / 2 < used_bytes {
                let mut value = f32::new(0.0);
                if index < num_elements {
                    value = f32::cast_from(input[index]);
                }
                let nibble = quantize_4bit_value(
                    value * inverse,
                    thresholds,
                    remap,
                    signed_magnitude,
                    num_thresholds,
                );
                let shift = (e / 2) * 8 + select(e % 2 == 0, 4, 0);
                word |= nibble << shift as u32;
            }
        }
        if word_first < num_elements {
            packed[word_first / WORD_ELEMENTS] = word;
        }
    }
}

// Cube code indexes slices; iterators over them do not expand.
#[allow(clippy::needless_range_loop)]
#[cube]
fn quantize_4bit_value(
    x: f32,
    thresholds: &[f32],
    remap: &[u32],
    #[comptime] signed_magnitude: bool,
    #[comptime] num_thresholds: usize,
) -> u32 {
    let mut sign = 0u32;
    let mut magnitude = x;
    if comptime![signed_magnitude] {
        sign = select(x < f32::new(0.0), 8u32, 0u32);
        magnitude = f32::abs(x);
    }
    let mut count = 0u32;
    // The count comes from the host: a buffer's `len()` is its allocation's, which CUDA pads.
    #[unroll]
    for t in 0..num_thresholds {
        count += select(magnitude > thresholds[t], 1u32, 0u32);
    }
    remap[count as usize] + sign
}

/// Double quantization, one nested block of 256 absmax per unit: subtract the offset, take the
/// block's absmax, and code each value times its inverse with the 8-bit dynamic map.
#[cube(launch_unchecked)]
pub fn quantize_absmax_kernel(
    absmax: &[f32],
    map: &[f32],
    codes: &mut [u32],
    nested_absmax: &mut [f32],
    offset: f32,
    num_blocks: usize,
) {
    let nested_block = ABSOLUTE_POS;
    let start = nested_block * 256;
    if start >= num_blocks {
        terminate!();
    }
    let mut block_max = f32::new(-3.402_823_5e38);
    for i in 0..256usize {
        if start + i < num_blocks {
            block_max = f32::max(block_max, f32::abs(absmax[start + i] - offset));
        }
    }
    nested_absmax[nested_block] = block_max;
    let inverse = reciprocal(block_max);
    for w in 0..64usize {
        let word_first = start + w * 4;
        if word_first < num_blocks {
            let mut word = 0u32;
            #[unroll]
            for b in 0..4usize {
                if word_first + b < num_blocks {
                    let x = (absmax[word_first + b] - offset) * inverse;
                    word |= quantize_dynamic_value(x, map) << (b * 8) as u32;
                }
            }
            codes[word_first / 4] = word;
        }
    }
}

/// bitsandbytes' `dQuantize<0>`: a seven-step binary search of the sorted map, then the nearer
/// neighbour by comparing with the midpoint.
#[cube]
fn quantize_dynamic_value(x: f32, map: &[f32]) -> u32 {
    let mut pivot = 127u32;
    let mut upper_pivot = 255u32;
    let mut lower_pivot = 0u32;
    let mut lower = f32::new(-1.0);
    let mut upper = f32::new(1.0);
    let mut val = map[pivot as usize];
    let mut step = 64u32;
    #[unroll]
    for _ in 0..7 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = map[pivot as usize];
        step /= 2;
    }
    if upper_pivot == 255 {
        upper = map[255];
    }
    if lower_pivot == 0 {
        lower = map[0];
    }
    let mut chosen = pivot;
    if x > val {
        if x > (upper + val) * f32::new(0.5) {
            chosen = upper_pivot;
        }
    } else if x < (lower + val) * f32::new(0.5) {
        chosen = lower_pivot;
    }
    chosen
}

/// `1 / a` correctly rounded, as the reference's IEEE division gives it. Shader division may be
/// off by up to 2.5 ulp (Vulkan, WGSL), which moves codes; this divides the mantissas with
/// integers instead. Zero, infinities, NaN and the extremes of the range use the division.
#[cube]
fn reciprocal(a: f32) -> f32 {
    let bits = u32::reinterpret(a);
    let exponent = (bits >> 23) & 0xFF;
    let mut result = f32::new(1.0) / a;
    if exponent > 0 && exponent < 253 {
        let sign = bits & 0x8000_0000;
        let mantissa = (bits & 0x007F_FFFF) | 0x0080_0000;
        if mantissa == 0x0080_0000 {
            // A power of two: its reciprocal is exact.
            result = f32::reinterpret(sign | ((254 - exponent) << 23));
        } else {
            // 2^24 / mantissa lies in (1, 2): long division gives 26 quotient bits and the rest.
            let mut remainder = 0x0100_0000 - mantissa;
            let mut quotient = 1u32;
            #[unroll]
            for _ in 0..25 {
                remainder <<= 1;
                let bit = select(remainder >= mantissa, 1u32, 0u32);
                remainder -= bit * mantissa;
                quotient = (quotient << 1) | bit;
            }
            // Keep 24 bits, rounding to nearest even on the guard bit and what lies below it.
            let mut kept = quotient >> 2;
            let guard = (quotient >> 1) & 1;
            let below = (quotient & 1) | select(remainder != 0, 1u32, 0u32);
            kept += guard & (below | (kept & 1));
            let mut biased = 253 - exponent;
            if kept == 0x0100_0000 {
                kept >>= 1;
                biased += 1;
            }
            result = f32::reinterpret(sign | (biased << 23) | (kept & 0x007F_FFFF));
        }
    }
    result
}
