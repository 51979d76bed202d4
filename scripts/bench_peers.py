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

Example (CPU, tiny):
  python3 scripts/bench_peers.py --shape smollm2-135m --width 1,4 --prompt-len 32 --gen-len 8
"""

import argparse
import json
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
}


def ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def build_model(shape, dtype, device, seed):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(SHAPES[shape])
    model_type = d.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **d)
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
    h, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
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
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    model, cfg = build_model(a.shape, dtype, a.device, a.seed)
    env = dict(shape=a.shape, device=a.device, dtype=str(dtype).replace("torch.", ""),
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
