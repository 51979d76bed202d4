//! Turning the embedded kernel sources into PTX: build-time PTX when nvcc made it, else NVRTC
//! at first use, cached on disk by (source hash, NVRTC version, target architecture).

use super::error::GpuError;
use super::find;
use std::path::PathBuf;

mod sources {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}
pub use sources::{HEADERS, KERNELS};

/// Architectures every kernel must compile for (A100, RTX 30xx, RTX 40xx/L4, H100/H200).
pub const TARGET_ARCHS: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90"];

/// The source of kernel file `name` with arbor's headers (`#include "x.cuh"`) inlined, so
/// NVRTC needs no include path for them.
pub fn source(name: &str) -> Result<String, GpuError> {
    let (_, src) = KERNELS
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| GpuError::Invalid(format!("no kernel file '{name}.cu' is embedded")))?;
    let mut out = String::with_capacity(src.len() * 2);
    let mut seen = Vec::new();
    inline_includes(src, &mut out, &mut seen)?;
    Ok(out)
}

fn inline_includes(
    src: &str,
    out: &mut String,
    seen: &mut Vec<&'static str>,
) -> Result<(), GpuError> {
    for line in src.lines() {
        let header = line
            .trim()
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'));
        match header.and_then(|h| HEADERS.iter().find(|(n, _)| *n == h)) {
            Some((n, text)) => {
                // Headers are `#pragma once`; inline each once.
                if !seen.contains(n) {
                    seen.push(n);
                    inline_includes(text, out, seen)?;
                }
            }
            None if header.is_some() => {
                return Err(GpuError::Invalid(format!(
                    "kernel includes \"{}\", which is not in kernels/include/",
                    header.unwrap_or_default()
                )))
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(())
}

/// NVRTC's version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    if !find::nvrtc_available() {
        return Err(no_nvrtc());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (checked above); the pointers are valid for writes.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| GpuError::Invalid(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

fn no_nvrtc() -> GpuError {
    let searched = match find::preload_nvrtc() {
        Ok(_) => Vec::new(),
        Err(s) => s.clone(),
    };
    GpuError::NoNvrtc { searched }
}

/// Compiles kernel file `name` for `arch` (e.g. `sm_90`) with NVRTC, no cache.
pub fn compile_nvrtc(name: &str, arch: &'static str) -> Result<String, GpuError> {
    if !find::nvrtc_available() {
        return Err(no_nvrtc());
    }
    compile_source(name, &source(name)?, arch)
}

/// Compiles `src` (kernel file `name` with its headers inlined) for `arch`.
fn compile_source(name: &str, src: &str, arch: &'static str) -> Result<String, GpuError> {
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        include_paths: find::include_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect(),
        options: vec!["-std=c++17".into(), "-default-device".into()],
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(src, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(GpuError::Compile {
            kernel: name.to_string(),
            arch,
            log: log.to_string_lossy().into_owned(),
        }),
        Err(e) => Err(GpuError::Compile {
            kernel: name.to_string(),
            arch,
            log: format!("{e:?}"),
        }),
    }
}

/// PTX of kernel file `name` for `arch`: from the disk cache, else compiled by NVRTC and
/// cached. A cache that cannot be written only costs a recompilation next time.
pub fn ptx_cached(name: &str, arch: &'static str) -> Result<String, GpuError> {
    let (major, minor) = nvrtc_version()?;
    let src = source(name)?;
    let key = fnv1a(format!("{src}\n{major}.{minor}\n{arch}").as_bytes());
    let path = cache_dir().join(format!("{name}-{arch}-{key:016x}.ptx"));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        return Ok(ptx);
    }
    let ptx = compile_source(name, &src, arch)?;
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        // Write then rename, so a concurrent reader never sees half a file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}

/// PTX that nvcc made at build time for kernel file `name`, if any.
pub fn prebuilt_ptx(name: &str) -> Option<&'static str> {
    sources::PTX
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p)
}

/// `kernels/` under arbor's cache directory ([`crate::cache::cache_dir`]).
fn cache_dir() -> PathBuf {
    crate::cache::cache_dir().join("kernels")
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
