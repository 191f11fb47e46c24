//! `gpu-mem`: the only weightsmith crate that talks to CUDA.
//!
//! Device discovery ([`discover`]), memory information, allocations, pinned staging buffers,
//! host-registered regions of mapped files, streams, async copies, PTX modules and kernel
//! launches, and the upload engine ([`upload`]), through `cudarc` loaded
//! at run time: a binary that links this crate starts and runs on a machine with no NVIDIA
//! driver, where [`Device::Host`] is the one device. `is_culib_present` is checked before any
//! other CUDA call. All `unsafe` code lives in [`cuda`]; the rest of the workspace uses its
//! owning types. It deliberately never decides placement (`planner`) nor parses files (`st-io`).

pub mod cuda;
pub mod upload;

use std::fmt;

/// Where memory lives: the host, or a CUDA device by ordinal. "No driver" is an ordinary
/// value: the host device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    Host,
    Cuda(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Host => f.write_str("host"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Device, Error> {
        match s {
            "host" | "cpu" => Ok(Device::Host),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| Error::BadDeviceName {
                    name: s.to_string(),
                }),
        }
    }
}

/// A GPU found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device: Device,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// The GPUs of this machine with their free memory; empty with no driver (never an error).
pub fn discover() -> Result<Vec<DeviceInfo>, Error> {
    let n = cuda::device_count();
    let mut out = Vec::with_capacity(n);
    for i in 0..n as u32 {
        let ctx = cuda::Context::new(i)?;
        let (free_bytes, total_bytes) = ctx.mem_info()?;
        out.push(DeviceInfo {
            device: Device::Cuda(i),
            name: ctx.name()?,
            compute_capability: ctx.compute_capability()?,
            total_bytes,
            free_bytes,
        });
    }
    Ok(out)
}

/// The errors of `gpu-mem`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unknown device \"{name}\": expected host, cpu or cuda:N")]
    BadDeviceName { name: String },
    #[error("no NVIDIA driver (libcuda) on this machine")]
    NoDriver,
    #[error("CUDA {call} failed: {code}")]
    Cuda { call: &'static str, code: String },
    #[error("read at file offset {offset} failed: {message}")]
    Read { offset: u64, message: String },
    #[error("cannot allocate {} of host memory", format_bytes(*bytes))]
    HostAlloc { bytes: u64 },
    /// `cuMemAlloc` refused: `code` is the driver's (`CUDA_ERROR_OUT_OF_MEMORY` when the
    /// device has too little free memory, perhaps because another process took it).
    #[error("cannot allocate {} of device memory: {code}", format_bytes(*bytes))]
    DeviceAlloc { bytes: u64, code: String },
    #[error("cannot start a thread for {what}: {message} (out of memory or of threads?)")]
    Thread { what: &'static str, message: String },
    #[error("copy of {len} bytes at offset {offset} runs past a {size}-byte allocation")]
    OutOfBounds {
        offset: usize,
        len: usize,
        size: usize,
    },
}

/// `1.50 GiB`, `16.00 MiB`, `512 bytes`: small requests are not rounded to `0.02 GiB`.
pub fn format_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_keep_their_precision() {
        assert_eq!(format_bytes(3 << 29), "1.50 GiB");
        assert_eq!(format_bytes(16 << 20), "16.00 MiB");
        assert_eq!(format_bytes(512), "512 bytes");
    }

    #[test]
    fn device_names_round_trip() {
        for d in [Device::Host, Device::Cuda(0), Device::Cuda(7)] {
            assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        }
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Host);
        let e = "gpu0".parse::<Device>().unwrap_err().to_string();
        assert_eq!(e, "unknown device \"gpu0\": expected host, cpu or cuda:N");
    }

    #[test]
    fn discovery_without_a_driver_is_empty_not_a_panic() {
        // Evidence from outside the driver: without the NVIDIA control device no GPU can be
        // found; with WEIGHTSMITH_REQUIRE_GPU (scripts/gpu-check.sh) at least one must be.
        let found = discover().unwrap();
        if !std::path::Path::new("/dev/nvidiactl").exists() {
            assert!(found.is_empty(), "no /dev/nvidiactl, yet found {found:?}");
        }
        if std::env::var_os("WEIGHTSMITH_REQUIRE_GPU").is_some() {
            assert!(
                !found.is_empty(),
                "WEIGHTSMITH_REQUIRE_GPU is set, but no GPU was found"
            );
        }
        for (i, d) in found.iter().enumerate() {
            assert_eq!(d.device, Device::Cuda(i as u32), "{found:?}");
            assert!(!d.name.is_empty());
        }
        for d in &found {
            assert!(d.free_bytes <= d.total_bytes && d.total_bytes > 0);
        }
    }
}
