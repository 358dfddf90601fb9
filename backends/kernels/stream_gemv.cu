// Batch-1 GEMV whose weights stream into shared memory through Hopper's bulk copies (sm_90+), compiled at run time
// by NVRTC (backends/kernels/stream_gemv.py). One program per SM owns ROWS_PER_CTA whole rows: their bytes are one
// contiguous range, which a producer warp copies chunk by chunk (ROWS rows each, with the same rows of U when
// GATED) into a ring of STAGES shared-memory buffers, while CONSUMERS warps multiply the chunks already there.
//
// Why: the weights never depend on the previous kernel. Launched with programmatic dependent launch, the producer
// fills the whole ring before the predecessor has finished (it never waits for it), so the weight stream goes on
// across the launch boundary; only the consumers wait (griddepcontrol.wait) before reading x.
//
//   y[n] = sum_k W[n, k] x'[k]                 x' = x * (norm_w + NORM_OFFSET) when HAS_NORM; y *= rstd(x)
//   GATED: y = act(W . x') * (U . x')          ACT 0 = silu, 1 = gelu_tanh
//   OUT_KIND 0: out fp32 = y; 1: out bf16 = y; 2: out fp16 = y; 3: out fp32 += y (each row has one
//   owner, so one reduction per element: the same sum as a load and store, without waiting for the load)
//   ARGMAX: each program also writes its largest output and the first row holding it (NaN counts as the largest)
//
// Compile-time constants (-D): K, WT_BF16 (weights bf16, else fp16), X_KIND (0 fp32, 1 bf16, 2 fp16), HAS_NORM,
// GATED, ACT, OUT_KIND, ARGMAX, ROWS, SPLIT (warps per row; ROWS * SPLIT == CONSUMERS), STAGES; STAMPS (a
// measurement, off by default: each program writes the GPU's %globaltimer to stamps[program * 64 + i], see below).
// Each consumer warp owns one (row of a chunk, K/SPLIT columns) pair for the whole kernel, so its share of x' stays
// in registers: K % (256 * SPLIT) == 0.

#define CONSUMERS (ROWS * SPLIT)
#define PART (K / SPLIT)
#define VPL (PART / 256)  // 16-byte vectors (8 weights) per lane per row
#define MATS (GATED ? 2 : 1)
#define CHUNK_BYTES (ROWS * K * 2)
#define STAGE_BYTES (CHUNK_BYTES * MATS)

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef STAMPS
#define STAMPS 0
#endif
// stamps (benchmarks/gpu_profile.py --stamps): 0 the program starts, 1 its consumers passed the dependency wait,
// 2 x' is in registers, 3 the chunks issued at the start are consumed, 4 the last chunk arrived, 5 the outputs are
// written, 6 the first ring is issued, 7 the SM's number, 8 + c (c < 54) chunk c's wait returned (consumer thread 0),
// 62 the chunks issued at the start have all arrived (or the consumers passed their wait, if that was later)
#if STAMPS
#define STAMP(i) \
    do { u64 t_; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)); stamps[blockIdx.x * 64 + (i)] = t_; } while (0)
#else
#define STAMP(i) do { } while (0)
#endif

static_assert(K % (256 * SPLIT) == 0, "K must be a multiple of 256 * SPLIT");

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    asm volatile(
        "{\n .reg .pred done;\n"
        "WAIT_%=:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        " @!done bra WAIT_%=;\n"
        "}" :: "r"(smem_addr(bar)), "r"(parity) : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, u64* bar, u64 policy) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
        :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy) : "memory");
}

__device__ __forceinline__ float lo_f(u32 v) {
#if WT_BF16
    return __uint_as_float(v << 16);
#else
    float f; asm("{ .reg .b16 h; mov.b32 {h, _}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(v)); return f;
#endif
}

__device__ __forceinline__ float hi_f(u32 v) {
#if WT_BF16
    return __uint_as_float(v & 0xffff0000u);
#else
    float f; asm("{ .reg .b16 h; mov.b32 {_, h}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(v)); return f;
#endif
}

__device__ __forceinline__ float u16_to_f(u16 v, bool bf16) {
    if (bf16) return __uint_as_float(((u32)v) << 16);
    float f; asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(v)); return f;
}

__device__ __forceinline__ float dot8(uint4 w, const float* x) {
    float a = lo_f(w.x) * x[0];
    a = fmaf(hi_f(w.x), x[1], a);
    a = fmaf(lo_f(w.y), x[2], a);
    a = fmaf(hi_f(w.y), x[3], a);
    a = fmaf(lo_f(w.z), x[4], a);
    a = fmaf(hi_f(w.z), x[5], a);
    a = fmaf(lo_f(w.w), x[6], a);
    return fmaf(hi_f(w.w), x[7], a);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float act(float g) {
#if ACT == 0
    return g / (1.0f + __expf(-g));
#else
    float z = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (2.0f / (1.0f + __expf(-2.0f * z)));
#endif
}

extern "C" __global__ void __launch_bounds__((CONSUMERS + 1) * 32, 2)
stream_gemv(const u16* __restrict__ w, const u16* __restrict__ u, const void* __restrict__ x_ptr,
            const u16* __restrict__ norm_w, void* __restrict__ out, float* __restrict__ amax, int* __restrict__ aidx,
            int n_rows, int rows_per_cta, float eps, float norm_offset, u64* __restrict__ stamps) {
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ring = smem;
    u64* full = (u64*)(smem + STAGES * STAGE_BYTES);
    u64* empty = full + STAGES;
    float* red = (float*)(empty + STAGES);          // [32]: sums of squares
    float* red_v = red + 32;                        // [32]: the argmax reduction
    int* red_i = (int*)(red_v + 32);                // [32]
    float* part = (float*)(red_i + 32);             // [rows_per_cta][SPLIT][MATS] partial sums

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * rows_per_cta;
    const int rows = min(rows_per_cta, n_rows - row0);
    const int chunks = (rows + ROWS - 1) / ROWS;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (warp == CONSUMERS) {  // the producer warp: never waits for the previous kernel
        u64 policy = 0;
        // chunk c (its rows of W, and of U when gated) into stage c % STAGES, completing that stage's barrier
        auto issue = [&](int c) {
            const int s = c % STAGES;
            const int nr = min(ROWS, rows - c * ROWS);
            const size_t off = (size_t)(row0 + c * ROWS) * K;
            mbar_expect_tx(&full[s], nr * K * 2 * MATS);
            bulk_copy(ring + s * STAGE_BYTES, w + off, nr * K * 2, &full[s], policy);
#if GATED
            bulk_copy(ring + s * STAGE_BYTES + CHUNK_BYTES, u + off, nr * K * 2, &full[s], policy);
#endif
        };
        if (lane == 0) {
            STAMP(0);
            asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
            for (int c = 0; c < chunks && c < STAGES; ++c) issue(c);
            STAMP(6);
#if STAMPS
            u32 sm; asm volatile("mov.u32 %0, %%smid;" : "=r"(sm)); stamps[blockIdx.x * 64 + 7] = sm;
#endif
        }
        // the consumers have passed their dependency wait: our successor may launch now (its own early loads then
        // see everything before us complete)
        asm volatile("bar.sync 1, %0;" :: "r"((CONSUMERS + 1) * 32) : "memory");
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#if STAMPS
        if (lane == 1) {
            mbar_wait(&full[min(chunks, STAGES) - 1], 0);
            STAMP(62);
        }
#endif
        if (lane == 0) {
            for (int c = STAGES; c < chunks; ++c) {
                mbar_wait(&empty[c % STAGES], ((c / STAGES) - 1) & 1);  // the consumers are done with that stage
                issue(c);
            }
        }
        return;
    }

    // ---- consumers ----
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("bar.arrive 1, %0;" :: "r"((CONSUMERS + 1) * 32) : "memory");
    if (threadIdx.x == 0) STAMP(1);

    const int r = warp / SPLIT, p = warp % SPLIT;  // this warp's row within a chunk and its K part
    float xr[VPL][8];
    float ss = 0.0f;
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
        const int k0 = p * PART + (lane + 32 * v) * 8;
#if X_KIND == 0
        const float4 a = *(const float4*)((const float*)x_ptr + k0);
        const float4 b = *(const float4*)((const float*)x_ptr + k0 + 4);
        xr[v][0] = a.x; xr[v][1] = a.y; xr[v][2] = a.z; xr[v][3] = a.w;
        xr[v][4] = b.x; xr[v][5] = b.y; xr[v][6] = b.z; xr[v][7] = b.w;
#else
        const uint4 q = *(const uint4*)((const u16*)x_ptr + k0);
        const u32 qs[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            xr[v][2 * e] = u16_to_f((u16)(qs[e] & 0xffffu), X_KIND == 1);
            xr[v][2 * e + 1] = u16_to_f((u16)(qs[e] >> 16), X_KIND == 1);
        }
#endif
#if HAS_NORM
        const uint4 nq = *(const uint4*)(norm_w + k0);
        const u32 ns[4] = {nq.x, nq.y, nq.z, nq.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            ss = fmaf(xr[v][2 * e], xr[v][2 * e], ss);
            ss = fmaf(xr[v][2 * e + 1], xr[v][2 * e + 1], ss);
            xr[v][2 * e] *= lo_f(ns[e]) + norm_offset;
            xr[v][2 * e + 1] *= hi_f(ns[e]) + norm_offset;
        }
#endif
    }
#if HAS_NORM
    ss = warp_sum(ss);
    if (r == 0 && lane == 0) red[p] = ss;  // the SPLIT warps of row 0 cover all of K once
#endif
    if (threadIdx.x == 0) STAMP(2);

    for (int c = 0; c < chunks; ++c) {
        const int s = c % STAGES;
        mbar_wait(&full[s], (c / STAGES) & 1);
        if (threadIdx.x == 0 && c == chunks - 1) STAMP(4);
        if (threadIdx.x == 0 && c < 54) STAMP(8 + c);
        if (c * ROWS + r < rows) {
            const uint4* wv = (const uint4*)(ring + s * STAGE_BYTES + (r * K + p * PART) * 2);
            float acc = 0.0f;
#if GATED
            const uint4* uv = (const uint4*)(ring + s * STAGE_BYTES + CHUNK_BYTES + (r * K + p * PART) * 2);
            float acc_u = 0.0f;
#endif
#pragma unroll
            for (int v = 0; v < VPL; ++v) {
                acc += dot8(wv[lane + 32 * v], xr[v]);
#if GATED
                acc_u += dot8(uv[lane + 32 * v], xr[v]);
#endif
            }
            acc = warp_sum(acc);
#if GATED
            acc_u = warp_sum(acc_u);
#endif
            if (lane == 0) {
                float* dst = part + ((c * ROWS + r) * SPLIT + p) * MATS;
                dst[0] = acc;
#if GATED
                dst[1] = acc_u;
#endif
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[s]);
        if (threadIdx.x == 0 && c == min(chunks, STAGES) - 1) STAMP(3);
    }

    // ---- epilogue: every consumer thread finishes rows ----
    asm volatile("bar.sync 2, %0;" :: "r"(CONSUMERS * 32) : "memory");
    float rstd = 1.0f;
#if HAS_NORM
    {
        float t = 0.0f;
        for (int i = 0; i < SPLIT; ++i) t += red[i];
        rstd = rsqrtf(t / (float)K + eps);
    }
#endif
    float best = -__int_as_float(0x7f800000);
    int best_row = n_rows;
    for (int i = threadIdx.x; i < rows; i += CONSUMERS * 32) {
        float y = 0.0f;
#if GATED
        float yu = 0.0f;
#endif
        for (int q = 0; q < SPLIT; ++q) {
            y += part[(i * SPLIT + q) * MATS];
#if GATED
            yu += part[(i * SPLIT + q) * MATS + 1];
#endif
        }
        y *= rstd;
#if GATED
        y = act(y) * (yu * rstd);
#endif
        const int n = row0 + i;
#if OUT_KIND == 0
        ((float*)out)[n] = y;
#elif OUT_KIND == 1
        u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(y)); ((u16*)out)[n] = h;
#elif OUT_KIND == 2
        u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(y)); ((u16*)out)[n] = h;
#else
        atomicAdd((float*)out + n, y);  // result unused: a fire-and-forget red.global.add (subnormal sums flush)
#endif
#if ARGMAX
        const float v = (y != y) ? __int_as_float(0x7f800000) : y;  // NaN counts as the largest, as in torch.argmax
        if (v > best || (v == best && n < best_row)) { best = v; best_row = n; }
#endif
    }
#if ARGMAX
    // block argmax over the consumer threads: the largest value, then the smallest row holding it
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int orow = __shfl_xor_sync(0xffffffffu, best_row, o);
        if (ov > best || (ov == best && orow < best_row)) { best = ov; best_row = orow; }
    }
    if (lane == 0) { red_v[warp] = best; red_i[warp] = best_row; }
    asm volatile("bar.sync 2, %0;" :: "r"(CONSUMERS * 32) : "memory");
    if (threadIdx.x == 0) {
        for (int i = 1; i < CONSUMERS; ++i)
            if (red_v[i] > best || (red_v[i] == best && red_i[i] < best_row)) { best = red_v[i]; best_row = red_i[i]; }
        amax[blockIdx.x] = best;
        aidx[blockIdx.x] = best_row;
    }
#endif
#if STAMPS
    asm volatile("bar.sync 2, %0;" :: "r"(CONSUMERS * 32) : "memory");
    if (threadIdx.x == 0) STAMP(5);
#endif
}
