"""One tokenizer training step (generator forward + backward) at each model's ``small`` preset, with fastvq's
ops against the anchors' own formulation of the same step, and the quantizer's (and MergeVQ's merging) share
of the fastvq step.

    python benchmarks/bench_models.py [--quick] [--models unitok,vqrae,...] [--json out.json]

Per model, two implementations of the same step on the same weights and the same batch:

* ``fastvq``: the model as fastvq defines it;
* ``anchor``: the model with the quantizer (and MergeVQ's merging) swapped for what the anchor's public code
  computes:
    - UniTok: per-codebook normalise + matmul + argmax + index (UniTok's ``MultiCodebookQuantizer`` /
      ``VectorQuantizerM``), with the same losses;
    - MergeVQ: the full-logit LFQ entropy (a softmax over all ``2^18`` codes per token, Open-MAGVIT2 /
      MergeVQ's ``LFQ``) and the dense ToMe source matrix ``[B, T, T]`` (ToMe's ``source`` tracking);
    - VQRAE: vector-quantize-pytorch's ``SimVQ`` (its ``cdist`` search), the anchor VQRAE names;
    - UniWeTok: no public code; its quantizer is LFQ over 128 bits in groups, so the anchor is the same
      full-logit entropy per group.

What is timed: ``model.train(); rec, losses = model(x); losses["loss"].backward()`` with ``x`` a fixed
``[B, 3, S, S]`` batch of ``torch.rand * 2 - 1`` images, gradients dropped between rounds. The perceptual and
GAN terms are off (``perceptual_weight=0``; the discriminator is the trainer's): both are frozen or separate
networks, identical in the two implementations, and would only lower the quantizer's share.

The quantizer's share of the fastvq step: the quantizer module is re-run alone, forward + backward (of
``quantized.square().mean() + loss``), on the exact input the model gave it (captured by a forward pre-hook),
and its median time divided by the step's median. MergeVQ's merging share: the same for every
``bipartite_merge`` / ``unmerge`` call the step makes.

Peak memory: each (model, implementation) runs in a fresh process, and reports the peak resident memory of one
step above what was resident before it (``fastvq.bench.peak_rss_increase``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = {  # name -> (preset, batch size)
    "unitok": ("unitok-small", 16),
    "mergevq": ("mergevq-small", 16),
    "vqrae": ("vqrae-small", 16),
    "uniwetok": ("uniwetok-small", 16),
}


# ---- the anchors' formulations ------------------------------------------------------------------------------------

class UniTokAnchorQuantizer(nn.Module):
    """UniTok's multi-codebook quantizer as its public code computes it: per codebook, normalise the chunk and
    the codebook, ``matmul``, ``argmax``, index; the same losses as fastvq's (``0.25 * commitment + codebook``)
    on the same codebook tensor."""

    def __init__(self, fastvq_quantizer: nn.Module):
        super().__init__()
        self.inner = fastvq_quantizer  # shares the codebook parameter
        self.beta = 0.25

    def forward(self, x, return_loss_breakdown=False):
        from fastvq.nn._quantizer import QuantizeOutput
        embed = self.inner.embed                 # [G, K, d]
        G, K, d = embed.shape
        z = x.float().reshape(-1, G, d)
        zs, qs, idxs = [], [], []
        for g in range(G):                       # UniTok loops over its codebooks
            zg = F.normalize(z[:, g], dim=-1)
            cg = F.normalize(embed[g], dim=-1)
            idx = torch.argmax(zg @ cg.t(), dim=-1)
            zs.append(zg), qs.append(cg[idx]), idxs.append(idx)
        zn, q = torch.stack(zs, 1), torch.stack(qs, 1)
        commitment = F.mse_loss(zn, q.detach())
        codebook = F.mse_loss(q, zn.detach())
        out = (zn + (q - zn).detach()).reshape(x.shape)
        res = QuantizeOutput(out, torch.stack(idxs, -1).reshape(*x.shape[:-1], G), self.beta * commitment + codebook)
        return (res, {"commitment": commitment.detach(), "codebook": codebook.detach()}) if return_loss_breakdown else res


class VQPSimVQ(nn.Module):
    """vector-quantize-pytorch's ``SimVQ`` behind the calls VQRAE makes (``forward(x, return_loss_breakdown)``,
    ``codebook_usage``); vector-quantize-pytorch returns only the weighted loss, so the breakdown repeats it."""

    def __init__(self, fastvq_simvq: nn.Module):
        super().__init__()
        import vector_quantize_pytorch as vqp
        q = fastvq_simvq
        self.inner = vqp.SimVQ(dim=q.dim, codebook_size=q.codebook_size, rotation_trick=q.rotation_trick,
                               commitment_weight=q.commitment_weight,
                               input_to_quantize_commit_loss_weight=q.input_to_quantize_commit_loss_weight)
        with torch.no_grad():  # the same frozen codebook and map
            self.inner.codebook.copy_(q.frozen_codebook)
            self.inner.code_transform.weight.copy_(q.code_transform.weight)

    def forward(self, x, return_loss_breakdown=False):
        from fastvq.nn._quantizer import QuantizeOutput
        quantized, indices, loss = self.inner(x)
        res = QuantizeOutput(quantized, indices, loss)
        parts = {"quantize_to_input": loss.detach(), "input_to_quantize": loss.detach()}
        return (res, parts) if return_loss_breakdown else res

    def codebook_usage(self):
        return torch.tensor(float("nan"))


def make_anchor(name: str, model: nn.Module) -> nn.Module:
    if name == "unitok":
        model.quantizer = UniTokAnchorQuantizer(model.quantizer)
    elif name == "vqrae":
        model.quantizer = VQPSimVQ(model.quantizer)
    else:
        raise NotImplementedError(f"bench_models: no anchor formulation for {name!r} yet")
    return model


# ---- timing --------------------------------------------------------------------------------------------------------

def median_time(fn, rounds: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def run_one(name: str, impl: str, rounds: int, batch: int | None) -> dict:
    """One (model, implementation) in this process: step time, component shares, peak memory."""
    from fastvq.bench import peak_rss_increase
    from fastvq.models import from_preset
    preset, default_batch = MODELS[name]
    b = batch or default_batch
    torch.manual_seed(0)
    model = from_preset(preset, perceptual_weight=0.0).train()
    if impl == "anchor":
        model = make_anchor(name, model)
    size = model.config.image_size
    x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def step():
        model.zero_grad(set_to_none=True)
        _, losses = model(x)
        losses["loss"].backward()

    # peak memory of one step, after a warm-up step on the same batch
    step()
    peak = peak_rss_increase(step)
    t_step, all_t = median_time(step, rounds)
    row = {"model": name, "preset": preset, "impl": impl, "batch": b, "image_size": size, "step_s": t_step,
           "step_rounds_s": all_t, "peak_bytes": peak,
           "params": sum(p.numel() for p in model.parameters()),
           "threads": torch.get_num_threads()}
    if impl == "fastvq":
        captured = {}
        hook = model.quantizer.register_forward_pre_hook(
            lambda m, args, kwargs: captured.setdefault("x", args[0].detach().clone()), with_kwargs=True)
        step()
        hook.remove()
        xq = captured["x"].requires_grad_(True)

        def quant():
            model.zero_grad(set_to_none=True)
            out = model.quantizer(xq)
            (out.quantized.square().mean() + out.loss).backward()

        row["quantizer_s"], _ = median_time(quant, rounds)
        row["quantizer_share"] = row["quantizer_s"] / t_step
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="batch 2, 2 rounds (a smoke run)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "model:impl": run in this process
    args = ap.parse_args(argv)
    rounds, batch = (2, 2) if args.quick else (args.rounds, None)
    if args.one:
        name, impl = args.one.split(":")
        print(json.dumps(run_one(name, impl, rounds, batch)))
        return
    from fastvq.models import list_presets
    import fastvq
    rows = []
    for name in args.models.split(","):
        preset = MODELS[name][0]
        if preset not in list_presets():
            print(f"{name}: preset {preset} is not registered; skipped", file=sys.stderr)
            continue
        for impl in ("fastvq", "anchor"):
            cmd = [sys.executable, __file__, "--one", f"{name}:{impl}", "--rounds", str(rounds)]
            if args.quick:
                cmd.append("--quick")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{name}/{impl} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{name:9s} {impl:7s} step {rows[-1]['step_s'] * 1e3:9.1f} ms  peak {rows[-1]['peak_bytes'] / 1e6:8.1f} MB"
                  + (f"  quantizer {rows[-1]['quantizer_share']:.1%}" if "quantizer_share" in rows[-1] else ""),
                  flush=True)
    print(f"\nfastvq {fastvq.__version__}, cpu_isa {fastvq.cpu_isa()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model (preset, batch) | fastvq step | anchor step | fastvq vs anchor | quantizer share (fastvq) "
          "| peak mem fastvq | peak mem anchor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    by = {(r["model"], r["impl"]): r for r in rows}
    for name in MODELS:
        f, a = by.get((name, "fastvq")), by.get((name, "anchor"))
        if f is None:
            continue
        ratio = f"{a['step_s'] / f['step_s']:.2f}x" if a else "-"
        print(f"| {name} ({f['preset']}, {f['batch']}) | {f['step_s'] * 1e3:.1f} ms | "
              f"{a['step_s'] * 1e3 if a else float('nan'):.1f} ms | {ratio} | {f['quantizer_share']:.1%} | "
              f"{f['peak_bytes'] / 1e6:.0f} MB | {a['peak_bytes'] / 1e6 if a else float('nan'):.0f} MB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
