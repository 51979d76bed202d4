#!/usr/bin/env python3
"""Peer baselines for `arbor bench`: HF transformers `generate` on random-weight models of the
same published shapes (configs built from literal dicts: nothing is downloaded).

Per (mode, width, prompt_len, gen_len) it prints one JSON line:
  mode: greedy (one sequence), best-of-n (do_sample, num_return_sequences=width) or
        beam (num_beams=width, num_return_sequences=width);
  min_new_tokens = max_new_tokens = gen_len (EOS cannot end a sequence early);
  prompt: prompt_len random token ids;
  generated_tokens = sequences × gen_len, tokens_per_s = generated_tokens / wall_s.
Then one line of torch SDPA decode timing for the model's attention shape, and one line of
device copy bandwidth (torch tensor copy, GB/s read+write) as the physical limit.

Shapes are those of `arbor bench --dummy-weights` (crates/arbor-runtime/src/dummy.rs), dense and
mixture-of-experts: qwen3-30b-a3b, qwen1.5-moe-a2.7b and mixtral-8x7b build HF Qwen3MoeConfig,
Qwen2MoeConfig and MixtralConfig with the published expert counts, top-k and norm_topk_prob.
--tiny shrinks a shape for a quick check that its peer builds and runs.

With --sdpa-tree it times only torch SDPA attending per branch on the tree cells of
`arbor bench attention` (no transformers needed): cell "B,P,S[,LEVELS]" is B branches below
a P-token prefix, each of the LEVELS-1 levels below adding S tokens (LEVELS 2: flat, 4:
beam-like; default 2). Each branch's one decode query attends its own copy of its whole
context (P + (LEVELS-1)·S tokens), batched over branches; heads, KV heads and head_dim come
from --heads/--kv-heads/--head-dim (default 32, 8, 128, as arbor bench attention). Any part of
a cell may be a '/'-separated list (the cells are their product); cells are separated by ';'
or given by repeating the flag. One JSON line per cell (ms, KV bytes read, unique KV bytes of
the tree, bandwidth over them and the fraction of the copy bandwidth, as arbor reports them),
then the copy-bandwidth line.

Examples (CPU, tiny):
  python3 scripts/bench_peers.py --shape smollm2-135m --width 1,4 --prompt-len 32 --gen-len 8
  python3 scripts/bench_peers.py --sdpa-tree '4/8,64,8,2/4' --heads 4 --kv-heads 2 --head-dim 32
  python3 scripts/bench_peers.py --shape qwen3-30b-a3b --tiny --width 2 --prompt-len 8 --gen-len 4
"""

import argparse
import itertools
import json
import math
import platform
import time

import torch

SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=1536, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936,
                         max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064,
                       max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       intermediate_size=14336, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=False),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         intermediate_size=8192, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    # Mixture-of-experts shapes, as crates/arbor-runtime/src/dummy.rs: every layer MoE
    # (decoder_sparse_step 1, no mlp_only_layers), routing settings of the published configs.
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], vocab_size=151936,
                          max_position_embeddings=40960, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", hidden_size=2048, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16,
                              intermediate_size=5632, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, num_experts=60,
                              num_experts_per_tok=4, norm_topk_prob=False,
                              decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                              max_position_embeddings=8192, rms_norm_eps=1e-6,
                              rope_theta=1000000.0, tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         rope_theta=1000000.0, sliding_window=None,
                         tie_word_embeddings=False),
}

# MoE settings the built HF config must have (checked after building, so that a transformers
# version renaming a key fails loudly instead of benchmarking another shape).
MOE_CHECKS = {
    "qwen3-30b-a3b": [("num_experts", 128), ("num_experts_per_tok", 8),
                      ("moe_intermediate_size", 768), ("norm_topk_prob", True)],
    "qwen1.5-moe-a2.7b": [("num_experts", 60), ("num_experts_per_tok", 4),
                          ("moe_intermediate_size", 1408),
                          ("shared_expert_intermediate_size", 5632),
                          ("norm_topk_prob", False)],
    "mixtral-8x7b": [("num_local_experts", 8), ("num_experts_per_tok", 2),
                     ("intermediate_size", 14336)],
}


def tiny(d):
    """`d` shrunk to a few MB for a smoke test (--tiny): same family, expert count, top-k and
    routing settings; small widths, two layers, a small vocabulary."""
    d = dict(d)
    heads = 4
    kv = heads if d["num_key_value_heads"] == d["num_attention_heads"] else 2
    d.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=heads,
             num_key_value_heads=kv, intermediate_size=128, vocab_size=512,
             max_position_embeddings=max(8192, d.get("max_position_embeddings", 0)))
    if "head_dim" in d:
        d["head_dim"] = 16
    if "moe_intermediate_size" in d:
        d["moe_intermediate_size"] = 32
    if d.get("shared_expert_intermediate_size"):
        d["shared_expert_intermediate_size"] = 48
    return d


def ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def build_config(shape, small=False):
    from transformers import AutoConfig

    d = tiny(SHAPES[shape]) if small else dict(SHAPES[shape])
    model_type = d.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **d)
    for key, want in MOE_CHECKS.get(shape, []):
        if small and key.endswith("intermediate_size"):
            continue
        got = getattr(cfg, key, None)
        if got != want:
            import transformers
            raise SystemExit(f"{shape}: the {type(cfg).__name__} built has {key}={got!r}, "
                             f"not {want!r} (transformers {transformers.__version__})")
    return cfg


def build_model(shape, dtype, device, seed, small=False):
    from transformers import AutoModelForCausalLM

    cfg = build_config(shape, small)
    cfg.eos_token_id = None
    cfg.pad_token_id = 0
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), cfg


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(model, cfg, mode, width, prompt_len, gen_len, device, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (1, prompt_len), generator=g).to(device)
    kw = dict(max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=0,
              eos_token_id=None, attention_mask=torch.ones_like(ids))
    if mode == "greedy":
        kw.update(do_sample=False)
        seqs = 1
    elif mode == "best-of-n":
        kw.update(do_sample=True, temperature=1.0, top_k=0, num_return_sequences=width)
        seqs = width
    elif mode == "beam":
        kw.update(do_sample=False, num_beams=width, num_return_sequences=width,
                  early_stopping=False, length_penalty=1.0)
        seqs = width
    else:
        raise ValueError(mode)
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    sync(device)
    wall = time.perf_counter() - t0
    new = out.shape[1] - prompt_len
    assert new == gen_len, f"generated {new} tokens, expected {gen_len}"
    rec = dict(peer="transformers", mode=mode, width=width, prompt_len=prompt_len,
               gen_len=gen_len, sequences=int(out.shape[0]), generated_tokens=seqs * gen_len,
               wall_s=wall, tokens_per_s=seqs * gen_len / wall)
    if device.startswith("cuda"):
        rec["gpu_mem_peak_bytes"] = torch.cuda.max_memory_allocated()
    return rec


def sdpa_timing(cfg, width, ctx, dtype, device, reps):
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return sdpa_shape_timing(width, ctx, cfg.num_attention_heads, cfg.num_key_value_heads, hd,
                             dtype, device, reps)


def sdpa_shape_timing(width, ctx, h, kvh, hd, dtype, device, reps):
    """One decode query per sequence over its own `ctx` keys, `width` sequences batched."""
    q = torch.randn(width, h, 1, hd, dtype=dtype, device=device)
    k = torch.randn(width, kvh, ctx, hd, dtype=dtype, device=device)
    v = torch.randn_like(k)
    f = torch.nn.functional.scaled_dot_product_attention
    kw = dict(enable_gqa=True) if kvh != h else {}
    f(q, k, v, **kw)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        f(q, k, v, **kw)
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    kv_bytes = 2 * k.numel() * k.element_size()
    return dict(peer="torch-sdpa", width=width, context=ctx, heads=h, kv_heads=kvh,
                head_dim=hd, ms=dt * 1e3, kv_gb_per_s=kv_bytes / dt / 1e9)


def level_sizes(b, levels):
    """Nodes per tree level, as arbor bench attention builds them: 1 (the prefix), then
    ceil(B^(k/(L-1))) for the levels between, B at the last."""
    sizes = [1]
    for k in range(1, levels):
        n = b if k == levels - 1 else math.ceil(b ** (k / (levels - 1)) - 1e-9)
        sizes.append(min(max(n, 1), b))
    return sizes


def tree_cells(specs):
    """Parses --sdpa-tree values into (B, P, S, LEVELS) cells."""
    cells = []
    for spec in specs:
        for cell in [c for c in spec.split(";") if c.strip()]:
            parts = [p.strip() for p in cell.split(",")]
            if len(parts) == 3:
                parts.append("2")
            if len(parts) != 4:
                raise SystemExit(f"--sdpa-tree: '{cell}' is not B,P,S[,LEVELS]")
            try:
                lists = [[int(x) for x in p.split("/") if x] for p in parts]
            except ValueError:
                raise SystemExit(f"--sdpa-tree: '{cell}' holds something other than whole numbers")
            if any(not l or min(l) < 1 for l in lists) or min(lists[3]) < 2:
                raise SystemExit(f"--sdpa-tree: '{cell}': B, P, S at least 1, LEVELS at least 2")
            cells.extend(itertools.product(*lists))
    return cells


def sdpa_tree_timing(b, p, s, levels, h, kvh, hd, dtype, device, reps, max_gb):
    """torch SDPA attending per branch on one tree cell; branches in chunks that fit max_gb."""
    ctx = p + (levels - 1) * s
    elem = torch.finfo(dtype).bits // 8
    per_branch = 2 * kvh * ctx * hd * elem
    chunk = max(1, min(b, int(max_gb * 1e9 // per_branch)))
    ms = 0.0
    done = 0
    while done < b:
        n = min(chunk, b - done)
        ms += sdpa_shape_timing(n, ctx, h, kvh, hd, dtype, device, reps)["ms"]
        done += n
    per_pos = 2 * kvh * hd * elem
    unique = (p + sum(level_sizes(b, levels)[1:]) * s) * per_pos
    return dict(peer="torch-sdpa-tree", b=b, p=p, s=s, levels=levels, heads=h, kv_heads=kvh,
                head_dim=hd, ms=ms, kv_bytes_read=b * ctx * per_pos, unique_kv_bytes=unique,
                unique_bw_gbs=unique / (ms * 1e-3) / 1e9, branch_chunk=chunk)


def copy_bandwidth(device, mb, reps):
    n = mb * (1 << 20) // 4
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    return dict(peer="torch-copy", bytes=2 * a.numel() * 4, gb_per_s=2 * a.numel() * 4 / dt / 1e9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--modes", default="greedy,best-of-n,beam")
    ap.add_argument("--width", default="1,4,16")
    ap.add_argument("--prompt-len", default="128")
    ap.add_argument("--gen-len", default="64")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--copy-mb", type=int, default=256)
    ap.add_argument("--tiny", action="store_true",
                    help="shrink the shape's widths and depth (same family, experts and top-k): "
                         "a smoke test of the peer, not a benchmark")
    ap.add_argument("--sdpa-tree", action="append", default=[], metavar="B,P,S[,LEVELS]",
                    help="only time torch SDPA per branch on these tree cells (see above)")
    ap.add_argument("--heads", type=int, default=32, help="query heads of --sdpa-tree cells")
    ap.add_argument("--kv-heads", type=int, default=8, help="KV heads of --sdpa-tree cells")
    ap.add_argument("--head-dim", type=int, default=128, help="head_dim of --sdpa-tree cells")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per --sdpa-tree cell")
    ap.add_argument("--sdpa-max-gb", type=float, default=32.0,
                    help="most K+V bytes (GB) of one SDPA call; more branches run in chunks")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    if a.sdpa_tree:
        if a.kv_heads < 1 or a.heads % a.kv_heads:
            raise SystemExit(f"--kv-heads {a.kv_heads} must divide --heads {a.heads}")
        cells = tree_cells(a.sdpa_tree)
        env = dict(device=a.device, dtype=str(dtype).replace("torch.", ""),
                   threads=torch.get_num_threads(), torch=torch.__version__,
                   host=platform.node())
        copy = copy_bandwidth(a.device, a.copy_mb, 10)
        # Warm-up: the first call pays for thread pools and kernel selection.
        sdpa_shape_timing(2, 64, a.heads, a.kv_heads, a.head_dim, dtype, a.device, 2)
        for (b, p, s, levels) in cells:
            rec = sdpa_tree_timing(b, p, s, levels, a.heads, a.kv_heads, a.head_dim, dtype,
                                   a.device, a.reps, a.sdpa_max_gb)
            rec.update(copy_bw_gbs=copy["gb_per_s"],
                       frac_of_copy_bw=rec["unique_bw_gbs"] / copy["gb_per_s"])
            print(json.dumps({**rec, **env}), flush=True)
        print(json.dumps({**copy, **env}), flush=True)
        return
    model, cfg = build_model(a.shape, dtype, a.device, a.seed, a.tiny)
    env = dict(shape=a.shape + (" (tiny)" if a.tiny else ""), device=a.device, dtype=str(dtype).replace("torch.", ""),
               threads=torch.get_num_threads(), torch=torch.__version__,
               host=platform.node())
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    # Warm-up: first calls pay for allocation and kernel selection.
    run_generate(model, cfg, "greedy", 1, 8, 2, a.device, a.seed)
    for p in ints(a.prompt_len):
        for g in ints(a.gen_len):
            for mode in [m for m in a.modes.split(",") if m]:
                widths = [1] if mode == "greedy" else ints(a.width)
                for w in widths:
                    rec = run_generate(model, cfg, mode, w, p, g, a.device, a.seed)
                    print(json.dumps({**rec, **env}), flush=True)
    if not a.no_sdpa:
        for p in ints(a.prompt_len):
            for w in ints(a.width):
                print(json.dumps({**sdpa_timing(cfg, w, p, dtype, a.device, 20), **env}), flush=True)
    print(json.dumps({**copy_bandwidth(a.device, a.copy_mb, 10), **env}), flush=True)


if __name__ == "__main__":
    main()
