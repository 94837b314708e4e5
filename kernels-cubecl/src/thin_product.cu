// The thin products of a LoRA layer (RANK 8 or 16) on `mma.sync.m16n8k16`, each bound by the
// bytes of its wide operand X [rows, DEPTH] (16 MiB at 2048 x 4096 against 0.13 GFLOP at rank
// 8), so every lane streams what its MMA fragments need straight from global memory, with no
// shared memory until the warps' sums meet:
//
// - thin_product: H = X · Dᵀ for a thin D [RANK, DEPTH] (the down-projection), rounded once to
//   bf16 H [rows, RANK]: the hidden the `wgmma` product's epilogue multiplies by `up`.
// - thin_gradient: O = Xᵀ · T for a thin T [rows, RANK], rounded once to bf16 O [DEPTH, RANK]:
//   the weight gradients, `xᵀ·(g·Bᵀ)` for A and `gᵀ·h` for B. With F32_OUTPUT, the f32 sums
//   times a scale instead, [DEPTH, RANK] or, with TRANSPOSED, [RANK, DEPTH]: an f32 adapter's
//   gradients in its own layout, no rounding to bf16 and no cast after.
//
// An MMA sums its 16 depths in any order, and its 16 output rows too, so each kernel maps rows,
// columns and depths onto fragments as its loads come. The host prepends RANK, DEPTH (a
// multiple of 32), F32_OUTPUT and TRANSPOSED; thin_gradient takes the rows (a multiple of 16)
// and the scale in `Params`. Both use 16 warps a block, summed in a fixed order at the end.

#define WARPS 16
#define THREADS (32 * WARPS)
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

static __device__ __forceinline__ u32 pack(float low, float high) {
    u32 packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
    return packed;
}

// The warps' sums of a block's N output rows of RANK, added in warp order and rounded to bf16
// rows [first, first + N) of `out` ([., RANK]): one pair of ranks a thread.
template <int N>
static __device__ __forceinline__ void store_sums(const float (*partial)[N][RANK], u32 *out,
                                                  u64 first) {
    if (threadIdx.x < N * RANK / 2) {
        const int row = threadIdx.x / (RANK / 2), rank = threadIdx.x % (RANK / 2) * 2;
        float low = 0.0f, high = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            low += partial[w][row][rank];
            high += partial[w][row][rank + 1];
        }
        out[((first + row) * RANK + rank) / 2] = pack(low, high);
    }
}

// The warps' sums of a block's N output rows of RANK times `scale`, in f32: rows [first, first
// + N) of `out` ([., RANK]), or with TRANSPOSED columns [first, first + N) of `out` ([RANK,
// DEPTH], consecutive threads on consecutive columns). One element a thread.
template <int N>
static __device__ __forceinline__ void store_scaled_sums(const float (*partial)[N][RANK],
                                                         float *out, u64 first, float scale) {
    if (threadIdx.x < N * RANK) {
#if TRANSPOSED
        const int row = threadIdx.x % N, rank = threadIdx.x / N;
        const u64 at = (u64)rank * DEPTH + first + row;
#else
        const int row = threadIdx.x / RANK, rank = threadIdx.x % RANK;
        const u64 at = (first + row) * RANK + rank;
#endif
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) sum += partial[w][row][rank];
        out[at] = sum * scale;
    }
}

// ---- thin_product ----
//
// Lane (g, t) gives, for rows g and g + 8 of X and row 8j + g of D alike, the depths 8t to
// 8t + 3 of each 32 as the fragment's "2t, 2t + 1, 2t + 8, 2t + 9" and 8t + 4 to 8t + 7 to a
// second MMA. A block is 16 warps over 16 rows of X, each warp every 16th chunk of 32 depths.

#define ROWS 16

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
    chunk.lower = load(top + 8 * DEPTH + k);
#pragma unroll
    for (int j = 0; j < TILES; j++) chunk.thin[j] = load(thin + (u64)8 * j * DEPTH + k);
    return chunk;
}

static __device__ __forceinline__ void multiply_chunk(float (*c)[4], const Chunk &chunk) {
    const uint4 upper = chunk.upper, lower = chunk.lower;
#pragma unroll
    for (int j = 0; j < TILES; j++) {
        mma(c[j], upper.x, lower.x, upper.y, lower.y, chunk.thin[j].x, chunk.thin[j].y);
        mma(c[j], upper.z, lower.z, upper.w, lower.w, chunk.thin[j].z, chunk.thin[j].w);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    thin_product(const bf16 *__restrict__ x, const bf16 *__restrict__ d, u32 *__restrict__ h) {
    __shared__ float partial[WARPS][ROWS][RANK];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const u64 row0 = (u64)blockIdx.x * ROWS;
    const bf16 *top = x + (row0 + g) * DEPTH + 8 * t;
    const bf16 *thin = d + (u64)g * DEPTH + 8 * t;

    // The warps take the 32-deep chunks in turn, so that they stream neighbouring bytes
    // together; software-pipelined, the next two chunks' loads in flight while one multiplies
    // (one was not enough bytes in flight to stream X: 2.1 TB/s on an H200).
    float c[TILES][4] = {};
    const int first = 32 * warp, stride = 32 * WARPS;
    if (first < DEPTH) {
        Chunk next = load_chunk(top, thin, first);
        if (first + stride < DEPTH) {
            Chunk after = load_chunk(top, thin, first + stride);
            for (int k = first + 2 * stride; k < DEPTH; k += stride) {
                const Chunk chunk = next;
                next = after;
                after = load_chunk(top, thin, k);
                multiply_chunk(c, chunk);
            }
            multiply_chunk(c, next);
            next = after;
        }
        multiply_chunk(c, next);
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
    store_sums<ROWS>(partial, h, row0);
}

// ---- thin_gradient ----
//
// A block owns COLUMNS columns of X over all its rows, so its sums are whole and no partial
// sums leave it (the portable kernel writes one per block of rows, and a second kernel adds
// them); its warps take the 16-row steps in turn. D[i][n] += A[i][k] · B[k][n] with i a column
// of X, k a row of the step and n a rank: lane (g, t) loads 8 bytes (4 columns at 4g) of each of
// the step's rows 2t, 2t + 1, 2t + 8 and 2t + 9. MMA j (0 or 1) takes column 4g + 2j as its
// output row g and column 4g + 2j + 1 as row g + 8; a register pairs one column of two rows,
// which one byte permute of the two rows' words gives.

#define COLUMNS 32
#define STEP_ROWS 16
// Steps a warp loads at once: their loads are in flight together, the next group's while this
// one multiplies. Two keep rank 8's registers at two blocks a multiprocessor, which times best
// on an H100 (9.3 µs at 2048 x 4096, 21.7 at 2048 x 11008; four steps: 9.7 and 24.6).
#define GROUP 2
// A lane's words of a row, two columns each: its four columns.
#define LANE_WORDS 2

struct Params {
    u64 rows;
    // The f32 output's scale, as f32 bits.
    u64 scale_bits;
};

// A lane's four bf16 of a row of X, kept out of L1: each is read once.
static __device__ __forceinline__ void load_x(u32 *w, const bf16 *at) {
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(w[0]), "=r"(w[1]) : "l"(at));
}

// One bf16 of T: every block reads all of T, so it stays in L1 and L2.
static __device__ __forceinline__ u32 load_thin(const bf16 *at) {
    unsigned short v;
    asm("ld.global.nc.u16 %0, [%1];\n" : "=h"(v) : "l"(at));
    return v;
}

// A step's operands in this lane: X's rows 2t, 2t + 1, 2t + 8, 2t + 9 at its four columns, and
// the B fragments of each rank tile (rank 8 tile + g of the same rows, paired).
struct Step {
    u32 x[4][LANE_WORDS];
    u32 b[TILES][2];
};

// Step `step`'s operands, zeros past the last step (they add nothing).
static __device__ __forceinline__ Step load_step(const bf16 *x_lane, const bf16 *thin_lane,
                                                 int step, int steps, int t) {
    Step s;
    if (step >= steps) {
#pragma unroll
        for (int r = 0; r < 4; r++) {
#pragma unroll
            for (int w = 0; w < LANE_WORDS; w++) s.x[r][w] = 0;
        }
#pragma unroll
        for (int j = 0; j < TILES; j++) s.b[j][0] = s.b[j][1] = 0;
        return s;
    }
    const u64 row = (u64)step * STEP_ROWS + 2 * t;
    const u64 rows[4] = {row, row + 1, row + 8, row + 9};
#pragma unroll
    for (int r = 0; r < 4; r++) load_x(s.x[r], x_lane + rows[r] * DEPTH);
#pragma unroll
    for (int j = 0; j < TILES; j++) {
        const bf16 *at = thin_lane + 8 * j;
        s.b[j][0] = load_thin(at + rows[0] * RANK) | load_thin(at + rows[1] * RANK) << 16;
        s.b[j][1] = load_thin(at + rows[2] * RANK) | load_thin(at + rows[3] * RANK) << 16;
    }
    return s;
}

static __device__ __forceinline__ void multiply_step(float (*c)[TILES][4], const Step &s) {
#pragma unroll
    for (int j = 0; j < LANE_WORDS; j++) {
        // Columns 2j, 2j + 1 of the lane's: word j of each row.
        const u32 w0 = s.x[0][j], w1 = s.x[1][j], w2 = s.x[2][j], w3 = s.x[3][j];
        // Low halves: column 4g + 2j (output row g); high halves: the next (row g + 8).
        const u32 a0 = __byte_perm(w0, w1, 0x5410), a1 = __byte_perm(w0, w1, 0x7632);
        const u32 a2 = __byte_perm(w2, w3, 0x5410), a3 = __byte_perm(w2, w3, 0x7632);
#pragma unroll
        for (int tile = 0; tile < TILES; tile++) {
            mma(c[j][tile], a0, a1, a2, a3, s.b[tile][0], s.b[tile][1]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    thin_gradient(const bf16 *__restrict__ x, const bf16 *__restrict__ thin,
                  void *__restrict__ out, const __grid_constant__ Params p) {
    __shared__ float partial[WARPS][COLUMNS][RANK];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int column0 = blockIdx.x * COLUMNS;
    const int steps = (int)(p.rows / STEP_ROWS);
    const bf16 *x_lane = x + column0 + 2 * LANE_WORDS * g;
    const bf16 *thin_lane = thin + g;

    float c[LANE_WORDS][TILES][4] = {};
    Step current[GROUP];
#pragma unroll
    for (int i = 0; i < GROUP; i++) {
        current[i] = load_step(x_lane, thin_lane, warp + i * WARPS, steps, t);
    }
    for (int first = warp; first < steps; first += GROUP * WARPS) {
        Step next[GROUP];
#pragma unroll
        for (int i = 0; i < GROUP; i++) {
            next[i] = load_step(x_lane, thin_lane, first + (GROUP + i) * WARPS, steps, t);
        }
#pragma unroll
        for (int i = 0; i < GROUP; i++) multiply_step(c, current[i]);
#pragma unroll
        for (int i = 0; i < GROUP; i++) current[i] = next[i];
    }

    // c[j][tile]: output rows g (0, 1) and g + 8 (2, 3) are the lane's columns 2j and 2j + 1;
    // its columns 2t, 2t + 1 are ranks 8 tile + 2t and + 1.
#pragma unroll
    for (int j = 0; j < LANE_WORDS; j++) {
        const int column = 2 * LANE_WORDS * g + 2 * j;
#pragma unroll
        for (int tile = 0; tile < TILES; tile++) {
            const int rank = 8 * tile + 2 * t;
            partial[warp][column][rank] = c[j][tile][0];
            partial[warp][column][rank + 1] = c[j][tile][1];
            partial[warp][column + 1][rank] = c[j][tile][2];
            partial[warp][column + 1][rank + 1] = c[j][tile][3];
        }
    }
    __syncthreads();
#if F32_OUTPUT
    store_scaled_sums<COLUMNS>(partial, (float *)out, column0, __uint_as_float((u32)p.scale_bits));
#else
    store_sums<COLUMNS>(partial, (u32 *)out, column0);
#endif
}
