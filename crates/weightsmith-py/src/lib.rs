//! `weightsmith._native`: the Python bindings of weightsmith, a thin layer over the façade.
//!
//! Every verb takes its flags as the command line does (the pure-Python `weightsmith` package
//! turns keyword arguments into them), runs through [`weightsmith::cli::report_json`] — the
//! same parsing and library calls as the CLI — and returns the CLI's `--json` document. Long
//! calls run on a worker thread while the calling thread, the GIL released between polls,
//! forwards progress to a Python callable and watches for Ctrl-C (which cancels a merge
//! cleanly, then raises KeyboardInterrupt). `load` returns `Tensor`s that implement the
//! DLPack protocol (`__dlpack__`, `__dlpack_device__`): `torch.from_dlpack` and
//! `numpy.from_dlpack` take them without a copy, and the model's memory is freed when the last
//! tensor (and the last object holding it) is gone. It adds no logic of its own.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use weightsmith::cli::{CallError, CallErrorKind};

create_exception!(
    _native,
    Error,
    PyException,
    "A weightsmith failure; the message names the file, tensor or field."
);

fn to_py(e: CallError) -> PyErr {
    match e.kind {
        CallErrorKind::NotFound => PyFileNotFoundError::new_err(e.message),
        CallErrorKind::Interrupted => PyKeyboardInterrupt::new_err(e.message),
        CallErrorKind::Usage => PyValueError::new_err(e.message),
        CallErrorKind::Failed => Error::new_err(e.message),
    }
}

enum Event<T> {
    Progress(u64, u64, String),
    Done(Result<T, CallError>),
}

/// Runs `work` on a worker thread; this thread forwards progress to `progress` and turns a
/// Ctrl-C into `cancel` (the worker stops cleanly), re-raising it once the worker is done.
fn run_polling<T: Send + 'static>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    cancel: Arc<AtomicBool>,
    work: impl FnOnce(&mut dyn FnMut(u64, u64, &str)) -> Result<T, CallError> + Send + 'static,
) -> PyResult<T> {
    let (tx, rx) = channel::<Event<T>>();
    let worker = {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("weightsmith call".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                let result = work(&mut |done, total, what| {
                    // At most 20 progress events a second reach Python.
                    if last.elapsed() >= Duration::from_millis(50) || done == total {
                        last = std::time::Instant::now();
                        let _ = tx.send(Event::Progress(done, total, what.to_string()));
                    }
                });
                let _ = tx.send(Event::Done(result));
            })
            .map_err(|e| {
                Error::new_err(format!(
                    "cannot start a thread for the call: {e} (out of memory or of threads?)"
                ))
            })?
    };
    drop(tx);
    let rx = std::sync::Mutex::new(rx);
    let mut interrupted: Option<PyErr> = None;
    loop {
        let event = py.detach(|| match rx.lock() {
            Ok(r) => r.recv_timeout(Duration::from_millis(100)),
            Err(_) => Err(RecvTimeoutError::Disconnected),
        });
        match event {
            Ok(Event::Progress(done, total, what)) => {
                if let Some(cb) = &progress {
                    if let Err(e) = cb.call1(py, (done, total, what)) {
                        cancel.store(true, Ordering::Relaxed);
                        interrupted.get_or_insert(e);
                    }
                }
            }
            Ok(Event::Done(result)) => {
                let _ = worker.join();
                if let Some(e) = interrupted {
                    return Err(e);
                }
                return result.map_err(to_py);
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    cancel.store(true, Ordering::Relaxed);
                    interrupted.get_or_insert(e);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = worker.join();
                return Err(Error::new_err(
                    "the worker thread stopped without an answer",
                ));
            }
        }
    }
}

/// Runs a verb (`inspect`, `plan`, `merge`, `publish`) from its command-line flags and returns
/// the JSON document the CLI prints with `--json`.
///
/// Args:
///     argv: the verb and its flags, e.g. ``["plan", "fixtures/models/tiny-llama", "--devices", "8GiB"]``.
///     progress: called as ``progress(done_bytes, total_bytes, what)`` during a merge.
///
/// Returns:
///     str: the report, as JSON.
#[pyfunction]
#[pyo3(signature = (argv, progress=None))]
fn call(py: Python<'_>, argv: Vec<String>, progress: Option<Py<PyAny>>) -> PyResult<String> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    run_polling(py, progress, cancel, move |p| {
        weightsmith::cli::report_json(&argv, Some(flag), p)
    })
}

/// Runs the weightsmith command line (the `weightsmith` console script) and returns its exit
/// code.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| {
        let code = weightsmith::cli::main_with_args(argv);
        // ExitCode has no accessor: the CLI's codes are 0, 1, 2 (usage) and 130.
        if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            format!("{code:?}")
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(1)
        }
    })
}

// ---- DLPack (v0.8 ABI: DLManagedTensor in a "dltensor" capsule) ----

#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

/// What a capsule keeps alive: the model and the shape array.
struct Held {
    _model: Arc<Model>,
    _shape: Vec<i64>,
}

unsafe extern "C" fn delete_managed(m: *mut DlManagedTensor) {
    if m.is_null() {
        return;
    }
    // SAFETY: `m` and its manager_ctx were made by Box::into_raw in `__dlpack__`, and the
    // consumer calls the deleter once.
    unsafe {
        let managed = Box::from_raw(m);
        drop(Box::from_raw(managed.manager_ctx as *mut Held));
    }
}

const DLTENSOR: &CStr = c"dltensor";
const USED_DLTENSOR: &CStr = c"used_dltensor";

unsafe extern "C" fn capsule_destructor(capsule: *mut pyo3::ffi::PyObject) {
    // SAFETY: called by Python with the capsule being destroyed. A consumer that took the
    // tensor renamed it "used_dltensor" and owns the deleter call; otherwise we call it.
    unsafe {
        if pyo3::ffi::PyCapsule_IsValid(capsule, USED_DLTENSOR.as_ptr()) == 1 {
            return;
        }
        let p = pyo3::ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr()) as *mut DlManagedTensor;
        if p.is_null() {
            pyo3::ffi::PyErr_Clear();
            return;
        }
        if let Some(d) = (*p).deleter {
            d(p);
        }
    }
}

/// A loaded model, kept alive by its tensors.
struct Model(weightsmith::LoadedModel);

/// Loaded models not yet freed (a test sees memory come back when the tensors are dropped).
static LIVE_MODELS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Model {
    fn new(m: weightsmith::LoadedModel) -> Model {
        LIVE_MODELS.fetch_add(1, Ordering::Relaxed);
        Model(m)
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        LIVE_MODELS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many loaded models are still held (by tensors or capsules).
#[pyfunction]
fn live_models() -> usize {
    LIVE_MODELS.load(Ordering::Relaxed)
}

// SAFETY: the loaded model's buffers are host vectors or CUDA allocations owned by it; it is
// only read (pointers handed out) after the load, and freed once, when the last Arc goes.
unsafe impl Send for Model {}
// SAFETY: as above: nothing mutates the model after the load.
unsafe impl Sync for Model {}

/// One loaded tensor: DLPack-capable (``torch.from_dlpack(t)``, ``numpy.from_dlpack(t)``),
/// zero-copy, on the device the plan chose.
#[pyclass(module = "weightsmith._native", frozen)]
struct Tensor {
    model: Arc<Model>,
    index: usize,
}

fn dl_dtype(d: st_io::Dtype) -> Option<DlDataType> {
    use st_io::Dtype::*;
    let (code, bits) = match d {
        F32 => (2, 32),
        F16 => (2, 16),
        F64 => (2, 64),
        BF16 => (4, 16),
        I8 => (0, 8),
        I16 => (0, 16),
        I32 => (0, 32),
        I64 => (0, 64),
        U8 => (1, 8),
        U16 => (1, 16),
        U32 => (1, 32),
        U64 => (1, 64),
        BOOL => (6, 8),
        _ => return None,
    };
    Some(DlDataType {
        code,
        bits,
        lanes: 1,
    })
}

#[pymethods]
impl Tensor {
    #[getter]
    fn name(&self) -> String {
        self.model.0.tensors[self.index].name.clone()
    }

    #[getter]
    fn dtype(&self) -> String {
        self.model.0.tensors[self.index].dtype.to_string()
    }

    #[getter]
    fn shape(&self) -> Vec<u64> {
        self.model.0.tensors[self.index].shape.clone()
    }

    #[getter]
    fn device(&self) -> String {
        self.model.0.tensors[self.index].device.to_string()
    }

    /// The tensor's bytes, copied to the host (for dtypes numpy lacks, such as BF16).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let bytes = self.model.0.tensors[self.index]
            .buffer
            .read_back()
            .map_err(|e| Error::new_err(e.to_string()))?;
        Ok(pyo3::types::PyBytes::new(py, &bytes))
    }

    /// ``(device_type, device_id)``: ``(1, 0)`` for the host, ``(2, n)`` for cuda:n.
    fn __dlpack_device__(&self) -> (i32, i32) {
        match self.model.0.tensors[self.index].device {
            gpu_device::Host => (1, 0),
            gpu_device::Cuda(n) => (2, n as i32),
        }
    }

    /// A DLPack capsule of the tensor, no copy. The copies of the load are complete before
    /// `load` returns, so any stream may use it.
    #[pyo3(signature = (stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Py<PyAny>>,
        max_version: Option<Py<PyAny>>,
        dl_device: Option<Py<PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = (stream, max_version, dl_device);
        if copy == Some(true) {
            return Err(PyValueError::new_err(
                "weightsmith tensors are shared, not copied: copy=True is not supported",
            ));
        }
        let t = &self.model.0.tensors[self.index];
        let dtype = dl_dtype(t.dtype).ok_or_else(|| {
            Error::new_err(format!(
                "tensor \"{}\" is {}, which DLPack cannot describe",
                t.name, t.dtype
            ))
        })?;
        let data = match &t.buffer {
            weightsmith::load::Buffer::Host(v) => v.as_ptr() as *mut c_void,
            weightsmith::load::Buffer::Cuda(a) => a.device_ptr() as *mut c_void,
        };
        let mut held = Box::new(Held {
            _model: self.model.clone(),
            _shape: t.shape.iter().map(|&d| d as i64).collect(),
        });
        let device = match t.device {
            gpu_device::Host => DlDevice {
                device_type: 1,
                device_id: 0,
            },
            gpu_device::Cuda(n) => DlDevice {
                device_type: 2,
                device_id: n as i32,
            },
        };
        let managed = Box::new(DlManagedTensor {
            dl_tensor: DlTensor {
                data,
                device,
                ndim: t.shape.len() as i32,
                dtype,
                shape: held._shape.as_mut_ptr(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete_managed),
        });
        let managed = Box::into_raw(managed);
        // SAFETY: `managed` is a valid, owned DlManagedTensor; the capsule's destructor (or the
        // consumer, through the deleter) frees it and the Held box exactly once.
        unsafe {
            (*managed).manager_ctx = Box::into_raw(held) as *mut c_void;
            let capsule = pyo3::ffi::PyCapsule_New(
                managed as *mut c_void,
                DLTENSOR.as_ptr(),
                Some(capsule_destructor),
            );
            if capsule.is_null() {
                delete_managed(managed);
                return Err(PyErr::fetch(py));
            }
            Ok(Py::from_owned_ptr(py, capsule))
        }
    }

    fn __repr__(&self) -> String {
        let t = &self.model.0.tensors[self.index];
        format!(
            "Tensor({:?}, {}, {:?}, {})",
            t.name, t.dtype, t.shape, t.device
        )
    }
}

use weightsmith::gpu_mem::Device as gpu_device;

/// Loads a checkpoint from `load`'s command-line flags; returns the report (JSON) and the
/// tensors, in the checkpoint's order.
#[pyfunction]
#[pyo3(signature = (argv, progress=None, host_only=false))]
fn load(
    py: Python<'_>,
    argv: Vec<String>,
    progress: Option<Py<PyAny>>,
    host_only: bool,
) -> PyResult<(String, Vec<Tensor>)> {
    let cancel = Arc::new(AtomicBool::new(false));
    let model = run_polling(py, progress, cancel, move |p| {
        weightsmith::cli::load_from_args(&argv, host_only, p).map(|m| Arc::new(Model::new(m)))
    })?;
    let report = serde_json_string(&model.0.report)?;
    let tensors = (0..model.0.tensors.len())
        .map(|index| Tensor {
            model: model.clone(),
            index,
        })
        .collect();
    Ok((report, tensors))
}

fn serde_json_string<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| Error::new_err(e.to_string()))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(call, m)?)?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(live_models, m)?)?;
    m.add_class::<Tensor>()?;
    m.add("Error", m.py().get_type::<Error>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
