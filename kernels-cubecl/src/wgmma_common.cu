// What the hand-written `wgmma` kernels share (`wgmma.cu`, `wgmma_4bit.cu`, each compiled behind
// this text): types, shared-memory addresses, the K-major operand descriptor, the `mbarrier`s
// of the TMA ring, the box copy, the accumulator's wait and bf16 packing.

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

// Waits until at most `pending` of this warpgroup's MMA groups are in flight; the accumulators
// are operands so no read of them moves above.
#define MMA_WAIT(pending) \
    asm volatile("wgmma.wait_group.sync.aligned " STRING(pending) ";\n" : ACC_OPERANDS : : "memory")

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

// Row `row` of the hidden H ([rows, LOW_RANK] bf16, as u32 pairs) as f32, in 16-byte vectors.
static __device__ __forceinline__ void load_hidden(float (&hidden)[LOW_RANK], const u32 *h,
                                                   int row) {
    const uint4 *at = (const uint4 *)(h + (u64)row * LOW_RANK / 2);
#pragma unroll
    for (int v = 0; v < LOW_RANK / 8; v++) {
        const uint4 pairs = at[v];
        const u32 words[4] = {pairs.x, pairs.y, pairs.z, pairs.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            hidden[8 * v + 2 * i] = unpack_low(words[i]);
            hidden[8 * v + 2 * i + 1] = unpack_high(words[i]);
        }
    }
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

// A ring of STAGES stages' barriers, set up by the block's first thread (the caller synchronizes
// the block after): full[s] completes on the producer's arrival and the stage's bytes, empty[s]
// once all `consumers` threads have arrived.
static __device__ __forceinline__ void init_ring(u32 full_barriers, u32 empty_barriers,
                                                 u32 consumers) {
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; s++) {
            barrier_init(full_barriers + 8 * s, 1);
            barrier_init(empty_barriers + 8 * s, consumers);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
}

// The producer's turn at step `step`'s stage: waits until the consumers freed it (from the
// ring's second round on), arms its full barrier for `bytes`, and returns that barrier.
static __device__ __forceinline__ u32 acquire_stage(int step, u32 full_barriers,
                                                    u32 empty_barriers, u32 bytes) {
    const int s = step % STAGES;
    if (step >= STAGES) {
        barrier_wait(empty_barriers + 8 * s, (step / STAGES - 1) & 1);
    }
    barrier_expect(full_barriers + 8 * s, bytes);
    return full_barriers + 8 * s;
}
