// H = X · Dᵀ for a bf16 X [M, K_DIM] with contiguous rows and a thin D [RANK, K_DIM] (a LoRA
// layer's down-projection, RANK 8 or 16), accumulated in f32 and rounded once to bf16 H
// [M, RANK]: the hidden of a LoRA layer, read back by the `wgmma` product's epilogue.
//
// The product is bound by X's bytes (16 MiB at 2048 x 4096 against 0.13 GFLOP at rank 8). So
// every lane streams 16-byte vectors straight from global memory into `mma.sync.m16n8k16`
// fragments, with no shared memory: an MMA sums over its 16 depths in any order, so lane (g, t)
// gives, for rows g and g + 8 of X and row 8j + g of D alike, the depths 8t to 8t + 3 of each 32
// as the fragment's "2t, 2t + 1, 2t + 8, 2t + 9" and 8t + 4 to 8t + 7 to a second MMA.
//
// The host prepends RANK and K_DIM (a multiple of 32). A block is 16 warps over 16 rows of X,
// each warp every 16th chunk of 32 depths; the warps' partial sums meet in shared memory.

#define WARPS 16
#define THREADS (32 * WARPS)
#define ROWS 16
#define TILES (RANK / 8)

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

// c += a · b: the m16n8k16 MMA, bf16 operands and f32 accumulators.
static __device__ __forceinline__ void mma(float *c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                           u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Eight bf16 of read-only memory, kept out of L1: each is read once by this block.
static __device__ __forceinline__ uint4 load(const bf16 *at) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(at));
    return v;
}

// One 32-deep chunk at depth k of this lane's slice: both rows of X, each tile's row of D.
struct Chunk {
    uint4 upper, lower, thin[TILES];
};

static __device__ __forceinline__ Chunk load_chunk(const bf16 *top, const bf16 *thin, int k) {
    Chunk chunk;
    chunk.upper = load(top + k);
    chunk.lower = load(top + 8 * K_DIM + k);
#pragma unroll
    for (int j = 0; j < TILES; j++) chunk.thin[j] = load(thin + (u64)8 * j * K_DIM + k);
    return chunk;
}

static __device__ __forceinline__ void multiply(float (*c)[4], const Chunk &chunk) {
    const uint4 upper = chunk.upper, lower = chunk.lower;
#pragma unroll
    for (int j = 0; j < TILES; j++) {
        mma(c[j], upper.x, lower.x, upper.y, lower.y, chunk.thin[j].x, chunk.thin[j].y);
        mma(c[j], upper.z, lower.z, upper.w, lower.w, chunk.thin[j].z, chunk.thin[j].w);
    }
}

static __device__ __forceinline__ u32 pack(float low, float high) {
    u32 packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
    return packed;
}

extern "C" __global__ void __launch_bounds__(THREADS)
    thin_product(const bf16 *__restrict__ x, const bf16 *__restrict__ d, u32 *__restrict__ h) {
    __shared__ float partial[WARPS][ROWS][RANK];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const u64 row0 = (u64)blockIdx.x * ROWS;
    const bf16 *top = x + (row0 + g) * K_DIM + 8 * t;
    const bf16 *thin = d + (u64)g * K_DIM + 8 * t;

    // The warps take the 32-deep chunks in turn, so that they stream neighbouring bytes
    // together; software-pipelined, the next two chunks' loads in flight while one multiplies
    // (one was not enough bytes in flight to stream X: 2.1 TB/s on an H200).
    float c[TILES][4] = {};
    const int first = 32 * warp, stride = 32 * WARPS;
    if (first < K_DIM) {
        Chunk next = load_chunk(top, thin, first);
        if (first + stride < K_DIM) {
            Chunk after = load_chunk(top, thin, first + stride);
            for (int k = first + 2 * stride; k < K_DIM; k += stride) {
                const Chunk chunk = next;
                next = after;
                after = load_chunk(top, thin, k);
                multiply(c, chunk);
            }
            multiply(c, next);
            next = after;
        }
        multiply(c, next);
    }
    // c[j]: rows g (0, 1) and g + 8 (2, 3), columns 8 j + 2 t and + 1.
#pragma unroll
    for (int j = 0; j < TILES; j++) {
        partial[warp][g][8 * j + 2 * t] = c[j][0];
        partial[warp][g][8 * j + 2 * t + 1] = c[j][1];
        partial[warp][g + 8][8 * j + 2 * t] = c[j][2];
        partial[warp][g + 8][8 * j + 2 * t + 1] = c[j][3];
    }
    __syncthreads();
    // One pair of H's columns a thread.
    if (threadIdx.x < ROWS * RANK / 2) {
        const int row = threadIdx.x / (RANK / 2), column = threadIdx.x % (RANK / 2) * 2;
        float low = 0.0f, high = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            low += partial[w][row][column];
            high += partial[w][row][column + 1];
        }
        h[((row0 + row) * RANK + column) / 2] = pack(low, high);
    }
}
