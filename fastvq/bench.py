"""``python -m fastvq.bench [--quick] [--json PATH] [-k EXPR]``: run the fastvq benchmarks and print a
summary table.

The benchmarks are the pytest-benchmark files of the repository's ``benchmarks/`` directory
(``FASTVQ_BENCH_DIR`` overrides its location); they need ``pip install 'fastvq[bench]'``. The table
gives, per case and implementation, the median time, the throughput (rows per second, or GB/s for
memory-bound ops), the speed-up over the case's **best alternative** (the fastest library or pure-PyTorch
formulation a user has: faiss, SDPA over a hand-sliced cache, the factorised PyTorch entropy, ...) and,
where the case has one, over its **naive baseline** (e.g. the full-logit entropy), both per row (a
baseline may time a subset of the rows), and the time the row's work would take at the hardware roof
that applies to it (fp32 GEMM throughput, DRAM copy, L3 or DRAM read bandwidth, all measured in the same
run) with the fraction of that roof reached. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastvq

BENCH_DIR_ENV = "FASTVQ_BENCH_DIR"


def bench_dir() -> Path:
    """``$FASTVQ_BENCH_DIR``, else ``benchmarks/`` beside the ``fastvq`` package (a source checkout)."""
    return Path(os.environ.get(BENCH_DIR_ENV) or Path(fastvq.__file__).resolve().parent.parent / "benchmarks")


def run_benchmarks(directory: Path, json_path: Path, quick: bool, keyword: str | None, device: str = "cpu") -> int:
    """pytest on ``directory`` with the JSON report written to ``json_path``; returns pytest's exit code."""
    import pytest  # here, so that main() can first say that pytest-benchmark is missing

    args = [str(directory), "-q", "--benchmark-only", f"--benchmark-json={json_path}",
            "--benchmark-columns=median,iqr,min,max,rounds", f"--device={device}"]
    if quick:
        args.append("--fastvq-quick")
    if keyword:
        args += ["-k", keyword]
    return int(pytest.main(args))


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_rss_increase(fn: Callable[[], object]) -> int:
    """Bytes of peak resident memory while ``fn()`` runs, above the resident memory just before it.

    Linux: resets the process's high-water mark (``/proc/self/clear_refs``), runs ``fn``, reads ``VmHWM``.
    (``ru_maxrss`` is not usable: a process started by fork + exec inherits its parent's high-water mark,
    so a benchmark subprocess of a large pytest process would report the parent's peak.) Run it in a
    fresh process, after a warm-up, with the inputs already allocated."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_bytes("VmRSS")
    fn()
    return max(0, _proc_status_bytes("VmHWM") - before)


def cuda_event_seconds(fn: Callable[[], object]) -> float:
    """Seconds that ``fn()``'s work takes on the current CUDA stream, between two CUDA events (waits for
    the second, so the kernels have completed, not just launched)."""
    import torch

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3


def timed_row(benchmark: Any, config: Any, fn: Callable[[], object], group: str, **info: object) -> None:
    """Time ``fn`` as a row of ``group`` described by ``info`` (pytest-benchmark's ``extra_info``): one
    untimed warm-up call, then ``config.rounds(its time)`` timed calls (``config``: the benchmarks'
    ``BenchConfig``). Every benchmark file times its rows through this.

    On a GPU (``config.device == "cuda"``) every call is bracketed by CUDA events and synchronised, so
    pytest-benchmark's wall-clock statistics include the kernels' completion (not just their launch), and
    the events' own times (``extra_info["cuda_event_s"]``, their median in ``"cuda_event_median_s"``) are
    what the summary table reports."""
    import statistics
    import time

    device = getattr(config, "device", "cpu")
    timed = fn
    event_s: list[float] = []
    if device == "cuda":
        import torch

        def timed() -> None:
            event_s.append(cuda_event_seconds(fn))

        torch.cuda.synchronize()
    start_s = time.perf_counter()
    timed()
    rounds = config.rounds(time.perf_counter() - start_s)
    event_s.clear()  # the warm-up
    benchmark.group = group
    benchmark.extra_info.update(info, device=device)
    benchmark.pedantic(timed, rounds=rounds)
    if event_s:
        benchmark.extra_info["cuda_event_s"] = event_s
        benchmark.extra_info["cuda_event_median_s"] = statistics.median(event_s)


OP_ORDER = ("mcq_search", "mcq_gather", "lfq_entropy", "lfq_quantize", "lfq_codes_from_indices", "bipartite_merge",
            "decode_attention", "segment_sum", "kmeans", "module", "lfq_module")
IMPL_ORDER = ("fastvq", "fastvq-ops", "faiss", "vector-quantize-pytorch", "sdpa-sliced", "factorized", "reference",
              "torch-chunked",
              "scatter_reduce", "sort+segment_reduce", "full-mask", "full-prefix-mask")


def table_order(bench: dict[str, Any]) -> tuple[object, ...]:
    """Ops in OP_ORDER, multi-codebook cases first, then by rows; within a case fastvq (auto ISA, then
    the forced ones), then the alternatives in IMPL_ORDER."""
    info = bench["extra_info"]
    return (OP_ORDER.index(info["op"]), -info["G"], info["N"], info.get("metric", ""),
            IMPL_ORDER.index(info["impl"]) if info["impl"] in IMPL_ORDER else len(IMPL_ORDER),
            ("auto", "avx512", "avx2", "scalar").index(info.get("cpu_isa", "auto")))


# Roofs a row's work is compared with: (label, key of its rate in machine_info["fastvq"]["ceiling"],
# unit of the rate). A row's ``flops`` go against "gemm" (the best measured fp32 torch.mm throughput: the
# machine's practical dense multiply-add rate, below its FMA peak); its ``bytes`` against
# ``extra_info["roof"]`` (default "dram_copy"; "l3_read" for data read repeatedly from L3).
ROOFS = {
    "gemm": ("GEMM", "gflops", 1e9),
    "dram_copy": ("DRAM copy", "gbps", 1e9),
    "l3_read": ("L3 read", "l3_read_gbps", 1e9),
    "dram_read": ("DRAM read", "dram_read_gbps", 1e9),
}


def roof_time(info: dict[str, Any], ceilings: dict[str, Any]) -> tuple[str, float] | None:
    """(label, seconds) that the row's work takes at its roof, or None (no work stated or roof measured)."""
    if "flops" in info:
        name, work = "gemm", info["flops"]
    elif "bytes" in info:
        name, work = info.get("roof", "dram_copy"), info["bytes"]
    else:
        return None
    label, key, unit = ROOFS[name]
    if key not in ceilings:
        return None
    return label, work / (ceilings[key] * unit)


def impl_label(info: dict[str, Any]) -> str:
    label = info["impl"]
    if "cpu_isa" in info:
        setting, active = info["cpu_isa"], info["cpu_isa_active"]
        label += f" ({'auto=' if setting == 'auto' else ''}{active})"
    if info.get("baseline") in ("best", "naive"):
        label += f" [{info['baseline']}]"
    return label


def format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def format_speedup(per_row: float, baseline: float | None) -> str:
    if baseline is None:
        return "-"
    ratio = per_row / baseline
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per benchmark: case, impl, rows, median, throughput, vs best, vs naive, roof, % roof,
    peak mem."""
    ceilings = report["machine_info"]["fastvq"]["ceiling"]
    benches = report["benchmarks"]
    # Per-row throughput of each case's baselines (extra_info["baseline"]: "best" = the best alternative a
    # user has, "naive" = the naive formulation), the denominators of the speed-ups; a GPU row counts its
    # CUDA-event median.
    baselines = {(b["group"], b["extra_info"]["baseline"]):
                 b["extra_info"]["rows"] / b["extra_info"].get("cuda_event_median_s", b["stats"]["median"])
                 for b in benches if b["extra_info"].get("baseline") in ("best", "naive")}
    rows = []
    for b in sorted(benches, key=table_order):
        info = b["extra_info"]
        median = info.get("cuda_event_median_s", b["stats"]["median"])  # a GPU row: its CUDA-event median
        per_row = info["rows"] / median
        best, naive = baselines.get((b["group"], "best")), baselines.get((b["group"], "naive"))
        if "bytes" in info and "flops" not in info:
            throughput = f"{info['bytes'] / median / 1e9:.2f} GB/s"
        else:
            throughput = f"{per_row:,.0f} rows/s"
        roof, fraction = "-", "-"
        at_roof = roof_time(info, ceilings)
        if at_roof is not None:
            roof, fraction = f"{at_roof[0]} {format_time(at_roof[1])}", f"{at_roof[1] / median:.1%}"
        peak = f"{info['peak_bytes'] / 2**20:,.1f} MB" if "peak_bytes" in info else "-"
        rows.append([b["group"], impl_label(info), f"{info['rows']:,}", format_time(median), throughput,
                     format_speedup(per_row, best), format_speedup(per_row, naive), roof, fraction, peak])
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Text columns (the first two) left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_header(report: dict[str, Any]) -> str:
    machine = report["machine_info"]
    ours = machine["fastvq"]
    build, faiss, ceiling = ours["build_info"], ours["faiss"], ours["ceiling"]
    cpu = machine["cpu"]
    faiss_line = (f"{faiss['version']}, {faiss['threads']} threads" if faiss
                  else "not installed (faiss rows skipped)")
    gpu = f"\ndevice   {ours['gpu']} (sm_{''.join(map(str, ours['capability']))}), CUDA-event medians" \
        if ours.get("device") == "cuda" else ""
    return "\n".join([
        f"fastvq {build['version']} benchmarks, {report['datetime']}{gpu}",
        f"machine  {cpu.get('brand_raw') or machine['processor']}, {cpu.get('count')} CPUs, "
        f"{machine['system']} {machine['release']} {machine['machine']}",
        f"fastvq   cpu_isa {build['cpu_isa']} (supported: {build['cpu_isa_supported']}), "
        f"{build['num_threads']} threads, {build['cxx']}",
        f"torch    {ours['torch']}, {ours['torch_threads']} threads",
        f"faiss    {faiss_line}",
        f"roofs    GEMM       {ceiling['gflops']:.1f} GFLOP/s ({ceiling['what']})",
        *[f"         {ROOFS[name][0]:<10} {ceiling[ROOFS[name][1]]:.1f} GB/s ({ceiling[ROOFS[name][1] + '_what']})"
          for name in ("dram_copy", "l3_read", "dram_read") if ROOFS[name][1] in ceiling],
    ])


TABLE_HEADER = ["case", "impl", "rows", "median", "throughput", "vs best", "vs naive", "roof", "% roof",
                "peak mem"]
TABLE_NOTES = (
    "rows: rows timed (a baseline may time the first rows of the case); speed-ups compare rows/s.\n"
    "vs best: against the case's best alternative, marked [best] (mcq_search, kmeans: faiss; lfq_entropy: the\n"
    "  factorised PyTorch formulation; decode: SDPA over the hand-sliced cache; segment_sum: index_add_ +\n"
    "  bincount; module: vector-quantize-pytorch (vqp); others: the PyTorch reference). Unmarked alternatives\n"
    "  (torch-chunked: chunked addmm + argmax, the best pure-PyTorch search; scatter_reduce;\n"
    "  sort+segment_reduce) show their own ratio to the best.\n"
    "vs naive: against the naive formulation, marked [naive] (mcq_search: the [N, K] PyTorch objective;\n"
    "  lfq_entropy: the full-logit softmax over 2^D codes, an algorithmic gain; decode: SDPA over the full\n"
    "  cache with a mask).\n"
    "roof: the time the row's work takes at the roof that applies (GEMM: its flops at the fp32 torch.mm rate;\n"
    "  lfq_entropy: the GEMMs the factorised form needs; GB/s rows: its bytes at the bandwidth named), and\n"
    "  % roof = that time / median.\n"
    "peak mem: peak resident memory of one call (lfq_entropy, merge, module: forward + backward) above what\n"
    "  was resident before it, in a fresh process.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastvq.bench",
        description="Run the fastvq benchmarks (pytest-benchmark) and print a summary table.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1/16 of the rows, a tenth of the timing")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="keep pytest-benchmark's JSON report here (default: a temporary file)")
    parser.add_argument("-k", dest="keyword", metavar="EXPR",
                        help="pytest -k expression selecting the benchmarks")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="run the ops on this device (cuda: CUDA-event timing, every call synchronised)")
    args = parser.parse_args(argv)

    directory = bench_dir()
    if not directory.is_dir():
        parser.error(f"benchmark directory {directory} not found: run from a source checkout of fastvq "
                     f"or set {BENCH_DIR_ENV}")
    if importlib.util.find_spec("pytest_benchmark") is None:
        parser.error("pytest-benchmark is not installed: pip install 'fastvq[bench]'")

    with tempfile.TemporaryDirectory() as tmp:
        json_path = args.json or Path(tmp) / "benchmarks.json"
        code = run_benchmarks(directory, json_path, args.quick, args.keyword, args.device)
        text = json_path.read_text() if json_path.exists() else ""
        if not text:  # no benchmark ran: none selected, or a collection error
            return code
        report = json.loads(text)

    print()
    print(format_header(report))
    print()
    print(format_table(TABLE_HEADER, table_rows(report)))
    print()
    print(TABLE_NOTES)
    return code


if __name__ == "__main__":
    sys.exit(main())
