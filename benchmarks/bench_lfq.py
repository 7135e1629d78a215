"""Benchmarks of the lfq ops against their pure-PyTorch references.

- ``lfq_entropy`` loss forward + backward (MergeVQ's LFQ: D = 18 bits, one group, temperature 0.01).
  fastvq's op against the best pure-PyTorch formulation a user can write, ``lfq_entropy_factorized_ref``
  (the same bit factorisation: per-bit sigmoids and a half-split GEMM, autograd backward; the ``best``
  baseline), and against ``lfq_entropy_ref``, the full-logit softmax over all 2^18 codes as the public
  implementations compute it (the ``naive`` baseline: the ratio to it is the algorithm's gain, not the
  kernel's). The full-logit reference materialises [rows, 2^18] matrices, so it is timed on the first
  ``REF_ROWS`` rows; speed-ups compare per row. ``flops`` is the work of the three GEMMs the factorised
  form needs (forward ``P_B^T P_A`` and the two gradient products, ``2 * rows * 2^9 * 2^9`` each), the
  report's GEMM floor; the full-logit row has none. ``peak_bytes`` in ``extra_info`` is the peak
  resident-memory increase of one forward + backward, measured in a fresh process.
- ``lfq_quantize`` (sign + bit packing): memory-bound; ``bytes`` = z read + codes and indices written.
- ``lfq_codes_from_indices`` (unpacking): memory-bound; ``bytes`` = indices read + float32 codes written.
  For both, the PyTorch reference is the only alternative (the ``best`` baseline).
- ``fastvq.nn.LFQ`` forward + backward (loss and output) against ``vector_quantize_pytorch.LFQ`` with the same
  keywords (2^14 codes, one codebook, commitment weight 0.25; the ``best`` baseline, skipped when it is not
  installed): the module-level gain is the entropy op's (no ``[N, 2^14]`` logits).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest
import torch

from fastvq.bench import timed_row
from fastvq.ops import lfq_codes_from_indices, lfq_entropy, lfq_quantize
from fastvq.reference import lfq_codes_from_indices_ref, lfq_entropy_ref, lfq_quantize_ref
from fastvq.reference.lfq import lfq_entropy_factorized_ref

if TYPE_CHECKING:
    from conftest import BenchConfig
    from pytest_benchmark.fixture import BenchmarkFixture

REF_ROWS = 1024  # the reference's [rows, 2^18] float32 logits, softmax and log: ~3 GB at 1,024 rows
D, TEMPERATURE = 18, 0.01




def peak_bytes(impl: str, rows: int) -> int:
    """Peak resident memory of one entropy loss forward + backward on ``rows`` rows above what was resident
    before it (fastvq.bench.peak_rss_increase), in a fresh process."""
    code = textwrap.dedent(f"""
        import torch, fastvq
        from fastvq.ops import lfq_entropy
        from fastvq.reference import lfq_entropy_ref
        from fastvq.reference.lfq import lfq_entropy_factorized_ref
        fn = {{"fastvq": lfq_entropy, "factorized": lfq_entropy_factorized_ref, "reference": lfq_entropy_ref}}["{impl}"]
        z = torch.randn({rows}, {D}, generator=torch.Generator().manual_seed(0)).requires_grad_()
        small = torch.randn(8, {D}).requires_grad_()
        from fastvq.bench import peak_rss_increase
        s, c = fn(small, {TEMPERATURE})[:2]; (s - c).backward()       # warm-up: allocator, lazy init
        def step():
            s, c = fn(z, {TEMPERATURE})[:2]; (s - c).backward()
        print(peak_rss_increase(step))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


ENTROPY_IMPLS = {"fastvq": lfq_entropy, "factorized": lfq_entropy_factorized_ref, "reference": lfq_entropy_ref}
ENTROPY_BASELINE = {"factorized": "best", "reference": "naive"}


def entropy_gemm_flops(rows: int, bits: int = D) -> int:
    """FLOPs of the GEMMs of the factorised entropy, forward + backward: the code distribution P_B^T P_A
    and the two gradient products dL/dP_A, dL/dP_B ([rows, 2^b] x [2^b, 2^a] and its transpose), each
    2 * rows * 2^a * 2^b with a = bits // 2, b = bits - a."""
    return 3 * 2 * rows * 2 ** (bits // 2) * 2 ** (bits - bits // 2)


@pytest.mark.parametrize("n", [1024, 65536])
@pytest.mark.parametrize("impl", ENTROPY_IMPLS)
def test_entropy_loss(benchmark: BenchmarkFixture, bench_config: BenchConfig, impl: str, n: int) -> None:
    n = bench_config.scaled(n)
    rows = min(n, REF_ROWS) if impl == "reference" else n
    z = bench_config.on(torch.randn(n, D, generator=torch.Generator().manual_seed(0)))[:rows].requires_grad_()
    fn = ENTROPY_IMPLS[impl]

    def loss_forward_backward() -> None:
        sample, codebook = fn(z, TEMPERATURE)[:2]
        (sample - codebook).backward()
        z.grad = None

    # Peak memory only where the timed rows are the whole case (a row subset's memory says nothing of N's).
    memory = {"peak_bytes": peak_bytes(impl, rows)} if rows == n and bench_config.device == "cpu" else {}
    work = {} if impl == "reference" else {"flops": entropy_gemm_flops(rows)}
    role = {"baseline": ENTROPY_BASELINE[impl]} if impl in ENTROPY_BASELINE else {}
    timed_row(benchmark, bench_config, loss_forward_backward, f"lfq_entropy fwd+bwd D={D} N={n}",
        op="lfq_entropy", impl=impl, N=n, rows=rows, G=1, **work, **role, **memory)


QUANTIZE_IMPLS = {"fastvq": lfq_quantize, "reference": lfq_quantize_ref}


@pytest.mark.parametrize(("dim", "group_bits"), [(18, 0), (128, 8)])
@pytest.mark.parametrize("impl", QUANTIZE_IMPLS)
def test_quantize(benchmark: BenchmarkFixture, bench_config: BenchConfig, impl: str, dim: int,
                  group_bits: int) -> None:
    """Both allocate their outputs per call; on the CPU the first touch of a fresh large allocation
    (page faults) costs more than the kernel's own reads and writes."""
    n = bench_config.scaled(65536)
    z = bench_config.on(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)))
    groups = dim // (group_bits or dim)
    quantize = QUANTIZE_IMPLS[impl]
    timed_row(benchmark, bench_config, lambda: quantize(z, group_bits), f"lfq_quantize {n}x{dim} g={group_bits}",
        op="lfq_quantize", impl=impl, N=n, rows=n, G=groups, bytes=2 * z.nbytes + n * groups * 8,
        **({"baseline": "best"} if impl == "reference" else {}))


UNPACK_IMPLS = {"fastvq": lfq_codes_from_indices, "reference": lfq_codes_from_indices_ref}


@pytest.mark.parametrize(("dim", "group_bits"), [(18, 0), (128, 8)])
@pytest.mark.parametrize("impl", UNPACK_IMPLS)
def test_codes_from_indices(benchmark: BenchmarkFixture, bench_config: BenchConfig, impl: str, dim: int,
                            group_bits: int) -> None:
    n = bench_config.scaled(65536)
    g = group_bits or dim
    shape = (n,) if group_bits == 0 else (n, dim // g)
    indices = bench_config.on(torch.randint(0, 2**g, shape, generator=torch.Generator().manual_seed(0)))
    unpack = UNPACK_IMPLS[impl]
    timed_row(benchmark, bench_config, lambda: unpack(indices, dim, group_bits),
        f"lfq_codes_from_indices {n}x{dim} g={group_bits}",
        op="lfq_codes_from_indices", impl=impl, N=n, rows=n, G=dim // g, bytes=indices.nbytes + n * dim * 4,
        **({"baseline": "best"} if impl == "reference" else {}))


MODULE_BITS = 14


@pytest.mark.parametrize("impl", ["fastvq", "vector-quantize-pytorch"])
def test_module(benchmark: BenchmarkFixture, bench_config: BenchConfig, impl: str) -> None:
    if impl == "fastvq":
        from fastvq.nn import LFQ
    else:
        LFQ = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch not installed").LFQ
    n = bench_config.scaled(4096)
    quantizer = LFQ(codebook_size=2**MODULE_BITS, commitment_loss_weight=0.25).to(bench_config.device)
    x = bench_config.on(torch.randn(1, n, MODULE_BITS, generator=torch.Generator().manual_seed(0))).requires_grad_()

    def forward_backward() -> None:
        quantized, _, loss = quantizer(x)
        (loss + quantized.sum()).backward()
        x.grad = None

    timed_row(benchmark, bench_config, forward_backward, f"LFQ module fwd+bwd 2^{MODULE_BITS} codes N={n}",
        op="lfq_module", impl=impl, N=n, rows=n, G=1, **({"baseline": "best"} if impl != "fastvq" else {}))
