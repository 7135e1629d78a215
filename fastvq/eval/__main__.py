"""``python -m fastvq.eval costs``: per-image cost of each frozen network on this machine.
``python -m fastvq.eval rfid [--n 200]``: the main job's rFID/KID (fashion_mnist/val, fixed list) of a
noisy "reconstruction", timed cold (reference features computed) and warm (reference cached)."""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _load() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return float("nan")


def costs(batch: int, repeats: int) -> list:
    from fastvq.eval import EfficientNetLite0, FIDInceptionV3, MiniLMTextEncoder
    rows = []
    for make, kind in ((EfficientNetLite0, "image"), (FIDInceptionV3, "image"), (MiniLMTextEncoder, "text")):
        net = make()
        x = torch.rand(batch, 3, 64, 64) if kind == "image" else ["a small greyscale photo of an ankle boot."] * batch
        with torch.no_grad():
            t0 = time.perf_counter()
            net(x)
            first = time.perf_counter() - t0
            ts, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                net(x)
                ts.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        ts.sort()
        cpu.sort()
        rows.append(dict(network=net.name, batch=batch, first_call_s=round(first, 2),
                         ms_per_item_median=round(1000 * ts[len(ts) // 2] / batch, 1),
                         cpu_ms_per_item_median=round(1000 * cpu[len(cpu) // 2] / batch, 1),
                         load_average=round(_load(), 1)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastvq.eval")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("costs")
    c.add_argument("--batch", type=int, default=32)
    c.add_argument("--repeats", type=int, default=3)
    r = sub.add_parser("rfid")
    r.add_argument("--n", type=int, default=None)
    r.add_argument("--sigma", type=float, default=0.05)
    a = ap.parse_args(argv)
    print(json.dumps(dict(cpu=_cpu(), threads=torch.get_num_threads(), torch=torch.__version__)))
    if a.cmd == "costs":
        costs(a.batch, a.repeats)
    else:
        from fastvq.eval import DEFAULT_N, ReconstructionEvaluator
        t0 = time.perf_counter()
        ev = ReconstructionEvaluator(n=a.n or DEFAULT_N)
        g = torch.Generator().manual_seed(0)

        def recon(x):
            return (x + a.sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
        for label in ("first", "second"):
            t1, c1 = time.perf_counter(), time.process_time()
            out = ev.evaluate(recon)
            print(json.dumps(dict(run=label, seconds=round(time.perf_counter() - t1, 1),
                                  cpu_seconds=round(time.process_time() - c1, 1), load_average=round(_load(), 1),
                                  total_since_start=round(time.perf_counter() - t0, 1),
                                  **{k: round(v.value, 4) for k, v in out.items()}, n=out["rfid"].n)), flush=True)


if __name__ == "__main__":
    main()
