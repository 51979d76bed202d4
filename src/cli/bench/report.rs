//! One record per cell: as a JSON object, a CSV row, or a table line.

use super::grid::Cell;
use super::run::CellResult;
use arbor_runtime::model::ExpertCounts;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// Column order of `bench.csv` (the JSON keys of the same names; `a.b` is key `b` of the
/// object under `a`).
pub const COLUMNS: &[&str] = &[
    "strategy",
    "width",
    "prompt_len",
    "gen_len",
    "sharing",
    "searches",
    "generated_tokens",
    "sampled_tokens",
    "processed_tokens",
    "steps",
    "wall_s",
    "tokens_per_s",
    "processed_tokens_per_s",
    "steps_per_s",
    "step_p50_ms",
    "step_p99_ms",
    "kv_peak_pages",
    "page_bytes",
    "kv_peak_bytes",
    "unique_tokens_at_peak",
    "kv_bytes_per_unique_token",
    "gpu_mem_peak_bytes",
    "preemptions",
    "cuda_graph_replays",
    "cuda_tree_graph_replays",
    "errors",
    "expert_load.assignments",
    "expert_load.max_tokens",
    "expert_load.mean_tokens",
    "expert_load.imbalance",
    "expert_load.max_layer_imbalance",
    "expert_load.step_imbalance",
    "model",
    "device",
];

/// The `expert_load` object of a MoE model's cell (null for a dense model): tokens routed
/// per expert (a token counts once per expert it is routed to), their max and mean over
/// every MoE layer's experts, max ÷ mean within a layer averaged over layers (`imbalance`;
/// 1 is perfect balance) and its worst layer, and the same ratio per step
/// (`step_imbalance`, what one step's grouped expert GEMM sees).
fn expert_load(r: &CellResult) -> Value {
    let Some(c) = &r.expert_counts else {
        return Value::Null;
    };
    let l = c.load();
    json!({
        "moe_layers": c.layers.len(),
        "experts": c.counts.first().map_or(0, Vec::len),
        "assignments": l.assignments,
        "max_tokens": l.max_tokens,
        "mean_tokens": l.mean_tokens,
        "imbalance": l.imbalance,
        "max_layer_imbalance": l.max_layer_imbalance,
        "step_imbalance": r.expert_step_imbalance,
    })
}

/// The JSON record of one cell.
pub fn record(
    cell: &Cell,
    searches: usize,
    r: &CellResult,
    model: &str,
    device: &str,
    gpu_note: &str,
) -> Value {
    let per_s = |x: f64| if r.wall_s > 0.0 { x / r.wall_s } else { 0.0 };
    let gpu = match r.gpu_mem_peak_bytes {
        Some(b) => json!(b),
        None => json!(format!("n/a: {gpu_note}")),
    };
    json!({
        "strategy": cell.strategy,
        "width": cell.width,
        "prompt_len": cell.prompt_len,
        "gen_len": cell.gen_len,
        "sharing": cell.sharing_str(),
        "searches": searches,
        "generated_tokens": r.generated_tokens,
        "sampled_tokens": r.sampled_tokens,
        "processed_tokens": r.processed_tokens,
        "steps": r.steps,
        "wall_s": r.wall_s,
        "tokens_per_s": per_s(r.generated_tokens as f64),
        "processed_tokens_per_s": per_s(r.processed_tokens as f64),
        "steps_per_s": per_s(r.steps as f64),
        "step_p50_ms": r.step_quantile_ms(0.5),
        "step_p99_ms": r.step_quantile_ms(0.99),
        "kv_peak_pages": r.kv_peak_pages,
        "page_bytes": r.page_bytes,
        "kv_peak_bytes": r.kv_peak_bytes(),
        "unique_tokens_at_peak": r.unique_tokens_at_peak,
        "kv_bytes_per_unique_token": r.kv_bytes_per_unique_token(),
        "gpu_mem_peak_bytes": gpu,
        "preemptions": r.preemptions,
        "cuda_graph_replays": r.graph_replays,
        "cuda_tree_graph_replays": r.tree_graph_replays,
        "errors": r.errors.len(),
        "error": r.errors.first(),
        "expert_load": expert_load(r),
        "model": model,
        "device": device,
    })
}

/// One CSV field: numbers as they are, text quoted when it needs to be.
fn field(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.contains([',', '"', '\n']) => {
            format!("\"{}\"", s.replace('"', "\"\""))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.4}"),
            _ => n.to_string(),
        },
        Some(other) => other.to_string(),
    }
}

/// Writes the records as CSV with a header.
pub fn write_csv(path: &Path, records: &[Value]) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "{}", COLUMNS.join(","))?;
    for r in records {
        let row: Vec<String> = COLUMNS
            .iter()
            .map(|c| match c.split_once('.') {
                Some((a, b)) => field(r.get(a).and_then(|o| o.get(b))),
                None => field(r.get(*c)),
            })
            .collect();
        writeln!(f, "{}", row.join(","))?;
    }
    f.flush()
}

/// Header of the human-readable table.
pub fn table_header() -> String {
    format!(
        "{:<10} {:>5} {:>6} {:>5} {:>4} {:>9} {:>10} {:>8} {:>8} {:>8} {:>10} {:>9}",
        "strategy",
        "width",
        "prompt",
        "gen",
        "shr",
        "tok/s",
        "proc tok/s",
        "steps/s",
        "p50 ms",
        "p99 ms",
        "KV peak MiB",
        "B/uniq tok"
    )
}

/// One table line of a record.
pub fn table_line(v: &Value) -> String {
    let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut line = format!(
        "{:<10} {:>5} {:>6} {:>5} {:>4} {:>9.1} {:>10.1} {:>8.2} {:>8.1} {:>8.1} {:>10.1} {:>9.0}",
        s("strategy"),
        f("width"),
        f("prompt_len"),
        f("gen_len"),
        s("sharing"),
        f("tokens_per_s"),
        f("processed_tokens_per_s"),
        f("steps_per_s"),
        f("step_p50_ms"),
        f("step_p99_ms"),
        f("kv_peak_bytes") / (1u64 << 20) as f64,
        f("kv_bytes_per_unique_token"),
    );
    if let Some(imb) = v.pointer("/expert_load/imbalance").and_then(Value::as_f64) {
        let step = v
            .pointer("/expert_load/step_imbalance")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        line.push_str(&format!("  experts max/mean {imb:.2} (per step {step:.2})"));
    }
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        line.push_str(&format!("  error: {e}"));
    }
    line
}

/// Writes the tokens routed to every expert of every MoE layer, one row per (cell, layer,
/// expert): `cell` is the record's index in `bench.csv`.
pub fn write_expert_csv(path: &Path, cells: &[(usize, Cell, ExpertCounts)]) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        f,
        "cell,strategy,width,prompt_len,gen_len,sharing,layer,expert,tokens"
    )?;
    for (i, cell, counts) in cells {
        for (layer, c) in counts.layers.iter().zip(&counts.counts) {
            for (e, n) in c.iter().enumerate() {
                writeln!(
                    f,
                    "{i},{},{},{},{},{},{layer},{e},{n}",
                    cell.strategy,
                    cell.width,
                    cell.prompt_len,
                    cell.gen_len,
                    cell.sharing_str()
                )?;
            }
        }
    }
    f.flush()
}
