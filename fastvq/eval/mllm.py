"""Evaluation of the MLLM (``fastvq eval mllm CKPT``; docs/training.md, "Training and evaluating the MLLM").

Every number is a :class:`fastvq.eval.MetricResult` with its N, split and settings, computed with fastvq.eval's
metrics, and each task is scored against baselines that use no image (or no prompt):

| task | metric | data | baselines |
|---|---|---|---|
| captioning | BLEU-4, CIDEr-D (:func:`fastvq.eval.caption_scores`) | held-out (val) emoji, Tux Paint, Fashion-MNIST | the most frequent training caption of the set for every image; the MLLM on a blank image |
| QA ("what is this?") | exact-match accuracy of the class name | fashion_mnist/val | the majority training class for every image; the MLLM on a blank image |
| text-to-image | generated-image accuracy (the cached Fashion-MNIST classifier), KID (TF-Inception pool3) against real val images | the 10 class prompts | the MLLM's unconditional samples (CFG scale 0: the prompt is ignored); the tokenizer's reconstructions of real images (the ceiling the codes allow) |
| CFG sweep | generated-image accuracy per CFG scale, plotted | the 10 class prompts | |

The blank image is a uniform grey (0.5) image through the same tokenizer: the MLLM then sees valid codes that
carry no content, which is what "ignores the image" means for a model that always gets image positions.
Answers and captions are compared after the text tokenizer's round trip (``decode(encode(text))``: lowercased,
punctuation split), so a correct answer is never marked wrong for spacing.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastvq.eval.metrics import MetricResult

__all__ = ["CFG_SCALES", "CAPTION_SETS", "caption_eval", "qa_eval", "generate_images", "t2i_eval", "cfg_sweep",
           "evaluate_mllm", "quick_eval", "codes_of", "blank_codes", "normalize_text", "most_frequent",
           "images_grid_png", "cfg_sweep_png", "classifier_cached"]

CFG_SCALES = (1.0, 1.5, 3.0, 5.0)
CAPTION_SETS = ("emoji", "tuxpaint", "fashion_mnist")


def _codec(mllm):
    from fastvq.models.mllm import VisualCodec
    codec = getattr(mllm, "codec", None)
    return codec if codec is not None else VisualCodec.from_dict(mllm.config.codec)


def _text_tok(mllm):
    return mllm.text_tokenizer


def normalize_text(mllm, text: str) -> str:
    """``text`` after the MLLM's text tokenizer's round trip, stripped: how a generated answer is compared."""
    tt = _text_tok(mllm)
    return tt.decode(tt.encode(text)).strip()


def most_frequent(values: list[str]) -> str:
    """The most frequent string of ``values`` (ties: the smallest in sort order)."""
    if not values:
        raise ValueError("fastvq.eval.mllm.most_frequent: values must not be empty")
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def codes_of(tok, data: str, split: str, n: int, fingerprint: str | None = None, mllm=None) -> dict:
    """Codes, captions and labels of ``n`` fixed items of ``data``/``split`` through ``tok``, from the code cache
    (:func:`fastvq.train.mllm.encode_split`)."""
    from fastvq.models.mllm import VisualCodec
    from fastvq.train.mllm import encode_split
    codec = _codec(mllm) if mllm is not None else VisualCodec.from_tokenizer(tok)
    return encode_split(tok, codec, data, split, n, fingerprint=fingerprint, verbose=False)


@torch.no_grad()
def blank_codes(mllm, tok, n: int) -> Tensor:
    """The codes [n, L, G] of a uniform grey (0.5) image through ``tok``: a valid image without content."""
    cfg = tok.config
    x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)  # 0.5 in [0, 1] is 0 in [-1, 1]
    return _codec(mllm).encode(tok, x.to(next(tok.parameters()).device)).cpu().expand(n, -1, -1).clone()


@torch.no_grad()
def _generate_text(mllm, codes: Tensor, question: str | None, batch_size: int, max_new_tokens: int) -> list[str]:
    device = next(mllm.parameters()).device
    max_new_tokens = min(max_new_tokens, mllm.config.max_text_len + 1)  # the longest trained answer + [eos]
    out: list[str] = []
    for i in range(0, len(codes), batch_size):
        out += mllm.generate_text(codes[i:i + batch_size].to(device), question=question, max_new_tokens=max_new_tokens,
                                  temperature=0.0)
    return out


def caption_eval(mllm, codes: Tensor, references: list[str], split: str, batch_size: int = 64,
                 max_new_tokens: int = 24) -> dict:
    """Greedy captions of ``codes [N, L, G]`` scored against one reference each. Returns ``{"bleu4", "cider":
    MetricResult, "predictions": list[str]}``."""
    from fastvq.eval.captions import caption_scores
    if len(codes) != len(references) or not len(codes):
        raise ValueError(f"fastvq.eval.mllm.caption_eval: codes ({len(codes)}) and references ({len(references)}) "
                         "must be non-empty and of one length")
    preds = _generate_text(mllm, codes, None, batch_size, max_new_tokens)
    scores = caption_scores({i: p for i, p in enumerate(preds)}, {i: [r] for i, r in enumerate(references)},
                            backend="fastvq", split=split)
    return {**scores, "predictions": preds}


def _constant_caption_scores(caption: str, references: list[str], split: str) -> dict:
    from fastvq.eval.captions import caption_scores
    return caption_scores({i: caption for i in range(len(references))}, {i: [r] for i, r in enumerate(references)},
                          backend="fastvq", split=split)


def qa_eval(mllm, codes: Tensor, labels: np.ndarray, class_names: list[str], question: str, split: str,
            batch_size: int = 64) -> dict:
    """Exact-match accuracy of the greedy answers to ``question`` about ``codes [N, L, G]`` against the class
    names of ``labels [N]`` (both after the text round trip). Returns ``{"accuracy": MetricResult,
    "predictions": list[str]}``."""
    labels = np.asarray(labels)
    if len(codes) != len(labels) or not len(codes):
        raise ValueError(f"fastvq.eval.mllm.qa_eval: codes ({len(codes)}) and labels ({len(labels)}) must be "
                         "non-empty and of one length")
    preds = _generate_text(mllm, codes, question, batch_size, 8)
    want = [normalize_text(mllm, class_names[int(c)]) for c in labels]
    hits = [p.strip() == w for p, w in zip(preds, want)]
    acc = MetricResult("qa_accuracy", float(np.mean(hits)), len(hits), split,
                       dict(question=question, match="exact, after the text tokenizer's round trip", greedy=True))
    return {"accuracy": acc, "predictions": preds}


@torch.no_grad()
def generate_images(mllm, tok, prompts: list[str], cfg_scale: float = 3.0, seed: int = 0, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, batch_size: int = 32) -> Tensor:
    """Images [N, C, H, W] in [0, 1] generated for ``prompts`` (``MLLM.generate_images`` → the tokenizer's
    ``decode``), with a ``torch.Generator`` seeded by ``seed`` (batches drawn in order)."""
    device = next(mllm.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    codec, out = _codec(mllm), []
    for i in range(0, len(prompts), batch_size):
        codes = mllm.generate_images(prompts[i:i + batch_size], cfg_scale=cfg_scale, temperature=temperature,
                                     top_k=top_k, top_p=top_p, generator=g)
        out.append(((codec.decode(tok, codes).float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def _class_prompts(class_names: list[str], per_class: int) -> tuple[list[str], np.ndarray]:
    from fastvq.train.mllm import class_prompt
    labels = np.repeat(np.arange(len(class_names)), per_class)
    return [class_prompt(class_names[c]) for c in labels], labels


_INCEPTION = {}


def _inception():
    from fastvq.eval.networks import FIDInceptionV3
    if "net" not in _INCEPTION:
        _INCEPTION["net"] = FIDInceptionV3()
    return _INCEPTION["net"]


def _real_features(n: int, image_size: int) -> np.ndarray:
    from fastvq.data import load_dataset
    from fastvq.eval.networks import extract_features
    ds = load_dataset("fashion_mnist", "val", channels=3, image_size=image_size)
    pos = ds.fixed_subset(n, seed=0)
    return extract_features(_inception(), ds, key=f"fashion_mnist/val|mllm-kid|{image_size}|{n}", positions=pos)


def _kid(images: Tensor, n_real: int, split: str, settings: dict) -> MetricResult:
    from fastvq.eval.metrics import kid_from_features
    real = _real_features(n_real, images.shape[-1])
    fake = _inception().encode(images, 50).pooled.double().numpy()
    return kid_from_features(real, fake, n_subsets=100, subset_size=1000, split=split,
                             settings=dict(settings, feature_network="TF-Inception-v3 pool3", n_real=n_real))


def t2i_eval(mllm, tok, class_names: list[str], per_class: int = 4, cfg_scale: float = 3.0, seed: int = 0,
             kid_real_n: int = 0, prompt_dropped: bool = False, classifier=None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0) -> dict:
    """Text-to-image on the class prompts (``per_class`` samples each): generated-image accuracy by the cached
    Fashion-MNIST classifier and, with ``kid_real_n > 0``, KID against that many real fashion_mnist/val images.
    ``prompt_dropped``: samples of the unconditional prompt ``[bos] [boi]`` (CFG scale 0), scored against the class
    they would have been asked for (the prompt-free baseline: chance level if the model follows prompts). Returns
    ``{"accuracy", "kid"?: MetricResult, "images": [N, C, H, W] in [0, 1], "labels": [N]}``."""
    from fastvq.eval.classifier import generated_image_accuracy
    prompts, labels = _class_prompts(class_names, per_class)
    # unconditional: CFG scale 0 samples from the unconditional half alone (uncond + 0 · (cond - uncond))
    images = generate_images(mllm, tok, prompts, cfg_scale=0.0 if prompt_dropped else cfg_scale, seed=seed,
                             temperature=temperature, top_k=top_k, top_p=top_p)
    split = "fashion_mnist class prompts"
    acc = generated_image_accuracy(images, labels, classifier, split=split)
    acc.settings.update(cfg_scale=0.0 if prompt_dropped else cfg_scale, seed=seed, per_class=per_class,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        prompt="unconditional ([bos] [boi]: CFG scale 0)" if prompt_dropped else "class_prompt(name)")
    out = {"accuracy": acc, "images": images, "labels": labels}
    if kid_real_n > 0:
        out["kid"] = _kid(images, kid_real_n, split, dict(acc.settings))
    return out


def _reconstruction_ceiling(mllm, tok, per_class: int, kid_real_n: int, classifier=None) -> dict:
    """The classifier accuracy (and KID) of the tokenizer's reconstructions of real fashion_mnist/val images,
    ``per_class`` of each class: what generated images can reach through these codes."""
    from fastvq.data import load_dataset
    from fastvq.eval.classifier import generated_image_accuracy
    ds = load_dataset("fashion_mnist", "val", channels=3, image_size=tok.config.image_size)
    labels = ds.labels
    pos = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    codec = _codec(mllm)
    with torch.no_grad():
        x = ds.images(pos) * 2 - 1
        rec = ((codec.decode(tok, codec.encode(tok, x)).float() + 1) / 2).clamp(0, 1)
    split = "fashion_mnist/val reconstructions"
    out = {"accuracy": generated_image_accuracy(rec, labels[pos], classifier, split=split), "images": rec}
    if kid_real_n > 0:
        out["kid"] = _kid(rec, kid_real_n, split, dict(per_class=per_class))
    return out


def cfg_sweep(mllm, tok, class_names: list[str], scales=CFG_SCALES, per_class: int = 4, seed: int = 0,
              classifier=None) -> list[dict]:
    """Generated-image accuracy at each CFG scale (same seed, same prompts): ``[{"cfg_scale", "accuracy",
    "n"}]``."""
    rows = []
    for s in scales:
        r = t2i_eval(mllm, tok, class_names, per_class, float(s), seed, classifier=classifier)
        rows.append({"cfg_scale": float(s), "accuracy": r["accuracy"].value, "n": r["accuracy"].n})
    return rows


def cfg_sweep_png(curves: dict[str, list[dict]], path: Path, chance: float = 0.1,
                  ceiling: float | None = None) -> None:
    """Generated-image accuracy against the CFG scale, one line per model (``curves[label] = cfg_sweep rows``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for label, rows in curves.items():
        ax.plot([r["cfg_scale"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label)
    ax.axhline(chance, color="grey", ls=":", label="chance (0.1)")
    if ceiling is not None:
        ax.axhline(ceiling, color="black", ls="--", label="tokenizer reconstructions")
    ax.set_xlabel("CFG scale")
    ax.set_ylabel("generated-image accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def images_grid_png(images: Tensor, path: Path, ncol: int, scale: int = 2) -> None:
    """``images [N, C, H, W]`` in [0, 1] as a grid PNG of ``ncol`` columns (rows filled in order, a 2-pixel
    white gap), each pixel repeated ``scale`` times."""
    from PIL import Image
    if images.ndim != 4 or not len(images):
        raise ValueError(f"fastvq.eval.mllm.images_grid_png: images must be [N, C, H, W], got {tuple(images.shape)}")
    x = images.clamp(0, 1).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    nrow = math.ceil(n / ncol)
    grid = torch.ones(3, nrow * (h + 2), ncol * (w + 2))
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = x[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


def _available(name: str) -> str | None:
    """None when ``name`` loads, else why not (a missing package)."""
    from fastvq.data import MissingDependencyError, load_dataset
    try:
        load_dataset(name, "val")
        return None
    except MissingDependencyError as e:
        return str(e)


def _qa(mllm, tok, fm: dict, question: str, baselines: bool, train_labels, flat: dict, details: dict,
        samples: dict) -> None:
    from fastvq.data import load_dataset
    names = fm["class_names"]
    q = qa_eval(mllm, fm["codes"], fm["labels"], names, question, "fashion_mnist/val")
    flat["qa_accuracy"] = q["accuracy"].value
    details["qa"] = q["accuracy"].to_dict()
    samples["qa"] = [{"answer": names[int(c)], "prediction": p} for c, p in zip(fm["labels"][:8], q["predictions"][:8])]
    if baselines:
        labels = train_labels if train_labels is not None else load_dataset("fashion_mnist", "train").labels
        major = int(np.bincount(np.asarray(labels), minlength=len(names)).argmax())
        flat["qa_accuracy_majority"] = float(np.mean(fm["labels"] == major))
        details["qa_majority"] = MetricResult("qa_accuracy", flat["qa_accuracy_majority"], len(fm["labels"]),
                                              "fashion_mnist/val", dict(answer=names[major])).to_dict()
        blank = blank_codes(mllm, tok, 1)
        qb = qa_eval(mllm, blank.expand(len(fm["labels"]), -1, -1), fm["labels"], names, question, "fashion_mnist/val")
        flat["qa_accuracy_blank_image"] = qb["accuracy"].value
        details["qa_blank_image"] = dict(qb["accuracy"].to_dict(), answer=qb["predictions"][0])


def evaluate_mllm(mllm, tok, out_dir: Path | None = None, tag: str = "mllm", caption_sets=CAPTION_SETS,
                  caption_n: int = 64, qa_n: int = 200, per_class: int = 4, kid_real_n: int = 200,
                  cfg_scale: float = 3.0, cfg_scales=CFG_SCALES, question: str | None = None, seed: int = 0,
                  baselines: bool = True, train_captions: dict[str, list[str]] | None = None,
                  train_labels: np.ndarray | None = None, classifier=None, fingerprint: str | None = None,
                  qa: bool = True, t2i: bool = True, baseline_kid: bool = True) -> dict:
    """Every MLLM metric of the module docstring for one model, with the image-free baselines when ``baselines``.

    ``caption_n`` val items per caption set (sets whose packages are missing are skipped and named), ``qa_n``
    fashion_mnist/val items, ``per_class`` samples per class prompt, KID against ``kid_real_n`` real val images
    (0: no KID), the CFG sweep over ``cfg_scales`` (empty: none). ``train_captions`` / ``train_labels``: the
    training captions per set and the Fashion-MNIST training labels for the most-frequent baselines (default: the
    whole train splits). ``qa=False`` skips QA; ``t2i=False`` generates the class images without scoring them (no
    classifier); ``baseline_kid=False`` scores the baselines' images by accuracy only (KID costs ~0.5-1 s an image
    on 2 CPU cores). Returns a flat dict of numbers (``caption_<set>_bleu4``, ``qa_accuracy``, ``t2i_accuracy``,
    ``t2i_kid``, each baseline with a suffix: ``_most_frequent``, ``_majority``, ``_blank_image``,
    ``_unconditional``, ``_reconstruction``), ``cfg_sweep`` rows, ``samples`` and ``details`` (every MetricResult);
    with ``out_dir``: ``<tag>.json``, ``<tag>-t2i.png`` (a row per class, or one row of classes) and
    ``<tag>-cfg.png``."""
    from fastvq.data import load_dataset
    from fastvq.train.mllm import QA_QUESTION
    question = question or QA_QUESTION
    t0 = time.time()
    mllm.eval()
    flat: dict[str, Any] = {}
    details: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in caption_sets:
        why = _available(name)
        if why is not None:
            skipped[name] = why
            continue
        d = codes_of(tok, name, "val", caption_n, fingerprint, mllm)
        split = f"{name}/val"
        r = caption_eval(mllm, d["codes"], d["captions"], split)
        flat[f"caption_{name}_bleu4"], flat[f"caption_{name}_cider"] = r["bleu4"].value, r["cider"].value
        details[f"caption_{name}"] = {k: r[k].to_dict() for k in ("bleu4", "cider")}
        samples[f"caption_{name}"] = [{"reference": ref, "prediction": p}
                                      for ref, p in zip(d["captions"][:8], r["predictions"][:8])]
        if baselines:
            caps = (train_captions or {}).get(name) or load_dataset(name, "train").captions
            const = most_frequent(caps)
            b = _constant_caption_scores(const, d["captions"], split)
            flat[f"caption_{name}_bleu4_most_frequent"] = b["bleu4"].value
            flat[f"caption_{name}_cider_most_frequent"] = b["cider"].value
            details[f"caption_{name}_most_frequent"] = dict({k: b[k].to_dict() for k in b}, caption=const)
            blank = blank_codes(mllm, tok, len(d["captions"]))
            bl = caption_eval(mllm, blank, d["captions"], split)
            flat[f"caption_{name}_bleu4_blank_image"] = bl["bleu4"].value
            flat[f"caption_{name}_cider_blank_image"] = bl["cider"].value
            details[f"caption_{name}_blank_image"] = dict({k: bl[k].to_dict() for k in ("bleu4", "cider")},
                                                          caption=bl["predictions"][0])

    fm = codes_of(tok, "fashion_mnist", "val", qa_n if qa else 1, fingerprint, mllm)
    names = fm["class_names"]
    if qa:
        _qa(mllm, tok, fm, question, baselines, train_labels, flat, details, samples)
    ncol = per_class if per_class > 1 else len(names)
    if t2i:
        t = t2i_eval(mllm, tok, names, per_class, cfg_scale, seed, kid_real_n, classifier=classifier)
        flat["t2i_accuracy"] = t["accuracy"].value
        details["t2i"] = t["accuracy"].to_dict()
        if "kid" in t:
            flat["t2i_kid"] = t["kid"].value
            details["t2i_kid"] = t["kid"].to_dict()
        images = t["images"]
        if baselines:
            bkid = kid_real_n if baseline_kid else 0
            u = t2i_eval(mllm, tok, names, per_class, cfg_scale, seed, bkid, prompt_dropped=True,
                         classifier=classifier)
            flat["t2i_accuracy_unconditional"] = u["accuracy"].value
            details["t2i_unconditional"] = u["accuracy"].to_dict()
            if "kid" in u:
                flat["t2i_kid_unconditional"] = u["kid"].value
                details["t2i_kid_unconditional"] = u["kid"].to_dict()
            c = _reconstruction_ceiling(mllm, tok, per_class, bkid, classifier)
            flat["t2i_accuracy_reconstruction"] = c["accuracy"].value
            details["t2i_reconstruction"] = c["accuracy"].to_dict()
            if "kid" in c:
                flat["t2i_kid_reconstruction"] = c["kid"].value
                details["t2i_kid_reconstruction"] = c["kid"].to_dict()
        if cfg_scales:
            flat["cfg_sweep"] = cfg_sweep(mllm, tok, names, cfg_scales, per_class, seed, classifier)
            if out_dir is not None:
                cfg_sweep_png({tag: flat["cfg_sweep"]}, Path(out_dir) / f"{tag}-cfg.png")
    else:
        images = generate_images(mllm, tok, _class_prompts(names, per_class)[0], cfg_scale, seed) \
            if out_dir is not None else None
    if out_dir is not None:
        images_grid_png(images, Path(out_dir) / f"{tag}-t2i.png", ncol=ncol)
    flat["seconds"] = round(time.time() - t0, 1)
    flat["skipped"] = skipped
    flat["samples"] = samples
    flat["settings"] = dict(caption_n=caption_n, qa_n=qa_n, per_class=per_class, kid_real_n=kid_real_n,
                            cfg_scale=cfg_scale, cfg_scales=list(cfg_scales), question=question, seed=seed,
                            baseline_kid=baseline_kid,
                            text="greedy", image_sampling="temperature 1, no top-k / top-p",
                            blank_image="uniform 0.5 grey through the tokenizer",
                            most_frequent="the most frequent caption / class of the training items given "
                                          "(default: the set's train split)")
    flat["details"] = details
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{tag}.json").write_text(json.dumps(flat, indent=1, default=float) + "\n")
    return flat


def classifier_cached() -> bool:
    """Whether the Fashion-MNIST classifier of generated-image accuracy is cached (using it then costs no
    training)."""
    from fastvq.data._util import cache_dir, stable_hash
    from fastvq.eval.classifier import TRAIN_SETTINGS
    key = stable_hash("fashion_mnist_classifier", TRAIN_SETTINGS, 1)
    return (cache_dir() / "models" / f"fashion_mnist_classifier-{key}.npz").is_file()


def quick_eval(mllm, tok, datasets: list[str], n: int, out_dir: Path | None = None, tag: str = "eval",
               question: str | None = None, fingerprint: str | None = None) -> dict:
    """The trainer's in-loop evaluation (cheap: no KID, no baselines, no CFG sweep): caption BLEU-4 / CIDEr-D on
    ``n`` val items of each trained caption set, QA accuracy on ``n`` fashion_mnist/val items when Fashion-MNIST
    is trained on, and one image per class prompt at CFG 3 (``<tag>-t2i.png``, one row), with its accuracy when
    the classifier is cached (it is never trained here)."""
    return evaluate_mllm(mllm, tok, out_dir, tag, caption_sets=[d for d in datasets if d in CAPTION_SETS],
                         caption_n=n, qa_n=n, per_class=1, kid_real_n=0, cfg_scales=(), question=question,
                         baselines=False, fingerprint=fingerprint, qa="fashion_mnist" in datasets,
                         t2i=classifier_cached())
