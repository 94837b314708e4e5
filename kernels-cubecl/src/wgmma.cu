// C = A · B for bf16 A [M, K] with rows contiguous along K and B [K, N] laid out either way,
// accumulated in f32, written as bf16 C [M, N]: Hopper's warpgroup MMA (`wgmma`), which cubek
// does not emit.
//
// The host prepends N_DIM and K_DIM (multiples of BN and BK; M a multiple of BM), B_MN_MAJOR (1
// when B's rows are contiguous along N, as a linear layer's weight is for its input gradient; 0
// when B is the transpose of a K-contiguous [N, K], as the weight is for the forward) and the
// accumulator's 64 asm operands (ACC_REGS, ACC_OPERANDS).
//
// Each 256-thread block computes a BM x BN tile, warpgroup w the rows [64 w, 64 w + 64), through
// m64n128k16 instructions that read both operands from shared memory. The depth loop streams
// BK-deep slices of A and B through a STAGES-deep ring with `cp.async`, each slice in a layout
// wgmma's descriptors name, swizzled so that neither the copies nor the MMA reads collide on
// banks: the 16-byte chunks of each row permuted by an XOR with the row's place among its
// neighbours. Precompiled kernels get static shared memory only (48 KiB), which the ring fills;
// two blocks share an SM, and each one's copies and MMAs overlap the other's waits.

#define BM 128
#define BN 128
#define BK 32
#define STAGES 3
#define THREADS 256
#define SLICE_BYTES (BM * BK * 2)
#define STAGE_BYTES (2 * SLICE_BYTES)
#define ROW_BYTES (BK * 2)

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

// Rows [row0, row0 + 128) x columns [k0, k0 + BK) of a K-contiguous matrix into a K-major slice.
static __device__ __forceinline__ void copy_k_major(u32 slice, const bf16 *matrix, int row0, int k0,
                                                    int thread) {
#pragma unroll
    for (int i = 0; i < BM * BK / 8 / THREADS; i++) {
        int chunk = thread + i * THREADS;
        int row = chunk / (BK / 8);
        int column = chunk % (BK / 8);
        u32 to = slice + row * ROW_BYTES + ((column ^ ((row >> 1) & 3)) << 4);
        const bf16 *from = matrix + (u64)(row0 + row) * K_DIM + k0 + column * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(from));
    }
}

#if B_MN_MAJOR
// N-major slices: the BN = 128 columns as two halves of 64 (128 bytes), each half BK rows of 128
// bytes with the 128-byte swizzle (chunk c of row k at chunk c ^ (k % 8)); the halves BK rows
// apart (leading byte offset), groups of eight rows 1024 bytes apart (stride byte offset).
#define HALF_BYTES (BK * 128)
static __device__ __forceinline__ u64 b_descriptor(u32 address) {
    return (u64)((address & 0x3FFFF) >> 4) | ((u64)(HALF_BYTES >> 4) << 16)
           | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
// 16 rows deeper: two groups of eight rows.
#define B_DEPTH_STEP (2 * 1024 >> 4)
#define TRANSPOSE_B "1"

// Rows [k0, k0 + BK) x columns [n0, n0 + 128) of an N-contiguous [K, N] matrix.
static __device__ __forceinline__ void copy_b(u32 slice, const bf16 *matrix, int n0, int k0,
                                              int thread) {
#pragma unroll
    for (int i = 0; i < BK * BN / 8 / THREADS; i++) {
        int chunk = thread + i * THREADS;
        int row = chunk / (BN / 8);
        int column = chunk % (BN / 8);
        int half = column / 8;
        u32 to = slice + half * HALF_BYTES + row * 128 + (((column % 8) ^ (row & 7)) << 4);
        const bf16 *from = matrix + (u64)(k0 + row) * N_DIM + n0 + column * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(from));
    }
}
#else
#define b_descriptor k_major_descriptor
// 16 deeper is 32 bytes further along the rows.
#define B_DEPTH_STEP 2
#define TRANSPOSE_B "0"
#define copy_b copy_k_major
#endif

static __device__ __forceinline__ void copy_stage(u32 stage, const bf16 *a, const bf16 *b, int m0,
                                                  int n0, int k0, int thread) {
    copy_k_major(stage, a, m0, k0, thread);
    copy_b(stage + SLICE_BYTES, b, n0, k0, thread);
}

static __device__ __forceinline__ void mma(float *d, u64 a, u64 b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ACC_REGS
                 ", %64, %65, p, 1, 1, 0, " TRANSPOSE_B ";\n}\n"
                 : ACC_OPERANDS
                 : "l"(a), "l"(b), "r"(1));
}

// Waits for this warpgroup's MMAs; the accumulator is an operand so no read of it moves above.
static __device__ __forceinline__ void mma_wait(float *d) {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" : ACC_OPERANDS : : "memory");
}

// Two f32 as bf16, `low` in the low half: the first of the pair in memory.
static __device__ __forceinline__ u32 pack(float low, float high) {
    u32 packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
    return packed;
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
    wgmma_bf16_tn(const bf16 *__restrict__ a, const bf16 *__restrict__ b, bf16 *__restrict__ c) {
    __shared__ __align__(1024) unsigned char ring[STAGES * STAGE_BYTES];
    const int thread = threadIdx.x;
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int slices = K_DIM / BK;
    const u32 base = shared_address(ring);
    // This warpgroup's 64 rows within an A slice.
    const u32 warpgroup_rows = (thread / 128) * 64 * ROW_BYTES;

    float d[64];
#pragma unroll
    for (int i = 0; i < 64; i++) {
        d[i] = 0.0f;
    }

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < slices) {
            copy_stage(base + s * STAGE_BYTES, a, b, m0, n0, s * BK, thread);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    }

    for (int slice = 0; slice < slices; slice++) {
        // This slice's copies landed, everyone's (the barrier), and every MMA of the slice
        // before has finished reading the stage the next copy overwrites.
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const int next = slice + STAGES - 1;
        if (next < slices) {
            copy_stage(base + (next % STAGES) * STAGE_BYTES, a, b, m0, n0, next * BK, thread);
        }
        asm volatile("cp.async.commit_group;\n" ::);

        const u32 stage = base + (slice % STAGES) * STAGE_BYTES;
        const u64 a_slice = k_major_descriptor(stage + warpgroup_rows);
        const u64 b_slice = b_descriptor(stage + SLICE_BYTES);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int k = 0; k < BK / 16; k++) {
            // 16 deeper is 32 bytes further along A's rows: 2 in the descriptor's address.
            mma(d, a_slice + 2 * k, b_slice + B_DEPTH_STEP * k);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        mma_wait(d);
    }

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
