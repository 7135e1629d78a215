"""MergeAR end-to-end generation: the compacted KV cache (fastvq's ``decode_step`` through
:class:`fastvq.nn.CompressedKVCache`) against the same model over LlamaGen's full-length ``StaticKVCache`` under the
merge mask (docs/mergear.md, docs/benchmarks.md "MergeAR generation").

    python benchmarks/bench_mergear.py [--quick] [--rounds 5] [--batch 32] [--json out.json]

What is timed: the CPU time of this (single-threaded: ``OMP_NUM_THREADS=1``) process (``time.process_time``; the
wall-clock medians are printed too; on a shared machine they carry the other processes' load) of
``MergeAR.generate(prompts, keep=K, cfg_scale=3.0, temperature=1.0, cache=...)`` end to end (the
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
                t = time.process_time()
                out = _orig(cache, *a, **kw)
                self.seconds += time.process_time() - t
                return out
            cls.attend = timed
        return self

    def __exit__(self, *exc):
        for cls, orig in self._orig.items():
            cls.attend = orig


def quality(tokenizer_dir: Path, seconds: float, n_train: int, per_class: int, out: Path, dim: int, layers: int
            ) -> list[dict]:
    """Item 4 of issue 18 at CPU scale: MergeAR (keep candidates 25..64 of 64) against the same model trained on
    unmerged tokens only (``keep_candidates=(64,)``: every position its own group, a plain raster AR over all 64
    codes), each trained for ``seconds`` of wall clock on the same ``n_train`` Fashion-MNIST train images encoded
    by the MergeVQ tokenizer at ``tokenizer_dir``; then ``per_class`` images per class (greedy-free: temperature
    1, top-k 0, CFG 3) scored by ``generated_image_accuracy`` and KID (FID-Inception pool3 features) against as
    many Fashion-MNIST test images. The tokenizer's own reconstructions of those test images give the ceiling."""
    from fastvq.data import load_dataset
    from fastvq.eval import generated_image_accuracy
    from fastvq.eval.metrics import kid_from_features
    from fastvq.eval.networks import FIDInceptionV3, extract_features
    from fastvq.models.mergear import encode_for_mergear, train_mergear
    from fastvq.train.trainer import load_checkpoint_model

    torch.manual_seed(0)
    tok = load_checkpoint_model(tokenizer_dir).eval()
    size = tok.config.image_size
    train = load_dataset("fashion_mnist", "train", image_size=size)
    test = load_dataset("fashion_mnist", "test", image_size=size)
    pos = train.fixed_subset(n_train, seed=0)
    t = time.perf_counter()
    data = encode_for_mergear(tok, train.images(pos) * 2 - 1, train.labels[pos])
    print(f"encoded {n_train} images at keeps {data['keep_candidates']} in {time.perf_counter() - t:.0f} s", flush=True)
    L = data["codes"].shape[-1]
    labels = torch.arange(10).repeat_interleave(per_class)
    tpos = test.fixed_subset(10 * per_class, seed=1)
    real = test.images(tpos)
    inception = FIDInceptionV3()
    real_f = extract_features(inception, real)
    results = []

    def score(name, images, extra, y=labels):
        x = ((images.clamp(-1, 1) + 1) / 2).float()
        acc = generated_image_accuracy(x, y)
        kid = kid_from_features(real_f, extract_features(inception, x))
        row = dict(name=name, accuracy=acc.value, kid=kid.value, kid_std=kid.details.get("std"), n=len(x), **extra)
        results.append(row)
        print(row, flush=True)
        return x

    with torch.no_grad():
        for k in (36, 64):
            rec = tok.decode_indices(*(lambda o: (o.indices, o.extras))(tok.encode(real * 2 - 1, keep=k)))
            score(f"tokenizer reconstruction keep {k} (ceiling)", rec, dict(keep=k), torch.as_tensor(test.labels[tpos]))
    samples = {}
    for name, keeps in (("mergear", tuple(tok.config.keep_candidates)), ("unmerged", (L,))):
        probs = tuple(tok.config.keep_probs) if name == "mergear" else (1.0,)
        model = MergeAR.from_tokenizer(tok, dim=dim, num_layers=layers, keep_candidates=keeps, keep_probs=probs)
        hist = train_mergear(model, data, seconds=seconds, batch_size=32, lr=1e-3, log_every=100)
        model.save_pretrained(out / name)
        for k in (keeps if name == "unmerged" else (36, L)):
            g = torch.Generator().manual_seed(0)
            t = time.process_time()
            sample = model.generate(labels.tolist(), keep=k, cfg_scale=3.0, temperature=1.0, generator=g)
            gen_s = time.process_time() - t
            x = score(f"{name} keep {k}", model.decode(tok, sample),
                      dict(keep=k, steps=len(hist), train_seconds=hist[-1]["time"], final_loss=hist[-1]["loss"],
                           generation_cpu_s=gen_s))
            samples[f"{name}_keep{k}"] = x
    try:
        from torchvision.utils import save_image
        for key, x in samples.items():
            save_image(x[:: max(1, per_class // 8)][:80], out / f"{key}.png", nrow=8)
    except ImportError:
        pass
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    return results


def quality_vs_mllm(tokenizer_dir: Path, seconds: float, n_train: int, per_class: int, out: Path) -> list[dict]:
    """Item 4 of issue 18 against the #17 MLLM: for the same training wall clock (``seconds`` each, run one after
    the other in this process), MergeAR (``fastvq.models.mergear``, default size: dim 128, 4 layers; keep
    candidates 25/36/49/64 with the tokenizer's probabilities) and ``mllm-tiny`` (``fastvq.train.mllm``'s
    ``MLLMTrainer``, text-to-image only, batch 32, class captions of the data set as prompts) generating the
    *unmerged* MergeVQ tokens: the MLLM's ``VisualCodec`` encodes with ``tok.encode(keep=codec.keep or
    eval_keep)``, so the tokenizer is handed to it with ``eval_keep = 64`` (the same weights; keep 64 on the 8x8
    grid merges nothing: ``source == arange(64)``) and it learns and generates all 64 positions' codes. Both on the
    same ``n_train`` Fashion-MNIST train images (``fixed_subset(n_train, 0)``). Then ``per_class`` images per class
    prompt ("A photo of a trouser.", ``class_prompt``), CFG 3, temperature 1, top-k/top-p off, seed 0, scored by
    ``generated_image_accuracy`` and KID (FID-Inception pool3) against ``10 · per_class`` Fashion-MNIST test
    images; the tokenizer's reconstructions of those test images at keep 36 and 64 are the ceiling."""
    import os

    from fastvq.data import load_dataset
    from fastvq.eval import generated_image_accuracy
    from fastvq.eval.metrics import kid_from_features
    from fastvq.eval.mllm import generate_images as mllm_generate
    from fastvq.eval.networks import FIDInceptionV3, extract_features
    from fastvq.models.mergear import encode_for_mergear, train_mergear
    from fastvq.train.mllm import MLLMTrainConfig, MLLMTrainer, class_prompt
    from fastvq.train.trainer import load_checkpoint_model

    torch.manual_seed(0)
    tok = load_checkpoint_model(tokenizer_dir).eval()
    size = tok.config.image_size
    train = load_dataset("fashion_mnist", "train", image_size=size)
    test = load_dataset("fashion_mnist", "test", image_size=size)
    labels = torch.arange(10).repeat_interleave(per_class)
    prompts = [class_prompt(train.class_names[int(c)]) for c in labels]
    tpos = test.fixed_subset(10 * per_class, seed=1)
    real = test.images(tpos)
    inception = FIDInceptionV3()
    real_f = extract_features(inception, real)
    results, samples = [], {}

    def score(name, x01, extra, y=labels):
        x01 = x01.clamp(0, 1).float()
        acc = generated_image_accuracy(x01, y)
        kid = kid_from_features(real_f, extract_features(inception, x01))
        row = dict(name=name, accuracy=acc.value, kid=kid.value, kid_std=kid.details.get("std"), n=len(x01),
                   load_average=os.getloadavg(), **extra)
        results.append(row)
        print(row, flush=True)
        samples[name] = x01
        (out / "quality_vs_mllm.json").write_text(json.dumps(results, indent=1, default=float))

    with torch.no_grad():
        for k in (36, 64):
            o = tok.encode(real * 2 - 1, keep=k)
            score(f"tokenizer reconstruction keep {k} (ceiling)", (tok.decode_indices(o.indices, o.extras) + 1) / 2,
                  dict(keep=k), torch.as_tensor(test.labels[tpos]))

    # MergeAR
    pos = train.fixed_subset(n_train, seed=0)
    t = time.perf_counter()
    data = encode_for_mergear(tok, train.images(pos) * 2 - 1, train.labels[pos])
    enc_s = time.perf_counter() - t
    torch.manual_seed(0)
    model = MergeAR.from_tokenizer(tok)
    load0 = os.getloadavg()
    hist = train_mergear(model, data, seconds=seconds, batch_size=32, lr=1e-3, log_every=100)
    model.save_pretrained(out / "mergear", tokenizer=tok)
    info = dict(params=sum(p.numel() for p in model.parameters()), steps=len(hist), train_seconds=hist[-1]["time"],
                final_loss=hist[-1]["loss"], encode_seconds=enc_s, load_average_start=load0,
                load_average_end=os.getloadavg(), batch_size=32)
    for k in (36, 64):
        g = torch.Generator().manual_seed(0)
        t = time.process_time()
        sample = model.generate(labels.tolist(), keep=k, cfg_scale=3.0, temperature=1.0, generator=g)
        gen_s = time.process_time() - t
        with torch.no_grad():
            x = (model.decode(tok, sample) + 1) / 2
        score(f"MergeAR keep {k}", x, dict(keep=k, generation_cpu_s=gen_s, **info))

    # the MLLM on unmerged tokens: the same weights, eval_keep 64
    tok64_dir = out / "mergevq-keep64"
    tok.save_pretrained(tok64_dir)
    cfg_json = json.loads((tok64_dir / "config.json").read_text())
    cfg_json["config"]["eval_keep"] = L = tok.config.image_size // tok.config.downsample * (
        tok.config.image_size // tok.config.downsample)
    (tok64_dir / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
    mcfg = MLLMTrainConfig(tokenizer=str(tok64_dir), preset="mllm-tiny", data=f"fashion_mnist:{n_train}",
                           t2i_weight=1.0, caption_weight=0.0, qa_weight=0.0, steps=10 ** 6, batch_size=32, lr=1e-3,
                           warmup_steps=20, log_every=100, ckpt_every=0, out=str(out / "mllm"))
    t = time.perf_counter()
    trainer = MLLMTrainer(mcfg, progress=False)
    enc_s = time.perf_counter() - t
    assert trainer.codec.keep == 0 and trainer.tokenizer.config.eval_keep == L      # encodes at keep L: unmerged
    trainer.model.train()
    load0, t0, losses = os.getloadavg(), time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        terms = trainer._train_step()
        trainer.step += 1
        losses.append(terms["loss"] if terms else float("nan"))
        if trainer.step % 100 == 0:
            print(f"mllm step {trainer.step}: loss {losses[-1]:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    train_s = time.perf_counter() - t0
    mllm = trainer.model.eval()
    info = dict(params=sum(p.numel() for p in mllm.parameters()), steps=trainer.step, train_seconds=train_s,
                final_loss=losses[-1], encode_seconds=enc_s, load_average_start=load0,
                load_average_end=os.getloadavg(), batch_size=32, codec=trainer.codec.to_dict())
    t = time.process_time()
    x = mllm_generate(mllm, trainer.tokenizer, prompts, cfg_scale=3.0, seed=0, temperature=1.0)
    score("mllm-tiny, unmerged (keep 64)", x, dict(keep=L, generation_cpu_s=time.process_time() - t, **info))
    try:
        from fastvq.eval.mllm import images_grid_png
        for name, x in samples.items():
            tag = name.split(" (")[0].replace(" ", "_").replace(",", "")
            k = min(8, per_class)                                  # one row per class
            images_grid_png(x.reshape(10, per_class, *x.shape[1:])[:, :k].flatten(0, 1), out / f"{tag}.png", ncol=k,
                            scale=1)
    except ImportError:
        pass
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 4, 1 round (a smoke run)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quality", type=Path, metavar="TOKENIZER_RUN",
                    help="instead of the speed benchmark: the quality comparison on this trained MergeVQ run")
    ap.add_argument("--vs-mllm", action="store_true", help="--quality: MergeAR against the #17 MLLM (mllm-tiny, "
                    "text-to-image only) on unmerged tokens, instead of against an unmerged MergeAR")
    ap.add_argument("--seconds", type=float, default=300, help="--quality: training wall clock per model")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("runs/mergear-quality"))
    args = ap.parse_args()
    if args.quality is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.vs_mllm:
            quality_vs_mllm(args.quality, args.seconds, args.n_train, args.per_class, args.out)
            return
        quality(args.quality, args.seconds, args.n_train, args.per_class, args.out, args.dim, args.layers)
        return
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

    for keep in KEEPS:                                              # warm-up, and the two caches agree (greedy)
        a, b = (model.generate(prompts, keep=keep, cfg_scale=3.0, temperature=0, cache=c, source=maps[keep])
                for c in CACHES)
        assert torch.equal(a.source, maps[keep]) and torch.equal(a.indices, b.indices), "the caches disagree"
    times = {(k, c): [] for k in KEEPS for c in CACHES}
    walls = {(k, c): [] for k in KEEPS for c in CACHES}
    stats = {}
    for _ in range(rounds):                                         # interleaved rounds, medians
        for keep in KEEPS:
            for cache in CACHES:
                t, w = time.process_time(), time.perf_counter()
                _, st = run(keep, cache)
                times[keep, cache].append(time.process_time() - t)
                walls[keep, cache].append(time.perf_counter() - w)
                stats[keep, cache] = st
    shares = {}
    for keep in KEEPS:
        for cache in CACHES:
            with AttendTimer() as timer:
                t = time.process_time()
                run(keep, cache)
                shares[keep, cache] = timer.seconds / (time.process_time() - t)
    mean_rows = {k: float(2 + first_occurrence(maps[k]).long().cumsum(1).float().mean()) for k in KEEPS}
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    import fastvq
    print(f"MergeAR dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads ({cfg.num_kv_heads} kv) of "
          f"{cfg.dim // cfg.num_heads}, {n_dec / 1e6:.2f} M decoder / {n_all / 1e6:.2f} M parameters; batch {batch} "
          f"(x2 with CFG), 16x16 grid, fp32; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu_isa {fastvq.cpu_isa()}, {rounds} rounds\n")
    print("| keep | cache | generation (CPU s, median) | tokens/s | vs static | wall (median) | KV bytes "
          "| cache rows / seq | rows read per step "
          "(mean) | attention share |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for keep in KEEPS:
        for cache in CACHES:
            t = statistics.median(times[keep, cache])
            st = stats[keep, cache]
            ptr = 2 * batch * keep * cfg.pointer_dim * 4
            speed = statistics.median(times[keep, "static"]) / t
            rows.append(dict(keep=keep, cache=cache, cpu_seconds=t, cpu_times=times[keep, cache],
                             wall_times=walls[keep, cache], tokens_per_s=batch * 256 / t,
                             kv_bytes=st["kv_bytes"], pointer_bytes=ptr, kv_rows=st["kv_rows"],
                             attention_share=shares[keep, cache], speedup_vs_static=speed, batch=batch,
                             config=cfg.to_dict()))
            rows_read = f"{mean_rows[keep]:.1f}" if cache == "fastvq" else "257"  # SDPA reads every row
            print(f"| {keep}/256 | {cache} | {t:.2f} s | {batch * 256 / t:,.0f} | {speed:.2f}x | "
                  f"{statistics.median(walls[keep, cache]):.2f} s | "
                  f"{(st['kv_bytes'] + ptr) / 1e6:.2f} MB | {st['kv_rows'] if cache == 'fastvq' else 257} | "
                  f"{rows_read} | "
                  f"{shares[keep, cache]:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
