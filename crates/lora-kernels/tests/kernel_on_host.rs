//! The kernels of `kernels/merge.cu` and `kernels/dequant.cu`, compiled as C++ for the host
//! (tests/kernel_host: a shim of CUDA's device dialect and a driver that runs every thread of a
//! launch in turn), give the same bits as the CPU merge and the CPU GPTQ dequantisation. Launch
//! shapes come from `gpu::merge_launch` and `gpu::gptq_dequant_launch`, as on the device. This
//! checks the kernels' indexing, their order of operations and every branch (the
//! tile kernel's partial tiles, its passes over the terms and its stride over row tiles, ranks
//! of every size, zero coefficients, DoRA factors per row and per column, F16 rounding, plain
//! conversions, every GPTQ bit width and zero convention) on any machine with a C++ compiler. With a CUDA device present (`scripts/gpu-check.sh`),
//! every merge case also runs the embedded PTX on the GPU, which must write the same bytes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use lora_kernels::cpu::merge_rows;
use lora_kernels::gpu::{
    gptq_dequant_launch, merge_launch, scalar_launch, tile_launch, KernelLaunch, TILE_COLS,
    TILE_MAX_COLS, TILE_ROWS,
};
use lora_kernels::{encode_half, DoraScale, LoraProduct, LoraTerm};
use st_io::Dtype;

/// The crate's folder: WEIGHTSMITH_REPO/crates/lora-kernels where that is set (test
/// executables carried to another machine, as `scripts/gpu-check.sh` runs them), else where
/// it was built.
fn crate_dir() -> PathBuf {
    match std::env::var_os("WEIGHTSMITH_REPO") {
        Some(root) => PathBuf::from(root).join("crates/lora-kernels"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

/// The driver, compiled once per test process.
fn driver() -> &'static Path {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let src = crate_dir().join("tests/kernel_host/driver.cpp");
        let exe = std::env::temp_dir().join(format!("ws-kernel-host-{}", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args([
                "-std=c++17",
                "-O2",
                "-ffp-contract=off",
                "-fno-strict-aliasing",
                "-pthread",
            ])
            .args([
                "-Wall",
                "-Wno-unknown-pragmas",
                "-Wno-unused-function",
                "-o",
            ])
            .arg(&exe)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("{cxx}: {e} (a C++ compiler is needed: set CXX)"));
        assert!(
            out.status.success(),
            "compiling {} failed:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

/// Runs `launch` on the host over the inputs in `dir` with the kernel's own parameters
/// (driver.cpp's order) and returns the bytes it wrote. Where a CUDA device is present (the
/// device check, `scripts/gpu-check.sh`, which sets WEIGHTSMITH_REQUIRE_GPU so a missing one
/// fails), a merge kernel also runs there on the same inputs from the embedded PTX and must
/// write the same bytes: every case then checks the GPU against the CPU too.
fn launch_on_host(launch: &KernelLaunch, params: &[i64], dir: &Path) -> Vec<u8> {
    let shape = [launch.grid.0, launch.grid.1, launch.block.0].map(i64::from);
    let status = Command::new(driver())
        .arg(launch.kernel)
        .args(params.iter().chain(&shape).map(|v| v.to_string()))
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "the kernel driver failed on {launch:?}");
    let host = std::fs::read(dir.join("out.bin")).unwrap();
    if launch.kernel.starts_with("lora_merge") {
        if let Some(device) = merge_on_device(launch, params, dir) {
            if let Some(i) = device.iter().zip(&host).position(|(d, h)| d != h) {
                panic!(
                    "{launch:?} {params:?}: byte {i} is {:#04x} on the GPU, {:#04x} on the host",
                    device[i], host[i]
                );
            }
        }
    }
    host
}

/// Whether merge kernels run on a CUDA device too.
fn device_present() -> bool {
    let present = gpu_mem::cuda::driver_available() && gpu_mem::cuda::device_count() > 0;
    assert!(
        present || std::env::var_os("WEIGHTSMITH_REQUIRE_GPU").is_none(),
        "WEIGHTSMITH_REQUIRE_GPU is set but no CUDA device was found"
    );
    present
}

/// `launch` of a merge kernel on device 0 over the inputs in `dir` (params as for the
/// driver: base kind, out kind, rank, factor mode, rows, cols, first row).
fn merge_on_device(launch: &KernelLaunch, params: &[i64], dir: &Path) -> Option<Vec<u8>> {
    use gpu_mem::cuda::{Context, DeviceAlloc, KernelArg, Module, Stream};
    if !device_present() {
        return None;
    }
    let [base_kind, out_kind, rank, factor_mode, rows, cols, first_row] = params else {
        panic!("merge parameters: {params:?}");
    };
    let ctx = Context::new(0).unwrap();
    let module = Module::load_ptx(&ctx, lora_kernels::gpu::MERGE_PTX).unwrap();
    let stream = Stream::new(&ctx).unwrap();
    let mut keep = Vec::new();
    let mut put = |name: &str| -> u64 {
        let path = dir.join(name);
        if !path.exists() {
            return 0;
        }
        let bytes = std::fs::read(path).unwrap();
        let a = DeviceAlloc::new(&ctx, bytes.len().max(16)).unwrap();
        // SAFETY: `bytes` is kept alive in `keep` until the synchronisation below.
        unsafe { a.copy_from_host_async(0, &bytes, &stream).unwrap() };
        let ptr = a.device_ptr();
        keep.push((a, bytes));
        ptr
    };
    let base = put("base.bin");
    let (left, right) = if *rank > 0 {
        (put("left.bin"), put("right.bin"))
    } else {
        (0, 0)
    };
    let factors = if *factor_mode > 0 {
        put("factors.bin")
    } else {
        0
    };
    let n = (rows * cols * 2) as usize;
    let out = DeviceAlloc::new(&ctx, n.max(16)).unwrap();
    let mut got = vec![0xA5u8; n];
    // SAFETY: `out` is filled with the host's sentinel first, so an element the kernel skips
    // shows; the arguments match the merge kernels' parameters (kernels/merge.cu) and every
    // buffer holds what the driver's would: base rows × cols, left (first row + rows) × rank,
    // right rank × cols, factors one per row or column.
    unsafe {
        out.copy_from_host_async(0, &got, &stream).unwrap();
        stream.synchronize().unwrap();
        let args = [
            KernelArg::Ptr(base),
            KernelArg::I32(*base_kind as i32),
            KernelArg::Ptr(left),
            KernelArg::Ptr(right),
            KernelArg::I32(*rank as i32),
            KernelArg::Ptr(factors),
            KernelArg::I32((*factor_mode == 2) as i32),
            KernelArg::Ptr(out.device_ptr()),
            KernelArg::I32(*out_kind as i32),
            KernelArg::I64(*rows),
            KernelArg::I64(*cols),
            KernelArg::I64(*first_row),
        ];
        module
            .launch(launch.kernel, launch.grid, launch.block, &stream, &args)
            .unwrap();
        out.copy_to_host_async(0, &mut got, &stream).unwrap();
    }
    stream.synchronize().unwrap();
    drop(keep);
    Some(got)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

struct Case {
    base: Dtype,
    out: Dtype,
    /// Logical `[out, in]`.
    shape: (usize, usize),
    transposed: bool,
    ranks: &'static [usize],
    /// Every `zero_every`-th coefficient of `left` is zero (0: none).
    zero_every: usize,
    dora: bool,
    /// Stored rows merged by this launch: `first_row .. first_row + rows`.
    block: (usize, usize),
}

impl Case {
    /// BF16 to BF16, stored as `[out, in]`, no zero coefficient, no DoRA, every row merged.
    fn plain(shape: (usize, usize), ranks: &'static [usize]) -> Case {
        Case {
            base: Dtype::BF16,
            out: Dtype::BF16,
            shape,
            transposed: false,
            ranks,
            zero_every: 0,
            dora: false,
            block: (0, shape.0),
        }
    }
}

/// Which launch a case runs.
#[derive(Clone, Copy)]
enum Pick {
    /// The merge's own choice (`merge_launch`).
    Merge,
    /// `lora_merge_tile` with at most this many blocks down the rows.
    Tile(u32),
    /// `lora_merge` whatever the dtype and width.
    Scalar,
}

fn run(case: &Case, seed: u64) -> &'static str {
    run_as(case, seed, Pick::Merge)
}

fn run_as(case: &Case, seed: u64, pick: Pick) -> &'static str {
    let mut rng = Rng(seed | 1);
    let (out, inp) = case.shape;
    let (stored_rows, stored_cols) = if case.transposed {
        (inp, out)
    } else {
        (out, inp)
    };
    // Some exact zeros of both signs: a conversion keeps -0, a merge adds +0 to it as PEFT does.
    let w: Vec<f32> = (0..stored_rows * stored_cols)
        .map(|i| match i % 29 {
            3 => -0.0,
            7 => 0.0,
            _ => rng.unit() * 0.05,
        })
        .collect();
    let base_bytes = match case.base {
        Dtype::F32 => f32_bytes(&w),
        d => {
            let mut b = vec![0u8; w.len() * 2];
            encode_half(d, &w, &mut b).unwrap();
            b
        }
    };
    let mut factors: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    let mut n = 0usize;
    for &r in case.ranks {
        let mut a: Vec<f32> = (0..r * inp).map(|_| rng.unit() * 0.1).collect();
        let mut b: Vec<f32> = (0..out * r).map(|_| rng.unit() * 0.1).collect();
        // `left` is s·B (stored as is) or A (stored transposed): zero some of it.
        if case.zero_every > 0 {
            let target = if case.transposed { &mut a } else { &mut b };
            for v in target.iter_mut() {
                n += 1;
                if n % case.zero_every == 0 {
                    *v = 0.0;
                }
            }
        }
        factors.push((a, b));
    }
    let terms: Vec<LoraTerm> = factors
        .iter()
        .zip(case.ranks)
        .enumerate()
        .map(|(k, ((a, b), &rank))| LoraTerm {
            a,
            b,
            rank,
            scale: 1.5 + k as f32,
        })
        .collect();
    // No ranks: a tensor without an adapter, only converted.
    let product = (!case.ranks.is_empty())
        .then(|| LoraProduct::new(out, inp, case.transposed, &terms).unwrap());
    let magnitude: Vec<f32> = (0..out).map(|_| 0.5 + rng.unit().abs()).collect();
    let dora = product.as_ref().filter(|_| case.dora).map(|product| {
        DoraScale::new(&base_bytes, case.base, product, case.transposed, &magnitude).unwrap()
    });
    let (first_row, rows) = case.block;
    let mut expected = vec![0u8; rows * stored_cols * 2];
    merge_rows(
        &base_bytes,
        case.base,
        stored_cols,
        product.as_ref(),
        dora.as_ref(),
        first_row,
        case.out,
        &mut expected,
    )
    .unwrap();

    let dir =
        std::env::temp_dir().join(format!("ws-kernel-host-case-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let size = if case.base == Dtype::F32 { 4 } else { 2 };
    std::fs::write(
        dir.join("base.bin"),
        &base_bytes[first_row * stored_cols * size..(first_row + rows) * stored_cols * size],
    )
    .unwrap();
    if let Some(p) = &product {
        std::fs::write(dir.join("left.bin"), f32_bytes(p.left())).unwrap();
        std::fs::write(dir.join("right.bin"), f32_bytes(p.right())).unwrap();
    }
    let factor_mode = match &dora {
        None => 0,
        Some(d) => {
            std::fs::write(dir.join("factors.bin"), f32_bytes(d.factors())).unwrap();
            if d.transposed() {
                2
            } else {
                1
            }
        }
    };
    let kind = |d: Dtype| match d {
        Dtype::BF16 => 0,
        Dtype::F16 => 1,
        _ => 2,
    };
    let launch = match pick {
        Pick::Merge => merge_launch(case.base, case.out, rows, stored_cols).unwrap(),
        Pick::Tile(max_row_tiles) => {
            tile_launch(case.base, case.out, rows, stored_cols, max_row_tiles).unwrap()
        }
        Pick::Scalar => scalar_launch(rows, stored_cols),
    };
    let params = [
        kind(case.base),
        kind(case.out),
        product.as_ref().map_or(0, |p| p.rank()),
        factor_mode,
        rows,
        stored_cols,
        first_row,
    ]
    .map(|v| v as i64);
    let got = launch_on_host(&launch, &params, &dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let differ = got
        .chunks(2)
        .zip(expected.chunks(2))
        .position(|(g, e)| g != e);
    if let Some(i) = differ {
        panic!(
            "{} ({:?} → {:?}, ranks {:?}, transposed {}, DoRA {}, rows {first_row}..{}): element {i} \
             (row {}, column {}) is {:02x?}, the CPU gives {:02x?}",
            launch.kernel,
            case.base,
            case.out,
            case.ranks,
            case.transposed,
            case.dora,
            first_row + rows,
            first_row + i / stored_cols,
            i % stored_cols,
            &got[2 * i..2 * i + 2],
            &expected[2 * i..2 * i + 2],
        );
    }
    launch.kernel
}

#[test]
fn tile_kernel_gives_the_cpu_bits_on_every_rank_and_partial_tiles() {
    // Ranks below, at and above one pass of staged terms (32): 1, 5 (not divisible by 4), 16,
    // 32, 33 (a second pass of one term), 72 from two adapters (three passes, the last short),
    // and a plain conversion (no adapter). Shapes with a partial last tile in both directions,
    // blocks that start inside the tensor, BF16 and F16 both ways, some zero coefficients.
    let dtypes = [
        (Dtype::BF16, Dtype::BF16),
        (Dtype::F16, Dtype::BF16),
        (Dtype::BF16, Dtype::F16),
        (Dtype::F16, Dtype::F16),
    ];
    let cases = [
        Case::plain((40, 36), &[1]),
        Case {
            block: (3, 140),
            ..Case::plain((150, 196), &[5])
        },
        Case {
            zero_every: 7,
            ..Case::plain((130, 260), &[16])
        },
        Case {
            block: (1, 128),
            ..Case::plain((129, 132), &[32])
        },
        Case {
            block: (10, 50),
            ..Case::plain((64, 516), &[33])
        },
        Case {
            block: (5, 135),
            zero_every: 11,
            ..Case::plain((140, 136), &[40, 32])
        },
        Case {
            block: (3, 140),
            ..Case::plain((150, 196), &[])
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let (base, out) = dtypes[i % 4];
        let case = Case { base, out, ..case };
        assert!(run(&case, 60 + i as u64).starts_with("lora_merge_tile_"));
    }
}

#[test]
fn tile_kernel_strides_over_row_tiles_beyond_its_grid() {
    // Ten row tiles (590 rows from row 7, 64 a tile) on a grid of two blocks down the rows:
    // each block takes every other tile, staging the terms again for each.
    let case = Case {
        block: (7, 590),
        ..Case::plain((600, 140), &[48])
    };
    assert_eq!(run_as(&case, 71, Pick::Tile(2)), "lora_merge_tile_bb");
}

#[test]
fn tile_and_scalar_kernels_match_with_dora_per_row_and_per_column() {
    for pick in [Pick::Merge, Pick::Scalar] {
        for (transposed, base, out) in [
            (false, Dtype::F16, Dtype::BF16),
            (true, Dtype::BF16, Dtype::F16),
        ] {
            let case = Case {
                base,
                out,
                shape: (136, 132),
                transposed,
                ranks: &[8],
                zero_every: 0,
                dora: true,
                block: (4, 128),
            };
            let kernel = run_as(&case, 21, pick);
            match pick {
                Pick::Scalar => assert_eq!(kernel, "lora_merge"),
                _ => assert!(kernel.starts_with("lora_merge_tile_"), "{kernel}"),
            }
        }
    }
}

#[test]
fn scalar_kernel_matches_on_f32_bases_and_odd_widths() {
    for (base, shape, ranks) in [
        (Dtype::F32, (20, 64), &[16usize][..]),
        (Dtype::BF16, (20, 38), &[5][..]),
        (Dtype::F16, (9, 13), &[4, 3][..]),
    ] {
        let case = Case {
            base,
            out: Dtype::BF16,
            shape,
            transposed: false,
            ranks,
            zero_every: 4,
            dora: true,
            block: (2, shape.0 - 2),
        };
        assert_eq!(run(&case, 31), "lora_merge");
    }
}

#[test]
fn host_emulation_sees_a_changed_kernel() {
    // The comparison can fail: a case whose CPU merge is computed without DoRA but whose
    // driver is given DoRA factors must differ. Done by hand here, with the same helpers.
    let case = Case {
        base: Dtype::BF16,
        out: Dtype::BF16,
        shape: (8, 16),
        transposed: false,
        ranks: &[4],
        zero_every: 0,
        dora: false,
        block: (0, 8),
    };
    let dir = std::env::temp_dir().join(format!("ws-kernel-host-neg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base: Vec<u8> = (0..8 * 16)
        .flat_map(|i| (0x3c00u16 + i as u16).to_le_bytes())
        .collect();
    std::fs::write(dir.join("base.bin"), &base).unwrap();
    std::fs::write(dir.join("left.bin"), f32_bytes(&[0.25; 8 * 4])).unwrap();
    std::fs::write(dir.join("right.bin"), f32_bytes(&[0.5; 4 * 16])).unwrap();
    std::fs::write(dir.join("factors.bin"), f32_bytes(&[2.0; 8])).unwrap();
    let launch = merge_launch(Dtype::BF16, Dtype::BF16, case.block.1, case.shape.1).unwrap();
    assert_eq!(launch.kernel, "lora_merge_tile_bb");
    let go = |factor_mode: i64| launch_on_host(&launch, &[0, 0, 4, factor_mode, 8, 16, 0], &dir);
    let plain = go(0);
    let scaled = go(1);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_ne!(plain, scaled);
    // Plain: every element is W + 4 · 0.25 · 0.5 = W + 0.5, rounded to BF16.
    for (i, v) in plain.chunks(2).enumerate() {
        let w = f32::from_bits(((0x3c00u32 + i as u32) & 0xffff) << 16);
        let want = ((w + 0.5).to_bits() + 0x7fff + (((w + 0.5).to_bits() >> 16) & 1)) >> 16;
        assert_eq!(u16::from_le_bytes([v[0], v[1]]) as u32, want, "element {i}");
    }
}

#[test]
fn tile_kernel_is_chosen_for_16_bit_bases_of_widths_divisible_by_4() {
    use Dtype::{BF16, F16, F32};
    let pairs = [
        (BF16, BF16, "lora_merge_tile_bb"),
        (BF16, F16, "lora_merge_tile_bh"),
        (F16, BF16, "lora_merge_tile_hb"),
        (F16, F16, "lora_merge_tile_hh"),
    ];
    for (base, out, kernel) in pairs {
        for rows in [1, 7, 128, 4096, 14336, 152064] {
            for cols in [4, 36, 4096, 14336] {
                let l = merge_launch(base, out, rows, cols).unwrap();
                assert_eq!(l.kernel, kernel);
                // Every column tile, every row tile (up to the grid's limit, strided beyond).
                assert_eq!(l.grid.0 as usize, cols.div_ceil(TILE_COLS), "{l:?}");
                assert_eq!(
                    l.grid.1 as usize,
                    rows.div_ceil(TILE_ROWS).min(65535),
                    "{l:?}"
                );
                assert_eq!(l.block, (256, 1, 1));
            }
        }
    }
    assert_eq!(
        merge_launch(F32, BF16, 64, 4096).unwrap().kernel,
        "lora_merge"
    );
    assert_eq!(
        merge_launch(BF16, F16, 64, 4098).unwrap().kernel,
        "lora_merge"
    );
    // The tile kernels' 32-bit offsets within a tile: wider tensors take lora_merge.
    assert_eq!(
        merge_launch(BF16, BF16, 64, TILE_MAX_COLS - 4)
            .unwrap()
            .kernel,
        "lora_merge_tile_bb"
    );
    assert_eq!(
        merge_launch(BF16, BF16, 64, TILE_MAX_COLS).unwrap().kernel,
        "lora_merge"
    );
    assert!(tile_launch(BF16, BF16, 64, TILE_MAX_COLS, 65535).is_none());
    assert!(merge_launch(BF16, F32, 64, 4096).is_none());
    assert!(merge_launch(Dtype::I32, BF16, 64, 4096).is_none());
    let strided = tile_launch(BF16, BF16, 100_000_000, 4096, 3).unwrap();
    assert_eq!(strided.grid.1, 3);
}

#[test]
fn gptq_dequant_kernel_gives_the_cpu_bits_on_every_gptq_fixture() {
    use lora_kernels::dequant::GptqLayer;
    let root = crate_dir().join("../../fixtures/quantized");
    let mut layers = 0;
    for name in [
        "tiny-llama-gptq-4bit",
        "tiny-llama-gptq-3bit-actorder",
        "tiny-llama-gptq-8bit",
        "tiny-llama-gptq-2bit-v2",
    ] {
        let c = st_io::Checkpoint::open(root.join(name)).unwrap();
        let linears = st_io::quant::quantized_linears(&c).unwrap();
        for l in &linears {
            let layer = GptqLayer::from_checkpoint(&c, l).unwrap();
            let want: Vec<u32> = layer
                .to_f32()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let dir = std::env::temp_dir()
                .join(format!("ws-kernel-host-dq-{}-{layers}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("qweight.bin"), layer.qweight).unwrap();
            std::fs::write(dir.join("qzeros.bin"), layer.qzeros).unwrap();
            std::fs::write(dir.join("scales.bin"), layer.scales).unwrap();
            let g_idx: Vec<u8> = layer
                .g_idx
                .iter()
                .flat_map(|&g| (g as i32).to_le_bytes())
                .collect();
            std::fs::write(dir.join("g_idx.bin"), g_idx).unwrap();
            let scales_kind = match layer.scales_dtype {
                Dtype::BF16 => 0,
                Dtype::F16 => 1,
                _ => 2,
            };
            let launch = gptq_dequant_launch(layer.in_features, layer.out_features);
            let params = [
                scales_kind,
                layer.params.bits as i64,
                layer.params.zero_offset as i64,
                layer.in_features as i64,
                layer.out_features as i64,
            ];
            let got: Vec<u32> = launch_on_host(&launch, &params, &dir)
                .chunks(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            std::fs::remove_dir_all(&dir).unwrap();
            assert_eq!(got.len(), want.len(), "{name}: {}", l.module);
            if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
                panic!(
                    "{name}: {}: element {i} (output {}, input {}) is {}, the CPU gives {}",
                    l.module,
                    i / layer.in_features,
                    i % layer.in_features,
                    f32::from_bits(got[i]),
                    f32::from_bits(want[i])
                );
            }
            layers += 1;
        }
    }
    assert!(
        layers >= 4 * 7,
        "only {layers} GPTQ layers found in the fixtures"
    );
}

/// On the GPU: `GpuMerger::merge_rows` refuses every size its kernel would index past —
/// factors of another shape, rows past the factors, a base shorter than the rows, output that
/// is not whole rows — with an error, before any launch (the host twin `cpu::merge_rows`
/// refuses the same through its own checks).
#[test]
fn the_gpu_merge_refuses_sizes_its_buffers_do_not_have() {
    if !device_present() {
        eprintln!(
            "skipped (WEIGHTSMITH_REQUIRE_GPU unset): no CUDA device; scripts/gpu-check.sh runs it"
        );
        return;
    }
    use lora_kernels::{LoraProduct, LoraTerm};
    let merger = lora_kernels::gpu::GpuMerger::new(0).unwrap();
    // A [4, 8] weight, rank 2.
    let (a, b) = (vec![0.5f32; 2 * 8], vec![0.25f32; 4 * 2]);
    let product = LoraProduct::new(
        4,
        8,
        false,
        &[LoraTerm {
            a: &a,
            b: &b,
            rank: 2,
            scale: 1.0,
        }],
    )
    .unwrap();
    let t = merger.prepare(Some(&product), None).unwrap();
    let base = vec![0u8; 4 * 8 * 2];
    let mut out = vec![0u8; 4 * 8 * 2];
    // The right shape merges.
    merger
        .merge_rows(&t, &base, Dtype::BF16, 8, 0, Dtype::BF16, &mut out)
        .unwrap();
    for (cols, first_row, base_len, out_len, what) in [
        (16, 0, 4 * 16 * 2, 2 * 16 * 2, "columns of another shape"),
        (8, 3, 8 * 8 * 2, 2 * 8 * 2, "rows past the factors"),
        (8, 0, 2 * 8 * 2, 4 * 8 * 2, "a base shorter than the rows"),
        (8, 0, 4 * 8 * 2, 8 * 2 + 2, "output that is not whole rows"),
    ] {
        let base = vec![0u8; base_len];
        let mut out = vec![0u8; out_len];
        let e = merger.merge_rows(
            &t,
            &base,
            Dtype::BF16,
            cols,
            first_row,
            Dtype::BF16,
            &mut out,
        );
        assert!(e.is_err(), "{what}: accepted");
    }
    // Still usable after the refusals.
    merger
        .merge_rows(&t, &base, Dtype::BF16, 8, 0, Dtype::BF16, &mut out)
        .unwrap();
}
