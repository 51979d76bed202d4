//! Launch wrappers, one file per op family (as `kernels/*.cu` and the CPU references in
//! [`crate::ops`]). Buffers are whole device allocations; each wrapper reads and writes only
//! the first `rows × width` elements it is told of, so buffers sized for the largest batch
//! serve every step.

pub mod activation;
pub mod attention;
pub mod cascade;
pub mod embedding;
pub mod kv;
pub mod moe;
pub mod norm;
pub mod qkv;
pub mod sample;
pub mod sparse;

// Shared argument checks of the launch wrappers (activation, attention, embedding, kv, norm,
// qkv): every bad shape is a `GpuError::Invalid` naming the op and the sizes, never a panic.

/// `v` as a kernel's `int` argument.
pub(crate) fn int_arg(op: &str, what: &str, v: usize) -> Result<i32, super::GpuError> {
    i32::try_from(v).map_err(|_| {
        super::GpuError::Invalid(format!("{op}: {what} = {v} does not fit a kernel's int"))
    })
}

/// `a × b`, or an error when it overflows.
pub(crate) fn product(op: &str, what: &str, a: usize, b: usize) -> Result<usize, super::GpuError> {
    a.checked_mul(b)
        .ok_or_else(|| super::GpuError::Invalid(format!("{op}: {what} = {a} × {b} overflows")))
}

/// Checks that buffer `what` holds at least `need` elements.
pub(crate) fn need_len(
    op: &str,
    what: &str,
    have: usize,
    need: usize,
) -> Result<(), super::GpuError> {
    if have < need {
        return Err(super::GpuError::Invalid(format!(
            "{op}: {what} holds {have} elements, {need} are needed"
        )));
    }
    Ok(())
}

/// One block of `threads` threads per row, `rows` blocks (1-D; no dynamic shared memory).
pub(crate) fn row_blocks(rows: usize, threads: u32) -> super::LaunchConfig {
    super::LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Maps a failed kernel launch to an error naming the op.
pub(crate) fn launch_error(
    op: &str,
) -> impl FnOnce(cudarc::driver::DriverError) -> super::GpuError + '_ {
    move |e| super::GpuError::driver(format!("launching {op}"), e)
}
