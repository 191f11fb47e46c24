//! No SIGBUS from a file that shrinks while it is mapped.
//!
//! Reading a page of a file mapping past the file's end raises SIGBUS, which kills the process:
//! a trainer saving into the folder we read (it truncates the file, then writes it again) would
//! kill a merge or a load outright. Every checkpoint mapping st-io makes is registered here, and
//! a process-wide SIGBUS handler, installed once, handles a fault inside one: it maps a page of
//! zeros over the faulting page (`mmap` with `MAP_FIXED`, a plain system call, safe in a signal
//! handler), marks the mapping as damaged, and returns, so the read completes. The zeros never
//! reach an output: every verb asks [`MapGuard::check`] (through
//! [`crate::Checkpoint::check_intact`]) after its last read and before anything is presented
//! as done, and a damaged mapping — or a file whose size or identity changed — is an error
//! naming the file. A fault outside our mappings goes to the handler that was there before (by
//! default, the process dies as it would have).
//!
//! The registry is a fixed table of atomics (no allocation, no lock in the handler); a process
//! with more than [`SLOTS`] mappings open at once leaves the extra ones unguarded and says so
//! through [`MapGuard::guarded`].

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings guarded at once.
pub const SLOTS: usize = 4096;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    damaged: AtomicBool,
    used: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    damaged: AtomicBool::new(false),
    used: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static INSTALL: Once = Once::new();
/// The handler that was installed before ours (a `libc::sigaction`, stored as bytes).
static mut PREVIOUS: Option<libc::sigaction> = None;

/// A registered mapping: the address range, and the file's identity when it was mapped.
#[derive(Debug)]
pub struct MapGuard {
    slot: Option<usize>,
    len: u64,
    dev: u64,
    ino: u64,
}

impl MapGuard {
    /// Registers `bytes` (a file mapping of the file `meta` describes).
    pub fn new(bytes: &[u8], meta: &std::fs::Metadata) -> MapGuard {
        INSTALL.call_once(install);
        let mut slot = None;
        if !bytes.is_empty() {
            for (i, s) in TABLE.iter().enumerate() {
                if s.used
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    s.damaged.store(false, Ordering::Release);
                    s.len.store(0, Ordering::Release);
                    s.start.store(bytes.as_ptr() as usize, Ordering::Release);
                    s.len.store(bytes.len(), Ordering::Release);
                    slot = Some(i);
                    break;
                }
            }
        }
        MapGuard {
            slot,
            len: meta.len(),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// Whether faults in the mapping are caught (false only when the table was full).
    pub fn guarded(&self) -> bool {
        self.slot.is_some()
    }

    /// `Ok` when no read of the mapping faulted and `path` is still the same file with the same
    /// length; otherwise what happened, for an error that names the file.
    pub fn check(&self, path: &Path) -> Result<(), String> {
        if let Some(i) = self.slot {
            if TABLE[i].damaged.load(Ordering::Acquire) {
                return Err("the file shrank while it was read (another process truncated or rewrote it); nothing read from it was used".into());
            }
        }
        match std::fs::metadata(path) {
            Ok(m) if m.dev() != self.dev || m.ino() != self.ino => Err(
                "the file was replaced while it was read (another process wrote a new file in its place)".into(),
            ),
            Ok(m) if m.len() != self.len => Err(format!(
                "the file changed size while it was read ({} bytes, now {}); read it again once the writer is done",
                self.len,
                m.len()
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("the file is gone ({e})")),
        }
    }
}

impl Drop for MapGuard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let s = &TABLE[i];
            s.len.store(0, Ordering::Release);
            s.start.store(0, Ordering::Release);
            s.used.store(false, Ordering::Release);
        }
    }
}

fn install() {
    // SAFETY: a zeroed sigaction is a valid value; sigaction(2) is called with pointers to
    // live locals, once, before any guarded mapping exists; PREVIOUS is written only here,
    // inside `Once`, before the handler can run.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
            PREVIOUS = Some(previous);
        }
    }
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; only atomics, mmap
    // and sigaction (async-signal-safe system calls) are used below.
    unsafe {
        let address = (*info).si_addr() as usize;
        for s in TABLE.iter() {
            let start = s.start.load(Ordering::Acquire);
            let len = s.len.load(Ordering::Acquire);
            if len != 0 && address >= start && address < start + len {
                let page = page_size();
                let base = address & !(page - 1);
                // Zeros over the page past the file's end: the read completes, the mapping is
                // marked, and the verb reports the file before anything is presented as done.
                let zero = libc::mmap(
                    base as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
                if zero != libc::MAP_FAILED {
                    s.damaged.store(true, Ordering::Release);
                    return;
                }
                break;
            }
        }
        // Not ours (or the page could not be replaced): what would have happened without us.
        #[allow(static_mut_refs)]
        match PREVIOUS {
            Some(previous)
                if previous.sa_sigaction != libc::SIG_DFL
                    && previous.sa_sigaction != libc::SIG_IGN =>
            {
                if previous.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(previous.sa_sigaction);
                    f(signal, info, context);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(previous.sa_sigaction);
                    f(signal);
                }
            }
            _ => {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
                // Returning re-runs the access, which now kills the process with SIGBUS.
            }
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_read_past_a_truncated_end_gives_zeros_and_a_damaged_mark_not_sigbus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        drop(f);
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the test owns the file; the truncation below is the point of the test.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let guard = MapGuard::new(&map, &file.metadata().unwrap());
        assert!(guard.guarded());
        assert_eq!(guard.check(&path), Ok(()));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let sum: u64 = map.iter().map(|&b| b as u64).sum();
        assert_eq!(
            sum,
            7 * 4096,
            "the page still in the file is read, the rest reads as zeros"
        );
        let e = guard.check(&path).unwrap_err();
        assert!(e.contains("shrank"), "{e}");
    }

    #[test]
    fn a_file_that_changed_size_or_was_replaced_is_reported_even_without_a_fault() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: as above.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let guard = MapGuard::new(&map, &file.metadata().unwrap());
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(guard.check(&path).unwrap_err().contains("changed size"));
        let other = dir.path().join("g.bin");
        std::fs::write(&other, vec![1u8; 8192]).unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(guard.check(&path).unwrap_err().contains("replaced"));
    }
}
