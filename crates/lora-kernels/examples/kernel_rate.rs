//! The merge kernel's own rate on a GPU, with no host copies: the kernel the merge picks
//! (`gpu::merge_launch`) over a device-resident 16-bit weight, launched back to back, timed from the first launch to the
//! synchronisation after the last. Bytes counted: W read + W' written (the LoRA factors are a
//! few MB and stay in L2).
//!
//!     cargo run --release -p lora-kernels --example kernel_rate -- [ROWS COLS RANK ROWS_PER_LAUNCH]
//!
//! Default: a Llama-3-8B MLP weight, 14336 × 4096 BF16, r = 16, the whole tensor per launch;
//! `scripts/device-kernel-rate.sh` runs it beside torch's device copy (the memory ceiling) and
//! torch's `addmm` merge on the same shape.
//!
//! To compare kernels: `WEIGHTSMITH_MERGE_KERNEL=NAME` runs that one instead (`lora_merge_v8`
//! or any of `gpu::REGISTER_VARIANTS`), `WEIGHTSMITH_MERGE_BLOCKS=N` gives a register
//! variant's launch that target of blocks, `WEIGHTSMITH_MERGE_PTX=FILE` loads that PTX instead
//! of the embedded one and `WEIGHTSMITH_MERGE_ROWS=N` the rows per thread its `lora_merge_v8`
//! was built for (`nvcc -ptx -arch=compute_75 -fmad=false -DWS_ROWS=N kernels/merge.cu`).

use std::time::Instant;

use gpu_mem::cuda::{Context, DeviceAlloc, KernelArg, Module, Stream};
use lora_kernels::gpu::{
    general_launch, register_launch, register_variant, KernelLaunch, MERGE_PTX, MERGE_V8_ROWS,
    REGISTER_TARGET_BLOCKS, REGISTER_VARIANTS,
};

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
    let rows_per_thread = match std::env::var("WEIGHTSMITH_MERGE_ROWS") {
        Ok(n) => n.parse::<usize>()?.max(1),
        Err(_) => MERGE_V8_ROWS,
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
    // BF16 weights near 0.02 and f32 factors near 0.01 (no zero in `left`: zero terms are
    // skipped by the kernel, which would flatter it).
    let w = fill(rows * cols * 2, &|i| if i % 2 == 0 { 0x23 } else { 0x3c })?;
    let f32_bytes = 0.01f32.to_le_bytes();
    let left = fill(rows * rank * 4, &|i| f32_bytes[i % 4])?;
    let right = fill(rank * cols * 4, &|i| f32_bytes[i % 4])?;
    let out = DeviceAlloc::new(&ctx, rows * cols * 2)?;
    let forced = std::env::var("WEIGHTSMITH_MERGE_KERNEL").ok();
    let blocks = match std::env::var("WEIGHTSMITH_MERGE_BLOCKS") {
        Ok(n) => n.parse::<usize>()?.max(1),
        Err(_) => REGISTER_TARGET_BLOCKS,
    };
    let variant = match forced.as_deref() {
        None | Some("lora_merge_v8") => None,
        Some(name) => Some(
            *REGISTER_VARIANTS
                .iter()
                .find(|v| v.kernel == name)
                .ok_or_else(|| format!("no merge kernel {name}"))?,
        ),
    };
    if let Some(v) = &variant {
        if !v.takes(rank, cols) {
            return Err(
                format!("{} does not take rank {rank} over {cols} columns", v.kernel).into(),
            );
        }
    }
    if forced.as_deref() == Some("lora_merge_v8") && cols % 8 != 0 {
        return Err("cols must be a multiple of 8 for lora_merge_v8".into());
    }
    // lora_merge_v8 with the rows per thread its PTX was built for.
    let v8 = |n: usize| KernelLaunch {
        kernel: "lora_merge_v8",
        grid: (
            ((cols / 8) as u32).div_ceil(256),
            (n.div_ceil(rows_per_thread) as u32).clamp(1, 65535),
            1,
        ),
        block: (256, 1, 1),
    };
    let pick = |n: usize| -> KernelLaunch {
        match (&variant, forced.as_deref()) {
            (Some(v), _) => register_launch(v, n, cols, blocks),
            (None, Some(_)) => v8(n),
            (None, None) => match register_variant(2, cols, rank, true) {
                Some(v) => register_launch(&v, n, cols, blocks),
                None if cols % 8 == 0 => v8(n),
                None => general_launch(2, n, cols),
            },
        }
    };
    let launched = pick(per_launch);
    let launch = |first: usize, n: usize| -> Result<(), gpu_mem::Error> {
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
        // rows × cols BF16 values, left rows × rank and right rank × cols f32, `left` has no
        // zero; the launch is one `pick` allows for this shape.
        unsafe { module.launch(kernel, grid, block, &stream, &args) }
    };
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
    let bytes = (rows * cols * 2 * 2) as f64;
    println!(
        "{{\"label\": \"weightsmith-{}\", \"ptx\": \"{label}\", \"grid\": [{}, {}], \"rows\": {rows}, \"cols\": {cols}, \"rank\": {rank}, \"rows_per_launch\": {per_launch}, \"ms\": {:.3}, \"gb_per_s\": {:.1}}}",
        launched.kernel,
        launched.grid.0,
        launched.grid.1,
        seconds * 1e3,
        bytes / seconds / 1e9
    );
    Ok(())
}
