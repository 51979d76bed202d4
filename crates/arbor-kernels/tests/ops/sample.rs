//! The sampler: greedy, the truncations, penalties, reproducibility, reported statistics and
//! non-finite logits.

use crate::common::Rng;
use arbor_kernels::ops::{
    apply_sampling_penalties, sample, sample_batch, sample_uniform, sampling_candidates,
    SamplingParams,
};

fn params(temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: 1234,
        ..SamplingParams::default()
    }
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits whose softmax is `probs` (shifted, since softmax ignores shifts).
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| (p.ln() + 3.0) as f32).collect()
}

/// Counts of the tokens drawn at steps `0..n`.
fn histogram(logits: &[f32], p: &SamplingParams, n: u64) -> Vec<u64> {
    let mut counts = vec![0u64; logits.len()];
    for step in 0..n {
        counts[sample(logits, p, &[], step).token as usize] += 1;
    }
    counts
}

/// Pearson's chi-square statistic of `counts` against `probs`.
fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

/// The tokens top-k → top-p → min-p keep (no penalties), computed in f64 by sorting.
fn reference_candidates(logits: &[f32], p: &SamplingParams) -> Vec<u32> {
    let t = p.temperature as f64;
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i] > f32::NEG_INFINITY)
        .collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let zmax = logits[order[0]] as f64;
    let w = |i: usize| ((logits[i] as f64 - zmax) / t).exp();
    if p.top_k > 0 && p.top_k < order.len() {
        let kth = logits[order[p.top_k - 1]];
        order.retain(|&i| logits[i] >= kth);
    }
    if p.top_p < 1.0 {
        let mass: f64 = order.iter().map(|&i| w(i)).sum();
        let mut acc = 0.0;
        let mut cut = logits[*order.last().unwrap()];
        for &i in &order {
            acc += w(i);
            if acc >= p.top_p as f64 * mass {
                cut = logits[i];
                break;
            }
        }
        order.retain(|&i| logits[i] >= cut);
    }
    if p.min_p > 0.0 {
        order.retain(|&i| w(i) >= p.min_p as f64);
    }
    let mut kept: Vec<u32> = order.into_iter().map(|i| i as u32).collect();
    kept.sort_unstable();
    kept
}

#[test]
fn greedy_is_argmax() {
    let mut rng = Rng::new(1);
    for vocab in [1, 2, 17, 1000, 49152] {
        let logits = rng.normals(vocab, 3.0);
        for step in 0..5 {
            let out = sample(&logits, &params(0.0), &[], step);
            assert_eq!(out.token, argmax(&logits), "vocab {vocab}");
        }
    }
}

#[test]
fn greedy_ties_pick_the_lowest_id() {
    let logits = [0.0, 2.0, 1.0, 2.0];
    assert_eq!(sample(&logits, &params(0.0), &[], 0).token, 1);
}

#[test]
fn top_k_one_is_greedy_at_any_temperature() {
    let mut rng = Rng::new(2);
    let logits = rng.normals(5000, 1.0);
    for temperature in [0.1, 1.0, 2.0, 100.0] {
        let p = SamplingParams {
            top_k: 1,
            ..params(temperature)
        };
        for step in 0..50 {
            assert_eq!(
                sample(&logits, &p, &[], step).token,
                argmax(&logits),
                "temperature {temperature}"
            );
        }
    }
}

#[test]
fn temperature_one_matches_the_distribution() {
    let probs = [0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02];
    let counts = histogram(&logits_of(&probs), &params(1.0), 20_000);
    // 7 degrees of freedom: P(χ² > 24.32) = 0.001.
    let chi2 = chi_square(&counts, &probs);
    assert!(chi2 < 24.32, "χ² = {chi2}, counts {counts:?}");
}

#[test]
fn temperature_two_flattens_the_distribution() {
    let probs = [0.5, 0.25, 0.125, 0.0625, 0.0625];
    let tempered: Vec<f64> = probs.iter().map(|p: &f64| p.sqrt()).collect();
    let z: f64 = tempered.iter().sum();
    let tempered: Vec<f64> = tempered.iter().map(|p| p / z).collect();
    let counts = histogram(&logits_of(&probs), &params(2.0), 20_000);
    // 4 degrees of freedom: P(χ² > 18.47) = 0.001.
    let chi2 = chi_square(&counts, &tempered);
    assert!(chi2 < 18.47, "χ² = {chi2}, counts {counts:?}");
}

#[test]
fn draws_are_a_pure_function_of_seed_and_step() {
    let mut rng = Rng::new(3);
    let logits = rng.normals(1000, 0.5);
    let p = SamplingParams {
        top_p: 0.9,
        ..params(1.0)
    };
    let first: Vec<u32> = (0..100)
        .map(|s| sample(&logits, &p, &[], s).token)
        .collect();
    let again: Vec<u32> = (0..100)
        .map(|s| sample(&logits, &p, &[], s).token)
        .collect();
    assert_eq!(first, again);
    let mut distinct = first.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() > 50,
        "steps should vary the draw: {} distinct of 100",
        distinct.len()
    );
    let other_seed = SamplingParams {
        seed: 99,
        ..p.clone()
    };
    let other: Vec<u32> = (0..100)
        .map(|s| sample(&logits, &other_seed, &[], s).token)
        .collect();
    assert_ne!(first, other, "seeds should vary the draw");
}

#[test]
fn sample_uniform_is_uniform_in_unit_interval() {
    let n = 100_000;
    let mut bins = [0u64; 10];
    for step in 0..n {
        let u = sample_uniform(7, step);
        assert!((0.0..1.0).contains(&u));
        bins[(u * 10.0) as usize] += 1;
    }
    // 9 degrees of freedom: P(χ² > 27.88) = 0.001.
    let chi2 = chi_square(&bins, &[0.1; 10]);
    assert!(chi2 < 27.88, "χ² = {chi2}, bins {bins:?}");
    assert_ne!(sample_uniform(1, 0), sample_uniform(0, 1));
}

#[test]
fn batch_rows_match_single_rows_whatever_the_batch() {
    let mut rng = Rng::new(4);
    let vocab = 3000;
    let logits = rng.normals(4 * vocab, 1.0);
    let p_greedy = params(0.0);
    let p_hot = SamplingParams {
        temperature: 1.3,
        top_k: 50,
        seed: 5,
        top_logprobs: 3,
        ..SamplingParams::default()
    };
    let p_nucleus = SamplingParams {
        temperature: 0.7,
        top_p: 0.8,
        min_p: 0.05,
        seed: 6,
        ..SamplingParams::default()
    };
    let hist: Vec<u32> = vec![3, 3, 10, 2999];
    let p_pen = SamplingParams {
        temperature: 1.0,
        repetition_penalty: 1.3,
        presence_penalty: 0.5,
        ..params(1.0)
    };
    let rows = [
        (&p_greedy, &[][..], 0),
        (&p_hot, &[][..], 11),
        (&p_nucleus, &hist[..], 12),
        (&p_pen, &hist[..], 13),
    ];
    let batch = sample_batch(&logits, vocab, &rows);
    for (i, &(p, h, step)) in rows.iter().enumerate() {
        assert_eq!(
            batch[i],
            sample(&logits[i * vocab..(i + 1) * vocab], p, h, step),
            "row {i}"
        );
    }
    // The same row in a different batch (different neighbours, different index) draws the same.
    let alone = sample_batch(&logits[2 * vocab..3 * vocab], vocab, &rows[2..3]);
    assert_eq!(alone[0], batch[2]);
}

#[test]
fn sample_batch_tolerates_short_logits() {
    let p = params(1.0);
    let out = sample_batch(&[0.0; 5], 4, &[(&p, &[][..], 0), (&p, &[][..], 0)]);
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].logprob, f32::NEG_INFINITY);
}

#[test]
fn top_k_keeps_exactly_the_k_largest() {
    let logits = [0.5, 3.0, -1.0, 2.0, 2.5, 0.0];
    let p = SamplingParams {
        top_k: 3,
        ..params(1.0)
    };
    assert_eq!(sampling_candidates(&logits, &p, &[]), vec![1, 3, 4]);
    let counts = histogram(&logits, &p, 3000);
    for (i, &c) in counts.iter().enumerate() {
        assert_eq!(c > 0, [1, 3, 4].contains(&i), "token {i} drawn {c} times");
    }
}

#[test]
fn top_k_keeps_ties_with_the_kth() {
    let logits = [1.0, 2.0, 1.0, 0.0];
    let p = SamplingParams {
        top_k: 2,
        ..params(1.0)
    };
    assert_eq!(sampling_candidates(&logits, &p, &[]), vec![0, 1, 2]);
}

#[test]
fn top_p_keeps_the_smallest_nucleus() {
    let probs = [0.06, 0.5, 0.1, 0.3, 0.04];
    let logits = logits_of(&probs);
    let cases: [(f32, &[u32]); 5] = [
        (0.0, &[1]),
        (0.45, &[1]),
        (0.75, &[1, 3]),
        (0.85, &[1, 2, 3]),
        (0.999, &[0, 1, 2, 3, 4]),
    ];
    for (top_p, want) in cases {
        let p = SamplingParams {
            top_p,
            ..params(1.0)
        };
        assert_eq!(sampling_candidates(&logits, &p, &[]), want, "top_p {top_p}");
        let counts = histogram(&logits, &p, 2000);
        for (i, &c) in counts.iter().enumerate() {
            assert_eq!(
                c > 0,
                want.contains(&(i as u32)),
                "top_p {top_p}: token {i} drawn {c} times"
            );
        }
    }
}

#[test]
fn top_p_applies_to_the_tempered_distribution() {
    // At temperature 1 the nucleus of 0.75 is {1, 3}; at temperature 3 the distribution is
    // flatter and needs more tokens.
    let logits = logits_of(&[0.06, 0.5, 0.1, 0.3, 0.04]);
    let p = SamplingParams {
        top_p: 0.75,
        ..params(3.0)
    };
    assert_eq!(
        sampling_candidates(&logits, &p, &[]),
        reference_candidates(&logits, &p)
    );
    assert!(sampling_candidates(&logits, &p, &[]).len() > 2);
}

#[test]
fn min_p_keeps_tokens_above_the_scaled_max() {
    let probs = [0.4, 0.3, 0.15, 0.1, 0.05];
    let logits = logits_of(&probs);
    // p ≥ 0.3 · 0.4 = 0.12 keeps {0, 1, 2}.
    let p = SamplingParams {
        min_p: 0.3,
        ..params(1.0)
    };
    assert_eq!(sampling_candidates(&logits, &p, &[]), vec![0, 1, 2]);
    let counts = histogram(&logits, &p, 2000);
    assert!(
        counts[0] > 0 && counts[1] > 0 && counts[2] > 0 && counts[3] == 0 && counts[4] == 0,
        "{counts:?}"
    );
    // min_p ≥ 1 keeps only the maximum.
    let p = SamplingParams {
        min_p: 1.5,
        ..params(1.0)
    };
    assert_eq!(sampling_candidates(&logits, &p, &[]), vec![0]);
}

#[test]
fn truncations_match_a_sorting_reference_on_large_vocabularies() {
    let mut rng = Rng::new(5);
    for case in 0..40 {
        let vocab = [100, 2000, 49152][case % 3];
        let logits = rng.normals(vocab, [0.5, 2.0, 4.0][(case / 3) % 3]);
        let p = SamplingParams {
            temperature: [0.5, 1.0, 1.7, 3.0][case % 4],
            top_k: [0, 1, 7, 64, 500, 5000][case % 6],
            top_p: [1.0, 0.9, 0.5, 0.99, 0.2][case % 5],
            min_p: [0.0, 0.0, 0.05, 0.2][(case / 2) % 4],
            ..params(1.0)
        };
        let want = if p.top_k == 1 {
            vec![argmax(&logits)]
        } else {
            reference_candidates(&logits, &p)
        };
        assert_eq!(
            sampling_candidates(&logits, &p, &[]),
            want,
            "case {case}: vocab {vocab}, {p:?}"
        );
        // The draw always comes from the kept set.
        for step in 0..20 {
            let t = sample(&logits, &p, &[], step).token;
            assert!(
                want.binary_search(&t).is_ok(),
                "case {case}: drew {t} outside the kept set"
            );
        }
    }
}

#[test]
fn penalties_change_exactly_the_tokens_in_history() {
    let mut rng = Rng::new(6);
    let vocab = 500;
    let logits = rng.normals(vocab, 2.0);
    let history: Vec<u32> = vec![7, 7, 7, 42, 100, 7, 499, 42, 100_000, u32::MAX];
    let p = SamplingParams {
        repetition_penalty: 1.5,
        presence_penalty: 0.25,
        frequency_penalty: 0.125,
        ..params(1.0)
    };
    let mut got = logits.clone();
    apply_sampling_penalties(&mut got, &p, &history);
    for (i, (&g, &l)) in got.iter().zip(&logits).enumerate() {
        let count = history.iter().filter(|&&t| t as usize == i).count();
        let want = if count == 0 {
            l as f64
        } else {
            let r = if l > 0.0 {
                l as f64 / 1.5
            } else {
                l as f64 * 1.5
            };
            r - 0.25 - 0.125 * count as f64
        };
        assert!(
            (g as f64 - want).abs() < 1e-5,
            "token {i} (count {count}): got {g}, want {want}"
        );
    }
    // Neutral parameters change nothing.
    let mut same = logits.clone();
    apply_sampling_penalties(&mut same, &params(1.0), &history);
    assert_eq!(same, logits);
}

#[test]
fn penalties_steer_the_draw() {
    // Token 0 leads; repeating it enough hands greedy decoding to token 1.
    let logits = [2.0, 1.5, -1.0, 0.0];
    let p = SamplingParams {
        repetition_penalty: 2.0,
        ..params(0.0)
    };
    assert_eq!(sample(&logits, &p, &[0], 0).token, 1);
    assert_eq!(sample(&logits, &p, &[2, 3], 0).token, 0);
    let p = SamplingParams {
        frequency_penalty: 0.3,
        ..params(0.0)
    };
    assert_eq!(sample(&logits, &p, &[0], 0).token, 0);
    assert_eq!(sample(&logits, &p, &[0, 0], 0).token, 1);
    // The reported logprob stays that of the raw distribution.
    let raw = sample(&logits, &params(0.0), &[], 0);
    let pen = sample(
        &logits,
        &SamplingParams {
            presence_penalty: 5.0,
            ..params(0.0)
        },
        &[0],
        0,
    );
    assert_eq!(pen.token, 1);
    assert_eq!(pen.entropy, raw.entropy);
}

#[test]
fn entropy_and_logprobs_are_those_of_the_raw_distribution() {
    let probs = [0.4, 0.3, 0.15, 0.1, 0.05];
    let logits = logits_of(&probs);
    let entropy: f64 = -probs.iter().map(|p| p * p.ln()).sum::<f64>();
    for p in [
        params(0.0),
        SamplingParams {
            temperature: 0.3,
            top_logprobs: 3,
            ..params(0.0)
        },
        SamplingParams {
            temperature: 5.0,
            top_k: 2,
            top_logprobs: 5,
            ..params(0.0)
        },
        SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            top_logprobs: 9,
            ..params(0.0)
        },
    ] {
        for step in 0..20 {
            let out = sample(&logits, &p, &[], step);
            assert!(
                (out.entropy as f64 - entropy).abs() < 1e-5,
                "entropy {} vs {entropy}",
                out.entropy
            );
            let want = probs[out.token as usize].ln();
            assert!(
                (out.logprob as f64 - want).abs() < 1e-5,
                "logprob {} vs {want}",
                out.logprob
            );
            assert_eq!(out.top_logprobs.len(), p.top_logprobs.min(probs.len()));
            for (j, &(tok, lp)) in out.top_logprobs.iter().enumerate() {
                assert_eq!(tok as usize, j, "top_logprobs are sorted by probability");
                assert!((lp as f64 - probs[j].ln()).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn entropy_of_uniform_and_of_one_hot() {
    let uniform = vec![0.25f32; 1024];
    let out = sample(&uniform, &params(1.0), &[], 0);
    assert!((out.entropy as f64 - (1024f64).ln()).abs() < 1e-4);
    assert!((out.logprob as f64 + (1024f64).ln()).abs() < 1e-4);
    let mut one_hot = vec![f32::NEG_INFINITY; 100];
    one_hot[37] = 1.0;
    let out = sample(
        &one_hot,
        &SamplingParams {
            top_logprobs: 2,
            ..params(1.0)
        },
        &[],
        0,
    );
    assert_eq!((out.token, out.logprob, out.entropy), (37, 0.0, 0.0));
    assert_eq!(out.top_logprobs[0], (37, 0.0));
    assert_eq!(out.top_logprobs[1].1, f32::NEG_INFINITY);
}

#[test]
fn large_logits_do_not_overflow() {
    let logits = [1e30, 1e30 - 1e24, -1e30, 3e38];
    let out = sample(
        &logits,
        &SamplingParams {
            top_logprobs: 2,
            ..params(1.0)
        },
        &[],
        0,
    );
    assert_eq!(out.token, 3);
    assert_eq!(out.logprob, 0.0);
    assert!(out.entropy.is_finite());
}

#[test]
fn nan_and_negative_infinity_are_never_drawn() {
    let mut rng = Rng::new(7);
    let mut logits = rng.normals(64, 0.1);
    let banned = [0usize, 5, 6, 31, 63];
    for (j, &i) in banned.iter().enumerate() {
        logits[i] = if j % 2 == 0 {
            f32::NEG_INFINITY
        } else {
            f32::NAN
        };
    }
    for p in [
        params(1.0),
        params(50.0),
        SamplingParams {
            top_k: 60,
            ..params(1.0)
        },
        SamplingParams {
            top_p: 0.999,
            ..params(1.0)
        },
        SamplingParams {
            min_p: 1e-6,
            ..params(1.0)
        },
        SamplingParams {
            repetition_penalty: 1.2,
            frequency_penalty: 0.5,
            ..params(1.0)
        },
    ] {
        let history = [0, 5, 6, 1, 2];
        for step in 0..500 {
            let out = sample(&logits, &p, &history, step);
            assert!(
                !banned.contains(&(out.token as usize)),
                "{p:?} drew banned token {}",
                out.token
            );
            assert!(out.logprob.is_finite() && out.entropy.is_finite());
        }
    }
    let out = sample(
        &logits,
        &SamplingParams {
            top_logprobs: 64,
            ..params(1.0)
        },
        &[],
        0,
    );
    for &(tok, lp) in &out.top_logprobs[59..] {
        assert!(banned.contains(&(tok as usize)) && lp == f32::NEG_INFINITY);
    }
}

#[test]
fn positive_infinity_takes_all_the_mass() {
    let logits = [0.0, f32::INFINITY, 5.0, f32::INFINITY];
    for step in 0..50 {
        let out = sample(&logits, &params(1.0), &[], step);
        assert!(out.token == 1 || out.token == 3);
        assert!((out.logprob as f64 - 0.5f64.ln()).abs() < 1e-6, "{out:?}");
        assert!((out.entropy as f64 - 2f64.ln()).abs() < 1e-6);
    }
}

#[test]
fn degenerate_rows_do_not_panic() {
    let p = SamplingParams {
        top_k: 3,
        top_p: 0.5,
        min_p: 0.1,
        top_logprobs: 4,
        ..params(1.0)
    };
    for logits in [vec![], vec![f32::NEG_INFINITY; 10], vec![f32::NAN; 10]] {
        let out = sample(&logits, &p, &[1, 2], 0);
        assert_eq!(
            (out.token, out.logprob, out.entropy),
            (0, f32::NEG_INFINITY, 0.0)
        );
        assert!(sampling_candidates(&logits, &p, &[]).is_empty());
    }
    // Odd parameters are ignored or clamped rather than producing NaN.
    let logits = [1.0, 2.0, 3.0];
    for p in [
        SamplingParams {
            temperature: f32::NAN,
            ..params(1.0)
        },
        SamplingParams {
            temperature: f32::INFINITY,
            ..params(1.0)
        },
        SamplingParams {
            temperature: 1e-45,
            ..params(1.0)
        },
        SamplingParams {
            repetition_penalty: 0.0,
            presence_penalty: f32::NAN,
            ..params(1.0)
        },
        SamplingParams {
            top_p: -1.0,
            min_p: f32::NAN,
            top_k: usize::MAX,
            ..params(1.0)
        },
        SamplingParams {
            frequency_penalty: f32::INFINITY,
            ..params(1.0)
        },
    ] {
        let out = sample(&logits, &p, &[0, 1, 2], 3);
        assert!(
            (out.token as usize) < logits.len() && out.logprob.is_finite(),
            "{p:?}: {out:?}"
        );
    }
}
