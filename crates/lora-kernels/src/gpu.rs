//! The merge on a CUDA device: `kernels/merge.cu`, compiled to PTX by `cargo xtask
//! build-kernels` and embedded, runs the same arithmetic as [`crate::cpu`], so the two give the
//! same bits (a device test checks it). A [`GpuMerger`] holds the device's context, the loaded
//! module and a stream; [`GpuTensor`] holds one tensor's LoRA factors on the device.

use std::sync::{Arc, Mutex};

use gpu_mem::cuda::{Context, DeviceAlloc, KernelArg, Module, PinnedBuffer, Stream};
use rayon::prelude::*;
use st_io::Dtype;

use crate::cpu::{stats_of, DoraScale, LoraProduct, MergeStats};
use crate::dequant::GptqLayer;
use crate::{Error, Result};

/// The PTX of `kernels/merge.cu` (PTX ISA 8.4, compute_75: JITs on drivers from CUDA 12.4).
pub const MERGE_PTX: &str = include_str!("../ptx/merge.ptx");
/// The PTX of `kernels/dequant.cu` (same target).
pub const DEQUANT_PTX: &str = include_str!("../ptx/dequant.ptx");

/// Which kernel runs and its launch shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLaunch {
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// Rows and columns of the tile one `lora_merge_tile_*` block merges (16 · R and 64 · H of
/// `WS_TILE_KERNEL` in kernels/merge.cu).
pub const TILE_ROWS: usize = 64;
pub const TILE_COLS: usize = 128;
/// The tile kernels' widest tensor: their offsets within a tile are 32-bit.
pub const TILE_MAX_COLS: usize = 1 << 24;

/// The launch that merges a block of `rows` stored rows of `cols` columns of a `base` weight
/// into `out`, whatever the rank: for a 16-bit base whose width is divisible by 4 (every
/// projection and embedding of the models we merge) and below [`TILE_MAX_COLS`], the tile
/// kernel built for that pair of dtypes ([`tile_launch`]); else `lora_merge` (an F32 base, odd
/// or wider widths). `None` for dtypes the merge does not read or write.
pub fn merge_launch(base: Dtype, out: Dtype, rows: usize, cols: usize) -> Option<KernelLaunch> {
    if !out.is_half() || !matches!(base, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
        return None;
    }
    Some(match tile_launch(base, out, rows, cols, 65535) {
        Some(tile) if cols % 4 == 0 => tile,
        _ => scalar_launch(rows, cols),
    })
}

/// The tile kernel for a 16-bit `base` and `out` over `rows` × `cols`: a block per tile of
/// [`TILE_ROWS`] × [`TILE_COLS`], at most `max_row_tiles` blocks down the rows (the kernel
/// strides over the rest). `None` for other dtypes, or `cols` of [`TILE_MAX_COLS`] or more.
pub fn tile_launch(
    base: Dtype,
    out: Dtype,
    rows: usize,
    cols: usize,
    max_row_tiles: u32,
) -> Option<KernelLaunch> {
    let kernel = match (base, out) {
        (Dtype::BF16, Dtype::BF16) => "lora_merge_tile_bb",
        (Dtype::BF16, Dtype::F16) => "lora_merge_tile_bh",
        (Dtype::F16, Dtype::BF16) => "lora_merge_tile_hb",
        (Dtype::F16, Dtype::F16) => "lora_merge_tile_hh",
        _ => return None,
    };
    if cols >= TILE_MAX_COLS {
        return None;
    }
    Some(KernelLaunch {
        kernel,
        grid: (
            (cols.div_ceil(TILE_COLS) as u32).max(1),
            (rows.div_ceil(TILE_ROWS) as u32).clamp(1, max_row_tiles.clamp(1, 65535)),
            1,
        ),
        block: (256, 1, 1),
    })
}

/// `lora_merge`, one element per thread: any base dtype and width.
pub fn scalar_launch(rows: usize, cols: usize) -> KernelLaunch {
    KernelLaunch {
        kernel: "lora_merge",
        grid: (
            (cols as u32).div_ceil(256).max(1),
            (rows as u32).clamp(1, 65535),
            1,
        ),
        block: (256, 1, 1),
    }
}

/// The launch of `gptq_dequant` (kernels/dequant.cu) for a layer of `in_features` inputs and
/// `out_features` outputs: a thread per input row, output rows strided by the grid's y.
pub fn gptq_dequant_launch(in_features: usize, out_features: usize) -> KernelLaunch {
    KernelLaunch {
        kernel: "gptq_dequant",
        grid: (
            (in_features as u32).div_ceil(256),
            (out_features as u32).clamp(1, 65535),
            1,
        ),
        block: (256, 1, 1),
    }
}

fn gpu(e: gpu_mem::Error) -> Error {
    Error::Gpu {
        message: e.to_string(),
    }
}

/// The merge kernel loaded on one device, with scratch buffers reused from block to block:
/// device memory for a block's base and output, and pinned host staging for both, so the
/// copies run at PCIe speed (pageable copies go through the driver's bounce buffers at a
/// fraction of it) and nothing is allocated per block.
pub struct GpuMerger {
    ctx: Arc<Context>,
    module: Module,
    dequant: Module,
    stream: Stream,
    scratch: Mutex<Scratch>,
    /// WEIGHTSMITH_TRACE: stages timed apart (a synchronisation after each), summed, and
    /// printed when the merger is dropped.
    trace: Option<Mutex<Trace>>,
}

#[derive(Default)]
struct Trace {
    blocks: u64,
    bytes_in: u64,
    bytes_out: u64,
    stage_in: f64,
    h2d: f64,
    kernel: f64,
    d2h: f64,
    stage_out: f64,
}

impl Drop for GpuMerger {
    fn drop(&mut self) {
        if let Some(t) = self.trace.as_ref().and_then(|t| t.lock().ok()) {
            let gbs = |b: u64, s: f64| b as f64 / s.max(1e-9) / 1e9;
            tracing::debug!(
                "gpu merge trace: {} blocks, {:.2} GB in, {:.2} GB out; staging in {:.2} s ({:.1} GB/s), H2D {:.2} s ({:.1} GB/s), kernel {:.2} s ({:.1} GB/s of base+out), D2H {:.2} s ({:.1} GB/s), staging out + stats {:.2} s",
                t.blocks,
                t.bytes_in as f64 / 1e9,
                t.bytes_out as f64 / 1e9,
                t.stage_in,
                gbs(t.bytes_in, t.stage_in),
                t.h2d,
                gbs(t.bytes_in, t.h2d),
                t.kernel,
                gbs(t.bytes_in + t.bytes_out, t.kernel),
                t.d2h,
                gbs(t.bytes_out, t.d2h),
                t.stage_out,
            );
        }
    }
}

#[derive(Default)]
struct Scratch {
    d_base: Option<DeviceAlloc>,
    d_out: Option<DeviceAlloc>,
    pin_in: Option<PinnedBuffer>,
    pin_out: Option<PinnedBuffer>,
}

/// At least 64 MiB, else the next power of two: a few sizes cover a whole model.
fn scratch_len(n: usize) -> usize {
    n.max(64 << 20).next_power_of_two()
}

fn ensure_device(ctx: &Arc<Context>, slot: &mut Option<DeviceAlloc>, n: usize) -> Result<()> {
    if slot.as_ref().is_none_or(|a| a.len() < n) {
        *slot = None;
        *slot = Some(DeviceAlloc::new(ctx, scratch_len(n)).map_err(gpu)?);
    }
    Ok(())
}

fn ensure_pinned(ctx: &Arc<Context>, slot: &mut Option<PinnedBuffer>, n: usize) -> Result<()> {
    if slot.as_ref().is_none_or(|a| a.as_slice().len() < n) {
        *slot = None;
        *slot = Some(PinnedBuffer::new(ctx, scratch_len(n)).map_err(gpu)?);
    }
    Ok(())
}

/// `dst.copy_from_slice(src)` on all cores (one core's memcpy is well below PCIe speed).
fn parallel_copy(dst: &mut [u8], src: &[u8]) {
    const CHUNK: usize = 2 << 20;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

impl GpuMerger {
    pub fn new(ordinal: u32) -> Result<GpuMerger> {
        let ctx = Context::new(ordinal).map_err(gpu)?;
        let module = Module::load_ptx(&ctx, MERGE_PTX).map_err(gpu)?;
        let dequant = Module::load_ptx(&ctx, DEQUANT_PTX).map_err(gpu)?;
        let stream = Stream::new(&ctx).map_err(gpu)?;
        Ok(GpuMerger {
            ctx,
            module,
            dequant,
            stream,
            scratch: Mutex::new(Scratch::default()),
            trace: tracing::enabled!(tracing::Level::DEBUG).then(|| Mutex::new(Trace::default())),
        })
    }

    fn upload(&self, values: &[f32]) -> Result<DeviceAlloc> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = DeviceAlloc::new(&self.ctx, bytes.len()).map_err(gpu)?;
        // SAFETY: `bytes` lives until the stream is synchronised just below.
        unsafe {
            a.copy_from_host_async(0, &bytes, &self.stream)
                .map_err(gpu)?
        };
        self.stream.synchronize().map_err(gpu)?;
        Ok(a)
    }

    /// Dequantises a GPTQ layer on the device (`gptq_dequant` in kernels/dequant.cu), the twin
    /// of [`GptqLayer::dequantize`]: the same f32 values, bit for bit.
    pub fn dequantize_gptq(&self, layer: &GptqLayer) -> Result<Vec<f32>> {
        layer.check_sizes()?;
        let (inp, outf) = (layer.in_features, layer.out_features);
        let mut values = vec![0f32; inp * outf];
        if values.is_empty() {
            return Ok(values);
        }
        let scales_kind = match layer.scales_dtype {
            Dtype::BF16 => 0,
            Dtype::F16 => 1,
            Dtype::F32 => 2,
            other => return Err(Error::Dtype { dtype: other }),
        };
        let g_idx: Vec<u8> = layer
            .g_idx
            .iter()
            .flat_map(|g| (*g as i32).to_le_bytes())
            .collect();
        let put = |bytes: &[u8]| -> Result<DeviceAlloc> {
            let a = DeviceAlloc::new(&self.ctx, bytes.len().max(4)).map_err(gpu)?;
            // SAFETY: `bytes` outlives the synchronisation at the end of this function.
            unsafe {
                a.copy_from_host_async(0, bytes, &self.stream)
                    .map_err(gpu)?
            };
            Ok(a)
        };
        let d_q = put(layer.qweight)?;
        let d_z = put(layer.qzeros)?;
        let d_s = put(layer.scales)?;
        let d_g = put(&g_idx)?;
        // The result goes through the merger's reused device buffer and pinned staging (a
        // pageable download runs at a fraction of PCIe speed), then to `values` on all cores.
        let bytes = values.len() * 4;
        let mut guard = self.scratch.lock().map_err(|_| Error::Gpu {
            message: "the GPU merger's scratch lock was poisoned".into(),
        })?;
        let sc = &mut *guard;
        ensure_device(&self.ctx, &mut sc.d_base, bytes)?;
        ensure_pinned(&self.ctx, &mut sc.pin_in, bytes)?;
        let (Some(d_out), Some(pinned)) = (sc.d_base.as_ref(), sc.pin_in.as_mut()) else {
            unreachable!("scratch buffers were just ensured");
        };
        let args = [
            KernelArg::Ptr(d_q.device_ptr()),
            KernelArg::Ptr(d_z.device_ptr()),
            KernelArg::Ptr(d_s.device_ptr()),
            KernelArg::I32(scales_kind),
            KernelArg::Ptr(d_g.device_ptr()),
            KernelArg::I32(layer.params.bits as i32),
            KernelArg::I32(layer.params.zero_offset as i32),
            KernelArg::I64(inp as i64),
            KernelArg::I64(outf as i64),
            KernelArg::Ptr(d_out.device_ptr()),
        ];
        let KernelLaunch {
            kernel,
            grid,
            block,
        } = gptq_dequant_launch(inp, outf);
        let staged = &mut pinned.as_mut_slice()[..bytes];
        // SAFETY: the arguments match `gptq_dequant`'s parameters; qweight holds in·bits/32 ×
        // out words, qzeros groups × out·bits/32, scales groups × out, g_idx `in` values below
        // `groups` (checked by GptqLayer::from_checkpoint), out at least in × out floats. The
        // pinned buffer is not touched by the host until the synchronisation.
        unsafe {
            self.dequant
                .launch(kernel, grid, block, &self.stream, &args)
                .map_err(gpu)?;
            d_out
                .copy_to_host_async(0, staged, &self.stream)
                .map_err(gpu)?;
        }
        self.stream.synchronize().map_err(gpu)?;
        parallel_copy(bytemuck::cast_slice_mut(&mut values), staged);
        Ok(values)
    }

    /// Puts one tensor's LoRA factors (and DoRA factors) on the device.
    pub fn prepare(
        &self,
        product: Option<&LoraProduct>,
        dora: Option<&DoraScale>,
    ) -> Result<GpuTensor> {
        Ok(GpuTensor {
            left: product.map(|p| self.upload(p.left())).transpose()?,
            right: product.map(|p| self.upload(p.right())).transpose()?,
            rank: product.map_or(0, |p| p.rank()),
            shape: product.map(|p| (p.stored_rows, p.stored_cols)),
            factors: dora.map(|d| self.upload(d.factors())).transpose()?,
            factor_per_column: dora.is_some_and(|d| d.transposed()),
        })
    }

    /// Merges stored rows `first_row ..` into `out`, like [`crate::cpu::merge_rows`] (its host
    /// twin), with `base` the whole stored tensor.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_rows(
        &self,
        t: &GpuTensor,
        base: &[u8],
        base_dtype: Dtype,
        cols: usize,
        first_row: usize,
        out_dtype: Dtype,
        out: &mut [u8],
    ) -> Result<MergeStats> {
        let (size, base_kind) = match base_dtype {
            Dtype::BF16 => (2, 0),
            Dtype::F16 => (2, 1),
            Dtype::F32 => (4, 2),
            other => return Err(Error::Dtype { dtype: other }),
        };
        let out_kind = match out_dtype {
            Dtype::BF16 => 0,
            Dtype::F16 => 1,
            other => return Err(Error::Dtype { dtype: other }),
        };
        if cols == 0 || out.is_empty() {
            return Ok(MergeStats::default());
        }
        // Every size the kernel indexes by, checked against the buffers (none is trusted).
        let shape_error = |message: String| Error::Shape { message };
        if out.len() % (cols * 2) != 0 {
            return Err(shape_error(format!(
                "an output of {} bytes is not whole rows of {cols} 16-bit values",
                out.len()
            )));
        }
        let rows = out.len() / (cols * 2);
        let end_row = first_row
            .checked_add(rows)
            .ok_or_else(|| shape_error(format!("rows {first_row} + {rows} overflow")))?;
        let src_range = first_row
            .checked_mul(cols * size)
            .zip(end_row.checked_mul(cols * size))
            .filter(|&(_, end)| end <= base.len())
            .ok_or_else(|| {
                shape_error(format!(
                    "rows {first_row}..{end_row} of {cols} columns run past a base of {} bytes",
                    base.len()
                ))
            })?;
        if let Some((stored_rows, stored_cols)) = t.shape {
            if stored_cols != cols || end_row > stored_rows {
                return Err(shape_error(format!(
                    "rows {first_row}..{end_row} × {cols} columns do not fit the factors' {stored_rows} × {stored_cols}"
                )));
            }
        }
        if let Some(f) = &t.factors {
            let needed = if t.factor_per_column { cols } else { end_row };
            if f.len() < needed * 4 {
                return Err(shape_error(format!(
                    "{} DoRA factors for {needed} {}",
                    f.len() / 4,
                    if t.factor_per_column {
                        "columns"
                    } else {
                        "rows"
                    }
                )));
            }
        }
        let src = &base[src_range.0..src_range.1];
        let mut guard = self.scratch.lock().map_err(|_| Error::Gpu {
            message: "the GPU merger's scratch lock was poisoned".into(),
        })?;
        let sc = &mut *guard;
        ensure_device(&self.ctx, &mut sc.d_base, src.len())?;
        ensure_device(&self.ctx, &mut sc.d_out, out.len())?;
        ensure_pinned(&self.ctx, &mut sc.pin_in, src.len())?;
        ensure_pinned(&self.ctx, &mut sc.pin_out, out.len())?;
        let (Some(d_base), Some(d_out), Some(pin_in), Some(pin_out)) = (
            sc.d_base.as_ref(),
            sc.d_out.as_ref(),
            sc.pin_in.as_mut(),
            sc.pin_out.as_mut(),
        ) else {
            unreachable!("scratch buffers were just ensured");
        };
        let tracing = self.trace.is_some();
        let mut clock = std::time::Instant::now();
        let mut lap = |sync: bool| -> Result<f64> {
            if tracing && sync {
                self.stream.synchronize().map_err(gpu)?;
            }
            let e = clock.elapsed().as_secs_f64();
            clock = std::time::Instant::now();
            Ok(e)
        };
        let staged_in = &mut pin_in.as_mut_slice()[..src.len()];
        parallel_copy(staged_in, src);
        let t_stage_in = lap(false)?;
        let ptr =
            |a: &Option<DeviceAlloc>| KernelArg::Ptr(a.as_ref().map_or(0, |a| a.device_ptr()));
        let args = [
            KernelArg::Ptr(d_base.device_ptr()),
            KernelArg::I32(base_kind),
            ptr(&t.left),
            ptr(&t.right),
            KernelArg::I32(t.rank as i32),
            ptr(&t.factors),
            KernelArg::I32(t.factor_per_column as i32),
            KernelArg::Ptr(d_out.device_ptr()),
            KernelArg::I32(out_kind),
            KernelArg::I64(rows as i64),
            KernelArg::I64(cols as i64),
            KernelArg::I64(first_row as i64),
        ];
        let KernelLaunch {
            kernel,
            grid,
            block,
        } = merge_launch(base_dtype, out_dtype, rows, cols)
            .ok_or(Error::Dtype { dtype: base_dtype })?;
        let staged_out = &mut pin_out.as_mut_slice()[..out.len()];
        // SAFETY: the pinned buffers are neither read nor written by the host until the
        // synchronisation below; the arguments match `lora_merge`'s parameters
        // (kernels/merge.cu) and every buffer has at least the size the kernel indexes: base
        // and out `rows × cols`, left `stored_rows × rank`, right `rank × cols`, factors one
        // per row or column.
        let mut enqueue = || -> Result<(f64, f64)> {
            unsafe {
                d_base
                    .copy_from_host_async(0, staged_in, &self.stream)
                    .map_err(gpu)?;
                let t_h2d = lap(true)?;
                self.module
                    .launch(kernel, grid, block, &self.stream, &args)
                    .map_err(gpu)?;
                let t_kernel = lap(true)?;
                d_out
                    .copy_to_host_async(0, staged_out, &self.stream)
                    .map_err(gpu)?;
                Ok((t_h2d, t_kernel))
            }
        };
        let enqueued = enqueue();
        // Whatever failed, nothing enqueued may still use the scratch when this returns: the
        // next call reuses it.
        let synced = self.stream.synchronize().map_err(gpu);
        let (t_h2d, t_kernel) = enqueued?;
        synced?;
        let t_d2h = lap(false)?;
        parallel_copy(out, staged_out);
        let stats = stats_of(
            staged_in,
            base_dtype,
            staged_out,
            out_dtype,
            cols,
            first_row,
            t.left.is_some(),
        );
        let t_stage_out = lap(false)?;
        if let Some(t) = &self.trace {
            if let Ok(mut t) = t.lock() {
                t.blocks += 1;
                t.bytes_in += src.len() as u64;
                t.bytes_out += out.len() as u64;
                t.stage_in += t_stage_in;
                t.h2d += t_h2d;
                t.kernel += t_kernel;
                t.d2h += t_d2h;
                t.stage_out += t_stage_out;
            }
        }
        stats
    }
}

/// One tensor's LoRA (and DoRA) factors on the device.
pub struct GpuTensor {
    left: Option<DeviceAlloc>,
    right: Option<DeviceAlloc>,
    rank: usize,
    /// `(stored_rows, stored_cols)` of the product the factors came from.
    shape: Option<(usize, usize)>,
    factors: Option<DeviceAlloc>,
    factor_per_column: bool,
}
