// dequant.cu — GPTQ dequantisation on the GPU, the same arithmetic as
// lora-kernels/src/dequant.rs so both give the same bits:
//
//   out[o][i] = scale[g][o] · (float)(q[i][o] − (z[g][o] + zero_offset)),   g = g_idx[i]
//
// q is code i % 32 of the little-endian bit stream of `bits`-bit codes held in the words
// qweight[(i / 32) · bits + w][o] (w = 0 .. bits − 1; a 3-bit code can straddle two words);
// z is code o % 32 of the stream in qzeros[g][(o / 32) · bits + w]. One f32 multiply
// (__fmul_rn), exact for 16-bit scales. Scales: 0 BF16, 1 F16, 2 F32. `out` is the
// out_features × in_features f32 weight of a torch Linear. The layout is documented in
// st-io's quant module.
//
// Launch: block (256), grid (ceil(in_features / 256), min(out_features, 65535)); output rows
// are strided by gridDim.y. Consecutive threads write consecutive f32 (coalesced stores).

__device__ __forceinline__ unsigned int ws_code(
    const unsigned int* words, long long stride, int bits, int k)
{
    int bit = k * bits;
    int w = bit >> 5;
    int shift = bit & 31;
    unsigned int v = words[(long long)w * stride] >> shift;
    if (shift + bits > 32) {
        v |= words[(long long)(w + 1) * stride] << (32 - shift);
    }
    return v & ((1u << bits) - 1u);
}

__device__ __forceinline__ float ws_scale(const void* scales, int kind, long long i) {
    if (kind == 2) {
        return ((const float*)scales)[i];
    }
    unsigned short h = ((const unsigned short*)scales)[i];
    if (kind == 0) {
        return __int_as_float(((unsigned int)h) << 16);
    }
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return ws_host_f16_to_f32(h); // the host emulation's shim (lora-kernels' tests)
#endif
}

extern "C" __global__ void gptq_dequant(
    const unsigned int* qweight, const unsigned int* qzeros,
    const void* scales, int scales_kind, const int* g_idx,
    int bits, int zero_offset,
    long long in_features, long long out_features, float* out)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= in_features) {
        return;
    }
    long long zero_words = out_features * bits / 32;
    long long g = g_idx[i];
    int k = (int)(i & 31);
    const unsigned int* block = qweight + (i >> 5) * bits * out_features;
    for (long long o = blockIdx.y; o < out_features; o += gridDim.y) {
        unsigned int q = ws_code(block + o, out_features, bits, k);
        unsigned int z = ws_code(qzeros + g * zero_words + (o >> 5) * bits, 1, bits, (int)(o & 31));
        float s = ws_scale(scales, scales_kind, g * out_features + o);
        out[o * in_features + i] = __fmul_rn(s, (float)((int)q - ((int)z + zero_offset)));
    }
}
