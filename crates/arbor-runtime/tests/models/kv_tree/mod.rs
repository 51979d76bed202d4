//! The paged, reference-counted KV cache seen through the engine: forked branches that share
//! their prefix pages compute what private copies compute, the prefix cache skips exactly the
//! whole pages it holds, copy-on-write keeps branches apart, a preempted sequence comes back
//! with the same logits, and a small pool evicts, or refuses cleanly, instead of failing.
//!
//! Every scenario runs on the tiny qwen2 fixture; siblings, the tree and prefix reuse also run
//! on SmolLM2-135M Q4_1 (kept small: a position costs ~11 ms there in this profile). On the
//! fixture's f32 weights the matmuls sum in a different order for fewer than 4 rows than for
//! more, so one position computed in batches of different shapes agrees to ~1e-6 relative, not
//! bitwise: there logits are compared by NMSE (observed ≤ 7e-12). On SmolLM2 (quantised
//! weights, fast path) each row's arithmetic does not depend on the batch, so logits must be
//! bitwise equal.
//!
//! The reference for a branch is always the same tokens run by one private sequence in an
//! engine whose prefix cache is empty: prompt in one step, then one token per step.

use super::{errors, smollm2};
use arbor_kernels::kv::{BlockTable, SeqId};
use arbor_kernels::KernelError;
use arbor_runtime::model::Precision;
use arbor_runtime::{
    Engine, EngineOptions, ForwardBatch, LogitsMode, Model, RuntimeError, SeqOutput, SeqStep,
};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Largest NMSE between fixture logits of one position computed in different batch shapes.
const FIXTURE_NMSE: f64 = 1e-10;

/// A model to run the scenarios on.
struct Rig {
    name: &'static str,
    make: fn(usize) -> Engine,
    page_size: usize,
    /// Logits must be bitwise equal (else within [`FIXTURE_NMSE`]).
    exact: bool,
    /// Prompt tokens to take prefixes of (real text on SmolLM2).
    text: Vec<u32>,
    vocab: u32,
}

fn fixture_engine(kv_cache_bytes: usize, page_size: usize) -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen2");
    Engine::new(
        Model::load(&dir).expect("fixture"),
        &EngineOptions {
            kv_cache_bytes,
            page_size,
        },
    )
    .expect("engine")
}

/// Pseudo-random tokens below `vocab` (an LCG, so prompts with different salts differ at
/// every position with high probability).
fn toks(n: usize, salt: u64, vocab: u32) -> Vec<u32> {
    let mut x = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % u64::from(vocab)) as u32
        })
        .collect()
}

const SMOL_TEXT: &str = "The old lighthouse keeper climbed the spiral stairs every evening \
    at dusk, counting the steps as his father had taught him. There were one hundred and \
    twelve of them, worn smooth in the middle by a century of boots. At the top he trimmed \
    the wick, polished the great lens with a soft cloth, and lit the lamp. Out on the water \
    the fishing boats were coming home, their sails dark against the orange sky, and the gulls \
    followed them in long, lazy circles. He liked this hour best. The wind usually dropped, \
    the sea turned the colour of pewter, and from the gallery he could see the whole bay: the \
    harbour wall, the church on the hill, the row of white cottages where the fishermen lived. \
    In winter the storms came from the west and the waves broke over the rocks below with a \
    sound like cannon fire. Then he would sit by the lamp all night, writing in the log: the \
    time, the wind, the ships that passed, the ones that did not. His daughter, who taught at \
    the village school, said that nobody read those logs any more, that the light would soon be \
    automatic and the keeper's cottage sold to people from the city. He knew she was right. \
    Still, every evening he climbed the stairs, counted the steps, trimmed the wick and lit the \
    lamp, because somewhere out there a boat might be looking for it, and because it was the \
    only thing he had ever been good at. When the inspector finally came in the spring, he \
    brought a box of electronic parts, a new lamp that needed no oil, and a letter that thanked \
    the keeper for forty years of faithful service.";

/// SmolLM2 (fast path) with a 64 MiB KV cache in pages of `page_size`.
fn smollm2_engine(page_size: usize) -> Engine {
    let mut model = Model::load(&smollm2::model_path()).expect("load SmolLM2");
    model.precision = Precision::Fast;
    Engine::new(
        model,
        &EngineOptions {
            kv_cache_bytes: 64 << 20,
            page_size,
        },
    )
    .expect("engine")
}

impl Rig {
    /// The qwen2 fixture (context 128) in pages of 8.
    fn fixture() -> Rig {
        let make = |ps| fixture_engine(4 << 20, ps);
        let vocab = make(8).model.cfg.vocab_size as u32;
        Rig {
            name: "fixture",
            make,
            page_size: 8,
            exact: false,
            text: toks(128, 0, vocab),
            vocab,
        }
    }

    fn smollm2(page_size: usize) -> Rig {
        static TEXT: OnceLock<Vec<u32>> = OnceLock::new();
        let text = TEXT.get_or_init(|| {
            let (_, tok) = smollm2::engine(Precision::Fast);
            tok.encode(SMOL_TEXT, true, false).expect("encode")
        });
        assert!(text.len() >= 300, "{} tokens of text", text.len());
        Rig {
            name: "SmolLM2",
            make: smollm2_engine,
            page_size,
            exact: true,
            text: text.clone(),
            vocab: 49152,
        }
    }

    fn engine(&self) -> Engine {
        let e = (self.make)(self.page_size);
        assert_eq!(e.model.cfg.vocab_size as u32, self.vocab);
        e
    }

    /// The token forced on `branch` at decode step `step` (branches differ at every step).
    fn forced(&self, branch: usize, step: usize) -> u32 {
        ((1000 + branch * 53 + step * 29) % self.vocab as usize) as u32
    }

    /// Asserts `got` equals `want`: bitwise on an exact rig, else within [`FIXTURE_NMSE`].
    fn same(&self, got: &[f32], want: &[f32], what: &str) {
        let (nmse, max) = errors(got, want);
        if self.exact {
            let differ = got
                .iter()
                .zip(want)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            assert!(
                got.len() == want.len() && differ == 0,
                "{} {what}: {differ} of {} logits differ (NMSE {nmse:.3e}, max abs {max:.3e})",
                self.name,
                want.len()
            );
        } else {
            assert!(
                nmse < FIXTURE_NMSE,
                "{} {what}: NMSE {nmse:.3e} (max abs {max:.3e})",
                self.name
            );
        }
    }

    /// Logits after each of `steps`, for one private sequence that runs `prompt` in one step
    /// and then `steps` one token per step, in `ctl` with its prefix cache emptied first.
    fn solo(&self, ctl: &mut Engine, prompt: &[u32], steps: &[u32]) -> Vec<Vec<f32>> {
        ctl.clear_prefix_cache();
        assert_eq!(
            ctl.kv_stats().pages_in_use,
            0,
            "control engine must be empty"
        );
        let s = ctl.new_seq();
        let mut out = Vec::new();
        let first = run(ctl, s, prompt, LogitsMode::Last);
        assert_eq!(first.reused_tokens, 0, "control must compute everything");
        for &t in steps {
            out.push(run(ctl, s, &[t], LogitsMode::Last).logits);
        }
        ctl.free_seq(s);
        ctl.clear_prefix_cache();
        ok(ctl);
        out
    }
}

fn page_size(e: &Engine) -> usize {
    e.kv_stats().page_size
}

fn pages_for(len: usize, ps: usize) -> usize {
    BlockTable::pages_for(len, ps)
}

/// The KV bookkeeping invariants hold.
fn ok(e: &Engine) {
    if let Err(m) = e.cache().check() {
        panic!("KV cache bookkeeping: {m}");
    }
}

/// Frees `seqs` and checks that nothing stays in use.
fn free_all(e: &mut Engine, seqs: &[SeqId]) {
    for &s in seqs {
        e.free_seq(s);
        ok(e);
    }
    assert_eq!(
        e.kv_stats().pages_in_use,
        0,
        "pages in use after freeing all"
    );
    assert_eq!(e.kv_stats().seqs, 0);
}

fn run(e: &mut Engine, seq: SeqId, tokens: &[u32], logits: LogitsMode) -> SeqOutput {
    let mut out = e
        .step(&ForwardBatch {
            seqs: vec![SeqStep {
                seq,
                tokens: tokens.to_vec(),
                logits,
                ..Default::default()
            }],
        })
        .expect("step");
    ok(e);
    out.remove(0)
}

/// One step that appends one token to each of `seqs` and returns each one's last logits.
fn decode(e: &mut Engine, seqs: &[(SeqId, u32)]) -> Vec<Vec<f32>> {
    let out = e
        .step(&ForwardBatch {
            seqs: seqs
                .iter()
                .map(|&(seq, t)| SeqStep {
                    seq,
                    tokens: vec![t],
                    logits: LogitsMode::Last,
                    ..Default::default()
                })
                .collect(),
        })
        .expect("step");
    ok(e);
    assert_eq!(out.len(), seqs.len());
    out.into_iter()
        .zip(seqs)
        .map(|(o, &(s, _))| {
            assert_eq!(o.seq, s);
            assert_eq!((o.computed_tokens, o.reused_tokens), (1, 0));
            o.logits
        })
        .collect()
}

/// `n` siblings forked from one prompt (partial last page) decode different tokens, all in one
/// step per token; each equals its private run, and the prompt's full pages exist once.
fn siblings(rig: &Rig, n: usize, prompt_len: usize, steps: usize) {
    let mut e = rig.engine();
    let ps = page_size(&e);
    let prompt = &rig.text[..prompt_len];
    assert_ne!(prompt_len % ps, 0, "the prompt must end in a partial page");
    let root = e.new_seq();
    run(&mut e, root, prompt, LogitsMode::None);
    let kids: Vec<SeqId> = (0..n).map(|_| e.fork_seq(root).expect("fork")).collect();
    ok(&e);
    assert_eq!(e.kv_stats().pages_in_use, pages_for(prompt_len, ps));
    // The siblings keep the prompt's pages alive without the root.
    e.free_seq(root);
    ok(&e);
    assert_eq!(e.kv_stats().pages_in_use, pages_for(prompt_len, ps));

    let mut got = vec![Vec::new(); n];
    for t in 0..steps {
        let batch: Vec<(SeqId, u32)> = kids
            .iter()
            .enumerate()
            .map(|(b, &s)| (s, rig.forced(b, t)))
            .collect();
        for (b, l) in decode(&mut e, &batch).into_iter().enumerate() {
            got[b].push(l);
        }
    }

    // Sharing: the prompt's full pages once, then each sibling's own pages (its copy of the
    // prompt's partial page and what it grew).
    let len = prompt_len + steps;
    let private = pages_for(len, ps);
    let shared = prompt_len / ps;
    let st = e.kv_stats();
    assert_eq!(st.pages_in_use, shared + n * (private - shared), "{st:?}");
    assert!(
        st.pages_in_use * 2 < n * private,
        "{} pages in use, {} private",
        st.pages_in_use,
        n * private
    );
    assert_eq!(st.unique_tokens, shared * ps + n * (len - shared * ps));
    assert_eq!(st.tokens_held, n * len);
    let u = e.kv_usage(&[kids[0]]);
    assert_eq!(u.pages, private);
    assert_eq!(u.freeable_pages, private - shared);
    assert!(u.freeable_pages < u.pages);
    assert_eq!(e.kv_usage(&kids).freeable_pages, st.pages_in_use);

    // The branches really differ, and each is its private run.
    assert_ne!(got[0][steps - 1], got[1][steps - 1]);
    let mut ctl = rig.engine();
    for (b, got) in got.iter().enumerate() {
        let forced: Vec<u32> = (0..steps).map(|t| rig.forced(b, t)).collect();
        let want = rig.solo(&mut ctl, prompt, &forced);
        for t in 0..steps {
            rig.same(&got[t], &want[t], &format!("sibling {b} step {t}"));
        }
    }
    free_all(&mut e, &kids);
}

/// prompt → 3 children (decoding together) → 2 grandchildren each (6 decoding together).
fn tree(rig: &Rig, prompt_len: usize, child_steps: usize, gc_steps: usize) {
    let mut e = rig.engine();
    let ps = page_size(&e);
    let prompt = &rig.text[..prompt_len];
    let child_len = prompt_len + child_steps;
    let gc_len = child_len + gc_steps;
    assert!(
        !prompt_len.is_multiple_of(ps) && !child_len.is_multiple_of(ps),
        "forks at partial pages"
    );
    assert!(
        gc_len / ps > child_len / ps,
        "grandchildren cross a page boundary"
    );
    let root = e.new_seq();
    run(&mut e, root, prompt, LogitsMode::None);
    let children: Vec<SeqId> = (0..3).map(|_| e.fork_seq(root).expect("fork")).collect();
    let mut child_logits = vec![Vec::new(); 3];
    for t in 0..child_steps {
        let batch: Vec<(SeqId, u32)> = (0..3).map(|c| (children[c], rig.forced(c, t))).collect();
        for (c, l) in decode(&mut e, &batch).into_iter().enumerate() {
            child_logits[c].push(l);
        }
    }
    // Grandchild g descends from child g / 2.
    let gcs: Vec<SeqId> = (0..6)
        .map(|g| e.fork_seq(children[g / 2]).expect("fork"))
        .collect();
    ok(&e);
    let mut gc_logits = vec![Vec::new(); 6];
    for t in 0..gc_steps {
        let batch: Vec<(SeqId, u32)> = (0..6)
            .map(|g| (gcs[g], rig.forced(10 + g, child_steps + t)))
            .collect();
        for (g, l) in decode(&mut e, &batch).into_iter().enumerate() {
            gc_logits[g].push(l);
        }
    }

    // Root: the prompt's pages; each child: its copy of the prompt's partial page and what it
    // grew; each grandchild: its copy of its child's partial page and what it grew.
    let child_own = pages_for(child_len, ps) - prompt_len / ps;
    let gc_own = pages_for(gc_len, ps) - child_len / ps;
    let st = e.kv_stats();
    let private =
        pages_for(prompt_len, ps) + 3 * pages_for(child_len, ps) + 6 * pages_for(gc_len, ps);
    assert_eq!(
        st.pages_in_use,
        pages_for(prompt_len, ps) + 3 * child_own + 6 * gc_own,
        "{st:?}"
    );
    assert!(st.pages_in_use < private, "{st:?}, {private} private");
    let sub = e.kv_usage(&[children[0], gcs[0], gcs[1]]);
    assert_eq!(sub.pages, pages_for(child_len, ps) + 2 * gc_own);
    assert_eq!(sub.freeable_pages, child_own + 2 * gc_own);
    assert_eq!(e.kv_usage(&[gcs[0]]).freeable_pages, gc_own);

    let mut ctl = rig.engine();
    for (g, got) in gc_logits.iter().enumerate() {
        let c = g / 2;
        let forced: Vec<u32> = (0..child_steps)
            .map(|t| rig.forced(c, t))
            .chain((0..gc_steps).map(|t| rig.forced(10 + g, child_steps + t)))
            .collect();
        let want = rig.solo(&mut ctl, prompt, &forced);
        if g % 2 == 0 {
            for t in 0..child_steps {
                rig.same(
                    &child_logits[c][t],
                    &want[t],
                    &format!("child {c} step {t}"),
                );
            }
        }
        for t in 0..gc_steps {
            rig.same(
                &got[t],
                &want[child_steps + t],
                &format!("grandchild {g} step {t}"),
            );
        }
    }
    assert_ne!(gc_logits[0][gc_steps - 1], gc_logits[1][gc_steps - 1]);

    // Freeing the inner nodes first: the grandchildren keep what they share alive.
    e.free_seq(root);
    for &c in &children {
        e.free_seq(c);
    }
    ok(&e);
    assert_eq!(
        e.kv_stats().pages_in_use,
        prompt_len / ps + 3 * (child_len / ps - prompt_len / ps) + 6 * gc_own
    );
    free_all(&mut e, &gcs);
}

/// A prompt run twice reuses every full page before its last token; a prompt sharing only
/// `share` tokens reuses the whole pages among them.
fn reuse(rig: &Rig, len: usize, share: usize, other_len: usize, check_other: bool) {
    let mut e = rig.engine();
    let ps = page_size(&e);
    let prompt = &rig.text[..len];
    let a = e.new_seq();
    let cold = run(&mut e, a, prompt, LogitsMode::Last);
    assert_eq!((cold.computed_tokens, cold.reused_tokens), (len, 0));
    e.free_seq(a);
    ok(&e);
    let st = e.kv_stats();
    assert_eq!((st.pages_in_use, st.pages_cached), (0, len / ps));

    let (c0, r0) = (e.computed_tokens(), e.reused_tokens());
    let b = e.new_seq();
    let warm = run(&mut e, b, prompt, LogitsMode::Last);
    let reused = (len - 1) / ps * ps;
    assert_eq!(
        (warm.computed_tokens, warm.reused_tokens),
        (len - reused, reused)
    );
    assert_eq!(e.computed_tokens() - c0, (len - reused) as u64);
    assert_eq!(e.reused_tokens() - r0, reused as u64);
    rig.same(&warm.logits, &cold.logits, "warm vs cold prompt");
    assert_eq!(e.seq_tokens(b), Some(prompt));
    e.free_seq(b);
    ok(&e);

    // Same first `share` tokens, then different ones.
    let mut other = prompt[..share].to_vec();
    other.extend(prompt[share..].iter().rev().take(other_len - share));
    assert_ne!(other[share], prompt[share]);
    let (c0, r0) = (e.computed_tokens(), e.reused_tokens());
    let c = e.new_seq();
    let part = run(&mut e, c, &other, LogitsMode::Last);
    let reused = share / ps * ps;
    assert_eq!(
        (part.computed_tokens, part.reused_tokens),
        (other_len - reused, reused)
    );
    assert_eq!(e.computed_tokens() - c0, (other_len - reused) as u64);
    assert_eq!(e.reused_tokens() - r0, reused as u64);
    if check_other {
        let mut ctl = rig.engine();
        let s = ctl.new_seq();
        let want = run(&mut ctl, s, &other, LogitsMode::Last);
        assert_eq!(want.reused_tokens, 0);
        rig.same(&part.logits, &want.logits, "partly reused prompt vs cold");
        free_all(&mut ctl, &[s]);
    }
    free_all(&mut e, &[c]);
}

/// Forks at a partial page: each side's writes stay its own. Then a sequence truncated into an
/// indexed full page writes there without spoiling the cached page for a later request.
fn copy_on_write(rig: &Rig, prompt_len: usize) {
    let mut e = rig.engine();
    let ps = page_size(&e);
    let prompt = &rig.text[..prompt_len];
    assert_ne!(prompt_len % ps, 0);
    let parent = e.new_seq();
    run(&mut e, parent, prompt, LogitsMode::None);
    let child = e.fork_seq(parent).expect("fork");
    let held = pages_for(prompt_len, ps);
    let (x, y, z, w) = (
        rig.forced(0, 0),
        rig.forced(1, 0),
        rig.forced(2, 1),
        rig.forced(3, 1),
    );
    let cx = run(&mut e, child, &[x], LogitsMode::Last);
    assert_eq!(
        e.kv_stats().pages_in_use,
        held + 1,
        "the child copies the shared partial page"
    );
    let py = run(&mut e, parent, &[y], LogitsMode::Last);
    assert_eq!(
        e.kv_stats().pages_in_use,
        held + 1,
        "the parent owns its page again"
    );
    let cz = run(&mut e, child, &[z], LogitsMode::Last);
    let pw = run(&mut e, parent, &[w], LogitsMode::Last);
    let mut ctl = rig.engine();
    let want_parent = rig.solo(&mut ctl, prompt, &[y, w]);
    let want_child = rig.solo(&mut ctl, prompt, &[x, z]);
    rig.same(
        &py.logits,
        &want_parent[0],
        "parent after the child's write",
    );
    rig.same(&pw.logits, &want_parent[1], "parent, second step");
    rig.same(&cx.logits, &want_child[0], "child's first step");
    rig.same(&cz.logits, &want_child[1], "child after the parent's write");
    free_all(&mut e, &[parent, child]);

    // Truncation into an indexed page, then a different token there.
    let full = prompt_len / ps * ps + ps;
    let orig = &rig.text[..full + 1];
    let a = e.new_seq();
    run(&mut e, a, &orig[..full], LogitsMode::None);
    let cut = full - 3;
    e.truncate_seq(a, cut).expect("truncate");
    ok(&e);
    let t = rig.forced(4, 0);
    assert_ne!(t, orig[cut]);
    let at = run(&mut e, a, &[t], LogitsMode::Last);
    assert_eq!(
        e.kv_stats().pages_cached,
        1,
        "the indexed page was copied, not written"
    );
    let b = e.new_seq();
    let bo = run(&mut e, b, orig, LogitsMode::Last);
    assert_eq!((bo.reused_tokens, bo.computed_tokens), (full, 1));
    let want_a = rig.solo(&mut ctl, &orig[..cut], &[t]);
    let want_b = rig.solo(&mut ctl, &orig[..full], &[orig[full]]);
    rig.same(&at.logits, &want_a[0], "truncated sequence's new token");
    rig.same(
        &bo.logits,
        &want_b[0],
        "request reusing the truncated-into page",
    );
    free_all(&mut e, &[a, b]);
}

/// Two sequences share a prompt; preempting one frees only its own pages, and its next step
/// recomputes what the prefix cache no longer has and gives the never-preempted logits.
fn preemption(rig: &Rig, prompt_len: usize, b_steps: usize) {
    let mut e = rig.engine();
    let ps = page_size(&e);
    let prompt = &rig.text[..prompt_len];
    let b_len = prompt_len + b_steps;
    assert!(!prompt_len.is_multiple_of(ps) && !b_len.is_multiple_of(ps));
    assert!(b_len / ps > prompt_len / ps, "b grows a page of its own");
    assert!(
        (prompt_len + 2) / ps == prompt_len / ps,
        "a stays in its partial page"
    );
    let a = e.new_seq();
    run(&mut e, a, prompt, LogitsMode::None);
    let b = e.fork_seq(a).expect("fork");
    let a_toks = [rig.forced(0, 0), rig.forced(0, 1), rig.forced(0, 2)];
    let b_toks: Vec<u32> = (0..b_steps + 2).map(|t| rig.forced(1, t)).collect();
    for t in 0..2 {
        decode(&mut e, &[(a, a_toks[t]), (b, b_toks[t])]);
    }
    for &tok in &b_toks[2..b_steps] {
        decode(&mut e, &[(b, tok)]);
    }

    // b's own pages: its part of the prompt's partial page and what it grew.
    let own = pages_for(b_len, ps) - prompt_len / ps;
    let before = e.kv_stats();
    let usage = e.kv_usage(&[b]);
    assert_eq!(usage.freeable_pages, own);
    assert!(usage.freeable_pages < usage.pages);
    let freed = e.preempt(b).expect("preempt");
    ok(&e);
    assert_eq!(freed, own, "preempt frees only b's own pages");
    let after = e.kv_stats();
    assert_eq!(after.pages_in_use, before.pages_in_use - own);
    // b's own full pages stay cached.
    assert_eq!(after.pages_cached, b_len / ps - prompt_len / ps);
    assert_eq!(e.seq_tokens(b).map(<[u32]>::len), Some(b_len));
    assert_eq!(e.cache().len(b), 0);

    // Back: every full page of its history is still indexed (shared ones held by a, its own
    // cached), so only its partial page and the new token are computed.
    let c0 = e.computed_tokens();
    let o = run(&mut e, b, &b_toks[b_steps..b_steps + 1], LogitsMode::Last);
    let reused = b_len / ps * ps;
    assert_eq!(
        (o.reused_tokens, o.computed_tokens),
        (reused, b_len + 1 - reused)
    );
    assert_eq!(e.computed_tokens() - c0, (b_len + 1 - reused) as u64);
    let mut ctl = rig.engine();
    let want_b = rig.solo(&mut ctl, prompt, &b_toks);
    rig.same(&o.logits, &want_b[b_steps], "b after preemption");

    // Again, with its cached pages dropped: only a's shared pages remain to reuse.
    let own = pages_for(b_len + 1, ps) - prompt_len / ps;
    assert_eq!(e.preempt(b).expect("preempt"), own);
    e.clear_prefix_cache();
    ok(&e);
    assert_eq!(e.kv_stats().pages_cached, 0);
    let c0 = e.computed_tokens();
    let o = run(&mut e, b, &b_toks[b_steps + 1..], LogitsMode::Last);
    let reused = prompt_len / ps * ps;
    assert_eq!(
        (o.reused_tokens, o.computed_tokens),
        (reused, b_len + 2 - reused)
    );
    assert_eq!(e.computed_tokens() - c0, (b_len + 2 - reused) as u64);
    rig.same(
        &o.logits,
        &want_b[b_steps + 1],
        "b after preemption, cache cleared",
    );

    // a never noticed.
    let ao = decode(&mut e, &[(a, a_toks[2])]);
    let want_a = rig.solo(&mut ctl, prompt, &a_toks);
    rig.same(&ao[0], &want_a[2], "a after b's preemptions");
    free_all(&mut e, &[a, b]);
}

#[test]
fn siblings_match_private_runs() {
    siblings(&Rig::fixture(), 4, 61, 5);
}

#[test]
fn tree_matches_private_runs() {
    tree(&Rig::fixture(), 51, 3, 4);
}

#[test]
fn prefix_reuse_computes_only_the_tail() {
    // The fixture's context is 128 positions: 120 tokens in pages of 8 reuse 112.
    reuse(&Rig::fixture(), 120, 50, 120, true);
}

#[test]
fn copy_on_write_keeps_branches_apart() {
    copy_on_write(&Rig::fixture(), 37);
}

#[test]
fn preempted_sequence_recomputes_the_same_logits() {
    preemption(&Rig::fixture(), 61, 4);
}

#[test]
fn smollm2_siblings_match_private_runs() {
    siblings(&Rig::smollm2(8), 8, 17, 3);
}

#[test]
fn smollm2_tree_matches_private_runs() {
    tree(&Rig::smollm2(8), 11, 3, 3);
}

#[test]
fn smollm2_prefix_reuse_computes_only_the_tail() {
    // The cold reference of the third prompt (~1 s here) is left to the fixture.
    reuse(&Rig::smollm2(16), 300, 100, 101, false);
}

/// A pool of 8 pages of 8 positions; one request of 37 tokens needs 5.
mod pressure;
