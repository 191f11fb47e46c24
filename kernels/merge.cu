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
// The body is compiled twice: for a product without DoRA (the common case), with no
// per-element tests of `left` or `factors`, and for everything else. Offsets within a tile are
// 32-bit (at most 63 rows of cols < 2^24 columns: gpu::TILE_MAX_COLS; wider tensors take
// lora_merge), which spares most of the 64-bit address arithmetic.
// On an H200, BF16, r = 16 / 32 / 64 (scripts/device/kernel-rate.sh), 14336 × 4096:
// 2.08 / 1.44 / 0.90 TB/s, 4096 × 4096: 1.75 / 1.30 / 0.83, against 1.70 / 1.31 / 0.85 and
// 1.43 / 1.12 / 0.75 with one body and 64-bit offsets, 1.58 / 0.96 / 0.53 at 14336 × 4096 for
// the kernels before the tiles (one multiply and one add per term); torch's addmm
// 1.50 / 1.49 / 1.52 and a device copy 4.0. The loads of a stage, and of the tile's W, are all
// issued before the first is used: loading each W just before its use left the warps waiting
// on memory (1.54 / 1.25 / 0.80). Tried and slower or no faster, 14336 × 4096: W's tile
// prefetched to L2 when the tile starts (2.01 / 1.32 / 0.87); W's tile loaded with the first
// stage and kept in shared memory (1.32 / 1.03 / 0.69; with cp.async in a compute_80 build 1.91
// / 1.39 / 0.85); W loaded into registers before the sums (1.76 / 1.34 / 0.83 at two blocks per
// SM and 123 registers, 1.43 / 1.13 / 0.76 at three, 1.51 / 1.18 / 0.78 at four); streaming
// cache hints on W and out (1.95 / 1.44 / 0.87); BF16 pairs rounded and packed with one prmt
// (2.02 / 1.43 / 0.88); compute_80's cvt.rn.bf16x2.f32 (2.16 / 1.53 / 0.95: 4-6 % for a second
// PTX, not taken); three blocks per SM with more registers (1.97 / 1.47 / 0.87); 8 rows × 4
// columns a thread (1.83 / 1.35 / 0.83). Before the two bodies: 8 × 8 a thread (1.11 / 0.97 /
// 0.71, two blocks per SM at 128 registers), 4 × 4 (1.35 / 0.79 / 0.45), persistent blocks that
// keep `right` in shared memory for all their row tiles (at best 1.52 / 1.22 / 0.78), the
// conversions selected per element at run time (1-3 % slower). Ranks above ~20 are bound by the
// fused multiply-adds themselves: r per element, 33.5 T a second on an H200, so at r = 64 no
// exact f32 kernel passes ~2.1 TB/s.
// Launch: block (256), grid (ceil(cols / (64·H)), min(ceil(rows / (16·R)), 65535)); row tiles
// are strided by gridDim.y.
#define WS_KC 32

// The staged terms of a tile kernel, one copy for its plain and its general body.
template <int R, int H>
struct ws_tile_smem {
    float4 ls[WS_KC][(16 * R) / 4];
    float4 rs[WS_KC][16 * H];
};

// PLAIN: the body for a product without DoRA (left != 0, factors == 0), the merge's common
// case, with no per-element tests of either.
template <int R, int H, int BK, int OK, bool PLAIN>
__device__ __forceinline__ void ws_merge_tile(
    ws_tile_smem<R, H>& sm,
    const unsigned short* base, const float* left, const float* right, int rank,
    const float* factors, int factor_per_column, unsigned short* out,
    long long rows, long long cols, long long first_row)
{
    constexpr int TR = 16 * R;
    constexpr int TC = 64 * H;
    const int tid = threadIdx.x;
    const int tx = tid & 15;
    const int ty = tid >> 4;
    const int ncols = (int)cols;
    const long long c0 = (long long)blockIdx.x * TC;
    const int tcols = cols - c0 < TC ? (int)(cols - c0) : TC;
    for (long long r0 = (long long)blockIdx.y * TR; r0 < rows; r0 += (long long)gridDim.y * TR) {
        const int trows = rows - r0 < TR ? (int)(rows - r0) : TR;
        const unsigned short* wt = base + r0 * cols + c0;
        unsigned short* ot = out + r0 * cols + c0;
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
            const float* lt = left + (first_row + r0) * rank + k0;
            const float* rt = right + (long long)k0 * cols + c0;
            // The previous pass (or row tile) has finished reading the staged terms.
            __syncthreads();
            // Every load of the stage is issued before the first store to shared memory, so
            // they are in flight together.
            float* lsf = (float*)sm.ls;
            if ((rank & 3) == 0) {
                // Four terms of a row in one 16-byte load: a warp reads whole runs of `left`.
                constexpr int N = TR * (WS_KC / 4) / 256;
                float4 v[N];
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    const int e = tid + 256 * q;
                    const int row = e / (WS_KC / 4);
                    const int k = (e % (WS_KC / 4)) * 4;
                    v[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    if (k < kc && row < trows) {
                        v[q] = *(const float4*)(lt + row * rank + k);
                    }
                }
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    const int e = tid + 256 * q;
                    const int row = e / (WS_KC / 4);
                    const int k = (e % (WS_KC / 4)) * 4;
                    lsf[k * TR + row] = v[q].x;
                    lsf[(k + 1) * TR + row] = v[q].y;
                    lsf[(k + 2) * TR + row] = v[q].z;
                    lsf[(k + 3) * TR + row] = v[q].w;
                }
            } else {
                constexpr int N = TR * WS_KC / 256;
                float v[N];
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    const int e = tid + 256 * q;
                    const int row = e % TR;
                    const int k = e / TR;
                    v[q] = k < kc && row < trows ? lt[row * rank + k] : 0.0f;
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
                    const int e = tid + 256 * q;
                    const int k = e / (16 * H);
                    const int col = (e % (16 * H)) * 4;
                    v[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    if (k < kc && col < tcols) {
                        v[q] = *(const float4*)(rt + k * ncols + col);
                    }
                }
#pragma unroll
                for (int q = 0; q < N; ++q) {
                    const int e = tid + 256 * q;
                    sm.rs[e / (16 * H)][e % (16 * H)] = v[q];
                }
            }
            __syncthreads();
#pragma unroll 4
            for (int k = 0; k < kc; ++k) {
                float a[R];
#pragma unroll
                for (int q = 0; q < R / 4; ++q) {
                    float4 av = sm.ls[k][ty * (R / 4) + q];
                    a[4 * q] = av.x;
                    a[4 * q + 1] = av.y;
                    a[4 * q + 2] = av.z;
                    a[4 * q + 3] = av.w;
                }
                float b[4 * H];
#pragma unroll
                for (int h = 0; h < H; ++h) {
                    float4 bv = sm.rs[k][16 * h + tx];
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
                const int row = ty * R + i;
                const int col = h * 64 + tx * 4;
                w[i][h] = make_uint2(0u, 0u);
                if (row < trows && col < tcols) {
                    w[i][h] = *(const uint2*)(wt + row * ncols + col);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int row = ty * R + i;
            const float frow = !PLAIN && factors != 0 && !factor_per_column && row < trows
                                   ? factors[first_row + r0 + row]
                                   : 1.0f;
#pragma unroll
            for (int h = 0; h < H; ++h) {
                const int col = h * 64 + tx * 4;
                if (row < trows && col < tcols) {
                    const uint2 wv = w[i][h];
                    float acc[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        unsigned int half = e < 2 ? wv.x : wv.y;
                        acc[e] = ws_decode<BK>((unsigned short)(half >> (16 * (e & 1))));
                        if (PLAIN || left != 0) {
                            acc[e] = __fadd_rn(acc[e], d[i][h * 4 + e]);
                        }
                        if (!PLAIN && factors != 0) {
                            acc[e] = __fmul_rn(acc[e], factor_per_column ? factors[c0 + col + e] : frow);
                        }
                    }
                    *(uint2*)(ot + row * ncols + col) = make_uint2(
                        (unsigned int)ws_encode<OK>(acc[0]) | ((unsigned int)ws_encode<OK>(acc[1]) << 16),
                        (unsigned int)ws_encode<OK>(acc[2]) | ((unsigned int)ws_encode<OK>(acc[3]) << 16));
                }
            }
        }
    }
}

// base_kind and out_kind are taken for the common signature of the merge kernels; these
// kernels are built for their kinds.
#define WS_TILE_KERNEL(NAME, R, H, MIN_BLOCKS, BK, OK)                                     \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS) NAME(                     \
        const unsigned short* base, int base_kind, const float* left, const float* right,  \
        int rank, const float* factors, int factor_per_column, unsigned short* out,        \
        int out_kind, long long rows, long long cols, long long first_row)                  \
    {                                                                                       \
        (void)base_kind;                                                                    \
        (void)out_kind;                                                                     \
        __shared__ ws_tile_smem<R, H> sm;                                                   \
        if (left != 0 && factors == 0) {                                                    \
            ws_merge_tile<R, H, BK, OK, true>(sm, base, left, right, rank, factors,         \
                                              factor_per_column, out, rows, cols, first_row); \
        } else {                                                                            \
            ws_merge_tile<R, H, BK, OK, false>(sm, base, left, right, rank, factors,        \
                                               factor_per_column, out, rows, cols, first_row); \
        }                                                                                   \
    }

// R = 4, H = 2: 64 × 128 tiles, 64 registers, four blocks per SM (gpu::TILE_ROWS, TILE_COLS).
WS_TILE_KERNEL(lora_merge_tile_bb, 4, 2, 4, 0, 0)
WS_TILE_KERNEL(lora_merge_tile_bh, 4, 2, 4, 0, 1)
WS_TILE_KERNEL(lora_merge_tile_hb, 4, 2, 4, 1, 0)
WS_TILE_KERNEL(lora_merge_tile_hh, 4, 2, 4, 1, 1)
