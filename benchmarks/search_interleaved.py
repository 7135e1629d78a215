"""``python benchmarks/search_interleaved.py ROUNDS N,K,d,metric[,G] ...``: fastvq, faiss and chunked torch
(the implementations of bench_search.py) timed interleaved in one process -- per round one torch.mm 2048^2
and one call of each, the order rotated every round -- so that all see the same machine load. For a
shared, busy machine, where pytest-benchmark's back-to-back rounds would compare different loads.
Reports the median and the minimum of each. ``G > 1`` (UniTok: 65536,4096,8,l2,8) searches G codebooks:
fastvq in one call, faiss with one flat index per group (as bench_mcq.py), torch-chunked per group."""
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
    N, K, d, metric, *rest = spec.split(",")
    N, K, d, G = int(N), int(K), int(d), int(rest[0]) if rest else 1
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(N, G, d, generator=g), torch.randn(G, K, d, generator=g)
    indexes, queries = [], []
    for gi in range(G):
        zg, cg = z[:, gi], cb[gi]
        if metric == "cosine":
            zg, cg = F.normalize(zg, dim=-1, eps=1e-6), F.normalize(cg, dim=-1, eps=1e-6)
        index = (faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2)(d)
        index.add(cg.contiguous().numpy()); indexes.append(index); queries.append(zg.contiguous().numpy())
    impls = {"fastvq": lambda: mcq_search(z, cb, metric),
             "faiss": lambda: [index.search(q, 1) for index, q in zip(indexes, queries)]}
    for ch in ((4096,) if d > 64 else (1024, 4096)):
        impls[f"torch-chunk{ch}"] = (lambda ch=ch: [torch_chunked_search(z[:, gi], cb[gi], metric, ch) for gi in range(G)])
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
    fl = 2 * N * G * K * d
    print(f"== N={N} G={G} K={K} d={d} {metric}: torch.mm 2048 best {max(gm):.1f} GFLOP/s")
    for k, ts in times.items():
        print(f"  {k:16s} median {statistics.median(ts)*1e3:9.1f} ms  min {min(ts)*1e3:9.1f} ms  "
              f"{fl/min(ts)/1e9:6.1f} GFLOP/s (min)")
