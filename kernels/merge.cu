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

extern "C" __device__ float ws_load(const void* base, int kind, long long i) {
    if (kind == 2) {
        return ((const float*)base)[i];
    }
    unsigned short h = ((const unsigned short*)base)[i];
    if (kind == 0) {
        return __int_as_float(((unsigned int)h) << 16);
    }
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

extern "C" __device__ unsigned short ws_round16(float v, int kind) {
    if (kind == 1) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        return h;
    }
    unsigned int bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((bits >> 16) | 0x0040u);
    }
    unsigned int rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (unsigned short)((bits + rounding) >> 16);
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
