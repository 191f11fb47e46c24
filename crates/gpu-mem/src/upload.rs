//! Copying byte ranges of a mapped file to their destinations (device allocations or host
//! buffers) as fast as the machine allows, choosing the path per file:
//!
//! 1. `registered`: the file is in the page cache (`mincore`), so its mapping is registered
//!    with the driver (read-only, 1 GiB at a time) and copied straight from, on two streams per
//!    device; registering the next chunk overlaps the copies of this one.
//! 2. `pinned`: the file is cold, so parallel `pread`s fill pinned staging buffers that are
//!    copied on alternate streams; direct copies from a cold mapping would fault page by page.
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
    Pageable,
    Host,
}

impl UploadPath {
    pub fn name(self) -> &'static str {
        match self {
            UploadPath::Registered => "registered",
            UploadPath::Pinned => "pinned",
            UploadPath::Pageable => "pageable",
            UploadPath::Host => "host",
        }
    }
}

const PAGE: usize = 4096;
const REGISTER_CHUNK: usize = 512 << 20;
const REGISTER_THREADS: usize = 2;
const STAGING_BYTES: usize = 64 << 20;
const STAGING_BUFFERS: usize = 4;
const READ_THREADS: usize = 8;

/// Pages of a range that [`resident_fraction`] asks `mincore` about at most.
const RESIDENCY_SAMPLES: usize = 1024;

/// The fraction of `range` resident in the page cache, from at most [`RESIDENCY_SAMPLES`]
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

/// Maps a page-cached range into this process's page tables up front (MADV_POPULATE_READ,
/// Linux 5.14+), in parallel, so that registering it does not fault page by page. A hint:
/// on older kernels it fails and registration faults the pages itself.
fn populate(range: &[u8]) {
    const MADV_POPULATE_READ: libc::c_int = 22;
    let piece = (range.len() / READ_THREADS).div_ceil(PAGE).max(1) * PAGE;
    std::thread::scope(|s| {
        for chunk in range.chunks(piece) {
            s.spawn(move || {
                // SAFETY: the chunk lies in a live, page-aligned mapping (the caller's range
                // starts on a page boundary and `piece` is a multiple of the page size);
                // MADV_POPULATE_READ only reads.
                unsafe {
                    libc::madvise(
                        chunk.as_ptr() as *mut libc::c_void,
                        chunk.len(),
                        MADV_POPULATE_READ,
                    )
                };
            });
        }
    });
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
                s.spawn(move || file.read_exact_at(chunk, offset + (i * piece) as u64))
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a read thread panicked")))
        })
    })
}

/// Copies files' ranges to their destinations; holds the streams and staging buffers.
///
/// Registrations of a finished file are released by a background thread while the next file
/// is copied; dropping the engine waits for it, so drop the engine before the mapped files.
pub struct UploadEngine {
    streams: Vec<(u32, Vec<Stream>)>,
    staging: Vec<PinnedBuffer>,
    releaser: Option<(
        std::sync::mpsc::Sender<Vec<HostRegion>>,
        std::thread::JoinHandle<()>,
    )>,
    /// Disable the registered path (for measurements of the others).
    pub allow_register: bool,
    /// Registrations whose copies may still be running (see [`UploadEngine::flush`]).
    in_flight: Vec<HostRegion>,
}

impl UploadEngine {
    /// An engine for these CUDA contexts (none: host only).
    pub fn new(contexts: &[Arc<Context>]) -> Result<UploadEngine, Error> {
        let mut streams = Vec::new();
        for c in contexts {
            streams.push((c.ordinal, vec![Stream::new(c)?, Stream::new(c)?]));
        }
        let (tx, rx) = std::sync::mpsc::channel::<Vec<HostRegion>>();
        let releaser = std::thread::spawn(move || {
            for regions in rx {
                drop(regions);
            }
        });
        Ok(UploadEngine {
            streams,
            staging: Vec::new(),
            releaser: Some((tx, releaser)),
            allow_register: true,
            in_flight: Vec::new(),
        })
    }

    fn stream_for(&self, alloc: &DeviceAlloc, k: usize) -> Result<&Stream, Error> {
        let ordinal = alloc_ordinal(alloc);
        self.streams
            .iter()
            .find(|(o, _)| *o == ordinal)
            .map(|(_, s)| &s[k % s.len()])
            .ok_or(Error::Cuda {
                call: "stream lookup",
                code: format!("no stream for cuda:{ordinal}"),
            })
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
    /// destinations. Returns the path taken. On return every copy has completed except those
    /// of the registered path, which drain while the next file is set up: call
    /// [`UploadEngine::flush`] before using the destinations, and keep `map` and the
    /// destinations alive until then.
    pub fn upload(
        &mut self,
        file: &File,
        map: &[u8],
        pieces: &mut [Piece],
    ) -> Result<UploadPath, Error> {
        let (lo, hi) = match (pieces.first(), pieces.last()) {
            (Some(f), Some(l)) => (f.offset as usize, l.offset as usize + l.len),
            _ => return Ok(UploadPath::Host),
        };
        // Host destinations: parallel preads straight into them.
        let mut any_cuda = false;
        for p in pieces.iter_mut() {
            match &mut p.dst {
                Dst::Host(buf) => parallel_read(file, p.offset, buf).map_err(|e| Error::Read {
                    offset: p.offset,
                    message: e.to_string(),
                })?,
                Dst::Cuda(_) => any_cuda = true,
            }
        }
        if !any_cuda {
            return Ok(UploadPath::Host);
        }
        let t0 = std::time::Instant::now();
        let warm = resident_fraction(&map[lo..hi]) >= 0.9;
        if std::env::var_os("WEIGHTSMITH_TRACE").is_some() {
            eprintln!(
                "trace residency: {} MB checked in {:.1} ms",
                (hi - lo) / 1_000_000,
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        if warm && self.allow_register {
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
        let trace = std::env::var_os("WEIGHTSMITH_TRACE").is_some();
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
                scope.spawn(move || {
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
                });
                receivers.push(rx);
            }
            for (i, &(chunk_start, chunk_end)) in chunks.iter().enumerate() {
                let waited = std::time::Instant::now();
                let region =
                    receivers[i % REGISTER_THREADS]
                        .recv()
                        .map_err(|_| Error::Cuda {
                            call: "cuMemHostRegister",
                            code: "registration thread ended".into(),
                        })??;
                wait_ns += waited.elapsed().as_nanos() as u64;
                regions.push(region);
                for p in pieces {
                    let (ps, pe) = (base + p.offset as usize, base + p.offset as usize + p.len);
                    let (s, e) = (ps.max(chunk_start), pe.min(chunk_end));
                    if s >= e {
                        continue;
                    }
                    if let Dst::Cuda(a) = &p.dst {
                        let stream = self.stream_for(a, k)?;
                        k += 1;
                        let src = &map[s - base..e - base];
                        // SAFETY: `src` is registered and stays so until the streams are
                        // synchronised at the end of this function.
                        unsafe { a.copy_from_host_async(s - ps, src, stream)? };
                    }
                }
            }
            Ok(())
        });
        let enqueued = started.elapsed();
        if result.is_err() {
            // Nothing may still read these regions when they are unregistered.
            let synced = self.sync_all();
            self.release(regions);
            return result.and(synced);
        }
        // The copies drain while the caller goes on to the next file; `flush` waits for them
        // and then unregisters these regions.
        self.in_flight.extend(regions);
        if trace {
            let ms = |ns: u64| ns as f64 / 1e6;
            eprintln!(
                "trace registered: {} MB, {} chunks, populate {:.0} ms + register {:.0} ms (thread sum), main waited {:.0} ms, enqueued at {:.0} ms",
                (hi - lo) / 1_000_000, chunks.len(),
                ms(populate_ns.load(std::sync::atomic::Ordering::Relaxed)),
                ms(register_ns.load(std::sync::atomic::Ordering::Relaxed)),
                ms(wait_ns), enqueued.as_secs_f64() * 1e3
            );
        }
        Ok(())
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

    fn upload_pinned(
        &mut self,
        file: &File,
        pieces: &[Piece],
        lo: usize,
        hi: usize,
    ) -> Result<(), Error> {
        let ctx = self.any_context()?;
        while self.staging.len() < STAGING_BUFFERS {
            self.staging.push(PinnedBuffer::new(&ctx, STAGING_BYTES)?);
        }
        advise(file, lo, hi - lo, libc::POSIX_FADV_SEQUENTIAL);
        // Which streams each staging buffer was last copied on.
        let mut pending: Vec<Vec<(usize, usize)>> = vec![Vec::new(); STAGING_BUFFERS];
        let mut window = lo;
        let mut k = 0;
        while window < hi {
            let b = k % STAGING_BUFFERS;
            for &(d, s) in &pending[b] {
                self.streams[d].1[s].synchronize()?;
            }
            pending[b].clear();
            let n = STAGING_BYTES.min(hi - window);
            // Keep the disk busy while this window is copied: ask the kernel to read the next
            // two windows ahead (a hint; errors are ignored).
            advise(
                file,
                window + n,
                2 * STAGING_BYTES,
                libc::POSIX_FADV_WILLNEED,
            );
            {
                let buf = &mut self.staging[b].as_mut_slice()[..n];
                parallel_read(file, window as u64, buf).map_err(|e| Error::Read {
                    offset: window as u64,
                    message: e.to_string(),
                })?;
            }
            for p in pieces {
                let (ps, pe) = (p.offset as usize, p.offset as usize + p.len);
                let (s, e) = (ps.max(window), pe.min(window + n));
                if s >= e {
                    continue;
                }
                if let Dst::Cuda(a) = &p.dst {
                    let ordinal = alloc_ordinal(a);
                    let d = self
                        .streams
                        .iter()
                        .position(|(o, _)| *o == ordinal)
                        .unwrap_or(0);
                    let si = k % self.streams[d].1.len();
                    let src = &self.staging[b].as_slice()[s - window..e - window];
                    // SAFETY: the staging buffer is not refilled before this stream is
                    // synchronised (pending list above), and all are synchronised at the end.
                    unsafe { a.copy_from_host_async(s - ps, src, &self.streams[d].1[si])? };
                    if !pending[b].contains(&(d, si)) {
                        pending[b].push((d, si));
                    }
                }
            }
            window += n;
            k += 1;
        }
        self.sync_all()
    }
}

impl Drop for UploadEngine {
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

impl UploadEngine {
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
}
