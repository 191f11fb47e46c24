//! `weightsmith load`: a checkpoint onto its devices per the plan, at the speed of the bus,
//! with each layer's KV cache allocated beside it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use gpu_mem::cuda::{Context, DeviceAlloc};
use gpu_mem::upload::{Dst, Piece, UploadEngine};
use gpu_mem::Device;
use planner::Placement;
use serde::Serialize;
use st_io::layout::UnitKind;
use st_io::{Checkpoint, Dtype};

use crate::plan::{plan_loaded, PlanOptions, PlanReport};
use crate::{Error, Result};

/// Memory holding one tensor or cache, on the host or a GPU.
pub enum Buffer {
    Host(Vec<u8>),
    Cuda(DeviceAlloc),
}

impl Buffer {
    fn alloc(
        device: Device,
        contexts: &HashMap<u32, Arc<Context>>,
        len: usize,
    ) -> std::result::Result<Buffer, gpu_mem::Error> {
        match device {
            Device::Host => {
                // Fallible: a size from a file or a flag that memory cannot hold is an error,
                // not an abort.
                let mut v = Vec::new();
                v.try_reserve_exact(len)
                    .map_err(|_| gpu_mem::Error::HostAlloc { bytes: len as u64 })?;
                v.resize(len, 0);
                Ok(Buffer::Host(v))
            }
            Device::Cuda(n) => {
                let ctx = contexts.get(&n).ok_or(gpu_mem::Error::NoDriver)?;
                DeviceAlloc::new(ctx, len).map(Buffer::Cuda)
            }
        }
    }

    /// The device address (CUDA), for an inference engine to use.
    pub fn device_ptr(&self) -> Option<u64> {
        match self {
            Buffer::Cuda(a) => Some(a.device_ptr()),
            Buffer::Host(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buffer::Host(v) => v.len(),
            Buffer::Cuda(a) => a.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, read back to the host.
    pub fn read_back(&self) -> std::result::Result<Vec<u8>, gpu_mem::Error> {
        match self {
            Buffer::Host(v) => Ok(v.clone()),
            Buffer::Cuda(a) => {
                let mut out = vec![0u8; a.len()];
                a.copy_to_host(0, &mut out)?;
                Ok(out)
            }
        }
    }
}

/// A tensor in device memory.
pub struct LoadedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub device: Device,
    pub buffer: Buffer,
}

/// The KV cache of one decoder layer, on that layer's device.
pub struct LayerCache {
    pub layer: u64,
    pub device: Device,
    pub buffer: Buffer,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceLoadReport {
    pub device: String,
    pub name: String,
    pub planned_bytes: u64,
    pub allocated_bytes: u64,
    /// Drop of free memory reported by cuMemGetInfo across the load (CUDA only).
    pub mem_info_delta_bytes: Option<u64>,
    pub weight_bytes: u64,
    pub seconds: f64,
    pub gb_per_s: f64,
}

/// The version of [`LoadReport`]'s JSON form (`weightsmith load --json`); it changes only when
/// a field changes meaning or goes away.
pub const LOAD_SCHEMA_VERSION: u32 = 1;

/// Where a load's time went, in seconds, phase by phase; together they make
/// [`LoadReport::seconds`] (less a few microseconds of bookkeeping).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LoadPhases {
    /// Resolving the source, reading every header, checking the architecture.
    pub open: f64,
    /// Finding the GPUs and retaining their primary contexts.
    pub discover: f64,
    /// The device plan.
    pub plan: f64,
    /// Allocating every tensor and cache buffer.
    pub alloc: f64,
    /// The copies, file by file, until every byte is on its device.
    pub copy: f64,
    /// Handing the release of host registrations and staging buffers to a background thread
    /// (the release itself overlaps what the caller does next).
    pub release: f64,
    /// `--verify`'s read-back and the final check that no file changed.
    pub verify: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub schema_version: u32,
    pub model: String,
    /// "cuda" or "host (no NVIDIA driver)".
    pub backend: String,
    pub devices: Vec<DeviceLoadReport>,
    /// The path each file took: registered, pinned, pageable, host.
    pub files: Vec<(String, String)>,
    pub weight_bytes: u64,
    pub cache_bytes: u64,
    pub seconds: f64,
    pub gb_per_s: f64,
    /// `seconds`, phase by phase.
    pub phases: LoadPhases,
    pub verified_tensors: Option<usize>,
    pub plan: PlanReport,
}

/// A quantised linear layer as loaded, with what a dequantising kernel needs (exllamav2's
/// "dequantisation set-up"): the format's parameters (GPTQ bits, group size, act-order, zero
/// offset; EXL2 groups of rows and their bits) and its tensors, loaded as they are stored, on
/// the layer's device (`qweight`, `qzeros`, `scales`, `g_idx` — the permutation of act-order
/// — and `bias`; EXL2 `q_weight`, `q_scale`, `q_scale_max`, `q_groups`, `q_perm`,
/// `q_invperm`).
#[derive(Debug, Clone)]
pub struct LoadedQuantizedLinear {
    pub module: String,
    pub device: Device,
    pub in_features: u64,
    pub out_features: u64,
    pub scheme: st_io::QuantScheme,
    /// The layer's tensors by role, as indices into [`LoadedModel::tensors`].
    pub parts: BTreeMap<String, usize>,
}

/// A loaded model: tensors by name with device, dtype, shape and device pointer, each
/// layer's cache buffer, and the quantised linear layers grouped with their parameters.
pub struct LoadedModel {
    pub tensors: Vec<LoadedTensor>,
    pub caches: Vec<LayerCache>,
    pub quantized: Vec<LoadedQuantizedLinear>,
    pub report: LoadReport,
    by_name: HashMap<String, usize>,
    _contexts: Vec<Arc<Context>>,
}

impl LoadedModel {
    pub fn tensor(&self, name: &str) -> Option<&LoadedTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The quantised linear layer of a module path (`model.layers.0.self_attn.q_proj`).
    pub fn quantized_linear(&self, module: &str) -> Option<&LoadedQuantizedLinear> {
        self.quantized.iter().find(|q| q.module == module)
    }

    /// The loaded tensor of one role of a quantised layer (`qweight`, `g_idx`, `q_perm`, …);
    /// its [`Buffer::device_ptr`] is what a kernel takes.
    pub fn quantized_part(
        &self,
        linear: &LoadedQuantizedLinear,
        role: &str,
    ) -> Option<&LoadedTensor> {
        linear.parts.get(role).map(|&i| &self.tensors[i])
    }
}

/// What a load is doing when it reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadStage {
    /// The plan is made; every buffer is about to be allocated (one event, `file` empty,
    /// `units` the whole plan).
    Allocating,
    /// A file's bytes are being copied (one event before each file).
    Copying,
    /// Every byte is on its device (one last event, `file` and `units` empty).
    Copied,
}

/// Progress of a load, for a bar or a GUI. The callback runs on the loading thread: the load
/// waits for it.
pub struct LoadProgress<'a> {
    pub stage: LoadStage,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The file being copied (empty outside [`LoadStage::Copying`]).
    pub file: &'a str,
    /// The units it feeds and their devices, e.g. `layers.0-7 → cuda:0, layers.8 → cuda:1`.
    pub units: &'a str,
}

/// Options of [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub plan: PlanOptions,
    /// Read every tensor back and compare with the file.
    pub verify: bool,
    /// Skip the registered path (to measure the others).
    pub no_register: bool,
    /// Load into host memory even where GPUs are present.
    pub host_only: bool,
    /// The staged path's shape (reader threads, window size, warm share).
    pub staging: gpu_mem::upload::StagingConfig,
}

/// Plans, checks, allocates and copies. Any failure frees everything already allocated and
/// names the unit and device.
pub fn load(
    path: impl AsRef<Path>,
    options: &LoadOptions,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<LoadedModel> {
    let started = Instant::now();
    let mut phases = LoadPhases::default();
    let mut mark = started;
    let mut lap = || {
        let now = Instant::now();
        let seconds = now.duration_since(mark).as_secs_f64();
        mark = now;
        seconds
    };
    let source = crate::source::for_model(path.as_ref())?;
    let path = source.path.as_path();
    // Shared with the thread that releases the files' registrations after the load returns.
    let checkpoint = Arc::new(Checkpoint::open(path)?);
    checkpoint.require_complete()?;
    let linears = st_io::quant::quantized_linears(&checkpoint)?;
    check_architecture(&checkpoint, &linears)?;
    phases.open = lap();
    let infos = if options.host_only {
        Vec::new()
    } else {
        gpu_mem::discover()?
    };
    let backend = if options.host_only {
        "host".to_string()
    } else if infos.is_empty() {
        "host (no NVIDIA driver)".to_string()
    } else {
        "cuda".to_string()
    };
    let mut contexts: HashMap<u32, Arc<Context>> = HashMap::new();
    for i in &infos {
        if let Device::Cuda(n) = i.device {
            contexts.insert(n, Context::new(n)?);
        }
    }
    phases.discover = lap();
    let plan = plan_loaded(&checkpoint, path, &options.plan, &infos)?;
    phases.plan = lap();
    let device_of = |p: Placement| -> Device {
        match (p, infos.is_empty()) {
            (Placement::Device(d), false) => Device::Cuda(d as u32),
            _ => Device::Host,
        }
    };
    let free_before: HashMap<u32, u64> = contexts
        .iter()
        .map(|(n, c)| (*n, c.mem_info().map(|m| m.0).unwrap_or(0)))
        .collect();
    // Allocate every tensor of every unit, in plan order, and each layer's cache beside it.
    let layout = checkpoint.layout();
    let mut tensors: Vec<LoadedTensor> = Vec::with_capacity(checkpoint.tensors().len());
    let mut tensor_index: Vec<Option<usize>> = vec![None; checkpoint.tensors().len()];
    let mut caches = Vec::new();
    let bytes_total: u64 = checkpoint.total_tensor_bytes();
    progress(LoadProgress {
        stage: LoadStage::Allocating,
        bytes_done: 0,
        bytes_total,
        file: "",
        units: &plan_summary(&layout, &plan),
    });
    for (unit, planned) in layout.units.iter().zip(&plan.plan.units) {
        let device = device_of(planned.device);
        let fail = |e: gpu_mem::Error| Error::Load {
            unit: unit.name.clone(),
            device: device.to_string(),
            message: alloc_failure(e, device, &contexts, &plan, planned.device),
        };
        for &t in &unit.tensors {
            let info = &checkpoint.tensors()[t];
            let buffer = Buffer::alloc(device, &contexts, info.len as usize).map_err(fail)?;
            tensor_index[t] = Some(tensors.len());
            tensors.push(LoadedTensor {
                name: info.name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                device,
                buffer,
            });
        }
        if let (UnitKind::Layer(i), true) = (unit.kind, planned.cache_bytes > 0) {
            let buffer =
                Buffer::alloc(device, &contexts, planned.cache_bytes as usize).map_err(fail)?;
            caches.push(LayerCache {
                layer: i,
                device,
                buffer,
            });
        }
    }
    phases.alloc = lap();
    // Copy, file by file, every device's copies running concurrently.
    let ctx_list: Vec<Arc<Context>> = contexts.values().cloned().collect();
    let mut engine = UploadEngine::new(&ctx_list)?;
    engine.allow_register = !options.no_register;
    engine.staging_config = options.staging;
    let mut bytes_done = 0u64;
    let mut files = Vec::new();
    let mut per_device_bytes: HashMap<Device, u64> = HashMap::new();
    let tensor_devices: Vec<Device> = tensors.iter().map(|t| t.device).collect();
    // Every destination borrowed once, for the engine's life: the copies may still run when
    // `upload` returns, so the buffers stay out of reach until the engine is finished.
    let mut slots: Vec<Option<(Device, usize, Dst)>> = tensors
        .iter_mut()
        .map(|t| {
            let len = t.buffer.len();
            let dst = match &mut t.buffer {
                Buffer::Host(v) => Dst::Host(v.as_mut_slice()),
                Buffer::Cuda(a) => Dst::Cuda(a),
            };
            Some((t.device, len, dst))
        })
        .collect();
    let copy_started = Instant::now();
    let trace = tracing::enabled!(tracing::Level::DEBUG);
    for (f, shard) in checkpoint.files().iter().enumerate() {
        let file_started = Instant::now();
        let units = units_of_file(&layout, &plan, checkpoint.tensors(), f);
        progress(LoadProgress {
            stage: LoadStage::Copying,
            bytes_done,
            bytes_total,
            file: &shard.name,
            units: &units,
        });
        let file = st_io::paths::open_regular(&shard.path)?;
        let mut members: Vec<(u64, usize)> = checkpoint
            .tensors()
            .iter()
            .enumerate()
            .filter(|(_, t)| t.file == f)
            .filter_map(|(i, t)| tensor_index[i].map(|k| (t.offset, k)))
            .collect();
        members.sort();
        let mut pieces: Vec<Piece> = Vec::with_capacity(members.len());
        for &(offset, k) in &members {
            let Some((device, len, dst)) = slots[k].take() else {
                continue;
            };
            *per_device_bytes.entry(device).or_default() += len as u64;
            pieces.push(Piece { offset, len, dst });
        }
        let taken = engine
            .upload(&file, shard.bytes(), &mut pieces)
            .map_err(|e| {
                upload_failure(
                    e,
                    &checkpoint,
                    &layout,
                    &tensor_index,
                    &tensor_devices,
                    f,
                    &units,
                )
            })?;
        files.push((shard.name.clone(), taken.name().to_string()));
        if trace {
            tracing::debug!(
                "trace file {}: {:.1} ms in all",
                shard.name,
                file_started.elapsed().as_secs_f64() * 1e3
            );
        }
        bytes_done += pieces.iter().map(|p| p.len as u64).sum::<u64>();
    }
    progress(LoadProgress {
        stage: LoadStage::Copied,
        bytes_done,
        bytes_total,
        file: "",
        units: "",
    });
    // Every byte is on its device now; releasing the host registrations is cleanup, counted
    // in the load's total time but not in the copy rate.
    engine.flush().map_err(|e| Error::Load {
        unit: "all files".into(),
        device: "all".into(),
        message: e.to_string(),
    })?;
    let copy_seconds = copy_started.elapsed().as_secs_f64();
    phases.copy = lap();
    // Free memory now, before the background release begins: a cuMemGetInfo issued while
    // the driver unregisters pages waits for it (one H200 load's report spent 0.12 s after
    // its last phase, where only that call runs).
    let free_after: HashMap<u32, u64> = contexts
        .iter()
        .filter_map(|(n, c)| c.mem_info().ok().map(|m| (*n, m.0)))
        .collect();
    // Every byte is on its device; unregistering the files' pages goes on in the background.
    // SAFETY: the thread owns a reference to the checkpoint whose maps were uploaded, so they
    // stay mapped until their registrations are released.
    drop(unsafe { engine.finish_in_background(Arc::clone(&checkpoint)) });
    phases.release = lap();
    let verified_tensors = if options.verify {
        let mut n = 0;
        for (i, info) in checkpoint.tensors().iter().enumerate() {
            let Some(k) = tensor_index[i] else { continue };
            let back = tensors[k].buffer.read_back()?;
            if back.as_slice() != checkpoint.tensor_bytes(info) {
                // A file that changed under us is what the user must hear about first.
                checkpoint.check_intact()?;
                return Err(Error::Load {
                    unit: info.name.clone(),
                    device: tensors[k].device.to_string(),
                    message: "read back differs from the file".into(),
                });
            }
            n += 1;
        }
        Some(n)
    } else {
        None
    };
    // Every byte came from the files as they were when mapped, or the load fails naming the file.
    checkpoint.check_intact()?;
    phases.verify = lap();
    let mut devices = Vec::new();
    for d in &plan.plan.devices {
        let device = device_of(Placement::Device(d.index));
        let allocated: u64 = tensors
            .iter()
            .filter(|t| t.device == device)
            .map(|t| t.buffer.len() as u64)
            .sum::<u64>()
            + caches
                .iter()
                .filter(|c| c.device == device)
                .map(|c| c.buffer.len() as u64)
                .sum::<u64>();
        let delta = match device {
            Device::Cuda(n) => free_after.get(&n).map(|&free| {
                free_before
                    .get(&n)
                    .copied()
                    .unwrap_or(free)
                    .saturating_sub(free)
            }),
            Device::Host => None,
        };
        let weight_bytes = per_device_bytes.get(&device).copied().unwrap_or(0);
        devices.push(DeviceLoadReport {
            device: device.to_string(),
            name: infos
                .iter()
                .find(|i| i.device == device)
                .map(|i| i.name.clone())
                .unwrap_or_else(|| "host memory".into()),
            planned_bytes: d.weight_bytes + d.cache_bytes,
            allocated_bytes: allocated,
            mem_info_delta_bytes: delta,
            weight_bytes,
            seconds: copy_seconds,
            gb_per_s: weight_bytes as f64 / copy_seconds.max(1e-9) / 1e9,
        });
    }
    let by_name = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let cache_bytes = caches.iter().map(|c| c.buffer.len() as u64).sum();
    let report = LoadReport {
        schema_version: LOAD_SCHEMA_VERSION,
        model: path.display().to_string(),
        backend,
        devices,
        files,
        weight_bytes: bytes_total,
        cache_bytes,
        seconds: started.elapsed().as_secs_f64(),
        gb_per_s: bytes_total as f64 / copy_seconds.max(1e-9) / 1e9,
        phases,
        verified_tensors,
        plan,
    };
    let quantized = linears
        .iter()
        .map(|l| {
            let parts: BTreeMap<String, usize> = l
                .parts
                .iter()
                .filter_map(|(role, &i)| tensor_index[i].map(|k| (role.clone(), k)))
                .collect();
            LoadedQuantizedLinear {
                module: l.module.clone(),
                device: parts
                    .values()
                    .next()
                    .map_or(Device::Host, |&k| tensors[k].device),
                in_features: l.in_features,
                out_features: l.out_features,
                scheme: l.scheme.clone(),
                parts,
            }
        })
        .collect();
    Ok(LoadedModel {
        tensors,
        caches,
        quantized,
        report,
        by_name,
        _contexts: ctx_list,
    })
}

/// `embedding, layers.0-7 → cuda:0; layers.8-12 → cuda:1` for the units file `f` feeds.
/// A failed upload of file `f`, named as precisely as the failure allows: a read names the file,
/// the tensor at the failing offset, its unit and device; anything else the file and the units
/// it holds with their devices.
fn upload_failure(
    e: gpu_mem::Error,
    checkpoint: &Checkpoint,
    layout: &st_io::ModelLayout,
    tensor_index: &[Option<usize>],
    tensor_devices: &[Device],
    f: usize,
    units: &str,
) -> Error {
    let shard = &checkpoint.files()[f].name;
    if let gpu_mem::Error::Read { offset, .. } = &e {
        // The tensor holding the offset, else the first one after it (a window of the staged
        // path starts where the previous one ended, so it may start between tensors).
        let at = checkpoint
            .tensors()
            .iter()
            .enumerate()
            .filter(|(_, t)| t.file == f && t.offset + t.len > *offset)
            .min_by_key(|(_, t)| t.offset);
        if let Some((i, t)) = at {
            let unit = layout
                .units
                .iter()
                .find(|u| u.tensors.contains(&i))
                .map_or_else(|| "unplaced tensors".to_string(), |u| u.name.clone());
            let device = tensor_index[i].map_or_else(
                || "no device".to_string(),
                |k| tensor_devices[k].to_string(),
            );
            return Error::Load {
                unit,
                device,
                message: format!("{shard}: tensor \"{}\": {e}", t.name),
            };
        }
    }
    Error::Load {
        unit: format!("file {shard}"),
        device: if units.is_empty() {
            "its devices".into()
        } else {
            units.to_string()
        },
        message: e.to_string(),
    }
}

/// Every unit and its device, grouped: `embedding, layers.0-15 → cuda:0; layers.16-31, norm, head → cuda:1`.
fn plan_summary(layout: &st_io::ModelLayout, plan: &PlanReport) -> String {
    describe_units(layout, plan, |_| true)
}

/// A failed allocation's message; a device allocation refused for want of memory also says
/// how much the device has free now and how much the plan found, since the usual cause is
/// another process taking memory between the plan and the load.
fn alloc_failure(
    e: gpu_mem::Error,
    device: Device,
    contexts: &HashMap<u32, Arc<Context>>,
    plan: &PlanReport,
    placement: Placement,
) -> String {
    let message = e.to_string();
    let (gpu_mem::Error::DeviceAlloc { code, .. }, Device::Cuda(n), Placement::Device(d)) =
        (&e, device, placement)
    else {
        return message;
    };
    if !code.contains("OUT_OF_MEMORY") {
        return message;
    }
    let free_now = contexts
        .get(&n)
        .and_then(|c| c.mem_info().ok())
        .map(|m| m.0);
    let planned = plan.plan.devices.get(d);
    match (free_now, planned) {
        (Some(free), Some(p)) => format!(
            "{message}; {device} has {} free now, the plan found {} free and placed {} there \
             (did another process take memory after the plan? plan again, or load with a \
             larger --reserve)",
            gpu_mem::format_bytes(free),
            gpu_mem::format_bytes(p.capacity_bytes),
            gpu_mem::format_bytes(p.weight_bytes + p.cache_bytes),
        ),
        _ => message,
    }
}

fn units_of_file(
    layout: &st_io::ModelLayout,
    plan: &PlanReport,
    tensors: &[st_io::TensorInfo],
    f: usize,
) -> String {
    describe_units(layout, plan, |unit| {
        unit.tensors.iter().any(|&t| tensors[t].file == f)
    })
}

fn describe_units(
    layout: &st_io::ModelLayout,
    plan: &PlanReport,
    include: impl Fn(&st_io::layout::PlacementUnit) -> bool,
) -> String {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for (unit, planned) in layout.units.iter().zip(&plan.plan.units) {
        if !include(unit) {
            continue;
        }
        let device = match planned.device {
            Placement::Device(d) => plan.plan.devices[d].name.clone(),
            Placement::Host => "host".into(),
        };
        match groups.last_mut() {
            Some((d, names)) if *d == device => names.push(unit.name.clone()),
            _ => groups.push((device, vec![unit.name.clone()])),
        }
    }
    groups
        .iter()
        .map(|(d, names)| format!("{} → {d}", crate::plan::compact_units(names)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Decoder layers are built alike: a tensor every other layer has, missing from one layer, or
/// a shape every other layer agrees on, different in one, is a broken checkpoint (a truncated
/// download, a bad conversion). Models whose layers differ by design (dense layers before MoE
/// ones) differ in more than one layer and pass.
fn check_layers_alike(c: &Checkpoint) -> Result<()> {
    let layout = c.layout();
    let Some(prefix) = layout.layer_prefix.as_deref() else {
        return Ok(());
    };
    let layers: Vec<(u64, HashMap<&str, &Vec<u64>>)> = layout
        .units
        .iter()
        .filter_map(|u| match u.kind {
            UnitKind::Layer(i) => {
                let lead = format!("{prefix}.{i}.");
                let members = u
                    .tensors
                    .iter()
                    .map(|&t| &c.tensors()[t])
                    .filter_map(|t| t.name.strip_prefix(&lead).map(|rest| (rest, &t.shape)))
                    .collect();
                Some((i, members))
            }
            _ => None,
        })
        .collect();
    if layers.len() < 3 {
        return Ok(());
    }
    let mut count: HashMap<(&str, &Vec<u64>), usize> = HashMap::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (_, members) in &layers {
        for (name, shape) in members {
            *count.entry((name, shape)).or_default() += 1;
            *names.entry(name).or_default() += 1;
        }
    }
    let n = layers.len();
    for (i, members) in &layers {
        for (name, &k) in &names {
            if k == n - 1 && !members.contains_key(name) {
                return Err(Error::Usage(format!(
                    "{}: tensor \"{prefix}.{i}.{name}\" is missing (every other layer has it): an incomplete or broken checkpoint",
                    c.root().display()
                )));
            }
        }
        for (name, shape) in members {
            if count.get(&(*name, *shape)) == Some(&1) && names.get(name) == Some(&n) {
                let usual = count
                    .iter()
                    .find(|((m, _), &k)| m == name && k == n - 1)
                    .map(|((_, s), _)| s);
                if let Some(usual) = usual {
                    return Err(Error::Usage(format!(
                        "{}: tensor \"{prefix}.{i}.{name}\" has shape {shape:?} but every other layer's has {usual:?}",
                        c.root().display()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Before any copy: layers alike, the layers config.json announces are all there, attention
/// projections and the embedding have the shapes it implies.
fn check_architecture(c: &Checkpoint, linears: &[st_io::QuantizedLinear]) -> Result<()> {
    check_layers_alike(c)?;
    let Some(cfg) = c.config() else { return Ok(()) };
    let layout = c.layout();
    // The head counts describe the decoder's layers: a multimodal model's vision tower has
    // attention projections of its own shapes.
    let in_decoder = |name: &str| match layout.layer_prefix.as_deref() {
        Some(prefix) => name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.')),
        None => true,
    };
    // Quantised attention projections have the dimensions the head counts imply too.
    if let (Some(heads), Some(kv), Some(hd), Some(h)) = (
        cfg.num_attention_heads,
        cfg.kv_heads(),
        cfg.head_dim(),
        cfg.hidden_size,
    ) {
        for l in linears.iter().filter(|l| in_decoder(&l.module)) {
            let expected = if l.module.ends_with("self_attn.q_proj") {
                Some((heads * hd, h))
            } else if l.module.ends_with("self_attn.k_proj")
                || l.module.ends_with("self_attn.v_proj")
            {
                Some((kv * hd, h))
            } else {
                None
            };
            if let Some((out, inp)) = expected {
                if (l.out_features, l.in_features) != (out, inp) {
                    return Err(Error::Usage(format!(
                        "{}: quantised layer \"{}\" has {} outputs and {} inputs but config.json (heads, key/value heads, head_dim, hidden_size) implies {out} and {inp}",
                        c.root().display(), l.module, l.out_features, l.in_features
                    )));
                }
            }
        }
    }
    // Attention projections have the shapes the head counts imply.
    if let (Some(heads), Some(kv), Some(hd), Some(h)) = (
        cfg.num_attention_heads,
        cfg.kv_heads(),
        cfg.head_dim(),
        cfg.hidden_size,
    ) {
        for t in c.tensors().iter().filter(|t| in_decoder(&t.name)) {
            let expected = if t.name.ends_with("self_attn.q_proj.weight") {
                Some([heads * hd, h])
            } else if t.name.ends_with("self_attn.k_proj.weight")
                || t.name.ends_with("self_attn.v_proj.weight")
            {
                Some([kv * hd, h])
            } else {
                None
            };
            if let Some(e) = expected {
                if t.shape != e {
                    return Err(Error::Usage(format!(
                        "{}: tensor \"{}\" has shape {:?} but config.json (heads, key/value heads, head_dim, hidden_size) implies {e:?}",
                        c.root().display(), t.name, t.shape
                    )));
                }
            }
        }
    }
    if let Some(n) = cfg.num_hidden_layers {
        let found: Vec<u64> = layout
            .units
            .iter()
            .filter_map(|u| {
                if let UnitKind::Layer(i) = u.kind {
                    Some(i)
                } else {
                    None
                }
            })
            .collect();
        let missing: Vec<u64> = (0..n).filter(|i| !found.contains(i)).collect();
        if !missing.is_empty() {
            return Err(Error::Usage(format!(
                "{}: config.json announces {n} layers but layers {missing:?} have no tensors",
                c.root().display()
            )));
        }
    }
    if let (Some(v), Some(h)) = (cfg.vocab_size, cfg.hidden_size) {
        for u in layout
            .units
            .iter()
            .filter(|u| u.kind == UnitKind::Embedding)
        {
            for &t in &u.tensors {
                let info = &c.tensors()[t];
                let is_token_embedding = [
                    "embed_tokens",
                    "wte",
                    "word_embeddings",
                    "tok_embeddings",
                    "embed_in",
                ]
                .iter()
                .any(|k| info.name.contains(k));
                if is_token_embedding
                    && info.shape.len() == 2
                    && (info.shape[1] != h || info.shape[0] < v)
                {
                    return Err(Error::Usage(format!(
                        "{}: tensor \"{}\" has shape {:?} but config.json implies [{v}, {h}]",
                        c.root().display(),
                        info.name,
                        info.shape
                    )));
                }
            }
        }
    }
    Ok(())
}
