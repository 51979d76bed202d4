//! arbor's on-disk cache location, shared by model downloads and compiled kernels.

use std::path::PathBuf;

/// arbor's cache directory: `$ARBOR_CACHE`, else `$XDG_CACHE_HOME/arbor`, else `~/.cache/arbor`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ARBOR_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("arbor");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("arbor"),
        None => std::env::temp_dir().join("arbor-cache"),
    }
}
