//! The KV cache under memory pressure: LRU eviction keeps sequential requests running, a
//! request larger than the pool is refused cleanly, and a batch that does not fit changes
//! nothing (while a sibling batch that does fit is accepted).

use super::*;

#[test]
fn small_pool_evicts_and_refuses_cleanly() {
    let rig = Rig::fixture();
    let page_bytes = fixture_engine(4 << 20, 8).kv_stats().page_bytes;
    let mut e = fixture_engine(8 * page_bytes, 8);
    let vocab = e.model.cfg.vocab_size as u32;
    let mut big = fixture_engine(4 << 20, 8);
    let st = e.kv_stats();
    assert_eq!((st.pages_total, st.page_size), (8, 8));

    // Many different requests in turn: each leaves 4 full pages cached, so from the second on
    // each needs least-recently-used eviction.
    let prompts: Vec<Vec<u32>> = (0..24).map(|i| toks(37, 100 + i, vocab)).collect();
    for (i, p) in prompts.iter().enumerate() {
        let s = e.new_seq();
        let o = run(&mut e, s, p, LogitsMode::Last);
        assert_eq!(o.reused_tokens, 0, "request {i}");
        e.free_seq(s);
        ok(&e);
        let st = e.kv_stats();
        assert_eq!(st.pages_in_use, 0);
        assert!(st.pages_cached >= 4, "request {i}: {st:?}");
        if i % 8 == 0 {
            let c = big.new_seq();
            let want = run(&mut big, c, p, LogitsMode::Last);
            big.free_seq(c);
            rig.same(&o.logits, &want.logits, &format!("request {i}"));
        }
    }
    // The latest request is still cached; the first was evicted long ago.
    let s = e.new_seq();
    let o = run(&mut e, s, &prompts[23], LogitsMode::Last);
    assert_eq!(o.reused_tokens, 32);
    e.free_seq(s);
    let s = e.new_seq();
    let o = run(&mut e, s, &prompts[0], LogitsMode::Last);
    assert_eq!(o.reused_tokens, 0);
    e.free_seq(s);
    // A request of the whole pool fits by evicting every cached page.
    let s = e.new_seq();
    run(&mut e, s, &toks(64, 7, vocab), LogitsMode::Last);
    assert_eq!(e.kv_stats().pages_in_use, 8);
    e.free_seq(s);
    ok(&e);

    // A request larger than the whole pool is refused up front, changing nothing.
    let s = e.new_seq();
    let before = e.kv_stats();
    let err = e
        .step(&ForwardBatch {
            seqs: vec![SeqStep {
                seq: s,
                tokens: toks(65, 8, vocab),
                ..Default::default()
            }],
        })
        .expect_err("65 tokens cannot fit 8 pages of 8");
    assert!(err.to_string().contains("--kv-cache-gb"), "{err}");
    assert_eq!(e.kv_stats(), before);
    assert_eq!(e.seq_tokens(s), Some(&[][..]));
    ok(&e);
    e.free_seq(s);

    // A batch that does not fit: x (20 tokens) and its fork y share a partial page, z's prompt
    // has 4 cached full pages that planning attaches before the shortage is found.
    e.clear_prefix_cache();
    let q = toks(37, 9, vocab);
    let w = e.new_seq();
    run(&mut e, w, &q, LogitsMode::None);
    e.free_seq(w);
    let x = e.new_seq();
    run(&mut e, x, &toks(20, 10, vocab), LogitsMode::None);
    let y = e.fork_seq(x).expect("fork");
    let z = e.new_seq();
    let st = e.kv_stats();
    assert_eq!((st.pages_in_use, st.pages_cached, st.pages_free), (3, 4, 1));
    let z_prompt: Vec<u32> = q.iter().copied().chain([1, 2, 3]).collect();
    let y_more = toks(12, 11, vocab);
    let batch = ForwardBatch {
        seqs: vec![
            SeqStep {
                seq: y,
                tokens: y_more.clone(),
                logits: LogitsMode::Last,
                ..Default::default()
            },
            SeqStep {
                seq: z,
                tokens: z_prompt.clone(),
                logits: LogitsMode::Last,
                ..Default::default()
            },
            SeqStep {
                seq: x,
                tokens: toks(20, 12, vocab),
                logits: LogitsMode::Last,
                ..Default::default()
            },
        ],
    };
    let before = e.kv_stats();
    let held: Vec<Option<Vec<u32>>> = [x, y, z]
        .iter()
        .map(|&s| e.seq_tokens(s).map(<[u32]>::to_vec))
        .collect();
    let computed = e.computed_tokens();
    match e.step(&batch) {
        Err(RuntimeError::Kernel(KernelError::KvFull { .. })) => {}
        other => panic!("expected KvFull, got {other:?}"),
    }
    ok(&e);
    assert_eq!(e.kv_stats(), before);
    for (&s, h) in [x, y, z].iter().zip(&held) {
        assert_eq!(e.seq_tokens(s).map(<[u32]>::to_vec), *h);
        assert_eq!(e.cache().len(s), h.as_ref().map_or(0, Vec::len));
    }
    assert_eq!(e.computed_tokens(), computed);

    // Parts of it fit, one at a time, and give the right logits.
    let zo = run(&mut e, z, &z_prompt, LogitsMode::Last);
    assert_eq!(zo.reused_tokens, 32);
    e.free_seq(z);
    let yo = run(&mut e, y, &y_more, LogitsMode::Last);
    let c = big.new_seq();
    let want = run(&mut big, c, &z_prompt, LogitsMode::Last);
    big.free_seq(c);
    rig.same(&zo.logits, &want.logits, "z after the failed batch");
    let mut y_all = toks(20, 10, vocab);
    y_all.extend(&y_more);
    let c = big.new_seq();
    let want = run(&mut big, c, &y_all, LogitsMode::Last);
    big.free_seq(c);
    rig.same(&yo.logits, &want.logits, "y after the failed batch");
    free_all(&mut e, &[x, y]);
}

/// Siblings sharing a partial last page need one copy fewer than their number when the parent
/// is gone (the last holder writes in place), but the step's up-front check counts a copy for
/// each, so a batch that fits is refused (the same steps one sibling at a time succeed).
#[test]
fn sibling_batch_that_fits_is_accepted() {
    let page_bytes = fixture_engine(4 << 20, 8).kv_stats().page_bytes;
    let mut e = fixture_engine(7 * page_bytes, 8);
    let vocab = e.model.cfg.vocab_size as u32;
    let root = e.new_seq();
    run(&mut e, root, &toks(37, 1, vocab), LogitsMode::None);
    let kids: Vec<SeqId> = (0..3).map(|_| e.fork_seq(root).expect("fork")).collect();
    e.free_seq(root);
    // 5 pages held, 2 free: two siblings copy the partial page, the third writes in place.
    assert_eq!(e.kv_stats().pages_free, 2);
    let batch: Vec<(SeqId, u32)> = kids.iter().map(|&k| (k, k as u32 + 5)).collect();
    decode(&mut e, &batch);
    assert_eq!(e.kv_stats().pages_in_use, 7);
    free_all(&mut e, &kids);
}
