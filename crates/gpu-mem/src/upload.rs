//! Copying byte ranges of a mapped file to their destinations (device allocations or host
//! buffers) as fast as the machine allows, choosing the path per file:
//!
//! 1. `registered`: the file is in the page cache (`mincore`) and mapped shared, so its mapping
//!    is registered with the driver (read-only, 512 MiB at a time) and copied straight from, on
//!    two streams per device; registering the next chunk overlaps the copies of this one. A
//!    private (copy-on-write) mapping is never registered: a long-term read-only pin of it
//!    makes the kernel unshare every page, and on the H200 machines' kernel (6.18) that
//!    registration never returned ([`mapping_is_shared`]).
//! 2. `pinned`: the file is cold, so reader threads each `pread` the next window of the file
//!    into one of their two pinned buffers and copy it on that buffer's stream; direct copies
//!    from a cold mapping would fault page by page.
//! 3. `pageable`: plain copies from the mapping, when neither of the above can be set up.
//! 4. `host`: destinations in host memory: parallel `pread`s straight into them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::cuda::{Context, DeviceAlloc, HostRegion, PinnedBuffer, Stream};
use crate::Error;

/// Where one range goes.
pub enum Dst<'a> {
    Host(&'a mut [u8]),
    Cuda(&'a DeviceAlloc),
}

/// A range of the file (`offset`, length of the destination) and where it goes.
pub struct Piece<'a> {
    pub offset: u64,
    pub len: usize,
    pub dst: Dst<'a>,
}

/// The path an upload took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadPath {
    Registered,
    Pinned,
    /// A warm file partly registered, partly staged ([`StagingConfig::warm_staged_percent`]).
    Mixed,
    Pageable,
    Host,
}

impl UploadPath {
    pub fn name(self) -> &'static str {
        match self {
            UploadPath::Registered => "registered",
            UploadPath::Pinned => "pinned",
            UploadPath::Mixed => "registered+pinned",
            UploadPath::Pageable => "pageable",
            UploadPath::Host => "host",
        }
    }
}

const PAGE: usize = 4096;
const REGISTER_CHUNK: usize = 512 << 20;
const REGISTER_THREADS: usize = 2;
const READ_THREADS: usize = 8;

/// Pages of a range that [`resident_fraction`] asks `mincore` about at most.
const RESIDENCY_SAMPLES: usize = 1024;

/// The fraction of `range` resident in the page cache, from at most `RESIDENCY_SAMPLES`
/// evenly spaced pages: asking about every page of a 5 GB shard took 40-55 ms on the H100
/// machine, a quarter of the time its warm copy takes, for a yes/no decision (warm or cold).
pub fn resident_fraction(range: &[u8]) -> f64 {
    if range.is_empty() {
        return 1.0;
    }
    let start = range.as_ptr() as usize & !(PAGE - 1);
    let end = range.as_ptr() as usize + range.len();
    let pages = (end - start).div_ceil(PAGE);
    let samples = pages.min(RESIDENCY_SAMPLES);
    let mut resident = 0usize;
    for k in 0..samples {
        let page = start + k * pages / samples * PAGE;
        let mut state = 0u8;
        // SAFETY: `page` is the start of a page of the caller's slice (k·pages/samples <
        // pages), inside a live mapping; `state` has the one byte mincore writes for one page.
        let r = unsafe { libc::mincore(page as *mut libc::c_void, PAGE, &mut state) };
        if r != 0 {
            return 0.0;
        }
        resident += (state & 1) as usize;
    }
    resident as f64 / samples as f64
}

/// Whether every page of `range` lies in shared mappings (`s` in /proc/self/maps), the only
/// kind the registered path may pin. A read-only long-term pin of a private file mapping
/// (MAP_PRIVATE) makes the kernel break copy-on-write for each page (`gup_must_unshare`):
/// on the H200 machines' kernel (6.18) `cuMemHostRegister` of a freshly written file mapped
/// that way spun forever inside the kernel. Unknown (no /proc): false, so staging is used.
pub fn mapping_is_shared(range: &[u8]) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    shared_in_maps(&maps, range.as_ptr() as usize, range.len())
}

/// [`mapping_is_shared`] over the text of a maps file: the mappings that cover
/// `[start, start + len)` leave no gap and are all shared.
fn shared_in_maps(maps: &str, start: usize, len: usize) -> bool {
    let end = start + len;
    let mut covered = start;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(span), Some(perms)) = (fields.next(), fields.next()) else {
            return false;
        };
        let Some((a, b)) = span.split_once('-') else {
            return false;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            return false;
        };
        if b <= covered || a >= end {
            continue;
        }
        if a > covered || perms.as_bytes().get(3) != Some(&b's') {
            return false;
        }
        covered = b;
        if covered >= end {
            return true;
        }
    }
    covered >= end
}

/// Starts a scoped thread named for `what`, or says that it could not (a process short of
/// memory or of threads: `std::thread::scope`'s own spawn would panic there).
fn spawn_scoped<'scope, 'env, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'scope,
) -> Result<std::thread::ScopedJoinHandle<'scope, T>, Error> {
    std::thread::Builder::new()
        .name(format!("weightsmith {what}"))
        .spawn_scoped(scope, f)
        .map_err(|e| Error::Thread {
            what,
            message: e.to_string(),
        })
}

/// [`spawn_scoped`] for a thread that outlives its caller.
fn spawn<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, Error> {
    std::thread::Builder::new()
        .name(format!("weightsmith {what}"))
        .spawn(f)
        .map_err(|e| Error::Thread {
            what,
            message: e.to_string(),
        })
}

/// Maps a page-cached range into this process's page tables up front (MADV_POPULATE_READ,
/// Linux 5.14+), in parallel, so that registering it does not fault page by page. A hint:
/// on older kernels it fails and registration faults the pages itself.
fn populate(range: &[u8]) {
    const MADV_POPULATE_READ: libc::c_int = 22;
    let piece = (range.len() / READ_THREADS).div_ceil(PAGE).max(1) * PAGE;
    let advise = |chunk: &[u8]| {
        // SAFETY: the chunk lies in a live, page-aligned mapping (the caller's range starts on
        // a page boundary and `piece` is a multiple of the page size); MADV_POPULATE_READ only
        // reads.
        unsafe {
            libc::madvise(
                chunk.as_ptr() as *mut libc::c_void,
                chunk.len(),
                MADV_POPULATE_READ,
            )
        };
    };
    std::thread::scope(|s| {
        for chunk in range.chunks(piece) {
            // A hint: done on this thread when no other can start.
            if spawn_scoped(s, "page population", move || advise(chunk)).is_err() {
                advise(chunk);
            }
        }
    });
}

/// A failed read at `offset`, said plainly where the file ended early.
fn read_error(offset: u64, e: std::io::Error) -> Error {
    let message = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the file ends before this range: was it truncated or replaced during the load?".into()
    } else {
        e.to_string()
    };
    Error::Read { offset, message }
}

/// posix_fadvise on a range of `file` (a hint: errors are ignored).
fn advise(file: &File, offset: usize, len: usize, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the life of `file`; posix_fadvise only hints.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            advice,
        );
    }
}

/// Reads `dst.len()` bytes at `offset` with several threads.
fn parallel_read(file: &File, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
    let piece = dst.len().div_ceil(READ_THREADS).max(1 << 20);
    std::thread::scope(|s| {
        let handles: Vec<_> = dst
            .chunks_mut(piece)
            .enumerate()
            .map(|(i, chunk)| {
                spawn_scoped(s, "reads", move || {
                    file.read_exact_at(chunk, offset + (i * piece) as u64)
                })
            })
            .collect();
        // Every thread that started is joined (the scope waits for it) before an error of one
        // that did not is returned.
        handles.into_iter().try_for_each(|h| match h {
            Ok(h) => h
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a read thread panicked"))),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        })
    })
}

/// Copies files' ranges to their destinations; holds the streams and staging buffers.
///
/// Registrations of a finished file are released by a background thread while the next file
/// is copied; dropping the engine waits for it, so drop the engine before the mapped files.
///
/// ```
/// use gpu_mem::upload::{Dst, Piece, UploadEngine, UploadPath};
/// use gpu_mem::{cuda::Context, discover, Device};
/// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/models/tiny-llama/model-00001-of-00003.safetensors");
/// let file = std::fs::File::open(path)?;
/// let bytes = std::fs::read(path)?; // in production: the file's shared memory map
/// // The GPUs of this machine (none on CI: the host is then the one device).
/// let contexts = discover()?
///     .iter()
///     .filter_map(|d| match d.device { Device::Cuda(n) => Context::new(n).ok(), Device::Host => None })
///     .collect::<Vec<_>>();
/// // The first 64 bytes after the 8-byte header length, to a host buffer (declared before
/// // the engine: it must outlive it).
/// let mut host = vec![0u8; 64];
/// let mut engine = UploadEngine::new(&contexts)?;
/// let mut pieces = [Piece { offset: 8, len: 64, dst: Dst::Host(&mut host) }];
/// assert_eq!(engine.upload(&file, &bytes, &mut pieces)?, UploadPath::Host);
/// engine.finish(); // waits for every copy; only then are the destinations free again
/// assert_eq!(host, bytes[8..72]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// What a copy reads or writes cannot be dropped while the engine lives (the registered
/// path's copies still run when `upload` returns); this does not compile:
///
/// ```compile_fail,E0505
/// use gpu_mem::upload::{Dst, Piece, UploadEngine};
/// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/models/tiny-llama/model-00001-of-00003.safetensors");
/// let file = std::fs::File::open(path)?;
/// let bytes = std::fs::read(path)?;
/// let mut host = vec![0u8; 64];
/// let mut engine = UploadEngine::new(&[])?;
/// let mut pieces = [Piece { offset: 8, len: 64, dst: Dst::Host(&mut host) }];
/// engine.upload(&file, &bytes, &mut pieces)?;
/// drop(bytes); // error[E0505]: cannot move out of `bytes` because it is borrowed
/// engine.finish();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct UploadEngine<'m> {
    streams: Vec<(u32, Vec<Stream>)>,
    staging: Vec<PinnedBuffer>,
    releaser: Option<(
        std::sync::mpsc::Sender<Vec<HostRegion>>,
        std::thread::JoinHandle<()>,
    )>,
    /// Disable the registered path (for measurements of the others).
    pub allow_register: bool,
    /// The shape of the staged path.
    pub staging_config: StagingConfig,
    /// The staged path's streams, two per worker, on each device.
    staging_streams: Vec<(u32, Vec<Stream>)>,
    /// The mixed path's staged share for the next warm file, in percent, when it adapts.
    adapted_percent: Option<f64>,
    /// Registrations whose copies may still be running (see [`UploadEngine::flush`]).
    in_flight: Vec<HostRegion>,
    /// The maps and destinations handed to [`UploadEngine::upload`] are borrowed for the
    /// engine's life: safe code cannot drop or touch them while a copy may still use them
    /// (the engine's drop waits for every copy).
    borrows: std::marker::PhantomData<&'m mut [u8]>,
}

impl<'m> UploadEngine<'m> {
    /// An engine for these CUDA contexts (none: host only).
    pub fn new(contexts: &[Arc<Context>]) -> Result<UploadEngine<'m>, Error> {
        let mut streams = Vec::new();
        for c in contexts {
            streams.push((c.ordinal, vec![Stream::new(c)?, Stream::new(c)?]));
        }
        let (tx, rx) = std::sync::mpsc::channel::<Vec<HostRegion>>();
        let releaser = spawn("releasing registrations", move || {
            for regions in rx {
                drop(regions);
            }
        })?;
        Ok(UploadEngine {
            streams,
            staging: Vec::new(),
            releaser: Some((tx, releaser)),
            allow_register: true,
            staging_config: StagingConfig::default(),
            staging_streams: contexts.iter().map(|c| (c.ordinal, Vec::new())).collect(),
            adapted_percent: None,
            in_flight: Vec::new(),
            borrows: std::marker::PhantomData,
        })
    }

    fn stream_for(&self, alloc: &DeviceAlloc, k: usize) -> Result<&Stream, Error> {
        stream_for(&self.streams, alloc, k)
    }

    /// A context to allocate portable host memory and registrations with.
    fn any_context(&self) -> Result<Arc<Context>, Error> {
        self.streams
            .first()
            .map(|(_, s)| s[0].context().clone())
            .ok_or(Error::NoDriver)
    }

    fn sync_all(&self) -> Result<(), Error> {
        for (_, ss) in &self.streams {
            for s in ss {
                s.synchronize()?;
            }
        }
        Ok(())
    }

    /// Copies `pieces` (sorted by offset, inside `map`, the whole mapped file) to their
    /// destinations. Map the file shared (`memmap2::Mmap::map`) for the registered path: a
    /// private mapping always takes the staged one. Returns the path taken. On return every
    /// copy has completed except those of the registered path, which drain while the next
    /// file is set up: [`UploadEngine::flush`] waits for them. `map` and the destinations are
    /// borrowed for the engine's life, so they outlive every copy whatever the caller does.
    pub fn upload(
        &mut self,
        file: &File,
        map: &'m [u8],
        pieces: &mut [Piece<'m>],
    ) -> Result<UploadPath, Error> {
        let (lo, hi) = match (pieces.first(), pieces.last()) {
            (Some(f), Some(l)) => (f.offset as usize, l.offset as usize + l.len),
            _ => return Ok(UploadPath::Host),
        };
        // Host destinations: parallel preads straight into them.
        let mut any_cuda = false;
        for p in pieces.iter_mut() {
            match &mut p.dst {
                Dst::Host(buf) => {
                    parallel_read(file, p.offset, buf).map_err(|e| read_error(p.offset, e))?
                }
                Dst::Cuda(_) => any_cuda = true,
            }
        }
        if !any_cuda {
            return Ok(UploadPath::Host);
        }
        let t0 = std::time::Instant::now();
        let warm = resident_fraction(&map[lo..hi]) >= 0.9;
        let registrable = warm && self.allow_register && mapping_is_shared(&map[lo..hi]);
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                "trace residency: {} MB checked in {:.1} ms",
                (hi - lo) / 1_000_000,
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        let config = self.staging_config;
        let share = match (config.adapt_warm_share, self.adapted_percent) {
            (true, Some(p)) => p.round() as u32,
            _ => config.warm_staged_percent.min(100),
        };
        // The mixed path needs its staging buffers; where pinned memory cannot be had, the
        // whole file takes the registered path.
        if registrable && share > 0 && self.prepare_staging().is_ok() {
            return self.upload_mixed(file, map, pieces, lo, hi, share);
        }
        if registrable {
            match self.upload_registered(map, pieces, lo, hi) {
                Ok(()) => return Ok(UploadPath::Registered),
                Err(Error::Cuda {
                    call: "cuMemHostRegister",
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        match self.upload_pinned(file, pieces, lo, hi) {
            Ok(()) => Ok(UploadPath::Pinned),
            Err(Error::Cuda {
                call: "cuMemHostAlloc",
                ..
            }) => {
                for (k, p) in pieces.iter().enumerate() {
                    if let Dst::Cuda(a) = &p.dst {
                        let s = self.stream_for(a, k)?;
                        // SAFETY: `map` outlives this call and every stream is synchronised
                        // below before returning.
                        unsafe {
                            a.copy_from_host_async(
                                0,
                                &map[p.offset as usize..p.offset as usize + p.len],
                                s,
                            )?
                        };
                    }
                }
                self.sync_all()?;
                Ok(UploadPath::Pageable)
            }
            Err(e) => Err(e),
        }
    }

    fn upload_registered(
        &mut self,
        map: &[u8],
        pieces: &[Piece],
        lo: usize,
        hi: usize,
    ) -> Result<(), Error> {
        let ctx = self.any_context()?;
        let (regions, result) = register_and_copy(&self.streams, &ctx, map, pieces, lo, hi);
        self.settle(regions, result)
    }

    /// After a registered copy: on success its regions wait in `in_flight` while the copies
    /// drain; on failure every stream is synchronised (nothing may still read the regions)
    /// and they are released.
    fn settle(&mut self, regions: Vec<HostRegion>, result: Result<(), Error>) -> Result<(), Error> {
        if result.is_err() {
            let synced = self.sync_all();
            self.release(regions);
            return result.and(synced);
        }
        self.in_flight.extend(regions);
        Ok(())
    }

    /// A warm file split in two at a page boundary: the first `100 - staged_percent` % is
    /// registered and copied from while staging threads copy the rest, so the two paths'
    /// CPU work (pinning pages; reading from the page cache) runs side by side. A registration
    /// the driver refuses sends its part through staging as well. The staging buffers are
    /// prepared by the caller.
    fn upload_mixed(
        &mut self,
        file: &File,
        map: &[u8],
        pieces: &[Piece],
        lo: usize,
        hi: usize,
        staged_percent: u32,
    ) -> Result<UploadPath, Error> {
        let ctx = self.any_context()?;
        let registered_bytes = (hi - lo) as u128 * (100 - staged_percent as u128) / 100;
        // `map` starts on a page, so a multiple of the page size from its start is a page
        // boundary: the registered chunks end exactly where staging begins.
        let mid = ((lo + registered_bytes as usize) / PAGE * PAGE).clamp(lo, hi);
        let config = self.staging_config;
        let (streams, staging, staging_streams) =
            (&self.streams, &mut self.staging, &self.staging_streams);
        let started = std::time::Instant::now();
        let ((regions, registered, registered_at), (staged, staged_at)) =
            std::thread::scope(|scope| {
                let register = || {
                    let (regions, result) = register_and_copy(streams, &ctx, map, pieces, lo, mid);
                    (regions, result, started.elapsed())
                };
                let registering = spawn_scoped(scope, "registration", register);
                let staged = stage(staging, staging_streams, config, file, pieces, mid, hi);
                let staged_at = started.elapsed();
                let registered = match registering {
                    Ok(handle) => handle.join().unwrap_or_else(|_| {
                        (
                            Vec::new(),
                            Err(Error::Cuda {
                                call: "cuMemHostRegister",
                                code: "registration thread panicked".into(),
                            }),
                            started.elapsed(),
                        )
                    }),
                    // No thread for it: the registered half on this one, after the staged.
                    Err(_) => register(),
                };
                (registered, (staged, staged_at))
            });
        if config.adapt_warm_share && registered.is_ok() && staged.is_ok() {
            // Bytes per second of each half (the registered half's copies trail its
            // registration closely, so its enqueue time stands for its time).
            let rate =
                |bytes: usize, t: std::time::Duration| bytes as f64 / t.as_secs_f64().max(1e-6);
            let (reg_rate, staged_rate) =
                (rate(mid - lo, registered_at), rate(hi - mid, staged_at));
            let balanced = 100.0 * staged_rate / (staged_rate + reg_rate);
            let next = (0.5 * staged_percent as f64 + 0.5 * balanced).clamp(5.0, 95.0);
            if tracing::enabled!(tracing::Level::DEBUG) {
                tracing::debug!(
                    "trace mixed: {staged_percent} % staged; registered {:.1} GB/s, staged {:.1} GB/s; next {next:.0} %",
                    reg_rate / 1e9,
                    staged_rate / 1e9
                );
            }
            self.adapted_percent = Some(next);
        }
        let refused = matches!(
            registered,
            Err(Error::Cuda {
                call: "cuMemHostRegister",
                ..
            })
        );
        if refused {
            self.settle(regions, Ok(()))?;
            self.flush()?;
            staged?;
            self.upload_pinned(file, pieces, lo, mid)?;
            return Ok(UploadPath::Pinned);
        }
        self.settle(regions, registered)?;
        staged?;
        Ok(UploadPath::Mixed)
    }

    /// Unregisters regions in the background (no copy may still read them).
    fn release(&self, regions: Vec<HostRegion>) {
        match &self.releaser {
            Some((tx, _)) => {
                if let Err(back) = tx.send(regions) {
                    drop(back.0);
                }
            }
            None => drop(regions),
        }
    }

    /// Waits for every copy still running (those from registered files) and then releases
    /// their registrations.
    pub fn flush(&mut self) -> Result<(), Error> {
        let synced = self.sync_all();
        if synced.is_ok() {
            let regions = std::mem::take(&mut self.in_flight);
            self.release(regions);
        }
        synced
    }

    /// The staged path ([`stage`]) over `[lo, hi)`, its buffers and streams prepared first.
    fn upload_pinned(
        &mut self,
        file: &File,
        pieces: &[Piece],
        lo: usize,
        hi: usize,
    ) -> Result<(), Error> {
        self.prepare_staging()?;
        let config = self.staging_config;
        stage(
            &mut self.staging,
            &self.staging_streams,
            config,
            file,
            pieces,
            lo,
            hi,
        )
    }

    /// Allocates the staged path's pinned buffers (two per worker) and streams (two per worker
    /// on every device) that are not there yet.
    fn prepare_staging(&mut self) -> Result<(), Error> {
        let ctx = self.any_context()?;
        let StagingConfig {
            workers,
            window_bytes,
            ..
        } = self.staging_config;
        if self
            .staging
            .first()
            .is_some_and(|b| b.as_slice().len() != window_bytes)
        {
            self.staging.clear();
        }
        while self.staging.len() < 2 * workers {
            self.staging.push(PinnedBuffer::new(&ctx, window_bytes)?);
        }
        for (ordinal, streams) in &mut self.staging_streams {
            while streams.len() < 2 * workers {
                let c = self
                    .streams
                    .iter()
                    .find(|(o, _)| o == ordinal)
                    .map(|(_, s)| s[0].context().clone())
                    .ok_or(Error::NoDriver)?;
                streams.push(Stream::new(&c)?);
            }
        }
        Ok(())
    }
}

/// The staged path: [`StagingConfig::workers`] threads each take the next window of `[lo, hi)`,
/// `pread` it into one of their two pinned buffers and enqueue its copies on that buffer's own
/// stream, so reads of some windows overlap the copies of others with no barrier between
/// windows (a barrier per window put the slowest read of every window on the critical path).
/// Returns once every copy has completed.
fn stage(
    staging: &mut [PinnedBuffer],
    device_streams: &[(u32, Vec<Stream>)],
    config: StagingConfig,
    file: &File,
    pieces: &[Piece],
    lo: usize,
    hi: usize,
) -> Result<(), Error> {
    if lo >= hi {
        return Ok(());
    }
    let StagingConfig {
        workers,
        window_bytes,
        ..
    } = config;
    advise(file, lo, hi - lo, libc::POSIX_FADV_SEQUENTIAL);
    let windows = (hi - lo).div_ceil(window_bytes);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<(), Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = staging[..2 * workers]
            .chunks_mut(2)
            .enumerate()
            .map(|(w, buffers)| {
                let next = &next;
                spawn_scoped(scope, "staged reads", move || {
                    let r = stage_worker(
                        file,
                        pieces,
                        (lo, hi, window_bytes, windows),
                        buffers,
                        device_streams,
                        w,
                        next,
                    );
                    if r.is_err() {
                        // The others stop taking windows; each still waits for its own
                        // copies before returning, so no buffer is refilled under a copy.
                        next.store(windows, std::sync::atomic::Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        // A worker that could not start leaves its windows to the others; none at all is
        // the error.
        if handles.iter().all(Result::is_err) {
            return handles.into_iter().map(|h| h.map(|_| ())).collect();
        }
        handles
            .into_iter()
            .flatten()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Read {
                        offset: lo as u64,
                        message: "a staging thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>, Error>>()?;
    Ok(())
}

/// How the staged path ([`UploadPath::Pinned`]) is shaped: reader threads, and the size of each
/// of their two pinned buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingConfig {
    pub workers: usize,
    pub window_bytes: usize,
    /// The share of a warm file, in percent, that is staged while the rest is registered
    /// (0: warm files are registered whole).
    pub warm_staged_percent: u32,
    /// Start the mixed path at `warm_staged_percent` and, after each warm file, move the share
    /// halfway to the one that would have finished both halves together at the rates just
    /// seen (kept within 5–95 %).
    pub adapt_warm_share: bool,
}

impl Default for StagingConfig {
    fn default() -> Self {
        StagingConfig {
            workers: 8,
            window_bytes: 32 << 20,
            warm_staged_percent: 0,
            adapt_warm_share: false,
        }
    }
}

impl StagingConfig {
    /// The default, changed by the variables `WEIGHTSMITH_STAGE_WORKERS`,
    /// `WEIGHTSMITH_STAGE_MB` and `WEIGHTSMITH_WARM_STAGED_PERCENT` where `get` gives them
    /// positive numbers (for measurements on a new machine; the CLI passes its environment, the
    /// library reads none); `WEIGHTSMITH_WARM_STAGED_PERCENT=auto` adapts the share from 50 %.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> StagingConfig {
        let mut c = StagingConfig::default();
        let var = |name: &str| {
            get(name)
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&v| v > 0)
        };
        if let Some(w) = var("WEIGHTSMITH_STAGE_WORKERS") {
            c.workers = w.min(64);
        }
        if let Some(p) = var("WEIGHTSMITH_WARM_STAGED_PERCENT") {
            c.warm_staged_percent = p.min(100) as u32;
        }
        if get("WEIGHTSMITH_WARM_STAGED_PERCENT").is_some_and(|v| v == "auto") {
            c.warm_staged_percent = 50;
            c.adapt_warm_share = true;
        }
        if let Some(mb) = var("WEIGHTSMITH_STAGE_MB") {
            c.window_bytes = (mb.min(1024) << 20).next_multiple_of(PAGE);
        }
        c
    }
}

/// The parts of `pieces` (sorted by offset, not overlapping) that lie in the window
/// `[start, start + n)` of the file: (index of the piece, offset in the piece, range in the
/// window). Empty pieces have no parts.
fn window_parts<'p>(
    pieces: &'p [Piece],
    start: usize,
    n: usize,
) -> impl Iterator<Item = (usize, usize, std::ops::Range<usize>)> + 'p {
    let first = pieces.partition_point(|p| p.offset as usize + p.len <= start);
    pieces[first..]
        .iter()
        .enumerate()
        .map(move |(i, p)| (first + i, p.offset as usize, p.offset as usize + p.len))
        .take_while(move |&(_, ps, _)| ps < start + n)
        .filter_map(move |(k, ps, pe)| {
            let (s, e) = (ps.max(start), pe.min(start + n));
            (s < e).then(|| (k, s - ps, s - start..e - start))
        })
}

/// One worker of the staged path: takes windows `next` hands out, fills buffer `turn % 2`
/// once that buffer's earlier copies are done, and enqueues the copies of the pieces the window
/// holds on that buffer's stream of each device. Returns once its copies have completed.
fn stage_worker(
    file: &File,
    pieces: &[Piece],
    (lo, hi, window_bytes, windows): (usize, usize, usize, usize),
    buffers: &mut [PinnedBuffer],
    device_streams: &[(u32, Vec<Stream>)],
    worker: usize,
    next: &std::sync::atomic::AtomicUsize,
) -> Result<(), Error> {
    // Which devices each buffer's last copies went to.
    let mut pending: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
    let sync = |pending: &mut Vec<usize>, b: usize| -> Result<(), Error> {
        for d in pending.drain(..) {
            device_streams[d].1[2 * worker + b].synchronize()?;
        }
        Ok(())
    };
    let mut turn = 0;
    let result = (|| -> Result<(), Error> {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= windows {
                return Ok(());
            }
            let b = turn % 2;
            turn += 1;
            sync(&mut pending[b], b)?;
            let start = lo + i * window_bytes;
            let n = window_bytes.min(hi - start);
            let buf = &mut buffers[b].as_mut_slice()[..n];
            file.read_exact_at(buf, start as u64)
                .map_err(|e| read_error(start as u64, e))?;
            let buf = &buffers[b].as_slice()[..n];
            for (k, piece_offset, part) in window_parts(pieces, start, n) {
                let p = &pieces[k];
                if let Dst::Cuda(a) = &p.dst {
                    let d = device_of(device_streams, a)?;
                    let stream = &device_streams[d].1[2 * worker + b];
                    stream.context().bind()?;
                    // SAFETY: buffer `b` is not refilled before this stream is synchronised
                    // (`pending`), and every stream is synchronised before this returns.
                    unsafe { a.copy_from_host_async(piece_offset, &buf[part], stream)? };
                    if !pending[b].contains(&d) {
                        pending[b].push(d);
                    }
                }
            }
        }
    })();
    let drained = sync(&mut pending[0], 0).and(sync(&mut pending[1], 1));
    result.and(drained)
}

impl Drop for UploadEngine<'_> {
    fn drop(&mut self) {
        // Registrations still read by copies are released only once those copies are done;
        // if the device cannot say so, they are kept (leaked) rather than pulled from under it.
        if !self.in_flight.is_empty() && self.flush().is_err() {
            std::mem::forget(std::mem::take(&mut self.in_flight));
        }
        if let Some((tx, handle)) = self.releaser.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

impl UploadEngine<'_> {
    /// Waits for the copies still running, then until every registration is released.
    pub fn finish(mut self) {
        if !self.in_flight.is_empty() && self.flush().is_err() {
            std::mem::forget(std::mem::take(&mut self.in_flight));
        }
        if let Some((tx, handle)) = self.releaser.take() {
            drop(tx);
            let _ = handle.join();
        }
    }

    /// Waits for the copies still running, like [`finish`](Self::finish), but leaves the
    /// cleanup to a background thread: unregistering the files' pages (about 0.1 s for 16 GB
    /// on an H200 machine, a fifth of a warm load), freeing the staging buffers and destroying
    /// the streams (driver calls that would wait for the unregistering). That
    /// thread owns `keep_alive` and drops it last, so the mappings stay mapped until their
    /// registrations are gone. Every destination is complete when this returns.
    ///
    /// Returns the thread, for a caller that wants to wait (tests); dropping it detaches. When
    /// no thread can start (a process short of memory), the cleanup is done here and `None`
    /// returned.
    ///
    /// # Safety
    /// `keep_alive` must keep mapped every map handed to [`upload`](Self::upload) until it is
    /// dropped (typically an `Arc` of the checkpoint the maps belong to): the borrow checker
    /// sees the maps' borrows end here, while the registrations still cover them.
    pub unsafe fn finish_in_background<K: Send + 'static>(
        mut self,
        keep_alive: K,
    ) -> Option<std::thread::JoinHandle<()>> {
        if !self.in_flight.is_empty() && self.flush().is_err() {
            std::mem::forget(std::mem::take(&mut self.in_flight));
        }
        let releaser = self.releaser.take();
        // The streams too: destroying one is a driver call, which would wait for the
        // unregistering (the driver serialises them), so the caller would wait after all.
        let staging = (
            std::mem::take(&mut self.staging),
            std::mem::take(&mut self.streams),
            std::mem::take(&mut self.staging_streams),
        );
        type Releaser = Option<(
            std::sync::mpsc::Sender<Vec<HostRegion>>,
            std::thread::JoinHandle<()>,
        )>;
        type Streams = Vec<(u32, Vec<Stream>)>;
        type Buffers = (Vec<PinnedBuffer>, Streams, Streams);
        // Shared, because a thread that fails to start drops what it was given.
        type Cleanup<K> = std::sync::Mutex<Option<(Releaser, Buffers, K)>>;
        fn run<K>(cleanup: &Cleanup<K>) {
            let taken = cleanup.lock().ok().and_then(|mut c| c.take());
            if let Some((releaser, staging, keep_alive)) = taken {
                if let Some((tx, handle)) = releaser {
                    drop(tx);
                    let _ = handle.join();
                }
                drop(staging);
                drop(keep_alive);
            }
        }
        let cleanup: Arc<Cleanup<K>> =
            Arc::new(std::sync::Mutex::new(Some((releaser, staging, keep_alive))));
        let theirs = Arc::clone(&cleanup);
        match spawn("releasing registrations", move || run(&theirs)) {
            Ok(handle) => Some(handle),
            Err(_) => {
                run(&cleanup);
                None
            }
        }
    }
}

/// Registers `[lo, hi)` of `map` chunk by chunk and enqueues each chunk's copies as soon as it
/// is registered. Returns the regions registered so far with the outcome: on success the copies
/// are still draining (the caller synchronises before releasing the regions).
fn register_and_copy(
    streams: &[(u32, Vec<Stream>)],
    ctx: &Arc<Context>,
    map: &[u8],
    pieces: &[Piece],
    lo: usize,
    hi: usize,
) -> (Vec<HostRegion>, Result<(), Error>) {
    // This thread enqueues the copies.
    if let Err(e) = ctx.bind() {
        return (Vec::new(), Err(e));
    }
    let base = map.as_ptr() as usize;
    let start = (base + lo) & !(PAGE - 1);
    let end = (base + hi).div_ceil(PAGE) * PAGE;
    // Registration covers whole pages; the last page may extend past the mapping's length
    // but not past its last page, which the kernel mapped.
    let map_end_page = (base + map.len()).div_ceil(PAGE) * PAGE;
    let chunks: Vec<(usize, usize)> = (start..end)
        .step_by(REGISTER_CHUNK)
        .map(|s| (s, (s + REGISTER_CHUNK).min(end).min(map_end_page)))
        .collect();
    let mut regions = Vec::with_capacity(chunks.len());
    let mut k = 0;
    // Two threads register alternate chunks ahead of the copies (pinning pages is CPU
    // work that would otherwise stall the DMA); this thread enqueues each chunk's copies
    // as soon as it is registered.
    let trace = tracing::enabled!(tracing::Level::DEBUG);
    let started = std::time::Instant::now();
    let populate_ns = std::sync::atomic::AtomicU64::new(0);
    let register_ns = std::sync::atomic::AtomicU64::new(0);
    let mut wait_ns = 0u64;
    let result = std::thread::scope(|scope| -> Result<(), Error> {
        let (populate_ns, register_ns) = (&populate_ns, &register_ns);
        let mut receivers = Vec::new();
        for t in 0..REGISTER_THREADS {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<HostRegion, Error>>(1);
            let mine: Vec<(usize, usize)> = chunks
                .iter()
                .copied()
                .skip(t)
                .step_by(REGISTER_THREADS)
                .collect();
            let ctx = ctx.clone();
            // Returning early drops the receivers: the threads already started stop at their
            // next send, and the scope waits for them.
            spawn_scoped(scope, "registration", move || {
                for (s, e) in mine {
                    // SAFETY: [s, e) lies in `map`'s pages, which stay mapped for this
                    // call; regions are dropped (unregistered) after every stream is
                    // synchronised below.
                    let range = unsafe { std::slice::from_raw_parts(s as *const u8, e - s) };
                    let t0 = std::time::Instant::now();
                    populate(range);
                    let t1 = std::time::Instant::now();
                    let r = unsafe { HostRegion::register(&ctx, range) };
                    populate_ns.fetch_add(
                        (t1 - t0).as_nanos() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    register_ns.fetch_add(
                        t1.elapsed().as_nanos() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            })?;
            receivers.push(rx);
        }
        for (i, &(chunk_start, chunk_end)) in chunks.iter().enumerate() {
            let waited = std::time::Instant::now();
            let region = receivers[i % REGISTER_THREADS]
                .recv()
                .map_err(|_| Error::Cuda {
                    call: "cuMemHostRegister",
                    code: "registration thread ended".into(),
                })??;
            wait_ns += waited.elapsed().as_nanos() as u64;
            regions.push(region);
            let window = chunk_start - base;
            for (i, piece_offset, part) in window_parts(pieces, window, chunk_end - chunk_start) {
                if let Dst::Cuda(a) = &pieces[i].dst {
                    let stream = stream_for(streams, a, k)?;
                    k += 1;
                    let src = &map[window + part.start..window + part.end];
                    // SAFETY: `src` is registered and stays so until the streams are
                    // synchronised at the end of this function.
                    unsafe { a.copy_from_host_async(piece_offset, src, stream)? };
                }
            }
        }
        Ok(())
    });
    let enqueued = started.elapsed();
    if trace && result.is_ok() {
        let ms = |ns: u64| ns as f64 / 1e6;
        tracing::debug!(
            "trace registered: {} MB, {} chunks, populate {:.0} ms + register {:.0} ms (thread sum), main waited {:.0} ms, enqueued at {:.0} ms",
            (hi - lo) / 1_000_000, chunks.len(),
            ms(populate_ns.load(std::sync::atomic::Ordering::Relaxed)),
            ms(register_ns.load(std::sync::atomic::Ordering::Relaxed)),
            ms(wait_ns), enqueued.as_secs_f64() * 1e3
        );
    }
    (regions, result)
}

/// The index in `streams` of the device `alloc` lives on.
fn device_of(streams: &[(u32, Vec<Stream>)], alloc: &DeviceAlloc) -> Result<usize, Error> {
    let ordinal = alloc_ordinal(alloc);
    streams
        .iter()
        .position(|(o, _)| *o == ordinal)
        .ok_or(Error::Cuda {
            call: "stream lookup",
            code: format!("no stream for cuda:{ordinal}"),
        })
}

/// Stream `k` (round robin) of the device `alloc` lives on.
fn stream_for<'s>(
    streams: &'s [(u32, Vec<Stream>)],
    alloc: &DeviceAlloc,
    k: usize,
) -> Result<&'s Stream, Error> {
    let s = &streams[device_of(streams, alloc)?].1;
    Ok(&s[k % s.len()])
}

fn alloc_ordinal(a: &DeviceAlloc) -> u32 {
    a.context_ordinal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residency_is_sampled_evenly_over_the_range() {
        let len = 64 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: the mapping is `len` bytes long and lives until munmap below.
        let range = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
        assert_eq!(
            resident_fraction(range),
            0.0,
            "untouched pages are not resident"
        );
        // Touch the first quarter: the samples see a quarter.
        for page in range[..len / 4].chunks_mut(PAGE) {
            page[0] = 1;
        }
        let f = resident_fraction(range);
        assert!((f - 0.25).abs() < 0.01, "{f}");
        assert_eq!(resident_fraction(&range[..len / 4]), 1.0);
        // A range shorter than the sample count is checked page by page.
        assert_eq!(
            resident_fraction(&range[len / 4 - 3 * PAGE..len / 4 + PAGE]),
            0.75
        );
        // SAFETY: `ptr` came from mmap with this length; `range` is not used after.
        unsafe { libc::munmap(ptr, len) };
    }
    /// A read-only mapping of the first `len` bytes of `file` (`flags`: MAP_SHARED or
    /// MAP_PRIVATE); the caller unmaps it.
    fn map_file(file: &File, len: usize, flags: libc::c_int) -> *mut libc::c_void {
        // SAFETY: a read-only mapping of a file the test owns and does not change.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                flags,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        ptr
    }

    #[test]
    fn only_shared_mappings_count_as_shared() {
        let maps = "\
1000-3000 r--s 00000000 fd:01 12 /m/model.safetensors
3000-4000 r--s 00002000 fd:01 12 /m/model.safetensors
4000-5000 r--p 00000000 fd:01 13 /m/other
6000-7000 r--s 00000000 fd:01 14 /m/after-a-gap
";
        assert!(shared_in_maps(maps, 0x1000, 0x2000));
        assert!(
            shared_in_maps(maps, 0x1800, 0x2800),
            "two adjacent shared mappings"
        );
        assert!(
            !shared_in_maps(maps, 0x3800, 0x1000),
            "reaches a private mapping"
        );
        assert!(!shared_in_maps(maps, 0x4000, 0x10));
        assert!(!shared_in_maps(maps, 0x5800, 0x1000), "starts in a gap");
        assert!(!shared_in_maps(maps, 0x3000, 0x4000), "crosses a gap");
        assert!(!shared_in_maps(maps, 0x8000, 0x10), "not mapped at all");
        assert!(!shared_in_maps("garbage", 0x1000, 0x10));

        // This process's own mappings of a file, as the kernel lists them.
        let dir = std::env::temp_dir().join(format!("gpu-mem-maps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let len = 3 * PAGE + 5;
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let file = File::open(&path).unwrap();
        let (shared, private) = (
            map_file(&file, len, libc::MAP_SHARED),
            map_file(&file, len, libc::MAP_PRIVATE),
        );
        // SAFETY: each mapping is `len` bytes and lives until munmap below.
        let (s, p) = unsafe {
            (
                std::slice::from_raw_parts(shared as *const u8, len),
                std::slice::from_raw_parts(private as *const u8, len),
            )
        };
        assert!(mapping_is_shared(s));
        assert!(mapping_is_shared(&s[PAGE + 1..]));
        assert!(!mapping_is_shared(p));
        assert!(!mapping_is_shared(&[0u8; 64]), "the stack");
        // SAFETY: both came from mmap with this length; the slices are not used after.
        unsafe {
            libc::munmap(shared, len);
            libc::munmap(private, len);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every device path (registered, staged, mixed, and the staged path with several
    /// windows per piece and pieces per window) puts the same bytes where they belong. Needs a
    /// GPU: without a driver it has nothing to test and returns (gpu-check runs it there).
    #[test]
    fn every_device_path_copies_each_piece_exactly() {
        if !crate::cuda::driver_available() || crate::cuda::device_count() == 0 {
            assert!(
                std::env::var_os("WEIGHTSMITH_REQUIRE_GPU").is_none(),
                "WEIGHTSMITH_REQUIRE_GPU is set, but no CUDA device was found"
            );
            eprintln!("skipped (WEIGHTSMITH_REQUIRE_GPU unset): no CUDA device; scripts/gpu-check.sh runs it");
            return;
        }
        let ctx = Context::new(0).unwrap();
        let dir = std::env::temp_dir().join(format!("gpu-mem-upload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pieces.bin");
        let len = (24 << 20) + 12_345;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        // Shared, as st-io maps checkpoints (memmap2::Mmap::map); the private mapping is the
        // last case.
        let shared = map_file(&file, len, libc::MAP_SHARED);
        let private = map_file(&file, len, libc::MAP_PRIVATE);
        // SAFETY: each mapping is `len` bytes and lives until munmap below.
        let (map, private_map) = unsafe {
            (
                std::slice::from_raw_parts(shared as *const u8, len),
                std::slice::from_raw_parts(private as *const u8, len),
            )
        };
        // Pieces of odd sizes with gaps between them, the first not at offset 0, one empty.
        let mut ranges = Vec::new();
        let mut at = 3usize;
        for n in [1usize, 4095, 0, 5 << 20, 777, 9 << 20, 123_457, 3 << 20] {
            ranges.push((at, n));
            at += n + 29;
        }
        ranges.push((at, len - at));
        let configs = [
            ("registered", true, StagingConfig::default()),
            ("staged", false, StagingConfig::default()),
            (
                "staged, 1 MiB windows, 3 workers",
                false,
                StagingConfig {
                    workers: 3,
                    window_bytes: 1 << 20,
                    warm_staged_percent: 0,
                    adapt_warm_share: false,
                },
            ),
            (
                "mixed",
                true,
                StagingConfig {
                    workers: 2,
                    window_bytes: 1 << 20,
                    warm_staged_percent: 45,
                    adapt_warm_share: false,
                },
            ),
            (
                "mixed, adapting (the second upload takes the adapted share)",
                true,
                StagingConfig {
                    workers: 2,
                    window_bytes: 1 << 20,
                    warm_staged_percent: 50,
                    adapt_warm_share: true,
                },
            ),
        ];
        let private_index = configs.len();
        let private_case = (
            "a private mapping (registration allowed, never used)",
            true,
            StagingConfig::default(),
        );
        for (k, (label, register, config)) in configs.into_iter().chain([private_case]).enumerate()
        {
            let map = if k == private_index { private_map } else { map };
            let allocs: Vec<DeviceAlloc> = ranges
                .iter()
                .map(|&(_, n)| DeviceAlloc::new(&ctx, n).unwrap())
                .collect();
            let mut engine = UploadEngine::new(std::slice::from_ref(&ctx)).unwrap();
            engine.allow_register = register;
            engine.staging_config = config;
            let mut pieces: Vec<Piece> = ranges
                .iter()
                .zip(&allocs)
                .map(|(&(offset, n), a)| Piece {
                    offset: offset as u64,
                    len: n,
                    dst: Dst::Cuda(a),
                })
                .collect();
            let mut path_taken = engine.upload(&file, map, &mut pieces).unwrap();
            if config.adapt_warm_share {
                engine.flush().unwrap();
                path_taken = engine.upload(&file, map, &mut pieces).unwrap();
            }
            engine.flush().unwrap();
            if k == 0 {
                // The background finish: every byte is in place when it returns, and what it
                // keeps alive is dropped only after the registrations are released.
                struct Kept(Arc<std::sync::atomic::AtomicBool>);
                impl Drop for Kept {
                    fn drop(&mut self) {
                        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
                // SAFETY: the mapping lives until munmap at the end of the test, after the join.
                let releasing = unsafe { engine.finish_in_background(Kept(dropped.clone())) };
                releasing.expect("a thread").join().unwrap();
                assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
            } else {
                engine.finish();
            }
            if k == private_index {
                assert_eq!(path_taken, UploadPath::Pinned, "{label}");
            } else if register && config.warm_staged_percent == 0 {
                assert_eq!(path_taken, UploadPath::Registered, "{label}");
            }
            for (&(offset, n), a) in ranges.iter().zip(&allocs) {
                let mut back = vec![0u8; n];
                a.copy_to_host(0, &mut back).unwrap();
                assert!(
                    back == bytes[offset..offset + n],
                    "{label} ({}): piece at {offset} ({n} bytes) differs",
                    path_taken.name()
                );
            }
        }
        // SAFETY: both came from mmap with this length; the slices are not used after.
        unsafe {
            libc::munmap(shared, len);
            libc::munmap(private, len);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    /// The windows of the staged path, taken in any order, put every byte of every piece in
    /// place exactly once, whatever the window size and the pieces' sizes, gaps and order.
    #[test]
    fn window_parts_cover_every_piece_exactly_once() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rand = |m: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % m as u64) as usize
        };
        for _ in 0..300 {
            let count = 1 + rand(12);
            let mut spans = Vec::new();
            let mut at = rand(50);
            for _ in 0..count {
                let len = match rand(4) {
                    0 => 0,
                    1 => 1 + rand(8),
                    _ => rand(5000),
                };
                spans.push((at, len));
                at += len + rand(3) * rand(40);
            }
            let file: Vec<u8> = (0..at + 10).map(|i| (i * 131 % 251) as u8).collect();
            let mut buffers: Vec<Vec<u8>> = spans.iter().map(|&(_, n)| vec![0u8; n]).collect();
            let mut written: Vec<Vec<u8>> = spans.iter().map(|&(_, n)| vec![0u8; n]).collect();
            let pieces: Vec<Piece> = spans
                .iter()
                .zip(buffers.iter_mut())
                .map(|(&(offset, len), b)| Piece {
                    offset: offset as u64,
                    len,
                    dst: Dst::Host(b.as_mut_slice()),
                })
                .collect();
            let lo = spans[0].0;
            let hi = spans.last().map_or(lo, |&(o, n)| o + n);
            let window = 1 + rand(3000);
            let windows = (hi - lo).div_ceil(window);
            // Windows in a shuffled order, as workers take them.
            let mut order: Vec<usize> = (0..windows).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rand(i + 1));
            }
            let mut copies = Vec::new();
            for w in order {
                let start = lo + w * window;
                let n = window.min(hi - start);
                for (k, piece_offset, part) in window_parts(&pieces, start, n) {
                    copies.push((k, piece_offset, start + part.start, part.len()));
                }
            }
            drop(pieces);
            for (k, piece_offset, file_offset, len) in copies {
                let dst = &mut written[k][piece_offset..piece_offset + len];
                assert!(
                    dst.iter().all(|&b| b == 0),
                    "piece {k} written twice at {piece_offset}"
                );
                dst.copy_from_slice(&file[file_offset..file_offset + len]);
                for b in dst.iter_mut() {
                    *b = b.wrapping_add(1);
                }
            }
            for (k, &(offset, len)) in spans.iter().enumerate() {
                let want: Vec<u8> = file[offset..offset + len]
                    .iter()
                    .map(|b| b.wrapping_add(1))
                    .collect();
                assert_eq!(
                    written[k], want,
                    "piece {k} at {offset}, {len} bytes, windows of {window}"
                );
            }
        }
    }
}
