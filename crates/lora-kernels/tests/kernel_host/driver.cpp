// driver.cpp — runs one launch of a merge kernel of kernels/merge.cu on the host, thread after
// thread, for tests/kernel_on_host.rs (which compiles this file with the system C++ compiler).
//
//   driver KERNEL BASE_KIND OUT_KIND RANK FACTOR_MODE ROWS COLS FIRST_ROW GRID_X GRID_Y BLOCK_X DIR
//
// DIR holds base.bin (the block's rows), left.bin and right.bin (f32; absent when RANK is 0),
// factors.bin (f32, FACTOR_MODE 1 per row, 2 per column; absent for 0); out.bin is written.
#include "shim.h"
#include "../../../../kernels/merge.cu"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static std::vector<unsigned char> slurp(const std::string& path) {
    std::vector<unsigned char> bytes;
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) {
        std::fprintf(stderr, "cannot open %s\n", path.c_str());
        std::exit(2);
    }
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) {
        bytes.insert(bytes.end(), buf, buf + n);
    }
    std::fclose(f);
    return bytes;
}

// 64-byte aligned copies, so the kernels' 16-byte vector loads are aligned as on the device.
static void* aligned_copy(const std::vector<unsigned char>& v) {
    size_t n = (v.size() + 63) / 64 * 64 + 64;
    void* p = std::aligned_alloc(64, n);
    std::memset(p, 0, n);
    if (!v.empty()) {
        std::memcpy(p, v.data(), v.size());
    }
    return p;
}

int main(int argc, char** argv) {
    if (argc != 13) {
        std::fprintf(stderr, "usage: driver KERNEL BASE_KIND OUT_KIND RANK FACTOR_MODE ROWS COLS FIRST_ROW GRID_X GRID_Y BLOCK_X DIR\n");
        return 2;
    }
    std::string kernel = argv[1];
    int base_kind = std::atoi(argv[2]), out_kind = std::atoi(argv[3]), rank = std::atoi(argv[4]);
    int factor_mode = std::atoi(argv[5]);
    long long rows = std::atoll(argv[6]), cols = std::atoll(argv[7]), first_row = std::atoll(argv[8]);
    unsigned gx = (unsigned)std::atol(argv[9]), gy = (unsigned)std::atol(argv[10]);
    unsigned bx = (unsigned)std::atol(argv[11]);
    std::string dir = argv[12];
    void* base = aligned_copy(slurp(dir + "/base.bin"));
    float* left = rank ? (float*)aligned_copy(slurp(dir + "/left.bin")) : nullptr;
    float* right = rank ? (float*)aligned_copy(slurp(dir + "/right.bin")) : nullptr;
    float* factors = factor_mode ? (float*)aligned_copy(slurp(dir + "/factors.bin")) : nullptr;
    std::vector<unsigned char> out_bytes((size_t)(rows * cols * 2), 0xA5);
    unsigned short* out = (unsigned short*)aligned_copy(out_bytes);
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y) {
        for (unsigned x = 0; x < gx; ++x) {
            blockIdx = {x, y, 0};
            for (unsigned t = 0; t < bx; ++t) {
                threadIdx = {t, 0, 0};
                if (kernel == "lora_merge_v8") {
                    lora_merge_v8((const unsigned short*)base, base_kind, left, right, rank, factors,
                                  factor_mode == 2, out, out_kind, rows, cols, first_row);
                } else if (kernel == "lora_merge") {
                    lora_merge(base, base_kind, left, right, rank, factors, factor_mode == 2, out,
                               out_kind, rows, cols, first_row);
                } else {
                    std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
                    return 2;
                }
            }
        }
    }
    FILE* f = std::fopen((dir + "/out.bin").c_str(), "wb");
    if (!f || std::fwrite(out, 1, (size_t)(rows * cols * 2), f) != (size_t)(rows * cols * 2)) {
        std::fprintf(stderr, "cannot write %s/out.bin\n", dir.c_str());
        return 2;
    }
    std::fclose(f);
    return 0;
}
