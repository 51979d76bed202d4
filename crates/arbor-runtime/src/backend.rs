//! Where an engine's model runs: the CPU (the reference) or one GPU (feature `cuda`).

use crate::model::{BatchLayout, Model};
use crate::RuntimeError;
use arbor_kernels::kv::{KvCache, KvDtype, KvLayout};
use arbor_kernels::ops::{SampleOutput, SamplingParams};
use arbor_kernels::Device;

/// An engine's compute backend.
pub(crate) enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::CudaModel>),
}

/// One row to sample on the device: its parameters, the history its penalties read and the
/// step of its random stream.
pub(crate) type DeviceSampleRow<'a> = (&'a SamplingParams, &'a [u32], u64);

impl Backend {
    /// The backend for `device` and a KV cache of `kv_bytes` for `model` (pages of the model's
    /// `attention.kv_dtype` on the CPU, bf16 pages in device memory on a GPU).
    pub fn open(
        device: Device,
        model: &Model,
        layout: KvLayout,
        kv_bytes: usize,
    ) -> Result<(Backend, KvCache), RuntimeError> {
        let cpu_dtype = model.attention.kv_dtype;
        let elem = if device == Device::Cpu {
            cpu_dtype.bytes()
        } else {
            2
        };
        let num_pages = kv_bytes / layout.bytes_per_page(elem);
        if num_pages == 0 {
            return Err(RuntimeError::Request(format!(
                "a KV cache of {kv_bytes} bytes holds no page of {} bytes: raise --kv-cache-gb",
                layout.bytes_per_page(elem)
            )));
        }
        let key = model.fingerprint();
        match device {
            Device::Cpu => {
                // Pages of another element type are not the same K/V: another key.
                let key = match cpu_dtype {
                    KvDtype::F32 => key,
                    KvDtype::F16 => key ^ 0xf16f_16f1_6f16_f16f,
                };
                let cache = KvCache::with_dtype(layout, num_pages, key, cpu_dtype);
                Ok((Backend::Cpu, cache))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                let gpu = arbor_kernels::cuda::Gpu::open(ordinal)?;
                let m = crate::cuda::CudaModel::new(gpu, model, layout, num_pages)?;
                // A different key: bf16 K/V must not be mistaken for the CPU's f32 K/V.
                let cache = KvCache::detached(layout, num_pages, key ^ 0xbf16_bf16_bf16_bf16);
                Ok((Backend::Cuda(Box::new(m)), cache))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(RuntimeError::Request(
                "this build of arbor has no CUDA backend (built without the `cuda` feature): use --device cpu".into(),
            )),
        }
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        match self {
            Backend::Cpu => Device::Cpu,
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => Device::Cuda(m.gpu().ordinal),
        }
    }

    /// Runs the model on a step (see [`Model::forward_hidden`]). Returns the output rows of
    /// `logit_rows` on the host (empty on a GPU unless `host_logits`: they stay on the device
    /// for [`Backend::sample`]) and the hidden states of `hidden_rows`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        model: &Model,
        cache: &mut KvCache,
        tokens: &[u32],
        layout: &BatchLayout,
        logit_rows: &[usize],
        hidden_rows: &[usize],
        host_logits: bool,
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
        match self {
            Backend::Cpu => {
                let _ = host_logits;
                // Run inside the rayon pool: every op's parallel loop then starts from a
                // worker instead of paying a hand-off from this thread (~10 µs × ~150 calls).
                rayon::scope(|_| {
                    model.forward_hidden(cache, tokens, layout, logit_rows, hidden_rows)
                })
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => {
                let hidden = m.forward(model, cache, tokens, layout, logit_rows, hidden_rows)?;
                let logits = if host_logits {
                    m.read_logits()?
                } else {
                    Vec::new()
                };
                Ok((logits, hidden))
            }
        }
    }

    /// Grows `cache` (and a GPU's pool) to `target` pages, or shrinks it towards `target` over
    /// the free pages at its top; returns the pages it now has. A GPU pool that cannot grow
    /// (out of memory) leaves both unchanged and is an error.
    pub fn resize_kv(&mut self, cache: &mut KvCache, target: usize) -> Result<usize, RuntimeError> {
        match self {
            Backend::Cpu => Ok(cache.resize(target)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => {
                let old = cache.stats().pages_total;
                if target > old {
                    m.resize_pool(target)?;
                    return Ok(cache.resize(target));
                }
                let n = cache.resize(target);
                // Pages compacted below `n` are copied on the device before the top goes.
                let copies = cache.pool.take_copies();
                m.copy_pages(&copies)?;
                if let Err(e) = m.resize_pool(n) {
                    cache.resize(old);
                    return Err(e);
                }
                Ok(n)
            }
        }
    }

    /// Decode steps replayed as CUDA graphs so far, and of those the tree (cascade) steps
    /// (`None` on the CPU).
    pub fn graph_replays(&self) -> Option<(u64, u64)> {
        match self {
            Backend::Cpu => None,
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => {
                let st = m.graph_stats();
                Some((st.replays, st.tree_replays))
            }
        }
    }

    /// The device in words: `cpu, N threads` or `cuda:0 NAME (sm_XY)`.
    pub fn describe(&self) -> String {
        match self {
            Backend::Cpu => format!("cpu, {} threads", rayon::current_num_threads()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => {
                let g = m.gpu();
                format!("cuda:{} {} ({})", g.ordinal, g.name, g.arch)
            }
        }
    }

    /// Switches per-expert token counting on or off, for `model` on the CPU and in the GPU's
    /// own counters (a MoE model on a GPU counts there).
    pub fn set_expert_stats(&self, model: &Model, on: bool) {
        model.set_expert_stats(on);
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(m) = self {
            m.set_expert_stats(on);
        }
    }

    /// Tokens routed to each expert since the last call (see
    /// [`Model::take_expert_counts`]); on a GPU, read back from the device's counters, and
    /// `None` if they cannot be read (a device error, which the next step reports).
    pub fn take_expert_counts(&self, model: &Model) -> Option<crate::model::ExpertCounts> {
        match self {
            Backend::Cpu => model.take_expert_counts(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => m.take_expert_counts().ok().flatten(),
        }
    }

    /// Whether [`Backend::sample`] samples on the device.
    pub fn samples_on_device(&self) -> bool {
        !matches!(self, Backend::Cpu)
    }

    /// Samples row `i` of the last step's output rows with `rows[i]`, on the device.
    pub fn sample(
        &self,
        vocab: usize,
        rows: &[DeviceSampleRow],
    ) -> Result<Vec<SampleOutput>, RuntimeError> {
        match self {
            Backend::Cpu => {
                let _ = (vocab, rows);
                Err(RuntimeError::Request(
                    "the CPU backend samples on the host".into(),
                ))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => {
                use arbor_kernels::cuda::ops::sample::SampleRow;
                let rows: Vec<SampleRow> = rows
                    .iter()
                    .map(|&(params, history, step)| SampleRow {
                        params,
                        history,
                        step,
                    })
                    .collect();
                m.sample(vocab, &rows)
            }
        }
    }
}
