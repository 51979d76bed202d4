//! tokenizer.json, malformed vocabularies, extra goldens, threads.

use super::*;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("arbor-tok-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `tokenizer.json` built from the GPT-2 GGUF vocabulary encodes as the GGUF does.
#[test]
fn tokenizer_json_agrees_with_gguf() {
    let Some(dir) = fixtures() else { return };
    let file = GgufFile::open(&dir.join("ggml-vocab-gpt-2.gguf")).unwrap();
    let gguf = Tokenizer::from_gguf(&file).unwrap();
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .unwrap();
    let merges = file
        .get("tokenizer.ggml.merges")
        .and_then(|v| v.as_array())
        .unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str().unwrap().to_string(), i.into()))
        .collect();
    let merges: Vec<&str> = merges.iter().map(|m| m.as_str().unwrap()).collect();
    let eot = gguf.token_id("<|endoftext|>").unwrap();
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [{"id": eot, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": merges}
    });
    let tdir = temp_dir("hf");
    std::fs::write(
        tdir.join("tokenizer.json"),
        serde_json::to_vec(&json).unwrap(),
    )
    .unwrap();
    let config = serde_json::json!({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": false,
        "chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    });
    std::fs::write(
        tdir.join("tokenizer_config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let hf = Tokenizer::from_file(&tdir.join("tokenizer.json")).unwrap();
    std::fs::remove_dir_all(&tdir).ok();

    assert_eq!(hf.vocab_size(), gguf.vocab_size());
    assert_eq!(hf.bos_id(), Some(eot));
    assert_eq!(hf.eos_ids(), &[eot]);
    assert!(!hf.add_bos_default());
    assert_eq!(
        hf.apply_chat_template(&[ChatMessage::new("user", "hi")], false)
            .unwrap(),
        "user: hi\n"
    );
    let cases = read_cases(
        &dir.join("ggml-vocab-gpt-2.gguf.inp"),
        &dir.join("ggml-vocab-gpt-2.gguf.out"),
    );
    for (text, want) in &cases {
        let got = hf.encode(text, false, false).unwrap();
        assert_eq!(&got, want, "tokenizer.json: {text:?}");
        assert_eq!(&hf.decode(&got, false), text);
    }
    let ids = hf.encode("a<|endoftext|>b", true, true).unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!((ids[0], ids[2]), (eot, eot));
    assert!(!hf
        .encode("<|endoftext|>", false, false)
        .unwrap()
        .contains(&eot));
}

// ---- malformed vocabularies ----

enum V<'a> {
    Str(&'a str),
    U32(u32),
    Strs(&'a [&'a str]),
    I32s(&'a [i32]),
}

/// A minimal GGUF v3 file with the given metadata and no tensors.
fn gguf_bytes(kvs: &[(&str, V)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        string(&mut out, k);
        match v {
            V::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            V::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::Strs(list) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((list.len() as u64).to_le_bytes());
                for s in *list {
                    string(&mut out, s);
                }
            }
            V::I32s(list) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((list.len() as u64).to_le_bytes());
                for x in *list {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    out
}

fn tokenizer_error(kvs: &[(&str, V)]) -> String {
    let header = parse(&gguf_bytes(kvs)).expect("test GGUF parses");
    match Tokenizer::from_gguf_header(&header) {
        Ok(_) => panic!("a malformed vocabulary was accepted"),
        Err(RuntimeError::Tokenizer(msg)) => msg,
        Err(other) => panic!("wrong error kind: {other}"),
    }
}

#[test]
fn malformed_vocabularies_give_clear_errors() {
    const TOKENS: &[&str] = &["a", "b", "ab"];
    let msg = tokenizer_error(&[
        ("tokenizer.ggml.model", V::Str("gpt2")),
        ("tokenizer.ggml.merges", V::Strs(&["a b"])),
    ]);
    assert!(msg.contains("tokenizer.ggml.tokens is missing"), "{msg}");

    let msg = tokenizer_error(&[
        ("tokenizer.ggml.model", V::Str("gpt2")),
        ("tokenizer.ggml.tokens", V::Strs(TOKENS)),
        ("tokenizer.ggml.token_type", V::I32s(&[1, 1])),
        ("tokenizer.ggml.merges", V::Strs(&["a b"])),
    ]);
    assert!(
        msg.contains("token_type has 2 entries") && msg.contains("has 3"),
        "{msg}"
    );

    let msg = tokenizer_error(&[
        ("tokenizer.ggml.model", V::Str("wordsoup")),
        ("tokenizer.ggml.tokens", V::Strs(TOKENS)),
    ]);
    assert!(msg.contains("unknown tokenizer model 'wordsoup'"), "{msg}");

    let msg = tokenizer_error(&[("tokenizer.ggml.tokens", V::Strs(TOKENS))]);
    assert!(msg.contains("tokenizer.ggml.model is missing"), "{msg}");

    let msg = tokenizer_error(&[
        ("tokenizer.ggml.model", V::Str("gpt2")),
        ("tokenizer.ggml.pre", V::Str("martian")),
        ("tokenizer.ggml.tokens", V::Strs(TOKENS)),
        ("tokenizer.ggml.merges", V::Strs(&["a b"])),
    ]);
    assert!(
        msg.contains("unknown pre-tokenizer type 'martian'"),
        "{msg}"
    );

    let msg = tokenizer_error(&[
        ("tokenizer.ggml.model", V::Str("gpt2")),
        ("tokenizer.ggml.tokens", V::Strs(TOKENS)),
    ]);
    assert!(msg.contains("merges"), "{msg}");

    let msg = tokenizer_error(&[
        ("tokenizer.ggml.model", V::U32(7)),
        ("tokenizer.ggml.tokens", V::Strs(TOKENS)),
    ]);
    assert!(msg.contains("not a string"), "{msg}");

    let msg = tokenizer_error(&[
        ("tokenizer.ggml.model", V::Str("llama")),
        ("tokenizer.ggml.tokens", V::I32s(&[1, 2])),
    ]);
    assert!(msg.contains("expected a string"), "{msg}");
}

#[test]
fn tiny_vocabularies_work_and_bad_ids_are_harmless() {
    let header = parse(&gguf_bytes(&[
        ("tokenizer.ggml.model", V::Str("gpt2")),
        ("tokenizer.ggml.pre", V::Str("gpt-2")),
        (
            "tokenizer.ggml.tokens",
            V::Strs(&["a", "b", "ab", "Ġ", "<|im_end|>"]),
        ),
        ("tokenizer.ggml.merges", V::Strs(&["a b"])),
        ("tokenizer.ggml.bos_token_id", V::U32(99)),
    ]))
    .unwrap();
    let tok = Tokenizer::from_gguf_header(&header).unwrap();
    assert_eq!(tok.encode("ab a", false, false).unwrap(), vec![2, 3, 0]);
    // Characters with no token are dropped, as llama.cpp does.
    assert_eq!(tok.encode("abc", false, false).unwrap(), vec![2]);
    assert_eq!(tok.eos_ids(), &[4], "<|im_end|> ends generation");
    assert_eq!(tok.bos_id(), None, "an out-of-range BOS id is ignored");
    assert_eq!(tok.decode(&[2, 4000, 3, 0], false), "ab a");
    assert_eq!(tok.token_bytes(4000), b"");
    assert_eq!(tok.encode("", true, true).unwrap(), Vec::<u32>::new());
}

/// Extra golden files given at run time, for checking against llama.cpp on any model:
/// `ARBOR_TOKENIZER_GOLDEN="GGUF:INP:OUT[:special],..."` (`special`: the ids were made with
/// special tokens parsed). Does nothing when unset.
#[test]
fn extra_golden_files_from_env() {
    let Ok(spec) = std::env::var("ARBOR_TOKENIZER_GOLDEN") else {
        return;
    };
    for entry in spec.split(',').filter(|e| !e.is_empty()) {
        let parts: Vec<&str> = entry.split(':').collect();
        assert!(
            parts.len() >= 3,
            "ARBOR_TOKENIZER_GOLDEN entry {entry:?} is not GGUF:INP:OUT[:special]"
        );
        let file = GgufFile::open(Path::new(parts[0])).unwrap_or_else(|e| panic!("{entry}: {e}"));
        let tok = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{entry}: {e}"));
        let cases = read_cases(Path::new(parts[1]), Path::new(parts[2]));
        check_golden_with(entry, &tok, &cases, parts.get(3) == Some(&"special"));
    }
}

/// A SentencePiece-style `tokenizer.json` (Metaspace normaliser, byte fallback, `Strip` decoder).
#[test]
fn tokenizer_json_sentencepiece_style() {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
    }
    for (i, t) in ["▁", "a", "b", "▁a", "ab", "▁ab"].iter().enumerate() {
        vocab.insert(t.to_string(), (259 + i).into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": ["▁ a", "a b", "▁a b"]}
    });
    let dir = temp_dir("spm");
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&json).unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    std::fs::remove_dir_all(&dir).ok();

    assert_eq!(tok.bos_id(), Some(1), "BOS found from the post-processor");
    assert!(tok.add_bos_default());
    let ids = tok.encode("ab ab é", true, false).unwrap();
    assert_eq!(ids, vec![1, 264, 264, 259, 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(tok.token_kind(3 + 0xC3), Some(TokenKind::Byte));
    assert_eq!(tok.decode(&ids, true), "ab ab é");
    let parts = super::decode::stream(&tok, &ids);
    assert_eq!(
        parts.concat(),
        "<s> ab ab é",
        "HF strips only a leading space of the whole text"
    );
    assert_eq!(parts[4], "", "first byte of é waits for the second");
}

#[test]
fn tokenizer_and_template_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Tokenizer>();
    shared::<ChatTemplate>();
}
