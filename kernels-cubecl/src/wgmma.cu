// C = A · B for bf16 A [M, K] with rows contiguous along K and B [K, N] laid out either way,
// accumulated in f32, written as bf16 C [M, N]: Hopper's warpgroup MMA (`wgmma`) fed by its
// tensor memory accelerator (TMA), neither of which cubek emits.
//
// The host prepends N_DIM and K_DIM (multiples of BN and of BK; M a multiple of BM), B_MN_MAJOR
// (1 when B's rows are contiguous along N, as a linear layer's weight is for its input gradient;
// 0 when B is the transpose of a K-contiguous [N, K], as the weight is for the forward), the
// tile's width BN (128 or 256), the ring's STAGES, its size DYNAMIC_SHARED_MEMORY_BYTES (the
// launch reserves it: see third_party/cubecl-cuda) and the accumulator's BN / 2 asm operands
// (ACC_REGS, ACC_OPERANDS) with the indices of the operands after them (DESCRIPTORS, SCALE).
//
// With LOW_RANK (8 or 16; 0 for none) the kernel is a LoRA layer's: it also computes the thin
// product H = A · Dᵀ for a K-major D [LOW_RANK, K] (a third tensor map, one more box a stage,
// an m64nLOW_RANKk16 MMA beside each of the tile's), rounds H to bf16, writes it (the blocks of
// the first column of tiles) and adds H · U for a contiguous U [LOW_RANK, N] to the accumulator
// before its one rounding. A block sees the whole depth of its rows of A, so every block has
// its rows of H without waiting on another; the thin MMA repeats per column of tiles. Its FLOPs
// are LOW_RANK / BN of the tile's, but it costs the kernel 13 to 15% of its time on an H200
// (a narrow MMA takes the tensor cores far longer than its share: BENCHMARKS.md). LOW_RANK_REGS, LOW_RANK_OPERANDS, LOW_RANK_DESCRIPTORS
// and LOW_RANK_SCALE are its MMA's operands, as the tile's are; WAIT_OPERANDS names both
// accumulators.
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
#define D_STAGE_BYTES (LOW_RANK * BK * 2)
#define STAGE_BYTES (A_STAGE_BYTES + B_STAGE_BYTES + D_STAGE_BYTES)
#define STRING_(x) #x
#define STRING(x) STRING_(x)

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

// CUDA's `CUtensorMap`: opaque, 128 bytes aligned to 64.
struct __align__(64) TensorMap {
    u64 opaque[16];
};

static __device__ __forceinline__ u32 shared_address(const void *pointer) {
    u32 address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
        : "=r"(address)
        : "l"(pointer));
    return address;
}

// K-major operands: rows of BK = 64 elements (128 bytes), groups of eight rows 1024 bytes apart,
// the 128-byte swizzle; 16 deeper is 32 bytes further along the rows (2 in the address field).
static __device__ __forceinline__ u64 k_major_descriptor(u32 address) {
    return (u64)((address & 0x3FFFF) >> 4)
           | ((u64)1 << 16)             // leading byte offset: unused when swizzled
           | ((u64)(1024 >> 4) << 32)   // stride byte offset: eight rows to a group
           | ((u64)1 << 62);            // 128-byte swizzle
}
#define K_MAJOR_DEPTH_STEP 2

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

#if LOW_RANK
// The thin product's MMA: D is K-major like a forward B.
static __device__ __forceinline__ void mma_low_rank(float *thin, u64 a, u64 d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " LOW_RANK_SCALE ", 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n" STRING(LOW_RANK) "k16.f32.bf16.bf16 "
                 LOW_RANK_REGS ", " LOW_RANK_DESCRIPTORS ", p, 1, 1, 0, 0;\n}\n"
                 : LOW_RANK_OPERANDS
                 : "l"(a), "l"(d), "r"(1));
}
#endif

// Waits until at most `pending` of this warpgroup's MMA groups are in flight; the accumulators
// are operands so no read of them moves above.
#define MMA_WAIT(pending) \
    asm volatile("wgmma.wait_group.sync.aligned " STRING(pending) ";\n" : WAIT_OPERANDS : : "memory")

// Two f32 as bf16, `low` in the low half: the first of the pair in memory.
static __device__ __forceinline__ u32 pack(float low, float high) {
    u32 packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
    return packed;
}

#if LOW_RANK
// The two bf16 of a pair as f32: the first in memory (the low half), then the second.
static __device__ __forceinline__ float unpack_low(u32 pair) {
    return __uint_as_float(pair << 16);
}
static __device__ __forceinline__ float unpack_high(u32 pair) {
    return __uint_as_float(pair & 0xFFFF0000u);
}
#endif

static __device__ __forceinline__ void barrier_init(u32 barrier, u32 arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(arrivals));
}

// One arrival, releasing this thread's earlier reads and writes to whoever waits for the phase.
static __device__ __forceinline__ void barrier_arrive(u32 barrier) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(barrier)
                 : "memory");
}

// The producer's arrival on a full barrier, which completes once `bytes` more have landed.
static __device__ __forceinline__ void barrier_expect(u32 barrier, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(barrier),
                 "r"(bytes)
                 : "memory");
}

// Until the barrier's phase of this parity has completed.
static __device__ __forceinline__ void barrier_wait(u32 barrier, u32 parity) {
    asm volatile("{\n.reg .pred done;\nwait:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra wait;\n}\n" ::"r"(barrier),
                 "r"(parity)
                 : "memory");
}

// The box of `map` at (inner, outer) into shared memory at `to`, counted on `barrier`.
static __device__ __forceinline__ void load_box(u32 to, const TensorMap *map, int inner, int outer,
                                                u32 barrier) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(to),
                 "l"((u64)map), "r"(inner), "r"(outer), "r"(barrier)
                 : "memory");
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    wgmma_bf16_tn(const __grid_constant__ TensorMap a_map, const __grid_constant__ TensorMap b_map,
#if LOW_RANK
                  const __grid_constant__ TensorMap d_map, const u32 *__restrict__ u,
                  u32 *__restrict__ h,
#endif
                  bf16 *__restrict__ c) {
    // The launch reserves 1 KiB more than the ring: its start rounded up to the 1024 bytes the
    // 128-byte swizzle's pattern repeats over.
    extern __shared__ unsigned char ring[];
    const int thread = threadIdx.x;
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int steps = K_DIM / BK;
    const u32 base = (shared_address(ring) + 1023) & ~1023u;

    // full[s]: stage s holds the next boxes (the producer's arrival and the copies' bytes);
    // empty[s]: both consumer warpgroups are done with it (their threads arrive).
    __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
    const u32 full_barriers = shared_address(full);
    const u32 empty_barriers = shared_address(empty);
    if (thread == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; s++) {
            barrier_init(full_barriers + 8 * s, 1);
            barrier_init(empty_barriers + 8 * s, CONSUMER_THREADS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (thread >= CONSUMER_THREADS) {
        if (thread == CONSUMER_THREADS) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)&a_map) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)&b_map) : "memory");
#if LOW_RANK
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)&d_map) : "memory");
#endif
            for (int step = 0; step < steps; step++) {
                const int s = step % STAGES;
                if (step >= STAGES) {
                    barrier_wait(empty_barriers + 8 * s, (step / STAGES - 1) & 1);
                }
                const u32 full_barrier = full_barriers + 8 * s;
                const u32 stage = base + s * STAGE_BYTES;
                const int k0 = step * BK;
                barrier_expect(full_barrier, STAGE_BYTES);
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
#if LOW_RANK
                load_box(stage + A_STAGE_BYTES + B_STAGE_BYTES, &d_map, k0, 0, full_barrier);
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
#if LOW_RANK
    float thin[LOW_RANK / 2];
#pragma unroll
    for (int i = 0; i < LOW_RANK / 2; i++) {
        thin[i] = 0.0f;
    }
#endif
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
#if LOW_RANK
        const u64 d_stage = k_major_descriptor(stage + A_STAGE_BYTES + B_STAGE_BYTES);
#pragma unroll
        for (int k = 0; k < BK / 16; k++) {
            mma_low_rank(thin, a_stage + K_MAJOR_DEPTH_STEP * k, d_stage + K_MAJOR_DEPTH_STEP * k);
        }
#endif
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
    // H's rows in bf16, as stored: this thread holds per 8 columns of H the pair at 8 j + 2 (lane
    // % 4) of its two rows; the quad's four lanes hold the rest, gathered by shuffles.
    u32 pairs[2][LOW_RANK / 8];
#pragma unroll
    for (int j = 0; j < LOW_RANK / 8; j++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            pairs[half][j] = pack(thin[4 * j + 2 * half], thin[4 * j + 2 * half + 1]);
            if (blockIdx.y == 0) {
                h[((u64)(row + 8 * half) * LOW_RANK + 8 * j + 2 * (lane % 4)) / 2] = pairs[half][j];
            }
        }
    }
    float hidden[2][LOW_RANK];
#pragma unroll
    for (int quad_lane = 0; quad_lane < 4; quad_lane++) {
#pragma unroll
        for (int j = 0; j < LOW_RANK / 8; j++) {
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const u32 pair = __shfl_sync(0xFFFFFFFFu, pairs[half][j], (lane & ~3) | quad_lane);
                hidden[half][8 * j + 2 * quad_lane] = unpack_low(pair);
                hidden[half][8 * j + 2 * quad_lane + 1] = unpack_high(pair);
            }
        }
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
            u32 *out = (u32 *)(c + (u64)(row + 8 * half) * N_DIM + column + 8 * j);
            *out = pack(d[4 * j + 2 * half], d[4 * j + 2 * half + 1]);
        }
    }
}
