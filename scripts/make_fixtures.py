#!/usr/bin/env python3
"""Tiny random-weight HF models + reference logits for arbor's exactness tests.

Writes tests/fixtures/models/<arch>/ for arch in llama, mistral, qwen2, qwen3:

  config.json        HF config (see CONFIG FORMATS below)
  *.safetensors      weights (dtype per model, see VARIANTS); qwen3 is sharded
                     with model.safetensors.index.json
  tokenizer.json     small byte-level BPE (same file in every dir)
  reference.json     {"input_ids": [[80 ids], [80 ids]], "dtype_note": str, ...}
  logits.safetensors f32 "logits.0", "logits.1", shape [80, vocab]: logits at
                     every position of input_ids[i], run as one sequence
                     (batch 1, positions 0..79, no padding), model.eval(),
                     attn_implementation="eager", float32 compute.

The reference is computed by re-loading the saved directory with
AutoModelForCausalLM.from_pretrained(dir, dtype=float32), so it is exactly what
the stored (possibly bf16/f16) weights give in f32, and the written config.json
is proven loadable.

VARIANTS (to exercise the loader):
  llama   f32, 2 layers, 4 q heads / 2 kv heads, head_dim 16, untied lm_head,
          rope_theta 1e4, rope_scaling llama3 (factor 8, low 1, high 4,
          original_max_position_embeddings 32: with head_dim 16 the rotary
          pairs hit all three llama3 branches: kept, smoothed, divided by 8).
  mistral bf16 weights, 3 layers, 4 q heads / 1 kv head (MQA),
          sliding_window 24 < 80: position i attends j with i-24 < j <= i
          (24 keys including itself) in every layer. rope_theta 1e6.
  qwen2   f32, 2 layers, 4/2 heads, q/k/v bias, tie_word_embeddings (no
          lm_head.weight stored), use_sliding_window false with a decoy
          sliding_window 16 that must be ignored. rope_theta 1e6.
  qwen3   f16 weights sharded into several files, 3 layers, 4/2 heads,
          head_dim 32 (!= 64/4), per-head RMSNorm q_norm/k_norm (applied
          before RoPE), untied. rope_theta 1e6.

CONFIG FORMATS: llama, mistral and qwen2 are written in the classic Hub form
(top-level "rope_theta", "rope_scaling" null or a dict, "torch_dtype"), like
the configs of real Llama-3.2 / Mistral / Qwen2.5 checkpoints. qwen3 is written
as transformers >= 5 writes it ("rope_parameters": {"rope_theta", "rope_type"},
"dtype", "layer_types"), so the loader sees both forms.

Weights are initialised with N(0, 0.3) (biases too) and norm weights with
N(1, 0.2), not the HF default 0.02, so attention is far from uniform and a
wrong RoPE layout or GQA head mapping changes the logits a lot.

REWARD HEADS (make_reward_fixtures; `--only reward` makes just these):
  reward-orm  Qwen2ForSequenceClassification, num_labels 1 (outcome reward:
              score = Linear(64, 1, bias=False) on the last token's final-normed
              hidden state), backbone shaped like qwen2, weights bf16.
  reward-prm  LlamaForTokenClassification, num_labels 2 (process reward: score =
              Linear(64, 2) with bias at every position), backbone shaped like
              llama, weights f16. transformers 5 writes neither num_labels nor
              id2label for 2 labels: the loader must default to 2.
  Both: config.json as save_pretrained writes it, tokenizer.json copied from the
  fixture of the same family, reference.json {"input_ids", "score_inputs",
  "sequence_scores" (reward-orm: the class's pooled output for each of
  score_inputs, run alone), ...} and logits.safetensors f32 "logits.<i>" of
  shape [80, num_labels]: the head's output at every position of input_ids[i].
  llama/hidden.safetensors: f32 "hidden.<i>" [80, 64], the llama fixture's
  final-normed hidden states (LlamaModel's last_hidden_state, what lm_head
  reads) for its input_ids[i], for the engine's hidden-state summary.

MIXTURE OF EXPERTS (make_moe_fixtures; `--only moe` makes just these, leaving
every other fixture untouched): mixtral, qwen2-moe, qwen3-moe. hidden 64, 4 q /
2 kv heads, 8 routed experts, vocab and input_ids as above, same files as the
dense fixtures (reference.json adds "moe": per-layer expert token counts of the
reference run, the smallest top-k margin and the layer kinds).
  mixtral    bf16, 2 layers, every layer MoE, top-2, experts of
             intermediate_size 32, top-k weights always renormalised. Saved in
             the classic Hub form (block_sparse_moe.experts.E.w1/w2/w3).
  qwen2-moe  bf16, 3 layers, mlp_only_layers [1] (layer 1 dense, intermediate
             64), top-4 of 8, moe_intermediate_size 32, shared expert of 48 with
             its sigmoid gate, norm_topk_prob false, q/k/v bias, tied embeddings.
             Classic form (mlp.experts.E.{gate,up,down}_proj).
  qwen3-moe  f16, 4 layers, decoder_sparse_step 2 (layers 1 and 3 MoE, 0 and 2
             dense), top-2, head_dim 32, q/k norm, norm_topk_prob true, tied
             embeddings. Saved with
             save_original_format=False: experts stacked as transformers 5 keeps
             them (mlp.experts.gate_up_proj [8, 64, 64], mlp.experts.down_proj
             [8, 64, 32]).
  The routers are initialised with N(0, 0.5) (logit sd ~4 per token): routing is
  far from uniform. No token's top-k choice may be within MIN_TOPK_MARGIN (1e-2, in
  router logits) of a tie, so f32 rounding cannot flip it: seeds seed, seed+1000,
  ... are tried until one gives such routing (reference.json records it).

BF16 SENSITIVITY (bf16_sensitivity; `--only bf16` adds it to the MoE fixtures'
reference.json without touching anything else): how far transformers' own bf16
run of a MoE fixture is from its f32 run, per input_ids[i], with every token
routed to the experts the f32 run chose (bf16 breaks some near-ties between
experts the other way; one token sent to another expert moves its logits by far
more than rounding does). reference.json "bf16": {"nmse": [...] (logits over
all positions), "tokens_routed_apart": [...] (token-layers whose bf16 top-k set
differs, unforced), "max_regret": [...] (over those, the f32 k-th router logit
minus the lowest f32 logit of the bf16 choice)}. The GPU tests hold arbor's bf16
GPU path to no worse than this, since these random fixtures amplify rounding
unevenly (transformers bf16 vs f32: llama 1.6e-3, mixtral 3.1e-3, qwen2-moe
7.3e-3, qwen3-moe 5.5e-4 NMSE on input_ids[0]).

Usage: python3 scripts/make_fixtures.py [--out tests/fixtures/models] [--only all|causal|reward|moe|bf16]
Needs torch, transformers (tested with 5.23), tokenizers, safetensors. CPU only.
"""

import argparse
import copy
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, LlamaConfig, MistralConfig,
                          MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                          Qwen3MoeConfig)

SEQ_LEN = 80
# Smallest gap between the k-th and (k+1)-th router logit of any token of a MoE fixture
# (softmax is monotonic, so this decides the top-k choice): arbor's f32 router logits
# differ from torch's by ~1e-5.
MIN_TOPK_MARGIN = 1e-2
VOCAB_TARGET = 384
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Fixed training text for the tokenizer (and the source of input_ids[0]).
TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.
In 1969, 3 astronauts flew 384400 km to the Moon and came back 8 days later.
def attention(q, k, v, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1) @ v

fn main() {
    let xs: Vec<u32> = (0..10).map(|i| i * i).collect();
    println!("{:?}", xs);
}
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
Rotary position embeddings rotate pairs of query and key features by an angle
that grows with the position. Grouped-query attention shares each key/value
head among several query heads. A sliding window limits how far back a token
can look. Tied embeddings reuse the input embedding matrix as the output head.
Café, naïve, résumé; Grüße aus München! 東京は日本の首都です。 Emoji: 🙂🚀
<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
The capital of France is Paris.<|im_end|>
    indented line\twith\ttabs   and   spaces
{"key": [1, 2, 3], "pi": 3.14159, "ok": true, "name": "arbor"}
"""

# Qwen2-style pre-tokenizer split (then byte-level mapping without its own regex).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET, min_frequency=1, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Repeat the text so merge counts are stable; training is deterministic.
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    return tok


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params appear once
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def classic_config(model, storage_dtype):
    """transformers-5 config dict -> classic Hub form (rope_theta/rope_scaling)."""
    d = model.config.to_diff_dict()
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    rtype = rp.get("rope_type", "default")
    d["rope_scaling"] = None if rtype == "default" else rp
    d.pop("layer_types", None)
    d.pop("dtype", None)
    d["torch_dtype"] = storage_dtype
    d["architectures"] = [type(model).__name__]
    d.pop("transformers_version", None)
    if d.get("model_type") == "qwen2":
        # transformers drops sliding_window when use_sliding_window is false;
        # real Qwen2.5 configs carry one anyway. Keep a decoy that must be ignored.
        d["sliding_window"] = 16
    return d


def build(arch, vocab, special_ids):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                  max_position_embeddings=128, bos_token_id=special_ids["<|im_start|>"],
                  eos_token_id=special_ids["<|endoftext|>"], hidden_act="silu")
    if arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          rms_norm_eps=1e-5, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                           "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32},
                          **common)
        return cfg, torch.float32, "float32", 1, None
    if arch == "mistral":
        cfg = MistralConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                            rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=24,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                            **common)
        return cfg, torch.bfloat16, "bfloat16", 2, None
    if arch == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          rms_norm_eps=1e-6, tie_word_embeddings=True,
                          use_sliding_window=False, sliding_window=16, max_window_layers=1,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                          **common)
        return cfg, torch.float32, "float32", 3, None
    if arch == "qwen3":
        cfg = Qwen3Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                          attention_bias=False, use_sliding_window=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                          **common)
        return cfg, torch.float16, "float16", 4, "100KB"
    raise ValueError(arch)


def dump_compact(obj):
    """JSON object with one top-level key per line (id lists stay on one line each)."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], list):
            inner = ",\n".join("  " + json.dumps(x, separators=(",", ":")) for x in v)
            lines.append(f" {json.dumps(k)}: [\n{inner}\n ]")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


@torch.no_grad()
def run_logits(model, ids):
    return [model(input_ids=torch.tensor([s])).logits[0].float().contiguous() for s in ids]


# name -> (family fixture, class, num_labels, storage dtype, seed)
REWARD_FIXTURES = {
    "reward-orm": ("qwen2", AutoModelForSequenceClassification, 1, torch.bfloat16, 11),
    "reward-prm": ("llama", AutoModelForTokenClassification, 2, torch.float16, 12),
}


@torch.no_grad()
def make_reward_fixtures(root, vocab, special_ids, input_ids):
    """Reward-head models (see REWARD HEADS above) and llama/hidden.safetensors."""
    for name, (family, auto, num_labels, sdtype, seed) in REWARD_FIXTURES.items():
        cfg = build(family, vocab, special_ids)[0]
        cfg.num_labels = num_labels
        model = auto.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        init_weights(model, seed)
        model = model.to(sdtype).eval()
        out = os.path.abspath(os.path.join(root, name))
        if os.path.isdir(out):
            shutil.rmtree(out)
        model.save_pretrained(out)
        shutil.copy(os.path.join(root, family, "tokenizer.json"), out)

        ref = auto.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        mine = dict(model.named_parameters())
        for pname, p in ref.named_parameters():
            assert torch.equal(p, mine[pname].float()), f"{name}: {pname} differs after reload"
        refj = {"input_ids": input_ids, "num_labels": num_labels,
                "architecture": type(ref).__name__}
        if auto is AutoModelForTokenClassification:
            per_pos = [ref(input_ids=torch.tensor([s])).logits[0].contiguous() for s in input_ids]
        else:
            # The class pools the last token's row; the head at every position is score(h).
            per_pos = [ref.score(ref.model(input_ids=torch.tensor([s])).last_hidden_state)[0]
                       .contiguous() for s in input_ids]
            lens = [(0, SEQ_LEN), (1, SEQ_LEN), (0, 23), (1, 57), (0, 1)]
            refj["score_inputs"] = [input_ids[i][:n] for i, n in lens]
            refj["sequence_scores"] = [ref(input_ids=torch.tensor([s])).logits[0].tolist()
                                       for s in refj["score_inputs"]]
            for k in range(2):
                assert torch.allclose(per_pos[k][-1], torch.tensor(refj["sequence_scores"][k]),
                                      atol=1e-5)
        save_file({f"logits.{i}": l for i, l in enumerate(per_pos)},
                  os.path.join(out, "logits.safetensors"))
        refj["dtype_note"] = (f"weights stored as {str(sdtype)[6:]}; reference computed in f32 "
                              "from them upcast, eager attention, batch 1, transformers "
                              + __import__("transformers").__version__)
        with open(os.path.join(out, "reference.json"), "w") as f:
            f.write(dump_compact(refj))
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: {type(ref).__name__} head {tuple(ref.score.weight.shape)} "
              f"max|out| {torch.cat(per_pos).abs().max():.3f} dir {size / 1024:.0f} KiB")

    # Hidden-state summary reference: the llama fixture's final-normed hidden states.
    d = os.path.join(root, "llama")
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    with open(os.path.join(d, "reference.json")) as f:
        ids = json.load(f)["input_ids"]
    hidden = [ref.model(input_ids=torch.tensor([s])).last_hidden_state[0].contiguous()
              for s in ids]
    for h, s in zip(hidden, ids):  # it is what lm_head reads
        assert torch.allclose(ref.lm_head(h), ref(input_ids=torch.tensor([s])).logits[0],
                              atol=1e-5)
    save_file({f"hidden.{i}": h for i, h in enumerate(hidden)},
              os.path.join(d, "hidden.safetensors"))
    print(f"llama/hidden.safetensors: {len(hidden)} x {tuple(hidden[0].shape)}")


def build_moe(arch, vocab, special_ids):
    """(config, storage dtype, dtype name, seed, save_original_format) of a MoE fixture."""
    common = dict(vocab_size=vocab, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=special_ids["<|im_start|>"],
                  eos_token_id=special_ids["<|endoftext|>"], hidden_act="silu",
                  num_experts_per_tok=2, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if arch == "mixtral":
        cfg = MixtralConfig(num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                            tie_word_embeddings=False, sliding_window=None, **common)
        return cfg, torch.bfloat16, "bfloat16", 21, True
    if arch == "qwen2-moe":
        common["num_experts_per_tok"] = 4
        cfg = Qwen2MoeConfig(num_hidden_layers=3, intermediate_size=64, num_experts=8,
                             moe_intermediate_size=32, shared_expert_intermediate_size=48,
                             norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
                             qkv_bias=True, tie_word_embeddings=True, use_sliding_window=False,
                             **common)
        return cfg, torch.bfloat16, "bfloat16", 22, True
    if arch == "qwen3-moe":
        cfg = Qwen3MoeConfig(num_hidden_layers=4, intermediate_size=64, num_experts=8,
                             moe_intermediate_size=32, head_dim=32, norm_topk_prob=True,
                             decoder_sparse_step=2, mlp_only_layers=[], attention_bias=False,
                             tie_word_embeddings=True, use_sliding_window=False, **common)
        return cfg, torch.float16, "float16", 23, False
    raise ValueError(arch)


@torch.no_grad()
def make_moe_fixtures(root, tok, vocab, special_ids, input_ids):
    """Tiny MoE models (see MIXTURE OF EXPERTS above)."""
    for arch in ["mixtral", "qwen2-moe", "qwen3-moe"]:
        cfg, sdtype, sdtype_name, seed, original_format = build_moe(arch, vocab, special_ids)
        # Seeds are tried in order until no top-k choice is near a tie.
        for attempt in range(100):
            if make_moe_fixture(root, arch, tok, cfg, sdtype, sdtype_name, seed + 1000 * attempt,
                                original_format, input_ids):
                break
        else:
            raise RuntimeError(f"{arch}: every seed tried has a near-tie in routing")


@torch.no_grad()
def make_moe_fixture(root, arch, tok, cfg, sdtype, sdtype_name, seed, original_format, input_ids):
    """Writes one MoE fixture; False (and nothing kept) if its routing has a near-tie."""
    vocab = cfg.vocab_size
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                             dtype=torch.float32)
    init_weights(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):  # the routers
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model = model.to(sdtype).eval()
    out = os.path.abspath(os.path.join(root, arch))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_original_format=original_format)
        for f in sorted(os.listdir(tmp)):
            if f.endswith(".safetensors") or f == "config.json":
                shutil.copy(os.path.join(tmp, f), out)
    tok.save(os.path.join(out, "tokenizer.json"))

    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    mine = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(p, mine[name].float()), f"{arch}: {name} differs after reload"
    kinds = ["moe" if hasattr(l.mlp, "gate") and hasattr(l.mlp, "experts") else "dense"
             for l in ref.model.layers]
    top_k = cfg.num_experts_per_tok
    # Router logits of every MoE layer, captured from the reference run.
    captured = []
    hooks = [l.mlp.gate.register_forward_hook(
                 lambda m, i, o, li=li: captured.append((li, o[0].detach().clone())))
             for li, l in enumerate(ref.model.layers) if kinds[li] == "moe"]
    logits = run_logits(ref, input_ids)
    for h in hooks:
        h.remove()
    counts = {li: [0] * 8 for li, k in enumerate(kinds) if k == "moe"}
    min_margin = 1.0
    for li, rl in captured:
        top = rl.float().topk(top_k + 1, dim=-1)
        min_margin = min(min_margin, float((top.values[:, top_k - 1] - top.values[:, top_k]).min()))
        for e in top.indices[:, :top_k].flatten().tolist():
            counts[li][e] += 1
    if min_margin < MIN_TOPK_MARGIN:
        print(f"{arch}: seed {seed}: a top-k choice is within {min_margin:.1e} of a tie; "
              "trying the next seed")
        shutil.rmtree(out)
        return False
    save_file({f"logits.{i}": l for i, l in enumerate(logits)},
              os.path.join(out, "logits.safetensors"))
    refj = {
        "input_ids": input_ids,
        "dtype_note": f"weights stored as {sdtype_name}; reference computed in f32 from them "
                      "upcast. logits.safetensors holds f32 'logits.<i>' of shape "
                      f"[{SEQ_LEN}, {vocab}] for input_ids[i], every position, batch 1, "
                      "eager attention, transformers " + __import__("transformers").__version__
                      + ", torch " + torch.__version__,
        "storage_dtype": sdtype_name,
        "vocab_size": vocab,
        "greedy_next": [l.argmax(-1).tolist() for l in logits],
        "moe": {"layer_kinds": kinds, "top_k": top_k,
                "saved_in_original_format": original_format,
                "expert_tokens": {str(k): v for k, v in counts.items()},
                "min_topk_margin": min_margin, "seed": seed},
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        f.write(dump_compact(refj))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{arch:9s} params {sum(p.numel() for p in ref.parameters()):7d} layers {kinds} "
          f"max|logit| {torch.cat(logits).abs().max():.3f} min top-k margin {min_margin:.2e} "
          f"dir {size / 1024:.0f} KiB")
    for li, c in counts.items():
        print(f"  layer {li}: tokens per expert {c}")
    return True


@torch.no_grad()
def bf16_sensitivity(model_dir, input_ids):
    """transformers' bf16 run of a MoE fixture against its f32 run (see BF16 SENSITIVITY)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    # A bf16 copy (Module.to converts in place, and converting back would keep the rounding
    # of f16 weights and of the rotary inv_freq buffer).
    bf = copy.deepcopy(model).to(torch.bfloat16)

    def routers(m):
        return [l.mlp.gate for l in m.model.layers
                if hasattr(l.mlp, "gate") and hasattr(l.mlp, "experts")]

    renorm = getattr(model.config, "norm_topk_prob", True)  # Mixtral has no flag: always
    out = {"nmse": [], "tokens_routed_apart": [], "max_regret": []}
    for ids in input_ids:
        f32_logits, f32_choice = {}, {}

        def record(i):
            def hook(mod, inp, o):
                f32_logits[i], f32_choice[i] = o[0].float().clone(), o[2].clone()
            return hook

        hooks = [r.register_forward_hook(record(i)) for i, r in enumerate(routers(model))]
        want = model(input_ids=torch.tensor([ids])).logits[0].float()
        for h in hooks:
            h.remove()
        apart, regret = [0], [0.0]

        def force(i):
            # Route as the f32 run did, weighted by this run's own router probabilities.
            def hook(mod, inp, o):
                logits, own = o[0], o[2]
                idx = f32_choice[i]
                moved = (own.sort(-1).values != idx.sort(-1).values).any(-1)
                apart[0] += int(moved.sum())
                if moved.any():
                    fl = f32_logits[i][moved]
                    kth = fl.topk(idx.shape[-1], -1).values[:, -1]
                    low = fl.gather(-1, own[moved]).min(-1).values
                    regret[0] = max(regret[0], float((kth - low).max()))
                p = torch.softmax(logits.float(), -1).gather(-1, idx)
                if renorm:
                    p = p / p.sum(-1, keepdim=True)
                return logits, p.to(o[1].dtype), idx
            return hook

        hooks = [r.register_forward_hook(force(i)) for i, r in enumerate(routers(bf))]
        got = bf(input_ids=torch.tensor([ids])).logits[0].float()
        for h in hooks:
            h.remove()
        out["nmse"].append(float(((got - want) ** 2).sum() / (want ** 2).sum()))
        out["tokens_routed_apart"].append(apart[0])
        out["max_regret"].append(regret[0])
    return out


def add_bf16_sensitivity(root):
    """Adds "bf16" (bf16_sensitivity) to each MoE fixture's reference.json."""
    for arch in ["mixtral", "qwen2-moe", "qwen3-moe"]:
        d = os.path.join(root, arch)
        with open(os.path.join(d, "reference.json")) as f:
            refj = json.load(f)
        refj["bf16"] = bf16_sensitivity(d, refj["input_ids"])
        with open(os.path.join(d, "reference.json"), "w") as f:
            f.write(dump_compact(refj))
        print(f"{arch:9s} transformers bf16 vs f32 (f32 routing): {refj['bf16']}")


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "models"))
    ap.add_argument("--only", choices=["all", "causal", "reward", "moe", "bf16"], default="all")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.only == "bf16":
        add_bf16_sensitivity(os.path.abspath(args.out))
        return

    tok = make_tokenizer()
    vocab = tok.get_vocab_size()
    special_ids = {s: tok.token_to_id(s) for s in SPECIALS}
    text_ids = tok.encode(TEXT).ids
    assert len(text_ids) >= SEQ_LEN, len(text_ids)
    assert tok.decode(text_ids, skip_special_tokens=False) == TEXT
    g = torch.Generator().manual_seed(1234)
    rand_ids = torch.randint(0, vocab, (SEQ_LEN,), generator=g).tolist()
    input_ids = [text_ids[:SEQ_LEN], rand_ids]
    print(f"tokenizer: vocab {vocab}, text -> {len(text_ids)} tokens")

    for arch in ["llama", "mistral", "qwen2", "qwen3"] if args.only in ("all", "causal") else []:
        cfg, sdtype, sdtype_name, seed, shard = build(arch, vocab, special_ids)
        cfg._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                 dtype=torch.float32)
        init_weights(model, seed)
        model = model.to(sdtype).eval()

        out = os.path.abspath(os.path.join(args.out, arch))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out)
        with tempfile.TemporaryDirectory() as tmp:
            kw = {"max_shard_size": shard} if shard else {}
            model.save_pretrained(tmp, **kw)
            for f in sorted(os.listdir(tmp)):
                if f.endswith(".safetensors") or f.endswith(".index.json"):
                    shutil.copy(os.path.join(tmp, f), out)
        if arch == "qwen3":
            conf = model.config.to_diff_dict()  # transformers-5 form, as save_pretrained writes it
            conf.pop("transformers_version", None)
            conf["architectures"] = [type(model).__name__]
        else:
            conf = classic_config(model, sdtype_name)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(conf, f, indent=2, sort_keys=True)
            f.write("\n")
        tok.save(os.path.join(out, "tokenizer.json"))

        # Reference: reload the saved dir in f32 (eager) and run it.
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                   attn_implementation="eager").eval()
        logits = run_logits(ref, input_ids)
        # The reloaded weights must be exactly the stored ones, upcast. (Compare
        # parameters, not logits: model.to(bf16) also rounded the rotary
        # inv_freq buffer of the in-memory model, the reload recomputes it in f32.)
        mine = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            assert torch.equal(p, mine[name].float()), f"{arch}: {name} differs after reload"

        checks = {}
        if arch == "mistral":
            # The window must matter: compare with full causal attention.
            ref.config.sliding_window = None
            for layer in ref.model.layers:
                layer.self_attn.sliding_window = None
            full = run_logits(ref, input_ids)
            diff = (full[0] - logits[0]).abs().amax(dim=-1)
            first = int(torch.nonzero(diff > 0)[0])
            print(f"  mistral: first position changed by sliding window: {first}")
            assert first == 24, first
            checks["first_position_affected_by_window"] = first
        if arch == "qwen2":
            checks["sliding_window_ignored"] = ref.config.sliding_window is None
            assert checks["sliding_window_ignored"]

        save_file({f"logits.{i}": l for i, l in enumerate(logits)},
                  os.path.join(out, "logits.safetensors"))
        notes = {
            "llama": "weights f32; reference computed in f32",
            "mistral": "weights stored as bf16; reference computed in f32 from the bf16 weights upcast exactly to f32",
            "qwen2": "weights f32; reference computed in f32; lm_head tied to embed_tokens (not stored)",
            "qwen3": "weights stored as f16 in shards; reference computed in f32 from the f16 weights upcast exactly to f32",
        }[arch]
        refj = {
            "input_ids": input_ids,
            "dtype_note": notes + ". logits.safetensors holds f32 'logits.<i>' of shape "
                          f"[{SEQ_LEN}, {vocab}] for input_ids[i], every position, batch 1, "
                          "eager attention, transformers " + __import__("transformers").__version__
                          + ", torch " + torch.__version__,
            "storage_dtype": sdtype_name,
            "vocab_size": vocab,
            "greedy_next": [l.argmax(-1).tolist() for l in logits],
            "checks": checks,
        }
        with open(os.path.join(out, "reference.json"), "w") as f:
            f.write(dump_compact(refj))
        allv = torch.cat(logits)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{arch:8s} params {sum(p.numel() for p in ref.parameters()):7d} "
              f"max|logit| {allv.abs().max():7.3f} std {allv.std():6.3f} "
              f"dir {size / 1024:.0f} KiB files {sorted(os.listdir(out))}")

    if args.only in ("all", "reward"):
        make_reward_fixtures(os.path.abspath(args.out), vocab, special_ids, input_ids)
    if args.only in ("all", "moe"):
        make_moe_fixtures(os.path.abspath(args.out), tok, vocab, special_ids, input_ids)
        add_bf16_sensitivity(os.path.abspath(args.out))


if __name__ == "__main__":
    main()
