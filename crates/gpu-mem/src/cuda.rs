//! The CUDA driver, through cudarc's raw bindings loaded at run time. Every `unsafe` block and
//! every raw CUDA call of the workspace lives in this module; the types it exports own their
//! resources and free them on drop.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys;

use crate::Error;

fn check(call: &'static str, r: sys::CUresult) -> Result<(), Error> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda {
            call,
            code: format!("{r:?}"),
        })
    }
}

/// Whether the driver library can be loaded and initialised. Must be called before any other
/// function of this module (cudarc panics when the library is missing).
pub fn driver_available() -> bool {
    // SAFETY: is_culib_present only tries to open the library; cuInit is then safe to call
    // once the library is known to load.
    unsafe { sys::is_culib_present() && sys::cuInit(0) == sys::CUresult::CUDA_SUCCESS }
}

/// Number of CUDA devices (0 without a driver).
pub fn device_count() -> usize {
    if !driver_available() {
        return 0;
    }
    let mut n = 0;
    // SAFETY: the driver is initialised (driver_available) and `n` is a valid out pointer.
    let r = unsafe { sys::cuDeviceGetCount(&mut n) };
    if r == sys::CUresult::CUDA_SUCCESS {
        n.max(0) as usize
    } else {
        0
    }
}

/// A device's primary context, retained for the life of this value.
#[derive(Debug)]
pub struct Context {
    pub ordinal: u32,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUDA context handle may be used from any thread once made current there, which
// `bind` does before every use.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    pub fn new(ordinal: u32) -> Result<Arc<Context>, Error> {
        if !driver_available() {
            return Err(Error::NoDriver);
        }
        let mut dev = 0;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: the driver is initialised; out pointers are valid locals.
        unsafe {
            check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal as i32))?;
            check(
                "cuDevicePrimaryCtxRetain",
                sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
            )?;
        }
        let c = Arc::new(Context { ordinal, dev, ctx });
        c.bind()?;
        Ok(c)
    }

    /// Makes this context current on the calling thread.
    pub fn bind(&self) -> Result<(), Error> {
        // SAFETY: `ctx` is a retained primary context, valid until drop.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }

    pub fn name(&self) -> Result<String, Error> {
        let mut buf = [0i8; 256];
        // SAFETY: the buffer is valid for 256 bytes and the driver NUL-terminates the name.
        check("cuDeviceGetName", unsafe {
            sys::cuDeviceGetName(buf.as_mut_ptr() as *mut _, 256, self.dev)
        })?;
        let bytes: Vec<u8> = buf
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn compute_capability(&self) -> Result<(i32, i32), Error> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: valid out pointers and device handle.
        unsafe {
            check(
                "cuDeviceGetAttribute",
                sys::cuDeviceGetAttribute(
                    &mut major,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    self.dev,
                ),
            )?;
            check(
                "cuDeviceGetAttribute",
                sys::cuDeviceGetAttribute(
                    &mut minor,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    self.dev,
                ),
            )?;
        }
        Ok((major, minor))
    }

    /// (free, total) bytes, as cuMemGetInfo reports them.
    pub fn mem_info(&self) -> Result<(u64, u64), Error> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: context current on this thread; valid out pointers.
        check("cuMemGetInfo", unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok((free as u64, total as u64))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: releases the retain made in `new`.
        unsafe {
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

/// An allocation of device memory.
#[derive(Debug)]
pub struct DeviceAlloc {
    ptr: sys::CUdeviceptr,
    len: usize,
    ctx: Arc<Context>,
}

// SAFETY: a device pointer is a plain address valid in its context from any thread.
unsafe impl Send for DeviceAlloc {}
unsafe impl Sync for DeviceAlloc {}

impl DeviceAlloc {
    pub fn new(ctx: &Arc<Context>, len: usize) -> Result<DeviceAlloc, Error> {
        ctx.bind()?;
        let mut ptr = 0;
        // SAFETY: context current; `ptr` is a valid out pointer. Zero-byte tensors get one byte
        // so every tensor has a distinct, valid address.
        // SAFETY: as above.
        let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, len.max(1)) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::DeviceAlloc {
                bytes: len as u64,
                code: format!("{r:?}"),
            });
        }
        Ok(DeviceAlloc {
            ptr,
            len,
            ctx: ctx.clone(),
        })
    }

    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The ordinal of the device this allocation lives on.
    pub fn context_ordinal(&self) -> u32 {
        self.ctx.ordinal
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Enqueues a copy of `src` to `offset` on `stream`. The caller keeps `src` alive and
    /// unchanged until the stream is synchronised (pinned or registered memory for overlap).
    ///
    /// # Safety
    /// `src` must stay valid, unmodified, and mapped until `stream` is synchronised.
    pub unsafe fn copy_from_host_async(
        &self,
        offset: usize,
        src: &[u8],
        stream: &Stream,
    ) -> Result<(), Error> {
        if offset
            .checked_add(src.len())
            .is_none_or(|end| end > self.len)
        {
            return Err(Error::OutOfBounds {
                offset,
                len: src.len(),
                size: self.len,
            });
        }
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: bounds checked above; the caller guarantees `src` outlives the copy.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                self.ptr + offset as u64,
                src.as_ptr() as *const c_void,
                src.len(),
                stream.raw,
            )
        })
    }

    /// Enqueues a copy of device memory at `offset` into `dst` on `stream`.
    ///
    /// # Safety
    /// `dst` must stay valid, and must be neither read nor written by the host, until `stream`
    /// is synchronised (pinned memory for a truly asynchronous copy).
    pub unsafe fn copy_to_host_async(
        &self,
        offset: usize,
        dst: &mut [u8],
        stream: &Stream,
    ) -> Result<(), Error> {
        if offset
            .checked_add(dst.len())
            .is_none_or(|end| end > self.len)
        {
            return Err(Error::OutOfBounds {
                offset,
                len: dst.len(),
                size: self.len,
            });
        }
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: bounds checked above; the caller keeps `dst` alive and untouched until
        // the stream is synchronised.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                dst.as_mut_ptr() as *mut c_void,
                self.ptr + offset as u64,
                dst.len(),
                stream.raw,
            )
        })
    }

    /// Copies device memory back to the host (synchronous).
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<(), Error> {
        if offset
            .checked_add(dst.len())
            .is_none_or(|end| end > self.len)
        {
            return Err(Error::OutOfBounds {
                offset,
                len: dst.len(),
                size: self.len,
            });
        }
        self.ctx.bind()?;
        // SAFETY: bounds checked; `dst` is a valid writable host buffer of that length.
        check("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2(
                dst.as_mut_ptr() as *mut c_void,
                self.ptr + offset as u64,
                dst.len(),
            )
        })
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: `ptr` came from cuMemAlloc in this context and is freed once, after every
        // stream of the context is done: a copy still in flight into it (an early return that
        // left one enqueued) finishes before the memory can be reused.
        unsafe {
            sys::cuCtxSynchronize();
            sys::cuMemFree_v2(self.ptr);
        }
    }
}

/// A CUDA stream of one context.
#[derive(Debug)]
pub struct Stream {
    raw: sys::CUstream,
    ctx: Arc<Context>,
}

// SAFETY: stream handles may be used from any thread with their context current.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    pub fn new(ctx: &Arc<Context>) -> Result<Stream, Error> {
        ctx.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: context current; valid out pointer. Non-blocking: no implicit sync with the
        // legacy default stream.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        Ok(Stream {
            raw,
            ctx: ctx.clone(),
        })
    }

    pub fn synchronize(&self) -> Result<(), Error> {
        self.ctx.bind()?;
        // SAFETY: a valid stream of a live context.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.raw)
        })
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            sys::cuStreamDestroy_v2(self.raw);
        }
    }
}

/// Page-locked host memory usable by every context (portable), for staging copies.
#[derive(Debug)]
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    /// Bound before the free: the driver refuses it on a thread with no current context.
    ctx: Arc<Context>,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub fn new(ctx: &Arc<Context>, len: usize) -> Result<PinnedBuffer, Error> {
        ctx.bind()?;
        let mut p = std::ptr::null_mut();
        // SAFETY: context current; valid out pointer; PORTABLE makes it pinned for all contexts.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut p, len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE)
        })?;
        Ok(PinnedBuffer {
            ptr: p as *mut u8,
            len,
            ctx: ctx.clone(),
        })
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len` bytes owned by this value.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: allocated by cuMemHostAlloc, freed once, after the context's streams are
        // done with it (as for `DeviceAlloc`).
        unsafe {
            sys::cuCtxSynchronize();
            sys::cuMemFreeHost(self.ptr as *mut c_void);
        }
    }
}

/// A page-aligned host range (e.g. of a mapped file) registered with the driver, read-only,
/// so copies from it run at pinned speed.
#[derive(Debug)]
pub struct HostRegion {
    ptr: *mut c_void,
    len: usize,
    /// Bound before the unregistration, which may run on another thread (the upload engine
    /// releases regions in the background): without a current context the driver refuses it
    /// and the pages would stay pinned, and registered, until the process exits.
    ctx: Arc<Context>,
}

// SAFETY: the registration is process-wide; the handle is a plain address.
unsafe impl Send for HostRegion {}
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Registers `range`, which must be page-aligned in address and length (the caller rounds).
    /// Register shared mappings only ([`crate::upload::mapping_is_shared`]): pinning a private
    /// file mapping makes the kernel unshare each page, and on one 6.18 kernel never returned.
    ///
    /// # Safety
    /// `range` must stay mapped until this value is dropped.
    pub unsafe fn register(ctx: &Arc<Context>, range: &[u8]) -> Result<HostRegion, Error> {
        ctx.bind()?;
        let flags = sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: the caller keeps the range mapped for the registration's life.
        check("cuMemHostRegister", unsafe {
            sys::cuMemHostRegister_v2(range.as_ptr() as *mut c_void, range.len(), flags)
        })?;
        Ok(HostRegion {
            ptr: range.as_ptr() as *mut c_void,
            len: range.len(),
            ctx: ctx.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: registered in `register`, unregistered once.
        unsafe {
            sys::cuMemHostUnregister(self.ptr);
        }
    }
}

/// A kernel argument, passed by value.
#[derive(Debug, Clone, Copy)]
pub enum KernelArg {
    /// A device address (0 for a null pointer).
    Ptr(u64),
    I32(i32),
    I64(i64),
}

/// PTX loaded into a context.
#[derive(Debug)]
pub struct Module {
    raw: sys::CUmodule,
    ctx: Arc<Context>,
}

// SAFETY: module handles may be used from any thread with their context current.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

impl Module {
    /// JIT-compiles and loads PTX text.
    pub fn load_ptx(ctx: &Arc<Context>, ptx: &str) -> Result<Module, Error> {
        ctx.bind()?;
        let text = std::ffi::CString::new(ptx).map_err(|_| Error::Cuda {
            call: "cuModuleLoadData",
            code: "PTX contains a NUL byte".into(),
        })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: context current; `text` is a NUL-terminated PTX image alive for the call.
        check("cuModuleLoadData", unsafe {
            sys::cuModuleLoadData(&mut raw, text.as_ptr() as *const c_void)
        })?;
        Ok(Module {
            raw,
            ctx: ctx.clone(),
        })
    }

    /// Launches kernel `name` on `stream` (asynchronous).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type, and every pointer
    /// must address memory of the right size that stays valid until the stream is synchronised.
    pub unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        stream: &Stream,
        args: &[KernelArg],
    ) -> Result<(), Error> {
        self.ctx.bind()?;
        let cname = std::ffi::CString::new(name).map_err(|_| Error::Cuda {
            call: "cuModuleGetFunction",
            code: "bad kernel name".into(),
        })?;
        let mut f = std::ptr::null_mut();
        // SAFETY: a loaded module and a NUL-terminated name.
        check("cuModuleGetFunction", unsafe {
            sys::cuModuleGetFunction(&mut f, self.raw, cname.as_ptr())
        })?;
        let mut values: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                KernelArg::Ptr(p) => p,
                KernelArg::I32(v) => v as u32 as u64,
                KernelArg::I64(v) => v as u64,
            })
            .collect();
        // Each parameter points at its value (little-endian: an i32 reads the low 4 bytes).
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: the caller guarantees the arguments match the kernel; `params` and `values`
        // outlive the call, which copies them.
        check("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(
                f,
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: loaded in `load_ptx`, unloaded once.
        unsafe {
            sys::cuModuleUnload(self.raw);
        }
    }
}
