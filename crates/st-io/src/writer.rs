//! A streaming sharded writer for safetensors checkpoints.
//!
//! The caller declares every tensor (name, dtype, shape) up front, so each shard's header is
//! known before its first data byte; then the tensors' bytes arrive in that order and each byte
//! is written once, sequentially, through a large buffer. Shards are split with the rule of
//! `huggingface_hub.split_state_dict_into_shards` (used by transformers' `save_pretrained`):
//! in order, start a new shard when the next tensor would take the current one past the
//! maximum; a tensor larger than the maximum gets a shard of its own. One shard is written as
//! `model.safetensors` with no index, several as `model-0000i-of-0000N.safetensors` plus
//! `model.safetensors.index.json`.
//!
//! Everything is written in a hidden temporary folder beside the destination, synced, and
//! renamed into place by [`ShardWriter::finish`]; dropping an unfinished writer removes it.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint::{INDEX_FILE_NAME, SINGLE_FILE_NAME};
use crate::dtype::{element_count, Dtype};
use crate::error::{Error, Result};
use crate::header::{encode_header, HeaderTensor};

/// The default maximum shard size: 5 GB, the size the Hub recommends and that transformers 4.x,
/// peft and unsloth write.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// A tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: impl Into<Vec<u64>>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.into(),
        }
    }

    /// Byte size, or `None` when the shape overflows or is not a whole number of bytes.
    pub fn bytes(&self) -> Option<u64> {
        element_count(&self.shape).and_then(|n| self.dtype.bytes_for(n))
    }
}

/// One output file of a [`ShardPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedShard {
    pub file_name: String,
    /// Indices into the tensor specs, in the order they are written.
    pub tensors: Vec<usize>,
    /// Bytes of tensor data (the file adds its header).
    pub data_bytes: u64,
}

/// Which tensor goes to which file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub shards: Vec<PlannedShard>,
    pub total_bytes: u64,
}

/// Splits tensors into shards with transformers' rule (see the module docs). Pure.
pub fn plan_shards(specs: &[TensorSpec], max_shard_bytes: u64) -> Result<ShardPlan> {
    let mut names = HashSet::new();
    let mut shard_lists: Vec<(Vec<usize>, u64)> = Vec::new();
    let mut current: (Vec<usize>, u64) = (Vec::new(), 0);
    let mut total_bytes = 0u64;
    for (i, spec) in specs.iter().enumerate() {
        if !names.insert(spec.name.as_str()) {
            return Err(Error::WriterMisuse {
                message: format!("tensor \"{}\" is declared twice", spec.name),
            });
        }
        let bytes = spec.bytes().ok_or_else(|| Error::WriterMisuse {
            message: format!(
                "tensor \"{}\": shape {:?} of {} is too large or not a whole number of bytes",
                spec.name, spec.shape, spec.dtype
            ),
        })?;
        total_bytes = total_bytes
            .checked_add(bytes)
            .ok_or_else(|| Error::WriterMisuse {
                message: "total size overflows".into(),
            })?;
        if bytes > max_shard_bytes {
            shard_lists.push((vec![i], bytes));
            continue;
        }
        if current.1 + bytes > max_shard_bytes {
            shard_lists.push(std::mem::take(&mut current));
        }
        current.0.push(i);
        current.1 += bytes;
    }
    if !current.0.is_empty() || shard_lists.is_empty() {
        shard_lists.push(current);
    }
    let n = shard_lists.len();
    let shards = shard_lists
        .into_iter()
        .enumerate()
        .map(|(i, (tensors, data_bytes))| PlannedShard {
            file_name: if n == 1 {
                SINGLE_FILE_NAME.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            },
            tensors,
            data_bytes,
        })
        .collect();
    Ok(ShardPlan {
        shards,
        total_bytes,
    })
}

/// Options of a [`ShardWriter`].
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Maximum bytes of tensor data per shard (default 5 GB).
    pub max_shard_bytes: u64,
    /// Replace an existing destination (otherwise it is refused).
    pub replace_existing: bool,
    /// `__metadata__` of every shard (default `{"format": "pt"}`, as transformers writes).
    pub metadata: Vec<(String, String)>,
    /// Write buffer size; larger tensors are written straight through.
    pub buffer_bytes: usize,
    /// Flush every file and folder to stable storage before the final rename (default). Turn
    /// off only for scratch outputs: a crash may then leave a complete-looking folder whose
    /// files are not on disk yet.
    pub sync: bool,
    /// With `sync`, at most this many bytes of a shard wait in the page cache for the disk
    /// (default 256 MiB; Linux): write-back of each written piece starts at once and the
    /// writer waits for pieces further behind, so the disk writes while the caller produces
    /// the next bytes, instead of all at once when the shard is synced. `0` leaves write-back
    /// to the operating system.
    pub dirty_limit: u64,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            replace_existing: false,
            metadata: vec![("format".into(), "pt".into())],
            buffer_bytes: 16 << 20,
            sync: true,
            dirty_limit: 256 << 20,
        }
    }
}

/// What [`ShardWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    pub dest: PathBuf,
    /// Every file written (shards, index, extra files) with its size.
    pub files: Vec<(String, u64)>,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
}

/// Where a declared tensor goes.
#[derive(Debug, Clone, Copy)]
struct Slot {
    shard: usize,
    bytes: u64,
}

enum ShardState {
    NotStarted,
    Open(OpenShard),
    Done,
}

/// An open shard file, and how far its bytes have gone towards the disk.
struct OpenShard {
    out: BufWriter<File>,
    /// Bytes given to `out` (header and tensor data).
    written: u64,
    /// Bytes whose write-back has been started.
    started: u64,
    /// Bytes written back (waited for).
    settled: u64,
    /// See [`WriterOptions::dirty_limit`]; 0 when off.
    dirty_limit: u64,
    /// Time spent in write-back calls (starting and waiting).
    waited: std::time::Duration,
}

impl OpenShard {
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.out.write_all(buf)?;
        self.written += buf.len() as u64;
        if self.dirty_limit > 0 {
            self.push_to_disk()?;
        }
        Ok(())
    }

    /// Starts write-back of what reached the kernel, a step (an eighth of the dirty limit) at
    /// a time, and waits for the pieces more than the dirty limit behind. A file system
    /// without range write-back turns it off; any other failure is the write's error (the
    /// kernel reports a write-back error once, so it must not be dropped here).
    fn push_to_disk(&mut self) -> std::io::Result<()> {
        let in_kernel = self.written - self.out.buffer().len() as u64;
        let step = (self.dirty_limit / 8).max(1 << 20);
        if in_kernel - self.started < step {
            return Ok(());
        }
        let file = self.out.get_ref();
        // Starting write-back blocks too when the disk's queue is full: both calls count as
        // waiting for the disk.
        let begun = std::time::Instant::now();
        let outcome =
            writeback::start(file, self.started, in_kernel - self.started).and_then(|()| {
                self.started = in_kernel;
                if self.started - self.settled > self.dirty_limit {
                    let to = self.started - self.dirty_limit;
                    writeback::wait(file, self.settled, to - self.settled)?;
                    self.settled = to;
                }
                Ok(())
            });
        self.waited += begun.elapsed();
        match outcome {
            Err(e) if writeback::unsupported(&e) => {
                self.dirty_limit = 0;
                Ok(())
            }
            other => other,
        }
    }
}

/// Range write-back (`sync_file_range`, Linux); elsewhere nothing, and the shard's final sync
/// writes everything.
mod writeback {
    use std::fs::File;

    #[cfg(target_os = "linux")]
    fn sync_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the life of `file`; sync_file_range reads no
        // memory of ours.
        let rc = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                flags,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Starts writing the range's dirty pages; does not wait.
    #[cfg(target_os = "linux")]
    pub fn start(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        sync_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
    }

    /// Writes the range's dirty pages and waits until they are on the disk.
    #[cfg(target_os = "linux")]
    pub fn wait(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        sync_range(
            file,
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    }

    #[cfg(not(target_os = "linux"))]
    pub fn start(_: &File, _: u64, _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    #[cfg(not(target_os = "linux"))]
    pub fn wait(_: &File, _: u64, _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// The file system (or platform) has no range write-back.
    pub fn unsupported(e: &std::io::Error) -> bool {
        #[cfg(target_os = "linux")]
        if matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::ESPIPE)
        ) {
            return true;
        }
        e.kind() == std::io::ErrorKind::Unsupported
    }
}

/// The streaming sharded writer (see the module docs).
pub struct ShardWriter {
    dest: PathBuf,
    tmp: PathBuf,
    options: WriterOptions,
    specs: Vec<TensorSpec>,
    plan: ShardPlan,
    slots: Vec<Slot>,
    /// Tensors of each shard still to come.
    remaining: Vec<usize>,
    states: Vec<ShardState>,
    next: usize,
    extra_files: Vec<(String, u64)>,
    finished: bool,
    /// Time spent waiting for the disk: write-back calls and syncs of closed shards.
    disk_wait: std::time::Duration,
    /// The folder being replaced was removed before writing, to make room.
    replaced_early: bool,
    /// Temporary folders of earlier, dead runs for this destination, removed, with their bytes.
    removed_leftovers: Vec<(PathBuf, u64)>,
}

/// Whether a checkpoint of `needed` bytes fits in `free` bytes, counting the `replaced` bytes
/// of the folder it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// Beside the folder it replaces: that folder stays until the new one is complete.
    Fits,
    /// Only in the room the replaced folder frees: it is removed before writing.
    OnceReplacedIsRemoved,
    NoSpace,
}

fn room_for(needed: u64, free: u64, replaced: u64) -> Room {
    if free >= needed {
        Room::Fits
    } else if free.saturating_add(replaced) >= needed {
        Room::OnceReplacedIsRemoved
    } else {
        Room::NoSpace
    }
}

impl ShardWriter {
    /// Plans the shards and creates the temporary folder. Fails if `dest` exists and
    /// `options.replace_existing` is not set.
    ///
    /// ```
    /// use st_io::{Dtype, ShardWriter, TensorSpec, WriterOptions};
    /// let dir = tempfile::tempdir()?;
    /// let specs = vec![
    ///     TensorSpec::new("a.weight", Dtype::BF16, [2, 2]),
    ///     TensorSpec::new("b.weight", Dtype::F16, [4]),
    /// ];
    /// // A 8-byte maximum shard size: each tensor in its own shard, with an index.
    /// let options = WriterOptions { max_shard_bytes: 8, ..WriterOptions::default() };
    /// let mut w = ShardWriter::create(dir.path().join("out"), specs, options)?;
    /// w.write_tensor("a.weight", &[0u8; 8])?;
    /// w.write_tensor("b.weight", &[1u8; 8])?;
    /// let summary = w.finish()?;
    /// assert_eq!(summary.files.len(), 3); // two shards and the index
    /// assert!(dir.path().join("out/model.safetensors.index.json").is_file());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create(
        dest: impl AsRef<Path>,
        specs: Vec<TensorSpec>,
        options: WriterOptions,
    ) -> Result<ShardWriter> {
        let dest = dest.as_ref().to_path_buf();
        if options.max_shard_bytes == 0 {
            return Err(Error::WriterMisuse {
                message: "the maximum shard size must be more than 0 bytes".into(),
            });
        }
        if dest.exists() && !options.replace_existing {
            return Err(Error::DestinationExists { path: dest });
        }
        let plan = plan_shards(&specs, options.max_shard_bytes)?;
        // Earlier runs for this destination whose process is gone (killed, out of memory)
        // left their temporary folders: removed now, so their bytes count as free.
        let removed_leftovers = remove_leftovers(&dest);
        let tmp = temporary_sibling(&dest, "tmp")?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        // Refuse now, not after minutes of writing, when the shards cannot fit. The folder it
        // replaces counts as free: it stays until the new one is complete when both fit, and
        // is removed first when only the new one does (it is being replaced either way).
        let mut replaced_early = false;
        if let Some(free) = crate::paths::free_bytes(&tmp) {
            let replaced = if options.replace_existing && dest.is_dir() {
                folder_bytes(&dest)
            } else {
                0
            };
            match room_for(plan.total_bytes, free, replaced) {
                Room::Fits => {}
                Room::NoSpace => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(Error::NoSpace {
                        path: parent_dir(&dest).to_path_buf(),
                        needed: plan.total_bytes,
                        available: free.saturating_add(replaced),
                        replaced,
                    });
                }
                Room::OnceReplacedIsRemoved => {
                    let old = temporary_sibling(&dest, "old")?;
                    let moved =
                        std::fs::rename(&dest, &old).and_then(|()| std::fs::remove_dir_all(&old));
                    if let Err(e) = moved {
                        let _ = std::fs::remove_dir_all(&tmp);
                        return Err(Error::io(&dest, e));
                    }
                    replaced_early = true;
                }
            }
        }
        let mut slots = vec![Slot { shard: 0, bytes: 0 }; specs.len()];
        for (s, shard) in plan.shards.iter().enumerate() {
            for &t in &shard.tensors {
                slots[t] = Slot {
                    shard: s,
                    bytes: specs[t].bytes().unwrap_or(0),
                };
            }
        }
        let remaining = plan.shards.iter().map(|s| s.tensors.len()).collect();
        let states = plan.shards.iter().map(|_| ShardState::NotStarted).collect();
        Ok(ShardWriter {
            dest,
            tmp,
            options,
            specs,
            plan,
            slots,
            remaining,
            states,
            next: 0,
            extra_files: Vec::new(),
            finished: false,
            disk_wait: std::time::Duration::ZERO,
            replaced_early,
            removed_leftovers,
        })
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The temporary folders of earlier runs for this destination whose process is gone,
    /// removed when the writer was created, with the bytes each held.
    pub fn removed_leftovers(&self) -> &[(PathBuf, u64)] {
        &self.removed_leftovers
    }

    /// Whether the folder being replaced (`replace_existing`) had to be removed before writing,
    /// because the file system could not hold both it and the new checkpoint.
    pub fn replaced_early(&self) -> bool {
        self.replaced_early
    }

    /// Time spent so far waiting for the disk, in the shards closed so far: their write-back
    /// calls (see [`WriterOptions::dirty_limit`]) and their final syncs. The rest of the
    /// writing went at memory speed.
    pub fn disk_wait(&self) -> std::time::Duration {
        self.disk_wait
    }

    /// The tensor whose bytes must come next, if any.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.specs.get(self.next)
    }

    /// Writes the next tensor's bytes.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_tensor_with(name, |sink| sink.write_all(bytes))
    }

    /// Writes the next tensor by letting `produce` stream its bytes into a sink (convert or
    /// merge straight into the output buffer, with no intermediate copy of the tensor). The
    /// sink refuses bytes beyond the tensor's size; fewer bytes than its size is an error.
    pub fn write_tensor_with<F, E>(&mut self, name: &str, produce: F) -> Result<()>
    where
        F: FnOnce(&mut TensorSink<'_>) -> std::result::Result<(), E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Some(spec) = self.specs.get(self.next) else {
            return Err(Error::WriterMisuse {
                message: format!(
                    "tensor \"{name}\" was given but every declared tensor is written"
                ),
            });
        };
        if spec.name != name {
            return Err(Error::WriterMisuse {
                message: format!(
                    "tensor \"{name}\" was given but \"{}\" comes next in the declared order",
                    spec.name
                ),
            });
        }
        let slot = self.slots[self.next];
        let writer = self.shard_writer(slot.shard)?;
        let mut sink = TensorSink {
            out: writer,
            expected: slot.bytes,
            written: 0,
            error: None,
        };
        let produced = produce(&mut sink);
        let (written, io_error) = (sink.written, sink.error.take());
        if let Some(e) = io_error {
            return Err(self.write_failed(slot.shard, format!("tensor \"{name}\""), e));
        }
        let spec = &self.specs[self.next];
        if let Err(e) = produced {
            if written > slot.bytes {
                return Err(self.wrong_bytes(written));
            }
            return Err(Error::Producer {
                tensor: spec.name.clone(),
                source: e.into(),
            });
        }
        if written != slot.bytes {
            return Err(self.wrong_bytes(written));
        }
        self.next += 1;
        self.remaining[slot.shard] -= 1;
        if self.remaining[slot.shard] == 0 {
            self.close_shard(slot.shard)?;
        }
        Ok(())
    }

    fn wrong_bytes(&self, found: u64) -> Error {
        let spec = &self.specs[self.next];
        Error::WrongTensorBytes {
            tensor: spec.name.clone(),
            dtype: spec.dtype.to_string(),
            shape: spec.shape.clone(),
            expected: self.slots[self.next].bytes,
            found,
        }
    }

    /// Opens the shard on first use and writes its header.
    fn shard_writer(&mut self, shard: usize) -> Result<&mut OpenShard> {
        if let ShardState::NotStarted = self.states[shard] {
            let planned = &self.plan.shards[shard];
            let path = self.tmp.join(&planned.file_name);
            let mut offset = 0;
            let entries: Vec<HeaderTensor> = planned
                .tensors
                .iter()
                .map(|&t| {
                    let begin = offset;
                    offset += self.slots[t].bytes;
                    HeaderTensor {
                        name: self.specs[t].name.clone(),
                        dtype: self.specs[t].dtype,
                        shape: self.specs[t].shape.clone(),
                        begin,
                        end: offset,
                    }
                })
                .collect();
            let header = encode_header(&self.options.metadata, &entries);
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            // The whole size up front: fewer metadata updates (a sparse file, not a reservation:
            // the free-space check in `create` is what refuses early).
            let _ = file.set_len(header.len() as u64 + planned.data_bytes);
            let mut out = OpenShard {
                out: BufWriter::with_capacity(self.options.buffer_bytes, file),
                written: 0,
                started: 0,
                settled: 0,
                dirty_limit: if self.options.sync {
                    self.options.dirty_limit
                } else {
                    0
                },
                waited: std::time::Duration::ZERO,
            };
            if let Err(e) = out.write_all(&header) {
                return Err(self.write_failed(shard, "the header".into(), e));
            }
            self.states[shard] = ShardState::Open(out);
        }
        match &mut self.states[shard] {
            ShardState::Open(out) => Ok(out),
            _ => Err(Error::WriterMisuse {
                message: format!(
                    "shard {} was already closed",
                    self.plan.shards[shard].file_name
                ),
            }),
        }
    }

    /// A write to a shard that the system refused, named as the shard will be in the
    /// destination (the temporary folder is removed with the writer).
    fn write_failed(&self, shard: usize, what: String, source: std::io::Error) -> Error {
        let planned = &self.plan.shards[shard];
        Error::WriteFailed {
            file: self.dest.join(&planned.file_name),
            what,
            shard_bytes: planned.data_bytes,
            source,
        }
    }

    fn close_shard(&mut self, shard: usize) -> Result<()> {
        if let ShardState::Open(open) = std::mem::replace(&mut self.states[shard], ShardState::Done)
        {
            let begun = std::time::Instant::now();
            self.disk_wait += open.waited;
            let file = match open.out.into_inner() {
                Ok(file) => file,
                Err(e) => {
                    return Err(self.write_failed(
                        shard,
                        "its buffered bytes".into(),
                        e.into_error(),
                    ))
                }
            };
            if let Err(e) = file.sync_all() {
                return Err(self.write_failed(shard, "its bytes to the disk".into(), e));
            }
            self.disk_wait += begun.elapsed();
        }
        Ok(())
    }

    /// Adds a non-weight file (config, tokenizer, card) to the output folder.
    pub fn add_file(&mut self, name: &str, contents: &[u8]) -> Result<()> {
        self.check_extra_name(name)?;
        let path = self.tmp.join(name);
        let mut file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        file.write_all(contents).map_err(|e| Error::io(&path, e))?;
        if self.options.sync {
            file.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        self.extra_files
            .push((name.to_string(), contents.len() as u64));
        Ok(())
    }

    fn check_extra_name(&self, name: &str) -> Result<()> {
        let plain = !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != "..";
        let taken = name == INDEX_FILE_NAME
            || self.plan.shards.iter().any(|s| s.file_name == name)
            || self.extra_files.iter().any(|(n, _)| n == name);
        if !plain || taken {
            return Err(Error::WriterMisuse {
                message: format!(
                    "extra file \"{name}\" must be a plain file name not used by a shard, the index or another file"
                ),
            });
        }
        Ok(())
    }

    /// Writes the index, syncs, and moves the folder into place. Fails, leaving no
    /// destination behind, if any declared tensor was not written.
    pub fn finish(mut self) -> Result<WriteSummary> {
        if let Some(missing) = self.specs.get(self.next) {
            return Err(Error::WriterMisuse {
                message: format!(
                    "finish called with {} tensor(s) unwritten, starting with \"{}\"",
                    self.specs.len() - self.next,
                    missing.name
                ),
            });
        }
        // Shards with no tensors (an empty checkpoint) still get their header.
        for s in 0..self.plan.shards.len() {
            if let ShardState::NotStarted = self.states[s] {
                self.shard_writer(s)?;
                self.close_shard(s)?;
            }
        }
        let mut files = Vec::new();
        for shard in &self.plan.shards {
            let path = self.tmp.join(&shard.file_name);
            let len = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .len();
            files.push((shard.file_name.clone(), len));
        }
        if self.plan.shards.len() > 1 {
            let index = self.index_json();
            let path = self.tmp.join(INDEX_FILE_NAME);
            let mut file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            file.write_all(index.as_bytes())
                .map_err(|e| Error::io(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            files.push((INDEX_FILE_NAME.to_string(), index.len() as u64));
        }
        files.extend(self.extra_files.iter().cloned());
        if self.options.sync {
            sync_dir(&self.tmp)?;
        }
        if self.dest.exists() {
            if !self.options.replace_existing {
                return Err(Error::DestinationExists {
                    path: self.dest.clone(),
                });
            }
            let old = temporary_sibling(&self.dest, "old")?;
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            }
            std::fs::rename(&self.dest, &old).map_err(|e| Error::io(&self.dest, e))?;
            std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            removed.map_err(|e| Error::io(&old, e))?;
        } else {
            std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        }
        self.finished = true;
        if self.options.sync {
            sync_dir(parent_dir(&self.dest))?;
        }
        Ok(WriteSummary {
            dest: self.dest.clone(),
            files,
            tensor_bytes: self.plan.total_bytes,
        })
    }

    /// `model.safetensors.index.json` as transformers writes it (sorted keys, 2-space indent).
    fn index_json(&self) -> String {
        let mut weight_map = BTreeMap::new();
        for shard in &self.plan.shards {
            for &t in &shard.tensors {
                weight_map.insert(self.specs[t].name.as_str(), shard.file_name.as_str());
            }
        }
        let index = serde_json::json!({
            "metadata": { "total_size": self.plan.total_bytes },
            "weight_map": weight_map,
        });
        // Serialising a json! value built from strings and integers cannot fail.
        let mut text = serde_json::to_string_pretty(&index).unwrap_or_default();
        text.push('\n');
        text
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Receives one tensor's bytes; see [`ShardWriter::write_tensor_with`].
pub struct TensorSink<'a> {
    out: &'a mut OpenShard,
    expected: u64,
    written: u64,
    error: Option<std::io::Error>,
}

impl TensorSink<'_> {
    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.expected.saturating_sub(self.written)
    }
}

impl Write for TensorSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.expected {
            self.written += buf.len() as u64;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "more bytes than the tensor's declared size",
            ));
        }
        match self.out.write_all(buf) {
            Ok(()) => {
                self.written += buf.len() as u64;
                Ok(buf.len())
            }
            Err(e) => {
                let kind = e.kind();
                self.error = Some(e);
                Err(std::io::Error::new(kind, "write failed"))
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `.<name>.weightsmith-<what>-<pid>` beside `dest`: hidden, so it never looks like a result.
fn temporary_sibling(dest: &Path, what: &str) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::WriterMisuse {
            message: format!("destination {} has no usable folder name", dest.display()),
        })?;
    let sibling = format!(".{name}.weightsmith-{what}-{}", std::process::id());
    Ok(dest.with_file_name(sibling))
}

/// Removes `.<name>.weightsmith-{tmp,old}-<pid>` beside `dest` whose process `<pid>` is gone
/// (never one of a process that still runs, nor this process's own); returns what it removed.
fn remove_leftovers(dest: &Path) -> Vec<(PathBuf, u64)> {
    let Some(name) = dest.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(parent_dir(dest)) else {
        return Vec::new();
    };
    let own = std::process::id();
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(entry) = file_name.to_str() else {
            continue;
        };
        let Some(rest) = entry.strip_prefix(&format!(".{name}.weightsmith-")) else {
            continue;
        };
        let Some(pid) = rest
            .strip_prefix("tmp-")
            .or_else(|| rest.strip_prefix("old-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own || process_alive(pid) {
            continue;
        }
        let path = e.path();
        if !path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let bytes = folder_bytes(&path);
        if std::fs::remove_dir_all(&path).is_ok() {
            removed.push((path, bytes));
        }
    }
    removed
}

/// Whether process `pid` exists (a process we may not signal exists too).
#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(not(unix))]
fn process_alive(_: u32) -> bool {
    true
}

/// The bytes a folder's files occupy on disk (what removing it frees), not following links.
#[cfg(unix)]
fn folder_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.nlink() <= 1 {
                // A hard-linked file's blocks stay with its other names.
                total = total.saturating_add(m.blocks().saturating_mul(512));
            }
        }
    }
    total
}

#[cfg(not(unix))]
fn folder_bytes(_: &Path) -> u64 {
    0
}

/// The folder that holds `dest` (`.` for a bare name).
fn parent_dir(dest: &Path) -> &Path {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;

    #[test]
    fn the_folder_being_replaced_counts_as_free() {
        assert_eq!(room_for(10, 10, 0), Room::Fits);
        assert_eq!(room_for(16, 4, 16), Room::OnceReplacedIsRemoved);
        assert_eq!(room_for(16, 4, 11), Room::NoSpace);
        assert_eq!(
            room_for(u64::MAX, u64::MAX - 1, u64::MAX),
            Room::OnceReplacedIsRemoved
        );
    }

    #[test]
    fn folder_bytes_counts_what_removing_frees() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 100_000]).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![1u8; 50_000]).unwrap();
        std::fs::write(dir.path().join("linked"), vec![1u8; 70_000]).unwrap();
        std::fs::hard_link(dir.path().join("linked"), dir.path().join("sub/other-name")).unwrap();
        let n = folder_bytes(dir.path());
        assert!((150_000..=150_000 + 2 * 65_536).contains(&n), "{n}");
    }

    #[test]
    fn starts_write_back_as_it_goes_and_waits_for_what_is_far_behind() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let specs = vec![
            TensorSpec::new("a", Dtype::U8, vec![24 * MIB]),
            TensorSpec::new("b", Dtype::U8, vec![MIB]),
        ];
        let options = WriterOptions {
            buffer_bytes: MIB as usize,
            dirty_limit: 8 * MIB,
            ..WriterOptions::default()
        };
        let mut writer = ShardWriter::create(&dest, specs, options).unwrap();
        let a: Vec<u8> = (0..24 * MIB).map(|i| (i % 251) as u8).collect();
        writer
            .write_tensor_with("a", |sink| {
                a.chunks(MIB as usize / 3)
                    .try_for_each(|piece| sink.write_all(piece))
            })
            .unwrap();
        // The shard is still open (b is to come): check how far its bytes went.
        let ShardState::Open(open) = &writer.states[0] else {
            panic!("the shard should still be open");
        };
        let in_kernel = open.written - open.out.buffer().len() as u64;
        assert!(open.written > 24 * MIB);
        assert_eq!(open.dirty_limit, 8 * MIB, "write-back was turned off");
        assert!(
            open.started + MIB >= in_kernel,
            "write-back lags: {open_started} of {in_kernel}",
            open_started = open.started
        );
        assert!(open.settled + 8 * MIB >= open.started);
        assert!(
            open.settled >= 15 * MIB,
            "nothing was waited for: {}",
            open.settled
        );
        writer.write_tensor("b", &[7u8; MIB as usize]).unwrap();
        writer.finish().unwrap();
        let ckpt = Checkpoint::open(&dest).unwrap();
        let t = ckpt.tensor("a").unwrap();
        assert!(ckpt.tensor_bytes(t) == a.as_slice());
    }
}
