//! The merge on a CUDA device: `kernels/merge.cu`, compiled to PTX by `cargo xtask
//! build-kernels` and embedded, runs the same arithmetic as [`crate::cpu`], so the two give the
//! same bits (a device test checks it). A [`GpuMerger`] holds the device's context, the loaded
//! module and a stream; [`GpuTensor`] holds one tensor's LoRA factors on the device.

use std::sync::Arc;

use gpu_mem::cuda::{Context, DeviceAlloc, KernelArg, Module, Stream};
use st_io::Dtype;

use crate::cpu::{stats_of, DoraScale, LoraProduct, MergeStats};
use crate::{Error, Result};

/// The PTX of `kernels/merge.cu` (PTX ISA 8.4, compute_75: JITs on drivers from CUDA 12.4).
pub const MERGE_PTX: &str = include_str!("../ptx/merge.ptx");

fn gpu(e: gpu_mem::Error) -> Error {
    Error::Gpu {
        message: e.to_string(),
    }
}

/// The merge kernel loaded on one device.
pub struct GpuMerger {
    ctx: Arc<Context>,
    module: Module,
    stream: Stream,
}

impl GpuMerger {
    pub fn new(ordinal: u32) -> Result<GpuMerger> {
        let ctx = Context::new(ordinal).map_err(gpu)?;
        let module = Module::load_ptx(&ctx, MERGE_PTX).map_err(gpu)?;
        let stream = Stream::new(&ctx).map_err(gpu)?;
        Ok(GpuMerger {
            ctx,
            module,
            stream,
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
        let rows = out.len() / (cols * 2);
        let src = &base[first_row * cols * size..(first_row + rows) * cols * size];
        let d_base = DeviceAlloc::new(&self.ctx, src.len()).map_err(gpu)?;
        let d_out = DeviceAlloc::new(&self.ctx, out.len()).map_err(gpu)?;
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
        let grid = (
            (cols as u32).div_ceil(256),
            (rows as u32).clamp(1, 65535),
            1,
        );
        // SAFETY: `src` outlives the synchronisation below; the arguments match
        // `lora_merge`'s parameters (kernels/merge.cu) and every buffer has the size the
        // kernel indexes: base and out `rows × cols`, left `stored_rows × rank`, right
        // `rank × cols`, factors one per row or column.
        unsafe {
            d_base
                .copy_from_host_async(0, src, &self.stream)
                .map_err(gpu)?;
            self.module
                .launch("lora_merge", grid, (256, 1, 1), &self.stream, &args)
                .map_err(gpu)?;
        }
        self.stream.synchronize().map_err(gpu)?;
        d_out.copy_to_host(0, out).map_err(gpu)?;
        stats_of(src, base_dtype, out, out_dtype, cols)
    }
}

/// One tensor's LoRA (and DoRA) factors on the device.
pub struct GpuTensor {
    left: Option<DeviceAlloc>,
    right: Option<DeviceAlloc>,
    rank: usize,
    factors: Option<DeviceAlloc>,
    factor_per_column: bool,
}
