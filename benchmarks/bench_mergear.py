"""MergeAR end-to-end generation: the compacted KV cache (fastvq's ``decode_step`` through
:class:`fastvq.nn.CompressedKVCache`) against the same model over LlamaGen's full-length ``StaticKVCache`` under the
merge mask (docs/mergear.md, docs/benchmarks.md "MergeAR generation").

    python benchmarks/bench_mergear.py [--quick] [--rounds 5] [--batch 32] [--json out.json]

What is timed: ``MergeAR.generate(prompts, keep=K, cfg_scale=3.0, temperature=1.0, cache=...)`` end to end (the
prefix, 256 raster positions, the slot and code heads, sampling), on one 16 x 16 grid (``mergevq-small``: 128 px),
at keep 144 and 36 of 256, ``batch`` prompts (CFG doubles the batch the decoder runs). Tokens/s counts the
``batch · 256`` generated positions. The merge layout is MergeVQ's: each run follows the source maps that
``mergevq-small`` (untrained; its ToMe merges still follow image similarity) gives Fashion-MNIST test images at
that keep (``generate(source=...)``), so the cache grows as it would for real images, not as a random model's
decisions would make it; the slot head still runs every step. The model's weights are random (time does not
depend on them).

KV bytes: the K/V buffers the run allocates (``memory_stats()["kv_allocated"]``: the compressed cache holds
``2 + K + 1`` rows per sequence, the static one ``L + 1 = 257``), plus the pointer keys (``K`` rows of
``pointer_dim``) for both. Attention share: ``cache.attend`` of every layer timed inside one extra run, over that
run's total.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fastvq.models import from_preset
from fastvq.models.llm import StaticKVCache
from fastvq.models.mergear import MergeAR, MergeARConfig
from fastvq.nn import CompressedKVCache, first_occurrence

KEEPS = (144, 36)
CACHES = ("fastvq", "static")


def layouts(batch: int, keeps=KEEPS) -> dict[int, torch.Tensor]:
    """keep -> ``[batch, 256]`` source maps of ``mergevq-small`` on Fashion-MNIST test images at 128 px."""
    from fastvq.data import load_dataset
    torch.manual_seed(0)
    tok = from_preset("mergevq-small").eval()
    ds = load_dataset("fashion_mnist", "test", image_size=128)
    x = ds.images(range(batch)) * 2 - 1
    with torch.no_grad():
        return {k: tok.encode(x, keep=k).extras["source"] for k in keeps}


class AttendTimer:
    """Context manager: accumulates the wall time of every ``attend`` call of both cache classes."""

    def __enter__(self):
        self.seconds, self._orig = 0.0, {}
        for cls in (CompressedKVCache, StaticKVCache):
            orig = self._orig[cls] = cls.attend

            def timed(cache, *a, _orig=orig, **kw):
                t = time.perf_counter()
                out = _orig(cache, *a, **kw)
                self.seconds += time.perf_counter() - t
                return out
            cls.attend = timed
        return self

    def __exit__(self, *exc):
        for cls, orig in self._orig.items():
            cls.attend = orig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 4, 1 round (a smoke run)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    batch, rounds = (4, 1) if args.quick else (args.batch, args.rounds)
    cfg = MergeARConfig(dim=args.dim, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                        grid=(16, 16), keep_candidates=(36, 144, 256), keep_probs=(1.0, 1.0, 1.0))
    torch.manual_seed(0)
    model = MergeAR(cfg).eval()
    maps = layouts(batch)
    prompts = [i % 10 for i in range(batch)]

    def run(keep, cache):
        g = torch.Generator().manual_seed(0)
        return model.generate(prompts, keep=keep, cfg_scale=3.0, temperature=1.0, generator=g, cache=cache,
                              source=maps[keep], return_stats=True)

    for keep in KEEPS:                                              # warm-up, and the two caches agree
        a, b = run(keep, "fastvq")[0], run(keep, "static")[0]
        assert torch.equal(a.source, maps[keep]) and torch.equal(a.source, b.source)
    times = {(k, c): [] for k in KEEPS for c in CACHES}
    stats = {}
    for _ in range(rounds):                                         # interleaved rounds, medians
        for keep in KEEPS:
            for cache in CACHES:
                t = time.perf_counter()
                _, st = run(keep, cache)
                times[keep, cache].append(time.perf_counter() - t)
                stats[keep, cache] = st
    shares = {}
    for keep in KEEPS:
        for cache in CACHES:
            with AttendTimer() as timer:
                t = time.perf_counter()
                run(keep, cache)
                shares[keep, cache] = timer.seconds / (time.perf_counter() - t)
    mean_rows = {k: float(2 + first_occurrence(maps[k]).long().cumsum(1).float().mean()) for k in KEEPS}
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    import fastvq
    print(f"MergeAR dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads ({cfg.num_kv_heads} kv) of "
          f"{cfg.dim // cfg.num_heads}, {n_dec / 1e6:.2f} M decoder / {n_all / 1e6:.2f} M parameters; batch {batch} "
          f"(x2 with CFG), 16x16 grid, fp32; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu_isa {fastvq.cpu_isa()}, {rounds} rounds\n")
    print("| keep | cache | generation (median) | tokens/s | vs static | KV bytes | cache rows / seq | rows read per step "
          "(mean) | attention share |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for keep in KEEPS:
        for cache in CACHES:
            t = statistics.median(times[keep, cache])
            st = stats[keep, cache]
            ptr = 2 * batch * keep * cfg.pointer_dim * 4
            speed = statistics.median(times[keep, "static"]) / t
            rows.append(dict(keep=keep, cache=cache, seconds=t, times=times[keep, cache], tokens_per_s=batch * 256 / t,
                             kv_bytes=st["kv_bytes"], pointer_bytes=ptr, kv_rows=st["kv_rows"],
                             attention_share=shares[keep, cache], speedup_vs_static=speed, batch=batch,
                             config=cfg.to_dict()))
            rows_read = f"{mean_rows[keep]:.1f}" if cache == "fastvq" else "257"  # SDPA reads every row
            print(f"| {keep}/256 | {cache} | {t:.2f} s | {batch * 256 / t:,.0f} | {speed:.2f}x | "
                  f"{(st['kv_bytes'] + ptr) / 1e6:.2f} MB | {st['kv_rows'] if cache == 'fastvq' else 257} | {rows_read} | "
                  f"{shares[keep, cache]:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
