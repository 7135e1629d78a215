"""``python benchmarks/segment_cputime.py``: the rows of bench_segment.py timed as single-thread CPU time
(``time.process_time``), for a machine too loaded for wall-clock medians (docs/benchmarks.md,
"segment_sum and kmeans"). Medians of 7 calls (kmeans: 3) after one warm-up; torch, fastvq and faiss on
one thread. Not a pytest file (pytest collects only bench_*.py here)."""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_segment import KMEANS_CASES, SEG_CASES, SEG_IMPLS, faiss_inertia, faiss_kmeans, seg_inputs  # noqa: E402

from fastvq.ops import kmeans  # noqa: E402


def cpu_time(fn: Callable[[], object], rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    src = torch.randn(64 * 2**18)
    dst = torch.empty_like(src)
    bw = 2 * src.nbytes / cpu_time(lambda: dst.copy_(src)) / 1e9
    print(f"copy bandwidth (1 thread, 64 MiB fp32, read + write): {bw:.1f} GB/s", flush=True)
    for case in SEG_CASES:
        values, index = seg_inputs(case, case.n)
        segments = (case.g or 1) * case.k
        nbytes = values.nbytes + index.nbytes + segments * case.d * 4 + segments * 4
        for name, fn in SEG_IMPLS.items():
            sec = cpu_time(lambda: fn(values, index, case.k))
            print(f"segment_sum {case.name:9s} {name:20s} {sec * 1e3:8.2f} ms  {nbytes / sec / 1e9:6.2f} GB/s  "
                  f"{nbytes / sec / 1e9 / bw:6.1%} of copy", flush=True)
    for case in KMEANS_CASES:
        lead = (case.n,) if case.g is None else (case.n, case.g)
        x = torch.randn(*lead, case.d, generator=torch.Generator().manual_seed(1))
        groups = [x[:, g].contiguous() for g in range(case.g)] if case.g else None

        def run_faiss() -> torch.Tensor:
            if groups is None:
                return faiss_kmeans(x, case.k, case.iters, 0)
            return torch.stack([faiss_kmeans(xg, case.k, case.iters, g) for g, xg in enumerate(groups)])

        runs = {"fastvq": lambda: kmeans(x, case.k, iters=case.iters, seed=0).centroids, "faiss": run_faiss}
        for name, fn in runs.items():
            centroids = fn()
            sec = cpu_time(fn, rounds=3)
            print(f"kmeans {case.name:9s} {name:7s} {sec:8.2f} s  inertia {faiss_inertia(x, centroids):.6g}", flush=True)


if __name__ == "__main__":
    main()
