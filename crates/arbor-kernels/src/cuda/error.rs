//! Errors of the CUDA backend; each names the problem and what to do about it.

use std::path::PathBuf;

/// An error from the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver (libcuda.so) was found: install the NVIDIA driver, or run with --device cpu")]
    NoDriver,
    #[error("there is no CUDA device {ordinal} ({count} found): pick another with --device cuda:N, or run with --device cpu")]
    NoDevice { ordinal: usize, count: usize },
    #[error("{name} has compute capability {major}.{minor}; arbor's CUDA kernels need 8.0 (Ampere) or newer: run with --device cpu")]
    OldGpu {
        name: String,
        major: i32,
        minor: i32,
    },
    #[error("NVRTC (libnvrtc.so.13 or .12), which compiles arbor's kernels at first use, was not found: install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc==13.0.*`, or set ARBOR_CUDA_LIB to the folder that holds it (searched: {})", show(searched))]
    NoNvrtc { searched: Vec<PathBuf> },
    #[error("cuBLASLt (libcublasLt.so.13 or .12) was not found: install the CUDA toolkit or `pip install nvidia-cublas`, or set ARBOR_CUDA_LIB to the folder that holds it (searched: {})", show(searched))]
    NoCublas { searched: Vec<PathBuf> },
    #[error("kernel file {kernel}.cu does not compile for {arch}:\n{log}")]
    Compile {
        kernel: String,
        arch: &'static str,
        log: String,
    },
    #[error("out of GPU memory: {what} needs {needed} bytes, {free} are free; lower --kv-cache-gb or use a smaller model")]
    OutOfMemory {
        what: String,
        needed: usize,
        free: usize,
    },
    #[error("CUDA error in {what}: {detail}")]
    Driver { what: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

fn show(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "the loader's path".into();
    }
    let dirs: Vec<String> = paths
        .iter()
        .filter_map(|p| p.parent().map(|d| d.display().to_string()))
        .fold(Vec::new(), |mut v, d| {
            if !v.contains(&d) {
                v.push(d);
            }
            v
        });
    dirs.join(", ")
}

impl GpuError {
    /// Wraps a driver error with what was being done.
    pub fn driver(what: impl Into<String>, e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver {
            what: what.into(),
            detail: format!("{e:?}"),
        }
    }
}
