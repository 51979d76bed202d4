//! `arbor profile-kv`: runs a fixed-shape search workload (best-of-N or token-level beam) and
//! reports what its KV cache holds at the end: pages in use, distinct token positions, and
//! KV bytes per unique token beside what per-branch private copies would cost.
//!
//! After every step it samples the engine's page accounting and, through NVML, the GPU's
//! memory (`--out DIR`: `kv_timeline.csv` and `kv_timeline.svg`), and it prints which
//! width × context budgets fit on 24, 48, 80 and 141 GB GPUs (formula at
//! [`super::kv_timeline::fits_table`]).

use super::gpu::GpuMem;
use super::kv_timeline::{fits_table, Timeline};
use super::model::ModelArgs;
use anyhow::{bail, Context};
use arbor_kernels::kv::{BlockTable, KvStats, SeqId};
use arbor_kernels::ops::SamplingParams;
use arbor_runtime::{Engine, ForwardBatch, LogitsMode, SeqStep};
use clap::{Args, ValueEnum};
use std::time::Instant;

/// The workload to profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// N independent samples from one prompt (each branch forks the prompt once).
    BestOfN,
    /// Token-level beam search: each step keeps the `width` best of width × width candidates,
    /// forking beams that win more than once and dropping the rest.
    Beam,
}

#[derive(Args, Debug)]
pub struct ProfileKvArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Workload shape.
    #[arg(long, value_enum, default_value = "best-of-n")]
    pub strategy: Workload,
    /// Branches (best-of-n) or beams (beam).
    #[arg(long, default_value_t = 16)]
    pub width: usize,
    /// Prompt length in tokens (a built-in text, cut or repeated to this length).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated per branch (EOS is ignored so every branch has this length).
    #[arg(long, default_value_t = 256)]
    pub gen_tokens: usize,
    /// Sampling temperature of best-of-n branches.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the per-step timeline (kv_timeline.csv, kv_timeline.svg) into this directory.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

const TEXT: &str =
    "Question: A farmer has a rectangular field whose length is three times its width. \
    She walks once around its edge and counts 480 steps of 0.8 metres each. Explain, step by \
    step, how to find the area of the field in square metres, then check the answer. \
    Background notes for the student follow. The perimeter of a rectangle is twice the sum of \
    its length and width; the area is their product. Units matter: a walk measured in steps \
    must be converted into metres before any formula is applied, and a careless conversion is \
    the most common source of error in problems of this kind. Historically, surveyors in Egypt \
    re-measured fields after each flood of the Nile with knotted ropes, and Babylonian tablets \
    record tables of squares and reciprocals that made such calculations quick. Greek geometers \
    later proved general statements about areas, such as the fact that a square built on the \
    diagonal of another square has twice its area. Medieval merchants in Italy learned \
    arithmetic from books that mixed problems about cloth, coins and wine barrels with rules \
    for false position, an early way to solve linear equations by guessing and correcting. In \
    the seventeenth century, Descartes joined algebra and geometry by naming points with pairs \
    of numbers, and soon after, Newton and Leibniz described rates of change and accumulated \
    quantities, which made it possible to compute areas under curves and not only of \
    polygons. Modern students meet all of these ideas within a few years of school, often \
    without noticing how long humanity took to find them. When you solve the farmer's \
    problem, write each quantity with its unit, name the unknown width w, express the length \
    as 3w, set up one equation from the perimeter, solve it, and only then multiply to obtain \
    the area. Finally, estimate the answer roughly in your head to see whether the exact result \
    is plausible: a field a few hundred metres around cannot have an area of many square \
    kilometres, and it cannot be as small as a kitchen table either. Other useful habits: draw \
    a sketch, label the sides, and keep fractions exact until the last step. Answer: ";

/// Runs the workload and prints the report.
pub fn profile_kv(a: ProfileKvArgs) -> anyhow::Result<()> {
    if a.width == 0 || a.prompt_tokens < 2 || a.gen_tokens == 0 {
        bail!("--width and --gen-tokens must be at least 1 and --prompt-tokens at least 2");
    }
    let (mut engine, tokenizer, _) = a.model.load()?;
    let need = a.prompt_tokens + a.gen_tokens;
    if need > engine.model.cfg.max_context {
        bail!(
            "{need} tokens exceed the model's context of {}",
            engine.model.cfg.max_context
        );
    }
    let unit = tokenizer.encode(TEXT, false, false)?;
    let mut prompt = tokenizer.encode("", true, false)?;
    while prompt.len() < a.prompt_tokens {
        prompt.extend_from_slice(&unit);
    }
    prompt.truncate(a.prompt_tokens);

    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let gpu = GpuMem::open(match a.model.device {
        arbor_kernels::Device::Cuda(i) => i as u32,
        _ => 0,
    });
    if !gpu.available() {
        eprintln!(
            "NVML absent: engine accounting only ({})",
            gpu.note().trim_start_matches("NVML absent: ")
        );
    }
    let mut tl = Timeline::new(gpu);
    let t0 = Instant::now();
    let branches = match a.strategy {
        Workload::BestOfN => best_of_n(&mut engine, &prompt, &a, &mut tl)?,
        Workload::Beam => beam(&mut engine, &prompt, &a, &mut tl)?,
    };
    let secs = t0.elapsed().as_secs_f64();
    let stats = engine.kv_stats();
    engine.cache().check().map_err(anyhow::Error::msg)?;
    report(&engine, &a, &branches, &stats, secs);
    let fits = fits_table(
        match a.strategy {
            Workload::BestOfN => "best-of-n",
            Workload::Beam => "beam",
        },
        engine.model.cfg.param_count(),
        stats.bytes_per_unique_token().unwrap_or(1.0),
        engine.cache().layout().bytes_per_token(2),
        a.gen_tokens,
        engine.model.cfg.max_context,
    );
    if a.json {
        eprint!("{fits}");
    } else {
        print!("\n{fits}");
    }
    if let Some(dir) = &a.out {
        let csv = dir.join("kv_timeline.csv");
        tl.write_csv(&csv)
            .with_context(|| format!("writing {}", csv.display()))?;
        let title = format!("KV memory over time: {:?} width {}", a.strategy, a.width);
        tl.write_svg(&dir.join("kv_timeline.svg"), &title)?;
        eprintln!(
            "wrote {} steps to {} and kv_timeline.svg",
            tl.samples.len(),
            csv.display()
        );
    }
    for s in branches {
        engine.free_seq(s);
    }
    Ok(())
}

/// Forks `width` branches from the prompt and samples `gen_tokens` each, all branches in one
/// step per token.
fn best_of_n(
    e: &mut Engine,
    prompt: &[u32],
    a: &ProfileKvArgs,
    tl: &mut Timeline,
) -> anyhow::Result<Vec<SeqId>> {
    let (last, head) = prompt.split_last().expect("prompt has ≥ 2 tokens");
    let root = e.new_seq();
    run(e, vec![step_of(root, head.to_vec(), None)], tl)?;
    let mut branches = Vec::with_capacity(a.width);
    for _ in 0..a.width {
        branches.push(e.fork_seq(root)?);
    }
    e.free_seq(root);
    let params = |i: usize| SamplingParams {
        temperature: a.temperature,
        seed: a.seed.wrapping_add(i as u64),
        ..Default::default()
    };
    let mut next: Vec<u32> = vec![*last; a.width];
    // Step t writes token t (the prompt's last, then generated ones) and samples the next;
    // the last step only writes the final generated token.
    for t in 0..=a.gen_tokens {
        let seqs = branches
            .iter()
            .zip(&next)
            .enumerate()
            .map(|(i, (&s, &tok))| step_of(s, vec![tok], (t < a.gen_tokens).then(|| params(i))))
            .collect();
        let out = run(e, seqs, tl)?;
        next = out
            .iter()
            .map(|o| o.sample.as_ref().map_or(0, |s| s.token))
            .collect();
    }
    Ok(branches)
}

/// Token-level beam search by cumulative log-probability.
fn beam(
    e: &mut Engine,
    prompt: &[u32],
    a: &ProfileKvArgs,
    tl: &mut Timeline,
) -> anyhow::Result<Vec<SeqId>> {
    let (last, head) = prompt.split_last().expect("prompt has ≥ 2 tokens");
    let root = e.new_seq();
    run(e, vec![step_of(root, head.to_vec(), None)], tl)?;
    // (sequence, cumulative logprob, token to append next)
    let mut beams: Vec<(SeqId, f64, u32)> = vec![(root, 0.0, *last)];
    let greedy = SamplingParams {
        top_logprobs: a.width,
        ..Default::default()
    };
    for _ in 0..a.gen_tokens {
        let seqs = beams
            .iter()
            .map(|&(s, _, tok)| step_of(s, vec![tok], Some(greedy.clone())))
            .collect();
        let out = run(e, seqs, tl)?;
        let mut cands: Vec<(f64, usize, u32)> = Vec::new();
        for (b, o) in out.iter().enumerate() {
            let s = o.sample.as_ref().context("beam step returned no sample")?;
            for &(tok, lp) in &s.top_logprobs {
                cands.push((beams[b].1 + lp as f64, b, tok));
            }
        }
        cands.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        cands.truncate(a.width);
        let mut used = vec![false; beams.len()];
        let mut next = Vec::with_capacity(a.width);
        // Winners keep their sequence the first time, fork it after that.
        for &(score, b, tok) in &cands {
            let seq = if std::mem::replace(&mut used[b], true) {
                e.fork_seq(beams[b].0)?
            } else {
                beams[b].0
            };
            next.push((seq, score, tok));
        }
        for (b, &(s, _, _)) in beams.iter().enumerate() {
            if !used[b] {
                e.free_seq(s);
            }
        }
        beams = next;
    }
    // Write the last chosen tokens.
    let seqs = beams
        .iter()
        .map(|&(s, _, tok)| step_of(s, vec![tok], None))
        .collect();
    run(e, seqs, tl)?;
    Ok(beams.into_iter().map(|(s, _, _)| s).collect())
}

fn step_of(seq: SeqId, tokens: Vec<u32>, sample: Option<SamplingParams>) -> SeqStep {
    SeqStep {
        seq,
        tokens,
        sample,
        logits: LogitsMode::None,
        ..Default::default()
    }
}

/// Steps the engine and samples the timeline.
fn run(
    e: &mut Engine,
    seqs: Vec<SeqStep>,
    tl: &mut Timeline,
) -> anyhow::Result<Vec<arbor_runtime::SeqOutput>> {
    let out = e.step(&ForwardBatch { seqs })?;
    tl.record(e);
    Ok(out)
}

fn report(e: &Engine, a: &ProfileKvArgs, branches: &[SeqId], st: &KvStats, secs: f64) {
    let ps = st.page_size;
    // What the same branches would hold with private pages (no sharing): each its own pages.
    let private_pages: usize = branches
        .iter()
        .map(|&s| BlockTable::pages_for(e.cache().len(s), ps))
        .sum();
    let unique = st.unique_tokens.max(1) as f64;
    let shared_ratio = st.bytes_per_unique_token().unwrap_or(0.0);
    let private_ratio = (private_pages * ps) as f64 / unique;
    let strategy = match a.strategy {
        Workload::BestOfN => "best-of-n",
        Workload::Beam => "beam",
    };
    if a.json {
        let v = serde_json::json!({
            "strategy": strategy,
            "width": a.width,
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "page_size": ps,
            "pages_in_use": st.pages_in_use,
            "pages_cached": st.pages_cached,
            "pages_total": st.pages_total,
            "unique_tokens": st.unique_tokens,
            "tokens_held": st.tokens_held,
            "kv_bytes_in_use": st.bytes_in_use(),
            "kv_bytes_per_token": st.bytes_per_token(),
            "bytes_per_unique_token": shared_ratio,
            "private_copies_bytes_per_unique_token": private_ratio,
            "computed_tokens": e.computed_tokens(),
            "seconds": secs,
        });
        println!("{v}");
        return;
    }
    let mib = |pages: usize| (pages * st.page_bytes) as f64 / (1 << 20) as f64;
    println!(
        "{strategy} width {} · prompt {} + {} generated · page {} tokens",
        a.width, a.prompt_tokens, a.gen_tokens, ps
    );
    println!(
        "pages in use     {:>7} ({:.1} MiB)   cached {}   total {}",
        st.pages_in_use,
        mib(st.pages_in_use),
        st.pages_cached,
        st.pages_total
    );
    println!(
        "token positions  {:>7} distinct, {} held by {} branches",
        st.unique_tokens,
        st.tokens_held,
        branches.len()
    );
    println!("bytes per unique token  {shared_ratio:.4} (shared pages)");
    println!(
        "                        {private_ratio:.4} (private copies per branch: {} pages, {:.1} MiB)",
        private_pages,
        mib(private_pages)
    );
    println!("computed {} positions in {secs:.1} s", e.computed_tokens());
}
