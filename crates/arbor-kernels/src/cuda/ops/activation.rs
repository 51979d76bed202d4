//! SwiGLU on the GPU (`kernels/activation.cu`); CPU reference [`crate::ops::swiglu()`].

use super::super::{Gpu, GpuError, LaunchConfig};
use super::{int_arg, launch_error, need_len, product};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// `out[r][j] = bf16(silu(gu[r][j]) · gu[r][inter + j])`: each row of `gu` holds `inter` gate
/// values then `inter` up values (as `Ffn::Dense` stacks them); `out` is `[rows × inter]`.
pub fn swiglu(
    gpu: &Gpu,
    gu: &CudaSlice<f32>,
    rows: usize,
    inter: usize,
    out: &mut CudaSlice<bf16>,
) -> Result<(), GpuError> {
    const OP: &str = "swiglu";
    if rows == 0 || inter == 0 {
        return Ok(());
    }
    let n = product(OP, "rows × inter", rows, inter)?;
    need_len(
        OP,
        "gate/up",
        gu.len(),
        product(OP, "rows × 2·inter", n, 2)?,
    )?;
    need_len(OP, "out", out.len(), n)?;
    let (rows_i, inter_i) = (int_arg(OP, "rows", rows)?, int_arg(OP, "inter", inter)?);
    let f = gpu.func("activation", "swiglu")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(gu).arg(&rows_i).arg(&inter_i).arg(out);
    // SAFETY: arguments match the kernel; lengths checked above.
    unsafe { b.launch(grid_stride(n)) }.map_err(launch_error(OP))?;
    Ok(())
}

/// A grid-stride launch over `n` elements: 256 threads a block, at most 65536 blocks.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
