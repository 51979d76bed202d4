//! Counters, gauges and histograms for `/metrics`, written in the Prometheus text format.

use crate::worker::EngineStats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A histogram with fixed upper bounds.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

const STEP_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Everything `/metrics` reports beside the engine's own state.
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    cancelled: AtomicU64,
    last_batch: AtomicUsize,
    active: AtomicUsize,
    /// HTTP requests admitted and not yet ended (what --max-queue bounds).
    pub in_flight: AtomicUsize,
    steps: Mutex<(Histogram, Histogram)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            last_batch: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            steps: Mutex::new((Histogram::new(STEP_BOUNDS), Histogram::new(BATCH_BOUNDS))),
        }
    }
}

impl Metrics {
    /// Counts a finished HTTP exchange.
    pub fn count_request(&self, endpoint: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), status)).or_default() += 1;
        }
    }

    pub fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_generated_tokens(&self, n: u64) {
        self.generated_tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a request cancelled before it ended (client gone, timeout, shutdown).
    pub fn add_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one engine step of `batch` sequences.
    pub fn observe_step(&self, took: Duration, batch: usize) {
        self.last_batch.store(batch, Ordering::Relaxed);
        if let Ok(mut h) = self.steps.lock() {
            h.0.observe(took.as_secs_f64());
            h.1.observe(batch as f64);
        }
    }

    pub fn set_active(&self, n: usize) {
        self.active.store(n, Ordering::Relaxed);
    }

    /// The Prometheus text of every metric; `engine` is `None` if the worker has stopped.
    pub fn render(&self, engine: Option<&EngineStats>) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP arbor_requests_total HTTP requests by endpoint and status.\n# TYPE arbor_requests_total counter"
        );
        if let Ok(m) = self.requests.lock() {
            for ((e, s), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "arbor_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
                );
            }
        }
        let mut scalar = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        scalar(
            "arbor_prompt_tokens_total",
            "counter",
            "Prompt tokens of accepted requests (once per prompt).",
            load(&self.prompt_tokens),
        );
        scalar(
            "arbor_generation_tokens_total",
            "counter",
            "Tokens sampled for plain requests.",
            load(&self.generated_tokens),
        );
        scalar(
            "arbor_requests_cancelled_total",
            "counter",
            "Requests cancelled before they ended (client disconnected, timeout, shutdown).",
            load(&self.cancelled),
        );
        scalar(
            "arbor_batch_size",
            "gauge",
            "Sequences in the last engine step.",
            self.last_batch.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "arbor_queue_depth",
            "gauge",
            "HTTP requests admitted and not yet ended (bounded by --max-queue).",
            self.in_flight.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "arbor_scheduler_active",
            "gauge",
            "Requests and searches the scheduler holds.",
            self.active.load(Ordering::Relaxed).to_string(),
        );
        if let Some(e) = engine {
            let kv = &e.kv;
            let _ = writeln!(
                o,
                "# HELP arbor_kv_pages KV pages by state.\n# TYPE arbor_kv_pages gauge\n\
                 arbor_kv_pages{{state=\"in_use\"}} {}\narbor_kv_pages{{state=\"cached\"}} {}\n\
                 arbor_kv_pages{{state=\"free\"}} {}",
                kv.pages_in_use, kv.pages_cached, kv.pages_free
            );
            let mut scalar = |name: &str, kind: &str, help: &str, v: String| {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            };
            scalar(
                "arbor_kv_pages_total",
                "gauge",
                "KV pages in the pool.",
                kv.pages_total.to_string(),
            );
            scalar(
                "arbor_kv_unique_tokens",
                "gauge",
                "Distinct token positions held by live sequences.",
                kv.unique_tokens.to_string(),
            );
            let per = if kv.unique_tokens > 0 {
                kv.bytes_in_use() as f64 / kv.unique_tokens as f64
            } else {
                0.0
            };
            scalar(
                "arbor_kv_bytes_per_unique_token",
                "gauge",
                "KV bytes in use per distinct token position held (lower means more sharing).",
                format!("{per}"),
            );
            scalar(
                "arbor_engine_steps_total",
                "counter",
                "Engine steps run.",
                e.ticks.to_string(),
            );
            scalar(
                "arbor_preemptions_total",
                "counter",
                "Sequences preempted (pages dropped, recomputed later).",
                e.preemptions.to_string(),
            );
        }
        if let Ok(h) = self.steps.lock() {
            h.0.render(&mut o, "arbor_step_seconds", "Engine step latency.");
            h.1.render(
                &mut o,
                "arbor_step_batch_size",
                "Sequences per engine step.",
            );
        }
        o
    }
}
