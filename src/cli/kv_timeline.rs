//! KV memory over time for `arbor profile-kv`: the engine's page accounting and the GPU's
//! memory (NVML) after every step, as CSV and SVG, and which budgets fit on which GPU.

use super::gpu::GpuMem;
use arbor_runtime::Engine;
use plotters::prelude::*;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// One sample, taken after a step.
pub struct Sample {
    pub step: usize,
    pub t_ms: f64,
    pub pages_in_use: usize,
    pub pages_cached: usize,
    pub kv_bytes: usize,
    pub unique_tokens: usize,
    pub gpu_mem_used: Option<u64>,
}

/// Samples of one run.
pub struct Timeline {
    t0: Instant,
    pub gpu: GpuMem,
    pub samples: Vec<Sample>,
}

impl Timeline {
    pub fn new(gpu: GpuMem) -> Self {
        Timeline {
            t0: Instant::now(),
            gpu,
            samples: Vec::new(),
        }
    }

    /// Records the engine's KV state and the GPU's memory now.
    pub fn record(&mut self, e: &Engine) {
        let st = e.kv_stats();
        self.samples.push(Sample {
            step: self.samples.len() + 1,
            t_ms: self.t0.elapsed().as_secs_f64() * 1e3,
            pages_in_use: st.pages_in_use,
            pages_cached: st.pages_cached,
            kv_bytes: st.bytes_in_use(),
            unique_tokens: st.unique_tokens,
            gpu_mem_used: self.gpu.used_bytes(),
        });
    }

    /// `step,t_ms,pages_in_use,pages_cached,kv_bytes,unique_tokens,gpu_mem_used_bytes`
    /// (the last empty without NVML).
    pub fn write_csv(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(
            f,
            "step,t_ms,pages_in_use,pages_cached,kv_bytes,unique_tokens,gpu_mem_used_bytes"
        )?;
        for s in &self.samples {
            let gpu = s.gpu_mem_used.map(|b| b.to_string()).unwrap_or_default();
            writeln!(
                f,
                "{},{:.3},{},{},{},{},{gpu}",
                s.step, s.t_ms, s.pages_in_use, s.pages_cached, s.kv_bytes, s.unique_tokens
            )?;
        }
        f.flush()
    }

    /// KV MiB in use (and GPU MiB used, when measured) against time.
    pub fn write_svg(&self, path: &Path, title: &str) -> anyhow::Result<()> {
        let mib = |b: f64| b / (1u64 << 20) as f64;
        let kv: Vec<(f64, f64)> = self
            .samples
            .iter()
            .map(|s| (s.t_ms, mib(s.kv_bytes as f64)))
            .collect();
        let gpu: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter_map(|s| s.gpu_mem_used.map(|b| (s.t_ms, mib(b as f64))))
            .collect();
        let tmax = kv.last().map_or(1.0, |p| p.0).max(1e-3);
        let ymax = kv.iter().chain(&gpu).map(|p| p.1).fold(0.0, f64::max) * 1.1 + 1e-6;
        let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..tmax, 0.0..ymax)?;
        chart
            .configure_mesh()
            .x_desc("time (ms)")
            .y_desc("MiB")
            .draw()?;
        let blue = RGBColor(31, 119, 180);
        chart
            .draw_series(LineSeries::new(kv, blue.stroke_width(2)))?
            .label("KV pages in use (engine)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue));
        if !gpu.is_empty() {
            let red = RGBColor(214, 39, 40);
            chart
                .draw_series(LineSeries::new(gpu, red.stroke_width(2)))?
                .label("GPU memory used (NVML)")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

/// GPU memory sizes of the fits table, in GB (10⁹ bytes).
pub const GPUS_GB: [f64; 4] = [24.0, 48.0, 80.0, 141.0];

/// Share of a GPU's memory the table lets weights + KV take (the rest: activations,
/// workspace, the CUDA context).
pub const USABLE: f64 = 0.9;

/// Which widths × contexts fit on which GPU.
///
/// Formula: `need = W + T · b`, with W = weight bytes on the GPU (parameters × 2, bf16),
/// b = bytes per unique token = (measured KV bytes per unique position ÷ measured f32 bytes
/// per position) × bf16 bytes per position, and T = unique positions: `C + width · G` with
/// prefix sharing (one prompt of C tokens, `width` branches of G generated tokens) and
/// `width · (C + G)` with per-branch copies. A budget fits when `need ≤ 0.9 · GPU bytes`.
#[allow(clippy::too_many_arguments)]
pub fn fits_table(
    strategy: &str,
    params: u64,
    measured_ratio: f64,
    bf16_bytes_per_token: usize,
    gen: usize,
    max_context: usize,
) -> String {
    let weights = params as f64 * 2.0;
    let b = measured_ratio.max(1.0) * bf16_bytes_per_token as f64;
    let gb = |x: f64| x / 1e9;
    let mut out = format!(
        "Fits (bf16 weights {:.2} GB + KV; {:.0} B per unique token = measured {:.3} × {} B bf16; \
         need = weights + unique tokens × B ≤ {:.0}% of the GPU; unique tokens = C + width·G \
         shared, width·(C + G) per-branch copies; G = {gen}):\n",
        gb(weights),
        b,
        measured_ratio.max(1.0),
        bf16_bytes_per_token,
        USABLE * 100.0
    );
    out.push_str(&format!(
        "{:<10} {:>5} {:>8} {:>11} {:>11}",
        "strategy", "width", "context", "KV GB shr", "KV GB copy"
    ));
    for g in GPUS_GB {
        out.push_str(&format!(" {:>9}", format!("{g:.0} GB")));
    }
    out.push('\n');
    let contexts: Vec<usize> = [2048, 8192, 32768, 131072]
        .into_iter()
        .filter(|&c| c + gen <= max_context.max(2048 + gen))
        .collect();
    for width in [1usize, 4, 16, 64, 256] {
        for &c in &contexts {
            let shared = (c + width * gen) as f64 * b;
            let copies = (width * (c + gen)) as f64 * b;
            out.push_str(&format!(
                "{strategy:<10} {width:>5} {c:>8} {:>11.2} {:>11.2}",
                gb(shared),
                gb(copies)
            ));
            for g in GPUS_GB {
                let room = USABLE * g * 1e9 - weights;
                let cell = if copies <= room {
                    "yes"
                } else if shared <= room {
                    "shared"
                } else {
                    "no"
                };
                out.push_str(&format!(" {cell:>9}"));
            }
            out.push('\n');
        }
    }
    out.push_str(
        "(yes: fits even with per-branch copies; shared: fits only with prefix sharing)\n",
    );
    out
}
