//! Scripts for the strategy tests: node `a` is the root's first child, `ab` the second child
//! of `a`, and so on; a step is its label followed by "\n\n" unless the label is listed as
//! an ending (then it ends with EOS).

use crate::sim::{SimOutcome, SimToken};
use crate::strategy::Action;
use crate::tree::{NodeId, SearchTree};

/// A node's label: its text without the step delimiter; "root" for a root.
pub fn label(t: &SearchTree, n: NodeId) -> String {
    match t.node(n) {
        Some(x) if x.parent.is_some() => x.text.trim_end_matches("\n\n").to_string(),
        _ => "root".into(),
    }
}

/// The label of child `i` of `n`.
pub fn child_label(t: &SearchTree, n: NodeId, i: usize) -> String {
    let p = if t.node(n).is_some_and(|x| x.parent.is_some()) {
        label(t, n)
    } else {
        String::new()
    };
    format!("{p}{}", (b'a' + i as u8) as char)
}

/// `"a=0.5 b=-1"` as pairs.
fn table(s: &str) -> Vec<(String, f64)> {
    s.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("label=value");
            (k.to_string(), v.parse().expect("a number"))
        })
        .collect()
}

/// The step policy: `ends` finish with EOS; `lps` ("a=-0.1 …") gives a step's per-token
/// logprob (default -1).
pub fn policy<'a>(
    ends: &'a [&'a str],
    lps: &str,
) -> impl FnMut(&SearchTree, NodeId, usize) -> Vec<SimToken> + 'a {
    let lps = table(lps);
    move |t, n, i| {
        let l = child_label(t, n, i);
        let lp = lps
            .iter()
            .find(|(k, _)| *k == l)
            .map_or(-1.0, |x| x.1 as f32);
        let last = if ends.contains(&l.as_str()) {
            SimToken::eos()
        } else {
            SimToken::new("\n\n", lp)
        };
        vec![SimToken::new(&l, lp), last]
    }
}

/// Verifier 0 from a table ("a=0.9 b=0.2 …"); an unlisted label fails the test.
pub fn verifier(scores: &str) -> impl FnMut(&SearchTree, NodeId, usize) -> f64 {
    let scores = table(scores);
    move |t, n, v| {
        assert_eq!(v, 0, "only verifier 0 is used");
        let l = label(t, n);
        match scores.iter().find(|(k, _)| *k == l) {
            Some(s) => s.1,
            None => panic!("the test scored no '{l}'"),
        }
    }
}

/// The actions, comma-separated: `E a:2` expand, `T a:2` top-k, `X a:0,1` extend, `S a`
/// score, `Q 3` prompt, `P a why` prune, `F a` finish.
pub fn log(out: &SimOutcome) -> String {
    let l = |n: NodeId| label(&out.tree, n);
    let lines: Vec<String> = out
        .actions
        .iter()
        .map(|a| match a {
            Action::Expand { node, k, .. } => format!("E {}:{k}", l(*node)),
            Action::ExpandTopK { node, k } => format!("T {}:{k}", l(*node)),
            Action::Extend { node, picks } => format!("X {}:{}", l(*node), list(picks)),
            Action::Score { node, .. } => format!("S {}", l(*node)),
            Action::Prompt { k, .. } => format!("Q {k}"),
            Action::Prune { node, reason } => format!("P {} {reason}", l(*node)),
            Action::Finish { answer, .. } => format!("F {}", answer.map_or("-".into(), l)),
        })
        .collect();
    lines.join(", ")
}

fn list(picks: &[usize]) -> String {
    let s: Vec<String> = picks.iter().map(|p| p.to_string()).collect();
    s.join(",")
}
