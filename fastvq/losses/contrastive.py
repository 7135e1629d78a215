"""CLIP's contrastive loss with features gathered across ranks (gradients through the gather)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.nn._quantizer import world_size


def gather_with_grad(x: Tensor) -> Tensor:
    """``x [n, ...]`` of every rank concatenated in rank order, ``[world·n, ...]``, differentiable
    (``torch.distributed.nn.functional.all_gather``: the backward sums every rank's gradient for each
    rank's rows). Every rank must hold the same ``n``. Returns ``x`` in a single process."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)


class ClipContrastiveLoss(nn.Module):
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021) over the global batch, with a learnable temperature.

    ``forward(image_features [n, D], text_features [n, D])``: both are L2-normalised, gathered from every rank
    (:func:`gather_with_grad`, so the gradient reaches each rank's own features through the gather, as
    OpenCLIP's ``gather_with_grad=True``), and with ``s = exp(clamp(logit_scale, 0, ln max_logit_scale))``,
    ``logits = s · I Tᵀ`` over the global ``N = world·n`` pairs,
    ``L = ½ (CE(logits, arange N) + CE(logitsᵀ, arange N))``.
    Every rank computes the same ``L``; with DDP's gradient averaging the parameters get exactly the gradient of
    a single process on the whole batch (the gather's backward sums the ranks' equal gradients, DDP divides by
    the world size).

    ``logit_scale`` is a parameter holding ``ln(1/temperature)``, initialised to ``ln(1/0.07)`` (CLIP);
    ``learnable_scale=False`` makes it a buffer. CLIP clips the scale at 100: here the forward clamps it (no
    gradient beyond the bound), and :meth:`clamp_` clamps the stored value after an optimizer step (UniTok,
    OpenCLIP). Computed in fp32. Returns ``(loss, {"logit_scale": s})``.
    """

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0, learnable_scale: bool = True):
        super().__init__()
        if not init_temperature > 0 or not max_logit_scale >= 1:
            raise ValueError(f"ClipContrastiveLoss: init_temperature must be > 0 and max_logit_scale >= 1, got "
                             f"{init_temperature}, {max_logit_scale}")
        value = torch.tensor(math.log(1.0 / init_temperature))
        if learnable_scale:
            self.logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("logit_scale", value)
        self.max_log_scale = math.log(max_logit_scale)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the stored ``logit_scale`` to ``[0, ln max_logit_scale]`` (call after the optimizer step)."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def forward(self, image_features: Tensor, text_features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(f"ClipContrastiveLoss: image_features and text_features must both be [n, D], got "
                             f"{list(image_features.shape)} and {list(text_features.shape)}")
        img = gather_with_grad(F.normalize(image_features.float(), dim=-1))
        txt = gather_with_grad(F.normalize(text_features.float(), dim=-1))
        scale = self.logit_scale.float().clamp(0.0, self.max_log_scale).exp()
        logits = scale * img @ txt.t()  # [N, N]
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        return loss, {"logit_scale": scale.detach()}


__all__ = ["ClipContrastiveLoss", "gather_with_grad"]
