"""Benchmarks of token merging with source tracking (MergeVQ's ToMe encoder) against the public way.

Each case runs a merge schedule on ``[B, T, C]`` tokens, tracks where every original token went, and
recovers the full ``[B, T, C]`` grid at the end:

- ``fastvq``: ``bipartite_merge`` (fused cosine + argmax, top-r, size-weighted merge) + ``compose_source``
  on an integer ``[B, T]`` source map, recovery by ``unmerge`` (a gather).
- ``reference``: ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` + ``merge_source`` as the public ToMe /
  MergeVQ code runs them (``tome_merge_dense_ref``), with a dense one-hot ``[B, T, T0]`` source matrix,
  recovery by ``source^T @ merged`` (``unmerge_dense_ref``).

The metric of each layer is the first 64 channels of the current tokens (a view: a head's keys, for free
in both implementations). Cases:
- MergeVQ-style: B=256, T=256, C=768, four merges of r=64 (the fourth is capped at 32, the most a 64-token
  layer can merge, as ToMe's ``min(r, (t - protected) // 2)`` does): 256 -> 32 tokens.
- ToMe ViT-B/16: B=256, T=197 (class token protected), r=16 in 11 layers and 10 in the 12th (the most its
  21 tokens allow): 197 -> 11 tokens.
Forward, and forward + backward (a loss on the recovered grid, gradients to the input tokens).
``peak_bytes``: peak resident memory of one forward + backward above the resident memory just before it
(inputs and weights already allocated), measured in a fresh process;
``source_bytes``: the source map's size.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch

from fastvq.bench import timed_row
from fastvq.ops import bipartite_merge, compose_source, unmerge
from fastvq.reference import tome_merge_dense_ref, unmerge_dense_ref

if TYPE_CHECKING:
    from conftest import BenchConfig
    from pytest_benchmark.fixture import BenchmarkFixture

METRIC_DIM = 64
CASES = {
    "mergevq-256": dict(B=256, T=256, C=768, schedule=[64, 64, 64, 32], protect_first=False),
    "vit-b16-197": dict(B=256, T=197, C=768, schedule=[16] * 11 + [10], protect_first=True),
}


def pipeline_fastvq(x: torch.Tensor, schedule: list[int], protect_first: bool) -> torch.Tensor:
    B, T, _ = x.shape
    sizes = x.new_ones(B, T)
    source = torch.arange(T).expand(B, T)
    for r in schedule:
        x, sizes, assign = bipartite_merge(x, x[..., :METRIC_DIM], sizes, r, protect_first)
        source = compose_source(source, assign)
    return unmerge(x, source)


def pipeline_reference(x: torch.Tensor, schedule: list[int], protect_first: bool) -> torch.Tensor:
    B, T, _ = x.shape
    sizes = x.new_ones(B, T)
    source = None
    for r in schedule:
        x, sizes, source = tome_merge_dense_ref(x, x[..., :METRIC_DIM], sizes, source, r, protect_first)
    return unmerge_dense_ref(x, source)


PIPELINES: dict[str, Callable[..., torch.Tensor]] = {"fastvq": pipeline_fastvq, "reference": pipeline_reference}




def peak_bytes(impl: str, case: str, B: int) -> int:
    """Peak resident memory of one forward + backward of ``case`` with ``B`` images above what was resident
    before it (fastvq.bench.peak_rss_increase), in a fresh process."""
    code = textwrap.dedent(f"""
        import sys, torch
        from fastvq.bench import peak_rss_increase
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from bench_merge import CASES, PIPELINES
        c = CASES[{case!r}]
        fn = PIPELINES[{impl!r}]
        x = torch.randn({B}, c["T"], c["C"], generator=torch.Generator().manual_seed(0)).requires_grad_()
        small = torch.randn(2, c["T"], c["C"]).requires_grad_()
        fn(small, c["schedule"], c["protect_first"]).sum().backward()   # warm-up: allocator, lazy init
        print(peak_rss_increase(lambda: fn(x, c["schedule"], c["protect_first"]).square().sum().backward()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", PIPELINES)
def test_merge_schedule(benchmark: BenchmarkFixture, bench_config: BenchConfig, impl: str, case: str,
                        backward: bool) -> None:
    c = CASES[case]
    B = bench_config.scaled(c["B"])
    T, C, schedule, protect = c["T"], c["C"], c["schedule"], c["protect_first"]
    x = bench_config.on(torch.randn(B, T, C, generator=torch.Generator().manual_seed(0)))
    fn = PIPELINES[impl]
    if backward:
        x.requires_grad_(True)

        def step() -> None:
            fn(x, schedule, protect).square().sum().backward()
            x.grad = None
    else:
        def step() -> None:
            with torch.no_grad():
                fn(x, schedule, protect)

    # both pipelines recover the same grid (same merges: the reference re-sorts ToMe's unmerged tokens)
    with torch.no_grad():
        ours, ref = pipeline_fastvq(x[:4], schedule, protect), pipeline_reference(x[:4], schedule, protect)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    tokens_out = T - sum(schedule)
    source_bytes = B * T * 8 if impl == "fastvq" else B * (T - schedule[0]) * T * x.element_size()  # largest
    memory = {"peak_bytes": peak_bytes(impl, case, B)} if backward and bench_config.device == "cpu" else {}
    # bytes: x read once and the recovered grid written once: the least any implementation moves
    timed_row(benchmark, bench_config, step,
        f"merge {case} B={B} T={T}->{tokens_out} C={C} r={schedule[0]}x{len(schedule)} {'fwd+bwd' if backward else 'fwd'}",
        op="bipartite_merge", impl=impl, N=B * T, G=1, rows=B, bytes=2 * B * T * C * x.element_size(),
        source_bytes=source_bytes, schedule=schedule, **memory, **({"baseline": "best"} if impl == "reference" else {}))
