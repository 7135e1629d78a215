"""Pure-PyTorch references of the mcq ops: the test oracle and the benchmark baseline.

They implement exactly the documented semantics (docs/ops/mcq.md) the way a PyTorch user would write
them: one [N, K] objective matrix per codebook group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COSINE_EPS = 1e-6


def mcq_search_ref(z: Tensor, codebooks: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Reference of :func:`fastvq.ops.mcq_search`. z [..., G, d], codebooks [G, K, d] ->
    (indices int64 [..., G], scores float32 [..., G])."""
    if metric not in ("l2", "cosine"):
        raise ValueError(f'mcq_search_ref: metric must be "l2" or "cosine", got {metric!r}')
    G, K, d = codebooks.shape
    lead = z.shape[:-2]
    x_all = z.float().reshape(-1, G, d)
    cb = codebooks.float()
    N = x_all.shape[0]
    indices = torch.zeros(N, G, dtype=torch.long, device=z.device)
    scores = torch.zeros(N, G, dtype=torch.float, device=z.device)
    neg_inf = float("-inf")
    for g in range(G):
        x, c = x_all[:, g], cb[g]  # [N, d], [K, d]
        code_ok = torch.isfinite(c).all(-1)  # [K]
        row_ok = torch.isfinite(x).all(-1)  # [N]
        c = torch.where(code_ok[:, None], c, torch.zeros_like(c))
        if metric == "l2":
            # argmin ||x - c||^2 == argmax (x . c - ||c||^2 / 2)
            obj = x @ c.T - 0.5 * (c * c).sum(-1)
        else:
            obj = F.normalize(x, dim=-1, eps=COSINE_EPS) @ F.normalize(c, dim=-1, eps=COSINE_EPS).T
        obj = obj.masked_fill(~code_ok, neg_inf).nan_to_num(nan=neg_inf, posinf=float("inf"))
        idx = obj.argmax(-1)  # the first maximum: ties -> the smallest k
        best = obj.gather(-1, idx[:, None])[:, 0]
        valid = row_ok & (best > neg_inf)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        if metric == "l2":
            score = ((x - c[idx]) ** 2).sum(-1)
        else:
            score = best
        indices[:, g] = idx
        scores[:, g] = torch.where(valid, score, torch.full_like(score, float("nan")))
    return indices.reshape(*lead, G), scores.reshape(*lead, G)


FP32_UNIT_ROUNDOFF = 2.0 ** -24


def mcq_search_eps(z: Tensor, codebooks: Tensor, metric: str = "l2") -> Tensor:
    """The exactness contract of :func:`fastvq.ops.mcq_search` (docs/ops/mcq.md, "Exactness contract"):
    per row and group, the ``eps`` for which

    - the returned code is the exact nearest code (of the fp32-rounded inputs) whenever the exact gap
      between the best and the second-best objective exceeds ``eps``, and
    - the returned code is always within ``eps`` of the best (l2: squared distance; cosine: cosine).

    With ``gamma_d = d * u / (1 - d * u)``, ``u = 2**-24`` (fp32 unit roundoff) and ``C`` the largest
    code norm of the group: l2 ``eps = 4.04 * gamma_d * C * (C + ||z||)``, cosine
    ``eps = 4.04 * gamma_d + 8.1 * u``. z [..., G, d], codebooks [G, K, d] -> float64 [..., G]."""
    G, K, d = codebooks.shape
    u = FP32_UNIT_ROUNDOFF
    gamma = d * u / (1 - d * u)
    zn = z.float().double().norm(dim=-1)  # [..., G]
    if metric == "cosine":
        return torch.full_like(zn, 4.04 * gamma + 8.1 * u)
    cb = codebooks.float().double()
    finite = torch.isfinite(cb).all(-1)
    cn = torch.where(finite, cb.norm(dim=-1), torch.zeros((), dtype=torch.float64))  # [G, K]
    C = cn.amax(-1)  # [G]
    return 4.04 * gamma * C * (C + zn)


def mcq_gather_ref(indices: Tensor, codebooks: Tensor) -> Tensor:
    """Reference of :func:`fastvq.ops.mcq_gather`: codebooks[g, indices[..., g]] -> [..., G, d], zeros where
    the index is -1 (a masked row)."""
    G, K = codebooks.shape[:2]
    indices = indices.long()
    if ((indices < -1) | (indices >= K)).any():
        raise IndexError(f"mcq_gather_ref: indices must be in [0, {K}) or -1")
    groups = torch.arange(G, device=indices.device)
    masked = indices == -1
    out = codebooks[groups, indices.clamp_min(0)] if K else codebooks.new_zeros((*indices.shape, codebooks.shape[2]))
    return out.masked_fill(masked[..., None], 0)


def multi_codebook_quantize_ref(
    z: Tensor,
    codebooks: Tensor,
    metric: str = "cosine",
    commitment_weight: float = 0.25,
    codebook_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :class:`fastvq.nn.MultiCodebookQuantizer`'s forward. z [..., G*d],
    codebooks [G, K, d] -> (quantized [..., G*d], indices [..., G], loss scalar)."""
    G, K, d = codebooks.shape
    zc = z.reshape(*z.shape[:-1], G, d)
    if metric == "cosine":
        zc = F.normalize(zc, dim=-1, eps=COSINE_EPS)
    indices, _ = mcq_search_ref(zc.detach(), codebooks.detach(), metric)
    q = mcq_gather_ref(indices, codebooks)
    if metric == "cosine":
        q = F.normalize(q, dim=-1, eps=COSINE_EPS)
    loss = commitment_weight * F.mse_loss(zc, q.detach()) + codebook_weight * F.mse_loss(zc.detach(), q)
    quantized = zc + (q.to(zc.dtype) - zc).detach()
    return quantized.reshape(z.shape), indices, loss
