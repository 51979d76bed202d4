//! File formats and bad input: GGUF (every value type, v2/v3, alignment, every kind of
//! corruption), safetensors headers, config.json, and models that do not fit their config.
//! Each bad file must give an error that names the problem, never a panic.

use arbor_kernels::quant::GgmlType;
use arbor_runtime::gguf::{parse, GgufFile, GgufWriter, MetaValue as V};
use arbor_runtime::safetensors::parse_header;
use arbor_runtime::{Model, ModelConfig, RuntimeError};
use std::path::PathBuf;

/// A scratch file path ending in `name`, removed when the returned guard drops.
fn temp_path(name: &str) -> tempfile::TempPath {
    tempfile::Builder::new()
        .prefix("arbor-formats-")
        .suffix(&format!("-{name}"))
        .tempfile()
        .expect("temp file")
        .into_temp_path()
}

fn every_value_type() -> Vec<(&'static str, V)> {
    vec![
        ("u8", V::U8(200)),
        ("i8", V::I8(-100)),
        ("u16", V::U16(60000)),
        ("i16", V::I16(-30000)),
        ("u32", V::U32(4_000_000_000)),
        ("i32", V::I32(-2_000_000_000)),
        ("f32", V::F32(1.5e-5)),
        ("bool", V::Bool(true)),
        ("string", V::String("héllo ✓".into())),
        ("u64", V::U64(u64::MAX)),
        ("i64", V::I64(i64::MIN)),
        ("f64", V::F64(-2.25)),
        (
            "array.str",
            V::Array(vec![V::String("a".into()), V::String("".into())]),
        ),
        ("array.f32", V::Array(vec![V::F32(1.0), V::F32(-0.5)])),
        (
            "array.nested",
            V::Array(vec![
                V::Array(vec![V::I32(1)]),
                V::Array(vec![V::I32(2), V::I32(3)]),
            ]),
        ),
        ("array.empty", V::Array(vec![])),
    ]
}

fn sample_file(version: u32, alignment: Option<u32>) -> Vec<u8> {
    let mut w = GgufWriter::new(version);
    if let Some(a) = alignment {
        w = w.meta("general.alignment", V::U32(a));
    }
    for (k, v) in every_value_type() {
        w = w.meta(k, v);
    }
    let q8: Vec<u8> = (0..2 * 34).map(|i| (i * 7 % 251) as u8).collect();
    w.tensor_f32("a", &[3], &[1.0, 2.0, 3.0])
        .tensor("b", &[32, 2], GgmlType::Q8_0, q8)
        .build()
}

#[test]
fn every_metadata_type_round_trips_in_v2_and_v3() {
    for version in [2, 3] {
        let h = parse(&sample_file(version, None)).expect("parse");
        assert_eq!(h.version, version);
        for (k, v) in every_value_type() {
            assert_eq!(h.get(k), Some(&v), "{k}");
        }
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[1].dims, vec![32, 2]);
        assert_eq!(h.tensors[1].nbytes, 68);
    }
}

#[test]
fn alignment_and_offsets_are_honoured() {
    for align in [None, Some(64), Some(256)] {
        let bytes = sample_file(3, align);
        let path = temp_path("aligned.gguf");
        std::fs::write(&path, &bytes).expect("write");
        let f = GgufFile::open(&path).expect("open");
        let expect = align.unwrap_or(32) as usize;
        assert_eq!(f.header.data_offset % expect, 0);
        let a = f.tensor("a").expect("a");
        let vals: Vec<f32> = f
            .tensor_data(a)
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, [1.0, 2.0, 3.0]);
        let b = f.tensor("b").expect("b");
        assert_eq!(b.offset % expect as u64, 0);
        assert_eq!(f.tensor_data(b)[..3], [0, 7, 14]);
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample_file(3, None);
    let h = parse(&bytes).expect("whole file parses");
    let end = h
        .tensors
        .iter()
        .map(|t| h.data_offset + t.offset as usize + t.nbytes)
        .max()
        .unwrap();
    for len in 0..end {
        assert!(
            parse(&bytes[..len]).is_err(),
            "prefix of {len} bytes parsed"
        );
    }
}

#[test]
fn garbage_never_panics() {
    let good = sample_file(3, None);
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        // Flip a few bytes of a valid file, or write random bytes after a valid magic.
        let mut b = good.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        let _ = parse(&b);
        let mut r: Vec<u8> = b"GGUF\x03\0\0\0".to_vec();
        r.extend((0..next() % 200).map(|_| next() as u8));
        let _ = parse(&r);
    }
}

fn err_of(bytes: &[u8]) -> String {
    parse(bytes).expect_err("must fail")
}

#[test]
fn corrupt_headers_are_named() {
    assert!(err_of(b"GGML....").contains("not a GGUF file"));
    assert!(err_of(b"GG").contains("too short"));
    let mut v1 = b"GGUF".to_vec();
    v1.extend(1u32.to_le_bytes());
    v1.extend([0u8; 16]);
    assert!(err_of(&v1).contains("version 1"));
    let mut be = b"GGUF".to_vec();
    be.extend(3u32.to_be_bytes());
    be.extend([0u8; 16]);
    assert!(err_of(&be).contains("big-endian"));

    // A metadata array claiming 2^40 elements must not allocate; it is rejected.
    let mut huge = b"GGUF".to_vec();
    huge.extend(3u32.to_le_bytes());
    huge.extend(0u64.to_le_bytes());
    huge.extend(1u64.to_le_bytes());
    huge.extend(1u64.to_le_bytes());
    huge.push(b'k');
    huge.extend(9u32.to_le_bytes());
    huge.extend(4u32.to_le_bytes());
    huge.extend((1u64 << 40).to_le_bytes());
    assert!(err_of(&huge).contains("exceeds"));

    let mut bad_type = huge[..huge.len() - 16].to_vec();
    bad_type.extend(99u32.to_le_bytes());
    assert!(err_of(&bad_type).contains("unknown metadata value type 99"));

    let iq = GgufWriter::new(3)
        .tensor("t", &[256], GgmlType::Q8_0, vec![])
        .build();
    let mut iq = iq;
    // Patch the type id of the only tensor (after name, n_dims and one dim) to IQ2_XXS (16).
    let pos = 24 + 8 + 1 + 4 + 8;
    iq[pos..pos + 4].copy_from_slice(&16u32.to_le_bytes());
    let e = err_of(&iq);
    assert!(e.contains("type id 16") && e.contains("IQ"), "{e}");

    let partial = GgufWriter::new(3)
        .tensor("t", &[33], GgmlType::Q8_0, vec![0; 68])
        .build();
    assert!(err_of(&partial).contains("not whole Q8_0 blocks"));
    let past_end = GgufWriter::new(3)
        .tensor_f32("t", &[1000], &[0.0; 4])
        .build();
    assert!(err_of(&past_end).contains("truncated"));
    let bad_align = GgufWriter::new(3)
        .meta("general.alignment", V::U32(24))
        .build();
    assert!(err_of(&bad_align).contains("power of two"));
}

/// A minimal llama-shaped GGUF with config metadata but tensors chosen by the caller.
fn model_file(arch: &str, tensors: impl FnOnce(GgufWriter) -> GgufWriter) -> tempfile::TempPath {
    let w = GgufWriter::new(3)
        .meta("general.architecture", V::String(arch.into()))
        .meta(&format!("{arch}.block_count"), V::U32(1))
        .meta(&format!("{arch}.context_length"), V::U32(64))
        .meta(&format!("{arch}.embedding_length"), V::U32(8))
        .meta(&format!("{arch}.feed_forward_length"), V::U32(16))
        .meta(&format!("{arch}.attention.head_count"), V::U32(2))
        .meta(&format!("{arch}.vocab_size"), V::U32(4));
    let path = temp_path("model.gguf");
    std::fs::write(&path, tensors(w).build()).expect("write");
    path
}

fn load_err(path: &std::path::Path) -> String {
    match Model::load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_architecture_is_named() {
    let e = load_err(&model_file("gptj", |w| w));
    assert!(e.contains("unsupported architecture 'gptj'"), "{e}");
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let e = load_err(&model_file("llama", |w| w));
    assert!(
        e.contains("token_embd.weight") && e.contains("missing"),
        "{e}"
    );
    let e = load_err(&model_file("llama", |w| {
        w.tensor_f32("token_embd.weight", &[8, 5], &[0.0; 40])
    }));
    assert!(
        e.contains("token_embd.weight") && e.contains("[5, 8]") && e.contains("[4, 8]"),
        "{e}"
    );
}

#[test]
fn missing_files_and_garbage_files_are_errors() {
    let e = load_err(std::path::Path::new("/nonexistent/model.gguf"));
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
    let p = temp_path("garbage.gguf");
    std::fs::write(&p, b"this is not a model").expect("write");
    assert!(load_err(&p).contains("not a GGUF file"));
    let dir = tempfile::tempdir().expect("temp dir");
    assert!(load_err(dir.path()).contains("config.json"));
}

#[test]
fn safetensors_headers_are_checked() {
    let file = |header: &str, data: usize| {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; data]);
        b
    };
    let ok = file(
        r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"format":"pt"}}"#,
        16,
    );
    let t = parse_header(&ok).expect("valid");
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].shape, vec![2, 2]);
    let cases = [
        (vec![1, 2, 3], "shorter"),
        (u64::MAX.to_le_bytes().to_vec(), "exceeds"),
        (file("not json", 0), "not JSON"),
        (
            file(
                r#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
                8,
            ),
            "dtype I64",
        ),
        (
            file(
                r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
                8,
            ),
            "outside",
        ),
        (
            file(
                r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
            ),
            "do not match",
        ),
        (
            file(r#"{"w":{"dtype":"F32","shape":[1]}}"#, 8),
            "data_offsets",
        ),
    ];
    for (bytes, want) in cases {
        let e = parse_header(&bytes).expect_err(want);
        assert!(e.contains(want), "{e} lacks {want}");
    }
}

#[test]
fn config_json_is_validated() {
    let e = ModelConfig::from_hf_json(r#"{"model_type":"bert"}"#).unwrap_err();
    assert!(matches!(e, RuntimeError::UnknownArchitecture(ref a) if a == "bert"));
    let e = ModelConfig::from_hf_json(r#"{"model_type":"llama","hidden_size":64}"#).unwrap_err();
    assert!(e.to_string().contains("num_attention_heads"), "{e}");
    let base = r#""model_type":"llama","hidden_size":64,"num_hidden_layers":1,"intermediate_size":8,"vocab_size":10"#;
    let e = ModelConfig::from_hf_json(&format!(
        "{{{base},\"num_attention_heads\":4,\"num_key_value_heads\":3}}"
    ))
    .unwrap_err();
    assert!(e.to_string().contains("cannot be grouped"), "{e}");
    assert!(ModelConfig::from_hf_json("{").is_err());
    let cfg =
        ModelConfig::from_hf_json(&format!("{{{base},\"num_attention_heads\":4}}")).expect("valid");
    assert_eq!(cfg.head_dim, 16);
}

/// Inputs the fuzzer found (a minimised sample of its corpus, see fuzz/): each must parse or
/// fail cleanly, and a parsed header must give a tokenizer or a clean error.
#[test]
fn fuzz_corpus_regressions() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fuzz/gguf");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("fuzz corpus directory") {
        let bytes = std::fs::read(e.expect("entry").path()).expect("read");
        if let Ok(h) = parse(&bytes) {
            let _ = arbor_runtime::Tokenizer::from_gguf_header(&h);
        }
        n += 1;
    }
    assert!(n >= 20, "only {n} corpus files");
}

/// Llama 3 GGUFs carry RoPE frequency factors as `rope_freqs.weight` (rotary dims / 2 values).
#[test]
fn gguf_rope_freqs_become_factors_and_are_checked() {
    use arbor_kernels::ops::RopeScaling;
    // embedding 8, 2 heads → head dim 4 → 2 factors.
    let ok = model_file("llama", |w| {
        w.tensor_f32("rope_freqs.weight", &[2], &[1.0, 4.0])
    });
    let cfg = ModelConfig::from_gguf(&GgufFile::open(&ok).expect("open")).expect("config");
    assert_eq!(cfg.rope_scaling, RopeScaling::Factors(vec![1.0, 4.0]));
    let bad = model_file("llama", |w| {
        w.tensor_f32("rope_freqs.weight", &[3], &[1.0; 3])
    });
    let e = ModelConfig::from_gguf(&GgufFile::open(&bad).expect("open"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rope_freqs.weight") && e.contains("3 factors"),
        "{e}"
    );
}
