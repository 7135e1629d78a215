"""The tokenizer trainer: one visible loop, plain PyTorch + ``torch.distributed`` (docs/training.md).

Per optimizer step (``grad_accum`` micro-batches, ``no_sync`` on all but the last under DDP)::

    for micro-batch:  with autocast(bf16?):  rec, losses = model(images, captions)
                      loss = losses["loss"] + GAN generator term (adaptive weight over model.last_layer)
                      d_loss = discriminator hinge (+ LeCam) on detached images
                      all ranks agree the losses are finite, else the step is skipped (counted)
                      ((loss + d_loss) / grad_accum).backward()
    clip, AdamW step (model; discriminator after its gradients are averaged over ranks)
    quantizer.update_codebook()  on every fastvq.nn.VectorQuantize (manual_ema_update: once per step)
    ClipContrastiveLoss.clamp_() on every contrastive head; weight EMA update
    log (rank 0), evaluate (rank 0), checkpoint (rank 0 writes, every rank's RNG state in it)

Model hooks (all optional, nothing model-specific in here): ``model.set_stage(n)`` for ``stage > 0``;
``model.last_layer`` for the adaptive GAN weight (no GAN without it); ``model.text_features`` (a text tower:
captions are passed as ``texts`` only then) and ``model.embed_images`` for zero-shot / retrieval evaluation; ``config`` (or ``quantizer``) ``codebook_size`` and
``num_codebooks`` for the usage metric.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fastvq.train.checkpoint import clean_partial, resolve_checkpoint, write_atomic, write_checkpoint
from fastvq.train.config import RESUME_MUTABLE, TrainConfig, resume_mismatches

__all__ = ["Trainer", "TrainingError", "WeightEMA", "lr_at", "build_model", "load_checkpoint_model"]


class TrainingError(RuntimeError):
    """A run that cannot go on (too many non-finite steps, a checkpoint that does not match the config)."""


# ---- pieces ------------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps`` (from ``lr / warmup_steps``), then cosine from ``lr`` to
    ``min_lr_ratio · lr`` at ``steps``. A pure function of the step: the scheduler's whole state is the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


class WeightEMA:
    """Exponential moving average of a model's parameters, stepped once per optimizer step:
    ``shadow ← d·shadow + (1 − d)·param`` with ``d = min(decay, (1 + t)/(10 + t))`` at update ``t`` (TensorFlow's
    ``num_updates`` warm-up, so a short run is not dominated by the initialisation). Buffers (an EMA codebook and
    its statistics, usage counters) are copied, not averaged: they are already the model's running state, and an
    averaged codebook would not match its own statistics. ``shadow`` is a plain dict of tensors (the state dict's
    keys), saved as safetensors."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.params = {name for name, _ in model.named_parameters()}
        self.shadow = {k: v.detach().clone().float() if k in self.params else v.detach().clone()
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.params:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - d)
            else:
                self.shadow[k].copy_(v)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block ``model`` holds the EMA weights; the training weights are restored exactly after."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(saved[k].dtype) for k, v in self.shadow.items()})
        try:
            yield model
        finally:
            model.load_state_dict(saved)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def build_model(cfg: TrainConfig):
    """The preset with ``cfg.model``'s overrides (lists become tuples), staged and initialised as configured."""
    import fastvq.models as models
    if cfg.preset not in models.list_presets():
        raise ValueError(f"fastvq train: unknown preset {cfg.preset!r}; known: {models.list_presets()}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.items()}
    model = models.from_preset(cfg.preset, **overrides)
    if cfg.init_from:
        init = load_checkpoint_model(cfg.init_from, ema=True)
        if type(init) is not type(model):
            raise ValueError(f"fastvq train: init_from {cfg.init_from} holds a {type(init).__name__}, the preset "
                             f"{cfg.preset!r} builds a {type(model).__name__}")
        model.load_state_dict(init.state_dict())
    if cfg.stage:
        if not callable(getattr(model, "set_stage", None)):
            raise ValueError(f"fastvq train: stage={cfg.stage} needs a model with set_stage(); "
                             f"{type(model).__name__} has a single stage")
        model.set_stage(cfg.stage)
    return model


def load_checkpoint_model(path: str | Path, ema: bool = True, map_location: str = "cpu"):
    """A tokenizer from a training checkpoint (a run, ``checkpoints/`` or ``step-*`` directory: its EMA weights
    when ``ema`` and present) or from any ``save_pretrained`` directory."""
    from safetensors.torch import load_file

    from fastvq.models import from_pretrained
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        return from_pretrained(path, map_location)
    ckpt = resolve_checkpoint(path)
    model = from_pretrained(ckpt, map_location)
    if ema and (ckpt / "ema.safetensors").is_file():
        model.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(map_location)))
    return model


@dataclass
class DataStream:
    """Deterministic batches: micro-batch ``m`` of the run is a pure function of ``m`` (so a resumed run reads
    exactly what the uninterrupted run would have). Epoch ``e`` is ``randperm(N)`` from a generator seeded with
    ``seed + e`` (what ``DistributedSampler`` does); consecutive micro-batches of ``batch_size / grad_accum``
    images are cut from it (the tail that does not fill one is dropped) and rank ``r`` reads the ``r``-th
    contiguous slice of each, so the ranks of one micro-batch together read the images one process would."""

    dataset: Any      # a fastvq.data.ImageCaptionDataset
    captions: list[str] | None  # the split's captions (None: no texts)
    micro_batch: int  # global images per micro-batch
    seed: int
    rank: int
    world: int

    def __post_init__(self):
        if self.micro_batch % self.world:
            raise ValueError(f"fastvq train: batch_size / grad_accum = {self.micro_batch} images per micro-batch "
                             f"must be a multiple of the {self.world} processes")
        self.per_epoch = len(self.dataset) // self.micro_batch
        if self.per_epoch < 1:
            raise ValueError(f"fastvq train: the data set has {len(self.dataset)} images, fewer than one "
                             f"micro-batch of {self.micro_batch}")
        self._perm_epoch, self._perm = -1, None

    def position(self, m: int) -> dict:
        return {"micro_batches": m, "epoch": m // self.per_epoch, "batch_in_epoch": m % self.per_epoch}

    def get(self, m: int) -> tuple[Tensor, list[str] | None]:
        """Micro-batch ``m``: this rank's images ``[b, 3, H, W]`` in ``[-1, 1]`` and captions (or None)."""
        epoch, j = divmod(m, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=g).numpy(), epoch
        local = self.micro_batch // self.world
        start = j * self.micro_batch + self.rank * local
        pos = self._perm[start:start + local]
        images = self.dataset.images(pos) * 2 - 1
        texts = [self.captions[p] for p in pos] if self.captions is not None else None
        return images, texts


def _vq_modules(model: nn.Module) -> list[nn.Module]:
    from fastvq.nn import VectorQuantize
    return [m for m in model.modules() if isinstance(m, VectorQuantize)]


def _discard_codebook_statistics(vq) -> None:
    """Drop what the forwards of a skipped step accumulated in a ``manual_ema_update`` quantizer (its
    non-persistent accumulators), so a non-finite step leaves no trace in the codebook."""
    for name, buf in vq.named_buffers(recurse=False):
        if name.startswith("acc_"):
            buf.zero_()
    if hasattr(vq, "candidate_keys"):
        vq.candidate_keys.fill_(-1)
        vq.candidates.zero_()
    vq._pending_forwards, vq._pending_ema = 0, False


def _rng_state() -> dict:
    """This process's RNG states: torch (CPU, CUDA) as tensors, numpy and Python as JSON-ready data."""
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    return {"tensors": tensors, "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda{i}"] for i in range(torch.cuda.device_count())
                                      if f"cuda{i}" in tensors])
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["numpy_keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], dict]:
    """An optimizer's state as safetensors-ready tensors and its JSON-ready param groups."""
    sd = opt.state_dict()
    tensors = {f"{prefix}.{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()
               if isinstance(v, Tensor)}
    scalars = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if not isinstance(v, Tensor)}
    return tensors, {"param_groups": json.loads(json.dumps(sd["param_groups"])), "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict, prefix: str) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            i, k = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[k] = v
    for key, v in meta["scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---- the trainer -------------------------------------------------------------------------------------------------

class Trainer:
    """``Trainer(config, resume=None).train()``: builds everything from ``config`` (a :class:`TrainConfig`),
    restores a checkpoint when ``resume`` names one (a run, ``checkpoints/`` or ``step-*`` directory; ``"auto"``:
    this run's latest, or a fresh start when it has none), and trains to ``config.steps``. Under ``torchrun`` it
    runs DDP (NCCL on GPUs, gloo on CPUs), initialising the process group itself."""

    def __init__(self, config: TrainConfig, resume: str | None = None, progress: bool | None = None):
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
            saved = TrainConfig.from_dict(json.loads((resume_dir / "train_config.json").read_text()))
            diff = resume_mismatches(saved, cfg)
            if diff:
                raise TrainingError(f"fastvq train --resume: {resume_dir} was trained with another configuration: "
                                    f"{'; '.join(diff)}. Resume with the same settings (only {sorted(RESUME_MUTABLE)} "
                                    "may change), or start a new run with another --out")

        from fastvq.data import DATASETS
        if cfg.data not in DATASETS:
            raise ValueError(f"fastvq train: unknown data set {cfg.data!r}; known: {list(DATASETS)} (docs/data.md)")
        torch.manual_seed(cfg.seed)  # the same initialisation on every rank
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.image_size = cfg.image_size or self.model.config.image_size
        self.vqs = _vq_modules(self.model)
        for vq in self.vqs:  # codebook statistics applied once per optimizer step, not per micro-batch
            vq.manual_ema_update = True

        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        self.gan = self._build_gan()
        self.disc_opt = (torch.optim.AdamW(self.gan.discriminator.parameters(), lr=cfg.disc_lr or cfg.lr,
                                           betas=cfg.betas, weight_decay=0.0) if self.gan is not None else None)
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None

        from fastvq.data import load_dataset
        train_ds = load_dataset(cfg.data, "train", channels=3, image_size=self.image_size)
        # captions go to models with a text tower (the text_features hook) only: others may refuse texts
        self.use_texts = cfg.captions and callable(getattr(self.model, "text_features", None))
        self.data = DataStream(train_ds, train_ds.captions if self.use_texts else None,
                               cfg.batch_size // cfg.grad_accum, cfg.seed, self.rank, self.world)

        self.ddp = None
        if self.world > 1:
            # broadcast_buffers=False: the quantizers sum their own statistics over ranks; DDP's per-forward
            # broadcast would overwrite each rank's accumulators with rank 0's.
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True)
        self.forward = self.ddp if self.ddp is not None else self.model
        if cfg.compile:
            self.forward = torch.compile(self.forward, backend=cfg.compile_backend)

        self.step = 0
        self.nan_steps = 0
        self.history: list[dict] = []
        if resume_dir is not None:
            self._load(resume_dir)
        elif (self.ckpt_root / "latest").exists():
            raise TrainingError(f"fastvq train: {self.out} already holds checkpoints; pass --resume to continue "
                                "that run, or another --out")

    # ---- set-up ------------------------------------------------------------------------------------------------

    def _init_distributed(self) -> None:
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend)

    def _resume_dir(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        if resume == "auto":
            if not (self.ckpt_root / "latest").is_file():
                return None
            resume = str(self.ckpt_root)
        return resolve_checkpoint(resume)

    def _build_gan(self):
        from fastvq.losses import GANLoss
        cfg = self.cfg
        weight = cfg.gan_weight if cfg.gan_weight >= 0 else float(getattr(self.model.config, "gan_weight", 0.0))
        if weight == 0:
            return None
        if not isinstance(getattr(self.model, "last_layer", None), Tensor):
            raise ValueError(f"fastvq train: gan_weight={weight} needs model.last_layer (the decoder's last weight) "
                             f"for the adaptive weight; {type(self.model).__name__} has none (set gan_weight=0)")
        start = cfg.disc_start if cfg.disc_start >= 0 else cfg.steps // 2
        # adaptive_weight=False: the trainer applies VQGAN's adaptive weight itself, over ranks (_adaptive_weight)
        return GANLoss(disc_weight=weight, disc_start=start, disc_warmup=cfg.disc_warmup, disc_loss=cfg.disc_loss,
                       gen_loss=cfg.disc_loss, adaptive_weight=False, lecam_weight=cfg.lecam_weight,
                       in_channels=self.model.config.in_channels, ndf=cfg.disc_ndf, n_layers=cfg.disc_layers,
                       norm=cfg.disc_norm).to(self.device)

    # ---- one optimizer step --------------------------------------------------------------------------------------

    def _all_finite(self, *values: Tensor) -> bool:
        ok = torch.tensor([float(all(bool(torch.isfinite(v)) for v in values))])
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _train_step(self) -> dict | None:
        """One optimizer step; the logged terms (means over micro-batches and ranks), or None when skipped."""
        cfg, step = self.cfg, self.step
        lr = lr_at(step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.disc_opt is not None:
            for g in self.disc_opt.param_groups:
                g["lr"] = lr * (cfg.disc_lr or cfg.lr) / cfg.lr
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        gan_on = self.gan is not None and self.gan.active(step)
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            images, texts = self.data.get(step * cfg.grad_accum + micro)
            images = images.to(self.device)
            last = micro == cfg.grad_accum - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                with amp:
                    rec, losses = self.forward(images, texts)
                    loss = losses["loss"]
                    terms = {k: v.detach() for k, v in losses.items()}
                    d_loss = loss.new_zeros(())
                    if self.gan is not None:
                        g_loss, g_terms = self.gan.generator_loss(rec, step)  # factor · L_G, or a constant 0
                        if g_loss.requires_grad:
                            g_terms["gan_adaptive_weight"] = self._adaptive_weight(loss, g_loss, g_terms["gan_factor"])
                            g_loss = g_terms["gan_adaptive_weight"] * g_loss
                        loss = loss + g_loss
                        terms.update(g_terms)
                        if gan_on:
                            d_loss, d_terms = self.gan.discriminator_loss(images, rec, step)
                            terms.update(d_terms)
                if not self._all_finite(loss, d_loss):
                    return None
                ((loss + d_loss) / cfg.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = (nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.zeros(()))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if gan_on:
            disc_params = [p for p in self.gan.discriminator.parameters() if p.grad is not None]
            if self.world > 1:  # called twice per step (real, fake): averaged here rather than by DDP hooks
                for p in disc_params:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(disc_params, cfg.grad_clip)
            self.disc_opt.step()
            self.disc_opt.zero_grad(set_to_none=True)
        self._after_optimizer_step()
        sums.update(lr=lr, grad_norm=float(grad_norm))
        return sums

    def _adaptive_weight(self, nll: Tensor, g_loss: Tensor, factor: Tensor) -> Tensor:
        """VQGAN's adaptive weight λ = ‖∇_w nll‖ / (‖∇_w L_G‖ + 1e-4), clamped to [0, 1e4], over ``w =
        model.last_layer`` (``fastvq.losses.adaptive_gan_weight``), with both gradients averaged over ranks first:
        λ is a non-linear function of the batch, and this makes it the one a single process computes on the whole
        micro-batch. ``g_loss`` is ``factor · L_G``, so its gradient norm is divided by ``factor``."""
        last = self.model.last_layer
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        both = torch.stack([g_nll, g_gan])
        if self.world > 1:
            dist.all_reduce(both)
            both /= self.world
        lam = both[0].norm() / (both[1].norm() / factor + 1e-4)
        return lam.clamp(0.0, 1e4).detach()

    def _after_optimizer_step(self) -> None:
        from fastvq.losses import ClipContrastiveLoss
        for vq in self.vqs:
            vq.update_codebook()
        for m in self.model.modules():
            if isinstance(m, ClipContrastiveLoss):
                m.clamp_()
        if self.ema is not None:
            self.ema.update(self.model)

    def _skip_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.disc_opt is not None:
            self.disc_opt.zero_grad(set_to_none=True)
        for vq in self.vqs:
            _discard_codebook_statistics(vq)
        self.nan_steps += 1
        if self.rank == 0:
            print(f"fastvq train: step {self.step}: non-finite loss, step skipped ({self.nan_steps} of at most "
                  f"{self.cfg.max_nan_steps})", file=sys.stderr)
        if self.nan_steps > self.cfg.max_nan_steps:
            kept = (self.ckpt_root / "latest").read_text().strip() if (self.ckpt_root / "latest").is_file() else None
            raise TrainingError(f"fastvq train: {self.nan_steps} steps had a non-finite loss (max_nan_steps="
                                f"{self.cfg.max_nan_steps}); stopped at step {self.step}. The last checkpoint "
                                f"({kept or 'none written yet'}) is intact: resume from it with a lower lr, "
                                "precision=fp32 or a smaller grad_clip")

    # ---- the loop ------------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Train to ``config.steps``; returns the last evaluation's metrics (rank 0; ``{}`` elsewhere)."""
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_partial(self.ckpt_root)
            log = self.out / "metrics.jsonl"
            if self.step == 0 and log.exists():  # a run that died before its first checkpoint: keep its log aside
                os.replace(log, self.out / "metrics.jsonl.previous")
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        bar = None
        if self.rank == 0 and self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.preset}", file=sys.stderr,
                       dynamic_ncols=True)
        self.model.train()
        last_eval: dict = {}
        t_log, images_since = time.perf_counter(), 0
        while self.step < cfg.steps:
            terms = self._train_step()
            if terms is None:
                self._skip_step()
            images_since += cfg.batch_size
            self.step += 1
            if terms is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                elapsed = time.perf_counter() - t_log
                terms = self._mean_over_ranks(terms)
                rec = {"step": self.step, **{k: round(v, 7) for k, v in terms.items()},
                       "images_per_s": round(images_since / elapsed, 2), "nan_steps": self.nan_steps}
                self._log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
                t_log, images_since = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            final = self.step == cfg.steps
            if final or (cfg.eval_every and self.step % cfg.eval_every == 0):
                last_eval = self.evaluate()
                t_log = time.perf_counter()
            if final or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                self.save()
                t_log = time.perf_counter()
        if bar is not None:
            bar.close()
        return last_eval

    def _mean_over_ranks(self, terms: dict) -> dict:
        if self.world == 1:
            return terms
        keys = sorted(terms)
        t = torch.tensor([terms[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t)}

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.history.append(record)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """In-loop evaluation on rank 0 with the EMA weights (when kept): metrics logged to ``metrics.jsonl``,
        ``eval/step-N.json``, a reconstruction grid and the loss curve as PNGs. Consumes no training RNG."""
        from fastvq.train.evaluate import evaluate_model, loss_curve_png
        result: dict = {}
        if self.rank == 0:
            ctx = self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()
            with torch.random.fork_rng(devices=[]), ctx:
                self.model.eval()
                try:
                    result = evaluate_model(self.model, self.cfg.data, self.cfg.eval_n, self.cfg.fid_n,
                                            self.image_size, self.out / "eval", f"step-{self.step:06d}")
                finally:
                    self.model.train()
            result["weights"] = "ema" if self.ema is not None else "training"
            self._log({"step": self.step, "eval": {k: v for k, v in result.items() if not isinstance(v, dict)}})
            loss_curve_png(self.history, self.out / "eval" / "loss_curve.png", self.cfg.preset)
        if self.world > 1:
            dist.barrier()
        return result

    # ---- checkpoints -----------------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; every rank's RNG state in it)."""
        from safetensors.torch import save_file

        from fastvq.models.tokenizer import CONFIG_NAME, WEIGHTS_NAME, config_to_dict
        rng = _rng_state()
        all_rng = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        path = None
        if self.rank == 0:
            opt_tensors, opt_meta = _optimizer_tensors(self.opt, "opt")
            state = {"step": self.step, "world_size": self.world, "nan_steps": self.nan_steps,
                     "data": self.data.position(self.step * self.cfg.grad_accum),
                     "scheduler": {"kind": "warmup_cosine", "step": self.step, "lr": lr_at(self.step, self.cfg)},
                     "optimizer": opt_meta, "ema_updates": self.ema.updates if self.ema is not None else None,
                     "rng": [{"numpy": r["numpy"], "python": r["python"]} for r in all_rng],
                     "model_class": type(self.model).__name__, "preset": self.cfg.preset}
            tensors = dict(opt_tensors)
            if self.gan is not None:
                tensors.update({f"disc.{k}": v.detach().contiguous() for k, v in self.gan.state_dict().items()})
                d_tensors, state["disc_optimizer"] = _optimizer_tensors(self.disc_opt, "disc_opt")
                tensors.update(d_tensors)
            rng_tensors = {f"rank{r}.{k}": v for r, rs in enumerate(all_rng) for k, v in rs["tensors"].items()}
            meta = {"model": self.model.model_name, "config": config_to_dict(self.model.config)}
            weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            writers = {  # config.json + model.safetensors: what Tokenizer.save_pretrained writes
                CONFIG_NAME: lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"),
                WEIGHTS_NAME: lambda p: save_file(weights, str(p), metadata={"format": "pt",
                                                                             "model": self.model.model_name}),
                "train_config.json": lambda p: p.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n"),
                "state.json": lambda p: p.write_text(json.dumps(state, indent=1) + "\n"),
                "optim.safetensors": lambda p: save_file(tensors, str(p)),
                "rng.safetensors": lambda p: save_file(rng_tensors, str(p)),
            }
            if self.ema is not None:
                writers["ema.safetensors"] = lambda p: save_file(
                    {k: v.contiguous() for k, v in self.ema.shadow.items()}, str(p))
            path = write_checkpoint(self.ckpt_root, self.step, writers, self.cfg.keep_last)
        if self.world > 1:
            dist.barrier()
        return path

    def _load(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        from fastvq.models.tokenizer import WEIGHTS_NAME
        state = json.loads((ckpt / "state.json").read_text())
        if state["world_size"] != self.world:
            raise TrainingError(f"fastvq train --resume: {ckpt} was written by {state['world_size']} processes, this "
                                f"run has {self.world}; resume with the same number (its data order and RNG "
                                "states are per rank)")
        if state["model_class"] != type(self.model).__name__:
            raise TrainingError(f"fastvq train --resume: {ckpt} holds a {state['model_class']}, the preset "
                                f"{self.cfg.preset!r} builds a {type(self.model).__name__}")
        weights = load_file(str(ckpt / WEIGHTS_NAME), device=str(self.device))
        self.model.load_state_dict(weights, strict=True)
        tensors = load_file(str(ckpt / "optim.safetensors"))
        _load_optimizer(self.opt, tensors, state["optimizer"], "opt")
        if self.gan is not None:
            if "disc_optimizer" not in state:
                raise TrainingError(f"fastvq train --resume: {ckpt} has no discriminator state")
            self.gan.load_state_dict({k[len("disc."):]: v.to(self.device) for k, v in tensors.items()
                                      if k.startswith("disc.")}, strict=True)
            _load_optimizer(self.disc_opt, tensors, state["disc_optimizer"], "disc_opt")
        if self.ema is not None:
            shadow = load_file(str(ckpt / "ema.safetensors"), device=str(self.device))
            if set(shadow) != set(self.ema.shadow):
                raise TrainingError(f"fastvq train --resume: {ckpt}/ema.safetensors does not match the model's keys")
            self.ema.shadow = shadow
            self.ema.updates = state["ema_updates"]
        rng = load_file(str(ckpt / "rng.safetensors"))
        mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{self.rank}.")}
        _set_rng_state(mine, state["rng"][self.rank])
        self.step, self.nan_steps = state["step"], state["nan_steps"]
        if self.rank == 0:  # drop what the interrupted run logged after this checkpoint
            log = self.out / "metrics.jsonl"
            if log.is_file():
                kept = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
                kept = [r for r in kept if r["step"] <= self.step]
                write_atomic(log, "".join(json.dumps(r) + "\n" for r in kept).encode())
                self.history = [r for r in kept if "eval" not in r]


