//! SVG plots of the grid (plotters, SVG backend only: no font library needed).

use plotters::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

fn text(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

/// One line per (strategy, sharing): `metric` against width, for the records of one
/// prompt and generation length. Sharing on is drawn solid, off thin with hollow marks.
fn plot(
    path: &Path,
    title: &str,
    ylabel: &str,
    metric: &str,
    recs: &[&Value],
) -> anyhow::Result<()> {
    let widths: Vec<f64> = recs.iter().map(|r| num(r, "width")).collect();
    let (wmin, wmax) = widths
        .iter()
        .fold((f64::MAX, 1.0f64), |(a, b), &w| (a.min(w), b.max(w)));
    let ymax = recs.iter().map(|r| num(r, metric)).fold(0.0, f64::max) * 1.1 + 1e-9;
    let root = SVGBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (wmin.max(1.0)..(wmax * 1.2).max(2.0)).log_scale(),
            0.0..ymax,
        )?;
    chart
        .configure_mesh()
        .x_desc("width (branches)")
        .y_desc(ylabel)
        .draw()?;
    let mut series: Vec<(String, String)> = Vec::new();
    for r in recs {
        let key = (text(r, "strategy"), text(r, "sharing"));
        if !series.contains(&key) {
            series.push(key);
        }
    }
    let strategies: Vec<String> = {
        let mut s: Vec<String> = series.iter().map(|k| k.0.clone()).collect();
        s.dedup();
        s
    };
    for (strategy, sharing) in &series {
        let i = strategies.iter().position(|s| s == strategy).unwrap_or(0);
        let color = COLORS[i % COLORS.len()];
        let on = sharing == "on";
        let mut pts: Vec<(f64, f64)> = recs
            .iter()
            .filter(|r| &text(r, "strategy") == strategy && &text(r, "sharing") == sharing)
            .map(|r| (num(r, "width"), num(r, metric)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let style = color.stroke_width(if on { 3 } else { 1 });
        chart
            .draw_series(LineSeries::new(pts.clone(), style))?
            .label(format!("{strategy}, sharing {sharing}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(
            pts.into_iter()
                .map(move |p| Circle::new(p, 4, if on { color.filled() } else { color.into() })),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `tokens_per_s_*.svg` and `kv_peak_*.svg` (one per prompt × generation length)
/// into `dir`; returns the files written.
pub fn write_plots(dir: &Path, records: &[Value], model: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut shapes: Vec<(u64, u64)> = Vec::new();
    for r in records {
        let k = (num(r, "prompt_len") as u64, num(r, "gen_len") as u64);
        if !shapes.contains(&k) {
            shapes.push(k);
        }
    }
    let mut out = Vec::new();
    for (p, g) in shapes {
        let recs: Vec<&Value> = records
            .iter()
            .filter(|r| {
                num(r, "prompt_len") as u64 == p
                    && num(r, "gen_len") as u64 == g
                    && r.get("error").is_none_or(Value::is_null)
            })
            .collect();
        if recs.is_empty() {
            continue;
        }
        let tps = dir.join(format!("tokens_per_s_p{p}_g{g}.svg"));
        let title = format!("{model}: generated tokens/s, prompt {p}, gen {g}");
        plot(&tps, &title, "generated tokens/s", "tokens_per_s", &recs)?;
        out.push(tps);
        let kv = dir.join(format!("kv_peak_p{p}_g{g}.svg"));
        let title = format!("{model}: peak KV MiB, prompt {p}, gen {g}");
        let mib: Vec<Value> = recs
            .iter()
            .map(|r| {
                let mut r = (*r).clone();
                r["kv_peak_mib"] = (num(&r, "kv_peak_bytes") / (1u64 << 20) as f64).into();
                r
            })
            .collect();
        let refs: Vec<&Value> = mib.iter().collect();
        plot(&kv, &title, "peak KV MiB", "kv_peak_mib", &refs)?;
        out.push(kv);
    }
    Ok(out)
}
