//! bf16 GEMM through cuBLASLt: `out = x · wᵀ` for a Linear layer's weight `w`, bf16 inputs,
//! f32 accumulation and f32 output (`CUBLAS_COMPUTE_32F`; A/B `CUDA_R_16BF`, C/D
//! `CUDA_R_32F`). The CPU reference is [`crate::ops::matmul()`] on the bf16-rounded inputs.
//!
//! Row-major to cuBLASLt's column-major: a row-major `m × n` output is a column-major
//! `n × m` matrix, so cuBLASLt computes `D[n × m] = W · Xᵀ` with A = W (the row-major `n × k`
//! weight is a column-major `k × n` matrix, read transposed, lda = k), B = X (column-major
//! `k × m`, not transposed, ldb = k) and ldc = ldd = n.
//!
//! cudarc's safe cuBLASLt API only multiplies into the input type, so this calls its
//! `result` layer. The library is loaded at [`Gemm::new`]; its absence is
//! [`GpuError::NoCublas`], never a panic (cudarc panics if asked to load a missing library).

use super::error::GpuError;
use super::{find, Gpu};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// cuBLASLt workspace: NVIDIA recommends 32 MiB on Hopper (4 MiB suffice before it).
const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLASLt handle, its workspace and the plans (descriptors + chosen algorithm) made so
/// far, keyed by shape and pointer alignment. Create one per [`Gpu`]; it runs on the GPU's
/// stream, in order with the other ops.
pub struct Gemm {
    gpu: Arc<Gpu>,
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<PlanKey, Arc<Plan>>>,
}

// SAFETY: a cuBLASLt handle may be used from any thread (calls are serialised on the one
// stream); the plans are only read after creation.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    /// Alignment in bytes (≤ 256) of the x, w and out pointers.
    align: [u32; 3],
}

/// Descriptors and algorithm of one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain host objects, read-only after creation.
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by `Gemm::plan` (null: not made) and is
        // destroyed once here; errors on teardown leave nothing to do.
        unsafe {
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

fn cublas_err(what: &str, e: result::CublasError) -> GpuError {
    GpuError::Driver {
        what: format!("cuBLASLt {what}"),
        detail: format!("{e:?}"),
    }
}

impl Gemm {
    /// Loads cuBLASLt (a clear [`GpuError::NoCublas`] if it is missing), creates a handle and
    /// allocates the workspace.
    pub fn new(gpu: &Arc<Gpu>) -> Result<Self, GpuError> {
        if !find::cublaslt_available() {
            let searched = find::preload_cublaslt().clone().err().unwrap_or_default();
            return Err(GpuError::NoCublas { searched });
        }
        gpu.context()
            .bind_to_thread()
            .map_err(|e| GpuError::driver("binding the context for cuBLASLt", e))?;
        let handle = result::create_handle().map_err(|e| cublas_err("handle creation", e))?;
        let workspace = match gpu.zeros::<u8>(WORKSPACE_BYTES, "the cuBLASLt workspace") {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: the handle was just created and is not used elsewhere.
                unsafe {
                    let _ = result::destroy_handle(handle);
                }
                return Err(e);
            }
        };
        Ok(Gemm {
            gpu: gpu.clone(),
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// `out[..m × n] = x · wᵀ`: `x` is `m × k` row-major bf16, `w` is `n × k` row-major bf16
    /// (a Linear weight), `out` is `m × n` row-major f32. Buffers may be longer than needed;
    /// only the first rows are read and written. `m == 0` does nothing.
    pub fn matmul_bt(
        &self,
        x: &CudaSlice<bf16>,
        m: usize,
        w: &CudaSlice<bf16>,
        n: usize,
        k: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.run(x, m, w, n, k, out, 0.0)
    }

    /// `out[..m × n] += x · wᵀ` (shapes as [`Gemm::matmul_bt`]), e.g. a projection added
    /// onto the residual stream in place.
    pub fn matmul_bt_acc(
        &self,
        x: &CudaSlice<bf16>,
        m: usize,
        w: &CudaSlice<bf16>,
        n: usize,
        k: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.run(x, m, w, n, k, out, 1.0)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        x: &CudaSlice<bf16>,
        m: usize,
        w: &CudaSlice<bf16>,
        n: usize,
        k: usize,
        out: &mut CudaSlice<f32>,
        beta: f32,
    ) -> Result<(), GpuError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let need = |a: usize, b: usize| a.checked_mul(b).filter(|&v| v <= i64::MAX as usize);
        let fits =
            |len: usize, rows: usize, cols: usize| need(rows, cols).is_some_and(|v| v <= len);
        if k == 0 || !fits(x.len(), m, k) || !fits(w.len(), n, k) || !fits(out.len(), m, n) {
            return Err(GpuError::Invalid(format!(
                "matmul_bt: m={m} n={n} k={k} need x ≥ m·k, w ≥ n·k, out ≥ m·n elements \
                 (have {}, {}, {}; k must be positive)",
                x.len(),
                w.len(),
                out.len()
            )));
        }
        let stream = self.gpu.stream();
        self.gpu
            .context()
            .bind_to_thread()
            .map_err(|e| GpuError::driver("binding the context for cuBLASLt", e))?;
        let (xp, _rx) = x.device_ptr(stream);
        let (wp, _rw) = w.device_ptr(stream);
        let (op, _ro) = out.device_ptr_mut(stream);
        let (wsp, _rws) = self.workspace.device_ptr(stream);
        let align = |p: u64| 1u32 << p.trailing_zeros().min(8);
        let key = PlanKey {
            m,
            n,
            k,
            align: [align(xp), align(wp), align(op)],
        };
        let plan = self.plan(key)?;
        let alpha = 1.0f32;
        // SAFETY: the plan's layouts describe buffers checked above to be large enough; the
        // pointers stay valid while their guards live; C = D in place is allowed by cuBLASLt
        // when both have the same layout.
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                wp as *const c_void,
                plan.a,
                xp as *const c_void,
                plan.b,
                op as *const c_void,
                plan.c,
                op as *mut c_void,
                plan.c,
                &plan.algo,
                wsp as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| cublas_err(&format!("matmul ({m}×{k} · ({n}×{k})ᵀ)"), e))
    }

    /// The plan of `key`, made on first use: descriptors and cuBLASLt's heuristic choice.
    fn plan(&self, key: PlanKey) -> Result<Arc<Plan>, GpuError> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = plans.get(&key) {
            return Ok(p.clone());
        }
        let PlanKey { m, n, k, align } = key;
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| cublas_err("matmul descriptor", e))?;
        // Built field by field so that Drop frees whatever was made if a later step fails.
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: a plain-data struct; overwritten by the heuristic's choice below.
            algo: unsafe { std::mem::zeroed() },
        };
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        plan.a = result::create_matrix_layout(bf, k64, n64, k as i64)
            .map_err(|e| cublas_err("layout of w", e))?;
        plan.b = result::create_matrix_layout(bf, k64, m64, k as i64)
            .map_err(|e| cublas_err("layout of x", e))?;
        plan.c = result::create_matrix_layout(sys::cudaDataType_t::CUDA_R_32F, n64, m64, n as i64)
            .map_err(|e| cublas_err("layout of out", e))?;
        let (trans, no_trans) = (1i32, 0i32); // CUBLAS_OP_T, CUBLAS_OP_N
        let set_desc = |attr, v: &i32| {
            // SAFETY: the descriptor is live; the attribute takes a 32-bit cublasOperation_t.
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    v as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(|e| cublas_err("setting a transpose", e))
        };
        use sys::cublasLtMatmulDescAttributes_t as D;
        set_desc(D::CUBLASLT_MATMUL_DESC_TRANSA, &trans)?;
        set_desc(D::CUBLASLT_MATMUL_DESC_TRANSB, &no_trans)?;

        let pref = Pref(result::create_matmul_pref().map_err(|e| cublas_err("preference", e))?);
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let ws = WORKSPACE_BYTES as u64;
        let (ax, aw, ao) = (align[0], align[1], align[2]);
        for (attr, v) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aw),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ax),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ao),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ao),
        ] {
            // SAFETY: the preference is live; alignments are uint32 attributes.
            unsafe {
                result::set_matmul_pref_attribute(
                    pref.0,
                    attr,
                    v as *const u32 as *const c_void,
                    std::mem::size_of::<u32>(),
                )
            }
            .map_err(|e| cublas_err("setting an alignment", e))?;
        }
        // SAFETY: as above; the workspace limit is a uint64 attribute.
        unsafe {
            result::set_matmul_pref_attribute(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
        }
        .map_err(|e| cublas_err("setting the workspace size", e))?;
        // SAFETY: every descriptor passed is live.
        let heuristic = unsafe {
            result::get_matmul_algo_heuristic(
                self.handle,
                plan.desc,
                plan.a,
                plan.b,
                plan.c,
                plan.c,
                pref.0,
            )
        }
        .map_err(|e| cublas_err(&format!("algorithm choice for m={m} n={n} k={k}"), e))?;
        plan.algo = heuristic.algo;
        let plan = Arc::new(plan);
        plans.insert(key, plan.clone());
        Ok(plan)
    }
}

/// A matmul preference, freed on drop.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        unsafe {
            let _ = result::destroy_matmul_pref(self.0);
        }
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // Plans first: their descriptors outlive no handle they were used with.
        self.plans.lock().unwrap_or_else(|p| p.into_inner()).clear();
        // SAFETY: the handle was created in `new` and is destroyed once, after the stream
        // finished the matmuls that use the workspace (synchronised here).
        let _ = self.gpu.synchronize();
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}
