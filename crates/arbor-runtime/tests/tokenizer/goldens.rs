//! llama.cpp's tokenizer goldens and SmolLM2 cases from llama-tokenize.

use super::*;

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
