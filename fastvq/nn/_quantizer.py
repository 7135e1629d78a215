"""What every fastvq quantizer module shares: the return types, input layouts (channel-first feature maps,
masks), the fp32 island under autocast, the straight-through and rotation-trick estimators, masked losses,
and the distributed reductions that keep replicas identical.

The conventions follow vector-quantize-pytorch (docs/conventions.md, "Quantizer modules"):

* ``forward(x, mask=None, return_loss_breakdown=False)`` returns :class:`QuantizeOutput`, a named tuple
  ``(quantized, indices, loss)`` that unpacks as three values; with ``return_loss_breakdown=True`` it returns
  ``(QuantizeOutput, breakdown)`` where ``breakdown`` is a dict of each (unweighted) loss term, as
  vector-quantize-pytorch's ``return ret, loss_breakdown``.
* ``mask`` (bool, ``x``'s token shape): ``False`` positions get index ``-1``, a zero output, and take no part
  in any loss or statistic.
* The auxiliary loss is ``0`` in eval mode unless the module is built or called with ``aux_loss_in_eval``.
* ``get_codes_from_indices`` returns codes in the codebook space, ``get_output_from_indices`` what
  ``forward`` would output for those indices; ``-1`` gives zeros.

Nothing here imports anything beyond torch.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


class QuantizeOutput(NamedTuple):
    """``(quantized, indices, loss)``: unpacks as three values, like vector-quantize-pytorch's tuple."""
    quantized: Tensor
    indices: Tensor
    loss: Tensor


# ---- layouts ----------------------------------------------------------------------------------------------

def to_channel_last(x: Tensor, channel_first: bool, module: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x [B, C, *spatial]`` (channel-first, e.g. an image feature map ``[B, C, H, W]``) -> ``[B, *spatial, C]``
    and the inverse for outputs ``[B, *spatial, C]``. Identity when ``channel_first`` is False."""
    if not channel_first:
        return x, lambda y: y
    if x.dim() < 3:
        raise ValueError(f"{module}: x must be channel-first [B, C, *spatial] (at least 3 dims) with "
                         f"channel_first=True, got shape {list(x.shape)}")
    perm = (0, *range(2, x.dim()), 1)
    inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return x.permute(perm), lambda y: y.permute(inv)


def check_mask(mask: Tensor | None, token_shape: torch.Size, device: torch.device, module: str) -> Tensor | None:
    """Validate a token mask: bool, ``token_shape`` (``x``'s shape without its channel dim), ``x``'s device."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{module}: mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{module}: mask must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(f"{module}: mask must have x's token shape {list(token_shape)} (x without its "
                         f"channel dim), got shape {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{module}: mask must be on x's device {device}, got {mask.device}")
    return mask


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values [*T, ...]`` over the positions where ``mask [*T]`` is True (every trailing element of a
    kept position counts); ``0`` when nothing is kept. Masked positions are selected out (a NaN there does not
    reach the result) and no host synchronisation happens."""
    if mask is None:
        return values.mean()
    if tuple(values.shape[: mask.dim()]) != tuple(mask.shape):
        raise ValueError(f"masked_mean: mask shape {list(mask.shape)} must prefix values' {list(values.shape)}")
    m = mask.reshape(*mask.shape, *([1] * (values.dim() - mask.dim())))
    per_position = values.numel() // mask.numel() if mask.numel() else 0
    total = torch.where(m, values, values.new_zeros(())).sum()
    return total / (mask.sum() * per_position).clamp_min(1).to(total.dtype)


def masked_mse(a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
    """``mse(a, b)`` over the kept positions (``mask`` over the leading token dims)."""
    return masked_mean((a - b).square(), mask)


# ---- precision ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fp32_island(device: torch.device):
    """Autocast off on ``device``'s type: the search, losses and statistics of a quantizer run in fp32 even
    inside a bf16/fp16 autocast region (the caller casts its inputs with ``.float()``)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


# ---- gradient estimators -------------------------------------------------------------------------------------

def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Value ``q``, gradient to ``x`` as the identity (Bengio et al. 2013; VQ-VAE)."""
    return x + (q - x).detach()


def rotation_trick(x: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """The rotation trick (Fifty et al. 2024, arXiv:2410.06424, eq. 4.2): value ``q`` (up to rounding), and the
    gradient reaches ``x`` through the rotation-and-rescaling that maps ``x`` onto ``q``, treated as a constant.

    With ``u = x/|x|``, ``v = q/|q|`` and ``w = (u + v)/|u + v|`` (all constants):
    ``out = (x - 2 (x.w) w + 2 (x.u) v) * |q|/|x|``. It preserves the angle between the gradient and the
    code, where the straight-through estimator copies the gradient unchanged."""
    xn = x.norm(dim=-1, keepdim=True)
    qn = q.norm(dim=-1, keepdim=True)
    u = (x / xn.clamp_min(eps)).detach()
    v = (q / qn.clamp_min(eps)).detach()
    w = F.normalize(u + v, dim=-1, eps=eps).detach()
    out = x - 2 * (x * w).sum(-1, keepdim=True) * w + 2 * (x * u).sum(-1, keepdim=True) * v
    return out * (qn / xn.clamp_min(eps)).detach()


# ---- distributed ---------------------------------------------------------------------------------------------

def world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum_(t: Tensor) -> Tensor:
    """In-place sum over ranks (no-op in a single process). Not differentiable: statistics only."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """Differentiable mean over ranks (``torch.distributed.nn``): each rank's gradient is the average of all
    ranks' gradients w.r.t. the mean, as for LFQ's codebook entropy over the global batch."""
    n = world_size()
    if n == 1:
        return t
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t, op=dist.ReduceOp.SUM) / n


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast from ``src`` (no-op in a single process): random choices made on one rank."""
    if world_size() > 1:
        dist.broadcast(t, src=src)
    return t


def all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x [n_r, ...]`` of every rank along dim 0, in rank order (ranks may hold different
    ``n_r``). Returns ``x`` in a single process."""
    n = world_size()
    if n == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    m = max(sizes)
    padded = x.new_zeros((m, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)
