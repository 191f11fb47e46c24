// merge.cu — the LoRA merge on the GPU, the same arithmetic as lora-kernels/src/cpu.rs so both
// give the same bits:
//
//   out[r][c] = round16( (W[r][c] + Σ_j left[r][j] · right[j][c]) · factor )
//
// in f32, terms in j order, one multiply and one add each (no fused multiply-add: __fmul_rn
// and __fadd_rn), terms whose `left` is 0 skipped; `factor` is DoRA's m/‖W+ΔW‖ (per stored row,
// or per stored column when the weight is stored transposed), 1 without DoRA. W is BF16, F16
// or F32; the output BF16 (round to nearest even, NaN made quiet) or F16 (cvt.rn).
//
// Launch: block (256), grid (ceil(cols / 256), min(rows, 65535)); rows are strided by
// gridDim.y. `base` and `out` hold the block of `rows` rows starting at stored row
// `first_row`; `left` is indexed by the stored row within the whole tensor.

// F16 conversions through the PTX instructions on the device; compiled for the host (the
// kernels' host emulation in lora-kernels' tests) they come from that test's shim.
__device__ __forceinline__ float ws_f16_to_f32(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return ws_host_f16_to_f32(h);
#endif
}

__device__ __forceinline__ unsigned short ws_f32_to_f16(float v) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else
    return ws_host_f32_to_f16(v);
#endif
}

extern "C" __device__ float ws_load(const void* base, int kind, long long i) {
    if (kind == 2) {
        return ((const float*)base)[i];
    }
    unsigned short h = ((const unsigned short*)base)[i];
    if (kind == 0) {
        return __int_as_float(((unsigned int)h) << 16);
    }
    return ws_f16_to_f32(h);
}

extern "C" __device__ unsigned short ws_round16(float v, int kind) {
    if (kind == 1) {
        return ws_f32_to_f16(v);
    }
    unsigned int bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((bits >> 16) | 0x0040u);
    }
    unsigned int rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (unsigned short)((bits + rounding) >> 16);
}

// 16-bit decoding and ws_round16 without a branch on the kind: both computed, one selected (a
// branch per element on a uniform kind cost the vector kernels several instructions each).
__device__ __forceinline__ float ws_decode16_sel(unsigned short h, int kind) {
    float b = __int_as_float(((unsigned int)h) << 16);
    float f = ws_f16_to_f32(h);
    return kind == 0 ? b : f;
}

__device__ __forceinline__ unsigned short ws_round16_sel(float v, int kind) {
    unsigned short h = ws_f32_to_f16(v);
    unsigned int bits = __float_as_uint(v);
    unsigned int rounding = 0x7fffu + ((bits >> 16) & 1u);
    unsigned short b = (bits & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((bits >> 16) | 0x0040u)
                                                          : (unsigned short)((bits + rounding) >> 16);
    return kind == 1 ? h : b;
}

extern "C" __global__ void lora_merge(
    const void* base, int base_kind,
    const float* left, const float* right, int rank,
    const float* factors, int factor_per_column,
    unsigned short* out, int out_kind,
    long long rows, long long cols, long long first_row)
{
    long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) {
        return;
    }
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        long long i = r * cols + c;
        long long row = first_row + r;
        float acc = ws_load(base, base_kind, i);
        if (left != 0) {
            for (int j = 0; j < rank; ++j) {
                float l = left[row * rank + j];
                if (l != 0.0f) {
                    acc = __fadd_rn(acc, __fmul_rn(l, right[(long long)j * cols + c]));
                }
            }
        }
        if (factors != 0) {
            acc = __fmul_rn(acc, factor_per_column ? factors[c] : factors[row]);
        }
        out[i] = ws_round16(acc, out_kind);
    }
}

// lora_merge_v8: the same arithmetic, eight columns per thread with 16-byte loads and stores
// of W and out (a thread's two-byte accesses leave the memory system mostly idle), and
// WS_ROWS rows per thread, so each 32-byte run of `right` is loaded once per term for all of
// them (loading it once per row made the kernel bound by those loads: 830 GB/s at r = 16 and
// 230 GB/s at r = 64 on an H100, against 2.9 TB/s for a plain copy). Each element still sums
// its terms in j order, one multiply and one add each, skipping zero `left` values: the bits
// are those of lora_merge. Full row groups of a rank divisible by 4 take four terms per step
// (one 16-byte load of each row's `left` values, all four runs of `right` in flight together,
// where one dependent load per term left the loop waiting on latency: on an H200, 14336 × 4096
// BF16, 1.29 -> 1.48 TB/s at r = 16 and 0.38 -> 0.52 at r = 64). Tried and slower there:
// 8 rows per thread (0.84 / 0.36 TB/s), blocks of 8 × 32 threads so a block's warps share 64
// columns of `right` in L1 (1.37 / 0.51). Three blocks of 256 threads per SM
// (__launch_bounds__: 80 registers, a few bytes spilled, where the compiler took 96-119 and
// fit two) with per-column DoRA factors loaded once per thread and the 16-bit conversions
// without a branch per element: 14336 × 4096, 1.47 -> 1.55 TB/s at r = 16, 0.91 -> 0.96 at
// r = 32, 0.52 -> 0.53 at r = 64 (the conversions alone, at 119 registers, were slower:
// 1.39 / 0.86 / 0.50). For
// 16-bit W with cols % 8 == 0; `left` 16-byte aligned (its own allocation).
// Launch: block (256), grid (ceil(cols / 8 / 256), min(ceil(rows / WS_ROWS), 65535)); row
// groups are strided by gridDim.y.
#ifndef WS_ROWS
#define WS_ROWS 4
#endif
// One term: a multiply and an add, each rounded. -DWS_FMA_PROBE makes it one fused multiply-add
// to measure what the bit-exact arithmetic costs (other bits than the CPU's: never built by
// the xtask, only by scripts/device-load-probe.sh). On an H200, 14336 × 4096 BF16: 1.65 TB/s
// at r = 16 and 0.63 at r = 64 against 1.48 and 0.52, so the separate rounding is not what
// keeps the kernel from the 3.99 TB/s of a device copy.
#ifdef WS_FMA_PROBE
#define WS_TERM(acc, l, r) __fmaf_rn((l), (r), (acc))
#else
#define WS_TERM(acc, l, r) __fadd_rn((acc), __fmul_rn((l), (r)))
#endif

__device__ __forceinline__ void ws_unpack8(uint4 w, int kind, float* acc) {
    unsigned short h[8];
    h[0] = (unsigned short)(w.x & 0xffffu); h[1] = (unsigned short)(w.x >> 16);
    h[2] = (unsigned short)(w.y & 0xffffu); h[3] = (unsigned short)(w.y >> 16);
    h[4] = (unsigned short)(w.z & 0xffffu); h[5] = (unsigned short)(w.z >> 16);
    h[6] = (unsigned short)(w.w & 0xffffu); h[7] = (unsigned short)(w.w >> 16);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        acc[e] = ws_decode16_sel(h[e], kind);
    }
}

__device__ __forceinline__ uint4 ws_pack8(const float* acc, int kind) {
    unsigned short o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        o[e] = ws_round16_sel(acc[e], kind);
    }
    uint4 v;
    v.x = (unsigned int)o[0] | ((unsigned int)o[1] << 16);
    v.y = (unsigned int)o[2] | ((unsigned int)o[3] << 16);
    v.z = (unsigned int)o[4] | ((unsigned int)o[5] << 16);
    v.w = (unsigned int)o[6] | ((unsigned int)o[7] << 16);
    return v;
}

__device__ __forceinline__ void ws_merge_v8(
    const unsigned short* base, int base_kind,
    const float* left, const float* right, int rank,
    const float* factors, int factor_per_column,
    unsigned short* out, int out_kind,
    long long rows, long long cols, long long first_row)
{
    long long c = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (c >= cols) {
        return;
    }
    // DoRA factors per column are this thread's eight, loaded once.
    float fcol[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        fcol[e] = factors != 0 && factor_per_column ? factors[c + e] : 1.0f;
    }
    for (long long r0 = (long long)blockIdx.y * WS_ROWS; r0 < rows; r0 += (long long)gridDim.y * WS_ROWS) {
        int n = rows - r0 < WS_ROWS ? (int)(rows - r0) : WS_ROWS;
        float acc[WS_ROWS][8];
#pragma unroll
        for (int k = 0; k < WS_ROWS; ++k) {
            if (k < n) {
                ws_unpack8(*(const uint4*)(base + (r0 + k) * cols + c), base_kind, acc[k]);
            }
        }
        if (left != 0) {
            int j = 0;
            if (n == WS_ROWS && (rank & 3) == 0) {
                // Four terms at a time: each row's four `left` values in one 16-byte load,
                // the four runs of `right` loaded together, so the loads of a step are in
                // flight at once instead of one dependent load per term. Rows whose four
                // values are all non-zero (the usual case) add them without a test each.
                const float* lp = left + (first_row + r0) * rank;
                for (; j < rank; j += 4) {
                    float4 lv[WS_ROWS];
#pragma unroll
                    for (int k = 0; k < WS_ROWS; ++k) {
                        lv[k] = *(const float4*)(lp + (long long)k * rank + j);
                    }
                    float rv[4][8];
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float4* rj = (const float4*)(right + (long long)(j + q) * cols + c);
                        float4 a = rj[0];
                        float4 b = rj[1];
                        rv[q][0] = a.x; rv[q][1] = a.y; rv[q][2] = a.z; rv[q][3] = a.w;
                        rv[q][4] = b.x; rv[q][5] = b.y; rv[q][6] = b.z; rv[q][7] = b.w;
                    }
#pragma unroll
                    for (int k = 0; k < WS_ROWS; ++k) {
                        float l[4] = {lv[k].x, lv[k].y, lv[k].z, lv[k].w};
                        if (l[0] != 0.0f && l[1] != 0.0f && l[2] != 0.0f && l[3] != 0.0f) {
#pragma unroll
                            for (int q = 0; q < 4; ++q) {
#pragma unroll
                                for (int e = 0; e < 8; ++e) {
                                    acc[k][e] = WS_TERM(acc[k][e], l[q], rv[q][e]);
                                }
                            }
                        } else {
#pragma unroll
                            for (int q = 0; q < 4; ++q) {
                                if (l[q] != 0.0f) {
#pragma unroll
                                    for (int e = 0; e < 8; ++e) {
                                        acc[k][e] = WS_TERM(acc[k][e], l[q], rv[q][e]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for (; j < rank; ++j) {
                const float4* rj = (const float4*)(right + (long long)j * cols + c);
                float4 a = rj[0];
                float4 b = rj[1];
                float rv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int k = 0; k < WS_ROWS; ++k) {
                    if (k < n) {
                        float l = left[(first_row + r0 + k) * rank + j];
                        if (l != 0.0f) {
#pragma unroll
                            for (int e = 0; e < 8; ++e) {
                                acc[k][e] = WS_TERM(acc[k][e], l, rv[e]);
                            }
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int k = 0; k < WS_ROWS; ++k) {
            if (k < n) {
                long long row = first_row + r0 + k;
                if (factors != 0) {
                    float frow = factor_per_column ? 1.0f : factors[row];
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        acc[k][e] = __fmul_rn(acc[k][e], factor_per_column ? fcol[e] : frow);
                    }
                }
                *(uint4*)(out + (r0 + k) * cols + c) = ws_pack8(acc[k], out_kind);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 3) lora_merge_v8(
    const unsigned short* base, int base_kind,
    const float* left, const float* right, int rank,
    const float* factors, int factor_per_column,
    unsigned short* out, int out_kind,
    long long rows, long long cols, long long first_row)
{
    ws_merge_v8(base, base_kind, left, right, rank, factors, factor_per_column, out, out_kind,
                rows, cols, first_row);
}

// lora_merge_r16_c4u4: `right` held in registers, for dense products of rank <= 16. A thread
// owns C = 4 adjacent columns and keeps their values of `right` (R × C floats) in registers
// for a whole chunk of rows, so `right` is read once per thread, not once per row group. Per
// row it reads the row's `left` values (one 16-byte load per four terms, the same address for
// the whole warp) and W, adds the terms in j order, one multiply and one add each, and writes
// out: the bits of lora_merge. U = 4 rows are taken together, and the next U rows of W are
// loaded before the current ones are summed, so loads stay in flight.
// On an H200 (BF16, r = 16, 1024 blocks): 14336 × 4096 1.57 TB/s, 4096 × 14336 1.60,
// 4096 × 4096 1.31, against lora_merge_v8's 1.47 / 1.45 / 1.29 before this change and torch's
// addmm at 1.48 / 1.47 / 1.54 (scripts/device-kernel-rate.sh). Tried there and slower, so not
// kept: 2 columns per thread (1.15 TB/s), 8 rows per step (0.65), rank bounds 32 and 64 (0.71
// and 0.28 TB/s at their ranks against lora_merge_v8's 0.91 and 0.52: with fewer columns per
// thread, one load of `left` serves too little arithmetic), an L1 prefetch of the next rows'
// `left` (slower by 2-15 %) and variants for exactly one rank (no faster).
// The kernel is bound by issuing instructions, not by memory: 2·rank separately rounded
// floating-point operations per element (the CPU's bits) put the ceiling of any such kernel
// near 3.2 TB/s at r = 16, 1.8 at r = 32 and 1.0 at r = 64 on an H200 (528 schedulers at
// 1.98 GHz, one instruction a cycle each), against 4.0 TB/s for a plain device copy.
// For 16-bit W with cols % C == 0, rank % 4 == 0 and rank <= R, and a `left` with no zero
// (the host checks: terms with a zero coefficient are skipped by the CPU, and these kernels
// have no test per term); `left` 16-byte aligned.
// Launch: block (256), grid (ceil(cols / C / 256), chunks); chunk y takes rows
// [y·per, (y+1)·per) with per = ceil(rows / gridDim.y).

// Four 16-bit values of W or out, moved as one 8-byte access.
template <int C> struct ws_raw;
template <> struct ws_raw<4> {
    uint2 v;
    __device__ __forceinline__ void load(const unsigned short* p) { v = *(const uint2*)p; }
    __device__ __forceinline__ unsigned short at(int e) const {
        return (unsigned short)((e < 2 ? v.x : v.y) >> (16 * (e & 1)));
    }
    __device__ __forceinline__ void set(int e, unsigned short h) {
        unsigned int& w = e < 2 ? v.x : v.y;
        w = (e & 1) == 0 ? (w & 0xffff0000u) | h : (w & 0xffffu) | ((unsigned int)h << 16);
    }
    __device__ __forceinline__ void store(unsigned short* p) const { *(uint2*)p = v; }
};

template <int R, int C, int U>
__device__ __forceinline__ void ws_merge_rr(
    const unsigned short* __restrict__ base, int base_kind,
    const float* __restrict__ left, const float* __restrict__ right, int rank,
    const float* __restrict__ factors, int factor_per_column,
    unsigned short* __restrict__ out, int out_kind,
    long long rows, long long cols, long long first_row)
{
    long long c = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * C;
    if (c >= cols) {
        return;
    }
    long long per = (rows + gridDim.y - 1) / gridDim.y;
    long long r0 = (long long)blockIdx.y * per;
    long long r1 = r0 + per < rows ? r0 + per : rows;
    if (r0 >= r1) {
        return;
    }
    float rv[R][C];
#pragma unroll
    for (int j = 0; j < R; ++j) {
#pragma unroll
        for (int e = 0; e < C; ++e) {
            rv[j][e] = j < rank ? right[(long long)j * cols + c + e] : 0.0f;
        }
    }
    float fc[C];
#pragma unroll
    for (int e = 0; e < C; ++e) {
        fc[e] = factors != 0 && factor_per_column ? factors[c + e] : 1.0f;
    }
    // Row k of a group past the chunk's end repeats the group's last row (computed, not
    // stored), so no load leaves the tensor.
    ws_raw<C> next[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
        long long row = r0 + k < r1 ? r0 + k : r1 - 1;
        next[k].load(base + row * cols + c);
    }
    for (long long r = r0; r < r1; r += U) {
        float acc[U][C];
#pragma unroll
        for (int k = 0; k < U; ++k) {
#pragma unroll
            for (int e = 0; e < C; ++e) {
                acc[k][e] = ws_decode16_sel(next[k].at(e), base_kind);
            }
        }
        long long rn = r + U;
        if (rn < r1) {
#pragma unroll
            for (int k = 0; k < U; ++k) {
                long long row = rn + k < r1 ? rn + k : r1 - 1;
                next[k].load(base + row * cols + c);
            }
        }
        const float* lp[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
            long long row = r + k < r1 ? r + k : r1 - 1;
            lp[k] = left + (first_row + row) * rank;
        }
#pragma unroll
        for (int j = 0; j < R; j += 4) {
            if (j >= rank) {
                break;
            }
            float4 lv[U];
#pragma unroll
            for (int k = 0; k < U; ++k) {
                lv[k] = *(const float4*)(lp[k] + j);
            }
#pragma unroll
            for (int k = 0; k < U; ++k) {
                float l[4] = {lv[k].x, lv[k].y, lv[k].z, lv[k].w};
#pragma unroll
                for (int q = 0; q < 4; ++q) {
#pragma unroll
                    for (int e = 0; e < C; ++e) {
                        acc[k][e] = WS_TERM(acc[k][e], l[q], rv[j + q][e]);
                    }
                }
            }
        }
#pragma unroll
        for (int k = 0; k < U; ++k) {
            if (r + k < r1) {
                float f = factors != 0 && !factor_per_column ? factors[first_row + r + k] : 1.0f;
                ws_raw<C> o;
#pragma unroll
                for (int e = 0; e < C; ++e) {
                    float v = acc[k][e];
                    if (factors != 0) {
                        v = __fmul_rn(v, factor_per_column ? fc[e] : f);
                    }
                    o.set(e, ws_round16_sel(v, out_kind));
                }
                o.store(out + (r + k) * cols + c);
            }
        }
    }
}

extern "C" __global__ void lora_merge_r16_c4u4(
    const unsigned short* base, int base_kind,
    const float* left, const float* right, int rank,
    const float* factors, int factor_per_column,
    unsigned short* out, int out_kind,
    long long rows, long long cols, long long first_row)
{
    ws_merge_rr<16, 4, 4>(base, base_kind, left, right, rank, factors, factor_per_column, out,
                          out_kind, rows, cols, first_row);
}
