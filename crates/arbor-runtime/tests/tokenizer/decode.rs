//! Incremental decoding and special tokens.

use super::*;

pub(super) fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut dec = IncrementalDecoder::with_special(tok, false);
    let mut parts: Vec<String> = ids.iter().map(|&id| dec.push(id)).collect();
    parts.push(dec.finish());
    parts
}

#[test]
fn incremental_decoding_never_splits_characters() {
    let texts = [
        "🦙 llama 🚀 (normal) 😶‍🌫️ ✅",
        "我想在apple工作1314151天～",
        "нещо на Български",
        "Führer ½ ☃",
    ];
    for name in ["gpt-2", "llama-bpe", "llama-spm"] {
        let Some((tok, _)) = load_vocab(name) else {
            return;
        };
        for text in texts {
            let ids = tok.encode(text, false, false).unwrap();
            let parts = stream(&tok, &ids);
            assert_eq!(
                parts.concat(),
                tok.decode(&ids, false),
                "{name}: stream != decode"
            );
            assert_eq!(parts.concat(), text, "{name}: stream != text");
            assert!(
                parts.iter().all(|p| !p.contains('\u{FFFD}')),
                "{name}: {parts:?}"
            );
        }
    }
    // A 4-byte emoji spread over byte tokens: nothing comes out until its last byte.
    let Some((tok, _)) = load_vocab("llama-spm") else {
        return;
    };
    let bytes: Vec<u32> = "🦙"
        .bytes()
        .map(|b| tok.token_id(&format!("<0x{b:02X}>")).expect("byte token"))
        .collect();
    let mut dec = IncrementalDecoder::new(&tok);
    assert_eq!(
        [dec.push(bytes[0]), dec.push(bytes[1]), dec.push(bytes[2])],
        ["", "", ""]
    );
    assert!(dec.has_pending());
    assert_eq!(dec.push(bytes[3]), "🦙");
    assert_eq!(dec.finish(), "");
    // Byte-level BPE: "我" is three byte tokens in GPT-2's vocabulary.
    let Some((tok, _)) = load_vocab("gpt-2") else {
        return;
    };
    let ids = tok.encode("我", false, false).unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    let parts = stream(&tok, &ids);
    assert_eq!(
        parts.iter().filter(|p| !p.is_empty()).collect::<Vec<_>>(),
        ["我"]
    );
    // A truncated character comes out as one replacement character at the end.
    let mut dec = IncrementalDecoder::new(&tok);
    assert_eq!(dec.push(ids[0]), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
}

#[test]
fn special_tokens_and_bos() {
    let Some((tok, _)) = load_vocab("llama-spm") else {
        return;
    };
    assert_eq!(tok.bos_id(), Some(1));
    assert!(tok.add_bos_default());
    assert_eq!(tok.token_kind(1), Some(TokenKind::Control));
    let ids = tok.encode("Hello", true, false).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(
        tok.decode(&ids, true),
        " Hello",
        "llama.cpp keeps the space after BOS"
    );
    assert_eq!(tok.decode(&ids[1..], true), "Hello");
    let parsed = tok.encode("<s>Hi</s>", false, true).unwrap();
    assert_eq!(parsed.first(), Some(&1));
    assert_eq!(parsed.last(), Some(&2));
    assert!(!tok.encode("<s>", false, false).unwrap().contains(&1));
    assert!(tok.eos_ids().contains(&2));
    assert_eq!(tok.token_bytes(13), b"\n", "<0x0A>");

    let Some((tok, _)) = load_vocab("llama-bpe") else {
        return;
    };
    let eot = tok.token_id("<|eot_id|>").expect("eot");
    assert!(tok.eos_ids().contains(&eot), "{:?}", tok.eos_ids());
    assert!(tok.add_bos_default());
    assert_eq!(
        tok.encode("", true, false).unwrap(),
        vec![tok.bos_id().unwrap()]
    );
    assert_eq!(tok.token_bytes(tok.token_id("Ġthe").unwrap()), b" the");
}
