"""``python -m fastvq.bench [--quick] [--json PATH] [-k EXPR]``: run the fastvq benchmarks and print a
summary table.

The benchmarks are the pytest-benchmark files of the repository's ``benchmarks/`` directory
(``FASTVQ_BENCH_DIR`` overrides its location); they need ``pip install 'fastvq[bench]'``. The table
gives, per case and implementation, the median time, the throughput (rows of z per second for
mcq_search, GB/s for mcq_gather), the speed-ups over the pure-PyTorch reference and faiss (per row:
the reference times a subset of the rows) and each search's GFLOP/s (2*rows*G*K*d / median) as a
percentage of the fp32 matmul throughput measured in the same run. See docs/benchmarks.md.
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
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            event_s.append(start.elapsed_time(stop) / 1e3)

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


def impl_label(info: dict[str, Any]) -> str:
    if "cpu_isa" not in info:
        return info["impl"]
    setting, active = info["cpu_isa"], info["cpu_isa_active"]
    return f"{info['impl']} ({'auto=' if setting == 'auto' else ''}{active})"


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
    return f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.2g}x"


OP_ORDER = ("mcq_search", "mcq_gather", "lfq_entropy", "lfq_quantize", "lfq_codes_from_ids", "bipartite_merge",
            "decode_attention")


def table_order(bench: dict[str, Any]) -> tuple[object, ...]:
    """Ops in OP_ORDER, multi-codebook cases first, then by rows; within a case fastvq (auto ISA, then
    the forced ones), the reference, faiss."""
    info = bench["extra_info"]
    return (OP_ORDER.index(info["op"]), -info["G"], info["N"], info.get("metric", ""),
            ("fastvq", "fastvq-ops", "reference", "faiss", "sdpa-sliced", "full-mask",
             "full-prefix-mask").index(info["impl"]),
            ("auto", "avx512", "avx2", "scalar").index(info.get("cpu_isa", "auto")))


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per benchmark: case, impl, rows, median, throughput, vs ref, vs faiss, % of ceiling."""
    ceilings = report["machine_info"]["fastvq"]["ceiling"]
    ceiling_flops = ceilings["gflops"] * 1e9
    benches = report["benchmarks"]
    # Per-row throughput of the baselines of each case, the denominators of the speed-ups.
    # (A benchmark can stand in for a column's baseline with extra_info["baseline"]: decode's full-mask
    # loop is its "reference", SDPA over the sliced cache its "faiss", the best outside implementation.)
    baselines = {(b["group"], b["extra_info"].get("baseline", b["extra_info"]["impl"])):
                 b["extra_info"]["rows"] / b["extra_info"].get("cuda_event_median_s", b["stats"]["median"])
                 for b in benches if b["extra_info"].get("baseline", b["extra_info"]["impl"]) in ("reference", "faiss")}
    rows = []
    for b in sorted(benches, key=table_order):
        info = b["extra_info"]
        median = info.get("cuda_event_median_s", b["stats"]["median"])  # a GPU row: its CUDA-event median
        per_row = info["rows"] / median
        ref, faiss = baselines.get((b["group"], "reference")), baselines.get((b["group"], "faiss"))
        ceiling = "-"
        if "flops" in info:
            throughput = f"{per_row:,.0f} rows/s"
            ceiling = f"{info['flops'] / median / ceiling_flops:.1%}"
        elif "bytes" in info:
            throughput = f"{info['bytes'] / median / 1e9:.2f} GB/s"
            if "gbps" in ceilings:
                ceiling = f"{info['bytes'] / median / 1e9 / ceilings['gbps']:.1%}"
        else:
            throughput = f"{per_row:,.0f} rows/s"
        peak = f"{info['peak_bytes'] / 2**20:,.1f} MB" if "peak_bytes" in info else "-"
        rows.append([b["group"], impl_label(info), f"{info['rows']:,}", format_time(median), throughput,
                     format_speedup(per_row, ref), format_speedup(per_row, faiss), ceiling, peak])
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
        f"ceiling  {ceiling['gflops']:.1f} GFLOP/s ({ceiling['what']})",
        *([f"         {ceiling['gbps']:.1f} GB/s ({ceiling['bandwidth_what']})"] if "gbps" in ceiling else []),
    ])


TABLE_HEADER = ["case", "impl", "rows", "median", "throughput",
                "vs ref", "vs faiss", "% ceiling", "peak mem"]
TABLE_NOTES = ("rows: rows of z timed (the reference times the first rows of the case); "
               "speed-ups compare rows/s.\n% ceiling: search GFLOP/s (2*rows*G*K*d / median) "
               "over the fp32 matmul GFLOP/s above; GB/s rows: over the copy bandwidth above.\npeak mem: peak resident memory of one call "
               "(lfq_entropy, merge: forward + backward) above what was resident before it, in a fresh process.\ndecode_attention: rows = tokens decoded; "
               "vs ref = vs the full-cache + mask loop (full-mask), vs faiss = vs SDPA over the sliced cache.")


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
