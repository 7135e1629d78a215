"""pytest configuration of the fastvq benchmarks (run them with ``pytest benchmarks/ --benchmark-only``
or ``python -m fastvq.bench``).

Benchmark files are named ``bench_*.py`` so that no test run collects them; this conftest collects them
when ``benchmarks/`` is named on the command line. It also adds the ``--fastvq-quick`` option (smoke
run: 1/16 of the rows, a tenth of the timing) and records, in the ``machine_info`` of the JSON report, the
fastvq build and the machine's measured roofs (fp32 matmul throughput, DRAM copy, L3 and DRAM read
bandwidth) that the report compares each row's work with.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import fastvq
from fastvq.bench import cuda_event_seconds

CEILING_MATMUL_SIZE = 2048
CEILING_MATMUL_SIZES = (1024, 2048, 4096)
CEILING_ROUNDS = 10
L3_READ_MIB = 16    # larger than the L2 caches, smaller than the L3 of the machines measured (>= 32 MiB)
DRAM_READ_MIB = 512


@dataclass(frozen=True)
class BenchConfig:
    """How much work each benchmark does: its case's N divided by ``row_divisor``, timed for
    ``budget_s`` (one untimed warm-up call sets the number of rounds), in ``min_rounds`` to
    ``max_rounds`` rounds."""

    min_rounds: int
    max_rounds: int
    budget_s: float
    row_divisor: int
    device: str = "cpu"  # --device: where the inputs live and the ops run (cuda: CUDA-event timing)

    def rounds(self, seconds_per_call: float) -> int:
        return max(self.min_rounds, min(self.max_rounds, round(self.budget_s / seconds_per_call)))

    def on(self, *tensors: torch.Tensor) -> Any:
        """The tensors on this run's device (one tensor, or a tuple for several)."""
        moved = tuple(t.to(self.device) for t in tensors)
        return moved[0] if len(moved) == 1 else moved

    def scaled(self, n: int) -> int:
        """A case's N for this run."""
        return max(1, n // self.row_divisor)


FULL = BenchConfig(min_rounds=5, max_rounds=100, budget_s=2.0, row_divisor=1)
QUICK = BenchConfig(min_rounds=2, max_rounds=10, budget_s=0.2, row_divisor=16)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fastvq-quick", action="store_true",
                     help="fastvq benchmarks: smoke run (1/16 of the rows, a tenth of the timing)")
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="fastvq benchmarks: run on this device (cuda: CUDA-event timing, synchronised)")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # A bench file named on the command line is collected by pytest itself; `pytest .` skips them.
    session = parent.session
    if (file_path.match("bench_*.py") and not session.isinitpath(file_path)
            and session.isinitpath(file_path.parent)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_config(request: pytest.FixtureRequest) -> BenchConfig:
    device = request.config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.exit("fastvq benchmarks: --device cuda, but torch sees no CUDA device", returncode=2)
    return dataclasses.replace(QUICK if request.config.getoption("--fastvq-quick") else FULL, device=device)


# Rows that exist on the CPU only: forced CPU vector paths, faiss (faiss-cpu), and the decode loops (their
# per-step Python bookkeeping runs on the CPU).
CPU_ONLY_TESTS = ("test_search_faiss", "test_decode_loop")


@pytest.fixture(autouse=True)
def _cpu_only_rows(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--device") == "cpu":
        return
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    if params.get("isa", "auto") != "auto" or request.node.originalname in CPU_ONLY_TESTS:
        pytest.skip("a CPU-only row")


def _median_seconds(fn: Any, rounds: int, device: str) -> float:
    """Median time of ``rounds`` calls after one warm-up: perf_counter on the CPU, CUDA events on a GPU."""
    fn()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            times.append(cuda_event_seconds(fn))
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def matmul_gflops(n: int = CEILING_MATMUL_SIZE, rounds: int = CEILING_ROUNDS, device: str = "cpu") -> float:
    """fp32 ``torch.mm`` throughput of an [n, n] x [n, n] product (torch's default threads on the CPU; IEEE
    fp32, not TF32, on a GPU): GFLOP/s of the median of ``rounds`` timed products after one warm-up."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
    return 2 * n**3 / _median_seconds(lambda: torch.mm(a, b), rounds, device) / 1e9


def copy_gbps(mib: int = 256, rounds: int = CEILING_ROUNDS, device: str = "cpu") -> float:
    """Memory bandwidth of a large fp32 ``Tensor.copy_`` (torch's default threads): bytes read + written
    per second of the median of ``rounds`` copies after one warm-up, in GB/s."""
    src = torch.randn(mib * 2**18, generator=torch.Generator().manual_seed(0)).to(device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _median_seconds(lambda: dst.copy_(src), rounds, device) / 1e9


def read_gbps(mib: int, rounds: int = CEILING_ROUNDS) -> float:
    """Read bandwidth of ``Tensor.sum`` over ``mib`` MiB of fp32 (torch's default threads), in GB/s: the
    median of ``rounds`` sums after one warm-up (which also brings a cache-sized tensor into the cache)."""
    src = torch.randn(mib * 2**18, generator=torch.Generator().manual_seed(0))
    src.sum()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - start)
    return src.nbytes / statistics.median(times) / 1e9


def faiss_info() -> dict[str, Any] | None:
    try:
        import faiss
    except ImportError:
        return None
    return {"version": faiss.__version__, "threads": faiss.omp_get_max_threads()}


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    device = config.getoption("--device")
    gpu = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())} \
        if device == "cuda" else {}
    machine_info["fastvq"] = {
        "device": device, **gpu,
        "build_info": fastvq.build_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss_info(),
        "ceiling": {
            "what": f"best torch.mm n x n, n in {CEILING_MATMUL_SIZES}, fp32 on {device}, median of {CEILING_ROUNDS}",
            "gflops": max(matmul_gflops(n, device=device) for n in CEILING_MATMUL_SIZES),
            "gbps_what": f"Tensor.copy_ of 256 MiB fp32 on {device}, read + write, median of {CEILING_ROUNDS}",
            "gbps": copy_gbps(device=device),
            **({} if device != "cpu" else {
                "l3_read_gbps_what": f"Tensor.sum of {L3_READ_MIB} MiB fp32 (L3-resident), median of {CEILING_ROUNDS}",
                "l3_read_gbps": read_gbps(L3_READ_MIB),
                "dram_read_gbps_what": f"Tensor.sum of {DRAM_READ_MIB} MiB fp32, median of {CEILING_ROUNDS}",
                "dram_read_gbps": read_gbps(DRAM_READ_MIB)}),
        },
    }
