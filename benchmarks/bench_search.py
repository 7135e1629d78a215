"""Single-codebook nearest-code search at GEMM shapes: mcq_search (the GEMM path from d = 32 on, the
small-d core at d = 8) against faiss's exact flat indexes and the best pure-PyTorch formulation, in the
same run.

Cases (G = 1, float32 ``torch.randn``, fixed seeds):
  vqrae     N = 16,384 (64 images x 256 tokens), K = 16,384, d = 1,536 (l2 and cosine)
  llamagen  N = 65,536, K = 16,384, d = 256 (l2; d = 8, served by the small-d core, is bench_mcq.py's
            single-codebook case)
Implementations, all N rows, default threads of each library:
  fastvq         ``mcq_search(z, codebooks, metric)``
  faiss          ``IndexFlatL2`` / ``IndexFlatIP`` (cosine: on L2-normalised inputs, normalised untimed),
                 ``search(z, 1)``: BLAS sgemm tiles + argmin
  torch-chunked  per chunk of ``TORCH_CHUNK`` rows, ``torch.addmm(-||c||^2 / 2, z_chunk, c^T).argmax``
                 (cosine: normalised chunk @ normalised codes^T); chunk size the fastest of a sweep on
                 this machine (docs/benchmarks.md). faiss is the case's [best] baseline.
``flops`` = 2 * N * K * d per call, the GEMM work all three do.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fastvq
from fastvq.bench import timed_row
from fastvq.ops import mcq_search
from fastvq.reference.mcq import COSINE_EPS

if TYPE_CHECKING:
    from conftest import BenchConfig
    from pytest_benchmark.fixture import BenchmarkFixture

TORCH_CHUNK = 4096  # fastest of 1024 / 2048 / 4096 / 8192 here (docs/benchmarks.md)


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    k: int
    d: int
    metric: str

    def group(self, n: int) -> str:
        return f"mcq_search {self.metric} {n}x1x{self.k}x{self.d}"


CASES = [
    Case("vqrae", 16384, 16384, 1536, "l2"),
    Case("vqrae", 16384, 16384, 1536, "cosine"),
    Case("llamagen", 65536, 16384, 256, "l2"),
]


def case_id(case: Case) -> str:
    return f"{case.name}-d{case.d}-{case.metric}"


@functools.cache
def inputs(n: int, k: int, d: int) -> tuple[Tensor, Tensor]:
    """z [n, 1, d] and codebooks [1, k, d]."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, d, generator=gen), torch.randn(1, k, d, generator=gen)


def info(case: Case, impl: str, n: int, **extra: object) -> dict[str, object]:
    return {"op": "mcq_search", "impl": impl, "metric": case.metric, "N": n, "rows": n, "G": 1, "K": case.k,
            "d": case.d, "flops": 2 * n * case.k * case.d, **extra}


def torch_chunked_search(z: Tensor, codes: Tensor, metric: str, chunk: int) -> Tensor:
    """The best pure-PyTorch nearest code: z [N, d], codes [K, d] -> indices [N], one [chunk, K] GEMM
    block at a time (the [N, K] matrix of the one-shot formulation does not fit in memory at these
    shapes: 16,384 x 16,384 fp32 is 1 GiB, 65,536 x 16,384 is 4 GiB)."""
    if metric == "cosine":
        z, codes = F.normalize(z, dim=-1, eps=COSINE_EPS), F.normalize(codes, dim=-1, eps=COSINE_EPS)
        bias = torch.zeros(codes.shape[0])
    else:
        bias = -0.5 * (codes * codes).sum(-1)
    codes_t = codes.t()
    return torch.cat([torch.addmm(bias, part, codes_t).argmax(-1) for part in z.split(chunk)])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_search_fastvq(benchmark: BenchmarkFixture, bench_config: BenchConfig, case: Case) -> None:
    n = bench_config.scaled(case.n)
    z, codebooks = inputs(n, case.k, case.d)
    timed_row(benchmark, bench_config, lambda: mcq_search(z, codebooks, case.metric), case.group(n),
              **info(case, "fastvq", n, cpu_isa="auto", cpu_isa_active=fastvq.cpu_isa()))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_search_torch_chunked(benchmark: BenchmarkFixture, bench_config: BenchConfig, case: Case) -> None:
    n = bench_config.scaled(case.n)
    z, codebooks = inputs(n, case.k, case.d)
    z2, codes = z[:, 0], codebooks[0]
    timed_row(benchmark, bench_config, lambda: torch_chunked_search(z2, codes, case.metric, TORCH_CHUNK),
              case.group(n), **info(case, "torch-chunked", n, chunk=TORCH_CHUNK))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_search_faiss(benchmark: BenchmarkFixture, bench_config: BenchConfig, case: Case) -> None:
    faiss = pytest.importorskip("faiss")
    n = bench_config.scaled(case.n)
    z, codebooks = inputs(n, case.k, case.d)
    z2, codes = z[:, 0], codebooks[0]
    if case.metric == "cosine":
        z2, codes = F.normalize(z2, dim=-1, eps=COSINE_EPS), F.normalize(codes, dim=-1, eps=COSINE_EPS)
    index = (faiss.IndexFlatIP if case.metric == "cosine" else faiss.IndexFlatL2)(case.d)
    index.add(codes.contiguous().numpy())
    query = z2.contiguous().numpy()
    timed_row(benchmark, bench_config, lambda: index.search(query, 1), case.group(n),
              **info(case, "faiss", n, baseline="best"))
