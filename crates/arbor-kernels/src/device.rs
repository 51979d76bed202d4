//! Where tensors live and what element types they hold.

use std::fmt;

/// A compute device. The CPU is always available; CUDA devices come with the `cuda` feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Device {
    /// Bytes of memory free for new allocations on this device: `MemAvailable` of
    /// /proc/meminfo on the CPU, the driver's free memory on a GPU. `None` when it cannot be
    /// told (another OS, no such GPU, or a build without the CUDA backend).
    pub fn available_memory(self) -> Option<u64> {
        match self {
            Device::Cpu => {
                let info = std::fs::read_to_string("/proc/meminfo").ok()?;
                parse_mem_available(&info)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::cuda::Gpu::open(i)
                .ok()?
                .mem_info()
                .ok()
                .map(|(free, _)| free as u64),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => None,
        }
    }
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn parse_mem_available(info: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': use cpu, cuda or cuda:N")),
        }
    }
}

/// Floating-point element types of activations and unquantised weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let info = "MemTotal:       24576000 kB\nMemFree: 100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(info), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
    }
}
