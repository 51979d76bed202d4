//! One GPU: its context, the stream every op runs on, and the kernels loaded so far.

use super::compile;
use super::error::GpuError;
use super::find;
pub use cudarc::driver::LaunchConfig;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An opened GPU. Every op of the backend is enqueued on [`Gpu::stream`], so they run in
/// order without host synchronisation; reading a result back ([`Gpu::download`]) waits.
pub struct Gpu {
    pub ordinal: usize,
    /// Device name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    /// The architecture NVRTC compiles for.
    pub arch: &'static str,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(String, String), CudaFunction>>,
}

impl Gpu {
    /// Opens device `ordinal`: a clear error when there is no driver, no such device, or a
    /// GPU older than Ampere.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, GpuError> {
        if !find::driver_available() {
            return Err(GpuError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(|e| GpuError::driver("cuInit", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(GpuError::NoDevice {
                ordinal,
                count: count.max(0) as usize,
            });
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| GpuError::driver("opening the device", e))?;
        let name = ctx.name().unwrap_or_else(|_| format!("cuda:{ordinal}"));
        let capability = ctx
            .compute_capability()
            .map_err(|e| GpuError::driver("reading the compute capability", e))?;
        let arch = match capability {
            (8, 0) => "sm_80",
            (8, 6) => "sm_86",
            (8, 7) => "sm_87",
            (8, 9) => "sm_89",
            (9, 0) => "sm_90",
            (major, minor) if major < 8 => {
                return Err(GpuError::OldGpu { name, major, minor });
            }
            (8, _) => "sm_80",
            // Newer GPUs run sm_90 PTX through the driver's JIT.
            _ => "compute_90",
        };
        let stream = ctx.default_stream();
        Ok(Arc::new(Gpu {
            ordinal,
            name,
            capability,
            arch,
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        }))
    }

    /// The stream every op is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Kernel `kernel` of file `kernels/{file}.cu`, loading the file on first use: build-time
    /// PTX if the driver accepts it, else NVRTC (cached on disk).
    pub fn func(&self, file: &str, kernel: &str) -> Result<CudaFunction, GpuError> {
        let key = (file.to_string(), kernel.to_string());
        if let Some(f) = lock(&self.functions).get(&key) {
            return Ok(f.clone());
        }
        let module = self.module(file)?;
        let f = module
            .load_function(kernel)
            .map_err(|e| GpuError::driver(format!("loading kernel {kernel} of {file}.cu"), e))?;
        lock(&self.functions).insert(key, f.clone());
        Ok(f)
    }

    fn module(&self, file: &str) -> Result<Arc<CudaModule>, GpuError> {
        if let Some(m) = lock(&self.modules).get(file) {
            return Ok(m.clone());
        }
        let prebuilt = compile::prebuilt_ptx(file)
            .and_then(|ptx| self.ctx.load_module(Ptx::from_src(ptx)).ok());
        let module = match prebuilt {
            Some(m) => m,
            None => {
                let ptx = compile::ptx_cached(file, self.arch)?;
                self.ctx
                    .load_module(Ptx::from_src(ptx))
                    .map_err(|e| GpuError::driver(format!("loading {file}.cu"), e))?
            }
        };
        lock(&self.modules).insert(file.to_string(), module.clone());
        Ok(module)
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(usize, usize), GpuError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| GpuError::driver("reading free memory", e))
    }

    /// `n` zeroed elements on the device; an out-of-memory error names `what` and the free
    /// memory.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
        what: &str,
    ) -> Result<CudaSlice<T>, GpuError> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| self.alloc_error(e, n * std::mem::size_of::<T>(), what))
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T], what: &str) -> Result<CudaSlice<T>, GpuError> {
        if host.is_empty() {
            // cudarc cannot allocate zero bytes; a one-element buffer stands in.
            // SAFETY: the element is never read (the logical length is zero).
            return unsafe { self.stream.alloc::<T>(1) }.map_err(|e| self.alloc_error(e, 0, what));
        }
        self.stream
            .clone_htod(host)
            .map_err(|e| self.alloc_error(e, std::mem::size_of_val(host), what))
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
        what: &str,
    ) -> Result<Vec<T>, GpuError> {
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| GpuError::driver(format!("reading back {what}"), e))
    }

    /// Waits for every op enqueued so far.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream
            .synchronize()
            .map_err(|e| GpuError::driver("synchronising the stream", e))
    }

    fn alloc_error(&self, e: cudarc::driver::DriverError, needed: usize, what: &str) -> GpuError {
        use cudarc::driver::sys::CUresult;
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            GpuError::OutOfMemory {
                what: what.to_string(),
                needed,
                free: self.mem_info().map(|(f, _)| f).unwrap_or(0),
            }
        } else {
            GpuError::driver(format!("allocating {what}"), e)
        }
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the maps stay
/// consistent: entries are inserted whole).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
