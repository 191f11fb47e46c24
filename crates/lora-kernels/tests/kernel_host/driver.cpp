// driver.cpp — runs one launch of a kernel of kernels/merge.cu or kernels/dequant.cu on the
// host, thread after thread, for tests/kernel_on_host.rs (which compiles this file with the
// system C++ compiler).
//
//   driver lora_merge|lora_merge_tile_{bb,bh,hb,hh} BASE_KIND OUT_KIND RANK FACTOR_MODE ROWS COLS FIRST_ROW GRID_X GRID_Y BLOCK_X DIR
//     DIR holds base.bin (the block's rows), left.bin and right.bin (f32; absent when RANK is
//     0), factors.bin (f32, FACTOR_MODE 1 per row, 2 per column; absent for 0); out.bin (16-bit)
//     is written.
//   driver gptq_dequant SCALES_KIND BITS ZERO_OFFSET IN OUT GRID_X GRID_Y BLOCK_X DIR
//     DIR holds qweight.bin, qzeros.bin, scales.bin and g_idx.bin (i32); out.bin (f32, OUT × IN)
//     is written.
#include "shim.h"
#include "../../../../kernels/merge.cu"
#include "../../../../kernels/dequant.cu"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
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

// Every block of a grid in turn; the threads of a block one after another, or, for a kernel
// that synchronises its block (`threaded`), all at once as OS threads meeting at its barrier.
template <typename F>
static void run_grid(unsigned gx, unsigned gy, unsigned bx, bool threaded, F thread) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    ws_block_barrier.count = bx;
    for (unsigned y = 0; y < gy; ++y) {
        for (unsigned x = 0; x < gx; ++x) {
            blockIdx = {x, y, 0};
            if (threaded) {
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < bx; ++t) {
                    threads.emplace_back([t, &thread] {
                        threadIdx = {t, 0, 0};
                        thread();
                    });
                }
                for (auto& t : threads) {
                    t.join();
                }
            } else {
                for (unsigned t = 0; t < bx; ++t) {
                    threadIdx = {t, 0, 0};
                    thread();
                }
            }
        }
    }
}

static int write_out(const std::string& dir, const void* data, size_t n) {
    FILE* f = std::fopen((dir + "/out.bin").c_str(), "wb");
    if (!f || std::fwrite(data, 1, n, f) != n) {
        std::fprintf(stderr, "cannot write %s/out.bin\n", dir.c_str());
        return 2;
    }
    std::fclose(f);
    return 0;
}

static int dequant_main(int argc, char** argv) {
    if (argc != 11) {
        std::fprintf(stderr, "usage: driver gptq_dequant SCALES_KIND BITS ZERO_OFFSET IN OUT GRID_X GRID_Y BLOCK_X DIR\n");
        return 2;
    }
    int scales_kind = std::atoi(argv[2]), bits = std::atoi(argv[3]), zero_offset = std::atoi(argv[4]);
    long long in = std::atoll(argv[5]), out_features = std::atoll(argv[6]);
    unsigned gx = (unsigned)std::atol(argv[7]), gy = (unsigned)std::atol(argv[8]);
    unsigned bx = (unsigned)std::atol(argv[9]);
    std::string dir = argv[10];
    const unsigned int* q = (const unsigned int*)aligned_copy(slurp(dir + "/qweight.bin"));
    const unsigned int* z = (const unsigned int*)aligned_copy(slurp(dir + "/qzeros.bin"));
    const void* scales = aligned_copy(slurp(dir + "/scales.bin"));
    const int* g_idx = (const int*)aligned_copy(slurp(dir + "/g_idx.bin"));
    std::vector<float> out((size_t)(in * out_features), -12345.0f);
    run_grid(gx, gy, bx, false, [&] {
        gptq_dequant(q, z, scales, scales_kind, g_idx, bits, zero_offset, in, out_features, out.data());
    });
    return write_out(dir, out.data(), out.size() * 4);
}

int main(int argc, char** argv) {
    if (argc > 1 && std::string(argv[1]) == "gptq_dequant") {
        return dequant_main(argc, argv);
    }
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
    typedef void (*tile_kernel)(const unsigned short*, int, const float*, const float*, int,
                                const float*, int, unsigned short*, int, long long, long long,
                                long long);
    static const struct {
        const char* name;
        tile_kernel f;
    } tiles[] = {
        {"lora_merge_tile_bb", lora_merge_tile_bb},
        {"lora_merge_tile_bh", lora_merge_tile_bh},
        {"lora_merge_tile_hb", lora_merge_tile_hb},
        {"lora_merge_tile_hh", lora_merge_tile_hh},
    };
    tile_kernel tile = nullptr;
    for (const auto& t : tiles) {
        if (kernel == t.name) {
            tile = t.f;
        }
    }
    if (!tile && kernel != "lora_merge") {
        std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
        return 2;
    }
    run_grid(gx, gy, bx, tile != nullptr, [&] {
        if (tile) {
            tile((const unsigned short*)base, base_kind, left, right, rank, factors,
                 factor_mode == 2, out, out_kind, rows, cols, first_row);
        } else {
            lora_merge(base, base_kind, left, right, rank, factors, factor_mode == 2, out,
                       out_kind, rows, cols, first_row);
        }
    });
    return write_out(dir, out, (size_t)(rows * cols * 2));
}
