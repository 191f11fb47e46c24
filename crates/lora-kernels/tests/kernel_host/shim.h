// shim.h — just enough of CUDA's device dialect for kernels/*.cu to compile as C++ on the host,
// where tests/kernel_host/driver.cpp runs the threads of a launch: one after another for the
// kernels without shared memory, or, for a kernel with __syncthreads, every thread of a block
// as its own OS thread, the block's `__shared__` arrays (function statics here) common to them
// and __syncthreads a barrier over them, blocks one after another. f32 arithmetic here is IEEE
// single with no contraction (the test compiles with -ffp-contract=off), as __fadd_rn /
// __fmul_rn are on the device, and __fmaf_rn is the C library's exact fmaf.
#pragma once
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads, blocks)
#define __shared__ static

struct ws_dim3 {
    unsigned int x, y, z;
};
static ws_dim3 blockIdx, blockDim, gridDim;
static thread_local ws_dim3 threadIdx;

// The barrier of the block that runs: all of its threads wait until the last one arrives.
struct ws_barrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned count = 0, waiting = 0, generation = 0;
    void wait() {
        std::unique_lock<std::mutex> lock(m);
        unsigned gen = generation;
        if (++waiting == count) {
            waiting = 0;
            ++generation;
            cv.notify_all();
        } else {
            cv.wait(lock, [&] { return gen != generation; });
        }
    }
};
static ws_barrier ws_block_barrier;
static inline void __syncthreads() { ws_block_barrier.wait(); }

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
static inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
static inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
static inline float __int_as_float(unsigned int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
static inline unsigned int __float_as_uint(float f) {
    unsigned int i;
    std::memcpy(&i, &f, 4);
    return i;
}

// cvt.f32.f16: exact.
static inline float ws_host_f16_to_f32(unsigned short h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t x;
    if (exp == 0x1f) {
        x = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            x = sign;
        } else {
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400u));
            man &= 0x3ffu;
            x = sign | ((uint32_t)(112 - e) << 23) | (man << 13);
        }
    } else {
        x = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

// cvt.rn.f16.f32: round to nearest even, overflow to infinity, NaN kept quiet.
static inline unsigned short ws_host_f32_to_f16(float v) {
    uint32_t x;
    std::memcpy(&x, &v, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t man = x & 0x7fffffu;
    if (exp == 0xff) {
        return (unsigned short)(sign | 0x7c00u | (man ? 0x200u | (man >> 13) : 0u));
    }
    int e = (int)exp - 112;
    if (e >= 31) {
        return (unsigned short)(sign | 0x7c00u);
    }
    if (e <= 0) {
        int shift = 14 - e;
        if (shift > 24) {
            return (unsigned short)sign;
        }
        man |= 0x800000u;
        uint32_t h = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (h & 1u))) {
            h++;
        }
        return (unsigned short)(sign | h);
    }
    uint32_t h = sign | ((uint32_t)e << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
        h++;
    }
    return (unsigned short)h;
}
