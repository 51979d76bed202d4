//! Token embedding gather on the GPU (`kernels/embedding.cu`); CPU reference
//! [`crate::ops::embedding()`].

use super::super::{Gpu, GpuError};
use super::{int_arg, launch_error, need_len, product, row_blocks};
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use half::bf16;

const OP: &str = "embedding";

/// `out[r] = table[tokens[r]]` as f32 for `r < rows`; `table` is `[vocab × hidden]` bf16 with
/// `vocab = table.len() / hidden`. A token id outside the vocabulary gives a row of zeros (the
/// ids are on the device, so they are not checked here: check them on the host first).
/// `tokens` is a whole buffer or a view of one.
pub fn embedding<T: DevicePtr<u32>>(
    gpu: &Gpu,
    table: &CudaSlice<bf16>,
    hidden: usize,
    tokens: &T,
    rows: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    if rows == 0 || hidden == 0 {
        return Ok(());
    }
    need_len(OP, "tokens", tokens.len(), rows)?;
    need_len(
        OP,
        "out",
        out.len(),
        product(OP, "rows × hidden", rows, hidden)?,
    )?;
    let vocab = table.len() / hidden;
    let (rows_i, hidden_i, vocab_i) = (
        int_arg(OP, "rows", rows)?,
        int_arg(OP, "hidden", hidden)?,
        int_arg(OP, "vocab", vocab)?,
    );
    let f = gpu.func("embedding", "embedding")?;
    let stream = gpu.stream();
    let (tokens_p, _tokens_guard) = tokens.device_ptr(stream);
    let mut b = stream.launch_builder(&f);
    b.arg(table)
        .arg(&tokens_p)
        .arg(&rows_i)
        .arg(&hidden_i)
        .arg(&vocab_i)
        .arg(out);
    // SAFETY: the argument list matches the kernel's signature; every index the kernel
    // touches is below the lengths checked above.
    unsafe { b.launch(row_blocks(rows, 256)) }.map_err(launch_error(OP))?;
    Ok(())
}
