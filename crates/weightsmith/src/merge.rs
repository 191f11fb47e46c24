//! `weightsmith merge`: LoRA adapters merged into their base, streamed shard by shard into a
//! standalone 16-bit checkpoint that transformers loads with no PEFT.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lora_kernels::cpu::merge_rows;
use lora_kernels::dequant::GptqLayer;
use lora_kernels::gpu::GpuMerger;
use lora_kernels::{encode_half, to_f32_vec, DoraScale, LoraProduct, LoraTerm, MergeStats};
use serde::Serialize;
use st_io::convert::can_convert;
use st_io::writer::DEFAULT_MAX_SHARD_BYTES;
use st_io::{
    Checkpoint, Dtype, LoraAdapter, LoraKind, ReadAhead, ShardWriter, TensorInfo, TensorSpec,
    WriterOptions,
};

use crate::card::merge_card;
use crate::{Error, Result};

/// The version of the JSON document [`MergeReport`] serialises to.
pub const MERGE_SCHEMA_VERSION: u32 = 1;

/// How far the base is read ahead of the merge, at least (page cache, not process memory).
const READ_AHEAD: u64 = 1 << 30;

/// Merged blocks in flight between the merging and the writing thread (about 32 MiB each).
const BLOCKS: usize = 4;

/// What the merging thread hands the writing thread, in the jobs' order: each tensor's bytes
/// in one or more pieces, then its end.
enum Piece<'a> {
    /// `len` bytes of a pooled buffer, which goes back to the pool once written.
    Block(Vec<u8>, usize),
    /// Bytes written as they are: a source copied unchanged, or a tensor made whole.
    Whole(std::borrow::Cow<'a, [u8]>),
    /// The tensor is complete; what its merge changed.
    End(MergeStats),
}

/// Where the arithmetic runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDevice {
    /// The fastest path: today the CPU (see `merge`), later a GPU when there is one.
    Auto,
    Cpu,
    Cuda(u32),
}

/// Options of [`merge`].
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Adapter folders and their weights (1.0 for a plain merge).
    pub adapters: Vec<(PathBuf, f64)>,
    pub out: PathBuf,
    /// Output dtype: F16 or BF16; default the base's if 16-bit, else BF16.
    pub dtype: Option<Dtype>,
    pub device: MergeDevice,
    pub max_shard_bytes: u64,
    /// Recompute sample rows in f64 and report the largest error in ulps.
    pub verify: bool,
    /// Replace an existing output folder.
    pub force: bool,
    /// The base's Hub id for the model card's `base_model` (default: the adapter's
    /// `base_model_name_or_path` when that is a Hub id, else the base's own card).
    pub base_model: Option<String>,
    /// Set it (from a signal handler, a GUI's button) to stop the merge: it stops within one
    /// 32 MiB block, removes what it wrote, and returns [`Error::Interrupted`]. Once the
    /// output is in place the merge is done and the flag no longer matters.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl MergeOptions {
    pub fn new(adapters: Vec<(PathBuf, f64)>, out: impl Into<PathBuf>) -> MergeOptions {
        MergeOptions {
            adapters,
            out: out.into(),
            dtype: None,
            device: MergeDevice::Auto,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            verify: false,
            force: false,
            base_model: None,
            cancel: None,
        }
    }
}

/// Progress of a merge, for a bar or a GUI.
#[derive(Debug, Clone)]
pub struct MergeProgress<'a> {
    pub tensor: &'a str,
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterSummary {
    pub path: String,
    pub weight: f64,
    pub r: u64,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules: usize,
    pub replaced_tensors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub tensor: String,
    /// ‖W' − W‖ / ‖W‖.
    pub relative_delta: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub rows_checked: usize,
    pub max_ulps: u32,
    pub worst_tensor: Option<String>,
}

/// What [`merge`] did; its JSON form is documented in the README.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub schema_version: u32,
    pub base: String,
    pub out: String,
    pub dtype: String,
    pub device: String,
    pub adapters: Vec<AdapterSummary>,
    pub tensors_written: usize,
    pub tensor_bytes: u64,
    pub files: Vec<(String, u64)>,
    pub modules: Vec<ModuleReport>,
    pub verify: Option<VerifyReport>,
    /// Temporary folders of earlier runs for this output whose process was gone (killed,
    /// out of memory), removed before writing: "path (bytes)".
    pub removed_leftovers: Vec<String>,
    pub seconds: f64,
}

/// What to do with one output tensor.
struct Job<'a> {
    spec: TensorSpec,
    /// The base tensor read, when the source is the base (for readahead).
    base_tensor: Option<&'a TensorInfo>,
    /// Source bytes and dtype (the base's, or a replacement from an adapter).
    source: &'a [u8],
    source_dtype: Dtype,
    lora: Option<LoraJob<'a>>,
    /// Extra terms for a `.bias` with LoRA bias: (values, scale).
    bias_terms: Vec<(Vec<f32>, f32)>,
    /// A GPTQ layer: the source is its dequantised weight (F32), made when the job runs.
    dequant: Option<&'a GptqLayer<'a>>,
}

struct LoraJob<'a> {
    out: usize,
    inp: usize,
    transposed: bool,
    /// `(A, B, rank, scale)` of each term.
    terms: Vec<(Factors<'a>, usize, f64)>,
    magnitude: Option<Vec<f32>>,
}

/// A term's `A` and `B`: as the adapter stores them (decoded to f32 only while their tensor is
/// merged, so a merge holds the factors of one tensor at a time, not the whole adapter's), or
/// already built in f32 (the per-expert blocks of a LoRA on a fused parameter).
enum Factors<'a> {
    Stored {
        a: &'a [u8],
        a_dtype: Dtype,
        b: &'a [u8],
        b_dtype: Dtype,
    },
    Built(Vec<f32>, Vec<f32>),
}

/// `A` and `B` in f32.
type FactorsF32<'f> = (std::borrow::Cow<'f, [f32]>, std::borrow::Cow<'f, [f32]>);

impl Factors<'_> {
    /// `A` and `B` in f32, borrowed when built already.
    fn decode(&self) -> Result<FactorsF32<'_>> {
        use std::borrow::Cow;
        Ok(match self {
            Factors::Stored {
                a,
                a_dtype,
                b,
                b_dtype,
            } => (
                Cow::Owned(to_f32_vec(*a_dtype, a)?),
                Cow::Owned(to_f32_vec(*b_dtype, b)?),
            ),
            Factors::Built(a, b) => (Cow::Borrowed(a), Cow::Borrowed(b)),
        })
    }
}

/// Merges the adapters into the base and writes the result to `options.out`.
pub fn merge(
    base_path: impl AsRef<Path>,
    options: &MergeOptions,
    progress: &mut dyn FnMut(MergeProgress),
) -> Result<MergeReport> {
    let started = Instant::now();
    if options.adapters.is_empty() {
        return Err(Error::Usage("give at least one --adapter".into()));
    }
    if options.out.exists() && !options.force {
        return Err(st_io::Error::DestinationExists {
            path: options.out.clone(),
        }
        .into());
    }
    // A base or adapter named by Hub id is downloaded into the Hugging Face cache first.
    let base_source = crate::source::for_model(base_path.as_ref())?;
    let adapter_sources: Vec<crate::source::Source> = options
        .adapters
        .iter()
        .map(|(p, _)| crate::source::for_adapter(p))
        .collect::<Result<_>>()?;
    let base_path = base_source.path.as_path();
    // `auto` is the first GPU when one is usable, else the CPU: both give the same bits, and
    // on the H100 machine both run at the disk's pace for an 8B model (the GPU does the
    // arithmetic in about 3 s of the 17, leaving the cores free). A GPU that cannot be set up
    // (no memory left, a driver problem) sends `auto` to the CPU; `cuda:N` reports the error.
    let gpu = match options.device {
        MergeDevice::Cpu => None,
        MergeDevice::Auto => {
            if gpu_mem::cuda::driver_available() && gpu_mem::cuda::device_count() > 0 {
                GpuMerger::new(0).ok()
            } else {
                None
            }
        }
        MergeDevice::Cuda(n) => Some(GpuMerger::new(n)?),
    };
    let device = match (options.device, &gpu) {
        (MergeDevice::Cuda(n), Some(_)) => format!("cuda:{n}"),
        (_, Some(_)) => "cuda:0".to_string(),
        _ => "cpu".to_string(),
    };
    // Before anything is created, renamed or removed: the output is no input, holds none and
    // lies in none; --force replaces only a checkpoint folder.
    // The files inside each input count too: a Hugging Face cache snapshot's files are
    // symbolic links into its blobs folder.
    let mut inputs: Vec<PathBuf> = vec![base_path.to_path_buf()];
    inputs.extend(adapter_sources.iter().map(|s| s.path.clone()));
    let inside: Vec<PathBuf> = inputs
        .iter()
        .filter_map(|p| std::fs::read_dir(p).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .collect();
    inputs.extend(inside);
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    st_io::paths::check_output(&options.out, &inputs, options.force)?;
    let base = Checkpoint::open(base_path)?;
    base.require_complete()?;
    let quantized = st_io::quant::quantized_linears(&base)?;
    if let Some(l) = quantized
        .iter()
        .find(|l| !matches!(l.scheme, st_io::QuantScheme::Gptq(_)))
    {
        let advice = match l.scheme {
            st_io::QuantScheme::Exl2 { .. } => "merging into an EXL2 model is not supported: merge the adapter into the 16-bit base model, then quantise the result again (exllamav2's convert.py)",
            _ => "merging into an AWQ model is not supported yet: merge the adapter into the 16-bit base model, then quantise the result again",
        };
        return Err(Error::Usage(format!(
            "{}: layer \"{}\" is {}-quantised; {advice}",
            base_path.display(),
            l.module,
            l.scheme.format().to_uppercase()
        )));
    }
    let gptq: Vec<GptqLayer> = quantized
        .iter()
        .map(|l| GptqLayer::from_checkpoint(&base, l))
        .collect::<std::result::Result<_, _>>()?;
    let adapters: Vec<(LoraAdapter, f64)> = adapter_sources
        .iter()
        .zip(&options.adapters)
        .map(|(s, (_, w))| LoraAdapter::open(&s.path).map(|a| (a, *w)))
        .collect::<std::result::Result<_, _>>()?;
    if adapters.len() > 1 && adapters.iter().any(|(a, _)| a.config.use_dora) {
        return Err(Error::Usage(
            "DoRA adapters cannot be combined with other adapters: merge them one at a time".into(),
        ));
    }
    let out_dtype = match options.dtype {
        Some(d) if d.is_half() => d,
        Some(d) => {
            return Err(Error::Usage(format!(
                "--dtype must be bf16 or f16, not {d}"
            )))
        }
        None => dominant_half(&base).unwrap_or(Dtype::BF16),
    };
    let jobs = plan_jobs(&base, &gptq, &adapters, out_dtype)?;
    let tied_head_added = jobs
        .iter()
        .any(|j| j.dequant.is_none() && base.tensor(&j.spec.name).is_none());
    let vocab_resized = resized_vocab(&base, &jobs);

    let specs: Vec<TensorSpec> = jobs.iter().map(|j| j.spec.clone()).collect();
    let bytes_total: u64 = specs.iter().filter_map(TensorSpec::bytes).sum();
    let writer_options = WriterOptions {
        max_shard_bytes: options.max_shard_bytes,
        replace_existing: options.force,
        ..WriterOptions::default()
    };
    let mut writer = ShardWriter::create(&options.out, specs, writer_options)?;
    let removed_leftovers: Vec<String> = writer
        .removed_leftovers()
        .iter()
        .map(|(p, b)| format!("{} ({})", p.display(), st_io::format_decimal(*b)))
        .collect();
    let mut modules = Vec::new();
    let mut bytes_done = 0u64;
    let total = jobs.len();
    let cancelled = || {
        options
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };
    let interrupted = || {
        Error::Interrupted(format!(
            "the merge stopped and removed its partial output; {} was not written",
            options.out.display()
        ))
    };
    // The base's tensors are read on a thread, ahead of the merge (a cold page cache would
    // otherwise read them page fault by page fault, taking turns with the writes), at most
    // READ_AHEAD bytes or two of the largest tensors in front.
    let largest = jobs
        .iter()
        .filter_map(|j| j.base_tensor.map(|t| t.len))
        .max()
        .unwrap_or(0);
    let read_ahead = ReadAhead::start(
        &base,
        jobs.iter().map(|j| j.base_tensor),
        READ_AHEAD.max(2 * largest),
    );
    // Two threads for the whole model: a producer merges (on the rayon pool or the GPU) while
    // this thread writes what it merged, across tensor boundaries, so the disk never waits for
    // a tensor's first block to be merged nor the merge for a tensor's last to be written.
    // Blocks circulate through a pool of BLOCKS buffers.
    let (piece_tx, piece_rx) = std::sync::mpsc::sync_channel::<Piece>(BLOCKS + 4);
    let (pool_tx, pool_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BLOCKS);
    for _ in 0..BLOCKS {
        let _ = pool_tx.send(Vec::new());
    }
    // For WEIGHTSMITH_TRACE: this thread's time waiting for merged bytes, and writing them.
    let (mut waited_for_merge, mut writing) = (Duration::ZERO, Duration::ZERO);
    let outcome = std::thread::scope(|scope| -> Result<()> {
        let producer = {
            let (jobs, gpu, read_ahead, cancelled) = (&jobs, gpu.as_ref(), &read_ahead, &cancelled);
            std::thread::Builder::new()
                .name("weightsmith merge".into())
                .spawn_scoped(scope, move || -> Result<()> {
                    for (i, job) in jobs.iter().enumerate() {
                        read_ahead.reached(i);
                        let produced =
                            produce_job(job, out_dtype, gpu, cancelled, &pool_rx, &piece_tx)
                                .map_err(|e| match e {
                                    Error::Kernel(source) => Error::Merge {
                                        tensor: job.spec.name.clone(),
                                        source,
                                    },
                                    other => other,
                                })?;
                        match produced {
                            Some(stats) if piece_tx.send(Piece::End(stats)).is_ok() => {}
                            // The writer hung up (a write failed): it reports the error.
                            _ => break,
                        }
                    }
                    Ok(())
                })
                .map_err(|e| {
                    Error::Usage(format!(
                        "cannot start the merge's thread: {e} (out of memory or of threads?)"
                    ))
                })?
        };
        let pool_tx = pool_tx;
        let written = (|| -> Result<()> {
            for (i, job) in jobs.iter().enumerate() {
                if cancelled() {
                    return Err(interrupted());
                }
                progress(MergeProgress {
                    tensor: &job.spec.name,
                    tensors_done: i,
                    tensors_total: total,
                    bytes_done,
                    bytes_total,
                });
                let mut stats = None;
                writer.write_tensor_with(&job.spec.name, |sink| -> std::io::Result<()> {
                    use std::io::Write;
                    loop {
                        let asked = Instant::now();
                        // Ends early when the producer failed (or stopped) and hung up.
                        let Ok(piece) = piece_rx.recv() else {
                            return Err(std::io::Error::other("the merge stopped"));
                        };
                        waited_for_merge += asked.elapsed();
                        if cancelled() {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::Interrupted,
                                "the merge was cancelled",
                            ));
                        }
                        match piece {
                            Piece::Block(buffer, len) => {
                                let begun = Instant::now();
                                sink.write_all(&buffer[..len])?;
                                writing += begun.elapsed();
                                let _ = pool_tx.send(buffer);
                            }
                            Piece::Whole(bytes) => {
                                let begun = Instant::now();
                                sink.write_all(&bytes)?;
                                writing += begun.elapsed();
                            }
                            Piece::End(s) => {
                                stats = Some(s);
                                return Ok(());
                            }
                        }
                    }
                })?;
                let stats = stats.unwrap_or_default();
                if job.lora.is_some() || !job.bias_terms.is_empty() {
                    modules.push(ModuleReport {
                        tensor: job.spec.name.clone(),
                        relative_delta: stats.relative_delta(),
                    });
                }
                bytes_done += job.spec.bytes().unwrap_or(0);
            }
            Ok(())
        })();
        // Hanging up stops a producer that is still going (after an error here).
        drop(piece_rx);
        drop(pool_tx);
        let produced = producer
            .join()
            .map_err(|_| Error::Usage("the merge's producer thread panicked".into()))?;
        // A merge error explains a short write better than the write error it caused.
        produced?;
        written
    });
    outcome.map_err(|e| if cancelled() { interrupted() } else { e })?;
    let bytes_read_ahead = read_ahead.bytes_read();
    drop(read_ahead);
    progress(MergeProgress {
        tensor: "",
        tensors_done: total,
        tensors_total: total,
        bytes_done,
        bytes_total,
    });

    // Everything that is not weights comes along; config.json is updated; a card is added.
    let root = if base.root().is_dir() {
        base.root().to_path_buf()
    } else {
        base.root().parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    copy_non_weight_files(
        &root,
        &mut writer,
        out_dtype,
        tied_head_added,
        vocab_resized,
    )?;
    let summaries: Vec<AdapterSummary> = adapters
        .iter()
        .map(|(a, w)| AdapterSummary {
            path: a.path.display().to_string(),
            weight: *w,
            r: a.config.r,
            lora_alpha: a.config.lora_alpha,
            use_rslora: a.config.use_rslora,
            use_dora: a.config.use_dora,
            modules: a.modules.len(),
            replaced_tensors: a.replacements.keys().cloned().collect(),
        })
        .collect();
    let adapter_base = options
        .base_model
        .clone()
        .or_else(|| base_source.hub.as_ref().map(|id| id.repo.clone()))
        .or_else(|| {
            adapters
                .iter()
                .find_map(|(a, _)| a.config.base_model_name_or_path.clone())
        });
    let card = merge_card(&root, adapter_base.as_deref(), &summaries, out_dtype);
    writer.add_file("README.md", card.as_bytes())?;
    if cancelled() {
        return Err(interrupted());
    }
    // A base or adapter file another process truncated or replaced while we read it: what
    // was read may be zeros (st-io's map guard) or stale; the output is not presented.
    base.check_intact()?;
    for (a, _) in &adapters {
        a.weights.check_intact()?;
    }
    let disk_wait = writer.disk_wait();
    let summary = writer.finish()?;
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(
            "merge trace: {:.2} GB read ahead; the writing thread: {:.2} s waiting for merged bytes, {:.2} s writing them, {:.2} s of it waiting for the disk's writes; of {:.2} s",
            bytes_read_ahead as f64 / 1e9,
            waited_for_merge.as_secs_f64(),
            writing.as_secs_f64(),
            disk_wait.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }

    let verify = if options.verify {
        Some(verify_output(&options.out, &jobs, out_dtype)?)
    } else {
        None
    };
    Ok(MergeReport {
        schema_version: MERGE_SCHEMA_VERSION,
        base: base_source.display(),
        out: options.out.display().to_string(),
        dtype: out_dtype.to_string(),
        device: device.to_string(),
        adapters: summaries,
        tensors_written: total,
        tensor_bytes: summary.tensor_bytes,
        files: summary.files,
        modules,
        verify,
        removed_leftovers,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The base's 16-bit float dtype, if its floats are all F16 or all BF16.
fn dominant_half(base: &Checkpoint) -> Option<Dtype> {
    let mut bytes: HashMap<Dtype, u64> = HashMap::new();
    for t in base.tensors().iter().filter(|t| t.dtype.is_float()) {
        *bytes.entry(t.dtype).or_default() += t.len;
    }
    bytes
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map(|(d, _)| d)
        .filter(|d| d.is_half())
}

/// The vocabulary of the output when an adapter resized it: the rows of a token embedding or
/// head that differ from config.json's `vocab_size` (position embeddings have rows for
/// positions, and say nothing of the vocabulary).
fn resized_vocab(base: &Checkpoint, jobs: &[Job]) -> Option<u64> {
    let config_vocab = base.config().and_then(|c| c.vocab_size)?;
    jobs.iter()
        .filter(|j| is_vocab_tensor(&j.spec.name))
        .filter(|j| j.spec.shape.len() == 2)
        .map(|j| j.spec.shape[0])
        .find(|&v| v != config_vocab && v > 1)
}

/// An error about one module of an adapter, naming its weights file.
pub(crate) fn module_error(adapter: &LoraAdapter, module: &str, message: String) -> Error {
    st_io::Error::BadAdapterModule {
        file: adapter.path.join(st_io::adapter::ADAPTER_WEIGHTS_NAME),
        module: module.to_string(),
        message,
    }
    .into()
}

/// The in-memory module of each on-disk module of a composite (multimodal) model, where
/// transformers renames it on loading: checkpoints keep the layout of the classes that wrote
/// them (`language_model.model.layers.0…`, `vision_tower.…`, Qwen2-VL's `model.layers.0…` and
/// `visual.…`), while transformers 5 builds `model.language_model.…`, `model.vision_tower.…`,
/// `model.visual.…` and `lm_head`, and PEFT names those. Empty for a model whose config.json
/// has no `text_config`, `vision_config` or `audio_config`.
fn composite_modules(base: &Checkpoint) -> Result<HashMap<String, String>> {
    let composite = base.config().is_some_and(|c| {
        ["text_config", "vision_config", "audio_config"]
            .iter()
            .any(|k| c.raw.get(*k).is_some_and(|v| v.is_object()))
    });
    if !composite {
        return Ok(HashMap::new());
    }
    composite_renames(base.tensors().iter().map(|t| t.name.as_str()))
        .map_err(|e| Error::Usage(format!("{}: {e}", base.root().display())))
}

/// [`composite_modules`] over the checkpoint's tensor names. A module whose in-memory name
/// the checkpoint already has keeps its name; two on-disk modules that would become one in
/// memory are refused, naming both.
fn composite_renames<'a>(
    names: impl Iterator<Item = &'a str> + Clone,
) -> std::result::Result<HashMap<String, String>, String> {
    let present: std::collections::HashSet<&str> = names.clone().collect();
    let mut out: HashMap<String, String> = HashMap::new();
    let mut taken: HashMap<String, String> = HashMap::new();
    for name in names {
        let Some((module, _)) = name.rsplit_once('.') else {
            continue;
        };
        if out.contains_key(module) {
            continue;
        }
        let Some(memory) = composite_memory_module(module) else {
            continue;
        };
        if present.contains(format!("{memory}.weight").as_str()) {
            continue;
        }
        if let Some(other) = taken.insert(memory.clone(), module.to_string()) {
            return Err(format!(
                "\"{other}\" and \"{module}\" would both be \"{memory}\" once transformers \
                 renames this multimodal checkpoint's modules; which one an adapter's \
                 \"{memory}\" means is not clear"
            ));
        }
        out.insert(module.to_string(), memory);
    }
    Ok(out)
}

/// transformers' renaming of a composite model's on-disk module (see [`composite_modules`]).
fn composite_memory_module(module: &str) -> Option<String> {
    /// Sub-models directly under `model.` in memory.
    const PARTS: &[&str] = &[
        "language_model",
        "vision_tower",
        "visual",
        "vision_model",
        "multi_modal_projector",
        "audio_tower",
        "embed_vision",
        "embed_audio",
    ];
    if let Some(rest) = module.strip_prefix("language_model.model.") {
        return Some(format!("model.language_model.{rest}"));
    }
    if let Some(rest) = module.strip_prefix("language_model.lm_head") {
        return Some(format!("lm_head{rest}"));
    }
    if let Some(rest) = module.strip_prefix("model.") {
        let first = rest.split('.').next().unwrap_or(rest);
        // Qwen2-VL and its kin keep the text model's modules under `model.` on disk.
        return (!PARTS.contains(&first)).then(|| format!("model.language_model.{rest}"));
    }
    let first = module.split('.').next().unwrap_or(module);
    PARTS.contains(&first).then(|| format!("model.{module}"))
}

/// Decides, for every output tensor, its source, dtype, shape and LoRA terms.
fn plan_jobs<'a>(
    base: &'a Checkpoint,
    gptq: &'a [GptqLayer<'a>],
    adapters: &'a [(LoraAdapter, f64)],
    out_dtype: Dtype,
) -> Result<Vec<Job<'a>>> {
    // Replacements (modules_to_save, saved embeddings, trained biases).
    let mut replaced: BTreeMap<&str, (&LoraAdapter, &TensorInfo)> = BTreeMap::new();
    for (a, _) in adapters {
        for (name, t) in &a.replacements {
            if replaced.insert(name.as_str(), (a, t)).is_some() {
                return Err(Error::Usage(format!(
                    "two adapters both replace \"{name}\": merge them one at a time"
                )));
            }
            let fits = match base.tensor(name) {
                Some(b) => {
                    b.shape == t.shape
                        || (b.shape.len() == 2
                            && b.shape[1..] == t.shape[1..]
                            && is_vocab_tensor(name))
                }
                None => is_vocab_tensor(name) && base.layout().tied_embeddings,
            };
            if !fits {
                let found = base
                    .tensor(name)
                    .map(|b| format!("{:?}", b.shape))
                    .unwrap_or_else(|| "no such tensor".into());
                return Err(module_error(
                    a,
                    name,
                    format!(
                        "replaces a base tensor of shape {found} with shape {:?}",
                        t.shape
                    ),
                ));
            }
        }
    }
    // A GPTQ layer becomes one `<module>.weight` at its qweight's place; its zeros, scales and
    // group index are not written.
    let by_qweight: HashMap<String, &GptqLayer> = gptq
        .iter()
        .map(|l| (format!("{}.qweight", l.module), l))
        .collect();
    let dropped: std::collections::HashSet<String> = gptq
        .iter()
        .flat_map(|l| {
            ["qzeros", "scales", "g_idx"]
                .into_iter()
                .map(move |r| format!("{}.{r}", l.module))
        })
        .collect();
    let mut names: Vec<(String, Option<&GptqLayer>)> = base
        .tensors()
        .iter()
        .filter(|t| !dropped.contains(&t.name))
        .map(|t| match by_qweight.get(&t.name) {
            Some(l) => (format!("{}.weight", l.module), Some(*l)),
            None => (t.name.clone(), None),
        })
        .collect();
    // A tied base whose head the adapter saved separately: the head is written too.
    let extra: Vec<(String, Option<&GptqLayer>)> = replaced
        .keys()
        .filter(|n| base.tensor(n).is_none() && !names.iter().any(|(m, _)| m == *n))
        .map(|n| (n.to_string(), None))
        .collect();
    names.extend(extra);
    let family = st_io::arch::family(base.config());
    let composite = composite_modules(base)?;
    // Experts of each fused in-memory parameter, as the base stores them one by one on disk:
    // a LoRA on that parameter must cover exactly these.
    let experts_on_disk =
        crate::param_lora::experts_on_disk(family, base.tensors().iter().map(|t| t.name.as_str()));
    let mut used_modules: std::collections::HashSet<(PathBuf, String)> = Default::default();
    let mut used_parameter_loras: std::collections::HashSet<(PathBuf, (String, usize))> =
        Default::default();
    let mut jobs = Vec::with_capacity(names.len());
    for (name, layer) in &names {
        let name = name.as_str();
        let (source, dtype, shape) = match (replaced.get(name), base.tensor(name), layer) {
            (Some((a, t)), ..) => (a.tensor_bytes(t), t.dtype, t.shape.clone()),
            (None, Some(t), _) => (base.tensor_bytes(t), t.dtype, t.shape.clone()),
            (None, None, Some(l)) => (
                &[][..],
                Dtype::F32,
                vec![l.out_features as u64, l.in_features as u64],
            ),
            (None, None, None) => unreachable!("names come from the base or the replacements"),
        };
        let layer = if replaced.contains_key(name) {
            None
        } else {
            *layer
        };
        let target_dtype = if can_convert(dtype, out_dtype) {
            out_dtype
        } else {
            dtype
        };
        let base_tensor = match layer {
            _ if replaced.contains_key(name) => None,
            Some(l) => base.tensor(&format!("{}.qweight", l.module)),
            None => base.tensor(name),
        };
        let mut job = Job {
            spec: TensorSpec::new(name, target_dtype, shape.clone()),
            base_tensor,
            source,
            source_dtype: dtype,
            lora: None,
            bias_terms: Vec::new(),
            dequant: layer,
        };
        let disk_module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        // transformers may rename a tensor on loading (Mixtral's `block_sparse_moe.gate` is
        // `mlp.gate` in memory; a multimodal model's `language_model.model.layers` is
        // `model.language_model.layers`): PEFT names the in-memory module.
        let memory_module = family
            .and_then(|f| st_io::arch::in_memory(f, name).ok().flatten())
            .filter(|p| p.block.is_none())
            .and_then(|p| {
                let suffix = name.rsplit_once('.').map(|(_, s)| s)?;
                p.param
                    .strip_suffix(&format!(".{suffix}"))
                    .map(String::from)
            })
            .or_else(|| composite.get(disk_module).map(|m| m.to_string()));
        for (a, weight) in adapters {
            if let Some(term) =
                crate::param_lora::parameter_term(a, family, name, &shape, &experts_on_disk)?
            {
                if !can_convert(dtype, out_dtype) {
                    return Err(module_error(a, &term.key.0, format!("targets \"{name}\" of dtype {dtype}; merging needs an F32, F16 or BF16 base weight")));
                }
                used_parameter_loras.insert((a.path.clone(), term.key.clone()));
                let lora = job.lora.get_or_insert_with(|| LoraJob {
                    out: term.out,
                    inp: term.inp,
                    transposed: term.transposed,
                    terms: Vec::new(),
                    magnitude: None,
                });
                if (lora.out, lora.inp, lora.transposed) != (term.out, term.inp, term.transposed) {
                    return Err(module_error(
                        a,
                        &term.key.0,
                        format!("adapts \"{name}\" in a shape another adapter does not"),
                    ));
                }
                lora.terms.push((
                    Factors::Built(term.a, term.b),
                    term.rank,
                    term.scaling * weight,
                ));
                continue;
            }
            let module = if a.modules.contains_key(disk_module) {
                disk_module
            } else {
                match &memory_module {
                    Some(m) if a.modules.contains_key(m.as_str()) => m.as_str(),
                    _ => continue,
                }
            };
            let Some(m) = a.modules.get(module) else {
                continue;
            };
            used_modules.insert((a.path.clone(), module.to_string()));
            if name.ends_with(".bias") {
                if let Some(b) = &m.lora_bias {
                    job.bias_terms.push((
                        to_f32_vec(b.dtype, a.tensor_bytes(b))?,
                        (m.scaling * weight) as f32,
                    ));
                }
                continue;
            }
            if !name.ends_with(".weight") {
                continue;
            }
            if !can_convert(dtype, out_dtype) {
                return Err(module_error(a, module, format!("targets \"{name}\" of dtype {dtype}; merging needs an F32, F16 or BF16 base weight")));
            }
            let (out, inp) = (m.b.shape[0] as usize, m.a.shape[1] as usize);
            let transposed = m.kind == LoraKind::Embedding || a.config.fan_in_fan_out;
            let expected = if transposed {
                vec![inp as u64, out as u64]
            } else {
                vec![out as u64, inp as u64]
            };
            if shape != expected {
                return Err(module_error(a, module, format!(
                    "has A {:?} and B {:?}, which need a base weight of shape {expected:?}, but \"{name}\" has shape {shape:?}",
                    m.a.shape, m.b.shape
                )));
            }
            let lora = job.lora.get_or_insert_with(|| LoraJob {
                out,
                inp,
                transposed,
                terms: Vec::new(),
                magnitude: None,
            });
            if lora.transposed != transposed {
                return Err(module_error(
                    a,
                    module,
                    "is stored transposed in one adapter and not in another".into(),
                ));
            }
            // Decoded when this tensor is merged; a dtype that cannot be is refused now.
            to_f32_vec(m.a.dtype, &[])?;
            to_f32_vec(m.b.dtype, &[])?;
            lora.terms.push((
                Factors::Stored {
                    a: a.tensor_bytes(&m.a),
                    a_dtype: m.a.dtype,
                    b: a.tensor_bytes(&m.b),
                    b_dtype: m.b.dtype,
                },
                m.rank as usize,
                m.scaling * weight,
            ));
            if let Some(mag) = &m.magnitude {
                let values = to_f32_vec(mag.dtype, a.tensor_bytes(mag))?;
                if values.len() != out {
                    return Err(module_error(
                        a,
                        module,
                        format!(
                            "has a DoRA magnitude of {} values for {out} output rows",
                            values.len()
                        ),
                    ));
                }
                lora.magnitude = Some(values);
            }
        }
        if !job.bias_terms.is_empty() && !can_convert(dtype, out_dtype) {
            return Err(Error::Usage(format!(
                "\"{name}\" has LoRA bias terms but dtype {dtype}"
            )));
        }
        // transformers keeps some tensors in F32 in a 16-bit model (`_keep_in_fp32_modules`,
        // DeepSeek's `e_score_correction_bias`) and saves them so: the output does the same.
        if family.is_some_and(|f| f.keeps_in_fp32(name))
            && can_convert(dtype, out_dtype)
            && job.lora.is_none()
            && job.bias_terms.is_empty()
            && job.dequant.is_none()
        {
            job.spec = TensorSpec::new(name, Dtype::F32, shape.clone());
        }
        jobs.push(job);
    }
    // Every module of every adapter found its base weight.
    for (a, _) in adapters {
        for (module, depth) in a.parameter_loras.keys() {
            if !used_parameter_loras.contains(&(a.path.clone(), (module.clone(), *depth))) {
                return Err(module_error(a, module, format!(
                    "has a LoRA on {} of this module's parameters (target_parameters {:?}) that no tensor of the base takes (an adapter for another model?)",
                    if *depth == 0 { "the outermost".to_string() } else { format!("the parameter nested {depth} deep in") },
                    a.config.target_parameters
                )));
            }
        }
        for (module, m) in &a.modules {
            let weight = format!("{module}.weight");
            if !used_modules.contains(&(a.path.clone(), module.clone()))
                && !jobs.iter().any(|j| j.spec.name == weight)
            {
                return Err(module_error(a, module, format!("targets \"{weight}\", which the base does not have (an adapter for another model?)")));
            }
            // Checked for every module, merged or not: a LoRA bias with nowhere to go would
            // otherwise vanish from the output without a word.
            if m.lora_bias.is_some()
                && !jobs.iter().any(|j| j.spec.name == format!("{module}.bias"))
            {
                return Err(module_error(
                    a,
                    module,
                    "has a LoRA bias but the base layer has no bias".into(),
                ));
            }
        }
    }
    Ok(jobs)
}

/// A token embedding or the head: tensors with a row per token of the vocabulary.
fn is_vocab_tensor(name: &str) -> bool {
    matches!(
        st_io::layout::classify(name),
        st_io::layout::TensorPlace::Embedding | st_io::layout::TensorPlace::Head
    ) && !st_io::arch::is_position_embedding(name)
}

/// Rows per block: about 32 MiB of output, more than the writer's buffer, so blocks go
/// straight to the file with no extra copy.
fn block_rows(cols: usize) -> usize {
    ((32usize << 20) / (cols.max(1) * 2)).max(1)
}

/// Merges one job's tensor on the merging thread and sends its bytes to the writing thread
/// (the caller sends its end). `Ok(None)`: the writing thread hung up, or the merge was
/// cancelled; the writing thread reports why.
fn produce_job<'a>(
    job: &Job<'a>,
    out_dtype: Dtype,
    gpu: Option<&GpuMerger>,
    cancelled: &(dyn Fn() -> bool + Sync),
    pool: &Receiver<Vec<u8>>,
    pieces: &SyncSender<Piece<'a>>,
) -> Result<Option<MergeStats>> {
    let name = job.spec.name.as_str();
    let target = job.spec.dtype;
    // A GPTQ layer is dequantised first (on the merge's device; both give the same bits).
    let dequantized: Vec<f32>;
    let (source, source_dtype) = match job.dequant {
        Some(layer) => {
            dequantized = match gpu {
                Some(g) => g.dequantize_gptq(layer)?,
                None => layer.to_f32()?,
            };
            (bytemuck::cast_slice::<f32, u8>(&dequantized), Dtype::F32)
        }
        None => (job.source, job.source_dtype),
    };
    // A 16-bit tensor transformers keeps in F32: widened exactly.
    if target == Dtype::F32 && source_dtype != Dtype::F32 && job.dequant.is_none() {
        let wide: Vec<u8> = to_f32_vec(source_dtype, source)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        return Ok(pieces
            .send(Piece::Whole(std::borrow::Cow::Owned(wide)))
            .ok()
            .map(|()| MergeStats::default()));
    }
    // Not a float we convert: copied as it is, straight from the map (a dequantised layer is
    // F32, which always converts).
    if job.dequant.is_none() && !can_convert(source_dtype, target) {
        return Ok(pieces
            .send(Piece::Whole(std::borrow::Cow::Borrowed(job.source)))
            .ok()
            .map(|()| MergeStats::default()));
    }
    if !job.bias_terms.is_empty() {
        let mut values = to_f32_vec(source_dtype, source)?;
        let orig = values.clone();
        for (b, scale) in &job.bias_terms {
            if b.len() != values.len() {
                return Err(Error::Usage(format!(
                    "\"{name}\" has {} values but its LoRA bias {}",
                    values.len(),
                    b.len()
                )));
            }
            for (v, x) in values.iter_mut().zip(b) {
                *v += scale * x;
            }
        }
        let stats = MergeStats {
            base_sq: orig.iter().map(|v| (*v as f64).powi(2)).sum(),
            delta_sq: values
                .iter()
                .zip(&orig)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum(),
        };
        let mut out = vec![0u8; values.len() * 2];
        encode_half(target, &values, &mut out)?;
        return Ok(pieces
            .send(Piece::Whole(std::borrow::Cow::Owned(out)))
            .ok()
            .map(|()| stats));
    }
    let (rows, cols) = match (&job.lora, job.spec.shape.as_slice()) {
        // A LoRA's product sets the rows (a 3-D expert stack is [experts · d1, d2]).
        (Some(l), _) if l.transposed => (l.inp, l.out),
        (Some(l), _) => (l.out, l.inp),
        (None, []) => (1, 1),
        (None, [n]) => (1, *n as usize),
        (None, [first, rest @ ..]) => (*first as usize, rest.iter().product::<u64>() as usize),
    };
    let product = match &job.lora {
        Some(l) => {
            // This tensor's factors in f32, for this tensor only (dropped with the product).
            let decoded = l
                .terms
                .iter()
                .map(|(f, r, s)| f.decode().map(|(a, b)| (a, b, *r, *s)))
                .collect::<Result<Vec<_>>>()?;
            let terms: Vec<LoraTerm> = decoded
                .iter()
                .map(|(a, b, r, s)| LoraTerm {
                    a,
                    b,
                    rank: *r,
                    scale: *s as f32,
                })
                .collect();
            Some(LoraProduct::new(l.out, l.inp, l.transposed, &terms).map_err(Error::Kernel)?)
        }
        None => None,
    };
    let dora = match (&job.lora, &product) {
        (
            Some(LoraJob {
                magnitude: Some(m),
                transposed,
                ..
            }),
            Some(p),
        ) => Some(DoraScale::new(source, source_dtype, p, *transposed, m).map_err(Error::Kernel)?),
        _ => None,
    };
    // LoRA targets go to the GPU when there is one; plain conversions stay on the CPU.
    let on_gpu = match (gpu, &product) {
        (Some(g), Some(p)) => Some((g, g.prepare(Some(p), dora.as_ref())?)),
        _ => None,
    };
    let step = block_rows(cols);
    let kind = out_dtype_for(target, out_dtype);
    let mut stats = MergeStats::default();
    let mut row = 0;
    while row < rows {
        let n = step.min(rows - row);
        let Ok(mut buffer) = pool.recv() else {
            return Ok(None);
        };
        if cancelled() {
            return Ok(None);
        }
        let len = n * cols * 2;
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        let out = &mut buffer[..len];
        stats.add(match &on_gpu {
            Some((g, t)) => g.merge_rows(t, source, source_dtype, cols, row, kind, out)?,
            None => merge_rows(
                source,
                source_dtype,
                cols,
                product.as_ref(),
                dora.as_ref(),
                row,
                kind,
                out,
            )?,
        });
        if pieces.send(Piece::Block(buffer, len)).is_err() {
            return Ok(None);
        }
        row += n;
    }
    Ok(Some(stats))
}

fn out_dtype_for(target: Dtype, out_dtype: Dtype) -> Dtype {
    if target.is_half() {
        target
    } else {
        out_dtype
    }
}

fn copy_non_weight_files(
    root: &Path,
    writer: &mut ShardWriter,
    out_dtype: Dtype,
    untie: bool,
    vocab: Option<u64>,
) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| st_io::Error::Io {
            path: root.to_path_buf(),
            source: e,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let lower = name.to_ascii_lowercase();
        let weights = lower.ends_with(".safetensors")
            || lower.ends_with(".bin")
            || lower.ends_with(".pt")
            || lower.ends_with(".pth")
            || lower.ends_with(".gguf")
            || lower.ends_with(".safetensors.index.json")
            || lower.ends_with(".bin.index.json");
        let adapter = lower.starts_with("adapter_");
        // Folders (`original/` beside the weights) are not part of a transformers checkpoint;
        // anything else that is not a regular file is refused when it is read.
        if weights || adapter || name == "README.md" || name.starts_with('.') || path.is_dir() {
            continue;
        }
        let bytes = st_io::paths::read_regular(&path)?;
        let bytes = if name == "config.json" {
            updated_config(&path, &bytes, out_dtype, untie, vocab)?
        } else {
            bytes
        };
        writer.add_file(name, &bytes)?;
    }
    Ok(())
}

/// config.json with the dtype of the output, no quantization_config, and the vocabulary and
/// tying as written.
fn updated_config(
    path: &Path,
    bytes: &[u8],
    out_dtype: Dtype,
    untie: bool,
    vocab: Option<u64>,
) -> Result<Vec<u8>> {
    let mut v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| st_io::Error::BadConfig {
            file: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
    let dtype = if out_dtype == Dtype::F16 {
        "float16"
    } else {
        "bfloat16"
    };
    if let Some(obj) = v.as_object_mut() {
        // The dtype under the name the file uses: `dtype` (transformers 5), `torch_dtype`
        // (transformers 4), or both; `dtype` when it has neither.
        let has_torch = obj.contains_key("torch_dtype");
        if obj.contains_key("dtype") || !has_torch {
            obj.insert("dtype".into(), dtype.into());
        }
        if has_torch {
            obj.insert("torch_dtype".into(), dtype.into());
        }
        obj.remove("quantization_config");
        // Sub-configs (text_config, vision_config, …) carry their own dtype where transformers
        // wrote one: kept consistent, never added.
        for (key, sub) in obj.iter_mut() {
            if !key.ends_with("_config") {
                continue;
            }
            if let Some(sub) = sub.as_object_mut() {
                for name in ["dtype", "torch_dtype"] {
                    if sub.contains_key(name) {
                        sub.insert(name.into(), dtype.into());
                    }
                }
            }
        }
        // Vocabulary and tying live at the top level, or in `text_config` for multimodal
        // models (what transformers' get_text_config() reads): changed wherever the file
        // has them; where it has neither, at the level that describes the text model.
        let nested = obj.get("text_config").is_some_and(|t| t.is_object());
        let mut set = |key: &str, value: serde_json::Value| {
            let top_has = obj.contains_key(key);
            let text = obj
                .get_mut("text_config")
                .and_then(serde_json::Value::as_object_mut);
            let text_has = text.as_ref().is_some_and(|t| t.contains_key(key));
            if let (Some(t), true) = (text, text_has || (nested && !top_has)) {
                t.insert(key.into(), value.clone());
            }
            if top_has || !nested {
                obj.insert(key.into(), value);
            }
        };
        if untie {
            set("tie_word_embeddings", false.into());
        }
        if let Some(n) = vocab {
            set("vocab_size", n.into());
        }
    }
    let mut text = serde_json::to_string_pretty(&v).unwrap_or_default();
    text.push('\n');
    Ok(text.into_bytes())
}

/// Recomputes sample rows of every merged tensor in f64 and compares with what was written.
fn verify_output(out: &Path, jobs: &[Job], out_dtype: Dtype) -> Result<VerifyReport> {
    let written = Checkpoint::open(out)?;
    let mut report = VerifyReport {
        rows_checked: 0,
        max_ulps: 0,
        worst_tensor: None,
    };
    for job in jobs {
        let Some(l) = &job.lora else { continue };
        let Some(t) = written.tensor(&job.spec.name) else {
            continue;
        };
        let dequantized: Vec<f32>;
        let (source, source_dtype) = match job.dequant {
            Some(layer) => {
                dequantized = layer.to_f32()?;
                (bytemuck::cast_slice::<f32, u8>(&dequantized), Dtype::F32)
            }
            None => (job.source, job.source_dtype),
        };
        let bytes = written.tensor_bytes(t);
        let rows = if l.transposed { l.inp } else { l.out };
        let cols = bytes.len() / 2 / rows.max(1);
        let decoded = l
            .terms
            .iter()
            .map(|(f, r, s)| f.decode().map(|(a, b)| (a, b, *r, *s)))
            .collect::<Result<Vec<_>>>()?;
        let terms: Vec<lora_kernels::reference::TermRef> = decoded
            .iter()
            .map(|(a, b, r, s)| lora_kernels::reference::TermRef {
                a,
                b,
                rank: *r,
                scale: *s,
            })
            .collect();
        // DoRA factors in f64, from every row (cheap next to the merge itself).
        let row_at = |r: usize| {
            lora_kernels::reference::merged_row(
                source,
                source_dtype,
                l.out,
                l.inp,
                l.transposed,
                &terms,
                r,
            )
        };
        let factors: Option<Vec<f64>> = match &l.magnitude {
            None => None,
            Some(m) => {
                let mut sq = vec![0f64; m.len()];
                for r in 0..rows {
                    let row = row_at(r)?;
                    for (c, v) in row.iter().enumerate() {
                        sq[if l.transposed { c } else { r }] += v * v;
                    }
                }
                Some(
                    sq.iter()
                        .zip(m)
                        .map(|(s, &m)| m as f64 / s.sqrt())
                        .collect(),
                )
            }
        };
        let samples: Vec<usize> = (0..8).map(|k| (k * 7919 + 13) % rows.max(1)).collect();
        for r in samples {
            let mut row = row_at(r)?;
            if let Some(f) = &factors {
                for (c, v) in row.iter_mut().enumerate() {
                    *v *= f[if l.transposed { c } else { r }];
                }
            }
            for (c, v) in row.iter().enumerate() {
                let expect = round_bits(*v, out_dtype);
                let off = (r * cols + c) * 2;
                let got = u16::from_le_bytes([bytes[off], bytes[off + 1]]);
                let d = lora_kernels::ulp_distance(expect, got);
                if d > report.max_ulps {
                    report.max_ulps = d;
                    report.worst_tensor = Some(job.spec.name.clone());
                }
            }
            report.rows_checked += 1;
        }
    }
    Ok(report)
}

/// Rounds an f64 to 16-bit bits directly (one rounding from the exact-ish value).
fn round_bits(v: f64, dtype: Dtype) -> u16 {
    if dtype == Dtype::F16 {
        half::f16::from_f64(v).to_bits()
    } else {
        half::bf16::from_f64(v).to_bits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn composite_modules_are_renamed_as_transformers_loads_them() {
        let m = |s: &str| composite_memory_module(s);
        // LLaVA, Gemma 3, Mistral 3 and their kin.
        assert_eq!(
            m("language_model.model.layers.0.self_attn.q_proj").as_deref(),
            Some("model.language_model.layers.0.self_attn.q_proj")
        );
        assert_eq!(m("language_model.lm_head").as_deref(), Some("lm_head"));
        assert_eq!(
            m("vision_tower.encoder.layers.1.mlp.fc1").as_deref(),
            Some("model.vision_tower.encoder.layers.1.mlp.fc1")
        );
        assert_eq!(
            m("multi_modal_projector.linear_1").as_deref(),
            Some("model.multi_modal_projector.linear_1")
        );
        // Qwen2-VL: the text model under `model.` on disk, the vision model under `visual.`.
        assert_eq!(
            m("model.layers.0.mlp.up_proj").as_deref(),
            Some("model.language_model.layers.0.mlp.up_proj")
        );
        assert_eq!(
            m("visual.blocks.0.attn.qkv").as_deref(),
            Some("model.visual.blocks.0.attn.qkv")
        );
        // Already in-memory names, and names no rule covers, stay as they are.
        assert_eq!(m("model.language_model.layers.0.mlp.up_proj"), None);
        assert_eq!(m("model.vision_tower.encoder.layers.0.mlp.fc1"), None);
        assert_eq!(m("lm_head"), None);
        assert_eq!(m("transformer.h.0.attn.c_attn"), None);
    }

    #[test]
    fn composite_renames_keep_in_memory_names_and_refuse_two_modules_becoming_one() {
        let renames = composite_renames(
            [
                "language_model.model.layers.0.mlp.up_proj.weight",
                "language_model.model.layers.0.mlp.up_proj.bias",
                "vision_tower.encoder.layers.0.mlp.fc1.weight",
                "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
            ]
            .into_iter(),
        )
        .unwrap();
        assert_eq!(
            renames,
            HashMap::from([(
                "language_model.model.layers.0.mlp.up_proj".to_string(),
                "model.language_model.layers.0.mlp.up_proj".to_string()
            )]),
            "a module whose in-memory name is in the checkpoint too keeps its own"
        );
        let e = composite_renames(
            [
                "language_model.model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.up_proj.weight",
            ]
            .into_iter(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            "\"language_model.model.layers.0.mlp.up_proj\" and \"model.layers.0.mlp.up_proj\" would \
             both be \"model.language_model.layers.0.mlp.up_proj\" once transformers renames this \
             multimodal checkpoint's modules; which one an adapter's \
             \"model.language_model.layers.0.mlp.up_proj\" means is not clear"
        );
    }

    fn rewrite(config: Value, dtype: Dtype, untie: bool, vocab: Option<u64>) -> Value {
        let bytes = serde_json::to_vec(&config).unwrap();
        let out = updated_config(Path::new("config.json"), &bytes, dtype, untie, vocab).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn a_transformers_4_config_keeps_torch_dtype_alone() {
        let c = rewrite(
            json!({"model_type": "llama", "torch_dtype": "float32", "vocab_size": 256,
                   "quantization_config": {"bits": 4}}),
            Dtype::F16,
            true,
            Some(260),
        );
        assert_eq!(c["torch_dtype"], "float16");
        assert!(
            c.get("dtype").is_none(),
            "no key transformers 4 does not write: {c}"
        );
        assert!(c.get("quantization_config").is_none());
        assert_eq!(c["tie_word_embeddings"], false);
        assert_eq!(c["vocab_size"], 260);
    }

    #[test]
    fn a_transformers_5_config_and_one_with_both_names() {
        let c = rewrite(json!({"dtype": "float32"}), Dtype::BF16, false, None);
        assert_eq!(c, json!({"dtype": "bfloat16"}));
        let c = rewrite(json!({}), Dtype::BF16, false, None);
        assert_eq!(c, json!({"dtype": "bfloat16"}));
        let c = rewrite(
            json!({"dtype": "float32", "torch_dtype": "float32"}),
            Dtype::F16,
            false,
            None,
        );
        assert_eq!(c, json!({"dtype": "float16", "torch_dtype": "float16"}));
    }

    #[test]
    fn a_nested_text_config_gets_its_vocabulary_tying_and_dtype() {
        // A multimodal config (Gemma 3, LLaVA): the text model's facts are in text_config.
        let c = rewrite(
            json!({
                "model_type": "gemma3",
                "dtype": "float32",
                "text_config": {"vocab_size": 256, "tie_word_embeddings": true, "dtype": "float32"},
                "vision_config": {"hidden_size": 32, "dtype": "float32"},
                "image_token_index": 255
            }),
            Dtype::BF16,
            true,
            Some(300),
        );
        assert_eq!(c["dtype"], "bfloat16");
        assert_eq!(c["text_config"]["dtype"], "bfloat16");
        assert_eq!(c["vision_config"]["dtype"], "bfloat16");
        assert_eq!(c["text_config"]["vocab_size"], 300);
        assert_eq!(c["text_config"]["tie_word_embeddings"], false);
        assert!(c.get("vocab_size").is_none(), "{c}");
        assert!(c.get("tie_word_embeddings").is_none(), "{c}");
        assert!(c["vision_config"].get("vocab_size").is_none());
        // A key at both levels changes at both.
        let c = rewrite(
            json!({"tie_word_embeddings": true, "text_config": {"tie_word_embeddings": true}}),
            Dtype::BF16,
            true,
            None,
        );
        assert_eq!(c["tie_word_embeddings"], false);
        assert_eq!(c["text_config"]["tie_word_embeddings"], false);
        // No dtype added to a sub-config that had none.
        assert!(c["text_config"].get("dtype").is_none());
    }
}
