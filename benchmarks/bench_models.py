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

MODELS = {  # name -> (preset, batch size, preset overrides, forward keywords)
    "unitok": ("unitok-small", 16, {}, {}),
    # keep fixed at the G+R eval count (training samples 121..256), the frozen-teacher distillation off
    "mergevq": ("mergevq-small", 8, {"distill_weight": 0.0}, {"keep": 144}),
    "vqrae": ("vqrae-small", 16, {}, {}),
    "uniwetok": ("uniwetok-small", 16, {}, {}),
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
        parts = {"commitment": commitment.detach(), "codebook": codebook.detach()}
        return (res, parts) if return_loss_breakdown else res


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


def _dense_tome_block_forward(self, x, sizes=None, source=None, r=None):
    """``MergingViTBlock.forward`` as ToMe and MergeVQ's public code compute it: ``tome_merge_dense_ref`` (ToMe's
    matching, ``merge_wavg`` and ``merge_source``) carrying a dense one-hot ``[B, T, T0]`` source matrix from
    block to block; the encoder's last block turns it into the integer map the rest of the model reads
    (``argmax`` over the kept tokens, as a user of ToMe's source does)."""
    from fastvq.reference.merge import tome_merge_dense_ref
    B, T, _ = x.shape
    attn, metric = self.attention(self.norm1(x), sizes)
    x = x + attn
    if sizes is None:
        sizes = x.new_ones(B, T)
    r = self.r if r is None else r
    if r > 0:
        x, sizes, source = tome_merge_dense_ref(x, metric.detach(), sizes, source, r, self.protect_first)
    x = x + self.mlp(self.norm2(x))
    if self._anchor_last:
        source = (torch.arange(T, device=x.device).expand(B, T) if source is None
                  else source.argmax(dim=1))
    return x, sizes, source


def _dense_unmerge(merged, source):
    """The grid from an integer map the dense way: a one-hot ``[B, K, N]`` source matrix, ``sourceᵀ @ merged``."""
    from fastvq.reference.merge import unmerge_dense_ref
    return unmerge_dense_ref(merged, F.one_hot(source, merged.shape[1]).transpose(1, 2))


def make_anchor(name: str, model: nn.Module) -> nn.Module:
    import types
    if name == "unitok":
        model.quantizer = UniTokAnchorQuantizer(model.quantizer)
    elif name == "vqrae":
        model.quantizer = VQPSimVQ(model.quantizer)
    elif name in ("mergevq", "uniwetok"):
        import fastvq.nn.lfq
        from fastvq.reference.lfq import lfq_entropy_ref
        fastvq.nn.lfq.lfq_entropy = lfq_entropy_ref  # a softmax over every code: [N, 2^g] logits per group
        if name == "mergevq":
            import fastvq.models.mergevq
            blocks = model.encoder.blocks
            for i, blk in enumerate(blocks):
                blk._anchor_last = i == len(blocks) - 1
                blk.forward = types.MethodType(_dense_tome_block_forward, blk)
            fastvq.models.mergevq.unmerge = _dense_unmerge
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
    preset, default_batch, overrides, fwd = MODELS[name]
    b = batch or default_batch
    torch.manual_seed(0)
    model = from_preset(preset, perceptual_weight=0.0, **overrides).train()
    if impl == "anchor":
        model = make_anchor(name, model)
    size = model.config.image_size
    x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def step():
        model.zero_grad(set_to_none=True)
        _, losses = model(x, **fwd)
        losses["loss"].backward()

    # peak memory of one step on the batch, after a warm-up step on one image (libraries, lazy state)
    x_full, x = x, x[:1]
    step()
    x = x_full
    peak = peak_rss_increase(step)
    t_step, all_t = median_time(step, rounds)
    row = {"model": name, "preset": preset, "impl": impl, "batch": b, "image_size": size, "step_s": t_step,
           "step_rounds_s": all_t, "peak_bytes": peak,
           "params": sum(p.numel() for p in model.parameters()),
           "threads": torch.get_num_threads()}
    if impl == "fastvq":
        captured = {}

        def capture(module, args, kwargs):
            captured.setdefault("x", args[0].detach().clone())

        hook = model.quantizer.register_forward_pre_hook(capture, with_kwargs=True)
        step()
        hook.remove()
        xq = captured["x"].requires_grad_(True)

        def quant():
            model.zero_grad(set_to_none=True)
            out = model.quantizer(xq)
            (out.quantized.square().mean() + out.loss).backward()

        row["quantizer_s"], _ = median_time(quant, rounds)
        row["quantizer_share"] = row["quantizer_s"] / t_step
        if name == "mergevq":
            row["merging_s"] = merging_time(model, step, rounds)
            row["merging_share"] = row["merging_s"] / t_step
    return row


def merging_time(model: nn.Module, step, rounds: int) -> float:
    """Median time of every merging op call one MergeVQ step makes (``bipartite_merge``, ``compose_source``,
    ``unmerge``), re-run alone on the captured inputs, forward + backward of the sum of their float outputs."""
    import fastvq.models.mergevq as mv
    import fastvq.nn.merge as nm
    calls = []
    originals = {(nm, "bipartite_merge"): nm.bipartite_merge, (nm, "compose_source"): nm.compose_source,
                 (mv, "unmerge"): mv.unmerge}

    def recording(fn):
        def wrapper(*args):
            calls.append((fn, [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]))
            return fn(*args)
        return wrapper

    for (mod, attr), fn in originals.items():
        setattr(mod, attr, recording(fn))
    try:
        step()
    finally:
        for (mod, attr), fn in originals.items():
            setattr(mod, attr, fn)

    def rerun():
        total = 0.0
        for fn, args in calls:
            args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() and i == 0
                    else a for i, a in enumerate(args)]
            outs = fn(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            float_outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
            if float_outs:
                total = total + sum(o.sum() for o in float_outs)
        if isinstance(total, torch.Tensor):
            total.backward()

    return median_time(rerun, rounds)[0]


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
            r = rows[-1]
            print(f"{name:9s} {impl:7s} step {r['step_s'] * 1e3:9.1f} ms  peak {r['peak_bytes'] / 1e6:8.1f} MB"
                  + (f"  quantizer {r['quantizer_share']:.1%}" if "quantizer_share" in r else ""),
                  flush=True)
    print(f"\nfastvq {fastvq.__version__}, cpu_isa {fastvq.cpu_isa()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model (preset, batch) | fastvq step | anchor step | fastvq vs anchor | quantizer share (fastvq) "
          "| merging share (fastvq) | peak mem fastvq | peak mem anchor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    by = {(r["model"], r["impl"]): r for r in rows}
    for name in MODELS:
        f, a = by.get((name, "fastvq")), by.get((name, "anchor"))
        if f is None:
            continue
        ratio = f"{a['step_s'] / f['step_s']:.2f}x" if a else "-"
        print(f"| {name} ({f['preset']}, {f['batch']}) | {f['step_s'] * 1e3:.1f} ms | "
              f"{a['step_s'] * 1e3 if a else float('nan'):.1f} ms | {ratio} | {f['quantizer_share']:.1%} | "
              f"{format(f['merging_share'], '.1%') if 'merging_share' in f else '-'} | "
              f"{f['peak_bytes'] / 1e6:.0f} MB | {a['peak_bytes'] / 1e6 if a else float('nan'):.0f} MB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
