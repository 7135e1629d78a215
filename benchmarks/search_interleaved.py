"""``python benchmarks/search_interleaved.py ROUNDS N,K,d,metric ...``: fastvq, faiss and chunked torch
(the implementations of bench_search.py) timed interleaved in one process -- per round one torch.mm 2048^2
and one call of each, the order rotated every round -- so that all see the same machine load. For a
shared, busy machine, where pytest-benchmark's back-to-back rounds would compare different loads.
Reports the median and the minimum of each."""
import statistics, sys, time
import torch, torch.nn.functional as F
import faiss, fastvq
from fastvq.ops import mcq_search
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_search import torch_chunked_search

def gemm_rate(n=4096, r=3):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = []
    for _ in range(r):
        t = time.perf_counter(); torch.mm(a, b); ts.append(time.perf_counter() - t)
    return 2 * n**3 / min(ts) / 1e9, 2 * n**3 / statistics.median(ts) / 1e9

print(f"threads torch {torch.get_num_threads()} faiss {faiss.omp_get_max_threads()} isa {fastvq.cpu_isa()}")
rounds = int(sys.argv[1])
for spec in sys.argv[2:]:
    N, K, d, metric = spec.split(",")
    N, K, d = int(N), int(K), int(d)
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(N, 1, d, generator=g), torch.randn(1, K, d, generator=g)
    z2, c = z[:, 0], cb[0]
    zf, cf = (F.normalize(z2, dim=-1, eps=1e-6), F.normalize(c, dim=-1, eps=1e-6)) if metric == "cosine" else (z2, c)
    index = (faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2)(d)
    index.add(cf.contiguous().numpy()); q = zf.contiguous().numpy()
    impls = {"fastvq": lambda: mcq_search(z, cb, metric), "faiss": lambda: index.search(q, 1)}
    for ch in ((4096,) if d > 64 else (1024, 4096)):
        impls[f"torch-chunk{ch}"] = (lambda ch=ch: torch_chunked_search(z2, c, metric, ch))
    times = {k: [] for k in impls}
    for k, f in impls.items():
        f()
    gm = []
    names = list(impls)
    for r in range(rounds):
        gm.append(gemm_rate(2048, 1)[0])
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            f = impls[k]
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    fl = 2 * N * K * d
    print(f"== N={N} K={K} d={d} {metric}: torch.mm 2048 best {max(gm):.1f} GFLOP/s")
    for k, ts in times.items():
        print(f"  {k:16s} median {statistics.median(ts)*1e3:9.1f} ms  min {min(ts)*1e3:9.1f} ms  "
              f"{fl/min(ts)/1e9:6.1f} GFLOP/s (min)")
