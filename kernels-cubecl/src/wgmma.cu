// C = A · B for bf16 A [M, K] with rows contiguous along K and B [K, N] laid out either way,
// accumulated in f32, written as bf16 C [M, N]: Hopper's warpgroup MMA (`wgmma`), which cubek
// does not emit.
//
// The host prepends N_DIM and K_DIM (multiples of BN and of a stage's depth; M a multiple of BM),
// B_MN_MAJOR (1 when B's rows are contiguous along N, as a linear layer's weight is for its input
// gradient; 0 when B is the transpose of a K-contiguous [N, K], as the weight is for the
// forward), the tile's width BN (128 or 256), the ring's STAGES of SUBSLICES BK-deep slices each,
// WARP_SPECIALIZED (the main loop below), the ring's size DYNAMIC_SHARED_MEMORY_BYTES (the launch
// reserves it: see third_party/cubecl-cuda) and the accumulator's BN / 2 asm operands (ACC_REGS,
// ACC_OPERANDS) with the indices of the operands after them (DESCRIPTORS, SCALE).
//
// Each block computes a BM x BN tile: two consumer warpgroups (threads 0 to 255), warpgroup w the
// rows [64 w, 64 w + 64), through m64nBNk16 instructions that read both operands from shared
// memory. Stages of A and B stream into a STAGES-deep ring with `cp.async`, each BK-deep slice in
// a layout wgmma's descriptors name, swizzled so that neither the copies nor the MMA reads collide
// on banks (the 16-byte chunks of each row permuted by an XOR with the row's place among its
// neighbours). The consumers keep one stage's MMAs in flight while the next is issued. Two main
// loops, each the faster for one layout on an H100 (BENCHMARKS.md):
// - WARP_SPECIALIZED 1 (B K-major): two more warps produce. They fill a stage once both
//   consumers marked it empty on its `mbarrier`, and mark it full once their copies landed; no
//   block-wide barrier, and the copies run as far ahead as the ring allows.
// - WARP_SPECIALIZED 0 (B N-major): the consumers copy too, STAGES - 2 stages ahead, with one
//   block barrier a stage.
// A 128 x 256 tile loads 48 KiB per 2^21 multiply-adds, half of what 128 x 128 tiles ask of L2
// per FLOP.

#define BM 128
#define BK 32
#define CONSUMER_THREADS 256
#if WARP_SPECIALIZED
#define COPY_THREADS 64
#define THREADS (CONSUMER_THREADS + COPY_THREADS)
#else
#define COPY_THREADS CONSUMER_THREADS
#define THREADS CONSUMER_THREADS
#endif
// Stages the producer keeps in flight before it announces the oldest.
#define PRODUCER_LAG 2
#define A_SLICE_BYTES (BM * BK * 2)
#define B_SLICE_BYTES (BN * BK * 2)
#define SLICE_BYTES (A_SLICE_BYTES + B_SLICE_BYTES)
#define STAGE_BYTES (SUBSLICES * SLICE_BYTES)
#define ROW_BYTES (BK * 2)
#define STRING_(x) #x
#define STRING(x) STRING_(x)

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

static __device__ __forceinline__ u32 shared_address(const void *pointer) {
    u32 address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
        : "=r"(address)
        : "l"(pointer));
    return address;
}

// K-major slices: rows of BK = 32 elements (64 bytes), with the 64-byte swizzle (chunk c of row r
// at chunk c ^ ((r / 2) % 4)); groups of eight rows 512 bytes apart.
static __device__ __forceinline__ u64 k_major_descriptor(u32 address) {
    return (u64)((address & 0x3FFFF) >> 4)
           | ((u64)1 << 16)                      // leading byte offset: unused when swizzled
           | ((u64)((8 * ROW_BYTES) >> 4) << 32) // stride byte offset: eight rows to a group
           | ((u64)2 << 62);                     // 64-byte swizzle
}

// Rows [row0, row0 + ROWS) x columns [k0, k0 + BK) of a K-contiguous matrix into a K-major slice.
template <int ROWS>
static __device__ __forceinline__ void copy_k_major(u32 slice, const bf16 *matrix, int row0, int k0,
                                                    int thread) {
#pragma unroll
    for (int i = 0; i < ROWS * BK / 8 / COPY_THREADS; i++) {
        int chunk = thread + i * COPY_THREADS;
        int row = chunk / (BK / 8);
        int column = chunk % (BK / 8);
        u32 to = slice + row * ROW_BYTES + ((column ^ ((row >> 1) & 3)) << 4);
        const bf16 *from = matrix + (u64)(row0 + row) * K_DIM + k0 + column * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(from));
    }
}

#if B_MN_MAJOR
// N-major slices: the BN columns as panels of 64 (128 bytes), each panel BK rows of 128 bytes
// with the 128-byte swizzle (chunk c of row k at chunk c ^ (k % 8)); the panels BK rows apart
// (leading byte offset), groups of eight rows 1024 bytes apart (stride byte offset).
#define PANEL_BYTES (BK * 128)
static __device__ __forceinline__ u64 b_descriptor(u32 address) {
    return (u64)((address & 0x3FFFF) >> 4) | ((u64)(PANEL_BYTES >> 4) << 16)
           | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
// 16 rows deeper: two groups of eight rows.
#define B_DEPTH_STEP (2 * 1024 >> 4)
#define TRANSPOSE_B "1"

// Rows [k0, k0 + BK) x columns [n0, n0 + BN) of an N-contiguous [K, N] matrix.
static __device__ __forceinline__ void copy_b(u32 slice, const bf16 *matrix, int n0, int k0,
                                              int thread) {
#pragma unroll
    for (int i = 0; i < BK * BN / 8 / COPY_THREADS; i++) {
        int chunk = thread + i * COPY_THREADS;
        int row = chunk / (BN / 8);
        int column = chunk % (BN / 8);
        int panel = column / 8;
        u32 to = slice + panel * PANEL_BYTES + row * 128 + (((column % 8) ^ (row & 7)) << 4);
        const bf16 *from = matrix + (u64)(k0 + row) * N_DIM + n0 + column * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(from));
    }
}
#else
#define b_descriptor k_major_descriptor
// 16 deeper is 32 bytes further along the rows.
#define B_DEPTH_STEP 2
#define TRANSPOSE_B "0"
#define copy_b copy_k_major<BN>
#endif

static __device__ __forceinline__ void copy_stage(u32 stage, const bf16 *a, const bf16 *b, int m0,
                                                  int n0, int k0, int thread) {
#pragma unroll
    for (int j = 0; j < SUBSLICES; j++) {
        copy_k_major<BM>(stage + j * SLICE_BYTES, a, m0, k0 + j * BK, thread);
        copy_b(stage + j * SLICE_BYTES + A_SLICE_BYTES, b, n0, k0 + j * BK, thread);
    }
}

static __device__ __forceinline__ void mma(float *d, u64 a, u64 b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n" STRING(BN) "k16.f32.bf16.bf16 " ACC_REGS
                 ", " DESCRIPTORS ", p, 1, 1, 0, " TRANSPOSE_B ";\n}\n"
                 : ACC_OPERANDS
                 : "l"(a), "l"(b), "r"(1));
}

// Waits until at most `pending` of this warpgroup's MMA groups are in flight; the accumulator is
// an operand so no read of it moves above.
#define MMA_WAIT(pending) \
    asm volatile("wgmma.wait_group.sync.aligned " STRING(pending) ";\n" : ACC_OPERANDS : : "memory")

// Two f32 as bf16, `low` in the low half: the first of the pair in memory.
static __device__ __forceinline__ u32 pack(float low, float high) {
    u32 packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
    return packed;
}

static __device__ __forceinline__ void barrier_init(u32 barrier, u32 arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(arrivals));
}

// One arrival, releasing this thread's earlier writes to whoever waits for the phase.
static __device__ __forceinline__ void barrier_arrive(u32 barrier) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(barrier)
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

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    wgmma_bf16_tn(const bf16 *__restrict__ a, const bf16 *__restrict__ b, bf16 *__restrict__ c) {
    // The launch reserves 1 KiB more than the ring: its start rounded up to the 1024 bytes the
    // 128-byte swizzle's pattern repeats over.
    extern __shared__ unsigned char ring[];
    const int thread = threadIdx.x;
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    // The depth loop's steps, one stage each.
    const int steps = K_DIM / (BK * SUBSLICES);
    const u32 base = (shared_address(ring) + 1023) & ~1023u;
    // This consumer warpgroup's 64 rows within an A slice.
    const u32 warpgroup_rows = (thread / 128) * 64 * ROW_BYTES;
    float d[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; i++) {
        d[i] = 0.0f;
    }

#if WARP_SPECIALIZED
    // full[s]: stage s holds the next slices (the producers arrive); empty[s]: both consumer
    // warpgroups are done with it (their threads arrive).
    __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
    const u32 full_barriers = shared_address(full);
    const u32 empty_barriers = shared_address(empty);
    if (thread == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; s++) {
            barrier_init(full_barriers + 8 * s, COPY_THREADS);
            barrier_init(empty_barriers + 8 * s, CONSUMER_THREADS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (thread >= CONSUMER_THREADS) {
        const int producer = thread - CONSUMER_THREADS;
        for (int step = 0; step < steps; step++) {
            const int s = step % STAGES;
            if (step >= STAGES) {
                barrier_wait(empty_barriers + 8 * s, (step / STAGES - 1) & 1);
            }
            copy_stage(base + s * STAGE_BYTES, a, b, m0, n0, step * BK * SUBSLICES, producer);
            asm volatile("cp.async.commit_group;\n" ::);
            // The stage PRODUCER_LAG back has landed: this thread's copies of it made visible to
            // the MMAs' async proxy, then announced.
            if (step >= PRODUCER_LAG) {
                asm volatile("cp.async.wait_group %0;\n" ::"n"(PRODUCER_LAG));
                asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
                barrier_arrive(full_barriers + 8 * ((step - PRODUCER_LAG) % STAGES));
            }
        }
        asm volatile("cp.async.wait_group 0;\n" ::);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        for (int step = steps > PRODUCER_LAG ? steps - PRODUCER_LAG : 0; step < steps; step++) {
            barrier_arrive(full_barriers + 8 * (step % STAGES));
        }
        return;
    }
#else
    // The copies run STAGES - 2 stages ahead: the stage they overwrite is the one whose MMAs the
    // consumers waited for at the end of the step before.
#pragma unroll
    for (int s = 0; s < STAGES - 2; s++) {
        if (s < steps) {
            copy_stage(base + s * STAGE_BYTES, a, b, m0, n0, s * BK * SUBSLICES, thread);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    }
#endif

    for (int step = 0; step < steps; step++) {
        const int s = step % STAGES;
#if WARP_SPECIALIZED
        barrier_wait(full_barriers + 8 * s, (step / STAGES) & 1);
#else
        // This stage's copies landed, everyone's (the barrier), and every warpgroup has finished
        // the MMAs of the stage the next copy overwrites.
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 3));
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const int next = step + STAGES - 2;
        if (next < steps) {
            copy_stage(base + (next % STAGES) * STAGE_BYTES, a, b, m0, n0, next * BK * SUBSLICES,
                       thread);
        }
        asm volatile("cp.async.commit_group;\n" ::);
#endif
        const u32 stage = base + s * STAGE_BYTES;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int j = 0; j < SUBSLICES; j++) {
            const u64 a_slice = k_major_descriptor(stage + j * SLICE_BYTES + warpgroup_rows);
            const u64 b_slice = b_descriptor(stage + j * SLICE_BYTES + A_SLICE_BYTES);
#pragma unroll
            for (int k = 0; k < BK / 16; k++) {
                // 16 deeper is 32 bytes further along A's rows: 2 in the descriptor's address.
                mma(d, a_slice + 2 * k, b_slice + B_DEPTH_STEP * k);
            }
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        // This stage's MMAs stay in flight; the stage before is done with.
        MMA_WAIT(1);
#if WARP_SPECIALIZED
        if (step >= 1) {
            barrier_arrive(empty_barriers + 8 * ((step - 1) % STAGES));
        }
#endif
    }
    MMA_WAIT(0);

    // The accumulator's layout: warp w of the warpgroup holds rows 16 w + lane / 4 (+ 8), and
    // per 8 columns j the pair at 8 j + 2 (lane % 4).
    const int lane = thread % 32;
    const int row = m0 + (thread / 128) * 64 + ((thread % 128) / 32) * 16 + lane / 4;
    const int column = n0 + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            u32 *out = (u32 *)(c + (u64)(row + 8 * half) * N_DIM + column + 8 * j);
            *out = pack(d[4 * j + 2 * half], d[4 * j + 2 * half + 1]);
        }
    }
}
