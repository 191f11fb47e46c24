//! Reading a checkpoint's tensors into the page cache ahead of their use.
//!
//! A pass that reads tensors through the memory map on a cold cache waits for the disk page
//! fault by page fault, and a pass that also writes (a merge) then reads and writes in turn
//! instead of at once. [`ReadAhead`] reads the tensors a caller is about to use, in the order
//! it will use them, on a background thread with large sequential reads, so the disk reads
//! while the caller computes and writes. It stays a bounded number of bytes in front of the
//! caller, so the pages are still cached when the caller gets to them, and it costs one
//! read buffer of anonymous memory.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::checkpoint::{Checkpoint, TensorInfo};

/// Bytes of one read.
const CHUNK: usize = 8 << 20;

/// A background reader; see the module docs. Dropping it stops the thread (within one read).
pub struct ReadAhead {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Bytes read so far.
    bytes_read: AtomicU64,
}

#[derive(Default)]
struct State {
    /// The item of the order the caller works on.
    reached: usize,
    stop: bool,
}

/// One item's bytes: (file, offset, length).
type Range = (usize, u64, u64);

impl ReadAhead {
    /// Starts reading `order`'s tensors (`None`: an item with nothing to read) on a thread,
    /// at most `ahead` bytes past the start of the item the caller has [`reached`](Self::reached).
    pub fn start<'a>(
        checkpoint: &Checkpoint,
        order: impl IntoIterator<Item = Option<&'a TensorInfo>>,
        ahead: u64,
    ) -> ReadAhead {
        let ranges: Vec<Option<Range>> = order
            .into_iter()
            .map(|t| t.map(|t| (t.file, t.offset, t.len)))
            .collect();
        let paths: Vec<PathBuf> = checkpoint.files().iter().map(|f| f.path.clone()).collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            bytes_read: AtomicU64::new(0),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("weightsmith-readahead".into())
                .spawn(move || read(&shared, &paths, &ranges, ahead))
                .ok()
        };
        ReadAhead { shared, thread }
    }

    /// The caller now works on item `item` of the order (earlier items are done with).
    pub fn reached(&self, item: usize) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.reached = state.reached.max(item);
            self.shared.wake.notify_all();
        }
    }

    /// Bytes the thread has read so far.
    pub fn bytes_read(&self) -> u64 {
        self.shared.bytes_read.load(Ordering::Relaxed)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stop = true;
            self.shared.wake.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The reader thread. Reading is a hint: a file that cannot be opened or read stops it, and
/// the caller's own reads then report the problem.
#[cfg(unix)]
fn read(shared: &Shared, paths: &[PathBuf], ranges: &[Option<Range>], ahead: u64) {
    use std::os::unix::fs::FileExt;

    // Where each item starts in the sequence of all items' bytes.
    let starts: Vec<u64> = ranges
        .iter()
        .scan(0u64, |at, r| {
            let start = *at;
            *at += r.map_or(0, |(_, _, len)| len);
            Some(start)
        })
        .collect();
    let mut files: Vec<Option<std::fs::File>> = paths.iter().map(|_| None).collect();
    let mut buffer = vec![0u8; CHUNK];
    for (item, range) in ranges.iter().enumerate() {
        let Some((file, offset, len)) = *range else {
            continue;
        };
        let mut done = 0u64;
        while done < len {
            let piece = (len - done).min(CHUNK as u64);
            match turn(shared, &starts, item, done + piece, ahead) {
                Turn::Read => {}
                // The caller is past this item: no use reading the rest of it.
                Turn::Skip => break,
                Turn::Stop => return,
            }
            if files[file].is_none() {
                files[file] = std::fs::File::open(&paths[file]).ok();
            }
            let Some(f) = files[file].as_ref() else {
                return;
            };
            match f.read_at(&mut buffer[..piece as usize], offset + done) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    done += n as u64;
                    shared.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// What the reader does next with an item.
#[cfg(unix)]
enum Turn {
    Read,
    Skip,
    Stop,
}

/// Waits until the item's bytes up to `upto` are within `ahead` of the start of the caller's
/// item (the caller's own item is always read), or the caller is past the item, or stopped.
#[cfg(unix)]
fn turn(shared: &Shared, starts: &[u64], item: usize, upto: u64, ahead: u64) -> Turn {
    let Ok(mut state) = shared.state.lock() else {
        return Turn::Stop;
    };
    loop {
        if state.stop {
            return Turn::Stop;
        }
        if state.reached > item {
            return Turn::Skip;
        }
        if state.reached == item || starts[item] + upto - starts[state.reached] <= ahead {
            return Turn::Read;
        }
        state = match shared.wake.wait(state) {
            Ok(s) => s,
            Err(_) => return Turn::Stop,
        };
    }
}

#[cfg(not(unix))]
fn read(_: &Shared, _: &[PathBuf], _: &[Option<Range>], _: u64) {}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A checkpoint of `n` 1 MiB tensors in one file.
    fn checkpoint(dir: &std::path::Path, n: usize) -> Checkpoint {
        let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        let data: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 1 << 20]).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = names
            .iter()
            .zip(&data)
            .map(|(name, bytes)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::U8,
                    vec![1 << 20],
                    bytes,
                )
                .unwrap();
                (name.clone(), view)
            })
            .collect();
        let path = dir.join("model.safetensors");
        safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
        Checkpoint::open(&path).unwrap()
    }

    /// Waits (up to 20 s) until the reader has read `bytes`, then checks it stops there.
    fn settles_at(reader: &ReadAhead, bytes: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while reader.bytes_read() < bytes && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(reader.bytes_read(), bytes);
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn reads_in_order_within_its_lead_and_skips_items_without_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = checkpoint(dir.path(), 8);
        // Item 2 has nothing to read.
        let order: Vec<Option<&TensorInfo>> = ckpt
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, t)| (i != 2).then_some(t))
            .collect();
        let reader = ReadAhead::start(&ckpt, order.iter().copied(), 3 * MIB);
        // The caller at item 0: items 0, 1 and 3 (item 2 is empty) fill the lead.
        settles_at(&reader, 3 * MIB);
        // At item 4: up to 3 MiB past its start, that is items 4, 5 and 6.
        reader.reached(4);
        settles_at(&reader, 6 * MIB);
        reader.reached(7);
        settles_at(&reader, 7 * MIB);
        // Everything is read: the thread ends by itself.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !reader.thread.as_ref().unwrap().is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader did not end"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn reads_a_tensor_larger_than_its_lead_once_the_caller_is_on_it_and_stops_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = checkpoint(dir.path(), 4);
        let order: Vec<Option<&TensorInfo>> = ckpt.tensors().iter().map(Some).collect();
        let reader = ReadAhead::start(&ckpt, order.iter().copied(), MIB / 2);
        // The item the caller works on is read whole, whatever the lead.
        settles_at(&reader, MIB);
        // The drop stops a reader that waits for the caller (the test hangs if it does not).
        drop(reader);
    }

    #[test]
    fn skips_what_the_caller_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = checkpoint(dir.path(), 6);
        let order: Vec<Option<&TensorInfo>> = ckpt.tensors().iter().map(Some).collect();
        let reader = ReadAhead::start(&ckpt, order.iter().copied(), MIB);
        settles_at(&reader, MIB);
        // The caller jumps to the last item: items 1 to 4 are not read.
        reader.reached(5);
        settles_at(&reader, 2 * MIB);
    }
}
