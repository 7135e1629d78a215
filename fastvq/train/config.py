"""The trainer's typed configuration (docs/training.md, "Configuration"), its ``--set key=value`` parser and the
resume compatibility check."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "apply_overrides", "parse_value", "resume_mismatches", "RESUME_MUTABLE"]


@dataclass
class TrainConfig:
    """Everything a training run depends on; dumped as ``train_config.json`` beside every checkpoint.

    Model: ``preset`` (a registered name, ``fastvq.models.list_presets()``), ``model`` (overrides of the preset's
    config fields, e.g. ``{"perceptual_weight": 0.0}``), ``stage`` (0: the model's only stage; ``n > 0`` calls
    ``model.set_stage(n)``, e.g. VQRAE's stage 2), ``init_from`` (a checkpoint or ``save_pretrained`` directory
    whose weights start the run, e.g. stage 1's result for stage 2).
    Data: ``data`` (a ``fastvq.data`` set), ``image_size`` (0: the preset's), ``captions`` (pass each image's
    caption as ``texts`` to a model with a text tower, i.e. a ``text_features`` method).
    Optimisation: ``steps`` optimizer steps of ``batch_size`` images (global, over all ranks and micro-batches),
    split into ``grad_accum`` micro-batches; AdamW (``lr``, ``betas``, ``weight_decay`` on >= 2-D weights only),
    ``warmup_steps`` linear warm-up then cosine decay to ``min_lr_ratio · lr``; ``grad_clip`` (global norm, 0: off);
    ``ema_decay`` (weight EMA, 0: off); ``precision`` ``"fp32"`` or ``"bf16"`` (autocast; quantizers stay fp32);
    ``compile`` (``torch.compile`` the model with ``compile_backend``); ``seed``.
    Adversarial: ``gan_weight`` (-1: the model config's ``gan_weight``; 0: no discriminator), ``disc_start`` (-1:
    half of ``steps``), ``disc_warmup``, ``disc_lr`` (0: ``lr``), ``disc_loss``, ``disc_ndf``, ``disc_layers``,
    ``disc_norm`` (``"group"``: no cross-replica statistics), ``lecam_weight``.
    Evaluation: every ``eval_every`` steps (0: at the end only) on ``eval_n`` fixed validation images (PSNR, SSIM,
    usage, zero-shot / retrieval with a text tower) and rFID/KID over ``fid_n`` (0: skipped).
    Logging and checkpoints: ``log_every``, ``ckpt_every`` (0: at the end only), ``keep_last``,
    ``max_nan_steps`` (optimizer steps skipped for a non-finite loss before the run stops), ``out``.
    """

    preset: str = "unitok-tiny"
    model: dict[str, Any] = field(default_factory=dict)
    stage: int = 0
    init_from: str = ""
    data: str = "fashion_mnist"
    image_size: int = 0
    captions: bool = True
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"
    seed: int = 0
    gan_weight: float = -1.0
    disc_start: int = -1
    disc_warmup: int = 0
    disc_lr: float = 0.0
    disc_loss: str = "hinge"
    disc_ndf: int = 32
    disc_layers: int = 3
    disc_norm: str = "group"
    lecam_weight: float = 0.0
    eval_every: int = 0
    eval_n: int = 64
    fid_n: int = 0
    log_every: int = 10
    ckpt_every: int = 0
    keep_last: int = 3
    max_nan_steps: int = 10
    out: str = "runs/default"

    def validate(self) -> None:
        who = "TrainConfig"
        for name in ("steps", "batch_size", "grad_accum", "eval_n", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{who}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "fid_n", "max_nan_steps", "stage", "disc_warmup"):
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
        if self.disc_norm not in ("group", "batch", "none"):
            raise ValueError(f"{who}: disc_norm must be 'group', 'batch' or 'none', got {self.disc_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], who: str = "TrainConfig.from_dict") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{who}: unknown TrainConfig fields {unknown}")
        return cls(**{k: tuple(v) if k == "betas" else v for k, v in data.items()})


# Fields that may change when a run resumes: how long it runs and what it writes, not what it computes.
RESUME_MUTABLE = frozenset({"steps", "out", "eval_every", "eval_n", "fid_n", "log_every", "ckpt_every", "keep_last",
                            "max_nan_steps", "compile", "compile_backend"})


def resume_mismatches(saved: Any, current: Any, mutable: frozenset = RESUME_MUTABLE) -> list[str]:
    """``"field: saved -> current"`` for every field that differs and may not change on resume (any field not in
    ``mutable``; both configs have ``to_dict``)."""
    a, b = saved.to_dict(), current.to_dict()
    return [f"{k}: {a[k]!r} -> {b.get(k)!r}" for k in a if k not in mutable and a[k] != b.get(k)]


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (``3``, ``0.5``, ``true``, ``[1, 2]``, ``"x"``), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the annotated type ``hint`` (bool, int, float, str, tuple); a clear error otherwise."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "types.UnionType":  # Optional[...] / X | None: first non-None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        return value if isinstance(value, str) else json.dumps(value)
    elif origin is tuple or hint is tuple:
        if isinstance(value, list):
            return tuple(value)
    else:
        return value
    raise ValueError(f"--set {key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def apply_overrides(config: Any, assignments: list[str], model_config: Any | None = None) -> Any:
    """``config`` with each ``key=value`` of ``assignments`` applied. ``key`` is a field of ``config``'s dataclass
    (:class:`TrainConfig`, or ``fastvq.train.mllm.MLLMTrainConfig``) or ``model.<field>`` of the preset's config
    (``model_config``, a dataclass instance or class, gives its types; unknown model fields are reported by the
    model when it is built)."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    model_cls = model_config if isinstance(model_config, type) else type(model_config)
    model_hints = typing.get_type_hints(model_cls) if model_config is not None else {}
    values, model = {}, dict(config.model)
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        value = parse_value(text)
        if key.startswith("model."):
            name = key[len("model."):]
            if model_config is not None and name not in model_hints:
                raise ValueError(f"--set {key}: {model_cls.__name__} has no field {name!r}; fields: "
                                 f"{sorted(model_hints)}")
            value = _coerce(value, model_hints[name], key) if name in model_hints else value
            model[name] = json.loads(json.dumps(value))  # stored as JSON holds it (tuples as lists)
        elif key == "model":
            raise ValueError("--set model: set model fields one by one, as model.<field>=value")
        elif key in hints:
            values[key] = _coerce(value, hints[key], key)
        else:
            raise ValueError(f"--set {key}: {cls.__name__} has no field {key!r}; fields: {sorted(hints)} "
                             "(model fields: model.<field>)")
    return dataclasses.replace(config, model=model, **values)
