"""Deterministic segmented sums: ``segment_sum`` (EMA codebooks, k-means updates, ``mcq_gather``'s backward).

A thin, documented call of the dispatcher op ``torch.ops.fastvq.segment_sum``, followed by its fake (meta)
kernel -- the single place of its shape logic -- and its autograd formula (docs/ops/segment.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_sum(values: Tensor, index: Tensor, num_segments: int,
                weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-segment sums of vectors and of their weights, deterministic on every backend.

    Two forms:

    * single: ``values [N, d]``, ``index [N]`` -> ``sums [K, d]``, ``counts [K]``;
    * grouped (one segment space per group, e.g. MCQ's G codebooks in one call): ``values [N, G, d]``,
      ``index [N, G]`` -> ``sums [G, K, d]``, ``counts [G, K]``,

    where ``K = num_segments`` and ``sums[g, k] = sum of weight[n, g] * values[n, g]`` over the rows ``n``
    with ``index[n, g] == k`` (``counts`` sums the weights; without a weight it is the number of rows).

    Args:
        values: float32 / float16 / bfloat16 / float64, any strides.
        index: int64 or int32 with values' leading shape; ``-1`` skips an entry (a masked row); any other
            value outside ``[0, num_segments)`` raises ``IndexError`` (on CUDA too: the op checks the range
            on the host, which costs one small device->host copy).
        num_segments: ``K >= 0``.
        weight: optional, ``index``'s shape (``[N]`` is also accepted in the grouped form, for all groups);
            any float or bool dtype, converted to the accumulation dtype.

    Returns:
        ``(sums, counts)`` in the accumulation dtype: float32 for float32/float16/bfloat16 values (16-bit
        inputs are accumulated in fp32 and not rounded back), float64 for float64. Every segment is summed
        in ascending row order, one rounding per product and per sum, so CPU and CUDA give bit-identical
        results, independent of the number of threads and of the launch schedule. Counts without a weight
        are exact integers (rounded once to the float).

    Differentiable w.r.t. ``values`` and ``weight`` (the backward is a gather of ``grad_sums`` by index).
    """
    if weight is not None:
        if weight.dim() == 1 and index.dim() == 2:
            weight = weight[:, None].expand(index.shape)
        weight = weight.to(_acc_dtype(values.dtype))
    return torch.ops.fastvq.segment_sum.default(values, index, num_segments, weight)


# ---- fake kernel (shape logic for torch.compile / meta tensors) ---------------------------------------

@torch.library.register_fake("fastvq::segment_sum")
def _segment_sum_fake(values: Tensor, index: Tensor, num_segments: int,
                      weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    torch._check(values.dtype in _FLOATS,
                 lambda: f"segment_sum: values must be float32, float16, bfloat16 or float64, got {values.dtype}")
    torch._check(index.dtype in (torch.int64, torch.int32),
                 lambda: f"segment_sum: index must be int64 or int32, got {index.dtype}")
    torch._check(index.device == values.device,
                 lambda: f"segment_sum: index must be on values' device {values.device}, got {index.device}")
    torch._check((values.dim() == 2 and index.dim() == 1) or (values.dim() == 3 and index.dim() == 2),
                 lambda: "segment_sum: values [N, d] need index [N], values [N, G, d] need index [N, G]; got "
                         f"values shape {list(values.shape)} and index shape {list(index.shape)}")
    torch._check(tuple(index.shape) == tuple(values.shape[:index.dim()]),
                 lambda: f"segment_sum: index must have values' leading shape {list(values.shape[:index.dim()])}, "
                         f"got index shape {list(index.shape)}")
    torch._check(num_segments >= 0, lambda: f"segment_sum: num_segments must be >= 0, got {num_segments}")
    acc = _acc_dtype(values.dtype)
    if weight is not None:
        torch._check(weight.dtype == acc, lambda: f"segment_sum: weight must be {acc}, got {weight.dtype}")
        torch._check(weight.device == values.device,
                     lambda: f"segment_sum: weight must be on values' device {values.device}, got {weight.device}")
        torch._check(tuple(weight.shape) == tuple(index.shape),
                     lambda: f"segment_sum: weight must have index's shape {list(index.shape)}, got {list(weight.shape)}")
    lead = (values.shape[1], num_segments) if index.dim() == 2 else (num_segments,)
    return values.new_empty((*lead, values.shape[-1]), dtype=acc), values.new_empty(lead, dtype=acc)


# ---- autograd -----------------------------------------------------------------------------------------

def _segment_sum_setup_context(ctx, inputs, output):
    values, index, num_segments, weight = inputs
    ctx.values_dtype = values.dtype
    ctx.has_weight = weight is not None
    ctx.save_for_backward(values if ctx.has_weight else None, index, weight)


def _gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """table [K, ...] or [G, K, ...] gathered at index [N] or [N, G] (-1 -> zeros): [N, ...] or [N, G, ...]."""
    valid = index >= 0
    k = index.long().clamp(min=0)
    if index.dim() == 1:
        rows = table[k]
    else:
        rows = table[torch.arange(index.shape[1], device=index.device), k]
    mask = valid.reshape(*valid.shape, *([1] * (rows.dim() - valid.dim())))
    return torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def _segment_sum_backward(ctx, grad_sums: Tensor | None, grad_counts: Tensor | None):
    values, index, weight = ctx.saved_tensors
    grad_values = grad_weight = None
    g_rows = _gather_rows(grad_sums, index) if grad_sums is not None else None  # [N, (G,) d]
    if ctx.needs_input_grad[0] and g_rows is not None:
        grad_values = (g_rows * weight[..., None] if weight is not None else g_rows).to(ctx.values_dtype)
    if ctx.has_weight and ctx.needs_input_grad[3]:
        grad_weight = torch.zeros_like(weight)
        if g_rows is not None:
            grad_weight = grad_weight + (g_rows * values.to(g_rows.dtype)).sum(-1)
        if grad_counts is not None:
            grad_weight = grad_weight + _gather_rows(grad_counts, index)
    return grad_values, None, None, grad_weight


torch.library.register_autograd(
    "fastvq::segment_sum", _segment_sum_backward, setup_context=_segment_sum_setup_context)
