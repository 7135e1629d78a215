"""Quantizer modules, one training step each (forward, ``quantized.square().mean() + aux loss``,
``.backward()``, training mode), against vector-quantize-pytorch (``vqp``, 1.32.0) on the same machine, in the
same run.

Cases (float32 ``torch.randn`` input that requires grad, fixed seeds; a quick run divides the batch by 16):
  unitok    x [64, 256, 64]: 8 codebooks x 4,096 codes x 8 dims, cosine.
            fastvq ``MultiCodebookQuantizer(ema_update=True, learnable_codebook=False)`` against vqp
            ``VectorQuantize(dim=64, codebook_size=4096, heads=8, separate_codebook_per_head=True,
            codebook_dim=8, use_cosine_sim=True)``. Learning rule on both sides: EMA codebooks (vqp's
            default, decay 0.8), no codebook gradient. UniTok itself learns its codebooks by gradient, but
            vqp refuses ``use_cosine_sim=True`` with ``learnable_codebook=True`` ("cosine sim distance
            codebook not compatible with learnable codebook yet"), so EMA is the rule both can run.
  llamagen  x [256, 256, 8]: 65,536 tokens, one codebook of 16,384 x 8, l2.
            ``VectorQuantize(dim=8, codebook_size=16384)`` on both sides: both libraries' defaults, an EMA
            codebook (decay 0.8) updated in the training forward.
  vqrae     x [64, 256, 1536]: 16,384 tokens, SimVQ with 16,384 codes of 1,536 dims.
            ``SimVQ(dim=1536, codebook_size=16384)`` on both sides (frozen codebook, learned linear map,
            rotation trick).
A row whose module or keyword fastvq lacks is skipped with the reason (pytest -rs prints it).

vqp's rows materialise ``N x K`` distance matrices and their kin: measured here, its peak resident memory per
token is ~0.5 MB (unitok: 8.2 GB at 16,384 tokens), ~0.4 MB (llamagen: 12.3 GB at 32,768 tokens, so ~24 GB
at 65,536) and ~0.85 MB (vqrae: 13.6 GB at 16,384 tokens; its ``torch.cdist`` broadcasts the [K, dim]
codebook over the batch). A vqp row whose estimate (``VQP_BYTES_PER_TOKEN``) exceeds 80% of the machine's
available memory (``MemAvailable``) times the first ``B / 2^j`` images of the batch instead (``rows`` in the
report; the summary's speed-ups compare rows per second), and says so.

``flops`` is the GEMM work both sides must do: the nearest-code search ``2 * N * G * K * d`` (forward), plus
for SimVQ the map ``frozen_codebook @ W^T`` and its weight gradient, ``2 * 2 * K * dim^2``. ``peak_bytes`` in
``extra_info`` is the peak resident memory of one training step above what was resident before it
(fastvq.bench.peak_rss_increase: /proc/self/clear_refs + VmHWM, which unlike ``ru_maxrss`` is not inherited
from the parent process), measured in a fresh process per (implementation, case) after a warm-up step on a
small batch. Run on an otherwise idle machine: the rows run one at a time (pytest runs them sequentially), and
vqp's need GBs (above).

Run: ``python -m fastvq.bench -k bench_modules`` (the summary table: median, ``vs best`` = the speed-up over
vqp, peak memory), or ``pytest benchmarks/bench_modules.py --benchmark-only -rs [--fastvq-quick]``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import torch

from fastvq.bench import timed_row

if TYPE_CHECKING:
    from conftest import BenchConfig
    from pytest_benchmark.fixture import BenchmarkFixture


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # x [B, T, dim]; a quick run divides B by the row divisor
    heads: int
    codebook_size: int
    codebook_dim: int
    modules: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # impl -> (class, kwargs)
    transform_dim: int = 0  # SimVQ: the map's [dim, frozen_dim] GEMM work

    def x_shape(self, divisor: int) -> tuple[int, ...]:
        return (max(1, self.shape[0] // divisor), *self.shape[1:])

    def tokens(self, divisor: int) -> int:
        return self.x_shape(divisor)[0] * self.shape[1]

    def flops(self, rows: int) -> int:
        search = 2 * rows * self.heads * self.codebook_size * self.codebook_dim
        return search + 2 * 2 * self.codebook_size * self.transform_dim**2


CASES = [
    Case("unitok", (64, 256, 64), 8, 4096, 8, {
        "fastvq": ("MultiCodebookQuantizer", dict(ema_update=True, learnable_codebook=False)),
        "vqp": ("VectorQuantize", dict(dim=64, codebook_size=4096, heads=8, separate_codebook_per_head=True,
                                       codebook_dim=8, use_cosine_sim=True)),
    }),
    Case("llamagen", (256, 256, 8), 1, 16384, 8, {
        "fastvq": ("VectorQuantize", dict(dim=8, codebook_size=16384)),
        "vqp": ("VectorQuantize", dict(dim=8, codebook_size=16384)),
    }),
    Case("vqrae", (64, 256, 1536), 1, 16384, 1536, {
        "fastvq": ("SimVQ", dict(dim=1536, codebook_size=16384)),
        "vqp": ("SimVQ", dict(dim=1536, codebook_size=16384)),
    }, transform_dim=1536),
]
IMPLS = ("fastvq", "vqp")
# vqp's peak resident memory per token of one training step, measured on this machine (module docstring)
VQP_BYTES_PER_TOKEN = {"unitok": 525e3, "llamagen": 393e3, "vqrae": 871e3}
MEMORY_FRACTION = 0.8


def available_bytes() -> float:
    """``MemAvailable`` of /proc/meminfo (inf where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


def fitting_divisor(case: Case, impl: str, divisor: int) -> int:
    """``divisor`` times the smallest power of two that brings the row's estimated peak memory under
    MEMORY_FRACTION of the available memory (fastvq rows: ``divisor``)."""
    if impl != "vqp":
        return divisor
    budget = MEMORY_FRACTION * available_bytes()
    while VQP_BYTES_PER_TOKEN[case.name] * case.tokens(divisor) > budget and case.x_shape(divisor)[0] > 1:
        divisor *= 2
    return divisor


class Unavailable(Exception):
    """The implementation lacks the module or a keyword of the case: the row is skipped."""


def build(case: Case, impl: str) -> torch.nn.Module:
    """The case's module for ``impl``, seeded, in training mode; raises :class:`Unavailable`."""
    cls_name, kwargs = case.modules[impl]
    if impl == "vqp":
        try:
            import vector_quantize_pytorch as lib
        except ImportError as e:
            raise Unavailable(f"vector-quantize-pytorch is not installed ({e})") from e
    else:
        import fastvq.nn as lib
    cls = getattr(lib, cls_name, None)
    if cls is None:
        raise Unavailable(f"{lib.__name__} has no {cls_name}")
    torch.manual_seed(0)
    try:
        module = cls(**kwargs)
    except TypeError as e:  # a keyword the module does not take (yet)
        raise Unavailable(f"{lib.__name__}.{cls_name}({', '.join(kwargs)}): {e}") from e
    return module.train()


def make_x(case: Case, divisor: int) -> torch.Tensor:
    return torch.randn(case.x_shape(divisor), generator=torch.Generator().manual_seed(1)).requires_grad_()


def train_step(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One training step's module work: forward, a loss on ``quantized`` plus the aux loss, backward."""
    quantized, _, aux = module(x)[:3]
    (quantized.square().mean() + aux.sum()).backward()
    x.grad = None
    for p in module.parameters():
        p.grad = None


WORKER = """
import json, sys, torch
sys.path.insert(0, {bench_dir!r})
from bench_modules import CASES, Unavailable, build, make_x, train_step
from fastvq.bench import peak_rss_increase
case = next(c for c in CASES if c.name == {case!r})
try:
    module = build(case, {impl!r})
except Unavailable as e:
    print(json.dumps({{"skip": str(e)}}))
    raise SystemExit
x = make_x(case, {divisor})
train_step(module, x[:1].detach().requires_grad_())  # warm-up: lazy init, allocator
print(json.dumps({{"peak_bytes": peak_rss_increase(lambda: train_step(module, x))}}))
"""


def peak_bytes(case: Case, impl: str, divisor: int) -> int:
    """Peak resident memory of one training step above what was resident before it, in a fresh process."""
    from pathlib import Path

    code = textwrap.dedent(WORKER.format(bench_dir=str(Path(__file__).resolve().parent), case=case.name,
                                         impl=impl, divisor=divisor))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench_modules worker {case.name}/{impl} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["peak_bytes"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_module_train_step(benchmark: BenchmarkFixture, bench_config: BenchConfig, case: Case, impl: str) -> None:
    if bench_config.device != "cpu":
        pytest.skip("bench_modules: CPU only for now (peak memory is resident memory)")
    try:
        module = build(case, impl)
    except Unavailable as e:
        print(f"skip {case.name}/{impl}: {e}")
        pytest.skip(str(e))
    n = case.tokens(bench_config.row_divisor)
    divisor = fitting_divisor(case, impl, bench_config.row_divisor)
    if divisor != bench_config.row_divisor:
        print(f"{case.name}/{impl}: ~{VQP_BYTES_PER_TOKEN[case.name] * n / 1e9:.1f} GB for {n} tokens exceeds "
              f"{MEMORY_FRACTION:.0%} of the {available_bytes() / 1e9:.1f} GB available: timing the first "
              f"{case.tokens(divisor)} tokens")
    x = make_x(case, divisor)
    rows = x.shape[0] * x.shape[1]
    memory = peak_bytes(case, impl, divisor)
    cls_name, kwargs = case.modules[impl]
    timed_row(benchmark, bench_config, lambda: train_step(module, x),
              f"module fwd+bwd {case.name} {n}x{case.heads}x{case.codebook_size}x{case.codebook_dim}",
              op="module", impl="vector-quantize-pytorch" if impl == "vqp" else impl, module=cls_name,
              kwargs=repr(kwargs), N=n, rows=rows, G=case.heads,
              K=case.codebook_size, d=case.codebook_dim, flops=case.flops(rows), peak_bytes=memory,
              **({"baseline": "best"} if impl == "vqp" else {}))
