"""MLLM image generation speed: fastvq's cached decode vs a LlamaGen-style full-length cache vs Hugging Face
``generate`` (docs/mllm.md "Speed", docs/benchmarks.md). Not a test.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_mllm.py [--batch 8,32] [--grid 16,32] [--part pab]
        [--hf dynamic,static] [--codecs mcq,bits] [--repeats N] [--quick]

The model is the ``mllm-small`` preset (dim 512, 8 layers, 8 heads / 4 kv-heads, SwiGLU 1,376), random weights, fp32,
for every ``--batch`` B (prompts of ragged lengths, doubled to 2B rows for CFG scale 3) and every ``--grid`` side
(``L = grid²`` image positions; 32 is LlamaGen's 512-px setting), the same sampler (temperature 1, top-k 0, one
seeded ``torch.Generator``) everywhere, so that every way generates the same tokens (checked). Timed rounds run the
ways interleaved after a discarded warm-up round; medians. ``--quick``: one timed round, and no warm-up round at
L > 256 (a run there takes minutes; one-off costs are far below 1%). The full default grid takes over an hour on
one loaded core; the documented runs are listed in docs/benchmarks.md.

Part P (profile): where one backbone step's time goes (``torch.profiler``; weight GEMMs, the attention op, the rest)
at the mean context of a generation, fastvq vs static, and the ceiling of their ratio if fastvq's attention were free.

Part A, the three ways on one backbone: the codec is one codebook of 4,096 codes embedded by one table and predicted
by one linear head (``depth_layers=0``; a LlamaGen-shaped model), so that a ``transformers.LlamaForCausalLM`` holds
exactly the same weights (vocabulary = text pieces + 4,096 image codes; left-padded prompts, positions from the
attention mask, its own ``DynamicCache``). HF's ``generate`` cannot sample one token for a CFG pair by itself, so a
``LogitsProcessor`` does it: it combines ``uncond + s · (cond - uncond)`` over the image codes, samples with the
same generator and returns a one-hot score row for both halves, which ``generate``'s greedy step then picks.

* ``fastvq``: ``MLLM.generate_images(cache="fastvq")``: prefill + ``Decoder.step`` over ``CompressedKVCache``
  (``decode_step``: attention over each sequence's valid prefix, in-place append);
* ``static``: the same loop over ``StaticKVCache`` (LlamaGen: preallocated, SDPA under a mask over all rows);
* ``hf``: ``LlamaForCausalLM.generate`` (SDPA attention, ``DynamicCache``);
* ``hf-static``: the same with ``cache_implementation="static"`` (HF's preallocated ``StaticCache``); the faster of
  the two HF ways is the HF baseline.

Part B, the full MLLM with its depth head (3 Llama layers over the sub-codes), for the UniTok-style MCQ codec
(8 × 4,096, "mcq" adapter) and MergeVQ's factorised LFQ codes (6 + 12 bits, "bits" adapter): fastvq vs static,
and the depth head's share (its time per image position, measured by timing ``_sample_position``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from fastvq.models import MLLM, MLLMConfig, TextTokenizer, VisualCodec
from fastvq.models.llm import copy_llama_weights
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
        copy_llama_weights(m.decoder, hf.model, to_hf=True)
        hf.model.embed_tokens.weight.copy_(torch.cat((m.text_embed.weight, m.adapter.embed.weight)))
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[V:] = m.depth.head.weight
    return hf


def hf_generate(hf, m: MLLM, prompts, cfg_scale, generator, cache_implementation=None):
    """CFG-sampled image codes ``[B, L]`` from HF ``generate`` (left padding, a sampling LogitsProcessor);
    ``cache_implementation``: None (its ``DynamicCache``) or ``"static"`` (its preallocated ``StaticCache``)."""
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
                      logits_processor=LogitsProcessorList([CFGSample()]), use_cache=True, pad_token_id=0,
                      **({"cache_implementation": cache_implementation} if cache_implementation else {}))
    return out[:B, P:] - V


def timed_rounds(fns: dict, repeats: int, warmup: bool = True) -> dict:
    """``{name: fn}`` -> ``{name: (median seconds, last result)}``: ``repeats`` timed rounds, each running every fn
    once (interleaved, so that a change of machine load hits every way alike), after a discarded warm-up round
    (``warmup``; skipped by ``--quick`` at L > 256, where one-off costs are far below 1% of a run)."""
    times, results = {k: [] for k in fns}, {}
    for r in range(repeats + int(warmup)):
        for k, fn in fns.items():
            t = time.perf_counter()
            results[k] = fn()
            if r or not warmup:
                times[k].append(time.perf_counter() - t)
                print(f"  [{k}: {times[k][-1]:.2f} s, load {os.getloadavg()[0]:.1f}]", file=sys.stderr, flush=True)
    return {k: (statistics.median(times[k]), results[k]) for k in fns}


def gen(m, prompts, cfg, way):
    return m.generate_images(prompts, cfg_scale=cfg, temperature=1.0, generator=torch.Generator().manual_seed(0),
                             cache=way)


def part_a(tt, prompts, L_side, repeats, cfg, warmup, hf_ways, static=True):
    codec = VisualCodec("mcq", (4096,), (L_side, L_side), tokenizer="synthetic")
    m = build(codec, tt, adapter="bits", depth_layers=0)
    B, L = len(prompts), codec.num_positions
    hf = hf_twin(m)
    fns = {"fastvq": lambda: gen(m, prompts, cfg, "fastvq")}
    if static:
        fns["static"] = lambda: gen(m, prompts, cfg, "static")
    if "dynamic" in hf_ways:
        fns["hf"] = lambda: hf_generate(hf, m, prompts, cfg, torch.Generator().manual_seed(0))
    if "static" in hf_ways:
        fns["hf-static"] = lambda: hf_generate(hf, m, prompts, cfg, torch.Generator().manual_seed(0), "static")
    with torch.inference_mode():
        res = timed_rounds(fns, repeats, warmup)
    ref = res["fastvq"][1][..., 0]
    same = {k: bool(torch.equal(r[1] if k.startswith("hf") else r[1][..., 0], ref)) for k, r in res.items()}
    print(f"\nPart A: one backbone (dim {m.config.dim}, {m.config.num_layers} layers), B={B} doubled to {2 * B} for "
          f"CFG {cfg}, L={L} image positions, {torch.get_num_threads()} thread(s), {repeats} timed round(s)"
          f"{'' if warmup else ' (no warm-up round)'}, load {os.getloadavg()[0]:.1f}")
    print(f"{'way':10s} {'s/image batch':>14s} {'image tok/s':>12s} {'ms/position':>12s} {'same tokens':>12s}")
    for k, (t, _) in res.items():
        print(f"{k:10s} {t:14.2f} {B * L / t:12.1f} {1000 * t / L:12.2f} {str(same[k]):>12s}")
    hf_best = min(((res[k][0], k) for k in res if k.startswith("hf")), default=None)
    base = [t for t in (res["static"][0] if "static" in res else None, hf_best and hf_best[0]) if t]
    parts = [f"{res['static'][0] / res['fastvq'][0]:.2f}x vs static"] if "static" in res else []
    if hf_best:
        parts.append(f"{hf_best[0] / res['fastvq'][0]:.2f}x vs {hf_best[1]} (the faster HF way)")
    if base:
        print(f"fastvq speed-up: {', '.join(parts)}, {min(base) / res['fastvq'][0]:.2f}x vs the faster baseline timed")
    return res


def part_b(tt, prompts, L_side, repeats, cfg, warmup, codecs):
    print(f"\nPart B: the full MLLM with its 3-layer depth head (B={len(prompts)} doubled, L={L_side ** 2}, "
          f"{repeats} timed round(s){'' if warmup else ', no warm-up round'}, load {os.getloadavg()[0]:.1f})")
    print(f"{'codec':22s} {'way':7s} {'s/batch':>8s} {'image tok/s':>12s} {'ms/position':>12s} {'depth ms/pos':>13s} "
          f"{'depth share':>12s}")
    table = {"mcq": ("mcq 8 x 4096 (UniTok)", VisualCodec("mcq", (4096,) * 8, (L_side, L_side), tokenizer="synthetic"),
                     "mcq"),
             "bits": ("bits 6+12 (MergeVQ)", VisualCodec("bits", (64, 4096), (L_side, L_side), tokenizer="synthetic",
                                                         bits_split=(6, 12)), "bits")}
    for name, codec, adapter in (table[c] for c in codecs):
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
                return gen(m, prompts, cfg, way)
            finally:
                del m._sample_position
        res = timed_rounds({way: (lambda w=way: run(w)) for way in ("fastvq", "static")}, repeats, warmup)
        outs = {}
        for way, (t, codes) in res.items():
            outs[way] = codes
            d = statistics.median(depth_t[way]) * 1000
            print(f"{name:22s} {way:7s} {t:8.2f} {B * L / t:12.1f} {1000 * t / L:12.2f} {d:13.2f} "
                  f"{d * L / 1000 / t:12.0%}")
        print(f"{'':22s} fastvq vs static {res['static'][0] / res['fastvq'][0]:.2f}x; same tokens: "
              f"{bool(torch.equal(outs['fastvq'], outs['static']))}")


def part_p(tt, B, L_side, steps=6, rounds=3, P=12):
    """Where a backbone step's time goes, by ``torch.profiler``: ``2B`` rows at the mean context of an L-position
    generation (``P + L/2`` rows in the cache; the static cache holds ``P + L``), ``rounds`` interleaved rounds of
    ``steps`` steps per way, each way's least-disturbed round (lowest total) kept: weight GEMMs (``aten::mm``), the
    attention op (``decode_step`` / SDPA), the rest; and the ceiling of fastvq vs static if fastvq's attention were
    free (static step / fastvq's step without its attention)."""
    from torch.profiler import ProfilerActivity, profile
    from fastvq.models.llm import new_cache
    codec = VisualCodec("mcq", (4096,), (L_side, L_side), tokenizer="synthetic")
    m = build(codec, tt, adapter="bits", depth_layers=0)
    dec, L, rows = m.decoder, codec.num_positions, 2 * B
    ctx = P + L // 2
    state = {}
    for way in ("fastvq", "static"):
        kv = new_cache(dec.config, rows, P + L + rounds * steps + 2, way)
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            dec(torch.randn(rows, ctx, dec.config.dim, generator=g), torch.arange(ctx).expand(rows, ctx).contiguous(),
                cache=kv)
            x = dec.step(torch.randn(rows, dec.config.dim, generator=g), torch.full((rows,), ctx), kv, check=False)
        state[way] = [kv, x, ctx + 1]
    out = {}
    for r in range(rounds):
        for way, st in state.items():
            kv, x, p = st
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(steps):
                    x = dec.step(x, torch.full((rows,), p + i), kv, check=False)
            st[1], st[2] = x, p + steps
            ev = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
            total = sum(ev.values()) / steps / 1000
            mm = ev.get("aten::mm", 0) / steps / 1000
            attn = sum(v for k, v in ev.items() if "decode_step" in k or "scaled_dot_product" in k) / steps / 1000
            if way not in out or total < out[way][0]:
                out[way] = (total, mm, attn)
    print(f"\nProfile B={B} ({rows} rows), L={L}, cache at {ctx} rows (static: {P + L}), load {os.getloadavg()[0]:.1f}")
    print(f"{'way':7s} {'ms/step':>8s} {'mm ms':>7s} {'mm %':>5s} {'attn ms':>8s} {'attn %':>6s} "
          f"{'attn ms/layer':>13s}")
    for way, (t, mm, a) in out.items():
        print(f"{way:7s} {t:8.2f} {mm:7.2f} {mm / t:5.0%} {a:8.2f} {a / t:6.0%} {a / dec.config.num_layers:13.3f}")
    f, st = out["fastvq"], out["static"]
    print(f"step ratio static/fastvq {st[0] / f[0]:.2f}x; "
          f"ceiling with free fastvq attention {st[0] / (f[0] - f[2]):.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds (default 2; --quick: 1)")
    ap.add_argument("--batch", default="8,32", help="prompts per batch (doubled for CFG), comma-separated")
    ap.add_argument("--grid", default="16,32", help="image grid sides: L = grid^2 positions, comma-separated")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", default="pab", help="any of p (profile), a (three ways), b (full MLLM)")
    ap.add_argument("--hf", default="dynamic,static", help="HF ways: dynamic (DynamicCache), static (StaticCache)")
    ap.add_argument("--codecs", default="mcq,bits", help="Part B codecs: mcq, bits")
    ap.add_argument("--no-static", action="store_true",
                    help="Part A without fastvq's StaticKVCache way (for reruns against HF alone)")
    ap.add_argument("--quick", action="store_true", help="1 timed round; no warm-up round at L > 256")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    batches = [int(b) for b in args.batch.split(",")]
    grids = [int(g) for g in args.grid.split(",")]
    tt = TextTokenizer.from_corpus(CORPUS)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), "
          f"load {os.getloadavg()}")
    for grid in grids:
        for B in batches:
            prompts = (CORPUS * ((B + len(CORPUS) - 1) // len(CORPUS)))[:B]
            warmup = not (args.quick and grid * grid > 256)
            if "p" in args.part:
                part_p(tt, B, grid)
            if "a" in args.part:
                part_a(tt, prompts, grid, repeats, args.cfg, warmup, args.hf.split(","), not args.no_static)
            if "b" in args.part:
                part_b(tt, prompts, grid, repeats, args.cfg, warmup, args.codecs.split(","))
            sys.stdout.flush()
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
