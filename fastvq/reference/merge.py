"""Pure-PyTorch references of the merge ops (ToMe bipartite token merging with an integer source map): the
test oracles and the benchmark baseline.

- :func:`bipartite_merge_ref`: one bipartite soft-matching merge step, exactly the semantics of
  :func:`fastvq.ops.bipartite_merge` (matching in float64, merging in float64, explicit tie rules).
- :func:`compose_source_ref` / :func:`unmerge_ref`: the integer source map ``[B, T0]`` (original position
  -> current token) updated by a step's ``assign``, and the recovery of the full grid as a gather.
- :func:`tome_merge_dense_ref` / :func:`unmerge_dense_ref`: the way the public ToMe / MergeVQ code does it,
  with a dense one-hot source matrix ``[B, T, T0]`` updated by ``scatter_reduce("amax")`` and recovery as a
  matrix product. The speed and memory baseline of the benchmark.

The semantics are documented in docs/ops/merge.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
COSINE_EPS = 1e-6  # F.normalize's eps: cosine(a, b) = <a, b> / (max(|a|, eps) max(|b|, eps))


def mergeable_count(tokens: int, protect_first: bool = False) -> int:
    """How many tokens one :func:`bipartite_merge_ref` step on ``tokens`` tokens can merge at most: the
    size of set A (``ceil(T / 2)``), less token 0 when ``protect_first``, and 0 when set B is empty
    (``T < 2``)."""
    if tokens < 2:
        return 0
    return (tokens + 1) // 2 - (1 if protect_first else 0)


def _check_float(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_merge_inputs(op: str, x: Tensor, metric: Tensor, sizes: Tensor) -> None:
    """Shapes, dtypes and devices of ``x [B, T, C]``, ``metric [B, T, Cm]``, ``sizes [B, T]`` (> 0)."""
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, T, C], got shape {list(x.shape)}")
    if metric.dim() != 3 or metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"{op}: metric must be [B, T, Cm] with B, T = {list(x.shape[:2])} (from x), "
                         f"got shape {list(metric.shape)}")
    if sizes.dim() != 2 or sizes.shape != x.shape[:2]:
        raise ValueError(f"{op}: sizes must be [B, T] = {list(x.shape[:2])} (from x), got shape {list(sizes.shape)}")
    for name, t in (("x", x), ("metric", metric), ("sizes", sizes)):
        _check_float(op, name, t)
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {t.device}")
    if sizes.numel() and not bool((sizes > 0).all()):
        raise ValueError(f"{op}: sizes must be > 0 (each token stands for at least part of one original token)")


def _check_r(op: str, r: int, tokens: int, protect_first: bool) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"{op}: r must be an int, got {type(r).__name__}")
    limit = mergeable_count(tokens, protect_first)
    if not 0 <= r <= limit:
        raise ValueError(f"{op}: r must be in [0, {limit}] (the mergeable tokens of set A for T={tokens}, "
                         f"protect_first={protect_first}), got r={r}")


def _check_source(op: str, source: Tensor, batch: int, tokens: int, device: torch.device) -> None:
    if source.dtype != torch.int64:
        raise ValueError(f"{op}: source must be int64, got {source.dtype}")
    if source.dim() != 2 or source.shape[0] != batch:
        raise ValueError(f"{op}: source must be [B, T0] with B = {batch}, got shape {list(source.shape)}")
    if source.device != device:
        raise ValueError(f"{op}: source must be on device {device}, got {source.device}")
    if source.numel() and not bool(((source >= 0) & (source < tokens)).all()):
        raise ValueError(f"{op}: source values must be token indices in [0, {tokens})")


def cosine_match(metric: Tensor) -> tuple[Tensor, Tensor]:
    """Best partner in set B of every token of set A, in float64.

    Args:
        metric: ``[B, T, Cm]`` float, ``T >= 2``. A = even positions, B = odd positions.

    Returns:
        ``(best, score)``: int64 ``[B, ceil(T/2)]``, the index *within B* (``best = j`` is position
        ``2j + 1``) of the highest cosine (ties -> the smaller index), and float64 ``[B, ceil(T/2)]``, that
        cosine. A NaN cosine (a non-finite metric row) counts as ``-inf``.
    """
    m = metric.detach().double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
    scores = torch.where(scores.isnan(), -math.inf, scores)
    best = scores.argmax(dim=-1)  # the first maximal value: ties -> smaller b
    return best, scores.gather(-1, best.unsqueeze(-1)).squeeze(-1)


def bipartite_merge_ref(x: Tensor, metric: Tensor, sizes: Tensor, r: int,
                        protect_first: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`fastvq.ops.bipartite_merge`: one ToMe bipartite soft-matching merge step.

    Set A = the tokens at even positions ``0, 2, 4, ...`` (``ceil(T/2)`` of them), set B = the odd positions
    ``1, 3, 5, ...`` (``floor(T/2)``).

    1. Matching (float64, no gradient): ``best[a] = argmax_b cosine(metric[a], metric[b])`` (ties -> the
       smaller ``b``; cosine with ``F.normalize``'s ``eps = 1e-6``; a NaN cosine counts as ``-inf``),
       ``score[a]`` = that cosine.
    2. Selection: the ``r`` mergeable A tokens (all of A, less token 0 when ``protect_first``) with the
       highest score merge into their ``best[a]``; ties -> the smaller index (a stable descending sort).
    3. Output order: the unmerged A tokens in ascending position, then every B token in ascending position
       (``T - r`` tokens). Unmerged A tokens are copied; B token ``b`` becomes
       ``(x_b s_b + sum_{a -> b, ascending a} x_a s_a) / (s_b + sum s_a)``, in float64 (copied when
       nothing merged into it).

    Args:
        x: ``[B, T, C]`` float32 / float16 / bfloat16 / float64: the features to merge.
        metric: ``[B, T, Cm]`` float: the similarity features (ToMe: attention keys averaged over heads).
        sizes: ``[B, T]`` float, ``> 0``: how many original tokens each token stands for.
        r: how many tokens to merge, ``0 <= r <= mergeable_count(T, protect_first)``.
        protect_first: never merge token 0 (a class token).

    Returns:
        ``(merged, merged_sizes, assign)``: ``[B, T - r, C]`` in ``x.dtype``, ``[B, T - r]`` in
        ``sizes.dtype``, and int64 ``[B, T]``, the output slot of every input token. Differentiable w.r.t.
        ``x`` (and ``sizes``); the matching is not.
    """
    op = "bipartite_merge_ref"
    _check_merge_inputs(op, x, metric, sizes)
    n, T, C = x.shape
    _check_r(op, r, T, protect_first)
    na, nb = (T + 1) // 2, T // 2
    keep = na - r  # unmerged A tokens: output slots [0, keep); B token j: slot keep + j
    dev = x.device

    with torch.no_grad():
        if r > 0:
            best, score = cosine_match(metric)  # [n, na] each
            first = 1 if protect_first else 0
            order = torch.sort(score[:, first:], dim=1, descending=True, stable=True).indices + first
            src = order[:, :r].sort(dim=1).values  # [n, r] merged A indices, ascending
            dst = best.gather(1, src)  # [n, r] their B indices
        else:
            src = dst = torch.zeros(n, 0, dtype=torch.long, device=dev)
        is_merged = torch.zeros(n, na, dtype=torch.bool, device=dev).scatter_(1, src, True)
        # a stable sort of the 0/1 flags lists the unmerged A tokens first, in ascending order
        unm = torch.sort(is_merged.to(torch.uint8), dim=1, stable=True).indices[:, :keep]  # [n, keep]
        a_assign = torch.cumsum(~is_merged, dim=1) - 1  # slot of an unmerged A token
        a_assign.scatter_(1, src, keep + dst)
        assign = torch.empty(n, T, dtype=torch.long, device=dev)
        assign[:, 0::2] = a_assign
        assign[:, 1::2] = keep + torch.arange(nb, device=dev)

    xd, sd = x.double(), sizes.double()
    xa, xb, sa, sb = xd[:, 0::2], xd[:, 1::2], sd[:, 0::2], sd[:, 1::2]
    unm_x = xa.gather(1, unm.unsqueeze(-1).expand(n, keep, C))
    unm_s = sa.gather(1, unm)
    # flattened [n * nb] rows; index_add accumulates in index order on CPU: x_b s_b first, then ascending a
    rows = (torch.arange(n, device=dev).unsqueeze(1) * nb + dst).reshape(-1)  # [n * r]
    src_xs = (xa * sa.unsqueeze(-1)).gather(1, src.unsqueeze(-1).expand(n, r, C)).reshape(-1, C)
    num = (xb * sb.unsqueeze(-1)).reshape(n * nb, C).index_add(0, rows, src_xs).view(n, nb, C)
    den = sb.reshape(n * nb).index_add(0, rows, sa.gather(1, src).reshape(-1)).view(n, nb)
    # a B token nothing merged into is copied (x_b s_b / s_b could be off by an ulp in float64)
    absorbed = torch.zeros(n, nb, dtype=torch.bool, device=dev).scatter_(1, dst, True).unsqueeze(-1)
    merged_b = torch.where(absorbed, num / den.unsqueeze(-1), xb)
    merged = torch.cat([unm_x, merged_b], dim=1).to(x.dtype)
    merged_sizes = torch.cat([unm_s, den], dim=1).to(sizes.dtype)
    return merged, merged_sizes, assign


def compose_source_ref(source: Tensor, assign: Tensor) -> Tensor:
    """Reference of :func:`fastvq.ops.compose_source`: ``source'[b, p] = assign[b, source[b, p]]``.

    Args:
        source: int64 ``[B, T0]``: the current token (in ``[0, T)``) of every original position; start
            from ``arange(T0)`` per image.
        assign: int64 ``[B, T]``: a merge step's output slot of each of its ``T`` input tokens.

    Returns:
        int64 ``[B, T0]``: the token after the step of every original position.
    """
    op = "compose_source_ref"
    if assign.dtype != torch.int64 or assign.dim() != 2:
        raise ValueError(f"{op}: assign must be int64 [B, T], got {assign.dtype} of shape {list(assign.shape)}")
    _check_source(op, source, assign.shape[0], assign.shape[1], assign.device)
    return assign.gather(1, source)


def unmerge_ref(merged: Tensor, source: Tensor) -> Tensor:
    """Reference of :func:`fastvq.ops.unmerge`: the full grid back, ``out[b, p] = merged[b, source[b, p]]``.

    Args:
        merged: ``[B, T, C]`` float: the merged tokens.
        source: int64 ``[B, T0]``: the token of every original position, values in ``[0, T)``.

    Returns:
        ``[B, T0, C]`` in ``merged.dtype``. Differentiable w.r.t. ``merged`` (the backward sums the
        gradients of every position a token stands for).
    """
    op = "unmerge_ref"
    if merged.dim() != 3:
        raise ValueError(f"{op}: merged must be [B, T, C], got shape {list(merged.shape)}")
    _check_float(op, "merged", merged)
    _check_source(op, source, merged.shape[0], merged.shape[1], merged.device)
    return merged.gather(1, source.unsqueeze(-1).expand(-1, -1, merged.shape[2]))


# ---- the public ToMe / MergeVQ way: a dense source matrix (the benchmark baseline) ----------------------

def tome_merge_dense_ref(x: Tensor, metric: Tensor, sizes: Tensor, source: Tensor | None, r: int,
                         protect_first: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One merge step as ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` + ``merge_source`` (and
    MergeVQ, which uses them) compute it, with a dense one-hot source matrix. The benchmark baseline.

    Matching: ``metric`` L2-normalised, ``scores = a @ b^T``, the class token's row ``-inf`` when
    ``protect_first``, ``node_max, node_idx = scores.max(-1)``, ``edge_idx = argsort(node_max, descending)``
    split into the ``r`` merged (``src``) and the unmerged tokens; merging by ``gather`` +
    ``scatter_reduce`` (``"sum"`` of ``x * size`` and of ``size``, then a division; ``"amax"`` of the source
    rows). Deliberate differences from ToMe, so results compare with :func:`bipartite_merge_ref`: the
    argsort is stable (ties -> the smaller index), the unmerged A tokens are always re-sorted to ascending
    position (ToMe does so only with a class token), the normalisation uses ``eps = 1e-6``, and ``r`` is
    validated instead of clamped. ``r == 0`` returns the inputs unchanged (ToMe's ``do_nothing``), where
    :func:`bipartite_merge_ref` still reorders the tokens (A, then B). Everything runs in the input dtypes
    (a speed baseline, not an oracle); ``metric`` must be finite.

    Args:
        x: ``[B, T, C]`` float; metric: ``[B, T, Cm]`` float; sizes: ``[B, T]`` float ``> 0``.
        source: ``[B, T, T0]`` float, one one-hot row per current token (``None``: ``eye(T)`` per image).
        r: ``0 <= r <= mergeable_count(T, protect_first)``.
        protect_first: never merge token 0.

    Returns:
        ``(merged [B, T - r, C] in x.dtype, merged_sizes [B, T - r], source [B, T - r, T0])``.
    """
    op = "tome_merge_dense_ref"
    _check_merge_inputs(op, x, metric, sizes)
    n, T, C = x.shape
    _check_r(op, r, T, protect_first)
    if source is None:
        source = torch.eye(T, dtype=x.dtype, device=x.device).expand(n, T, T)
    elif source.dim() != 3 or source.shape[:2] != x.shape[:2]:
        raise ValueError(f"{op}: source must be [B, T, T0] with B, T = {list(x.shape[:2])}, "
                         f"got shape {list(source.shape)}")
    if r == 0:
        return x, sizes, source

    with torch.no_grad():
        m = F.normalize(metric, dim=-1, eps=COSINE_EPS)
        a, b = m[..., ::2, :], m[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)  # [B, |A|, |B|]
        if protect_first:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[..., r:, :].sort(dim=1).values  # unmerged tokens, ascending position
        src_idx = edge_idx[..., :r, :]  # merged tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t: Tensor, mode: str) -> Tensor:
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        _, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    size = sizes[..., None]
    merged_xs = merge(x * size, "sum")
    merged_size = merge(size, "sum")
    merged = (merged_xs / merged_size).to(x.dtype)
    return merged, merged_size[..., 0], merge(source, "amax")


def unmerge_dense_ref(merged: Tensor, source: Tensor) -> Tensor:
    """The public way of recovering the grid from a dense source: ``source^T @ merged``.

    Args:
        merged: ``[B, T, C]`` float; source: ``[B, T, T0]`` one-hot columns (as :func:`tome_merge_dense_ref`).

    Returns:
        ``[B, T0, C]`` in ``merged.dtype``.
    """
    if merged.dim() != 3 or source.dim() != 3 or source.shape[:2] != merged.shape[:2]:
        raise ValueError(f"unmerge_dense_ref: merged must be [B, T, C] and source [B, T, T0] with the same "
                         f"B, T, got {list(merged.shape)} and {list(source.shape)}")
    return source.transpose(1, 2).to(merged.dtype) @ merged
