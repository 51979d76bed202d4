//! One GPU: its context, the stream every op runs on, and the kernels loaded so far.

use super::compile;
use super::error::GpuError;
use super::find;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
pub use cudarc::driver::LaunchConfig;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// An opened GPU. Every op of the backend is enqueued on [`Gpu::stream`], so they run in
/// order without host synchronisation; reading a result back ([`Gpu::download`]) waits.
///
/// The stream is a stream of its own (CUDA graphs cannot be captured on the legacy default
/// stream), and cudarc's per-buffer event tracking is off: with one stream there is nothing
/// to track, and its event waits and records would break a capture.
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
    /// Between [`Gpu::begin_capture`] and [`Gpu::end_capture`]: allocations, copies and
    /// synchronisation are refused (they would invalidate the capture).
    capturing: AtomicBool,
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
        // SAFETY: before any buffer or stream of this context object exists. Every buffer of
        // the backend is used on `stream` alone, so stream order is all the synchronisation
        // there is to have; without this, the second stream below would make cudarc wait on
        // and record per-buffer events around every launch, which a capture cannot contain.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| GpuError::driver("creating a stream", e))?;
        Ok(Arc::new(Gpu {
            ordinal,
            name,
            capability,
            arch,
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            capturing: AtomicBool::new(false),
        }))
    }

    /// Starts capturing the stream's work into a CUDA graph (thread-local mode: only this
    /// thread's unsafe calls break it). Until [`Gpu::end_capture`] nothing runs, and
    /// [`Gpu::zeros`], [`Gpu::upload`], [`Gpu::upload_into`], [`Gpu::download`] and
    /// [`Gpu::synchronize`] fail with [`GpuError::Invalid`] instead of invalidating the
    /// capture. Kernels to be captured must have been loaded ([`Gpu::func`]) before, and no
    /// other thread may enqueue work on this GPU's stream meanwhile (it would be captured).
    pub fn begin_capture(&self) -> Result<(), GpuError> {
        if self.capturing.swap(true, Ordering::AcqRel) {
            return Err(GpuError::Invalid(
                "a CUDA graph capture is already under way".into(),
            ));
        }
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| {
                self.capturing.store(false, Ordering::Release);
                GpuError::driver("starting a CUDA graph capture", e)
            })
    }

    /// Ends the capture [`Gpu::begin_capture`] started and instantiates the graph, to be run
    /// with `CudaGraph::launch` on this stream. Always leaves capture mode, also on error (a
    /// capture that an illegal call invalidated fails here).
    pub fn end_capture(&self) -> Result<CudaGraph, GpuError> {
        if !self.capturing.load(Ordering::Acquire) {
            return Err(GpuError::Invalid(
                "no CUDA graph capture is under way".into(),
            ));
        }
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        self.capturing.store(false, Ordering::Release);
        graph
            .map_err(|e| GpuError::driver("capturing a CUDA graph", e))?
            .ok_or_else(|| GpuError::Invalid("the CUDA graph capture recorded no work".into()))
    }

    /// Whether a capture is under way ([`Gpu::begin_capture`]).
    pub fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    fn refuse_in_capture(&self, what: &str) -> Result<(), GpuError> {
        if self.capturing() {
            return Err(GpuError::Invalid(format!(
                "{what} inside a CUDA graph capture (it would invalidate the capture)"
            )));
        }
        Ok(())
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
        self.refuse_in_capture(&format!("allocating {what}"))?;
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| self.alloc_error(e, n * std::mem::size_of::<T>(), what))
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T], what: &str) -> Result<CudaSlice<T>, GpuError> {
        self.refuse_in_capture(&format!("uploading {what}"))?;
        if host.is_empty() {
            // cudarc cannot allocate zero bytes; a one-element buffer stands in.
            // SAFETY: the element is never read (the logical length is zero).
            return unsafe { self.stream.alloc::<T>(1) }.map_err(|e| self.alloc_error(e, 0, what));
        }
        self.stream
            .clone_htod(host)
            .map_err(|e| self.alloc_error(e, std::mem::size_of_val(host), what))
    }

    /// Copies `host` into the first `host.len()` elements of `dev`, in stream order: one copy,
    /// no allocation (e.g. a step's metadata into a buffer that CUDA graphs read).
    pub fn upload_into<T: DeviceRepr>(
        &self,
        host: &[T],
        dev: &mut CudaSlice<T>,
        what: &str,
    ) -> Result<(), GpuError> {
        self.refuse_in_capture(&format!("uploading {what}"))?;
        if host.is_empty() {
            return Ok(());
        }
        if host.len() > dev.len() {
            return Err(GpuError::Invalid(format!(
                "uploading {what}: {} elements into a buffer of {}",
                host.len(),
                dev.len()
            )));
        }
        self.stream
            .memcpy_htod(host, &mut dev.slice_mut(..host.len()))
            .map_err(|e| GpuError::driver(format!("uploading {what}"), e))
    }

    /// Copies a device buffer, or a view of one, back (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone, S: DevicePtr<T>>(
        &self,
        dev: &S,
        what: &str,
    ) -> Result<Vec<T>, GpuError> {
        self.refuse_in_capture(&format!("reading back {what}"))?;
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| GpuError::driver(format!("reading back {what}"), e))
    }

    /// Waits for every op enqueued so far.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.refuse_in_capture("synchronising the stream")?;
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
