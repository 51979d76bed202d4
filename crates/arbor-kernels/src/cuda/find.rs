//! Finding the CUDA libraries and headers arbor loads at run time.
//!
//! cudarc opens libraries by name (`libnvrtc.so.13`, `libcuda.so`, …) through the dynamic
//! loader. NVRTC is also shipped in PyPI wheels (`nvidia-cuda-nvrtc`), outside the loader's
//! path; [`preload_nvrtc`] opens it by full path first, after which cudarc's open by name
//! finds the library already loaded.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Library file names of NVRTC, newest first.
const NVRTC_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// Directories that may hold CUDA libraries, in the order they are searched: `$ARBOR_CUDA_LIB`,
/// `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`, `/usr/local/cuda/lib64`, then the `nvidia/cu13/lib`
/// and `nvidia/cuda_nvrtc/lib` folders of Python's site-packages.
pub fn lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("ARBOR_CUDA_LIB") {
        dirs.push(PathBuf::from(d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            dirs.push(PathBuf::from(h).join("lib64"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    for site in python_site_dirs() {
        dirs.push(site.join("nvidia/cu13/lib"));
        dirs.push(site.join("nvidia/cuda_nvrtc/lib"));
    }
    dirs
}

/// Directories that may hold the CUDA headers (`cuda_bf16.h`, …), searched like [`lib_dirs`].
/// arbor's own kernels need none of them; they are passed to NVRTC so that kernels may.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("ARBOR_CUDA_INCLUDE") {
        dirs.push(PathBuf::from(d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            dirs.push(PathBuf::from(h).join("include"));
        }
    }
    dirs.push("/usr/local/cuda/include".into());
    for site in python_site_dirs() {
        dirs.push(site.join("nvidia/cu13/include"));
        dirs.push(site.join("nvidia/cuda_runtime/include"));
    }
    dirs.retain(|d| d.join("cuda_runtime.h").is_file() || d.join("cuda_bf16.h").is_file());
    dirs
}

/// Python's site-packages directories (system and user), asked of `python3` once.
fn python_site_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let script = "import site, sys\nfor p in site.getsitepackages() + [site.getusersitepackages()]: print(p)";
        std::process::Command::new("python3")
            .args(["-c", script])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(PathBuf::from)
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Where NVRTC was found, or every place that was searched.
pub type Found = Result<PathBuf, Vec<PathBuf>>;

/// Library file names of cuBLASLt, newest first.
const CUBLASLT_NAMES: &[&str] = &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"];

/// Opens NVRTC by full path from the first of [`lib_dirs`] that has it, so that cudarc's
/// open by name succeeds; if none has it, leaves the loader's own search (LD_LIBRARY_PATH)
/// to cudarc. Returns the file opened, or the places searched. Done once per process.
pub fn preload_nvrtc() -> &'static Found {
    static FOUND: OnceLock<Found> = OnceLock::new();
    FOUND.get_or_init(|| {
        let found = preload(NVRTC_NAMES);
        if let Ok(nvrtc) = &found {
            preload_builtins(nvrtc);
        }
        found
    })
}

/// NVRTC opens `libnvrtc-builtins.so.MAJOR.MINOR` by name at its first compile. A libnvrtc
/// without a RUNPATH of `$ORIGIN` (the `nvidia-cuda-nvrtc` 13.0 wheels) does not look beside
/// itself, so a copy outside the loader's path fails to compile ("failed to open
/// libnvrtc-builtins.so.13.0"); opening the builtins here by full path lets that open by name
/// find them already loaded.
fn preload_builtins(nvrtc: &Path) {
    let Some(entries) = nvrtc.parent().and_then(|d| std::fs::read_dir(d).ok()) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with("libnvrtc-builtins.so.")
        {
            open_global(&e.path());
        }
    }
}

/// [`preload_nvrtc`] for cuBLASLt.
pub fn preload_cublaslt() -> &'static Found {
    static FOUND: OnceLock<Found> = OnceLock::new();
    FOUND.get_or_init(|| preload(CUBLASLT_NAMES))
}

fn preload(names: &[&str]) -> Found {
    let mut searched = Vec::new();
    for dir in lib_dirs() {
        for name in names {
            let path = dir.join(name);
            if path.is_file() && open_global(&path) {
                return Ok(path);
            }
            searched.push(path);
        }
    }
    Err(searched)
}

/// Loads a library for the life of the process (never unloaded: cudarc holds its symbols).
fn open_global(path: &Path) -> bool {
    // SAFETY: loading NVRTC runs no initialisation code with preconditions of ours.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// Whether NVRTC can be loaded (after [`preload_nvrtc`]).
pub fn nvrtc_available() -> bool {
    let _ = preload_nvrtc();
    // SAFETY: only probes for the library by name.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only probes for the library by name.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLASLt can be loaded.
pub fn cublaslt_available() -> bool {
    let _ = preload_cublaslt();
    // SAFETY: only probes for the library by name.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}
