"""Batched k-means (Lloyd) on fastvq's nearest-code search and segment sums (docs/ops/segment.md).

Not a dispatcher op of its own: every iteration is one :func:`fastvq.ops.mcq_search` (the assignment, which
picks its fastest path by shape) and one :func:`fastvq.ops.segment_sum` (the update), plus a few
elementwise torch ops, so it runs on any device those ops run on, and is deterministic wherever they are.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvq.ops.mcq import mcq_search
from fastvq.ops.segment import segment_sum

COSINE_EPS = 1e-6


class KMeansResult(NamedTuple):
    """What :func:`kmeans` returns (unpacks as a tuple)."""
    centroids: Tensor  # [K, d] or [G, K, d]; float32 (float64 for float64 x)
    indices: Tensor  # [N] or [N, G] int64: the nearest returned centroid of every row
    inertia: Tensor  # [] or [G]: sum over rows of the distance to that centroid
    inertia_history: Tensor  # [iters + 1] or [iters + 1, G]: inertia before each update, then the final one


def _distance(scores: Tensor, metric: str) -> Tensor:
    """mcq_search's scores -> distances (l2: squared distance; cosine: 1 - cosine)."""
    return scores if metric == "l2" else 1.0 - scores


def _init_random(xs: Tensor, K: int, gen: torch.Generator) -> Tensor:
    """K distinct rows per group, uniformly without replacement: [G, K, d]."""
    N, G, _ = xs.shape
    picks = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(G)], dim=0)  # [G, K]
    return xs[picks.to(xs.device), torch.arange(G, device=xs.device)[:, None]]


def _init_kmeanspp(xs: Tensor, K: int, gen: torch.Generator, metric: str) -> Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007): the first centre uniformly, each next one with probability
    proportional to the distance to the nearest centre chosen so far (l2: squared distance; cosine: 1 - cos).
    K sequential steps of O(N d) per group."""
    N, G, d = xs.shape
    out = xs.new_empty(G, K, d)
    for g in range(G):
        x = xs[:, g]  # [N, d]
        first = int(torch.randint(N, (1,), generator=gen))
        out[g, 0] = x[first]
        best = torch.full((N,), float("inf"), dtype=x.dtype, device=x.device)
        for i in range(1, K):
            c = out[g, i - 1]
            dist = ((x - c) ** 2).sum(-1) if metric == "l2" else 1.0 - x @ c
            best = torch.minimum(best, dist.clamp(min=0))
            cdf = torch.cumsum(best, 0)
            u = torch.rand((1,), generator=gen, dtype=torch.float64).to(device=x.device, dtype=cdf.dtype) * cdf[-1]
            # the first row whose cumulative weight exceeds u (rows already chosen have weight 0);
            # if every weight is 0 (fewer distinct rows than K), any row will do: take the first
            pick = torch.searchsorted(cdf, u, right=True).clamp(max=N - 1)
            out[g, i] = x[pick[0]]
    return out


def kmeans(x: Tensor, num_clusters: int, iters: int = 20, seed: int = 0, metric: str = "l2",
           init: str | Tensor = "random") -> KMeansResult:
    """Lloyd's k-means on ``x [N, d]``, or G independent k-means problems at once on ``x [N, G, d]`` (one
    per group, e.g. the G codebooks of an MCQ layer).

    Each iteration assigns every row to its nearest centroid (:func:`fastvq.ops.mcq_search`, the same
    search, metric, fp32 arithmetic and tie rule as the quantizers) and moves every centroid to the mean
    of its rows (:func:`fastvq.ops.segment_sum`). A cluster left empty is refilled with a far point: the
    empty clusters of a group, in increasing index order, take the rows with the largest distance to
    their own centroid in that iteration's assignment, in decreasing distance order (ties: lower row
    first). Inertia (the sum of distances) never increases from one iteration to the next.

    Args:
        x: ``[N, d]`` or ``[N, G, d]``, float32 / float16 / bfloat16 / float64, finite, ``N >= num_clusters``.
            16-bit inputs are converted to float32.
        num_clusters: ``K >= 1``.
        iters: Lloyd iterations (``>= 0``); 0 returns the initial centroids with their assignment.
        seed: seeds the ``torch.Generator`` (CPU) that draws the initial centroids: the result is a
            deterministic function of ``(x, num_clusters, iters, seed, metric, init)``, on any device and for
            any number of threads.
        metric: ``"l2"`` (squared Euclidean distance, centroids are means) or ``"cosine"`` (spherical
            k-means: rows are L2-normalised, distance ``1 - cos``, centroids are normalised sums).
        init: ``"random"`` (default, as faiss and vector-quantize-pytorch: K distinct rows drawn uniformly
            per group), ``"kmeans++"`` (D^2 sampling; K sequential steps, for K up to a few thousand) or a
            tensor of initial centroids ``[K, d]`` / ``[G, K, d]``.

    Returns:
        :class:`KMeansResult` ``(centroids, indices, inertia, inertia_history)``: centroids ``[K, d]`` /
        ``[G, K, d]`` (float32, float64 for float64 x; cosine: unit norm); indices ``[N]`` / ``[N, G]``
        int64 and inertia ``[]`` / ``[G]`` for the returned centroids; inertia_history ``[iters + 1]`` /
        ``[iters + 1, G]``: the inertia of each iteration's assignment, then the final one.
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f'kmeans: metric must be "l2" or "cosine", got {metric!r}')
    if x.dim() not in (2, 3):
        raise ValueError(f"kmeans: x must be [N, d] or [N, G, d], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"kmeans: x must be floating point, got {x.dtype}")
    if iters < 0:
        raise ValueError(f"kmeans: iters must be >= 0, got {iters}")
    grouped = x.dim() == 3
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = (x if grouped else x[:, None]).detach().to(work)  # [N, G, d]
    N, G, d = xs.shape
    K = num_clusters
    if K < 1 or K > N:
        raise ValueError(f"kmeans: num_clusters must be in [1, N] = [1, {N}], got {K}")
    if not bool(torch.isfinite(xs).all()):
        raise ValueError("kmeans: x must be finite (it holds a NaN or an infinity)")
    if metric == "cosine":
        xs = F.normalize(xs, dim=-1, eps=COSINE_EPS)

    gen = torch.Generator().manual_seed(seed)
    if isinstance(init, Tensor):
        want = (G, K, d) if grouped else (K, d)
        if tuple(init.shape) != want:
            raise ValueError(f"kmeans: init centroids must be {list(want)}, got {list(init.shape)}")
        C = (init if grouped else init[None]).detach().to(device=xs.device, dtype=work).clone()
    elif init == "random":
        C = _init_random(xs, K, gen)
    elif init == "kmeans++":
        C = _init_kmeanspp(xs, K, gen, metric)
    else:
        raise ValueError(f'kmeans: init must be "random", "kmeans++" or a tensor, got {init!r}')

    groups = torch.arange(G, device=xs.device)
    history = []
    for _ in range(iters):
        idx, scores = mcq_search(xs, C, metric)  # [N, G]
        dist = _distance(scores, metric).to(work)
        history.append(dist.sum(0))
        sums, counts = segment_sum(xs, idx, K)  # [G, K, d], [G, K]
        if metric == "l2":
            new = sums / counts.clamp(min=1)[..., None]
        else:
            new = F.normalize(sums, dim=-1, eps=COSINE_EPS)
        empty = counts == 0  # [G, K]
        # the r-th empty cluster of group g takes the row with the r-th largest distance in group g
        far = torch.sort(dist, dim=0, descending=True, stable=True).indices  # [N, G]
        rank = (torch.cumsum(empty.long(), dim=1) - 1).clamp(0, N - 1)  # [G, K]
        rows = far.gather(0, rank.t()).t()  # [G, K]
        C = torch.where(empty[..., None], xs[rows, groups[:, None]], new.to(work))
    idx, scores = mcq_search(xs, C, metric)
    dist = _distance(scores, metric).to(work)
    history.append(dist.sum(0))
    hist = torch.stack(history, 0)  # [iters + 1, G]
    if grouped:
        return KMeansResult(C, idx, hist[-1], hist)
    return KMeansResult(C[0], idx[:, 0], hist[-1, 0], hist[:, 0])
