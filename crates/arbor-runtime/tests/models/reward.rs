//! Reward heads and the hidden-state summary against HF transformers (fixtures made by
//! scripts/make_fixtures.py): a `Qwen2ForSequenceClassification` outcome RM (1 label, bf16),
//! a `LlamaForTokenClassification` process RM (2 labels with bias, f16), and the llama
//! fixture's final-normed hidden states. Everything runs through `Engine::step` with several
//! sequences of different lengths batched and their prompts split into chunks over pages.

use super::errors;
use arbor_runtime::safetensors::SafeTensors;
use arbor_runtime::{Engine, EngineOptions, ForwardBatch, LogitsMode, Model, RewardKind, SeqStep};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn json(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference is JSON")
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("list of id lists")
        .iter()
        .map(|s| {
            let s = s.as_array().expect("ids");
            s.iter().map(|t| t.as_u64().expect("id") as u32).collect()
        })
        .collect()
}

/// An f32 tensor of a safetensors file, flattened.
fn tensor(file: &Path, name: &str) -> Vec<f32> {
    let st = SafeTensors::open_files(&[file.to_path_buf()]).expect("safetensors");
    let t = st.get(name).expect("tensor present");
    st.data(t)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Small pages so that every prompt spans several.
fn engine(model: Model) -> Engine {
    let opts = EngineOptions {
        kv_cache_bytes: 16 << 20,
        page_size: 8,
    };
    Engine::new(model, &opts).expect("engine")
}

/// What one sequence got back from each step it was in.
#[derive(Default)]
struct Got {
    /// Output rows of every step, concatenated.
    rows: Vec<f32>,
    /// Hidden summary of every step, with the index of the last token it covers.
    hidden: Vec<(usize, Vec<f32>)>,
}

/// Runs all of `prompts` together: each step carries the next chunk of every unfinished
/// prompt, chunk sizes differing per sequence and per step, then frees the sequences.
/// `hidden[k]`: prompt k asks for the hidden summary (no entry: it does not).
fn run_batched(
    e: &mut Engine,
    prompts: &[Vec<u32>],
    mode: LogitsMode,
    hidden: &[bool],
) -> Vec<Got> {
    let seqs: Vec<_> = prompts.iter().map(|_| e.new_seq()).collect();
    let mut at = vec![0usize; prompts.len()];
    let mut got: Vec<Got> = prompts.iter().map(|_| Got::default()).collect();
    for round in 0.. {
        let mut which = Vec::new();
        let mut steps = Vec::new();
        for (k, p) in prompts.iter().enumerate() {
            if at[k] == p.len() {
                continue;
            }
            let n = (5 + 7 * k + 3 * round).min(p.len() - at[k]);
            steps.push(SeqStep {
                seq: seqs[k],
                tokens: p[at[k]..at[k] + n].to_vec(),
                logits: mode,
                hidden: hidden.get(k) == Some(&true),
                ..Default::default()
            });
            which.push(k);
            at[k] += n;
        }
        if steps.is_empty() {
            break;
        }
        let out = e.step(&ForwardBatch { seqs: steps }).expect("step");
        for (k, o) in which.into_iter().zip(out) {
            got[k].rows.extend_from_slice(&o.logits);
            let asked = hidden.get(k) == Some(&true);
            assert_eq!(o.hidden.is_empty(), !asked, "hidden only when asked");
            if asked {
                got[k].hidden.push((at[k] - 1, o.hidden));
            }
        }
    }
    seqs.into_iter().for_each(|s| e.free_seq(s));
    assert_eq!(e.cache().allocator().num_in_use(), 0, "pages leaked");
    got
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let (nmse, max) = errors(got, want);
    println!("{what}: NMSE {nmse:.3e}, max abs {max:.3e}");
    assert!(
        nmse <= 1e-6 && max <= 1e-3,
        "{what}: NMSE {nmse:.3e}, max abs {max:.3e}"
    );
}

#[test]
fn outcome_rm_scores_match_transformers() {
    let dir = fixture("reward-orm");
    // The normal loader, tokenizer included.
    let loaded = arbor_runtime::load(&dir).expect("load reward-orm");
    assert_eq!(loaded.tokenizer.vocab_size(), loaded.model.cfg.vocab_size);
    let head = loaded.model.cfg.reward.clone().expect("a reward head");
    assert_eq!(head.kind, RewardKind::Outcome);
    assert_eq!(head.architecture, "Qwen2ForSequenceClassification");
    assert_eq!(
        (head.num_labels, head.labels.as_slice()),
        (1, &["LABEL_0".to_string()][..])
    );
    assert_eq!(loaded.model.cfg.out_dim(), 1);
    let mut e = engine(loaded.model);
    let r = json(&dir);

    // Sequence scores: 5 sequences of 80, 80, 23, 57 and 1 tokens in one batch; a step's
    // `Last` row is the score of the sequence so far, the final one the sequence's score.
    let inputs = ids(&r["score_inputs"]);
    let got = run_batched(&mut e, &inputs, LogitsMode::Last, &[]);
    let last: Vec<f32> = got
        .iter()
        .map(|g| *g.rows.last().expect("a score"))
        .collect();
    let want: Vec<f32> = r["sequence_scores"]
        .as_array()
        .expect("scores")
        .iter()
        .map(|s| s[0].as_f64().expect("score") as f32)
        .collect();
    assert_close("ORM sequence scores", &last, &want);
    for (g, w) in last.iter().zip(&want) {
        assert!((head.prob(&[*g]) - 1.0 / (1.0 + (-w).exp())).abs() < 1e-4);
    }

    // The head at every position.
    let inputs = ids(&r["input_ids"]);
    let got = run_batched(&mut e, &inputs, LogitsMode::All, &[]);
    for (i, g) in got.iter().enumerate() {
        let want = tensor(&dir.join("logits.safetensors"), &format!("logits.{i}"));
        assert_close(&format!("ORM seq {i} every position"), &g.rows, &want);
    }
}

#[test]
fn process_rm_scores_match_transformers() {
    let dir = fixture("reward-prm");
    let model = Model::load(&dir).expect("load reward-prm");
    let head = model.cfg.reward.clone().expect("a reward head");
    // transformers writes no num_labels/id2label for two labels: HF's default of 2 applies.
    assert_eq!(head.kind, RewardKind::Process);
    assert_eq!((head.num_labels, head.positive), (2, 1));
    let mut e = engine(model);
    let inputs = ids(&json(&dir)["input_ids"]);
    let prompts = [inputs[0].clone(), inputs[1][..61].to_vec()];
    let got = run_batched(&mut e, &prompts, LogitsMode::All, &[]);
    for (i, g) in got.iter().enumerate() {
        let want = tensor(&dir.join("logits.safetensors"), &format!("logits.{i}"));
        let want = &want[..prompts[i].len() * 2];
        assert_close(&format!("PRM seq {i} every position"), &g.rows, want);
        // p(good) at each position is the softmax of label 1.
        for (row, w) in g.rows.chunks_exact(2).zip(want.chunks_exact(2)) {
            let p = 1.0 / (1.0 + (w[0] - w[1]).exp());
            assert!(
                (head.prob(row) - p).abs() < 1e-4,
                "{} vs {p}",
                head.prob(row)
            );
        }
    }

    // `score` requests on a reward model give log-softmax over the labels.
    let s = e.new_seq();
    let n = inputs[0].len();
    let out = e
        .step(&ForwardBatch {
            seqs: vec![SeqStep {
                seq: s,
                tokens: inputs[0].clone(),
                logits: LogitsMode::Last,
                score: vec![(n - 1, 1)],
                ..Default::default()
            }],
        })
        .expect("step");
    let lp = head.prob(&out[0].logits).ln();
    assert!((out[0].scores[0] - lp).abs() < 1e-4);
    e.free_seq(s);
}

#[test]
fn hidden_summary_matches_transformers() {
    let dir = fixture("llama");
    let model = Model::load(&dir).expect("load llama");
    let (h, vocab) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let lm_head = tensor(&dir.join("model.safetensors"), "lm_head.weight");
    let mut e = engine(model);
    let inputs = ids(&json(&dir)["input_ids"]);
    // The middle sequence asks for no summary; the last is a prefix of reference 1.
    let prompts = [
        inputs[0][..45].to_vec(),
        inputs[0].clone(),
        inputs[1][..30].to_vec(),
    ];
    let got = run_batched(&mut e, &prompts, LogitsMode::Last, &[true, false, true]);
    for (i, g) in [(0, &got[0]), (1, &got[2])] {
        let want = tensor(&dir.join("hidden.safetensors"), &format!("hidden.{i}"));
        assert!(g.hidden.len() >= 2, "several steps");
        for (step, (pos, hid)) in g.hidden.iter().enumerate() {
            let want = &want[pos * h..(pos + 1) * h];
            assert_close(
                &format!("llama seq {i} hidden after token {pos}"),
                hid,
                want,
            );
            // It is what the LM head reads: hidden · lm_headᵀ = the step's logits.
            let logits = &g.rows[step * vocab..(step + 1) * vocab];
            let mine: Vec<f32> = lm_head
                .chunks_exact(h)
                .map(|w| w.iter().zip(hid).map(|(a, b)| a * b).sum())
                .collect();
            let (nmse, _) = errors(&mine, logits);
            assert!(nmse < 1e-9, "hidden · lm_head vs logits: NMSE {nmse:.3e}");
        }
    }
}

#[test]
fn reward_models_refuse_sampling_and_out_of_range_labels() {
    let mut e = engine(Model::load(&fixture("reward-orm")).expect("load"));
    let s = e.new_seq();
    let bad = [
        SeqStep {
            seq: s,
            tokens: vec![1, 2],
            sample: Some(Default::default()),
            ..Default::default()
        },
        SeqStep {
            seq: s,
            tokens: vec![1, 2],
            score: vec![(1, 1)], // one label: only label 0 exists
            ..Default::default()
        },
    ];
    for b in bad {
        let err = e
            .step(&ForwardBatch { seqs: vec![b] })
            .expect_err("refused");
        println!("{err}");
    }
    assert_eq!(e.seq_tokens(s), Some(&[][..]), "nothing appended");
}

#[test]
fn unsupported_classifier_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("arbor-reward-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let text = std::fs::read_to_string(fixture("reward-orm").join("config.json")).expect("config");
    let text = text.replace(
        "Qwen2ForSequenceClassification",
        "Qwen2ForProcessRewardModel",
    );
    std::fs::write(dir.join("config.json"), text).expect("write config");
    let result = arbor_runtime::load(&dir);
    std::fs::remove_dir_all(&dir).ok();
    let msg = result.err().expect("refused").to_string();
    println!("{msg}");
    assert!(
        msg.contains("Qwen2ForProcessRewardModel")
            && msg.contains("Qwen2ForSequenceClassification")
            && msg.contains("LlamaForTokenClassification"),
        "{msg}"
    );
}
