// C = A · B for bf16 A [M, K] with rows contiguous along K and B [K, N] laid out either way,
// accumulated in f32, written as bf16 C [M, N]: Hopper's warpgroup MMA (`wgmma`) fed by its
// tensor memory accelerator (TMA), neither of which cubek emits.
//
// The host prepends N_DIM and K_DIM (multiples of BN and of BK; M a multiple of BM), B_MN_MAJOR
// (1 when B's rows are contiguous along N, as a linear layer's weight is for its input gradient;
// 0 when B is the transpose of a K-contiguous [N, K], as the weight is for the forward), the
// tile's width BN (64, 128 or 256), the first column COL_OFFSET of the launch's tiles (a product
// may take its last columns in narrower tiles, a second launch), the ring's STAGES, its size
// DYNAMIC_SHARED_MEMORY_BYTES (the launch reserves it: see third_party/cubecl-cuda) and the
// accumulator's BN / 2 asm operands (ACC_REGS, ACC_OPERANDS) with the indices of the operands
// after them (DESCRIPTORS, SCALE).
//
// With LOW_RANK (8 or 16; 0 for none) the kernel is a LoRA layer's: it adds H · U to the
// accumulator before its one rounding, for the bf16 hidden H [M, LOW_RANK] (`thin_product.cu`,
// launched before it) and a contiguous U [LOW_RANK, N]. Each thread reads its two rows of H
// (16 or 32 bytes each) and, per pair of its columns, U's LOW_RANK pairs (a few KiB a block, from
// L1). An earlier version computed H on the tile's own operands with an m64nLOW_RANKk16 MMA
// beside each of the tile's: it cost the kernel 13 to 15% (a narrow MMA takes the tensor cores
// far longer than its FLOP share, and every column of tiles repeated it), where the separate
// kernel streams A once (BENCHMARKS.md).
//
// With ACCUMULATE the kernel adds a prior sum (a gradient already summed for the same tensor: a
// block's q, k and v input gradients) to the accumulator before its one rounding: C's own values
// (1, in place, each thread reading the pairs it then writes) or P's (2, where the prior is held
// elsewhere too). Both give the same numbers, so whether the prior could be taken in place (its
// other holders, which depend on timing) never changes a result.
//
// The launch passes A's and B's tensor maps by value: boxes of 64 elements along each matrix's
// contiguous dimension (128 bytes) with the 128-byte swizzle, BM or BN rows of A or K-major B,
// 64 rows of N-major B.
//
// Each block computes a BM x BN tile: two consumer warpgroups (threads 0 to 255), warpgroup w the
// rows [64 w, 64 w + 64), through m64nBNk16 instructions that read both operands from shared
// memory, and one producer warp whose first thread keeps a STAGES-deep ring of BK-deep stages
// filled. It issues a stage's boxes once both consumer warpgroups marked the stage empty on its
// `mbarrier`; the copies complete the stage's full barrier themselves (its transaction count).
// The TMA writes the layout the `wgmma` descriptors name: rows of 128 bytes whose 16-byte chunks
// are permuted by an XOR with the row's place among eight, so that the MMAs' reads do not collide
// on banks. The consumers keep one stage's MMAs in flight while they wait for the next.

#define BM 128
#define BK 64
#define CONSUMER_THREADS 256
#define THREADS (CONSUMER_THREADS + 32)
#define A_STAGE_BYTES (BM * BK * 2)
#define B_STAGE_BYTES (BN * BK * 2)
#define STAGE_BYTES (A_STAGE_BYTES + B_STAGE_BYTES)
#if B_MN_MAJOR
// N-major B: the BN columns as panels of 64 (128-byte rows, one box each), each panel BK rows
// deep; the panels BK rows apart (leading byte offset), groups of eight rows 1024 bytes apart
// (stride byte offset); 16 deeper is two groups further.
#define PANEL_BYTES (BK * 128)
static __device__ __forceinline__ u64 b_descriptor(u32 address) {
    return (u64)((address & 0x3FFFF) >> 4) | ((u64)(PANEL_BYTES >> 4) << 16)
           | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
#define B_DEPTH_STEP (2 * 1024 >> 4)
#define TRANSPOSE_B "1"
#else
#define b_descriptor k_major_descriptor
#define B_DEPTH_STEP K_MAJOR_DEPTH_STEP
#define TRANSPOSE_B "0"
#endif

static __device__ __forceinline__ void mma(float *d, u64 a, u64 b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n" STRING(BN) "k16.f32.bf16.bf16 " ACC_REGS
                 ", " DESCRIPTORS ", p, 1, 1, 0, " TRANSPOSE_B ";\n}\n"
                 : ACC_OPERANDS
                 : "l"(a), "l"(b), "r"(1));
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    wgmma_bf16_tn(const __grid_constant__ TensorMap a_map, const __grid_constant__ TensorMap b_map,
#if LOW_RANK
                  const u32 *__restrict__ h, const u32 *__restrict__ u,
#endif
#if ACCUMULATE == 2
                  const bf16 *__restrict__ p,
#endif
                  bf16 *__restrict__ c) {
    // The launch reserves 1 KiB more than the ring: its start rounded up to the 1024 bytes the
    // 128-byte swizzle's pattern repeats over.
    extern __shared__ unsigned char ring[];
    const int thread = threadIdx.x;
    const int m0 = blockIdx.x * BM;
    const int n0 = COL_OFFSET + blockIdx.y * BN;
    const int steps = K_DIM / BK;
    const u32 base = (shared_address(ring) + 1023) & ~1023u;

    // full[s]: stage s holds the next boxes (the producer's arrival and the copies' bytes);
    // empty[s]: both consumer warpgroups are done with it (their threads arrive).
    __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
    const u32 full_barriers = shared_address(full);
    const u32 empty_barriers = shared_address(empty);
    init_ring(full_barriers, empty_barriers, CONSUMER_THREADS);
    __syncthreads();

    if (thread >= CONSUMER_THREADS) {
        if (thread == CONSUMER_THREADS) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)&a_map) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)&b_map) : "memory");
            for (int step = 0; step < steps; step++) {
                const u32 full_barrier =
                    acquire_stage(step, full_barriers, empty_barriers, STAGE_BYTES);
                const u32 stage = base + (step % STAGES) * STAGE_BYTES;
                const int k0 = step * BK;
                load_box(stage, &a_map, k0, m0, full_barrier);
#if B_MN_MAJOR
#pragma unroll
                for (int panel = 0; panel < BN / 64; panel++) {
                    load_box(stage + A_STAGE_BYTES + panel * PANEL_BYTES, &b_map, n0 + 64 * panel,
                             k0, full_barrier);
                }
#else
                load_box(stage + A_STAGE_BYTES, &b_map, k0, n0, full_barrier);
#endif
            }
        }
        return;
    }

    // This consumer warpgroup's 64 rows within an A stage.
    const u32 warpgroup_rows = (thread / 128) * 64 * 128;
    float d[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; i++) {
        d[i] = 0.0f;
    }
    for (int step = 0; step < steps; step++) {
        const int s = step % STAGES;
        barrier_wait(full_barriers + 8 * s, (step / STAGES) & 1);
        const u32 stage = base + s * STAGE_BYTES;
        const u64 a_stage = k_major_descriptor(stage + warpgroup_rows);
        const u64 b_stage = b_descriptor(stage + A_STAGE_BYTES);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int k = 0; k < BK / 16; k++) {
            mma(d, a_stage + K_MAJOR_DEPTH_STEP * k, b_stage + B_DEPTH_STEP * k);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        // This stage's MMAs stay in flight; the stage before is done with.
        MMA_WAIT(1);
        if (step >= 1) {
            barrier_arrive(empty_barriers + 8 * ((step - 1) % STAGES));
        }
    }
    MMA_WAIT(0);

    // The accumulator's layout: warp w of the warpgroup holds rows 16 w + lane / 4 (+ 8), and
    // per 8 columns j the pair at 8 j + 2 (lane % 4).
    const int lane = thread % 32;
    const int row = m0 + (thread / 128) * 64 + ((thread % 128) / 32) * 16 + lane / 4;
    const int column = n0 + 2 * (lane % 4);
#if LOW_RANK
    // This thread's two rows of H, each LOW_RANK bf16 in 16-byte vectors.
    float hidden[2][LOW_RANK];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        load_hidden(hidden[half], h, row + 8 * half);
    }
#endif
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
#if LOW_RANK
        // H · U on the accumulator: the pair of columns of U's rows (a few KiB a block, in L1).
#pragma unroll
        for (int r = 0; r < LOW_RANK; r++) {
            const u32 weights = u[((u64)r * N_DIM + column + 8 * j) / 2];
#pragma unroll
            for (int half = 0; half < 2; half++) {
                d[4 * j + 2 * half] += hidden[half][r] * unpack_low(weights);
                d[4 * j + 2 * half + 1] += hidden[half][r] * unpack_high(weights);
            }
        }
#endif
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const u64 at = (u64)(row + 8 * half) * N_DIM + column + 8 * j;
            u32 *out = (u32 *)(c + at);
#if ACCUMULATE == 2
            const u32 before = *(const u32 *)(p + at);
#elif ACCUMULATE
            const u32 before = *out;
            d[4 * j + 2 * half] += unpack_low(before);
            d[4 * j + 2 * half + 1] += unpack_high(before);
#endif
            *out = pack(d[4 * j + 2 * half], d[4 * j + 2 * half + 1]);
        }
    }
}
