//! Tokenizer tests: llama.cpp's vocabulary golden files, round trips, incremental decoding,
//! chat templates, `tokenizer.json` loading and malformed vocabularies.
//!
//! The golden cases are llama.cpp's `ggml-vocab-*.gguf` with `.gguf.inp` / `.gguf.out` in
//! `tests/fixtures/vocab/` (override the folder with `ARBOR_VOCAB_DIR`), read and run as
//! llama.cpp's `test-tokenizer-0` does: cases separated by `\n__ggml_vocab_test__\n`, expected
//! ids one line per case, no BOS added, special tokens not parsed.

use arbor_runtime::gguf::{parse, GgufFile};
use arbor_runtime::{
    ChatMessage, ChatTemplate, IncrementalDecoder, RuntimeError, TokenKind, Tokenizer,
};
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vocab_dir() -> PathBuf {
    match std::env::var_os("ARBOR_VOCAB_DIR") {
        Some(d) => PathBuf::from(d),
        None => repo_root().join("tests/fixtures/vocab"),
    }
}

/// The fixture folder, or `None` (with a note) when it has not been added to the checkout at
/// all. Once the folder exists, every file the tests name must be in it.
fn fixtures() -> Option<PathBuf> {
    let dir = vocab_dir();
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "skipped: {} does not exist (llama.cpp vocab fixtures)",
            dir.display()
        );
        None
    }
}

/// Reads `inp`/`out` as test-tokenizer-0 does.
fn read_cases(inp: &Path, out: &Path) -> Cases {
    let raw = std::fs::read_to_string(inp).unwrap_or_else(|e| panic!("{}: {e}", inp.display()));
    let expected =
        std::fs::read_to_string(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = raw.as_str();
    while !rest.is_empty() {
        match rest.find(SEP) {
            Some(at) => {
                inputs.push(rest[..at].to_string());
                rest = &rest[at + SEP.len()..];
            }
            None => {
                inputs.push(rest.to_string());
                break;
            }
        }
    }
    let outputs: Vec<Vec<u32>> = expected
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse().expect("token id"))
                .collect()
        })
        .collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{}: inputs and outputs differ in number",
        inp.display()
    );
    inputs.into_iter().zip(outputs).collect()
}

/// Golden cases: input text and the ids llama.cpp gives.
type Cases = Vec<(String, Vec<u32>)>;

fn load_vocab(name: &str) -> Option<(Tokenizer, Cases)> {
    let dir = fixtures()?;
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    let file = GgufFile::open(&gguf).unwrap_or_else(|e| panic!("{}: {e}", gguf.display()));
    let tok = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
    let cases = read_cases(
        &dir.join(format!("ggml-vocab-{name}.gguf.inp")),
        &dir.join(format!("ggml-vocab-{name}.gguf.out")),
    );
    Some((tok, cases))
}

/// Encodes every case and reports all mismatches at once.
fn check_golden(name: &str, tok: &Tokenizer, cases: &[(String, Vec<u32>)]) {
    check_golden_with(name, tok, cases, false);
}

/// As [`check_golden`], choosing whether special tokens written in the text are parsed.
fn check_golden_with(
    name: &str,
    tok: &Tokenizer,
    cases: &[(String, Vec<u32>)],
    parse_special: bool,
) {
    let mut failures = Vec::new();
    for (text, want) in cases {
        let got = tok
            .encode(text, false, parse_special)
            .unwrap_or_else(|e| panic!("{name}: {text:?}: {e}"));
        if &got != want {
            failures.push(format!("  {text:?}\n    want {want:?}\n    got  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    println!("{name}: {} cases match llama.cpp", cases.len());
}

fn check_round_trip(name: &str, tok: &Tokenizer, cases: &[(String, Vec<u32>)]) {
    for (text, _) in cases {
        let ids = tok
            .encode(text, false, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            &tok.decode(&ids, false),
            text,
            "{name}: decode(encode(s)) != s"
        );
    }
}

#[test]
fn vocab_gpt2_matches_llama_cpp() {
    let Some((tok, cases)) = load_vocab("gpt-2") else {
        return;
    };
    check_golden("gpt-2", &tok, &cases);
    check_round_trip("gpt-2", &tok, &cases);
}

#[test]
fn vocab_llama_bpe_matches_llama_cpp() {
    let Some((tok, cases)) = load_vocab("llama-bpe") else {
        return;
    };
    check_golden("llama-bpe", &tok, &cases);
    check_round_trip("llama-bpe", &tok, &cases);
}

#[test]
fn vocab_llama_spm_matches_llama_cpp() {
    let Some((tok, cases)) = load_vocab("llama-spm") else {
        return;
    };
    check_golden("llama-spm", &tok, &cases);
    // SentencePiece escapes spaces; decoding strips the one space prefix it adds.
    for (text, _) in &cases {
        let ids = tok.encode(text, false, false).unwrap();
        assert_eq!(&tok.decode(&ids, false), text, "llama-spm round trip");
    }
}

#[test]
fn vocab_qwen2_matches_llama_cpp() {
    let Some((tok, cases)) = load_vocab("qwen2") else {
        return;
    };
    check_golden("qwen2", &tok, &cases);
    check_round_trip("qwen2", &tok, &cases);
}

#[test]
fn vocab_starcoder_matches_llama_cpp() {
    let Some((tok, cases)) = load_vocab("starcoder") else {
        return;
    };
    check_golden("starcoder", &tok, &cases);
    check_round_trip("starcoder", &tok, &cases);
}

#[test]
fn vocab_deepseek_coder_matches_llama_cpp() {
    let Some((tok, cases)) = load_vocab("deepseek-coder") else {
        return;
    };
    check_golden("deepseek-coder", &tok, &cases);
    check_round_trip("deepseek-coder", &tok, &cases);
}

/// Further llama.cpp vocabularies, checked when their files are in the fixture folder.
#[test]
fn vocab_others_match_llama_cpp_when_present() {
    for name in [
        "deepseek-llm",
        "falcon",
        "mpt",
        "refact",
        "command-r",
        "phi-3",
        "gpt-neox",
        "baichuan",
        "aquila",
    ] {
        let dir = vocab_dir();
        if !dir.join(format!("ggml-vocab-{name}.gguf.out")).exists()
            || !dir.join(format!("ggml-vocab-{name}.gguf")).exists()
        {
            continue;
        }
        let Some((tok, cases)) = load_vocab(name) else {
            return;
        };
        check_golden(name, &tok, &cases);
    }
}

/// The default model's tokenizer; the GGUF is fetched the way the CLI fetches it.
fn smollm2() -> Option<Tokenizer> {
    let path = arbor_runtime::fetch::DEFAULT_MODEL
        .ensure(&|_, _| {})
        .expect("fetch the default model (network needed once)");
    let file = GgufFile::open(&path).expect("SmolLM2 GGUF");
    Some(Tokenizer::from_gguf(&file).expect("SmolLM2 tokenizer"))
}

#[test]
fn smollm2_matches_llama_cpp() {
    let Some(tok) = smollm2() else { return };
    assert_eq!(tok.bos_id(), Some(1));
    assert!(!tok.add_bos_default());
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert!(
        tok.eos_ids().contains(&2) && tok.eos_ids().contains(&0),
        "eos ids {:?}",
        tok.eos_ids()
    );
    // smollm2.out: special tokens parsed; smollm2.nospecial.out: not (both without BOS),
    // made with llama.cpp's llama-tokenize by scripts/make_tokenizer_golden.sh.
    let Some(dir) = fixtures() else { return };
    let inp = dir.join("smollm2.inp");
    for (file, parse_special) in [("smollm2.out", true), ("smollm2.nospecial.out", false)] {
        let cases = read_cases(&inp, &dir.join(file));
        check_golden_with(file, &tok, &cases, parse_special);
        for (text, want) in &cases {
            assert_eq!(
                &tok.decode(want, false),
                text,
                "{file}: decode of llama.cpp's ids"
            );
        }
    }
}

#[test]
fn smollm2_parses_chat_markers_and_renders_its_template() {
    let Some(tok) = smollm2() else { return };
    let im_start = tok.token_id("<|im_start|>").expect("im_start");
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>", false, true)
        .unwrap();
    assert_eq!(ids.first(), Some(&im_start));
    assert_eq!(ids.last(), Some(&2));
    let literal = tok.encode("<|im_start|>", false, false).unwrap();
    assert!(literal.len() > 1 && !literal.contains(&im_start));
    assert_eq!(tok.decode(&ids, true), "user\nHi");
    assert_eq!(tok.decode(&ids, false), "<|im_start|>user\nHi<|im_end|>");

    let msgs = [ChatMessage::new("user", "What is 2+2?")];
    let prompt = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let msgs = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
    ];
    let prompt = tok.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
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

const LLAMA3_STYLE: &str = "{{- bos_token }}\
{%- for message in messages %}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

const QWEN2_STYLE: &str = "{%- if messages[0].role != 'system' %}\
{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}\
{%- endif %}\
{%- for message in messages %}\
{%- if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unknown role: ' ~ message.role) }}{% endif %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "  Hi there  "),
        ChatMessage::new("assistant", "Hello."),
        ChatMessage::new("user", "Bye"),
    ]
}

#[test]
fn chat_template_llama3_style() {
    let t = ChatTemplate::new(LLAMA3_STYLE).unwrap();
    let out = t
        .render(&conversation(), true, "<|begin_of_text|>", "<|eot_id|>")
        .unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn chat_template_qwen2_style_and_errors() {
    let t = ChatTemplate::new(QWEN2_STYLE).unwrap();
    let out = t
        .render(&conversation()[1..2], true, "", "<|im_end|>")
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let out = t.render(&conversation(), false, "", "").unwrap();
    assert!(out.starts_with("<|im_start|>system\nYou are terse.<|im_end|>\n"));
    assert!(out.ends_with("<|im_start|>user\nBye<|im_end|>\n"));

    let err = t
        .render(&[ChatMessage::new("wizard", "x")], false, "", "")
        .unwrap_err();
    match err {
        RuntimeError::ChatTemplate(msg) => assert!(msg.contains("Unknown role: wizard"), "{msg}"),
        other => panic!("wrong error {other:?}"),
    }
    assert!(matches!(
        ChatTemplate::new("{% for x in %}"),
        Err(RuntimeError::ChatTemplate(_))
    ));
}

#[test]
fn chat_template_python_methods_and_tojson() {
    let src = "{{ messages[0].content.upper() }}|{{ messages[0].content.startswith('hel') }}|\
               {{ messages[0].content.split(' ') | length }}|{{ messages | tojson }}|\
               {% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
    let t = ChatTemplate::new(src).unwrap();
    let out = t
        .render(
            &[ChatMessage::new("user", "hello big \"world\"")],
            false,
            "",
            "",
        )
        .unwrap();
    assert_eq!(
        out,
        "HELLO BIG \"WORLD\"|True|3|[{\"role\": \"user\", \"content\": \"hello big \\\"world\\\"\"}]|a=1"
    );
}

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
    let parts = stream(&tok, &ids);
    assert_eq!(
        parts.concat(),
        "<s> ab ab é",
        "HF strips only a leading space of the whole text"
    );
    assert_eq!(parts[4], "", "first byte of é waits for the second");
}

#[test]
fn chat_template_json_context() {
    let src =
        "{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{{ m.tool_calls | tojson }}\
               {% else %}{{ m.content }}{% endif %};{% endfor %}{{ tools is none }}";
    let t = ChatTemplate::new(src).unwrap();
    let ctx = serde_json::json!({
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "tool_calls": [{"arguments": {"x": 1}, "name": "f"}]}],
        "tools": null
    });
    assert_eq!(
        t.render_json(&ctx).unwrap(),
        "user:hi;assistant:[{\"arguments\": {\"x\": 1}, \"name\": \"f\"}];True"
    );
    assert_eq!(
        t.render(&[ChatMessage::new("user", "x")], false, "", "")
            .unwrap(),
        "user:x;True"
    );
    assert!(t.render_json(&serde_json::json!([1])).is_err());
}

#[test]
fn tokenizer_and_template_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Tokenizer>();
    shared::<ChatTemplate>();
}
