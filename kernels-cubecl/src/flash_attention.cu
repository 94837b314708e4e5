// Causal attention in the manner of FlashAttention-2: the scores of a block of queries against a
// block of keys live in registers only, the softmax runs online over the key blocks, and the
// backward recomputes the probabilities from the row's log-sum-exp instead of keeping them. bf16
// operands through `mma.sync.m16n8k16` (sm_80 and later), f32 accumulators and softmax.
//
// The host prepends HEAD_DIM (64 or 128) and DYNAMIC_SHARED_MEMORY_BYTES (the tiles below; the
// launch reserves it: see third_party/cubecl-cuda). Sizes and strides come in `Params`, passed by
// value as CubeCL passes a kernel's info on sm_70 and later.
//
// Every block has four warps over 64 rows of its tiles, 16 rows a warp. Tiles are 64 rows of
// HEAD_DIM bf16 in shared memory, each row padded by 8 elements so that `ldmatrix`'s eight row
// addresses of a phase fall on distinct banks. Tiles arrive by `cp.async`, the next block's
// while the current one is computed. Rows past `seq` load as zeros and are never stored; the
// causal mask hides such keys from every real query.
//
// Entry points:
// - attention_forward: one block per 64 queries of a head; writes the output and each query's
//   log-sum-exp of the scaled scores (in base 2, as the kernels use it).
// - attention_backward_dq: the same blocks; writes `delta = Σ dO·O` per query (for the next
//   kernel) and the queries' gradient.
// - attention_backward_dkdv: one block per 64 keys of a key/value head, over every query head
//   that shares it (grouped-query attention) and every query block that sees those keys; writes
//   the keys' and values' gradients.

#define BLOCK 64
#define THREADS 128
#define ROW (HEAD_DIM + 8)
#define TILE (BLOCK * ROW)
// The head dimension in 16-deep MMA steps and in 8-wide output tiles.
#define D_STEPS (HEAD_DIM / 16)
#define D_TILES (HEAD_DIM / 8)

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define INF __int_as_float(0x7f800000)

struct Params {
    u64 seq;
    u64 heads;
    // Query heads per key/value head.
    u64 groups;
    // The softmax scale times log2(e), as f32 bits.
    u64 scale_log2_bits;
    // The softmax scale, as f32 bits: the backward's gradients carry it.
    u64 scale_bits;
    // Strides in elements (batch, head, row) of q, k, v, the output and its gradient; the head
    // dimension is contiguous in each.
    u64 q_stride[3];
    u64 k_stride[3];
    u64 v_stride[3];
    u64 o_stride[3];
    u64 do_stride[3];
};

static __device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float((u32)x << 16); }

// Two f32 rounded to bf16, `low` in the low half (the lower column of an MMA fragment).
static __device__ __forceinline__ u32 pack(float low, float high) {
    u32 packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
    return packed;
}

static __device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// c += a · b for a 16 x 16 bf16 `a` (row-major fragment), a 16 x 8 `b` (column fragment) and a
// 16 x 8 f32 `c`. Lane (g = lane / 4, t = lane % 4) holds a's rows g and g + 8 at columns 2t, 2t + 1
// and 2t + 8, 2t + 9; b's rows 2t, 2t + 1 and 2t + 8, 2t + 9 of column g; c's rows g (c[0], c[1])
// and g + 8 (c[2], c[3]) at columns 2t, 2t + 1.
static __device__ __forceinline__ void mma(float *c, const u32 *a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The shared-memory address of a tile's element, as ldmatrix and cp.async take it.
static __device__ __forceinline__ u32 shared_address(const void *at) {
    return (u32)__cvta_generic_to_shared(at);
}

// Four 8 x 8 matrices of a tile, one register each: lanes 8i to 8i + 7 address the rows of
// matrix i, and lane (g, t) receives row g's columns 2t, 2t + 1 of each (with `.trans`, column
// g's rows 2t, 2t + 1). One instruction in place of four to eight 32- or 16-bit loads.
static __device__ __forceinline__ void ldmatrix(u32 *r, const bf16 *at) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(at)));
}

static __device__ __forceinline__ void ldmatrix_transposed(u32 *r, const bf16 *at) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(at)));
}

// The A fragment of rows [row0, row0 + 16) x columns [k0, k0 + 16) of a tile.
static __device__ __forceinline__ void load_a(u32 *a, const bf16 *tile, int row0, int k0, int lane) {
    ldmatrix(a, tile + (row0 + lane % 8 + (lane / 8) % 2 * 8) * ROW + k0 + lane / 16 * 8);
}

// B fragments of `tileᵀ` for two 8-wide column tiles: depth rows [k0, k0 + 16) are columns of
// the tile, the product's columns [n0, n0 + 16) rows of it (q·kᵀ reading the keys as stored).
// b[0], b[1] are columns [n0, n0 + 8); b[2], b[3] the next 8.
static __device__ __forceinline__ void load_b_transposed(u32 *b, const bf16 *tile, int n0, int k0,
                                                         int lane) {
    ldmatrix(b, tile + (n0 + lane % 8 + lane / 16 * 8) * ROW + k0 + (lane / 8) % 2 * 8);
}

// B fragments of the tile itself for two column tiles: depth rows [k0, k0 + 16), columns
// [n0, n0 + 16) (p·v), in the same order.
static __device__ __forceinline__ void load_b(u32 *b, const bf16 *tile, int n0, int k0, int lane) {
    ldmatrix_transposed(b, tile + (k0 + lane % 8 + (lane / 8) % 2 * 8) * ROW + n0 + lane / 16 * 8);
}

// The A fragment of a 16 x 16 block of f32 accumulators (two 16 x 8 tiles side by side), rounded
// to bf16: an MMA's output fragment is the next one's input fragment, lane for lane.
static __device__ __forceinline__ void accumulators_to_a(u32 *a, const float *left, const float *right) {
    a[0] = pack(left[0], left[1]);
    a[1] = pack(left[2], left[3]);
    a[2] = pack(right[0], right[1]);
    a[3] = pack(right[2], right[3]);
}

// Starts copying `bytes` (4 or 16) from global to shared memory without waiting; with `real`
// false it reads nothing (source size 0) and fills zeros. 16 bytes bypass L1 (`.cg`), which
// only that size allows.
template <int bytes>
static __device__ __forceinline__ void copy_async(void *to, const void *from, bool real) {
    if constexpr (bytes == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     :
                     : "r"(shared_address(to)), "l"(from), "r"(real ? 16 : 0));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                     :
                     : "r"(shared_address(to)), "l"(from), "n"(bytes), "r"(real ? bytes : 0));
    }
}

// Starts copying rows [row0, row0 + BLOCK) of a head's [seq, HEAD_DIM] matrix into a tile
// (zeros past `seq`) without waiting: the copies land while the block computes, and
// `wait_copies` waits for all but the newest `pending` groups of them.
static __device__ __forceinline__ void copy_tile(bf16 *tile, const bf16 *matrix, u64 row_stride,
                                                 int row0, int seq) {
#pragma unroll
    for (int chunk = threadIdx.x; chunk < BLOCK * HEAD_DIM / 8; chunk += THREADS) {
        int row = chunk / (HEAD_DIM / 8);
        int column = chunk % (HEAD_DIM / 8) * 8;
        bool real = row0 + row < seq;
        const bf16 *from = matrix + (real ? (u64)(row0 + row) * row_stride + column : 0);
        copy_async<16>(tile + row * ROW + column, from, real);
    }
}

// Closes the group of copies started since the last one.
static __device__ __forceinline__ void commit_copies() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int pending> static __device__ __forceinline__ void wait_copies() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// A warp's 16 x HEAD_DIM f32 accumulators, times `scale`, as bf16 rows [row0, row0 + 16) of a
// head's matrix (rows past `seq` skipped).
static __device__ __forceinline__ void store_rows(bf16 *matrix, u64 row_stride, int row0, int seq,
                                                  const float (*acc)[4], float scale, int lane) {
    int row = row0 + lane / 4;
#pragma unroll
    for (int n = 0; n < D_TILES; n++) {
        int column = n * 8 + 2 * (lane % 4);
        if (row < seq) {
            *(u32 *)(matrix + (u64)row * row_stride + column) =
                pack(acc[n][0] * scale, acc[n][1] * scale);
        }
        if (row + 8 < seq) {
            *(u32 *)(matrix + (u64)(row + 8) * row_stride + column) =
                pack(acc[n][2] * scale, acc[n][3] * scale);
        }
    }
}

static __device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

static __device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Left at 182 registers (two blocks a multiprocessor): capped at three blocks' 168 it spills and
// ran 8% slower on an H200.
extern "C" __global__ void __launch_bounds__(THREADS)
    attention_forward(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                      const bf16 *__restrict__ v, bf16 *__restrict__ o, float *__restrict__ lse,
                      const __grid_constant__ Params p) {
    extern __shared__ uint4 shared_words[];
    bf16 *tiles = (bf16 *)shared_words;
    bf16 *q_tile = tiles, *k_tile = tiles + TILE, *v_tile = tiles + 2 * TILE;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int seq = (int)p.seq;
    // The last query blocks see the most keys: they start first.
    const int query_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z, kv_head = head / (int)p.groups;
    const int q0 = query_block * BLOCK;
    const float scale_log2 = __uint_as_float((u32)p.scale_log2_bits);
    const bf16 *q_head = q + batch * p.q_stride[0] + head * p.q_stride[1];
    const bf16 *k_head = k + batch * p.k_stride[0] + kv_head * p.k_stride[1];
    const bf16 *v_head = v + batch * p.v_stride[0] + kv_head * p.v_stride[1];

    // Copies in flight: the first keys while the queries' fragments are read, then each block's
    // values while its scores are computed, and the next block's keys during its softmax and p·v.
    copy_tile(q_tile, q_head, p.q_stride[2], q0, seq);
    commit_copies();
    copy_tile(k_tile, k_head, p.k_stride[2], 0, seq);
    commit_copies();
    wait_copies<1>();
    __syncthreads();
    u32 q_fragments[D_STEPS][4];
#pragma unroll
    for (int d = 0; d < D_STEPS; d++) load_a(q_fragments[d], q_tile, warp * 16, d * 16, lane);
    float acc[D_TILES][4] = {};
    // This lane's two rows (g and g + 8): the running max (base 2) and its part of the sum.
    float row_max[2] = {-INF, -INF}, row_sum[2] = {0.0f, 0.0f};
    const int query = q0 + warp * 16 + lane / 4;
    for (int key_block = 0; key_block <= query_block; key_block++) {
        copy_tile(v_tile, v_head, p.v_stride[2], key_block * BLOCK, seq);
        commit_copies();
        wait_copies<1>();
        __syncthreads();

        float s[BLOCK / 8][4] = {};
#pragma unroll
        for (int d = 0; d < D_STEPS; d++) {
#pragma unroll
            for (int n = 0; n < BLOCK / 8; n += 2) {
                u32 b[4];
                load_b_transposed(b, k_tile, n * 8, d * 16, lane);
                mma(s[n], q_fragments[d], b[0], b[1]);
                mma(s[n + 1], q_fragments[d], b[2], b[3]);
            }
        }
        // Every warp is done with the keys: the next block's may land.
        __syncthreads();
        if (key_block < query_block) {
            copy_tile(k_tile, k_head, p.k_stride[2], (key_block + 1) * BLOCK, seq);
        }
        commit_copies();
        const bool diagonal = key_block == query_block;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float block_max = -INF;
#pragma unroll
            for (int n = 0; n < BLOCK / 8; n++) {
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    int key = key_block * BLOCK + n * 8 + 2 * (lane % 4) + c;
                    float x = s[n][2 * r + c] * scale_log2;
                    s[n][2 * r + c] = diagonal && key > query + 8 * r ? -INF : x;
                    block_max = fmaxf(block_max, s[n][2 * r + c]);
                }
            }
            // Key 0 is in every row's first block, so the max is finite from then on.
            float new_max = fmaxf(row_max[r], quad_max(block_max));
            float rescale = exp2_approx(row_max[r] - new_max);
            row_max[r] = new_max;
            row_sum[r] *= rescale;
#pragma unroll
            for (int n = 0; n < D_TILES; n++) {
                acc[n][2 * r] *= rescale;
                acc[n][2 * r + 1] *= rescale;
            }
#pragma unroll
            for (int n = 0; n < BLOCK / 8; n++) {
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    float e = exp2_approx(s[n][2 * r + c] - new_max);
                    s[n][2 * r + c] = e;
                    row_sum[r] += e;
                }
            }
        }
        wait_copies<1>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BLOCK / 16; kk++) {
            u32 a[4];
            accumulators_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < D_TILES; n += 2) {
                u32 b[4];
                load_b(b, v_tile, n * 8, kk * 16, lane);
                mma(acc[n], a, b[0], b[1]);
                mma(acc[n + 1], a, b[2], b[3]);
            }
        }
        // Every warp is done with the values before the next block's land.
        __syncthreads();
    }

    float inverse[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = quad_sum(row_sum[r]);
        inverse[r] = 1.0f / sum;
        int row = query + 8 * r;
        if (lane % 4 == 0 && row < seq) {
            lse[((u64)batch * p.heads + head) * seq + row] = row_max[r] + __log2f(sum);
        }
    }
#pragma unroll
    for (int n = 0; n < D_TILES; n++) {
        acc[n][0] *= inverse[0];
        acc[n][1] *= inverse[0];
        acc[n][2] *= inverse[1];
        acc[n][3] *= inverse[1];
    }
    store_rows(o + batch * p.o_stride[0] + head * p.o_stride[1], p.o_stride[2], q0 + warp * 16, seq,
               acc, 1.0f, lane);
}

// Queries' gradient: per query block, over the key blocks it sees,
// dS = P ∘ (dO·vᵀ - delta), dq = scale · dS·k. The keys and values come in two buffers each:
// the next block's land while this one's are used.
extern "C" __global__ void __launch_bounds__(THREADS)
    attention_backward_dq(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                          const bf16 *__restrict__ v, const bf16 *__restrict__ o,
                          const bf16 *__restrict__ d_o, const float *__restrict__ lse,
                          float *__restrict__ delta, bf16 *__restrict__ dq,
                          const __grid_constant__ Params p) {
    extern __shared__ uint4 shared_words[];
    bf16 *tiles = (bf16 *)shared_words;
    bf16 *q_tile = tiles, *do_tile = tiles + TILE, *k_tiles = tiles + 2 * TILE,
         *v_tiles = tiles + 4 * TILE;
    float *row_lse = (float *)(tiles + 6 * TILE), *row_delta = row_lse + BLOCK;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int seq = (int)p.seq;
    const int query_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z, kv_head = head / (int)p.groups;
    const int q0 = query_block * BLOCK;
    const float scale_log2 = __uint_as_float((u32)p.scale_log2_bits);
    const u64 row_stats = ((u64)batch * p.heads + head) * seq;
    const bf16 *k_head = k + batch * p.k_stride[0] + kv_head * p.k_stride[1];
    const bf16 *v_head = v + batch * p.v_stride[0] + kv_head * p.v_stride[1];

    copy_tile(q_tile, q + batch * p.q_stride[0] + head * p.q_stride[1], p.q_stride[2], q0, seq);
    copy_tile(do_tile, d_o + batch * p.do_stride[0] + head * p.do_stride[1], p.do_stride[2], q0,
              seq);
    // The output, for delta only, in the second keys' buffer.
    copy_tile(k_tiles + TILE, o + batch * p.o_stride[0] + head * p.o_stride[1], p.o_stride[2], q0,
              seq);
    copy_tile(k_tiles, k_head, p.k_stride[2], 0, seq);
    copy_tile(v_tiles, v_head, p.v_stride[2], 0, seq);
    commit_copies();
    wait_copies<0>();
    __syncthreads();
    for (int r = 0; r < 16; r++) {
        int row = warp * 16 + r;
        float sum = 0.0f;
        for (int d = lane; d < HEAD_DIM; d += 32) {
            sum += to_float(do_tile[row * ROW + d]) * to_float(k_tiles[TILE + row * ROW + d]);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
        if (lane == 0) {
            bool real = q0 + row < seq;
            row_delta[row] = real ? sum : 0.0f;
            row_lse[row] = real ? lse[row_stats + q0 + row] : INF;
            if (real) delta[row_stats + q0 + row] = sum;
        }
    }
    // The output's buffer is free for the next keys.
    __syncthreads();

    float acc[D_TILES][4] = {};
    const int row = warp * 16 + lane / 4;
    const int query = q0 + row;
    for (int key_block = 0; key_block <= query_block; key_block++) {
        const bf16 *k_tile = k_tiles + key_block % 2 * TILE, *v_tile = v_tiles + key_block % 2 * TILE;
        if (key_block < query_block) {
            int next = (key_block + 1) % 2 * TILE;
            copy_tile(k_tiles + next, k_head, p.k_stride[2], (key_block + 1) * BLOCK, seq);
            copy_tile(v_tiles + next, v_head, p.v_stride[2], (key_block + 1) * BLOCK, seq);
        }
        commit_copies();
        wait_copies<1>();
        __syncthreads();

        float s[BLOCK / 8][4] = {}, dp[BLOCK / 8][4] = {};
#pragma unroll
        for (int d = 0; d < D_STEPS; d++) {
            u32 a_q[4], a_do[4];
            load_a(a_q, q_tile, warp * 16, d * 16, lane);
            load_a(a_do, do_tile, warp * 16, d * 16, lane);
#pragma unroll
            for (int n = 0; n < BLOCK / 8; n += 2) {
                u32 b[4];
                load_b_transposed(b, k_tile, n * 8, d * 16, lane);
                mma(s[n], a_q, b[0], b[1]);
                mma(s[n + 1], a_q, b[2], b[3]);
                load_b_transposed(b, v_tile, n * 8, d * 16, lane);
                mma(dp[n], a_do, b[0], b[1]);
                mma(dp[n + 1], a_do, b[2], b[3]);
            }
        }
        const bool diagonal = key_block == query_block;
#pragma unroll
        for (int n = 0; n < BLOCK / 8; n++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int r = i / 2;
                int key = key_block * BLOCK + n * 8 + 2 * (lane % 4) + i % 2;
                float prob = diagonal && key > query + 8 * r
                                 ? 0.0f
                                 : exp2_approx(s[n][i] * scale_log2 - row_lse[row + 8 * r]);
                s[n][i] = prob * (dp[n][i] - row_delta[row + 8 * r]);
            }
        }
#pragma unroll
        for (int kk = 0; kk < BLOCK / 16; kk++) {
            u32 a[4];
            accumulators_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < D_TILES; n += 2) {
                u32 b[4];
                load_b(b, k_tile, n * 8, kk * 16, lane);
                mma(acc[n], a, b[0], b[1]);
                mma(acc[n + 1], a, b[2], b[3]);
            }
        }
        // Every warp is done with this block's buffers before the one after next lands in them.
        __syncthreads();
    }
    // dq is contiguous [batch, heads, seq, HEAD_DIM].
    store_rows(dq + ((u64)batch * p.heads + head) * seq * HEAD_DIM, HEAD_DIM, q0 + warp * 16, seq,
               acc, __uint_as_float((u32)p.scale_bits), lane);
}

// Keys' and values' gradient: per key block of a key/value head, over the query heads sharing it
// and the query blocks that see it (the block's steps), in halves of 32 queries (to keep the
// accumulators in registers): Pᵀ, dv += Pᵀ·dO, dSᵀ = Pᵀ ∘ (v·dOᵀ - delta), dk += scale · dSᵀ·q.
// A step's queries, output gradient and statistics come in two buffers: the next step's land
// while this one's are used. Queries past `seq` read zeros (statistics too): their probability
// multiplies a zero output gradient and their dS is zero, so they add nothing.
#define HALF 32
extern "C" __global__ void __launch_bounds__(THREADS)
    attention_backward_dkdv(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                            const bf16 *__restrict__ v, const bf16 *__restrict__ d_o,
                            const float *__restrict__ lse, const float *__restrict__ delta,
                            bf16 *__restrict__ dk, bf16 *__restrict__ dv,
                            const __grid_constant__ Params p) {
    extern __shared__ uint4 shared_words[];
    bf16 *tiles = (bf16 *)shared_words;
    bf16 *k_tile = tiles, *v_tile = tiles + TILE, *q_tiles = tiles + 2 * TILE,
         *do_tiles = tiles + 4 * TILE;
    // Per buffer: the step's queries' log-sum-exp, then their delta.
    float *statistics = (float *)(tiles + 6 * TILE);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int seq = (int)p.seq;
    const int key_block = blockIdx.x;
    const int kv_head = blockIdx.y, batch = blockIdx.z;
    const int kv_heads = (int)(p.heads / p.groups);
    const int k0 = key_block * BLOCK;
    const int query_blocks = (seq + BLOCK - 1) / BLOCK;
    const int per_head = query_blocks - key_block, steps = (int)p.groups * per_head;
    const float scale_log2 = __uint_as_float((u32)p.scale_log2_bits);

    // Starts the copies of step `step`'s tiles and statistics into its buffer.
    auto fetch = [&](int step) {
        const int head = kv_head * (int)p.groups + step / per_head;
        const int q0 = (key_block + step % per_head) * BLOCK;
        const int buffer = step % 2;
        copy_tile(q_tiles + buffer * TILE, q + batch * p.q_stride[0] + head * p.q_stride[1],
                  p.q_stride[2], q0, seq);
        copy_tile(do_tiles + buffer * TILE, d_o + batch * p.do_stride[0] + head * p.do_stride[1],
                  p.do_stride[2], q0, seq);
        const int entry = threadIdx.x;
        if (entry < 2 * BLOCK) {
            const u64 at = ((u64)batch * p.heads + head) * seq + q0 + entry % BLOCK;
            const bool real = q0 + entry % BLOCK < seq;
            const float *from = (entry < BLOCK ? lse : delta) + (real ? at : 0);
            copy_async<4>(statistics + buffer * 2 * BLOCK + entry, from, real);
        }
    };
    copy_tile(k_tile, k + batch * p.k_stride[0] + kv_head * p.k_stride[1], p.k_stride[2], k0, seq);
    copy_tile(v_tile, v + batch * p.v_stride[0] + kv_head * p.v_stride[1], p.v_stride[2], k0, seq);
    fetch(0);
    commit_copies();

    float dk_acc[D_TILES][4] = {}, dv_acc[D_TILES][4] = {};
    const int key = k0 + warp * 16 + lane / 4;
    for (int step = 0; step < steps; step++) {
        if (step + 1 < steps) fetch(step + 1);
        commit_copies();
        wait_copies<1>();
        __syncthreads();
        const int buffer = step % 2;
        const bf16 *q_tile = q_tiles + buffer * TILE, *do_tile = do_tiles + buffer * TILE;
        const float *column_lse = statistics + buffer * 2 * BLOCK,
                    *column_delta = column_lse + BLOCK;
        const int q0 = (key_block + step % per_head) * BLOCK;
        const bool diagonal = q0 == k0;
#pragma unroll
        for (int half = 0; half < BLOCK / HALF; half++) {
            float s[HALF / 8][4] = {}, dp[HALF / 8][4] = {};
#pragma unroll
            for (int d = 0; d < D_STEPS; d++) {
                u32 a_k[4], a_v[4];
                load_a(a_k, k_tile, warp * 16, d * 16, lane);
                load_a(a_v, v_tile, warp * 16, d * 16, lane);
#pragma unroll
                for (int n = 0; n < HALF / 8; n += 2) {
                    u32 b[4];
                    load_b_transposed(b, q_tile, half * HALF + n * 8, d * 16, lane);
                    mma(s[n], a_k, b[0], b[1]);
                    mma(s[n + 1], a_k, b[2], b[3]);
                    load_b_transposed(b, do_tile, half * HALF + n * 8, d * 16, lane);
                    mma(dp[n], a_v, b[0], b[1]);
                    mma(dp[n + 1], a_v, b[2], b[3]);
                }
            }
#pragma unroll
            for (int n = 0; n < HALF / 8; n++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    int column = half * HALF + n * 8 + 2 * (lane % 4) + i % 2;
                    int query = q0 + column;
                    float prob = diagonal && key + 8 * (i / 2) > query
                                     ? 0.0f
                                     : exp2_approx(s[n][i] * scale_log2 - column_lse[column]);
                    s[n][i] = prob;
                    dp[n][i] = prob * (dp[n][i] - column_delta[column]);
                }
            }
#pragma unroll
            for (int kk = 0; kk < HALF / 16; kk++) {
                u32 a_p[4], a_ds[4];
                accumulators_to_a(a_p, s[2 * kk], s[2 * kk + 1]);
                accumulators_to_a(a_ds, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
                for (int n = 0; n < D_TILES; n += 2) {
                    u32 b[4];
                    load_b(b, do_tile, n * 8, half * HALF + kk * 16, lane);
                    mma(dv_acc[n], a_p, b[0], b[1]);
                    mma(dv_acc[n + 1], a_p, b[2], b[3]);
                    load_b(b, q_tile, n * 8, half * HALF + kk * 16, lane);
                    mma(dk_acc[n], a_ds, b[0], b[1]);
                    mma(dk_acc[n + 1], a_ds, b[2], b[3]);
                }
            }
        }
        // Every warp is done with this step's buffer before the one after next lands in it.
        __syncthreads();
    }
    // dk is contiguous [batch, kv_heads, seq, HEAD_DIM]; dv [batch, seq, kv_heads, HEAD_DIM], as
    // the value projection's output is laid out.
    store_rows(dk + ((u64)batch * kv_heads + kv_head) * seq * HEAD_DIM, HEAD_DIM, k0 + warp * 16,
               seq, dk_acc, __uint_as_float((u32)p.scale_bits), lane);
    store_rows(dv + ((u64)batch * seq * kv_heads + kv_head) * HEAD_DIM, (u64)kv_heads * HEAD_DIM,
               k0 + warp * 16, seq, dv_acc, 1.0f, lane);
}
