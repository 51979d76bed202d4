//! Dequantisation checked against blocks made by gguf-py (llama.cpp's Python reference), see
//! `scripts/make_quant_fixtures.py`; plus the error cases and the integer-dot decoders.

use super::legacy::LegacyFormat;
use super::{dequantize, kquants, legacy, GgmlType};

macro_rules! fixture {
    ($name:literal) => {
        (
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/quant/",
                $name,
                ".bin"
            ))
            .as_slice(),
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/quant/",
                $name,
                ".f32"
            ))
            .as_slice(),
        )
    };
}

/// Every type arbor reads, with its fixture (raw blocks, expected f32).
fn fixtures() -> Vec<(GgmlType, &'static [u8], &'static [u8])> {
    let list = [
        (GgmlType::F32, fixture!("f32")),
        (GgmlType::F16, fixture!("f16")),
        (GgmlType::BF16, fixture!("bf16")),
        (GgmlType::Q4_0, fixture!("q4_0")),
        (GgmlType::Q4_1, fixture!("q4_1")),
        (GgmlType::Q5_0, fixture!("q5_0")),
        (GgmlType::Q5_1, fixture!("q5_1")),
        (GgmlType::Q8_0, fixture!("q8_0")),
        (GgmlType::Q8_1, fixture!("q8_1")),
        (GgmlType::Q2K, fixture!("q2_k")),
        (GgmlType::Q3K, fixture!("q3_k")),
        (GgmlType::Q4K, fixture!("q4_k")),
        (GgmlType::Q5K, fixture!("q5_k")),
        (GgmlType::Q6K, fixture!("q6_k")),
        (GgmlType::Q8K, fixture!("q8_k")),
    ];
    list.into_iter().map(|(t, (b, f))| (t, b, f)).collect()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn every_type_dequantizes_bit_exactly_like_gguf_py() {
    for (ty, bin, f32s) in fixtures() {
        let want = floats(f32s);
        assert_eq!(
            bin.len(),
            ty.bytes_for(want.len()).unwrap(),
            "{ty}: fixture size"
        );
        let mut got = vec![0.0f32; want.len()];
        dequantize(ty, bin, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if w.is_nan() {
                assert!(g.is_nan(), "{ty} element {i}: got {g}, want NaN");
            } else {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{ty} element {i} (block {}): got {g}, want {w}",
                    i / ty.block_size()
                );
            }
        }
    }
}

#[test]
fn wrong_byte_counts_and_partial_blocks_are_errors() {
    for (ty, bin, f32s) in fixtures() {
        let n = f32s.len() / 4;
        let mut out = vec![0.0f32; n];
        assert!(
            dequantize(ty, &bin[..bin.len() - 1], &mut out).is_err(),
            "{ty}: one byte short"
        );
        let mut long = bin.to_vec();
        long.push(0);
        assert!(
            dequantize(ty, &long, &mut out).is_err(),
            "{ty}: one byte over"
        );
        assert!(dequantize(ty, &[], &mut out).is_err(), "{ty}: no data");
        if ty.block_size() > 1 {
            let mut partial = vec![0.0f32; ty.block_size() - 1];
            assert!(
                dequantize(ty, &bin[..ty.type_size()], &mut partial).is_err(),
                "{ty}: partial block"
            );
            let mut over = vec![0.0f32; ty.block_size() + 1];
            assert!(
                dequantize(ty, &bin[..ty.type_size()], &mut over).is_err(),
                "{ty}: block and a bit"
            );
        }
        assert!(dequantize(ty, &[], &mut []).is_ok(), "{ty}: nothing to do");
    }
}

/// The integer-dot decoders (`legacy::Decoded`, `kquants::DecodedK`) describe the same values:
/// `d·q + m` per element, resp. `d·sc[k]·q + cd·cm[k]` per group of 16.
#[test]
fn dot_decoders_reproduce_dequantized_values() {
    fn close(ty: GgmlType, i: usize, got: f32, want: f32, scale: f32) {
        let tol = 1e-6 * scale.abs().max(want.abs()) + f32::MIN_POSITIVE;
        assert!(
            (got - want).abs() <= tol,
            "{ty} element {i}: decoded {got}, dequantized {want}"
        );
    }
    for (ty, bin, f32s) in fixtures() {
        if !ty.is_quantized() {
            continue;
        }
        let want = floats(f32s);
        for (b, block) in bin.chunks_exact(ty.type_size()).enumerate() {
            let base = b * ty.block_size();
            if ty.block_size() == 32 {
                let dec = match ty {
                    GgmlType::Q4_0 => legacy::Q4_0::decode(block),
                    GgmlType::Q4_1 => legacy::Q4_1::decode(block),
                    GgmlType::Q5_0 => legacy::Q5_0::decode(block),
                    GgmlType::Q5_1 => legacy::Q5_1::decode(block),
                    GgmlType::Q8_0 => legacy::Q8_0::decode(block),
                    _ => legacy::Q8_1::decode(block),
                };
                for (j, &q) in dec.q.iter().enumerate() {
                    let v = dec.d * q as f32 + dec.m;
                    close(ty, base + j, v, want[base + j], dec.d * 32.0 + dec.m);
                }
            } else {
                let dec = kquants::decode_k(ty, block);
                for (j, &q) in dec.q.iter().enumerate() {
                    let k = j / 16;
                    let v = dec.d * dec.sc[k] as f32 * q as f32 + dec.cd * dec.cm[k] as f32;
                    close(ty, base + j, v, want[base + j], dec.cd * dec.cm[k] as f32);
                }
            }
        }
    }
}

#[test]
fn unknown_type_ids_are_errors() {
    for id in [4u32, 5, 16, 24, 31, 99] {
        assert!(GgmlType::from_id(id).is_err());
    }
    for (ty, _, _) in fixtures() {
        assert_eq!(GgmlType::from_id(ty.id()).unwrap(), ty);
    }
}
