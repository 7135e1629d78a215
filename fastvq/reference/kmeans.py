"""Pure-PyTorch reference of fastvq.ops.kmeans: plain Lloyd iterations (dense distances, argmin,
index_add_), with the same empty-cluster rule, from given initial centroids. The test oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kmeans_ref(x: Tensor, init: Tensor, iters: int, metric: str = "l2") -> tuple[Tensor, Tensor, Tensor]:
    """x [N, d] / [N, G, d], init [K, d] / [G, K, d] -> (centroids, indices [N] / [N, G],
    inertia_history [iters + 1] / [iters + 1, G]), as :func:`fastvq.ops.kmeans` documents them."""
    grouped = x.dim() == 3
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = (x if grouped else x[:, None]).to(work)
    C = (init if grouped else init[None]).to(work).clone()
    if metric == "cosine":
        xs = F.normalize(xs, dim=-1, eps=1e-6)
    N, G, d = xs.shape
    K = C.shape[1]

    def assign(C):
        idx = torch.empty(N, G, dtype=torch.long)
        dist = torch.empty(N, G, dtype=work)
        for g in range(G):
            if metric == "l2":
                D = ((xs[:, g, None, :] - C[g][None]) ** 2).sum(-1)  # [N, K]
            else:
                D = 1.0 - xs[:, g] @ F.normalize(C[g], dim=-1, eps=1e-6).T
            dist[:, g], idx[:, g] = D.min(-1)
        return idx, dist

    history = []
    for _ in range(iters):
        idx, dist = assign(C)
        history.append(dist.sum(0))
        new = torch.empty_like(C)
        for g in range(G):
            sums = torch.zeros(K, d, dtype=work).index_add_(0, idx[:, g], xs[:, g])
            counts = torch.zeros(K, dtype=work).index_add_(0, idx[:, g], torch.ones(N, dtype=work))
            new[g] = sums / counts.clamp(min=1)[:, None] if metric == "l2" else F.normalize(sums, dim=-1, eps=1e-6)
            far = torch.sort(dist[:, g], descending=True, stable=True).indices
            for r, k in enumerate(torch.nonzero(counts == 0).flatten().tolist()):
                new[g, k] = xs[far[r], g]
        C = new
    idx, dist = assign(C)
    history.append(dist.sum(0))
    hist = torch.stack(history)
    if grouped:
        return C, idx, hist
    return C[0], idx[:, 0], hist[:, 0]
