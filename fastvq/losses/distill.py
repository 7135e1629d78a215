"""Distillation losses: KL distillation with a temperature (MergeVQ's CLS head) and VQRAE's self-distillation."""
from __future__ import annotations

import copy

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def kl_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``T² · KL(p_T ‖ p_S)`` averaged over the rows, with
    ``p_T = softmax(teacher / T)`` (detached: no gradient reaches the teacher) and ``p_S = softmax(student / T)``
    over the last dim; logits ``[..., K]``. The ``T²`` factor keeps the gradient's scale independent of ``T``.
    MergeVQ distils its CLS head with ``T = 4``. Computed in fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kl_distillation_loss: student {list(student_logits.shape)} and teacher "
                         f"{list(teacher_logits.shape)} logits must have the same shape")
    if not temperature > 0:
        raise ValueError(f"kl_distillation_loss: temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [...]
    return temperature ** 2 * kl.mean()


def self_distillation_loss(features: Tensor, teacher_features: Tensor, metric: str = "mse") -> Tensor:
    """VQRAE's stage-2 self-distillation constraint as fastvq implements it: the distance between the trainable
    encoder's output tokens ``features [B, T, C]`` and those of a frozen copy ``teacher_features [B, T, C]``
    (detached), on the same images.

    ``metric="mse"``: ``mean over B, T, C of (f − f_T)²``; ``"cosine"``: ``mean over B, T of 1 − cos(f, f_T)``.
    VQRAE (arXiv:2511.23386) describes stage 2 as jointly optimising the encoder "with self-distillation
    constraints" toward the frozen encoder's features; the exact distance is not in the sources available here,
    so fastvq uses the plain feature MSE (what a feature-regression constraint means when nothing else is said)
    and offers the cosine form. docs/models.md states this. Computed in fp32."""
    if features.shape != teacher_features.shape:
        raise ValueError(f"self_distillation_loss: features {list(features.shape)} and teacher_features "
                         f"{list(teacher_features.shape)} must have the same shape")
    f, t = features.float(), teacher_features.detach().float()
    if metric == "mse":
        return (f - t).square().mean()
    if metric == "cosine":
        return (1 - F.cosine_similarity(f, t, dim=-1, eps=1e-8)).mean()
    raise ValueError(f"self_distillation_loss: metric must be 'mse' or 'cosine', got {metric!r}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter frozen and in eval mode: the teacher of VQRAE's stage 2
    (the encoder as it left stage 1, which froze it, i.e. the pretrained vision foundation model itself)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
