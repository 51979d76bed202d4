//! Errors raised by kernels and the KV pool.

/// An error from the device layer. Each variant says what went wrong and, where it can, what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("unsupported tensor type {0}: arbor reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K..Q6_K")]
    UnsupportedType(String),
    #[error("data for {ty} has {got} bytes, expected {expected}")]
    DataSize {
        ty: String,
        got: usize,
        expected: usize,
    },
    #[error("KV cache is full: {needed} more pages needed, {free} free of {total}; raise --kv-cache-gb or shorten the request")]
    KvFull {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("{0}")]
    Invalid(String),
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Gpu(#[from] crate::cuda::GpuError),
}
