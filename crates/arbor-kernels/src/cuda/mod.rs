//! The CUDA backend (feature `cuda`): device context, kernel compilation and the launch of
//! every op. Each op's launch wrapper sits in [`ops`] under the same name as its CPU reference
//! in [`crate::ops`], which the GPU tests compare it against.
//!
//! Nothing here needs CUDA at build time: the driver, NVRTC and cuBLASLt are loaded when a
//! [`Gpu`] is opened, and a missing piece is a [`GpuError`] saying what to install.

pub mod compile;
pub mod error;
pub mod find;
pub mod gemm;
mod gpu;
pub mod kv;
pub mod ops;

/// The cudarc version this backend is built on, for crates that hold device buffers.
pub use cudarc;
pub use error::GpuError;
pub use gpu::{Gpu, LaunchConfig};
pub use kv::GpuKvPool;
