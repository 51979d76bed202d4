//! RMSNorm (plain and fused with the residual add), a plain residual add and a row gather on
//! the GPU (`kernels/norm.cu`); CPU references [`crate::ops::rms_norm`],
//! [`crate::ops::add_rms_norm`].

use super::super::{Gpu, GpuError};
use super::activation::grid_stride;
use super::{int_arg, launch_error, need_len, product, row_blocks};
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use half::bf16;

/// One block of this many threads per row.
const THREADS: u32 = 256;

/// Checks the shared arguments of the norms: `x` (and `out`) hold `rows × hidden` values,
/// `w` holds `hidden`; returns the kernel's `rows` and `hidden`.
fn norm_args(
    op: &str,
    rows: usize,
    hidden: usize,
    x: usize,
    w: usize,
    out: usize,
) -> Result<(i32, i32), GpuError> {
    let n = product(op, "rows × hidden", rows, hidden)?;
    need_len(op, "x", x, n)?;
    need_len(op, "weight", w, hidden)?;
    need_len(op, "out", out, n)?;
    Ok((int_arg(op, "rows", rows)?, int_arg(op, "hidden", hidden)?))
}

/// `out[r] = bf16(x[r] / sqrt(mean(x[r]²) + eps) · w)` for the first `rows` rows of `hidden`
/// values.
pub fn rms_norm(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    eps: f32,
    rows: usize,
    hidden: usize,
    out: &mut CudaSlice<bf16>,
) -> Result<(), GpuError> {
    const OP: &str = "rms_norm";
    if rows == 0 || hidden == 0 {
        return Ok(());
    }
    let (rows_i, hidden_i) = norm_args(OP, rows, hidden, x.len(), w.len(), out.len())?;
    let f = gpu.func("norm", "rms_norm")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x)
        .arg(w)
        .arg(&eps)
        .arg(&rows_i)
        .arg(&hidden_i)
        .arg(out);
    // SAFETY: arguments match the kernel; lengths checked above.
    unsafe { b.launch(row_blocks(rows, THREADS)) }.map_err(launch_error(OP))?;
    Ok(())
}

/// `x[r] += delta[r]` (in place, f32), then `out[r] = bf16(rms_norm(x[r]) · w)`, for the first
/// `rows` rows of `hidden` values: the residual add fused with the next layer's norm.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    delta: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    eps: f32,
    rows: usize,
    hidden: usize,
    out: &mut CudaSlice<bf16>,
) -> Result<(), GpuError> {
    const OP: &str = "add_rms_norm";
    if rows == 0 || hidden == 0 {
        return Ok(());
    }
    let (rows_i, hidden_i) = norm_args(OP, rows, hidden, x.len(), w.len(), out.len())?;
    need_len(OP, "delta", delta.len(), rows * hidden)?;
    let f = gpu.func("norm", "add_rms_norm")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x)
        .arg(delta)
        .arg(w)
        .arg(&eps)
        .arg(&rows_i)
        .arg(&hidden_i)
        .arg(out);
    // SAFETY: arguments match the kernel; lengths checked above.
    unsafe { b.launch(row_blocks(rows, THREADS)) }.map_err(launch_error(OP))?;
    Ok(())
}

/// `x[i] += delta[i]` for `i < n` (in place, f32): a residual add with no norm after it (the
/// last layer's, whose output norm runs on the logit rows only). The grid depends on `n` alone.
pub fn add_inplace(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    delta: &CudaSlice<f32>,
    n: usize,
) -> Result<(), GpuError> {
    const OP: &str = "add_inplace";
    if n == 0 {
        return Ok(());
    }
    need_len(OP, "x", x.len(), n)?;
    need_len(OP, "delta", delta.len(), n)?;
    let n64 = n as u64;
    let f = gpu.func("norm", "add_inplace")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(delta).arg(&n64);
    // SAFETY: arguments match the kernel; lengths checked above.
    unsafe { b.launch(grid_stride(n)) }.map_err(launch_error(OP))?;
    Ok(())
}

/// `out[i] = x[idx[i]]` for `i < n`, rows of `width` f32 (e.g. the rows whose logits are
/// wanted); `idx` is a whole buffer or a view of one. An index beyond the rows `x` holds gives
/// a row of zeros.
pub fn gather_rows<I: DevicePtr<u32>>(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    width: usize,
    idx: &I,
    n: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    const OP: &str = "gather_rows";
    if n == 0 || width == 0 {
        return Ok(());
    }
    need_len(OP, "idx", idx.len(), n)?;
    need_len(OP, "out", out.len(), product(OP, "n × width", n, width)?)?;
    let src_rows = int_arg(OP, "rows of x", (x.len() / width).min(i32::MAX as usize))?;
    let (width_i, n_i) = (int_arg(OP, "width", width)?, int_arg(OP, "n", n)?);
    let f = gpu.func("norm", "gather_rows")?;
    let stream = gpu.stream();
    let (idx_p, _idx_guard) = idx.device_ptr(stream);
    let mut b = stream.launch_builder(&f);
    b.arg(x)
        .arg(&width_i)
        .arg(&src_rows)
        .arg(&idx_p)
        .arg(&n_i)
        .arg(out);
    // SAFETY: arguments match the kernel; the kernel reads only rows below `src_rows`.
    unsafe { b.launch(row_blocks(n, THREADS)) }.map_err(launch_error(OP))?;
    Ok(())
}
