"""The API every fastvq tokenizer shares (UniTok, MergeVQ, VQRAE, UniWeTok); docs/models.md, "Tokenizers".

A tokenizer is an ``nn.Module`` built from one typed config (a dataclass). It implements

* ``encode(images) -> TokenizerOutput(indices, quantized, extras)``: ``images [B, C, H, W]`` in ``[-1, 1]``;
  ``indices`` the discrete tokens (int64, layout per model), ``quantized`` the quantizer's output, ``extras`` a
  dict of what ``decode_indices`` needs besides the indices (e.g. MergeVQ's source map; ``{}`` when nothing);
* ``decode_indices(indices, extras=None) -> images [B, C, H, W]`` (not clamped);
* ``forward(images, texts=None) -> (reconstruction, losses)``: ``losses["loss"]`` is the weighted sum that the
  trainer back-propagates (the trainer adds the adversarial term, see each model's ``last_layer``); every other
  key is one **unweighted** term, for logging.

Presets are data: :func:`register_preset` names a (class, config) pair and :meth:`Tokenizer.from_preset` builds it
(``with torch.device("meta"):`` builds a paper-scale model without memory). :meth:`Tokenizer.save_pretrained`
writes ``config.json`` + ``model.safetensors`` (never pickle) and :meth:`Tokenizer.from_pretrained` reads them
back with strict key checks.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["TokenizerOutput", "Tokenizer", "register_preset", "list_presets", "from_preset", "from_pretrained",
           "CONFIG_NAME", "WEIGHTS_NAME", "load_weights_strict"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_MODELS: dict[str, type[Tokenizer]] = {}         # model name -> class
_PRESETS: dict[str, tuple[str, Any]] = {}          # preset name -> (model name, config)


class TokenizerOutput(NamedTuple):
    """What :meth:`Tokenizer.encode` returns: ``indices`` (int64 tokens), ``quantized`` (the quantizer's output,
    before any post-quantization projection) and ``extras`` (what decoding needs besides the indices)."""
    indices: Tensor
    quantized: Tensor
    extras: dict[str, Any]


def config_to_dict(config) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(config_class: type, data: dict[str, Any], who: str):
    """The inverse of :func:`config_to_dict`: lists become tuples again; an unknown key is an error."""
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{who}: unknown {config_class.__name__} fields {unknown}")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def perceptual_feature_loss() -> nn.Module:
    """The default perceptual term: ``PerceptualFeatureLoss(input_range=(-1, 1))`` over EfficientNet-Lite0 (an
    uncalibrated feature distance, **not LPIPS**; docs/models.md)."""
    from fastvq.losses import PerceptualFeatureLoss
    return PerceptualFeatureLoss(input_range=(-1.0, 1.0))


def efficientnet_lite0() -> nn.Module:
    """The offline stand-in teacher / frozen image encoder, ``fastvq.eval.EfficientNetLite0`` (the heavy import
    happens here, only when a model first needs it)."""
    from fastvq.eval import EfficientNetLite0
    return EfficientNetLite0()


class Tokenizer(nn.Module):
    """Base class of the fastvq tokenizers. Subclasses set ``model_name`` and ``config_class`` (registered by
    ``__init_subclass__``), take their config as the one constructor argument, keep it as ``self.config``, and
    implement :meth:`encode`, :meth:`decode_indices` and :meth:`forward` (module docstring).

    **Frozen networks** (the perceptual loss's network, a distillation teacher, a text tower) are kept *outside*
    the module tree: they add no parameters and no state-dict entries, so a checkpoint holds the tokenizer only
    and the frozen weights always come from their packages. ``frozen_builders`` names the kinds a model uses and
    how each is built on first use; :meth:`set_frozen` puts your own in place (frozen, in eval mode)."""

    model_name: str = ""
    config_class: type = type(None)
    frozen_builders: dict[str, Callable[[], nn.Module]] = {"perceptual": perceptual_feature_loss}

    # ---- frozen networks ---------------------------------------------------------------------------------------

    @property
    def _frozen(self) -> dict[str, nn.Module | None]:
        """kind -> the frozen network in use (``None``: build it on first use)."""
        return self.__dict__.setdefault("_frozen_networks", dict.fromkeys(self.frozen_builders))

    def set_frozen(self, kind: str, net: nn.Module | None) -> None:
        """Use ``net`` as the frozen network ``kind`` (one of ``frozen_builders``); its parameters are frozen and
        it is put in eval mode. ``None``: build the default on first use."""
        if kind not in self.frozen_builders:
            raise ValueError(f"{type(self).__name__}.set_frozen: unknown kind {kind!r}; "
                             f"known: {sorted(self.frozen_builders)}")
        if net is not None:
            net.requires_grad_(False).eval()
        self._frozen[kind] = net

    def set_perceptual_loss(self, loss: nn.Module | None) -> None:
        """Use ``loss`` (``(reconstruction, target) → scalar``, e.g. a ``PerceptualFeatureLoss`` over another
        frozen network) as the perceptual term; ``None``: :func:`perceptual_feature_loss` on first use."""
        self.set_frozen("perceptual", loss)

    def _frozen_net(self, kind: str, device: torch.device) -> nn.Module:
        """The frozen network ``kind`` on ``device``, built on first use."""
        net = self._frozen.get(kind)
        if net is None:
            net = self._frozen[kind] = self.frozen_builders[kind]()
        p = next(net.parameters(), None)
        if p is not None and p.device != device:
            net.to(device)
        return net

    def _grid(self, images: Tensor) -> tuple[int, int]:
        """Check ``images [B, in_channels, H, W]`` (float, H and W multiples of ``config.downsample``) and return
        the token grid ``(H / s, W / s)``."""
        cfg, s, name = self.config, self.config.downsample, type(self).__name__
        if images.dim() != 4 or images.shape[1] != cfg.in_channels or images.shape[2] % s or images.shape[3] % s:
            raise ValueError(f"{name}: images must be [B, {cfg.in_channels}, H, W] with H and W multiples of {s} "
                             f"(the preset's size is {cfg.image_size}), got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{name}: images must be a float tensor in [-1, 1], got {images.dtype}")
        return images.shape[2] // s, images.shape[3] // s

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.model_name:
            _MODELS[cls.model_name] = cls

    def encode(self, images: Tensor) -> TokenizerOutput:
        raise NotImplementedError

    def decode_indices(self, indices: Tensor, extras: dict[str, Any] | None = None) -> Tensor:
        raise NotImplementedError

    # ---- presets ---------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Tokenizer:
        """Build the preset ``name`` with config fields replaced by ``overrides`` (on a subclass, the preset must
        belong to it)."""
        if name not in _PRESETS:
            raise ValueError(f"{cls.__name__}.from_preset: unknown preset {name!r}; known: {list_presets()}")
        model_name, config = _PRESETS[name]
        model_cls = _MODELS[model_name]
        if not issubclass(model_cls, cls):
            raise ValueError(f"{cls.__name__}.from_preset: preset {name!r} builds {model_cls.__name__}")
        try:
            config = dataclasses.replace(config, **overrides)
        except TypeError as e:
            raise ValueError(f"{model_cls.__name__}.from_preset({name!r}): {e}") from None
        return model_cls(config)

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` (``{"model": model_name, "config": {...}}``) and ``model.safetensors`` (the
        state dict: parameters and persistent buffers) into ``directory`` (created if needed)."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"model": self.model_name, "config": config_to_dict(self.config)}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model": self.model_name})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Tokenizer:
        """Build the model that ``config.json`` names and load ``model.safetensors`` into it, strictly: a missing
        or unexpected key, or a shape that differs, is a ``ValueError`` naming the file and the keys."""
        directory = Path(directory)
        who = f"{cls.__name__}.from_pretrained"
        cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{who}: {p} does not exist")
        meta = json.loads(cfg_path.read_text())
        model_name = meta.get("model")
        if model_name not in _MODELS:
            raise ValueError(f"{who}: {cfg_path} names model {model_name!r}; known: {sorted(_MODELS)}")
        model_cls = _MODELS[model_name]
        if not issubclass(model_cls, cls):
            raise ValueError(f"{who}: {cfg_path} holds a {model_cls.__name__}")
        model = model_cls(config_from_dict(model_cls.config_class, meta["config"], f"{who}({cfg_path})"))
        return load_weights_strict(model, weights_path, who, map_location)



def load_weights_strict(model: nn.Module, weights_path: str | Path, who: str,
                        map_location: str | torch.device = "cpu") -> nn.Module:
    """Load the safetensors file ``weights_path`` into ``model`` strictly and move it to ``map_location``: a
    missing or unexpected key, or a shape that differs, is a ``ValueError`` from ``who`` naming the file and the
    keys (never pickle). Shared by every ``from_pretrained`` in fastvq.models."""
    from safetensors.torch import load_file
    state = load_file(str(weights_path), device=str(map_location))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: file {list(state[k].shape)}, model {list(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{who}: {weights_path} does not match {type(model).__name__}: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {shapes}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location)

def register_preset(name: str, model_cls: type[Tokenizer], config) -> None:
    """Register ``config`` (an instance of ``model_cls.config_class``) under the preset ``name``."""
    if not isinstance(config, model_cls.config_class):
        raise TypeError(f"register_preset({name!r}): config must be a {model_cls.config_class.__name__}")
    _PRESETS[name] = (model_cls.model_name, config)


def list_presets() -> list[str]:
    """The registered preset names, sorted."""
    return sorted(_PRESETS)


def from_preset(name: str, **overrides) -> Tokenizer:
    """Build any registered preset (:meth:`Tokenizer.from_preset`)."""
    return Tokenizer.from_preset(name, **overrides)


def from_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> Tokenizer:
    """Load any fastvq tokenizer saved by :meth:`Tokenizer.save_pretrained`."""
    return Tokenizer.from_pretrained(directory, map_location)
