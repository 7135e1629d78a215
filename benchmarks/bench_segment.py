"""Benchmarks of segment_sum (against index_add_, scatter_reduce and sort + segment_reduce) and of kmeans
(against faiss.Kmeans), at the shapes of EMA codebooks (issue 12).

segment_sum rows: one call = the per-segment sums and counts of float32 values [N, (G,) d] by an int64
index (no -1 entries), every implementation computing both. ``bytes`` = values read + index read + sums and
counts written (the minimal traffic), reported as GB/s against the copy bandwidth the run measures.
kmeans rows: one call = ``iters`` Lloyd iterations from a seeded random init, on float32 torch.randn data;
``extra_info["inertia"]`` is the final inertia of the returned centroids, computed untimed by one exact
faiss flat search for every implementation (so both are judged by the same measure).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch
from torch import Tensor

from fastvq.bench import timed_row
from fastvq.ops import kmeans, segment_sum

if TYPE_CHECKING:
    from conftest import BenchConfig
    from pytest_benchmark.fixture import BenchmarkFixture


@dataclass(frozen=True)
class SegCase:
    name: str
    n: int
    g: int | None  # None: the single form
    k: int
    d: int

    def group(self, n: int) -> str:
        shape = f"{n}x{self.d}" if self.g is None else f"{n}x{self.g}x{self.d}"
        return f"segment_sum {shape} -> K={self.k}"


SEG_CASES = [
    SegCase("llamagen", 65536, None, 16384, 8),   # LlamaGen EMA: 65,536 tokens x d 8, 16,384 codes
    SegCase("vqrae", 16384, None, 16384, 1536),   # VQRAE: 16,384 tokens x d 1,536, 16,384 codes
    SegCase("unitok", 16384, 8, 4096, 8),         # UniTok: 16,384 tokens x 8 groups x d 8, 4,096 codes each
]


@functools.cache
def seg_inputs(case: SegCase, n: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    lead = (n,) if case.g is None else (n, case.g)
    return torch.randn(*lead, case.d, generator=gen), torch.randint(case.k, lead, generator=gen)


def _flat(values: Tensor, index: Tensor, K: int) -> tuple[Tensor, Tensor, int]:
    """values [N, (G,) d], index [N, (G)] -> rows [M, d], keys [M] of G * K segments."""
    if index.dim() == 1:
        return values, index, K
    G = index.shape[1]
    return values.reshape(-1, values.shape[-1]), (index + torch.arange(G) * K).reshape(-1), G * K


def _shape(sums: Tensor, counts: Tensor, index: Tensor, K: int) -> tuple[Tensor, Tensor]:
    if index.dim() == 1:
        return sums, counts
    return sums.view(index.shape[1], K, -1), counts.view(index.shape[1], K)


def index_add(values: Tensor, index: Tensor, K: int) -> tuple[Tensor, Tensor]:
    rows, keys, S = _flat(values, index, K)
    sums = rows.new_zeros(S, rows.shape[1]).index_add_(0, keys, rows)
    counts = torch.bincount(keys, minlength=S).float()
    return _shape(sums, counts, index, K)


def scatter_reduce(values: Tensor, index: Tensor, K: int) -> tuple[Tensor, Tensor]:
    rows, keys, S = _flat(values, index, K)
    sums = rows.new_zeros(S, rows.shape[1]).scatter_reduce_(0, keys[:, None].expand_as(rows), rows, "sum")
    counts = torch.bincount(keys, minlength=S).float()
    return _shape(sums, counts, index, K)


def sort_segment_reduce(values: Tensor, index: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """The deterministic pure-PyTorch formulation: stable sort by segment, then torch.segment_reduce."""
    rows, keys, S = _flat(values, index, K)
    order = torch.sort(keys, stable=True).indices
    lengths = torch.bincount(keys, minlength=S)
    sums = torch.segment_reduce(rows[order], "sum", lengths=lengths, unsafe=True)
    return _shape(sums, lengths.float(), index, K)


SEG_IMPLS: dict[str, Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]] = {
    "fastvq": segment_sum, "reference": index_add, "scatter_reduce": scatter_reduce,
    "sort+segment_reduce": sort_segment_reduce}


@pytest.mark.parametrize("impl", SEG_IMPLS)
@pytest.mark.parametrize("case", SEG_CASES, ids=lambda c: c.name)
def test_segment_sum(benchmark: BenchmarkFixture, bench_config: BenchConfig, case: SegCase, impl: str) -> None:
    """impl "reference" is index_add_ (+ bincount for the counts), what EMA code writes today."""
    n = bench_config.scaled(case.n)
    values, index = seg_inputs(case, n)
    fn = SEG_IMPLS[impl]
    want = segment_sum(values, index, case.k)
    got = fn(values, index, case.k)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1])
    g = case.g or 1
    S = g * case.k
    nbytes = values.nbytes + index.nbytes + S * case.d * 4 + S * 4
    timed_row(benchmark, bench_config, lambda: fn(values, index, case.k), case.group(n),
              op="segment_sum", impl=impl, N=n, rows=n, G=g, K=case.k, d=case.d, bytes=nbytes,
              **({"baseline": "best"} if impl == "reference" else {}))


# ---- kmeans ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KMeansCase:
    name: str
    n: int
    g: int | None
    k: int
    d: int
    iters: int

    def group(self, n: int, k: int) -> str:
        """k: the clusters actually used (the case's K, or N // 4 where a quick run has fewer rows)."""
        shape = f"{n}x{self.d}" if self.g is None else f"{n}x{self.g}x{self.d}"
        return f"kmeans {shape} K={k} iters={self.iters}"


KMEANS_CASES = [
    KMeansCase("unitok", 16384, 8, 4096, 8, 10),   # UniTok's 8 codebooks, initialised from one batch
    KMeansCase("llamagen", 65536, None, 16384, 8, 10),
]


def faiss_inertia(x: Tensor, centroids: Tensor) -> float:
    """Sum over rows (and groups) of the squared distance to the nearest centroid, by exact faiss search."""
    import faiss

    xs = x if x.dim() == 3 else x[:, None]
    cs = centroids if centroids.dim() == 3 else centroids[None]
    total = 0.0
    for g in range(xs.shape[1]):
        index = faiss.IndexFlatL2(xs.shape[2])
        index.add(cs[g].contiguous().numpy())
        dist, _ = index.search(xs[:, g].contiguous().numpy(), 1)
        total += float(dist.astype("float64").sum())
    return total


def faiss_kmeans(x: Tensor, k: int, iters: int, seed: int) -> Tensor:
    import faiss

    xs = x if x.dim() == 3 else x[:, None]
    out = []
    for g in range(xs.shape[1]):
        km = faiss.Kmeans(xs.shape[2], k, niter=iters, seed=seed + g, verbose=False)
        km.train(xs[:, g].contiguous().numpy())
        out.append(torch.from_numpy(km.centroids.copy()))
    return torch.stack(out) if x.dim() == 3 else out[0]


@pytest.mark.parametrize("impl", ["fastvq", "faiss"])
@pytest.mark.parametrize("case", KMEANS_CASES, ids=lambda c: c.name)
def test_kmeans(benchmark: BenchmarkFixture, bench_config: BenchConfig, case: KMeansCase, impl: str) -> None:
    """faiss.Kmeans: one per group, each on a contiguous copy of its group (copies untimed)."""
    pytest.importorskip("faiss")
    n = bench_config.scaled(case.n)
    k = max(1, min(case.k, n // 4))
    gen = torch.Generator().manual_seed(1)
    lead = (n,) if case.g is None else (n, case.g)
    x = torch.randn(*lead, case.d, generator=gen)
    if impl == "fastvq":
        def run() -> Tensor:
            return kmeans(x, k, iters=case.iters, seed=0).centroids
    else:
        groups = [x[:, g].contiguous() for g in range(case.g)] if case.g else None

        def run() -> Tensor:
            if groups is None:
                return faiss_kmeans(x, k, case.iters, 0)
            return torch.stack([faiss_kmeans(xg, k, case.iters, g) for g, xg in enumerate(groups)])
    centroids = run()
    inertia = faiss_inertia(x, centroids)
    timed_row(benchmark, bench_config, run, case.group(n, k), op="kmeans", impl=impl, N=n, rows=n,
              G=case.g or 1, K=k, d=case.d, iters=case.iters, inertia=inertia,
              **({"baseline": "best"} if impl == "faiss" else {}))
