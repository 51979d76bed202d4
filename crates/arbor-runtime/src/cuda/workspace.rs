//! Device buffers a step works in, kept from step to step: activations, the output rows and
//! the packed step metadata ([`super::meta::Packed`]). They grow (rounded up, so that growth
//! is rare) and never shrink; a buffer that is big enough is never reallocated, so a CUDA graph
//! captured against their addresses stays valid until [`Workspace::generation`] changes.

use crate::config::ModelConfig;
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::CudaSlice;
use arbor_kernels::cuda::Gpu;
use half::bf16;

/// Row counts up to this are rounded up to [`ROW_BUCKETS`]; larger ones to a power of two.
const ROW_BUCKET_MAX: usize = 256;

/// Row counts buffers are sized for (and CUDA graph batch sizes, see [`super::graph`]).
pub const ROW_BUCKETS: [usize; 13] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256];

/// The smallest packed-metadata capacity, in `u32`s (16 KiB).
const MIN_META: usize = 1 << 12;

/// The rows a buffer for `n` rows is sized for: the bucket at or above `n`, or the power of
/// two at or above it beyond the largest bucket.
pub fn round_rows(n: usize) -> usize {
    if n <= ROW_BUCKET_MAX {
        ROW_BUCKETS
            .iter()
            .copied()
            .find(|&b| b >= n)
            .unwrap_or(ROW_BUCKET_MAX)
    } else {
        n.checked_next_power_of_two().unwrap_or(n)
    }
}

/// The capacity for `n` values of packed metadata.
pub fn round_meta(n: usize) -> usize {
    n.max(MIN_META).checked_next_power_of_two().unwrap_or(n)
}

/// Widths of the activation buffers, per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Widths {
    hidden: usize,
    /// `xn`: max(hidden, q dim, intermediate).
    normed: usize,
    /// `proj`: max(qkv width, 2·intermediate, hidden).
    proj: usize,
    q: usize,
    out: usize,
}

/// The buffers; see the module documentation.
pub(super) struct Workspace {
    generation: u64,
    widths: Widths,
    /// Rows the activation buffers hold.
    rows: usize,
    /// Rows the logits buffer holds.
    logit_rows: usize,
    /// The step's packed metadata.
    pub meta: CudaSlice<u32>,
    /// The residual stream, f32, `rows × hidden`.
    pub x: CudaSlice<f32>,
    /// Normed inputs and activations, bf16.
    pub xn: CudaSlice<bf16>,
    /// Projection outputs, f32.
    pub proj: CudaSlice<f32>,
    /// Queries after RoPE, f32.
    pub q: CudaSlice<f32>,
    /// Each half-layer's output, f32, `rows × hidden`.
    pub o: CudaSlice<f32>,
    /// Gathered rows (logit rows of a partial head, hidden rows), f32, `rows × hidden`.
    pub xs: CudaSlice<f32>,
    /// The output head's rows, f32, `logit_rows × out_dim`.
    pub logits: CudaSlice<f32>,
}

impl Workspace {
    /// A workspace for a model of `cfg`, sized for one row until a step asks for more.
    pub fn new(gpu: &Gpu, cfg: &ModelConfig) -> Result<Self, RuntimeError> {
        let hd = cfg.head_dim;
        let (qd, kvd, inter, h) = (
            cfg.num_heads * hd,
            cfg.num_kv_heads * hd,
            cfg.intermediate_size,
            cfg.hidden_size,
        );
        let widths = Widths {
            hidden: h,
            normed: h.max(qd).max(inter),
            proj: (qd + 2 * kvd).max(2 * inter).max(h),
            q: qd,
            out: cfg.out_dim(),
        };
        let mut ws = Workspace {
            generation: 0,
            widths,
            rows: 0,
            logit_rows: 0,
            meta: gpu.zeros(1, "step metadata")?,
            x: gpu.zeros(1, "hidden states")?,
            xn: gpu.zeros(1, "normed activations")?,
            proj: gpu.zeros(1, "projections")?,
            q: gpu.zeros(1, "queries")?,
            o: gpu.zeros(1, "layer outputs")?,
            xs: gpu.zeros(1, "gathered rows")?,
            logits: gpu.zeros(1, "logits")?,
        };
        ws.ensure(gpu, 1, 1, MIN_META)?;
        ws.generation = 0;
        Ok(ws)
    }

    /// Bumped whenever a buffer is reallocated: graphs captured before hold stale addresses.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Grows the buffers (rounded up) to hold `rows` activation rows, `logit_rows` output
    /// rows and `meta` values of packed metadata; a buffer that is big enough is kept.
    pub fn ensure(
        &mut self,
        gpu: &Gpu,
        rows: usize,
        logit_rows: usize,
        meta: usize,
    ) -> Result<(), RuntimeError> {
        let w = self.widths;
        let grown = |what: &str, rows: usize, width: usize| {
            rows.checked_mul(width).ok_or_else(|| {
                RuntimeError::Request(format!("{rows} rows of {what} overflow the address space"))
            })
        };
        if rows > self.rows {
            let r = round_rows(rows);
            // Free the old buffers first (stream-ordered) so that the peak is one set.
            self.x = gpu.zeros(1, "hidden states")?;
            self.xn = gpu.zeros(1, "normed activations")?;
            self.proj = gpu.zeros(1, "projections")?;
            self.q = gpu.zeros(1, "queries")?;
            self.o = gpu.zeros(1, "layer outputs")?;
            self.xs = gpu.zeros(1, "gathered rows")?;
            self.rows = 0;
            self.generation += 1;
            self.x = gpu.zeros(grown("hidden states", r, w.hidden)?, "hidden states")?;
            self.xn = gpu.zeros(
                grown("normed activations", r, w.normed)?,
                "normed activations",
            )?;
            self.proj = gpu.zeros(grown("projections", r, w.proj)?, "projections")?;
            self.q = gpu.zeros(grown("queries", r, w.q)?, "queries")?;
            self.o = gpu.zeros(grown("layer outputs", r, w.hidden)?, "layer outputs")?;
            self.xs = gpu.zeros(grown("gathered rows", r, w.hidden)?, "gathered rows")?;
            self.rows = r;
        }
        if logit_rows > self.logit_rows {
            let r = round_rows(logit_rows);
            self.logits = gpu.zeros(1, "logits")?;
            self.logit_rows = 0;
            self.generation += 1;
            self.logits = gpu.zeros(grown("logits", r, w.out)?, "logits")?;
            self.logit_rows = r;
        }
        if meta > self.meta.len() {
            self.generation += 1;
            self.meta = gpu.zeros(1, "step metadata")?;
            self.meta = gpu.zeros(round_meta(meta), "step metadata")?;
        }
        Ok(())
    }

    /// Marks every captured graph stale (a buffer outside the workspace that graphs read, the
    /// KV pool, moved).
    pub fn invalidate(&mut self) {
        self.generation += 1;
    }

    /// Bytes of device memory held.
    pub fn bytes(&self) -> usize {
        4 * (self.meta.len()
            + self.x.len()
            + self.proj.len()
            + self.q.len()
            + self.o.len()
            + self.xs.len()
            + self.logits.len())
            + 2 * self.xn.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_up_to_buckets_then_powers_of_two() {
        assert_eq!(round_rows(0), 1);
        assert_eq!(round_rows(1), 1);
        assert_eq!(round_rows(3), 4);
        assert_eq!(round_rows(17), 24);
        assert_eq!(round_rows(24), 24);
        assert_eq!(round_rows(97), 128);
        assert_eq!(round_rows(256), 256);
        assert_eq!(round_rows(257), 512);
        assert_eq!(round_rows(4097), 8192);
        for n in 0..=600 {
            assert!(round_rows(n) >= n.max(1));
        }
    }

    #[test]
    fn meta_rounds_to_a_power_of_two_from_a_floor() {
        assert_eq!(round_meta(0), MIN_META);
        assert_eq!(round_meta(MIN_META + 1), 2 * MIN_META);
        assert_eq!(round_meta(100_000), 1 << 17);
    }
}
