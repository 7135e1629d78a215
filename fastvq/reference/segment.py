"""Pure-PyTorch reference of segment_sum: the test oracle and the benchmark baseline.

It implements the documented semantics (docs/ops/segment.md) the way a PyTorch user writes them: one
``index_add_`` of the (weighted) rows into a zero table of ``G * K`` segments.
"""
from __future__ import annotations

import torch
from torch import Tensor


def segment_sum_ref(values: Tensor, index: Tensor, num_segments: int,
                    weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference of :func:`fastvq.ops.segment_sum`: values [N, d] + index [N] -> (sums [K, d], counts [K]),
    or values [N, G, d] + index [N, G] -> (sums [G, K, d], counts [G, K]); -1 skips an entry; sums and
    counts in float32 (float64 for float64 values)."""
    grouped = index.dim() == 2
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    K = num_segments
    v = values.to(acc) if grouped else values.to(acc)[:, None]  # [N, G, d]
    idx = (index if grouped else index[:, None]).long()  # [N, G]
    N, G, d = v.shape
    bad = (idx < -1) | (idx >= K)
    if bool(bad.any()):
        raise IndexError(f"segment_sum_ref: index must be in [0, {K}) or -1, got {idx[bad][0].item()}")
    w = None
    if weight is not None:
        w = weight.to(acc)
        w = (w[:, None] if w.dim() == 1 else w).expand(N, G)
    valid = idx >= 0
    keys = (idx + torch.arange(G, device=idx.device) * K)[valid]  # [M_valid]
    rows = v[valid]  # [M_valid, d]
    wv = w[valid] if w is not None else torch.ones(keys.shape, dtype=acc, device=v.device)
    if w is not None:
        rows = rows * wv[:, None]
    sums = torch.zeros(G * K, d, dtype=acc, device=v.device).index_add_(0, keys, rows)
    counts = torch.zeros(G * K, dtype=acc, device=v.device).index_add_(0, keys, wv)
    if grouped:
        return sums.view(G, K, d), counts.view(G, K)
    return sums.view(K, d), counts.view(K)
