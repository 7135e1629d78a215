"""Benchmarks of the mcq ops against faiss (when installed; the ``best`` baseline of mcq_search) and
their pure-PyTorch references (the ``naive`` baseline of mcq_search; mcq_gather's only alternative, so
its ``best``).

Each benchmark is one pytest-benchmark row, grouped by case (op, metric, N x G x K x d): one
untimed warm-up call, then 5 to 100 timed calls, about two seconds' worth (``conftest.BenchConfig``).
Its ``extra_info`` holds op, impl, metric, N (the case's rows), rows (the rows timed), G, K, d and the
work of one timed call: ``flops`` = 2 * rows * G * K * d for mcq_search, ``bytes`` moved for
mcq_gather. The reference times the first ``REF_ROWS`` rows of the case, everything else all N rows;
compare implementations per row.

Inputs are float32 ``torch.randn`` with fixed seeds; fastvq and torch run with their default threads.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch

import torch.nn.functional as F
from torch import Tensor

import fastvq
from fastvq.bench import timed_row
from fastvq.ops import mcq_gather, mcq_search
from fastvq.reference import mcq_gather_ref, mcq_search_ref
from fastvq.reference.mcq import COSINE_EPS

if TYPE_CHECKING:
    from conftest import BenchConfig
    from pytest_benchmark.fixture import BenchmarkFixture

REF_ROWS = 2048  # mcq_search_ref builds an [N, K] matrix per group: ~5k rows/s at the UniTok shape


@dataclass(frozen=True)
class SearchCase:
    name: str
    n: int
    g: int
    k: int
    d: int
    metric: str

    def group(self, n: int) -> str:
        return f"mcq_search {self.metric} {n}x{self.g}x{self.k}x{self.d}"


UNITOK = [SearchCase("unitok", 65536, 8, 4096, 8, metric) for metric in ("cosine", "l2")]
# One large codebook (LlamaGen: K = 16,384, d = 8)
SINGLE_CODEBOOK = [SearchCase("single-codebook", 65536, 1, 16384, 8, metric) for metric in ("cosine", "l2")]
SEARCH_CASES = [*UNITOK, *SINGLE_CODEBOOK]


def case_id(case: SearchCase) -> str:
    return f"{case.name}-{case.metric}"


@functools.cache
def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def search_inputs(case: SearchCase, n: int, rows: int) -> tuple[Tensor, Tensor]:
    """The first ``rows`` of the case's z [n, G, d], and its codebooks [G, K, d]."""
    return randn(n, case.g, case.d, seed=0)[:rows], randn(case.g, case.k, case.d, seed=1)




def search_info(case: SearchCase, impl: str, n: int, rows: int) -> dict[str, object]:
    return {"op": "mcq_search", "impl": impl, "metric": case.metric, "N": n, "rows": rows,
            "G": case.g, "K": case.k, "d": case.d, "flops": 2 * rows * case.g * case.k * case.d}


@contextmanager
def forced_cpu_isa(name: str) -> Iterator[str]:
    """Run fastvq's CPU kernels with vector ISA ``name`` (skip if unsupported), then go back to "auto".
    Yields the ISA in use."""
    try:
        fastvq.set_cpu_isa(name)
    except ValueError as e:
        pytest.skip(str(e))
    try:
        yield fastvq.cpu_isa()
    finally:
        fastvq.set_cpu_isa("auto")


FASTVQ_SEARCH = [(case, "auto") for case in SEARCH_CASES] + [
    (case, isa) for case in UNITOK for isa in ("avx2", "scalar")]


@pytest.mark.parametrize(("case", "isa"), FASTVQ_SEARCH,
                         ids=[f"{case_id(c)}-{isa}" for c, isa in FASTVQ_SEARCH])
def test_search_fastvq(benchmark: BenchmarkFixture, bench_config: BenchConfig, case: SearchCase,
                       isa: str) -> None:
    n = bench_config.scaled(case.n)
    z, codebooks = bench_config.on(*search_inputs(case, n, n))
    with forced_cpu_isa(isa) as active:
        timed_row(benchmark, bench_config, lambda: mcq_search(z, codebooks, case.metric), case.group(n),
            **search_info(case, "fastvq", n, n), cpu_isa=isa, cpu_isa_active=active)


@pytest.mark.parametrize("case", SEARCH_CASES, ids=case_id)
def test_search_reference(benchmark: BenchmarkFixture, bench_config: BenchConfig, case: SearchCase) -> None:
    n = bench_config.scaled(case.n)
    rows = min(n, REF_ROWS)
    z, codebooks = bench_config.on(*search_inputs(case, n, rows))
    timed_row(benchmark, bench_config, lambda: mcq_search_ref(z, codebooks, case.metric), case.group(n),
        **search_info(case, "reference", n, rows), baseline="naive")


@pytest.mark.parametrize("case", SEARCH_CASES, ids=case_id)
def test_search_faiss(benchmark: BenchmarkFixture, bench_config: BenchConfig, case: SearchCase) -> None:
    """One exact flat index per group, k=1; all G searches are timed. Cosine is inner product on
    L2-normalised vectors, normalised before timing (index building and the per-group contiguous
    copies of z are untimed too). All N rows: faiss 1.15 switches to its fast k=1 kernels from 16,000
    queries per search on, so a row subset would understate it."""
    faiss = pytest.importorskip("faiss")
    n = bench_config.scaled(case.n)
    z, codebooks = search_inputs(case, n, n)
    if case.metric == "cosine":
        z, codebooks = F.normalize(z, dim=-1, eps=COSINE_EPS), F.normalize(codebooks, dim=-1, eps=COSINE_EPS)
    index_type = faiss.IndexFlatIP if case.metric == "cosine" else faiss.IndexFlatL2
    indexes = []
    for codes in codebooks:
        index = index_type(case.d)
        index.add(codes.numpy())
        indexes.append(index)
    queries = [z[:, g].contiguous().numpy() for g in range(case.g)]

    def search() -> None:
        for index, query in zip(indexes, queries):
            index.search(query, 1)

    timed_row(benchmark, bench_config, search, case.group(n), **search_info(case, "faiss", n, n), baseline="best")


GATHER_IMPLS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "fastvq": mcq_gather, "reference": mcq_gather_ref}


@pytest.mark.parametrize("impl", GATHER_IMPLS)
def test_gather(benchmark: BenchmarkFixture, bench_config: BenchConfig, impl: str) -> None:
    """UniTok shape. ``bytes``: the int64 indices read, the selected codes read and the output written."""
    case = UNITOK[0]
    n = bench_config.scaled(case.n)
    indices = torch.randint(case.k, (n, case.g), generator=torch.Generator().manual_seed(2))
    codebooks = randn(case.g, case.k, case.d, seed=1)
    indices, codebooks = bench_config.on(indices, codebooks)
    gather = GATHER_IMPLS[impl]
    timed_row(benchmark, bench_config, lambda: gather(indices, codebooks),
        f"mcq_gather {n}x{case.g}x{case.k}x{case.d}",
        op="mcq_gather", impl=impl, N=n, rows=n, G=case.g, K=case.k, d=case.d,
        bytes=indices.nbytes + 2 * n * case.g * case.d * codebooks.element_size(),
        **({"baseline": "best"} if impl == "reference" else {}))
