// A linear layer's product with a 4-bit weight, C = X · Wᵀ (the forward) or, with MN_MAJOR,
// C = X · W (the input gradient, X the output's gradient), + H · U for a LoRA layer, with W
// dequantized inside the product: bitsandbytes' packed codes (two a byte, the first element in
// the high nibble) and one f32 absmax per block of 64 along a row, never a dense W in memory.
//
// Computed transposed, Cᵀ = W · Xᵀ (Wᵀ · Xᵀ), because `wgmma` reads its A operand from registers:
// the consumer warps decode W's codes straight into their A fragments (`code[nibble] * (absmax
// + offset)` rounded to bf16, the dequantization kernel's numbers), one stage ahead, while the
// tensor cores run the previous stage's MMAs; X is the B operand, read from shared memory as
// `wgmma.cu` reads a K-major weight. An earlier attempt decoded W in producer warps into the
// shared-memory operand: their stores bound it at 1.5x the dense product (BENCHMARKS.md).
//
// The host prepends MN_MAJOR (1 where the product's depth runs along W's rows, so C's features
// are W's contiguous columns), N_DIM (C's features: W's rows, or its columns with MN_MAJOR; a
// multiple of BM) and K_DIM (the product's depth, a multiple of BK; the block size
// is 64), the tile's tokens BN (256 or 64: the MMA's N), the launch's first feature
// FEATURE_OFFSET, LOW_RANK (8 or 16, 0 for none), STAGES, the ring's
// DYNAMIC_SHARED_MEMORY_BYTES, the accumulator's BN / 2 asm operands (ACC_REGS, ACC_OPERANDS)
// and the indices of the operands after them (FRAGMENT, DESCRIPTOR, SCALE).
//
// The launch passes X's tensor map (boxes of BN rows by 64 elements, the 128-byte swizzle) and
// the packed weight's (u32 words): for the forward viewed as [N_DIM, K_DIM / 8] in boxes of BM
// rows by 8 words, no swizzle, then the decoded absmax (f32, one a block, without the offset);
// with MN_MAJOR viewed as [K_DIM, N_DIM / 8] in boxes of BK rows by 16 words with the 64-byte
// swizzle, then the decoded absmax's map ([K_DIM, N_DIM / 64] f32, boxes of BK rows by 4). Then
// the 16 code values, for a LoRA layer the hidden H [M, LOW_RANK] and U [LOW_RANK, N_DIM] (bf16,
// as `wgmma.cu` takes them), C, and last the absmax's offset as a scalar parameter.
//
// Each block computes a BM-feature by BN-token tile of Cᵀ: two consumer warpgroups, warpgroup w
// the features [64 w, 64 w + 64), and a producer warpgroup whose first thread fills a
// STAGES-deep ring. A stage holds X's box and the tile's packed weight: for the forward its BM
// rows of 32 bytes, and a thread's fragments are its warp's rows g and g + 8 (g its lane / 4),
// each eight bytes of the row: byte t (its lane % 4) of each of the row's eight words. With
// MN_MAJOR the stage holds BK weight rows of BM features (64 bytes) and their absmax: a
// thread's features are again g and g + 8 of its warp's 16, one nibble of two adjacent words in
// each of the weight rows 2 t, 2 t + 1, 2 t + 8 and 2 t + 9 of every 16; a warpgroup's 64
// features are one quantization block, so each weight row has one scale for the warpgroup.

#define BM 128
#define BK 64
#define STEPS (K_DIM / BK)
#define CONSUMER_THREADS 256
#define THREADS (CONSUMER_THREADS + 128)
#define X_STAGE_BYTES (BN * BK * 2)
#define W_STAGE_BYTES (BM * BK / 2)
#if MN_MAJOR
// The weight rows' absmax: four blocks (16 bytes, the least a box row may be) of each row, from
// the tile's first block rounded down to a multiple of four: a box's innermost start must be 16
// bytes aligned in global memory (an odd tile's two blocks, from 2, faulted as an illegal
// instruction).
#define SCALE_STAGE_BYTES (BK * 16)
#define ABSMAX_BOX_BLOCK ((n0 / 64) & ~3)
#else
#define SCALE_STAGE_BYTES 0
#endif
#define STAGE_BYTES (X_STAGE_BYTES + W_STAGE_BYTES + SCALE_STAGE_BYTES)

// One k16 MMA: A the thread's four fragment registers, B (X) from shared memory, K-major.
static __device__ __forceinline__ void mma(float *d, const u32 *a, u64 b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n" STRING(BN) "k16.f32.bf16.bf16 " ACC_REGS
                 ", " FRAGMENT ", " DESCRIPTOR ", p, 1, 1, 0;\n}\n"
                 : ACC_OPERANDS
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// Keeps the compiler from moving the fragments' writes above the MMAs that read them.
static __device__ __forceinline__ void fence_fragments(u32 (&fragments)[16]) {
#pragma unroll
    for (int i = 0; i < 16; i++) {
        asm volatile("" : "+r"(fragments[i])::"memory");
    }
}

#if !MN_MAJOR
// The byte in the low eight bits of `pair`, decoded: the high nibble's value first (the low
// half), both `code[nibble] * scale` in f32 and rounded once to bf16.
static __device__ __forceinline__ u32 decode_pair(u32 pair, float scale, const float *codebook) {
    return pack(__fmul_rn(codebook[(pair >> 4) & 15], scale),
                __fmul_rn(codebook[pair & 15], scale));
}

// A thread's fragments for one stage's four k16 steps from the stage's packed rows `rows` (u32
// words, eight a row): register 4 k + i holds, for i = 0 to 3, row g's then row g + 8's
// elements 16 k + 2 t and + 1, then the same rows' elements 16 k + 2 t + 8 and + 9.
static __device__ __forceinline__ void decode_stage(u32 (&fragments)[16], const u32 *rows, int row,
                                                    int quad, float scale, float scale_below,
                                                    const float *codebook) {
    const uint4 *first = (const uint4 *)(rows + row * 8);
    const uint4 *second = (const uint4 *)(rows + (row + 8) * 8);
    const uint4 first_low = first[0], first_high = first[1];
    const uint4 second_low = second[0], second_high = second[1];
    const u32 above[8] = {first_low.x,  first_low.y,  first_low.z,  first_low.w,
                          first_high.x, first_high.y, first_high.z, first_high.w};
    const u32 below[8] = {second_low.x,  second_low.y,  second_low.z,  second_low.w,
                          second_high.x, second_high.y, second_high.z, second_high.w};
    const int shift = 8 * quad;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        fragments[4 * k] = decode_pair(above[2 * k] >> shift, scale, codebook);
        fragments[4 * k + 1] = decode_pair(below[2 * k] >> shift, scale_below, codebook);
        fragments[4 * k + 2] = decode_pair(above[2 * k + 1] >> shift, scale, codebook);
        fragments[4 * k + 3] = decode_pair(below[2 * k + 1] >> shift, scale_below, codebook);
    }
}
#else
// Eight bytes of the stage's packed weight row `k` (64 bytes, the 64-byte swizzle: its 16-byte
// chunk c lies at chunk c ^ ((k >> 1) & 3)) from byte `column`, a multiple of 8.
static __device__ __forceinline__ uint2 packed_pair(const unsigned char *rows, int k, int column) {
    const int chunk = (column >> 4) ^ ((k >> 1) & 3);
    return *(const uint2 *)(rows + k * 64 + chunk * 16 + (column & 15));
}

// A thread's fragments for one stage's four k16 steps of Wᵀ: register 4 k + 2 h + i holds, for
// h and i 0 or 1, feature g's (i = 0) or g + 8's (i = 1) elements of weight rows 16 k + 8 h + 2 t
// and + 1, each `code[nibble] * (its row's absmax + offset)`. `column` is the byte of the words
// of the warp's 16 features, `shift` the thread's nibble in them, `scales` the stage's absmax
// (four a weight row, the thread's warpgroup's first).
static __device__ __forceinline__ void decode_stage(u32 (&fragments)[16],
                                                    const unsigned char *rows,
                                                    const float *scales, int column, int shift,
                                                    int quad, float offset,
                                                    const float *codebook) {
#pragma unroll
    for (int k = 0; k < 4; k++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int first_row = 16 * k + 8 * h + 2 * quad;
            const uint2 first = packed_pair(rows, first_row, column);
            const uint2 second = packed_pair(rows, first_row + 1, column);
            const float first_scale = __fadd_rn(scales[4 * first_row], offset);
            const float second_scale = __fadd_rn(scales[4 * first_row + 4], offset);
            fragments[4 * k + 2 * h] =
                pack(__fmul_rn(codebook[(first.x >> shift) & 15], first_scale),
                     __fmul_rn(codebook[(second.x >> shift) & 15], second_scale));
            fragments[4 * k + 2 * h + 1] =
                pack(__fmul_rn(codebook[(first.y >> shift) & 15], first_scale),
                     __fmul_rn(codebook[(second.y >> shift) & 15], second_scale));
        }
    }
}
#endif

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    wgmma_4bit_tn(const __grid_constant__ TensorMap x_map, const __grid_constant__ TensorMap w_map,
#if MN_MAJOR
                  const __grid_constant__ TensorMap absmax_map,
#else
                  const float *__restrict__ absmax,
#endif
                  const float *__restrict__ code,
#if LOW_RANK
                  const u32 *__restrict__ h, const bf16 *__restrict__ u,
#endif
                  bf16 *__restrict__ c, const float offset) {
    // The launch reserves 1 KiB more than the ring: its start rounded up to the 1024 bytes the
    // 128-byte swizzle's pattern repeats over.
    extern __shared__ unsigned char ring[];
    __shared__ float codebook[16];
    const int thread = threadIdx.x;
    const int m0 = blockIdx.x * BN;
    const int n0 = FEATURE_OFFSET + blockIdx.y * BM;
    const u32 base = (shared_address(ring) + 1023) & ~1023u;
    const unsigned char *aligned_ring = ring + (base - shared_address(ring));

    // full[s]: stage s holds the next boxes (the producer's arrival and the copies' bytes);
    // empty[s]: both consumer warpgroups are done with it (their threads arrive).
    __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
    const u32 full_barriers = shared_address(full);
    const u32 empty_barriers = shared_address(empty);
    if (thread < 16) {
        codebook[thread] = code[thread];
    }
    init_ring(full_barriers, empty_barriers, CONSUMER_THREADS);
    __syncthreads();

    if (thread >= CONSUMER_THREADS) {
        // The producer warpgroup gives its registers to the consumers: the accumulator and two
        // stages' fragments need more than an even share of the file.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (thread == CONSUMER_THREADS) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)&x_map) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)&w_map) : "memory");
#if MN_MAJOR
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)&absmax_map) : "memory");
#endif
            for (int step = 0; step < STEPS; step++) {
                const u32 full_barrier =
                    acquire_stage(step, full_barriers, empty_barriers, STAGE_BYTES);
                const u32 stage = base + (step % STAGES) * STAGE_BYTES;
                load_box(stage, &x_map, step * BK, m0, full_barrier);
#if MN_MAJOR
                load_box(stage + X_STAGE_BYTES, &w_map, n0 / 8, step * BK, full_barrier);
                load_box(stage + X_STAGE_BYTES + W_STAGE_BYTES, &absmax_map, ABSMAX_BOX_BLOCK,
                         step * BK, full_barrier);
#else
                load_box(stage + X_STAGE_BYTES, &w_map, step * BK / 8, n0, full_barrier);
#endif
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

    const int lane = thread % 32;
    const int quad = lane % 4;
    const int group = lane / 4;
    // The thread's first weight row within the tile (the second is 8 below): its warpgroup's
    // 64, its warp's 16.
    const int row = (thread / 128) * 64 + ((thread % 128) / 32) * 16 + group;
    float d[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; i++) {
        d[i] = 0.0f;
    }
#if MN_MAJOR
    // The byte of the warp's 16 features' words in a weight row, and the thread's nibble in them
    // (byte g / 2 of each word, the first element of a byte in its high nibble).
    const int column = (row - group) / 2;
    const int shift = 8 * (group / 2) + (group % 2 == 0 ? 4 : 0);
    const int warpgroup = thread / 128;
    // Step `step`'s fragments, once its stage has landed.
    auto decode = [&](u32(&fragments)[16], int step) {
        const int s = step % STAGES;
        barrier_wait(full_barriers + 8 * s, (step / STAGES) & 1);
        const unsigned char *stage = aligned_ring + s * STAGE_BYTES + X_STAGE_BYTES;
        decode_stage(fragments, stage,
                     (const float *)(stage + W_STAGE_BYTES) + n0 / 64 - ABSMAX_BOX_BLOCK + warpgroup,
                     column, shift, quad, offset, codebook);
    };
#else
    const float *row_absmax = absmax + (u64)(n0 + row) * STEPS;
    const float *below_absmax = row_absmax + 8 * STEPS;
    // The absmax of the next stage to decode, loaded a stage early.
    float next_absmax = row_absmax[0];
    float next_below_absmax = below_absmax[0];
    // Step `step`'s fragments, once its stage has landed; step + 1's absmax loads meanwhile.
    auto decode = [&](u32(&fragments)[16], int step) {
        const float scale = __fadd_rn(next_absmax, offset);
        const float scale_below = __fadd_rn(next_below_absmax, offset);
        if (step + 1 < STEPS) {
            next_absmax = row_absmax[step + 1];
            next_below_absmax = below_absmax[step + 1];
        }
        const int s = step % STAGES;
        barrier_wait(full_barriers + 8 * s, (step / STAGES) & 1);
        decode_stage(fragments, (const u32 *)(aligned_ring + s * STAGE_BYTES + X_STAGE_BYTES),
                     row, quad, scale, scale_below, codebook);
    };
#endif
    u32 even_fragments[16], odd_fragments[16];
    decode(even_fragments, 0);

    // Step `step`'s MMAs on `current`; while they run, step + 1's fragments into `next`.
    auto consume = [&](int step, u32(&current)[16], u32(&next)[16]) {
        const u32 stage = base + (step % STAGES) * STAGE_BYTES;
        const u64 x_stage = k_major_descriptor(stage);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int k = 0; k < BK / 16; k++) {
            mma(d, current + 4 * k, x_stage + K_MAJOR_DEPTH_STEP * k);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        // The previous step's MMAs are done: their stage is free, their fragments (`next`) too.
        MMA_WAIT(1);
        fence_fragments(next);
        if (step >= 1) {
            barrier_arrive(empty_barriers + 8 * ((step - 1) % STAGES));
        }
        if (step + 1 < STEPS) {
            decode(next, step + 1);
        }
    };
    for (int step = 0; step < STEPS; step += 2) {
        consume(step, even_fragments, odd_fragments);
        if (step + 1 < STEPS) {
            consume(step + 1, odd_fragments, even_fragments);
        }
    }
    MMA_WAIT(0);

    // The accumulator: this thread's features n0 + row (+ 8) and, per 8 tokens j, the pair at
    // m0 + 8 j + 2 quad. C is [tokens, features]: lanes four apart (features row and row + 1)
    // swap one value each, so that each stores two adjacent features of one token.
    const int feature = n0 + row;
    const int token = m0 + 2 * quad;
    const bool even_row = group % 2 == 0;
#if LOW_RANK
    // U's columns `feature` and `feature + 8`.
    float up[2][LOW_RANK];
#pragma unroll
    for (int half = 0; half < 2; half++) {
#pragma unroll
        for (int r = 0; r < LOW_RANK; r++) {
            up[half][r] = __uint_as_float((u32)u[(u64)r * N_DIM + feature + 8 * half] << 16);
        }
    }
#endif
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
#if LOW_RANK
        // H · U on the accumulator, H's two rows (tokens) in 16-byte vectors, summed over the
        // rank in `wgmma.cu`'s order.
#pragma unroll
        for (int pair = 0; pair < 2; pair++) {
            float hidden[LOW_RANK];
            load_hidden(hidden, h, token + 8 * j + pair);
#pragma unroll
            for (int r = 0; r < LOW_RANK; r++) {
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    d[4 * j + 2 * half + pair] += hidden[r] * up[half][r];
                }
            }
        }
#endif
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const float first = d[4 * j + 2 * half], second = d[4 * j + 2 * half + 1];
            const float kept = even_row ? first : second;
            const float given = __shfl_xor_sync(0xFFFFFFFFu, even_row ? second : first, 4);
            const int out_token = token + 8 * j + (even_row ? 0 : 1);
            const int out_feature = feature + 8 * half - (even_row ? 0 : 1);
            *(u32 *)(c + (u64)out_token * N_DIM + out_feature) =
                even_row ? pack(kept, given) : pack(given, kept);
        }
    }
}
