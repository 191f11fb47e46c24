//! The merge kernel's own rate on a GPU, with no host copies: the kernel the merge picks
//! (`gpu::merge_launch`) over a device-resident 16-bit weight, launched back to back, timed from the first launch to the
//! synchronisation after the last. Bytes counted: W read + W' written (the LoRA factors are a
//! few MB and stay in L2).
//!
//!     cargo run --release -p lora-kernels --example kernel_rate -- [ROWS COLS RANK ROWS_PER_LAUNCH]
//!
//! Default: a Llama-3-8B MLP weight, 14336 × 4096 BF16, r = 16, the whole tensor per launch;
//! `scripts/device/kernel-rate.sh` runs it beside torch's device copy (the memory ceiling) and
//! torch's `addmm` merge on the same shape.
//!
//! To compare kernels: `WEIGHTSMITH_MERGE_KERNEL=NAME` runs that kernel of the PTX instead,
//! `lora_merge` with its own launch, any other name with a tile launch of
//! `WEIGHTSMITH_MERGE_TILE_ROWS` × `WEIGHTSMITH_MERGE_TILE_COLS` (default `gpu::TILE_ROWS` ×
//! `gpu::TILE_COLS`) and at most about `WEIGHTSMITH_MERGE_BLOCKS` blocks;
//! `WEIGHTSMITH_MERGE_PTX=FILE` loads that PTX instead of the embedded one. Either way the
//! output is then compared with the embedded PTX's BF16 → BF16 merge of the same inputs
//! (`bytes_differing_from_default`: 0 for a kernel that gives the same bits; not 0 for kernels
//! of other dtypes, which read the BF16 test weights as theirs).

use std::time::Instant;

use gpu_mem::cuda::{Context, DeviceAlloc, KernelArg, Module, Stream};
use lora_kernels::gpu::{
    merge_launch, scalar_launch, KernelLaunch, MERGE_PTX, TILE_COLS, TILE_ROWS,
};
use st_io::Dtype;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (rows, cols, rank) = (arg(0, 14336), arg(1, 4096), arg(2, 16));
    let per_launch = arg(3, rows).clamp(1, rows);
    if !gpu_mem::cuda::driver_available() || gpu_mem::cuda::device_count() == 0 {
        return Err("no CUDA device".into());
    }
    let ctx = Context::new(0)?;
    let (ptx, label) = match std::env::var("WEIGHTSMITH_MERGE_PTX") {
        Ok(path) => (std::fs::read_to_string(&path)?, path),
        Err(_) => (MERGE_PTX.to_string(), "embedded".to_string()),
    };
    let module = Module::load_ptx(&ctx, &ptx)?;
    let stream = Stream::new(&ctx)?;
    let fill = |bytes: usize, f: &dyn Fn(usize) -> u8| -> Result<DeviceAlloc, gpu_mem::Error> {
        let host: Vec<u8> = (0..bytes).map(f).collect();
        let a = DeviceAlloc::new(&ctx, bytes)?;
        // SAFETY: `host` lives until the synchronisation below.
        unsafe { a.copy_from_host_async(0, &host, &stream)? };
        stream.synchronize()?;
        Ok(a)
    };
    // Pseudo-random BF16 weights of magnitude 2^-7 .. 2^-4 with either sign, and f32 factors
    // of magnitude below 0.02: varied bits, so a kernel that differs from the default one
    // shows it in the comparison below.
    let hash = |i: usize| -> u32 {
        let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        (x >> 32) as u32
    };
    let w = fill(rows * cols * 2, &|i| {
        let h = hash(i / 2);
        let v = ((h & 0x8000) | ((120 + (h >> 16) % 4) << 7) | (h & 0x7f)) as u16;
        v.to_le_bytes()[i % 2]
    })?;
    let small = |seed: usize| {
        move |i: usize| {
            let h = hash(seed + i / 4);
            let v = ((h % 20001) as f32 - 10000.0) * 2e-6;
            v.to_le_bytes()[i % 4]
        }
    };
    let left = fill(rows * rank * 4, &small(1 << 40))?;
    let right = fill(rank * cols * 4, &small(1 << 41))?;
    let out = DeviceAlloc::new(&ctx, rows * cols * 2)?;
    // Leaked once: a launch names its kernel with a `&'static str`.
    let forced: Option<&'static str> = std::env::var("WEIGHTSMITH_MERGE_KERNEL")
        .ok()
        .map(|name| &*name.leak());
    let env_or = |name: &str, default: usize| -> Result<usize, std::num::ParseIntError> {
        std::env::var(name).map_or(Ok(default), |n| Ok(n.parse::<usize>()?.max(1)))
    };
    let tile_cols = env_or("WEIGHTSMITH_MERGE_TILE_COLS", TILE_COLS)?;
    let tile_rows = env_or("WEIGHTSMITH_MERGE_TILE_ROWS", TILE_ROWS)?;
    // A target of blocks: fewer row tiles in the grid, the kernel striding over the rest.
    let target_blocks = env_or("WEIGHTSMITH_MERGE_BLOCKS", usize::MAX)?;
    if cols % 4 != 0 && forced != Some("lora_merge") {
        return Err("cols must be a multiple of 4 for the tile kernels".into());
    }
    let pick = |n: usize| -> KernelLaunch {
        match forced {
            None => merge_launch(Dtype::BF16, Dtype::BF16, n, cols).expect("BF16 is merged"),
            Some("lora_merge") => scalar_launch(n, cols),
            Some(name) => KernelLaunch {
                kernel: name,
                grid: (
                    cols.div_ceil(tile_cols) as u32,
                    (n.div_ceil(tile_rows)
                        .min(target_blocks.div_ceil(cols.div_ceil(tile_cols)))
                        as u32)
                        .clamp(1, 65535),
                    1,
                ),
                block: (256, 1, 1),
            },
        }
    };
    let launched = pick(per_launch);
    let launch_into = |module: &Module,
                       out: &DeviceAlloc,
                       pick: &dyn Fn(usize) -> KernelLaunch,
                       first: usize,
                       n: usize|
     -> Result<(), gpu_mem::Error> {
        let offset = (first * cols * 2) as u64;
        let args = [
            KernelArg::Ptr(w.device_ptr() + offset),
            KernelArg::I32(0),
            KernelArg::Ptr(left.device_ptr()),
            KernelArg::Ptr(right.device_ptr()),
            KernelArg::I32(rank as i32),
            KernelArg::Ptr(0),
            KernelArg::I32(0),
            KernelArg::Ptr(out.device_ptr() + offset),
            KernelArg::I32(0),
            KernelArg::I64(n as i64),
            KernelArg::I64(cols as i64),
            KernelArg::I64(first as i64),
        ];
        let KernelLaunch {
            kernel,
            grid,
            block,
        } = pick(n);
        // SAFETY: the arguments match the merge kernels' (kernels/merge.cu); W and out hold
        // rows × cols BF16 values, left rows × rank and right rank × cols f32; the launch
        // covers rows × cols in the tiles of the kernel named (a wrong name fails to launch).
        unsafe { module.launch(kernel, grid, block, &stream, &args) }
    };
    let launch = |first: usize, n: usize| launch_into(&module, &out, &pick, first, n);
    let pass = || -> Result<(), gpu_mem::Error> {
        let mut first = 0;
        while first < rows {
            let n = per_launch.min(rows - first);
            launch(first, n)?;
            first += n;
        }
        Ok(())
    };
    pass()?;
    stream.synchronize()?;
    let iterations = 50;
    let started = Instant::now();
    for _ in 0..iterations {
        pass()?;
    }
    stream.synchronize()?;
    let seconds = started.elapsed().as_secs_f64() / iterations as f64;
    // The kernel timed against the embedded PTX's own choice on the same inputs: the number
    // of output bytes that differ (0 when it is that kernel).
    let mut differ = 0usize;
    if forced.is_some() || label != "embedded" {
        let reference = Module::load_ptx(&ctx, MERGE_PTX)?;
        let expected = DeviceAlloc::new(&ctx, rows * cols * 2)?;
        let default_pick =
            |n: usize| merge_launch(Dtype::BF16, Dtype::BF16, n, cols).expect("BF16 is merged");
        launch_into(&reference, &expected, &default_pick, 0, rows)?;
        stream.synchronize()?;
        let mut a = vec![0u8; rows * cols * 2];
        let mut b = vec![0u8; rows * cols * 2];
        out.copy_to_host(0, &mut a)?;
        expected.copy_to_host(0, &mut b)?;
        differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    }
    let bytes = (rows * cols * 2 * 2) as f64;
    println!(
        "{{\"label\": \"weightsmith-{}\", \"ptx\": \"{label}\", \"grid\": [{}, {}], \"rows\": {rows}, \"cols\": {cols}, \"rank\": {rank}, \"rows_per_launch\": {per_launch}, \"ms\": {:.3}, \"gb_per_s\": {:.1}, \"bytes_differing_from_default\": {differ}}}",
        launched.kernel,
        launched.grid.0,
        launched.grid.1,
        seconds * 1e3,
        bytes / seconds / 1e9
    );
    Ok(())
}
