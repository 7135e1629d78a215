"""MLLM image generation speed: fastvq's cached decode vs a LlamaGen-style full-length cache vs Hugging Face
``generate`` (docs/mllm.md "Speed", docs/benchmarks.md). Not a test.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_mllm.py [--repeats 2] [--batch 8] [--grid 16] [--quick]

The model is the ``mllm-small`` preset (dim 512, 8 layers, 8 heads / 4 kv-heads, SwiGLU 1,376), random weights, a
batch of ``--batch`` prompts of ragged lengths doubled for CFG (scale 3), ``L = grid²`` image positions, the same
sampler (temperature 1, top-k 0, one seeded ``torch.Generator``) everywhere, so that every way generates the same
tokens (checked).

Part A, the three ways on one backbone: the codec is one codebook of 4,096 codes embedded by one table and predicted
by one linear head (``depth_layers=0``; a LlamaGen-shaped model), so that a ``transformers.LlamaForCausalLM`` holds
exactly the same weights (vocabulary = text pieces + 4,096 image codes; left-padded prompts, positions from the
attention mask, its own ``DynamicCache``). HF's ``generate`` cannot sample one token for a CFG pair by itself, so a
``LogitsProcessor`` does it: it combines ``uncond + s · (cond - uncond)`` over the image codes, samples with the
same generator and returns a one-hot score row for both halves, which ``generate``'s greedy step then picks.

* ``fastvq``: ``MLLM.generate_images(cache="fastvq")``: prefill + ``Decoder.step`` over ``CompressedKVCache``
  (``decode_step``: attention over each sequence's valid prefix, in-place append);
* ``static``: the same loop over ``StaticKVCache`` (LlamaGen: preallocated, SDPA under a mask over all rows);
* ``hf``: ``LlamaForCausalLM.generate`` (SDPA attention, ``DynamicCache``).

Part B, the full MLLM with its depth head (3 Llama layers over the sub-codes), for the UniTok-style MCQ codec
(8 × 4,096, "mcq" adapter) and MergeVQ's factorised LFQ codes (6 + 12 bits, "bits" adapter): fastvq vs static,
and the depth head's share (its time per image position, measured by timing ``_sample_position``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from fastvq.models import MLLM, MLLMConfig, TextTokenizer, VisualCodec
from fastvq.models.mllm import _PRESETS, sample_logits

CORPUS = ["a photo of an ankle boot", "a small greyscale image of a t-shirt", "a red heart", "a drawing of a cat",
          "a photo of a bag", "an image of a sneaker on a white background", "a blue sky over the sea", "a dress"]


def build(codec: VisualCodec, tt: TextTokenizer, **over) -> MLLM:
    fields = {**_PRESETS["mllm-small"], **over}
    torch.manual_seed(0)
    cfg = MLLMConfig(text_vocab_size=tt.vocab_size, codec=codec.to_dict(), **fields)
    return MLLM(cfg, tt).eval()


def hf_twin(m: MLLM):
    """A ``LlamaForCausalLM`` with ``m``'s backbone, its text + image-code embeddings and its image head."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    c, d = m.config, m.decoder.config
    V, K = c.text_vocab_size, m.codec.group_sizes[0]
    hc = transformers.LlamaConfig(vocab_size=V + K, hidden_size=d.dim, intermediate_size=d.ffn_dim,
                                  num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
                                  num_key_value_heads=d.num_kv_heads, max_position_embeddings=d.max_seq_len,
                                  rms_norm_eps=d.norm_eps, rope_theta=d.rope_theta, tie_word_embeddings=False,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for blk, h in zip(m.decoder.layers, hf.model.layers):
            a, f = blk.attention, blk.feed_forward
            h.self_attn.q_proj.weight.copy_(a.wq.weight)
            h.self_attn.k_proj.weight.copy_(a.wk.weight)
            h.self_attn.v_proj.weight.copy_(a.wv.weight)
            h.self_attn.o_proj.weight.copy_(a.wo.weight)
            h.mlp.gate_proj.weight.copy_(f.w1.weight)
            h.mlp.up_proj.weight.copy_(f.w3.weight)
            h.mlp.down_proj.weight.copy_(f.w2.weight)
            h.input_layernorm.weight.copy_(blk.attention_norm.weight)
            h.post_attention_layernorm.weight.copy_(blk.ffn_norm.weight)
        hf.model.norm.weight.copy_(m.decoder.norm.weight)
        hf.model.embed_tokens.weight.copy_(torch.cat((m.text_embed.weight, m.adapter.embed.weight)))
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[V:] = m.depth.head.weight
    return hf


def hf_generate(hf, m: MLLM, prompts, cfg_scale, generator):
    """CFG-sampled image codes ``[B, L]`` from HF ``generate`` (left padding, a sampling LogitsProcessor)."""
    from transformers import LogitsProcessor, LogitsProcessorList
    tk, V, B, L = m.text_tokenizer, m.config.text_vocab_size, len(prompts), m.codec.num_positions
    seqs = [[tk.bos_id] + tk.encode(p) + [tk.boi_id] for p in prompts] + [[tk.bos_id, tk.boi_id]] * B
    P = max(map(len, seqs))
    ids = torch.zeros(len(seqs), P, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, P - len(s):], mask[b, P - len(s):] = torch.tensor(s), 1

    class CFGSample(LogitsProcessor):
        def __call__(self, input_ids, scores):
            img = scores[:, V:].float()
            c, u = img[:B], img[B:]
            tok = sample_logits(u + cfg_scale * (c - u), temperature=1.0, generator=generator) + V
            out = torch.full_like(scores, float("-inf"))
            out[torch.arange(2 * B), torch.cat((tok, tok))] = 0.0
            return out

    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=L, min_new_tokens=L, do_sample=False,
                      logits_processor=LogitsProcessorList([CFGSample()]), use_cache=True, pad_token_id=0)
    return out[:B, P:] - V


def timed_rounds(fns: dict, repeats: int) -> dict:
    """``{name: fn}`` -> ``{name: (median seconds, last result)}``: ``repeats + 1`` rounds, each running every fn once
    (interleaved, so that a change of machine load hits every way alike); round 0 is a discarded warm-up."""
    times, results = {k: [] for k in fns}, {}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t = time.perf_counter()
            results[k] = fn()
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: (statistics.median(times[k]), results[k]) for k in fns}


def part_a(tt, prompts, L_side, repeats, cfg):
    codec = VisualCodec("mcq", (4096,), (L_side, L_side), tokenizer="synthetic")
    m = build(codec, tt, adapter="bits", depth_layers=0)
    B, L = len(prompts), codec.num_positions
    hf = hf_twin(m)
    with torch.inference_mode():
        res = timed_rounds({
            "fastvq": lambda: m.generate_images(prompts, cfg_scale=cfg, temperature=1.0,
                                                generator=torch.Generator().manual_seed(0), cache="fastvq"),
            "static": lambda: m.generate_images(prompts, cfg_scale=cfg, temperature=1.0,
                                                generator=torch.Generator().manual_seed(0), cache="static"),
            "hf": lambda: hf_generate(hf, m, prompts, cfg, torch.Generator().manual_seed(0))}, repeats)
    same = {k: bool(torch.equal(res[k][1][..., 0] if k != "hf" else res[k][1], res["fastvq"][1][..., 0]))
            for k in res}
    print(f"\nPart A: one backbone, three ways (dim {m.config.dim}, {m.config.num_layers} layers, B={B} doubled to "
          f"{2 * B} for CFG {cfg}, L={L} image positions, {torch.get_num_threads()} thread(s))")
    print(f"{'way':8s} {'s/image batch':>14s} {'image tok/s':>12s} {'ms/position':>12s} {'same tokens':>12s}")
    for k, (t, _) in res.items():
        print(f"{k:8s} {t:14.2f} {B * L / t:12.1f} {1000 * t / L:12.2f} {str(same[k]):>12s}")
    best = min(res["static"][0], res["hf"][0])
    print(f"fastvq speed-up: {res['static'][0] / res['fastvq'][0]:.2f}x vs static, {res['hf'][0] / res['fastvq'][0]:.2f}x "
          f"vs hf, {best / res['fastvq'][0]:.2f}x vs the faster baseline")
    return res


def part_b(tt, prompts, L_side, repeats, cfg):
    print(f"\nPart B: the full MLLM with its 3-layer depth head (B={len(prompts)} doubled, L={L_side ** 2})")
    print(f"{'codec':22s} {'way':7s} {'s/batch':>8s} {'image tok/s':>12s} {'ms/position':>12s} {'depth ms/pos':>13s} "
          f"{'depth share':>12s}")
    for name, codec, adapter in (
            ("mcq 8 x 4096 (UniTok)", VisualCodec("mcq", (4096,) * 8, (L_side, L_side), tokenizer="synthetic"), "mcq"),
            ("bits 6+12 (MergeVQ)", VisualCodec("bits", (64, 4096), (L_side, L_side), tokenizer="synthetic",
                                                bits_split=(6, 12)), "bits")):
        m = build(codec, tt, adapter=adapter)
        B, L = len(prompts), codec.num_positions
        depth_t = {"fastvq": [], "static": []}
        real = m._sample_position

        def run(way):
            def timed_depth(*a, **k):
                t = time.perf_counter()
                r = real(*a, **k)
                depth_t[way].append(time.perf_counter() - t)
                return r
            m._sample_position = timed_depth
            try:
                return m.generate_images(prompts, cfg_scale=cfg, temperature=1.0,
                                         generator=torch.Generator().manual_seed(0), cache=way)
            finally:
                del m._sample_position
        res = timed_rounds({way: (lambda w=way: run(w)) for way in ("fastvq", "static")}, repeats)
        outs = {}
        for way, (t, codes) in res.items():
            outs[way] = codes
            d = statistics.median(depth_t[way]) * 1000
            print(f"{name:22s} {way:7s} {t:8.2f} {B * L / t:12.1f} {1000 * t / L:12.2f} {d:13.2f} "
                  f"{d * L / 1000 / t:12.0%}")
        print(f"{'':22s} same tokens fastvq/static: {bool(torch.equal(outs['fastvq'], outs['static']))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=16, help="image grid side: L = grid^2 positions")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=("a", "b", "ab"), default="ab")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tt = TextTokenizer.from_corpus(CORPUS)
    prompts = (CORPUS * 4)[:args.batch]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load {os.getloadavg()}")
    if "a" in args.part:
        part_a(tt, prompts, args.grid, args.repeats, args.cfg)
    if "b" in args.part:
        part_b(tt, prompts, args.grid, args.repeats, args.cfg)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
