"""Runs kernels/sample.cu's `sample_rows` on the emulator for inputs a Rust test prepared.

The reference for the sampler is the CPU sampler itself (crates/arbor-kernels/src/ops/sample),
so the check lives in Rust (crates/arbor-kernels/tests/cuda/emulator.rs): it builds the rows
with `SamplePlan` exactly as the GPU wrapper does, writes them to DIR, runs
    python3 scripts/kernel_emu/run_sample.py DIR
and compares what this writes to DIR/out.u32 with the CPU sampler, row by row.

DIR holds meta.txt ("vocab rows scratch_len out_len"), logits.f32, params.bin, hist_tok.u32
and hist_cnt.u32, all raw little-endian. Both thread orders must give the same words.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emu import Kernels, both_orders  # noqa: E402

THREADS = 1024  # SAMPLE_THREADS in sample.cu


def main(d):
    vocab, rows, scratch_len, out_len = (int(v) for v in open(os.path.join(d, "meta.txt")).read().split())

    def load(name, dtype):
        return np.fromfile(os.path.join(d, name), dtype)

    logits = load("logits.f32", np.float32)
    params = load("params.bin", np.uint8)
    hist_tok, hist_cnt = load("hist_tok.u32", np.uint32), load("hist_cnt.u32", np.uint32)
    if logits.size != vocab * rows or params.size != 80 * rows:
        raise SystemExit(f"run_sample: {logits.size} logits and {params.size} parameter bytes "
                         f"for {rows} rows of vocabulary {vocab}")
    k = Kernels("sample")

    def go():
        # Sentinels: a word the kernel should write but does not shows up as 0xEEEEEEEE.
        out = k.buf(np.full(out_len, 0xEEEEEEEE, np.uint32))
        scratch = k.buf(np.full(max(scratch_len, 0), np.nan, np.float32))
        k.launch("sample_rows", (rows,), (THREADS,), k.buf(logits), np.uint32(vocab),
                 k.buf(params), k.buf(hist_tok), k.buf(hist_cnt), scratch, out)
        return out.get()

    both_orders(k, go).tofile(os.path.join(d, "out.u32"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: run_sample.py DIR")
    main(sys.argv[1])
