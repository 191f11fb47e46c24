// merge.cu — the LoRA merge on the GPU, the same arithmetic as lora-kernels/src/cpu.rs so both
// give the same bits:
//
//   d         = Σ_j left[r][j] · right[j][c]     from +0, j in order, one fused multiply-add
//                                                 (__fmaf_rn, IEEE fma) per term, no term skipped
//   out[r][c] = round16( (W[r][c] + d) · factor )  one rounded add, one rounded multiply
//
// in f32; `factor` is DoRA's m/‖W+ΔW‖ (per stored row, or per stored column when the weight is
// stored transposed), none without DoRA; without a product (`left` null) the value is W itself.
// W is BF16, F16 or F32; the output BF16 (round to nearest even, NaN made quiet) or F16 (cvt.rn).
// The compiler may not contract or reassociate: every operation is an explicit _rn intrinsic.
//
// Every kernel takes the same parameters: `base` and `out` hold the block of `rows` rows
// starting at stored row `first_row`; `left` ([stored_rows][rank]) is indexed by the stored row
// within the whole tensor, `right` is [rank][cols].

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

// 16-bit decoding and rounding for a kind known at compile time: K = 0 BF16, 1 F16.
template <int K>
__device__ __forceinline__ float ws_decode(unsigned short h) {
    if (K == 0) {
        return __int_as_float(((unsigned int)h) << 16);
    }
    return ws_f16_to_f32(h);
}

template <int K>
__device__ __forceinline__ unsigned short ws_encode(float v) {
    if (K == 0) {
        unsigned int bits = __float_as_uint(v);
        unsigned int rounding = 0x7fffu + ((bits >> 16) & 1u);
        return (bits & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((bits >> 16) | 0x0040u)
                                                  : (unsigned short)((bits + rounding) >> 16);
    }
    return ws_f32_to_f16(v);
}

// The same for a kind chosen at run time (the one-element kernel); kind 2 of ws_load is F32.
extern "C" __device__ float ws_load(const void* base, int kind, long long i) {
    if (kind == 2) {
        return ((const float*)base)[i];
    }
    unsigned short h = ((const unsigned short*)base)[i];
    return kind == 0 ? ws_decode<0>(h) : ws_decode<1>(h);
}

extern "C" __device__ unsigned short ws_round16(float v, int kind) {
    return kind == 1 ? ws_encode<1>(v) : ws_encode<0>(v);
}

// lora_merge: one element per thread, any base dtype and width (F32 bases, widths not divisible
// by 4). Launch: block (256), grid (ceil(cols / 256), min(rows, 65535)); rows are strided by
// gridDim.y.
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
            float d = 0.0f;
            for (int j = 0; j < rank; ++j) {
                d = __fmaf_rn(left[row * rank + j], right[(long long)j * cols + c], d);
            }
            acc = __fadd_rn(acc, d);
        }
        if (factors != 0) {
            acc = __fmul_rn(acc, factor_per_column ? factors[c] : factors[row]);
        }
        out[i] = ws_round16(acc, out_kind);
    }
}

// lora_merge_tile_{bb,bh,hb,hh}: the merge as a register-tiled product, for 16-bit W with
// cols % 4 == 0 and any rank, one kernel per pair of base and output dtypes (b BF16, h F16:
// the conversions compiled for their kinds, not selected per element). A block of 256 threads
// owns a tile of 16·R rows × 64·H columns; thread (ty, tx) owns rows R·ty .. R·ty+R-1 and
// columns 4·tx .. 4·tx+3 of each 64-column group, so the warp's reads of the staged `right`
// are conflict-free and its accesses of W and out are 128-byte runs. The terms go through
// shared memory WS_KC at a time: the tile's `left` (transposed, so a thread reads its rows'
// coefficients as R/4 16-byte words; loaded four terms per 16-byte load where the rank allows)
// and `right`; per term a thread makes 4·R·H fused multiply-adds for R/4 + H shared loads. W
// is read after the terms are summed (it would hold registers through the sums), which is
// why d starts from +0 and W is added last.
// On an H200, BF16, r = 16 / 32 / 64 (scripts/device-kernel-rate.sh), 14336 × 4096:
// 1.70 / 1.31 / 0.85 TB/s, 4096 × 4096: 1.45 / 1.13 / 0.76, against 1.58 / 0.96 / 0.53 and
// 1.32 / - / 0.50 for the kernels before it (one multiply and one add per term, right in
// registers up to r = 16); torch's addmm 1.50 / 1.50 / 1.52 and a device copy 4.0. The loads
// of a stage, and of the tile's W, are all issued before the first is used: loading each W
// just before its use left the warps waiting on memory (1.54 / 1.25 / 0.80; the profile's
// main stall at r = 16 was the long scoreboard). Tried in the same runs and slower: 8 rows ×
// 8 columns a thread (1.11 / 0.97 / 0.71, two blocks per SM at 128 registers), 8 × 4
// (1.40 / 1.18 / 0.77), 4 × 4 (1.35 / 0.79 / 0.45), three blocks per SM with more registers
// (1.67 / 1.30 / 0.81), persistent blocks that keep `right` in shared memory for all their row
// tiles and load the next pass's `left` during the sums (at best 1.52 / 1.22 / 0.78), the
// conversions selected per element at run time (1-3 % slower). Ranks above ~20 are bound by
// the fused multiply-adds themselves: r per element, 33.5 T a second on an H200, so at r = 64
// no exact f32 kernel passes ~2.1 TB/s.
// Launch: block (256), grid (ceil(cols / (64·H)), min(ceil(rows / (16·R)), 65535)); row tiles
// are strided by gridDim.y.
#define WS_KC 32

template <int R, int H, int BK, int OK>
__device__ __forceinline__ void ws_merge_tile(
    const unsigned short* base, const float* left, const float* right, int rank,
    const float* factors, int factor_per_column, unsigned short* out,
    long long rows, long long cols, long long first_row)
{
    __shared__ float4 ls[WS_KC][(16 * R) / 4];
    __shared__ float4 rs[WS_KC][16 * H];
    const int tid = threadIdx.x;
    const int tx = tid & 15;
    const int ty = tid >> 4;
    const long long c0 = (long long)blockIdx.x * (64 * H);
    for (long long r0 = (long long)blockIdx.y * (16 * R); r0 < rows; r0 += (long long)gridDim.y * (16 * R)) {
        float d[R][4 * H];
#pragma unroll
        for (int i = 0; i < R; ++i) {
#pragma unroll
            for (int e = 0; e < 4 * H; ++e) {
                d[i][e] = 0.0f;
            }
        }
        for (int k0 = 0; left != 0 && k0 < rank; k0 += WS_KC) {
            const int kc = rank - k0 < WS_KC ? rank - k0 : WS_KC;
            // The previous pass (or row tile) has finished reading the staged terms.
            __syncthreads();
            // Every load of the stage is issued before the first store to shared memory, so
            // they are in flight together.
            float* lsf = (float*)ls;
            if ((rank & 3) == 0) {
                // Four terms of a row in one 16-byte load: a warp reads whole runs of `left`.
                constexpr int N = (16 * R) * (WS_KC / 4) / 256;
                float4 v[N];
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    int e = tid + 256 * q;
                    int row = e / (WS_KC / 4);
                    int k = (e % (WS_KC / 4)) * 4;
                    v[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    if (k < kc && r0 + row < rows) {
                        v[q] = *(const float4*)(left + (first_row + r0 + row) * rank + k0 + k);
                    }
                }
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    int e = tid + 256 * q;
                    int row = e / (WS_KC / 4);
                    int k = (e % (WS_KC / 4)) * 4;
                    lsf[k * (16 * R) + row] = v[q].x;
                    lsf[(k + 1) * (16 * R) + row] = v[q].y;
                    lsf[(k + 2) * (16 * R) + row] = v[q].z;
                    lsf[(k + 3) * (16 * R) + row] = v[q].w;
                }
            } else {
                constexpr int N = (16 * R) * WS_KC / 256;
                float v[N];
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    int e = tid + 256 * q;
                    int row = e % (16 * R);
                    int k = e / (16 * R);
                    v[q] = k < kc && r0 + row < rows ? left[(first_row + r0 + row) * rank + k0 + k] : 0.0f;
                }
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    lsf[tid + 256 * q] = v[q];
                }
            }
            {
                constexpr int N = WS_KC * 16 * H / 256;
                float4 v[N];
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    int e = tid + 256 * q;
                    int k = e / (16 * H);
                    long long col = c0 + (e % (16 * H)) * 4;
                    v[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    if (k < kc && col < cols) {
                        v[q] = *(const float4*)(right + (long long)(k0 + k) * cols + col);
                    }
                }
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    int e = tid + 256 * q;
                    rs[e / (16 * H)][e % (16 * H)] = v[q];
                }
            }
            __syncthreads();
#pragma unroll 4
            for (int k = 0; k < kc; ++k) {
                float a[R];
#pragma unroll
                for (int q = 0; q < R / 4; ++q) {
                    float4 av = ls[k][ty * (R / 4) + q];
                    a[4 * q] = av.x;
                    a[4 * q + 1] = av.y;
                    a[4 * q + 2] = av.z;
                    a[4 * q + 3] = av.w;
                }
                float b[4 * H];
#pragma unroll
                for (int h = 0; h < H; ++h) {
                    float4 bv = rs[k][16 * h + tx];
                    b[4 * h] = bv.x;
                    b[4 * h + 1] = bv.y;
                    b[4 * h + 2] = bv.z;
                    b[4 * h + 3] = bv.w;
                }
#pragma unroll
                for (int i = 0; i < R; ++i) {
#pragma unroll
                    for (int e = 0; e < 4 * H; ++e) {
                        d[i][e] = __fmaf_rn(a[i], b[e], d[i][e]);
                    }
                }
            }
        }
        // Every load of W is issued before the first is used, so they are in flight together.
        uint2 w[R][H];
#pragma unroll
        for (int i = 0; i < R; ++i) {
#pragma unroll
            for (int h = 0; h < H; ++h) {
                long long r = r0 + ty * R + i;
                long long col = c0 + h * 64 + tx * 4;
                w[i][h] = make_uint2(0u, 0u);
                if (r < rows && col < cols) {
                    w[i][h] = *(const uint2*)(base + r * cols + col);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const long long r = r0 + ty * R + i;
            const float frow =
                factors != 0 && !factor_per_column && r < rows ? factors[first_row + r] : 1.0f;
#pragma unroll
            for (int h = 0; h < H; ++h) {
                const long long col = c0 + h * 64 + tx * 4;
                if (r < rows && col < cols) {
                    const uint2 wv = w[i][h];
                    unsigned short o[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        unsigned int half = e < 2 ? wv.x : wv.y;
                        float acc = ws_decode<BK>((unsigned short)(half >> (16 * (e & 1))));
                        if (left != 0) {
                            acc = __fadd_rn(acc, d[i][h * 4 + e]);
                        }
                        if (factors != 0) {
                            acc = __fmul_rn(acc, factor_per_column ? factors[col + e] : frow);
                        }
                        o[e] = ws_encode<OK>(acc);
                    }
                    *(uint2*)(out + r * cols + col) =
                        make_uint2((unsigned int)o[0] | ((unsigned int)o[1] << 16),
                                   (unsigned int)o[2] | ((unsigned int)o[3] << 16));
                }
            }
        }
    }
}

// base_kind and out_kind are taken for the common signature of the merge kernels; these
// kernels are built for their kinds.
#define WS_TILE_KERNEL(NAME, R, H, MIN_BLOCKS, BK, OK)                                             \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS) NAME(                         \
        const unsigned short* base, int base_kind, const float* left, const float* right,      \
        int rank, const float* factors, int factor_per_column, unsigned short* out,            \
        int out_kind, long long rows, long long cols, long long first_row)                      \
    {                                                                                           \
        (void)base_kind;                                                                        \
        (void)out_kind;                                                                         \
        ws_merge_tile<R, H, BK, OK>(base, left, right, rank, factors, factor_per_column, out,   \
                                    rows, cols, first_row);                                     \
    }

// R = 4, H = 2: 64 × 128 tiles, 64 registers, four blocks per SM (gpu::TILE_ROWS, TILE_COLS).
WS_TILE_KERNEL(lora_merge_tile_bb, 4, 2, 4, 0, 0)
WS_TILE_KERNEL(lora_merge_tile_bh, 4, 2, 4, 0, 1)
WS_TILE_KERNEL(lora_merge_tile_hb, 4, 2, 4, 1, 0)
WS_TILE_KERNEL(lora_merge_tile_hh, 4, 2, 4, 1, 1)
