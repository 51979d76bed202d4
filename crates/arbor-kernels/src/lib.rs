//! arbor-kernels: the device layer.
//!
//! Nothing here knows about models. It holds:
//! - [`Device`], [`DType`] and a small host [`Tensor`];
//! - [`quant`]: GGML block formats (dequantisation, activation quantisation, dot products);
//! - [`weight::Weight`]: a matrix kept in its stored format (f32, f16, bf16 or quantised blocks);
//! - [`ops`]: every op, one file each, with the CPU reference implementation;
//! - [`kv`]: the paged KV pool, its block allocator and block tables;
//! - `cuda` (feature `cuda`, on by default): the GPU backend, loaded at run time.

pub mod cache;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod kv;
pub mod ops;
pub mod quant;
pub mod tensor;
pub mod weight;

pub use device::{DType, Device};
pub use error::KernelError;
pub use tensor::Tensor;
pub use weight::{Weight, WeightData};
