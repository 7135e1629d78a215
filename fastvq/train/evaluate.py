"""Evaluation of a tokenizer on a fixed validation list, and the run's figures (docs/training.md, "Evaluation").

:func:`evaluate_model` reconstructs ``eval_n`` fixed validation images through ``encode`` → ``decode_indices``
(what a user of the tokens gets) and reports PSNR and SSIM (``fastvq.eval``: per image, uint8-rounded, data
range 1), codebook usage, rFID/KID over ``fid_n`` images (``fastvq.eval.ReconstructionEvaluator``, TF-Inception
pool3) and, for a model with a text tower (``embed_images`` + ``text_features``), zero-shot classification and
image–text retrieval. Every number's settings (N, split, list hash, feature network) go to the JSON file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["evaluate_model", "reconstruct", "recon_grid_png", "loss_curve_png", "ZERO_SHOT_TEMPLATES"]

# Prompt ensemble for zero-shot classification (the data set's own caption style plus CLIP's default).
ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a product photo of a {}.", "a picture of a {}.")
_EVALUATORS: dict[tuple, Any] = {}  # ReconstructionEvaluator per settings: one Inception network per process


@torch.no_grad()
def reconstruct(model, images: Tensor, batch_size: int = 32) -> tuple[Tensor, list[Tensor]]:
    """``images [B, 3, H, W]`` in ``[0, 1]`` → (reconstructions in ``[0, 1]``, the index tensors per batch), through
    ``model.encode`` and ``model.decode_indices`` in eval mode."""
    device = next(model.parameters()).device
    recs, indices = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device) * 2 - 1
        out = model.encode(x)
        recs.append(((model.decode_indices(out.indices, out.extras).float() + 1) / 2).clamp(0, 1).cpu())
        indices.append(out.indices.cpu())
    return torch.cat(recs), indices


def _usage(model, indices: list[Tensor]):
    from fastvq.eval import codebook_usage
    cfg, quantizer = model.config, getattr(model, "quantizer", None)
    K = getattr(cfg, "codebook_size", None) or getattr(quantizer, "codebook_size", None)
    if K is None:
        return None
    G = getattr(cfg, "num_codebooks", None) or getattr(quantizer, "num_codebooks", None) or 1
    flat = torch.cat([i.reshape(-1) for i in indices])
    if flat.numel() % G:
        return None
    return codebook_usage(flat.view(-1, G), K)


def _text_metrics(model, images: Tensor, captions: list[str], labels: np.ndarray, class_names: list[str],
                  split: str) -> dict:
    from fastvq.eval import retrieval_recall, zero_shot_classification
    device = next(model.parameters()).device

    def image_tower(x: Tensor) -> Tensor:
        return model.embed_images(x.to(device) * 2 - 1).float().cpu()

    def text_tower(texts: list[str]) -> Tensor:
        return model.text_features(list(texts)).float().cpu()

    out = {}
    if class_names and (labels >= 0).all():
        out["zero_shot"] = zero_shot_classification(image_tower, text_tower, images, labels, class_names,
                                                    ZERO_SHOT_TEMPLATES, split=split)
    with torch.no_grad():
        img = torch.cat([image_tower(images[i:i + 64]) for i in range(0, len(images), 64)])
        txt = torch.cat([text_tower(captions[i:i + 64]) for i in range(0, len(captions), 64)])
    out["retrieval"] = retrieval_recall(img, txt, np.arange(len(captions)), split=split)
    return out


def _compact(result: dict) -> dict:
    """A MetricResult's dict without the (long) image list; its hash stays in the settings."""
    result["details"] = {k: v for k, v in result["details"].items() if k != "image_list"}
    return result


def evaluate_model(model, data: str, eval_n: int, fid_n: int, image_size: int, out_dir: Path | None = None,
                   tag: str = "eval") -> dict:
    """Evaluate ``model`` (put it in eval mode first) on ``data``/val. Returns a flat dict of numbers (``psnr``,
    ``ssim``, ``usage``, ``perplexity``, ``rfid``, ``kid``, ``zero_shot_top1``, ``retrieval``; absent when not
    applicable) plus ``details`` (every ``MetricResult`` as a dict). With ``out_dir``: ``<tag>.json`` and a
    reconstruction grid ``<tag>-recon.png``."""
    from fastvq.data import load_dataset
    from fastvq.eval import psnr, ssim
    from fastvq.eval.recon import ReconstructionEvaluator

    ds = load_dataset(data, "val", channels=3, image_size=image_size)
    n = min(eval_n, len(ds))
    pos = ds.fixed_subset(n, seed=0)
    images = ds.images(pos)
    split = f"{data}/val"
    recs, indices = reconstruct(model, images)
    results = {"psnr": psnr(images, recs, split)}
    if min(images.shape[-2:]) >= 11:
        results["ssim"] = ssim(images, recs, split)
    usage = _usage(model, indices)
    if usage is not None:
        results["usage"] = usage
    if fid_n > 0:
        key = (data, fid_n, image_size)
        if key not in _EVALUATORS:
            _EVALUATORS[key] = ReconstructionEvaluator(data, "val", n=fid_n, image_size=image_size, kid_subsets=100)
        fid = _EVALUATORS[key].evaluate(lambda x: reconstruct(model, x)[0])
        results["rfid"], results["kid"] = fid["rfid"], fid["kid"]
    if callable(getattr(model, "embed_images", None)) and callable(getattr(model, "text_features", None)):
        results.update(_text_metrics(model, images, [ds.captions[p] for p in pos], ds.labels[pos],
                                     ds.class_names, split))
    flat: dict[str, Any] = {"n": n, "split": split, "image_size": image_size}
    for name, r in results.items():
        flat[name] = float(r.value)
    if "usage" in results:
        flat["perplexity"] = results["usage"].details["mean_perplexity"]
    if "rfid" in results:
        flat["fid_n"] = results["rfid"].n
    if "zero_shot" in results:
        flat["zero_shot_top1"] = flat.pop("zero_shot")
    flat["details"] = {k: _compact(r.to_dict()) for k, r in results.items()}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{tag}.json").write_text(json.dumps(flat, indent=1, default=float) + "\n")
        recon_grid_png(images[:8], recs[:8], out_dir / f"{tag}-recon.png")
    return flat


def recon_grid_png(images: Tensor, recs: Tensor, path: Path, scale: int = 2) -> None:
    """Originals (top row) above reconstructions (bottom row), ``[B, C, H, W]`` in [0, 1], as a PNG; each pixel
    repeated ``scale`` times (nearest), a 2-pixel white gap between images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def row(t: Tensor) -> np.ndarray:
        t = t.clamp(0, 1).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        t = torch.nn.functional.pad(t, (1, 1, 1, 1), value=1.0)
        return t.permute(2, 0, 3, 1).reshape(t.shape[2], -1, t.shape[1]).numpy()

    grid = np.concatenate([row(images), row(recs)], axis=0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    plt.imsave(path, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1)


def loss_curve_png(history: list[dict], path: Path, title: str) -> None:
    """The logged training loss (and its reconstruction terms) against the step, log scale, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in history if "loss" in r]
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in records]
    for key in ("loss", "l2", "l1", "vq", "perceptual", "contrastive", "gan_d"):
        vals = [r.get(key) for r in records]
        if all(v is not None and math.isfinite(v) and v > 0 for v in vals):
            ax.plot(steps, vals, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
