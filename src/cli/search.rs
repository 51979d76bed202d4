//! `arbor search`: runs a search strategy on one prompt or on every line of a JSONL dataset,
//! all prompts sharing the scheduler's steps. One JSON object per prompt on stdout: answer,
//! candidates with scores, accounting; progress on stderr.

use super::model::ModelArgs;
use anyhow::{bail, Context};
use arbor_kernels::ops::SamplingParams;
use arbor_search::spec::{self, VerifierOptions};
use arbor_search::strategies::adaptive::Adaptive;
use arbor_search::verifier::Verifier;
use arbor_search::{strategies, Outcome, Params, Scheduler, SchedulerOptions, SearchRequest};
use clap::Args;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Strategy: sampling, best-of-n, vote, weighted-vote, beam, step-beam, dvts, lookahead,
    /// mcts, rebase, st-bon, early-stop, backtrack, tournament, pdr, adaptive.
    #[arg(long)]
    pub strategy: String,
    /// Branches, beams or samples (the strategy's width).
    #[arg(long, default_value_t = 4)]
    pub width: usize,
    /// Strategy parameter `name=value` (repeatable; see the strategy's documentation).
    #[arg(long = "param", short = 'P')]
    pub params: Vec<String>,
    /// Verifier: `judge` (the policy as LM-as-judge, the default), `command:CMD` (stdin JSON
    /// {question, answer} → a number on stdout), `code[:PYTHON]` (runs each candidate Python
    /// program on the prompt's worked examples under limits; score = examples passed, ties to
    /// the largest cluster of identical behaviour), `rule` (the extracted answer equals the
    /// dataset line's "answer"), `regex:PATTERN` (1 if the candidate matches), or a verifier
    /// model run beside the policy in the same steps: `orm:DIR` (an outcome reward model,
    /// HF `*ForSequenceClassification`), `prm:DIR` (a process reward model,
    /// `*ForTokenClassification`, read at the step separator "\n\n") or `judge:MODEL` (another
    /// LM as judge).
    #[arg(long, default_value = "judge")]
    pub verifier: String,
    /// KV cache of a verifier model, in GB. With the policy's it is one budget: a verifier
    /// model borrows the policy's spare pages while candidates wait, and lends its idle pool
    /// to a policy short of pages (taken back when candidates come).
    #[arg(long, default_value_t = 0.25)]
    pub verifier_kv_gb: f64,
    /// Seconds an external verifier command or a code candidate may take.
    #[arg(long, default_value_t = 10.0)]
    pub verifier_timeout: f64,
    /// The question.
    #[arg(long, conflicts_with = "dataset")]
    pub prompt: Option<String>,
    /// JSONL file: one object per line with "prompt" (or "question") and optionally "answer"
    /// and "id".
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Write each search's tree as JSON (one line per prompt) to this file.
    #[arg(long)]
    pub tree: Option<PathBuf>,
    /// Send the prompt as plain text instead of a chat turn.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop a search after this many policy tokens and answer with its best so far.
    #[arg(long)]
    pub max_policy_tokens: Option<u64>,
    /// Searches running at once (dataset mode).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
}

struct Item {
    id: String,
    question: String,
    answer: Option<String>,
}

fn items(a: &SearchArgs) -> anyhow::Result<Vec<Item>> {
    if let Some(p) = &a.prompt {
        return Ok(vec![Item {
            id: "0".into(),
            question: p.clone(),
            answer: None,
        }]);
    }
    let Some(path) = &a.dataset else {
        bail!("give a question with --prompt TEXT or a JSONL file with --dataset FILE");
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        let q = v
            .get("prompt")
            .or_else(|| v.get("question"))
            .and_then(|x| x.as_str())
            .with_context(|| {
                format!(
                    "{}:{}: no \"prompt\" or \"question\" text",
                    path.display(),
                    i + 1
                )
            })?;
        let answer = v.get("answer").map(|x| match x {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        let id = v
            .get("id")
            .or_else(|| v.get("task_id"))
            .map_or(i.to_string(), |x| {
                x.as_str().map_or(x.to_string(), str::to_string)
            });
        out.push(Item {
            id,
            question: q.to_string(),
            answer,
        });
    }
    if out.is_empty() {
        bail!("{} holds no prompt", path.display());
    }
    Ok(out)
}

fn verifier(a: &SearchArgs, item: &Item, models: &[(String, usize)]) -> anyhow::Result<Verifier> {
    if !(a.verifier_timeout > 0.0 && a.verifier_timeout.is_finite()) {
        bail!("--verifier-timeout must be a positive number of seconds");
    }
    let opts = VerifierOptions {
        command_timeout: Duration::from_secs_f64(a.verifier_timeout),
        allow_command: true,
        models: models.to_vec(),
    };
    spec::verifier(&a.verifier, item.answer.as_deref(), &opts).map_err(|e| {
        if a.verifier == "rule" {
            anyhow::anyhow!("--verifier rule needs an \"answer\" field on each dataset line")
        } else {
            anyhow::anyhow!(e)
        }
    })
}

pub fn search(a: SearchArgs) -> anyhow::Result<()> {
    if a.width == 0 {
        bail!("--width must be at least 1");
    }
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let params = Params::parse(a.width, &a.params).map_err(anyhow::Error::msg)?;
    // Check the strategy and its parameters before loading anything.
    strategies::build(&a.strategy, &params).map_err(anyhow::Error::msg)?;
    let items = items(&a)?;
    // Adaptive over a data set: one sample budget split across its prompts by marginal gain.
    let pool = match a.strategy.as_str() {
        "adaptive" if items.len() > 1 && params.bool("pooled", true).unwrap_or(true) => {
            let s = Adaptive::from_params(&params).map_err(anyhow::Error::msg)?;
            Some(s.pool_for(items.len()))
        }
        _ => None,
    };
    let (engine, tokenizer, _) = a.model.load()?;
    let mut prompts = Vec::with_capacity(items.len());
    for it in &items {
        prompts.push(
            tokenizer.encode_prompt(&it.question, !a.raw && tokenizer.chat_template().is_some())?,
        );
    }
    let mut sched = Scheduler::new(engine, tokenizer, SchedulerOptions::default());
    let mut models = Vec::new();
    if spec::is_model(&a.verifier) {
        if !(a.verifier_kv_gb > 0.0 && a.verifier_kv_gb.is_finite()) {
            bail!("--verifier-kv-gb must be a positive number");
        }
        let bytes = (a.verifier_kv_gb * 1e9) as usize;
        let m = spec::load_model(&a.verifier, bytes, a.model.page_size, a.model.device)
            .map_err(anyhow::Error::msg)?;
        models.push((a.verifier.clone(), sched.add_verifier_model(m)));
    }
    let mut tree_out = match &a.tree {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut queue: VecDeque<usize> = (0..items.len()).collect();
    let mut running: BTreeMap<u64, usize> = BTreeMap::new();
    let mut results: BTreeMap<usize, serde_json::Value> = BTreeMap::new();
    let mut next_print = 0;
    let stdout = std::io::stdout();
    while !queue.is_empty() || !running.is_empty() {
        while running.len() < a.concurrency {
            let Some(i) = queue.pop_front() else { break };
            let it = &items[i];
            let req = SearchRequest {
                prompt: prompts[i].clone(),
                question: it.question.clone(),
                strategy: match &pool {
                    Some(pool) => Box::new(
                        Adaptive::from_params(&params)
                            .map_err(anyhow::Error::msg)?
                            .share(pool),
                    ),
                    None => strategies::build(&a.strategy, &params).map_err(anyhow::Error::msg)?,
                },
                verifiers: vec![verifier(&a, it, &models)?],
                sampling: SamplingParams {
                    temperature: a.temperature,
                    top_p: a.top_p,
                    seed: a.seed.wrapping_add(i as u64 * 1_000_003),
                    ..Default::default()
                },
                max_policy_tokens: a.max_policy_tokens,
                max_wall: None,
            };
            running.insert(sched.submit_search(req), i);
        }
        sched.tick();
        for (id, outcome) in sched.take_finished() {
            let Some(i) = running.remove(&id) else {
                continue;
            };
            let it = &items[i];
            let v = match outcome {
                Outcome::Search(Ok(r)) => {
                    if let Some(w) = tree_out.as_mut() {
                        writeln!(
                            w,
                            "{}",
                            serde_json::json!({"id": it.id, "tree": r.tree.to_json()})
                        )?;
                    }
                    eprintln!(
                        "[{}/{}] {}: {} candidates, {} policy tokens, {} ms",
                        results.len() + 1,
                        items.len(),
                        it.id,
                        r.candidates.len(),
                        r.accounting.policy_tokens,
                        r.accounting.wall_ms
                    );
                    serde_json::json!({
                        "id": it.id,
                        "strategy": r.strategy,
                        "verifier": r.verifiers,
                        "answer": r.answer_text,
                        "candidates": r.candidates.iter().map(|c| {
                            let mut j = serde_json::json!({
                                "text": c.text, "score": c.score, "logprob": c.logprob,
                                "tokens": c.tokens, "finish": c.finish,
                            });
                            if let Some(g) = c.group {
                                j["group"] = g.into();
                            }
                            j
                        }).collect::<Vec<_>>(),
                        "accounting": r.accounting,
                        "note": r.note,
                    })
                }
                Outcome::Search(Err(e)) => {
                    eprintln!(
                        "[{}/{}] {}: error: {e}",
                        results.len() + 1,
                        items.len(),
                        it.id
                    );
                    serde_json::json!({"id": it.id, "error": e})
                }
                Outcome::Generate(_) => continue,
            };
            results.insert(i, v);
        }
        // Print in dataset order as results become contiguous.
        while let Some(v) = results.get(&next_print) {
            writeln!(stdout.lock(), "{v}")?;
            next_print += 1;
        }
    }
    if let Some(mut w) = tree_out {
        w.flush()?;
    }
    if let Some(pool) = pool {
        let (granted, unspent) = pool.totals();
        eprintln!(
            "adaptive: {granted} samples beyond the probes went to the prompts with the most \
             to gain; {unspent} of the pooled budget had no gain left and were not drawn"
        );
    }
    Ok(())
}
