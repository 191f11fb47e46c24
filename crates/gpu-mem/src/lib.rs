//! `gpu-mem`: the only weightsmith crate that talks to CUDA.
//!
//! Its job (issue "gpu-mem and loading"): device discovery, memory information, allocations
//! with accounting, pinned staging, host-registered mmap regions, streams and async copies,
//! through `cudarc` loaded at run time so a binary starts on a machine with no NVIDIA driver.
//!
//! Today it holds only the device vocabulary shared by the other crates; no CUDA call is made
//! yet. It deliberately never decides placement (that is `planner`) nor parses files (`st-io`).

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

/// The errors of `gpu-mem`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("unknown device \"{name}\": expected host, cpu or cuda:N")]
    BadDeviceName { name: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_round_trip() {
        for d in [Device::Host, Device::Cuda(0), Device::Cuda(7)] {
            assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        }
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Host);
        let e = "gpu0".parse::<Device>().unwrap_err().to_string();
        assert_eq!(e, "unknown device \"gpu0\": expected host, cpu or cuda:N");
    }
}
