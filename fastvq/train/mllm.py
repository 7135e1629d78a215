"""The MLLM trainer: a frozen visual tokenizer, its codes cached once, and one decoder trained on a mix of
text-to-image, captioning and question answering (docs/training.md, "Training and evaluating the MLLM").

    fastvq train mllm --tokenizer runs/main/unitok-tiny --data fashion_mnist,emoji --set steps=300

What a run does, in order:

1. load the tokenizer (a run, checkpoint or ``save_pretrained`` directory; its EMA weights when the checkpoint has
   them) and freeze it; :class:`fastvq.models.mllm.VisualCodec` reads its code layout;
2. :func:`encode_split`: encode every data set's train split (``train_n`` fixed items of it, 0: all) into visual
   codes once, cached as ``$FASTVQ_CACHE/codes/<data>-<split>-<key>.npz`` (``allow_pickle=False``), ``key`` a
   hash of the tokenizer's fingerprint (:func:`tokenizer_fingerprint`: its config and every weight), the data
   set, split, image size and item list. Training never runs the tokenizer;
3. the text tokenizer (:class:`fastvq.models.text.TextTokenizer`) from the training captions, class names and
   the QA question;
4. :class:`MLLMTrainer`, the tokenizer trainer's loop (:class:`fastvq.train.Trainer`: AdamW with warm-up +
   cosine, gradient accumulation, clipping, weight EMA, bf16, non-finite-step skipping, JSONL log, tqdm,
   atomic verified checkpoints with every RNG state, bit-identical resume, DDP under ``torchrun``) over
   micro-batches that hold every task (:class:`TaskStream`), plus ``fsdp=true``: FSDP2 (``fully_shard``) over
   the decoder's blocks instead of DDP.

A checkpoint is ``MLLM.save_pretrained``'s files (so ``MLLM.from_pretrained`` reads it) + ``tokenizer/`` (the
tokenizer's ``save_pretrained`` files with the weights the codes came from: the checkpoint alone generates and
captions) + the trainer's state files (``train_config.json``, ``state.json``, ``optim.safetensors``,
``rng.safetensors``, ``ema.safetensors``) + ``manifest.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fastvq.train.checkpoint import resolve_checkpoint, write_checkpoint
from fastvq.train.config import resume_mismatches
from fastvq.train.trainer import (Trainer, TrainingError, WeightEMA, _load_optimizer, _optimizer_tensors, _rank,
                                  _rng_state, _set_rng_state, _world, load_checkpoint_model, lr_at)

__all__ = ["MLLMTrainConfig", "MLLMTrainer", "TaskStream", "TASKS", "QA_QUESTION", "MLLM_RESUME_MUTABLE",
           "tokenizer_fingerprint", "encode_split", "load_tokenizer", "load_mllm", "build_text_tokenizer",
           "class_prompt", "task_counts", "loss_curve_png", "untrained_like"]

TASKS = ("t2i", "caption", "qa")
QA_QUESTION = "what is this?"
TOKENIZER_DIR = "tokenizer"


@dataclass
class MLLMTrainConfig:
    """Everything an MLLM run depends on; dumped as ``train_config.json`` beside every checkpoint.

    Model: ``tokenizer`` (the frozen visual tokenizer: a run, ``checkpoints/``, ``step-*`` or ``save_pretrained``
    directory; its EMA weights when it has them), ``preset`` (an MLLM preset, ``mllm-tiny``), ``model``
    (overrides of the preset's ``MLLMConfig`` fields), ``init_from`` (an MLLM checkpoint whose weights start the
    run; it must have been trained on the same tokenizer and text vocabulary).
    Data: ``data`` (comma-separated ``fastvq.data`` sets, each optionally ``name:n``:
    ``fashion_mnist:8192,emoji:1024,tuxpaint``; ``n`` fixed items of its train split, 0: all), ``train_n`` (the
    ``n`` of a set named without one); every task draws from the union of the sets, so a set's share of the
    training is its share of the items. ``text_min_count`` (a WordPiece piece enters the text
    vocabulary when it occurs this often in the corpus).
    Tasks: every micro-batch holds ``t2i_weight : caption_weight : qa_weight`` of its items per task
    (:func:`task_counts`): text-to-image on the captions, captioning, and question answering (``qa_question`` →
    the class name) on the sets with class labels. Classifier-free guidance: the MLLM config's ``cfg_dropout``
    (the prompt of a text-to-image item is dropped with that probability, decided per item from ``seed`` and the
    item's place in the run, so ranks and resumes agree).
    Optimisation: as :class:`fastvq.train.TrainConfig` (``steps``, global ``batch_size`` items, ``grad_accum``,
    AdamW ``lr`` / ``betas`` / ``weight_decay`` on >= 2-D weights, ``warmup_steps`` + cosine to
    ``min_lr_ratio · lr``, ``grad_clip``, ``ema_decay`` (0: off), ``precision`` fp32 / bf16, ``seed``);
    ``fsdp`` (under torchrun: FSDP2 ``fully_shard`` of every decoder block and the model, instead of DDP).
    Evaluation: at the end (and every ``eval_every`` steps) on ``eval_n`` validation items per task, one sample
    image per Fashion-MNIST class (``fastvq.eval.mllm``). Logging and checkpoints: as TrainConfig.
    """

    tokenizer: str = ""
    preset: str = "mllm-tiny"
    model: dict[str, Any] = field(default_factory=dict)
    init_from: str = ""
    data: str = "fashion_mnist"
    train_n: int = 0
    text_min_count: int = 1
    t2i_weight: float = 0.5
    caption_weight: float = 0.25
    qa_weight: float = 0.25
    qa_question: str = QA_QUESTION
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    precision: str = "fp32"
    fsdp: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_n: int = 32
    log_every: int = 10
    ckpt_every: int = 0
    keep_last: int = 3
    max_nan_steps: int = 10
    out: str = "runs/mllm"

    def validate(self) -> None:
        who = "MLLMTrainConfig"
        if not self.tokenizer:
            raise ValueError(f"{who}: tokenizer must name the frozen tokenizer's checkpoint (--tokenizer CKPT)")
        for name in ("steps", "batch_size", "grad_accum", "eval_n", "log_every", "keep_last", "text_min_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{who}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "max_nan_steps", "train_n"):
            if getattr(self, name) < 0:
                raise ValueError(f"{who}: {name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"{who}: batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"{who}: precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{who}: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{who}: lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        weights = self.task_weights()
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"{who}: task weights must be >= 0 with a positive sum, got {weights}")
        if not self.datasets():
            raise ValueError(f"{who}: data must name at least one data set, got {self.data!r}")
        if self.qa_weight > 0 and not self.qa_question.strip():
            raise ValueError(f"{who}: qa_question must not be empty when qa_weight > 0")

    def data_items(self) -> list[tuple[str, int]]:
        """``[(data set, items of its train split (0: all))]`` from ``data`` and ``train_n``."""
        out = []
        for part in (d.strip() for d in self.data.split(",")):
            if not part:
                continue
            name, sep, n = part.partition(":")
            try:
                count = int(n) if sep else self.train_n
            except ValueError:
                raise ValueError(f"MLLMTrainConfig: data entry {part!r} must be name or name:n (n an int)") from None
            if count < 0:
                raise ValueError(f"MLLMTrainConfig: data entry {part!r}: n must be >= 0")
            out.append((name.strip(), count))
        return out

    def datasets(self) -> list[str]:
        return [name for name, _ in self.data_items()]

    def task_weights(self) -> dict[str, float]:
        return {"t2i": self.t2i_weight, "caption": self.caption_weight, "qa": self.qa_weight}

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], who: str = "MLLMTrainConfig.from_dict") -> MLLMTrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{who}: unknown MLLMTrainConfig fields {unknown}")
        return cls(**{k: tuple(v) if k == "betas" else v for k, v in data.items()})


# Fields that may change when a run resumes (how long it runs and what it writes, not what it computes).
MLLM_RESUME_MUTABLE = frozenset({"steps", "out", "eval_every", "eval_n", "log_every", "ckpt_every", "keep_last",
                                 "max_nan_steps", "tokenizer"})


# ---- the frozen tokenizer and its code cache ---------------------------------------------------------------------

def load_tokenizer(path: str | Path):
    """The frozen visual tokenizer at ``path`` (a training run or checkpoint: its EMA weights when present; or a
    ``save_pretrained`` directory), in eval mode with ``requires_grad`` off."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"fastvq train mllm: tokenizer checkpoint {path} does not exist")
    tok = load_checkpoint_model(path, ema=True).eval()
    for p in tok.parameters():
        p.requires_grad_(False)
    return tok


def tokenizer_fingerprint(tok) -> str:
    """sha256 (hex, 16 characters) of the tokenizer's model name, config and every state-dict tensor (name, dtype,
    shape, bytes): the identity of the codes it produces. Any change to a weight, a buffer or the config changes
    it, so a cache of codes can never be read with another tokenizer."""
    from fastvq.models.tokenizer import config_to_dict
    h = hashlib.sha256()
    h.update(json.dumps({"model": tok.model_name, "config": config_to_dict(tok.config)}, sort_keys=True).encode())
    for k, v in sorted(tok.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    from fastvq.data import cache_dir
    return cache_dir() / "codes"


def _fixed_positions(n_items: int, n: int) -> np.ndarray:
    """The first ``n`` items of a fixed permutation (seed 0) of a split, in that order; all (in order) when n is 0
    or covers the split: the same list as ``ImageCaptionDataset.fixed_subset``."""
    if n <= 0 or n >= n_items:
        return np.arange(n_items, dtype=np.int64)
    return np.random.default_rng(0).permutation(n_items)[:n].astype(np.int64)


@torch.no_grad()
def encode_split(tok, codec, data: str, split: str, n: int = 0, batch_size: int = 256, fingerprint: str | None = None,
                 verbose: bool = True) -> dict:
    """The visual codes of ``n`` fixed items of ``data``/``split`` (0: all), encoded once by the frozen ``tok`` and
    cached. Returns ``{"codes": int64 Tensor [N, L, G], "captions": list[str], "labels": int64 [N] (-1: none),
    "class_names": list[str], "positions": int64 [N] (positions in the split), "cache": Path, "cached": bool}``.

    The cache file ``$FASTVQ_CACHE/codes/<data>-<split>-<key>.npz`` holds ``codes`` (int32), ``positions`` and
    ``key`` (the string that was hashed: the tokenizer's fingerprint, the codec, data set, split, image size and
    item count); it is read with ``allow_pickle=False`` and used only when its key matches, so a changed
    tokenizer re-encodes."""
    from fastvq.data import load_dataset
    from fastvq.data._util import load_npz, save_npz, stable_hash
    cfg = tok.config
    ds = load_dataset(data, split, channels=cfg.in_channels, image_size=cfg.image_size)
    pos = _fixed_positions(len(ds), n)
    if len(pos) == 0:
        raise ValueError(f"fastvq.train.mllm.encode_split: {data}/{split} is empty")
    fp = fingerprint or tokenizer_fingerprint(tok)
    key = json.dumps({"tokenizer": fp, "codec": codec.to_dict(), "data": data, "split": split,
                      "image_size": cfg.image_size, "channels": cfg.in_channels, "n": int(len(pos)),
                      "positions": stable_hash([int(p) for p in pos])}, sort_keys=True)
    path = _cache_root() / f"{data}-{split}-{stable_hash(key)}.npz"
    z = load_npz(path, ("codes", "positions", "key"), "fastvq.train.mllm.encode_split")
    cached = z is not None and str(z["key"]) == key and z["codes"].shape[0] == len(pos)
    if cached:
        codes = torch.from_numpy(z["codes"].astype(np.int64))
    else:
        device = next(tok.parameters()).device
        chunks = []
        it = range(0, len(pos), batch_size)
        if verbose and _rank() == 0:
            print(f"fastvq train mllm: encoding {len(pos)} {data}/{split} images with the frozen {tok.model_name} "
                  f"(cached in {path})", file=sys.stderr)
        for i in it:
            x = ds.images(pos[i:i + batch_size]).to(device) * 2 - 1
            chunks.append(codec.encode(tok, x).cpu())
        codes = torch.cat(chunks).to(torch.int64)
        if _rank() == 0:  # every rank computes the same codes; one writes (atomically)
            save_npz(path, {"codes": codes.numpy().astype(np.int32), "positions": pos, "key": np.array(key)})
    captions = ds.captions
    return {"codes": codes, "captions": [captions[p] for p in pos], "labels": ds.labels[pos].astype(np.int64),
            "class_names": list(ds.class_names), "positions": pos, "cache": path, "cached": cached}


def class_prompt(name: str) -> str:
    """The text-to-image prompt of a Fashion-MNIST class: its training caption template 0 ("A photo of a
    sneaker."), so prompts are in the training distribution."""
    from fastvq.data.sources import FASHION_MNIST_TEMPLATES, _with_article
    t = FASHION_MNIST_TEMPLATES[0].format(_with_article(name))
    return t[0].upper() + t[1:]


def build_text_tokenizer(corpus: list[str], min_count: int = 1):
    """The pruned MiniLM WordPiece vocabulary of ``corpus`` (``fastvq.models.text.TextTokenizer.from_corpus``)."""
    from fastvq.models.text import TextTokenizer
    return TextTokenizer.from_corpus(corpus, min_count=min_count)


# ---- the task mix --------------------------------------------------------------------------------------------------

def task_counts(micro_batch: int, weights: dict[str, float]) -> dict[str, int]:
    """Items per task in a micro-batch of ``micro_batch``: proportional to ``weights`` by the largest remainder
    (ties: the order of :data:`TASKS`), every task of positive weight at least one item when there is room."""
    active = [t for t in TASKS if weights.get(t, 0) > 0]
    total = sum(weights[t] for t in active)
    exact = {t: micro_batch * weights[t] / total for t in active}
    counts = {t: int(exact[t]) for t in active}
    for t in sorted(active, key=lambda t: (-(exact[t] - counts[t]), TASKS.index(t)))[:micro_batch - sum(counts.values())]:
        counts[t] += 1
    for t in active:  # a task with a small weight still appears in every micro-batch
        if counts[t] == 0:
            donor = max(active, key=lambda s: counts[s])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[t] = 1
    return {t: c for t, c in counts.items() if c > 0}


def _seed_of(*parts) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:15], 16)


@dataclass
class TaskStream:
    """Deterministic task-mixed micro-batches: micro-batch ``m`` is a pure function of ``m`` (a resumed run reads
    what the uninterrupted one would have, and the ranks of one micro-batch together read what one process would).

    ``pools[task] = (codes [N, L, G], texts: list[str])``: the items of the task (answers for ``qa``). Micro-batch
    ``m`` holds ``counts[task]`` items of each task (global, over ranks); task ``t``'s ``j``-th slice is cut from
    epoch ``e`` of its own permutation (a generator seeded by ``(seed, t, e)``), the tail that does not fill one
    slice dropped, and rank ``r`` reads the ``r``-th contiguous part of every slice. ``drop[m]``: which text-to-image
    items of micro-batch ``m`` have their prompt dropped (probability ``cfg_dropout``, uniforms from a generator
    seeded by ``(seed, "cfg", m)`` over the global slice)."""

    pools: dict[str, tuple[Tensor, list[str]]]
    counts: dict[str, int]
    seed: int
    rank: int
    world: int
    cfg_dropout: float = 0.0

    def __post_init__(self):
        self.per_epoch = {}
        for task, c in self.counts.items():
            if c % self.world:
                raise ValueError(f"fastvq train mllm: {c} {task} items per micro-batch (task weights x batch_size / "
                                 f"grad_accum) must be a multiple of the {self.world} processes; change the weights "
                                 "or batch_size")
            n = len(self.pools[task][1])
            if n < c:
                raise ValueError(f"fastvq train mllm: the {task} task has {n} items, fewer than the {c} of one "
                                 "micro-batch")
            self.per_epoch[task] = n // c
        self._perms: dict[tuple[str, int], np.ndarray] = {}

    def position(self, m: int) -> dict:
        return {"micro_batches": m, **{f"{t}_epoch": m // self.per_epoch[t] for t in self.counts}}

    def get(self, m: int) -> dict[str, dict]:
        """Micro-batch ``m``: ``{task: {"codes": [b, L, G], "texts": [b] str, "drop": [b] bool (t2i)}}`` for this
        rank."""
        out = {}
        for task, c in self.counts.items():
            epoch, j = divmod(m, self.per_epoch[task])
            codes, texts = self.pools[task]
            key = (task, epoch)
            if key not in self._perms:
                self._perms = {k: v for k, v in self._perms.items() if k[0] != task}  # one epoch per task in memory
                g = torch.Generator().manual_seed(_seed_of(self.seed, task, epoch))
                self._perms[key] = torch.randperm(len(texts), generator=g).numpy()
            local = c // self.world
            start = j * c + self.rank * local
            pos = self._perms[key][start:start + local]
            item = {"codes": codes[torch.from_numpy(pos)], "texts": [texts[p] for p in pos]}
            if task == "t2i":
                u = torch.rand(c, generator=torch.Generator().manual_seed(_seed_of(self.seed, "cfg", m)))
                item["drop"] = (u < self.cfg_dropout)[self.rank * local:(self.rank + 1) * local]
            out[task] = item
        return out


# ---- the model and its checkpoints ------------------------------------------------------------------------------------

def _build_mllm(cfg: MLLMTrainConfig, codec, text_tok):
    from fastvq.models.mllm import MLLM
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.items()}
    return MLLM.from_preset(cfg.preset, codec=codec, text_tokenizer=text_tok, **overrides)


def load_mllm(path: str | Path, ema: bool = True, map_location: str = "cpu"):
    """``(mllm, tokenizer)`` from an MLLM training checkpoint (a run, ``checkpoints/`` or ``step-*`` directory: the
    EMA weights when ``ema`` and present) or an ``MLLM.save_pretrained`` directory, with the tokenizer stored in
    its ``tokenizer/`` subdirectory (checked against the MLLM: ``MLLM.check_tokenizer``). Both in eval mode."""
    from safetensors.torch import load_file

    from fastvq.models import from_pretrained
    from fastvq.models.mllm import MLLM
    path = Path(path)
    who = "fastvq.train.mllm.load_mllm"
    if not path.exists():
        raise FileNotFoundError(f"{who}: MLLM checkpoint {path} does not exist")
    direct = (path / "config.json").is_file() and not (path / "manifest.json").is_file()
    ckpt = path if direct else resolve_checkpoint(path)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{who}: {ckpt} holds no MLLM (config.json missing)")
    model = MLLM.from_pretrained(ckpt, map_location)
    if ema and (ckpt / "ema.safetensors").is_file():
        model.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(map_location)))
    if not (ckpt / TOKENIZER_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{who}: {ckpt} has no {TOKENIZER_DIR}/ directory (the visual tokenizer the MLLM was "
                                "trained on); copy its save_pretrained directory there")
    tok = from_pretrained(ckpt / TOKENIZER_DIR, map_location).eval()
    model.check_tokenizer(tok)
    return model.eval(), tok


def loss_curve_png(history: list[dict], path: Path, title: str) -> None:
    """The logged training loss and every task's loss against the step, log scale, as a PNG."""
    import math

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
    for key in ("loss", "t2i_loss", "t2i_image_loss", "caption_loss", "qa_loss"):
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


def untrained_like(mllm, seed: int = 0):
    """A freshly initialised MLLM of ``mllm``'s config and text tokenizer, from ``torch.manual_seed(seed)`` (what
    a run with that seed starts from): the untrained baseline of the evaluation. The global RNG is restored."""
    from fastvq.models.mllm import MLLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLLM(mllm.config, mllm.text_tokenizer)
    return model.to(next(mllm.parameters()).device).eval()


class _TaskMix(nn.Module):
    """One forward over every task of a micro-batch (so DDP sees one forward per backward): the loss is
    ``Σ_task weight_task · loss_task`` (the trainer's weights: the task's share of the items, rescaled to the
    step's token mean). The logged terms are the tasks' own (unweighted) losses."""

    def __init__(self, mllm: nn.Module):
        super().__init__()
        self.mllm = mllm

    def forward(self, batches: list[tuple[str, dict, float]]) -> dict[str, Tensor]:
        total, terms = None, {}
        for task, batch, share in batches:
            out = self.mllm(batch)
            total = share * out["loss"] if total is None else total + share * out["loss"]
            terms[f"{task}_loss"] = out["loss"].detach()
            if task == "t2i":  # its text term is the [eoi] prediction; captions and answers are all text
                terms["t2i_image_loss"] = out["image_loss"]
        terms["loss"] = total
        return terms


def _copy_writer(src: Path):
    def write(p: Path) -> None:
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, p)
    return write


# ---- the trainer -------------------------------------------------------------------------------------------------

class MLLMTrainer(Trainer):
    """``MLLMTrainer(MLLMTrainConfig(tokenizer=..., ...), resume=None).train()``: the tokenizer trainer's loop
    (:meth:`fastvq.train.Trainer.train`: logging, evaluation and checkpoint cadence, NaN skipping) with an MLLM,
    cached codes and the task mix. Under ``torchrun``: DDP, or FSDP2 with ``fsdp=true``."""

    def __init__(self, config: MLLMTrainConfig, resume: str | None = None, progress: bool | None = None):
        config.validate()
        self.cfg = cfg = config
        self._init_distributed()
        self.rank, self.world = _rank(), _world()
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.progress = (os.environ.get("FASTVQ_PROGRESS", "1") != "0") if progress is None else progress

        resume_dir = self._resume_dir(resume)
        if resume_dir is not None:
            saved = MLLMTrainConfig.from_dict(json.loads((resume_dir / "train_config.json").read_text()))
            diff = resume_mismatches(saved, cfg, MLLM_RESUME_MUTABLE)
            if diff:
                raise TrainingError(f"fastvq train mllm --resume: {resume_dir} was trained with another configuration: "
                                    f"{'; '.join(diff)}. Resume with the same settings (only "
                                    f"{sorted(MLLM_RESUME_MUTABLE)} may change), or start a new run with another --out")
        from fastvq.data import DATASETS
        for name in cfg.datasets():
            if name not in DATASETS:
                raise ValueError(f"fastvq train mllm: unknown data set {name!r}; known: {list(DATASETS)} (docs/data.md)")

        from fastvq.models.mllm import VisualCodec
        # the tokenizer: from the resumed checkpoint's copy when resuming (the codes must not change under a run)
        tok_path = resume_dir / TOKENIZER_DIR if resume_dir is not None else cfg.tokenizer
        self.tokenizer = load_tokenizer(tok_path).to(self.device)
        self.codec = VisualCodec.from_tokenizer(self.tokenizer)
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        if resume_dir is None and (self.ckpt_root / "latest").exists():
            raise TrainingError(f"fastvq train mllm: {self.out} already holds checkpoints; pass --resume to continue "
                                "that run, or another --out")

        # codes of every training set (rank 0 encodes and caches first; the others then read the cache)
        if self.world > 1 and self.rank != 0:
            dist.barrier()
        self.train_sets = {name: encode_split(self.tokenizer, self.codec, name, "train", n,
                                              fingerprint=self.tokenizer_fingerprint) for name, n in cfg.data_items()}
        if self.world > 1 and self.rank == 0:
            dist.barrier()
        if resume_dir is not None:  # the vocabulary the weights were trained with
            from fastvq.models.text import TextTokenizer
            self.text_tokenizer = TextTokenizer.load(resume_dir)
        else:
            corpus = [c for s in self.train_sets.values() for c in s["captions"]]
            corpus += [n for s in self.train_sets.values() for n in s["class_names"]] + [cfg.qa_question]
            self.text_tokenizer = build_text_tokenizer(corpus, cfg.text_min_count)

        torch.manual_seed(cfg.seed)  # the same initialisation on every rank
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = _build_mllm(cfg, self.codec, self.text_tokenizer).to(self.device)
        self.model.check_tokenizer(self.tokenizer)
        if cfg.init_from:
            init, _ = load_mllm(cfg.init_from, ema=True)
            if init.config != self.model.config:
                raise ValueError(f"fastvq train mllm: init_from {cfg.init_from} has another MLLM config (tokenizer, "
                                 "text vocabulary or size); train it on the same tokenizer, data and preset")
            self.model.load_state_dict(init.state_dict())
        self.image_size = self.tokenizer.config.image_size
        self.vqs, self.gan, self.disc_opt = [], None, None

        self.stream = self._build_stream()
        self.fsdp = cfg.fsdp and self.world > 1
        if self.fsdp:
            self._shard()
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None

        self.mix = _TaskMix(self.model)
        self.ddp = None
        if self.world > 1 and not self.fsdp:
            # find_unused_parameters: a task of weight 0 leaves its heads unused
            self.ddp = nn.parallel.DistributedDataParallel(
                self.mix, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True)
        self.forward = self.ddp if self.ddp is not None else self.mix

        self.step = 0
        self.nan_steps = 0
        self.history: list[dict] = []
        if resume_dir is not None:
            self._load(resume_dir)

    # ---- set-up ------------------------------------------------------------------------------------------------

    def _build_stream(self) -> TaskStream:
        cfg = self.cfg
        weights = cfg.task_weights()
        pools: dict[str, tuple[list[Tensor], list[str]]] = {t: ([], []) for t in TASKS}
        for s in self.train_sets.values():
            pools["t2i"][0].append(s["codes"])
            pools["t2i"][1].extend(s["captions"])
            pools["caption"][0].append(s["codes"])
            pools["caption"][1].extend(s["captions"])
            if s["class_names"] and (s["labels"] >= 0).all():
                pools["qa"][0].append(s["codes"])
                pools["qa"][1].extend(s["class_names"][int(c)] for c in s["labels"])
        if weights["qa"] > 0 and not pools["qa"][1]:
            raise ValueError(f"fastvq train mllm: qa_weight={cfg.qa_weight} but none of {cfg.datasets()} has class "
                             "labels (fashion_mnist, tuxpaint do); set qa_weight=0")
        counts = task_counts(cfg.batch_size // cfg.grad_accum, weights)
        self.task_shares = {t: c / (cfg.batch_size // cfg.grad_accum) for t, c in counts.items()}
        merged = {t: (torch.cat(pools[t][0]), pools[t][1]) for t in counts}
        return TaskStream(merged, counts, cfg.seed, self.rank, self.world,
                          float(getattr(self.model.config, "cfg_dropout", 0.0)))

    def _shard(self) -> None:
        """FSDP2: the attention and the SwiGLU of every decoder block (of the LLM and of the depth head) each its own
        unit (parameters all-gathered for its forward and backward, gradients reduce-scattered after), the rest
        (embeddings, norms, adapter, heads) in the root unit. The units are the modules that are *called*:
        ``llm.Decoder.forward`` calls ``blk.attention`` and ``blk.feed_forward`` directly, never ``Block.__call__``,
        so a ``Block`` unit would never be gathered."""
        from torch.distributed.fsdp import fully_shard

        from fastvq.models.llm import Block
        for m in list(self.model.modules()):
            if isinstance(m, Block):
                fully_shard(m.attention)
                fully_shard(m.feed_forward)
        fully_shard(self.model)

    # ---- one optimizer step --------------------------------------------------------------------------------------

    def _collate(self, micro: dict[str, dict]) -> list[tuple[str, dict, float]]:
        cfg, out = self.cfg, []
        for task, item in micro.items():
            texts = item["texts"]
            if task == "t2i":
                batch = self.model.collate(item["codes"], texts, "t2i", drop_prompt=item["drop"])
            elif task == "caption":
                batch = self.model.collate(item["codes"], texts, "caption")
            else:
                batch = self.model.collate(item["codes"], texts, "qa", questions=[cfg.qa_question] * len(texts))
            batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            out.append((task, batch, self.task_shares[task]))
        return out

    def _train_step(self) -> dict | None:
        """One optimizer step; the logged terms (means over micro-batches and ranks), or None when skipped.

        Every task's loss is a mean over its supervised tokens, and captions / answers have different lengths, so
        a rank's (or a micro-batch's) mean is not the step's: each task's loss is rescaled by ``n_local · world ·
        grad_accum / n_step`` (``n`` its supervised text tokens, ``n_step`` summed over the step's micro-batches and
        ranks by one all-reduce), which makes the averaged gradient that of the token mean over the whole global
        batch, what one process with ``grad_accum=1`` computes (t2i items all carry the same count: factor 1)."""
        from fastvq.models.mllm import IGNORE
        cfg, step = self.cfg, self.step
        lr = lr_at(step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        micros = [self._collate(self.stream.get(step * cfg.grad_accum + i)) for i in range(cfg.grad_accum)]
        tasks = [t for t, _, _ in micros[0]]
        local = torch.tensor([[float((b["text_targets"] != IGNORE).sum()) for _, b, _ in mb] for mb in micros],
                             dtype=torch.float64)                          # [grad_accum, tasks]
        total = local.sum(0)
        if self.world > 1:
            dist.all_reduce(total)
        scale = local * (self.world * cfg.grad_accum) / total.clamp_min(1)
        sums: dict[str, float] = {}
        for micro, batches in enumerate(micros):
            batches = [(t, b, share * float(scale[micro, tasks.index(t)])) for t, b, share in batches]
            last = micro == cfg.grad_accum - 1
            if self.ddp is not None and not last:
                sync = self.ddp.no_sync()
            else:
                sync = contextlib.nullcontext()
                if self.fsdp:
                    self.model.set_requires_gradient_sync(last)
            with sync:
                with amp:
                    terms = self.forward(batches)
                    loss = terms.pop("loss")
                if not self._all_finite(loss):
                    return None
                (loss / cfg.grad_accum).backward()
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / cfg.grad_accum
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = (nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.zeros(()))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        sums.update(lr=lr, grad_norm=float(grad_norm))
        return sums

    # ---- full (unsharded) states on rank 0 -----------------------------------------------------------------------

    def _full_model_state(self, ema: bool) -> dict[str, Tensor] | None:
        """The model's (or its EMA's) full state dict on CPU: on rank 0 (``None`` elsewhere under FSDP, where every
        rank must call it: the shards are gathered)."""
        ctx = self.ema.applied(self.model) if (ema and self.ema is not None) else contextlib.nullcontext()
        with ctx:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
                sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
                return {k: v.clone() for k, v in sd.items()} if self.rank == 0 else None
            return {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}

    def _full_optimizer_state(self) -> tuple[dict[str, Tensor], dict] | None:
        if not self.fsdp:
            return _optimizer_tensors(self.opt, "opt")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        sd = get_optimizer_state_dict(self.model, self.opt, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
        if self.rank != 0:
            return None
        tensors = {f"opt.{name}.{k}": v.contiguous() for name, st in sd["state"].items() for k, v in st.items()
                   if isinstance(v, Tensor)}
        scalars = {f"{name}.{k}": v for name, st in sd["state"].items() for k, v in st.items()
                   if not isinstance(v, Tensor)}
        return tensors, {"param_groups": json.loads(json.dumps(sd["param_groups"])), "scalars": scalars,
                         "format": "fqn"}

    def eval_model(self):
        """A plain (unsharded) copy of the model with the evaluation weights (EMA when kept), on rank 0; every rank
        must call it under FSDP."""
        state = self._full_model_state(ema=True)
        if self.rank != 0:
            return None
        model = _build_mllm(self.cfg, self.codec, self.text_tokenizer).to(self.device)
        model.load_state_dict(state)
        return model.eval()

    # ---- evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """In-loop evaluation on rank 0 (``fastvq.eval.mllm.quick_eval``: QA accuracy, caption BLEU-4/CIDEr-D on
        ``eval_n`` validation items, one generated image per Fashion-MNIST class as a PNG) with the EMA weights when
        kept; the loss curve as a PNG. Consumes no training RNG."""
        result: dict = {}
        model = self.eval_model()
        if self.rank == 0:
            from fastvq.eval.mllm import quick_eval
            with torch.random.fork_rng(devices=[]):
                result = quick_eval(model, self.tokenizer, self.cfg.datasets(), self.cfg.eval_n,
                                    self.out / "eval", f"step-{self.step:06d}", question=self.cfg.qa_question,
                                    fingerprint=self.tokenizer_fingerprint)
            result["weights"] = "ema" if self.ema is not None else "training"
            self._log({"step": self.step, "eval": {k: v for k, v in result.items() if not isinstance(v, (dict, list))}})
            loss_curve_png(self.history, self.out / "eval" / "loss_curve.png", f"{self.cfg.preset}: training loss")
        if self.world > 1:
            dist.barrier()
        return result

    # ---- checkpoints -----------------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; under FSDP every rank takes part in gathering)."""
        from safetensors.torch import save_file
        rng = _rng_state()
        all_rng = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        weights = self._full_model_state(ema=False)
        ema = self._full_model_state(ema=True) if self.ema is not None else None
        opt = self._full_optimizer_state()
        path = None
        if self.rank == 0:
            opt_tensors, opt_meta = opt
            state = {"step": self.step, "world_size": self.world, "nan_steps": self.nan_steps,
                     "data": self.stream.position(self.step * self.cfg.grad_accum),
                     "scheduler": {"kind": "warmup_cosine", "step": self.step, "lr": lr_at(self.step, self.cfg)},
                     "optimizer": opt_meta, "ema_updates": self.ema.updates if self.ema is not None else None,
                     "rng": [{"numpy": r["numpy"], "python": r["python"]} for r in all_rng],
                     "model_class": "MLLM", "preset": self.cfg.preset, "fsdp": self.fsdp,
                     "tokenizer_fingerprint": self.tokenizer_fingerprint,
                     "code_caches": {n: str(s["cache"]) for n, s in self.train_sets.items()}}
            rng_tensors = {f"rank{r}.{k}": v for r, rs in enumerate(all_rng) for k, v in rs["tensors"].items()}
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out))
            try:
                plain = _build_mllm(self.cfg, self.codec, self.text_tokenizer)
                plain.load_state_dict(weights)
                plain.save_pretrained(staging / "mllm")
                self.tokenizer.save_pretrained(staging / TOKENIZER_DIR)
                writers = {p.name: _copy_writer(p) for p in sorted((staging / "mllm").iterdir())}
                writers.update({f"{TOKENIZER_DIR}/{p.name}": _copy_writer(p)
                                for p in sorted((staging / TOKENIZER_DIR).iterdir())})
                writers.update({
                    "train_config.json": lambda p: p.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n"),
                    "state.json": lambda p: p.write_text(json.dumps(state, indent=1) + "\n"),
                    "optim.safetensors": lambda p: save_file(opt_tensors, str(p)),
                    "rng.safetensors": lambda p: save_file(rng_tensors, str(p)),
                })
                if ema is not None:
                    writers["ema.safetensors"] = lambda p: save_file(ema, str(p))
                path = write_checkpoint(self.ckpt_root, self.step, writers, self.cfg.keep_last)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        return path

    def _load(self, ckpt: Path) -> None:
        from safetensors.torch import load_file
        state = json.loads((ckpt / "state.json").read_text())
        if state["world_size"] != self.world:
            raise TrainingError(f"fastvq train mllm --resume: {ckpt} was written by {state['world_size']} processes, "
                                f"this run has {self.world}; resume with the same number (its data order and RNG "
                                "states are per rank)")
        if state.get("model_class") != "MLLM":
            raise TrainingError(f"fastvq train mllm --resume: {ckpt} is not an MLLM checkpoint "
                                f"(it holds a {state.get('model_class')})")
        if state.get("fsdp", False) != self.fsdp:
            raise TrainingError(f"fastvq train mllm --resume: {ckpt} was written with fsdp={state.get('fsdp')}, "
                                f"this run has fsdp={self.fsdp}")
        weights = load_file(str(ckpt / "model.safetensors"))
        tensors = load_file(str(ckpt / "optim.safetensors"))
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True)
            if self.ema is not None:  # the EMA first, through the model, then the training weights over it
                set_model_state_dict(self.model, load_file(str(ckpt / "ema.safetensors")), options=opts)
                self.ema.shadow = {k: v.detach().clone().float() if k in self.ema.params else v.detach().clone()
                                   for k, v in self.model.state_dict().items()}
                self.ema.updates = state["ema_updates"]
            set_model_state_dict(self.model, weights, options=opts)
            meta = state["optimizer"]
            opt_state: dict[str, dict] = {}
            for key, v in tensors.items():
                name, k = key[len("opt."):].rsplit(".", 1)
                opt_state.setdefault(name, {})[k] = v
            for key, v in meta["scalars"].items():
                name, k = key.rsplit(".", 1)
                opt_state.setdefault(name, {})[k] = v
            groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
            set_optimizer_state_dict(self.model, self.opt, {"state": opt_state, "param_groups": groups}, options=opts)
        else:
            self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=True)
            _load_optimizer(self.opt, tensors, state["optimizer"], "opt")
            if self.ema is not None:
                shadow = load_file(str(ckpt / "ema.safetensors"), device=str(self.device))
                if set(shadow) != set(self.ema.shadow):
                    raise TrainingError(f"fastvq train mllm --resume: {ckpt}/ema.safetensors does not match the "
                                        "model's keys")
                self.ema.shadow = {k: v.float() if k in self.ema.params else v for k, v in shadow.items()}
                self.ema.updates = state["ema_updates"]
        rng = load_file(str(ckpt / "rng.safetensors"))
        mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{self.rank}.")}
        _set_rng_state(mine, state["rng"][self.rank])
        self.step, self.nan_steps = state["step"], state["nan_steps"]
        if self.rank == 0:
            from fastvq.train.checkpoint import write_atomic
            log = self.out / "metrics.jsonl"
            if log.is_file():
                kept = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
                kept = [r for r in kept if r["step"] <= self.step]
                write_atomic(log, "".join(json.dumps(r) + "\n" for r in kept).encode())
                self.history = [r for r in kept if "eval" not in r]
