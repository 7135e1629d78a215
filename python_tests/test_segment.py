"""segment_sum and kmeans against the pure-PyTorch references, the determinism contract, bad input."""
import pytest
import torch

from fastvq.ops import kmeans, mcq_gather, segment_sum
from fastvq.reference import mcq_gather_ref, segment_sum_ref
from fastvq.reference.kmeans import kmeans_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (N, G, K, d); G None = the single form. Rows/segments/columns around the vector widths and 0/1.
SHAPES = [
    (0, None, 5, 4),
    (1, None, 1, 1),
    (7, None, 3, 8),
    (33, None, 1, 9),
    (130, None, 17, 31),
    (300, None, 64, 33),
    (4097, None, 100, 8),
    (5, 3, 4, 7),
    (65, 8, 9, 8),
    (300, 2, 4097, 1),
    (129, 4, 31, 16),
]


def make(N, G, K, d, dtype=torch.float32, index_dtype=torch.int64, skip=0.1, weighted=False):
    lead = (N,) if G is None else (N, G)
    values = torch.randn(*lead, d).to(dtype)
    index = torch.randint(0, max(K, 1), lead) if K > 0 else torch.full(lead, -1)
    index = torch.where(torch.rand(lead) < skip, torch.full_like(index, -1), index).to(index_dtype)
    weight = torch.rand(lead) if weighted else None
    return values, index, weight


def sequential_ref(values, index, K, weight=None):
    """The contract, literally: each segment summed row by row in ascending order, in the accumulation
    dtype, one rounding per product and per sum."""
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    grouped = index.dim() == 2
    v = (values if grouped else values[:, None]).to(acc)
    idx = (index if grouped else index[:, None]).long()
    w = None if weight is None else (weight if grouped else weight[:, None]).to(acc)
    N, G, d = v.shape
    sums = torch.zeros(G, K, d, dtype=acc)
    counts = torch.zeros(G, K, dtype=acc)
    for n in range(N):
        for g in range(G):
            k = int(idx[n, g])
            if k < 0:
                continue
            if w is None:
                sums[g, k] = sums[g, k] + v[n, g]
                counts[g, k] += 1
            else:
                sums[g, k] = sums[g, k] + w[n, g] * v[n, g]
                counts[g, k] = counts[g, k] + w[n, g]
    return (sums, counts) if grouped else (sums[0], counts[0])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-G{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_matches_reference(shape, dtype, weighted):
    N, G, K, d = shape
    values, index, weight = make(N, G, K, d, dtype, weighted=weighted)
    sums, counts = segment_sum(values, index, K, weight)
    ref_sums, ref_counts = segment_sum_ref(values, index, K, weight)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert sums.dtype == acc and counts.dtype == acc
    assert sums.shape == ref_sums.shape and counts.shape == ref_counts.shape
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(counts, ref_counts, rtol=1e-6, atol=1e-6)
    if not weighted:  # integer counts, exactly
        assert torch.equal(counts, ref_counts)


@pytest.mark.parametrize("shape", [(50, None, 7, 9), (40, 3, 5, 4), (30, 2, 3, 8), (20, None, 4, 300)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_bitwise_sequential_order(cpu_isa, shape, dtype, weighted):
    """The summation order is the documented one: bit for bit, on every CPU vector path."""
    values, index, weight = make(*shape, dtype, weighted=weighted)
    sums, counts = segment_sum(values, index, shape[2], weight)
    want_sums, want_counts = sequential_ref(values, index, shape[2], weight)
    assert torch.equal(sums, want_sums) and torch.equal(counts, want_counts)


@pytest.mark.parametrize("grouped", [False, True])
def test_independent_of_thread_count(grouped):
    # large enough for several sort chunks and sum tasks; few segments, so every sum is a long chain
    N, K, d = 70000, 37, 5
    values, index, weight = make(N, 3 if grouped else None, K, d, weighted=True)
    prev = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3, 8):
            torch.set_num_threads(t)
            outs.append(segment_sum(values, index, K, weight))
            outs.append(segment_sum(values, index, K))
    finally:
        torch.set_num_threads(prev)
    for i in range(2, len(outs)):
        assert torch.equal(outs[i][0], outs[i % 2][0]) and torch.equal(outs[i][1], outs[i % 2][1])


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_non_contiguous_and_index_dtypes(index_dtype):
    N, G, K, d = 40, 3, 6, 5
    vbuf = torch.randn(G, N, 2 * d)
    values = vbuf.transpose(0, 1)[..., ::2]  # [N, G, d], strided everywhere
    index = torch.randint(-1, K, (G, N)).to(index_dtype).t()  # [N, G], transposed
    weight = torch.rand(G, N).t()
    assert not values.is_contiguous() and not index.is_contiguous() and not weight.is_contiguous()
    for w in (None, weight):
        sums, counts = segment_sum(values, index, K, w)
        s2, c2 = segment_sum(values.contiguous(), index.contiguous().long(), K,
                             None if w is None else w.contiguous())
        assert torch.equal(sums, s2) and torch.equal(counts, c2)
    # a [N] weight in the grouped form applies to every group
    w1 = torch.rand(N)
    a = segment_sum(values, index, K, w1)
    b = segment_sum(values, index, K, w1[:, None].expand(N, G).contiguous())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # expanded (stride-0) values
    ve = torch.randn(1, d).expand(N, d)
    sums, counts = segment_sum(ve, index[:, 0], K)
    torch.testing.assert_close(sums, counts[:, None] * ve[0])


def test_bool_weight_is_a_mask():
    values, index, _ = make(50, None, 4, 3, skip=0.0)
    mask = torch.rand(50) < 0.5
    sums, counts = segment_sum(values, index, 4, mask)
    want = segment_sum(values, torch.where(mask, index, -1), 4)
    assert torch.equal(sums, want[0]) and torch.equal(counts, want[1])


def test_edge_cases():
    # K = 1, all skipped, empty, d = 0, K = 0
    values = torch.randn(9, 4)
    s, c = segment_sum(values, torch.zeros(9, dtype=torch.long), 1)
    torch.testing.assert_close(s[0], values.sum(0))
    assert c.tolist() == [9.0]
    s, c = segment_sum(values, torch.full((9,), -1), 3)
    assert torch.equal(s, torch.zeros(3, 4)) and torch.equal(c, torch.zeros(3))
    s, c = segment_sum(torch.randn(0, 4), torch.zeros(0, dtype=torch.long), 3)
    assert torch.equal(s, torch.zeros(3, 4)) and torch.equal(c, torch.zeros(3))
    s, c = segment_sum(torch.randn(5, 0), torch.tensor([0, 1, 1, -1, 1]), 2)
    assert s.shape == (2, 0) and c.tolist() == [1.0, 3.0]
    s, c = segment_sum(values, torch.full((9,), -1), 0)
    assert s.shape == (0, 4) and c.shape == (0,)
    s, c = segment_sum(torch.randn(5, 0, 3), torch.zeros(5, 0, dtype=torch.long), 4)
    assert s.shape == (0, 4, 3) and c.shape == (0, 4)
    # 16-bit values: fp32 sums, not rounded back (2049 ones in bf16 would stop at 256)
    s, c = segment_sum(torch.ones(2049, 1, dtype=torch.bfloat16), torch.zeros(2049, dtype=torch.long), 1)
    assert s.dtype == torch.float32 and s.item() == 2049.0


@pytest.mark.parametrize("bad", [3, -2, 100])
def test_out_of_range_index_raises(bad):
    values = torch.randn(6, 2, 3)
    index = torch.zeros(6, 2, dtype=torch.long)
    index[4, 1] = bad
    with pytest.raises(IndexError, match=r"segment_sum: index must be in \[0, num_segments\) = \[0, 3\) or -1 "
                                         rf"\(skipped\), got {bad} at row 4, group 1"):
        segment_sum(values, index, 3)
    with pytest.raises(IndexError, match=rf"got {bad} at row 4$"):
        segment_sum(values[:, 1], index[:, 1].int(), 3)


@pytest.mark.parametrize("args, match", [
    (lambda: (torch.randint(0, 3, (4, 2)), torch.zeros(4, dtype=torch.long), 3), "segment_sum: values must be float"),
    (lambda: (torch.randn(4, 2), torch.zeros(4), 3), "segment_sum: index must be int64 or int32"),
    (lambda: (torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long), 3), r"segment_sum: values \[N, d\] need index \[N\]"),
    (lambda: (torch.randn(4), torch.zeros(4, dtype=torch.long), 3), r"segment_sum: values \[N, d\] need index \[N\]"),
    (lambda: (torch.randn(4, 2), torch.zeros(5, dtype=torch.long), 3), "segment_sum: index must have values' leading shape"),
    (lambda: (torch.randn(4, 3, 2), torch.zeros(4, 2, dtype=torch.long), 3), "segment_sum: index must have values' leading shape"),
    (lambda: (torch.randn(4, 2), torch.zeros(4, dtype=torch.long), -1), "segment_sum: num_segments must be >= 0"),
    (lambda: (torch.randn(4, 2), torch.zeros(4, dtype=torch.long), 3, torch.ones(5)), "segment_sum: weight must have index's shape"),
    (lambda: (torch.randn(4, 2), torch.zeros(4, dtype=torch.long, device="meta"), 3), "segment_sum: index must be on values' device"),
])
def test_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        segment_sum(*args())


def test_bad_weight_dtype_at_the_op():
    # the wrapper converts; the op itself demands the accumulation dtype
    with pytest.raises(RuntimeError, match="segment_sum: weight must be Float"):
        torch.ops.fastvq.segment_sum(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), 3, torch.ones(4).double())


def test_gradcheck():
    N, G, K, d = 12, 2, 4, 3
    values = torch.randn(N, G, d, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(N, G, dtype=torch.float64, requires_grad=True)
    index = torch.randint(-1, K, (N, G))

    def f(v, w):
        return segment_sum(v, index, K, w)

    assert torch.autograd.gradcheck(f, (values, weight))
    assert torch.autograd.gradgradcheck(f, (values, weight))
    assert torch.autograd.gradcheck(lambda v: segment_sum(v, index[:, 0], K)[0], (values[:, 0].detach().requires_grad_(),))
    # only counts used: the weight still gets its gradient
    (gw,) = torch.autograd.grad(f(values, weight)[1].sum(), weight)
    assert torch.equal(gw, (index >= 0).double())


def test_grad_of_16bit_values():
    values = torch.randn(20, 4, dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, 3, (20,))
    sums, _ = segment_sum(values, index, 3)
    (g,) = torch.autograd.grad((sums * torch.arange(3.0)[:, None]).sum(), values)
    assert g.dtype == torch.bfloat16 and torch.equal(g, index.to(torch.bfloat16)[:, None].expand(20, 4))


def test_opcheck():
    values, index, weight = make(37, 3, 11, 6, weighted=True)
    torch.library.opcheck(torch.ops.fastvq.segment_sum.default, (values.requires_grad_(), index, 11, weight))
    torch.library.opcheck(torch.ops.fastvq.segment_sum.default, (values.detach().bfloat16(), index.int(), 11))
    v1, i1, _ = make(20, None, 4, 5)
    torch.library.opcheck(torch.ops.fastvq.segment_sum.default, (v1, i1, 4))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def ema_stats(x, idx, mask):
        sums, counts = segment_sum(x, idx, 16, mask)
        return sums / counts.clamp(min=1)[..., None], counts

    compiled = torch.compile(ema_stats, fullgraph=True, dynamic=True)
    for n in (40, 13):
        x, idx, _ = make(n, 4, 16, 8)
        mask = torch.rand(n) < 0.8
        out = compiled(x, idx, mask)
        ref = ema_stats(x, idx, mask)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_meta_tensors_shape_only():
    s, c = segment_sum(torch.empty(5, 4, 8, device="meta"), torch.empty(5, 4, dtype=torch.long, device="meta"), 10)
    assert s.shape == (4, 10, 8) and c.shape == (4, 10) and s.dtype == torch.float32
    s, c = segment_sum(torch.empty(5, 8, dtype=torch.float64, device="meta"),
                       torch.empty(5, dtype=torch.int32, device="meta"), 10)
    assert s.shape == (10, 8) and c.shape == (10,) and s.dtype == torch.float64


# ---- mcq_gather's backward (now a segment_sum) ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_mcq_gather_backward_is_deterministic_fp32(dtype):
    G, K, d = 4, 50, 8
    cb = torch.randn(G, K, d).to(dtype).requires_grad_(True)
    idx = torch.randint(0, K, (3000, G))
    w = torch.randn(3000, G, d).to(dtype)
    grads = []
    prev = torch.get_num_threads()
    try:
        for t in (1, 2, 4):
            torch.set_num_threads(t)
            (g,) = torch.autograd.grad((mcq_gather(idx, cb) * w).sum(), cb)
            grads.append(g)
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    # fp32 accumulation, one rounding at the end
    want = segment_sum_ref(w.float(), idx, K)[0].to(dtype)
    (g_ref,) = torch.autograd.grad((mcq_gather_ref(idx, cb) * w).sum(), cb)
    assert grads[0].dtype == dtype
    assert torch.equal(grads[0], want)
    err = (grads[0].double() - segment_sum_ref(w.double(), idx, K)[0]).abs().max()
    err_ref = (g_ref.double() - segment_sum_ref(w.double(), idx, K)[0]).abs().max()
    if dtype != torch.float32:
        assert err <= err_ref  # never worse than accumulating in the 16-bit dtype


# ---- kmeans -------------------------------------------------------------------------------------------

def blobs(N, G, K, d, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(G, K, d, generator=gen) * 3
    labels = torch.randint(0, K, (N, G), generator=gen)
    x = centers[torch.arange(G), labels] + spread * torch.randn(N, G, d, generator=gen)
    return x, centers, labels


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_kmeans_deterministic(metric, init):
    x, _, _ = blobs(500, 3, 16, 8)
    a = kmeans(x, 16, iters=8, seed=3, metric=metric, init=init)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = kmeans(x, 16, iters=8, seed=3, metric=metric, init=init)
    finally:
        torch.set_num_threads(prev)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    c = kmeans(x, 16, iters=8, seed=4, metric=metric, init=init)
    assert not torch.equal(a.centroids, c.centroids)  # the seed matters
    assert a.centroids.shape == (3, 16, 8) and a.indices.shape == (500, 3) and a.inertia.shape == (3,)
    assert a.inertia_history.shape == (9, 3)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_inertia_non_increasing(metric):
    x = torch.randn(2000, 2, 6)  # no cluster structure: many iterations of real movement
    r = kmeans(x, 64, iters=15, seed=0, metric=metric)
    h = r.inertia_history  # [16, 2]
    assert bool((h[1:] <= h[:-1] * (1 + 1e-5) + 1e-6).all()), h
    assert bool((h[-1] < h[0]).all())
    torch.testing.assert_close(r.inertia, h[-1])


def test_kmeans_refills_empty_clusters():
    # 3 far-apart pairs of points... and an init that leaves clusters 1 and 3 empty
    x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0], [10.0, 0.3], [0.0, 20.0], [0.0, 20.5]])
    init = torch.tensor([[0.0, 0.0], [100.0, 100.0], [10.0, 0.0], [-100.0, -100.0]])
    r = kmeans(x, 4, iters=1, init=init)
    # iteration 1 assigns rows 0, 1, 4, 5 to cluster 0 and rows 2, 3 to cluster 2: clusters 1 and 3 are
    # empty. The farthest rows from their own centroid are 5 (distance 420.25), then 4 (400): cluster 1
    # takes row 5, cluster 3 takes row 4.
    assert torch.equal(r.centroids[1], x[5]) and torch.equal(r.centroids[3], x[4])
    torch.testing.assert_close(r.centroids[0], x[[0, 1, 4, 5]].mean(0))
    torch.testing.assert_close(r.centroids[2], x[[2, 3]].mean(0))
    torch.testing.assert_close(r.inertia_history[0], torch.tensor(0.01 + 0.09 + 400.0 + 420.25))
    ref = kmeans_ref(x, init, iters=1)
    torch.testing.assert_close(r.centroids, ref[0])
    # the refills keep going (cluster 0 empties in iteration 2 and takes row 0); the fixed point has one
    # cluster per pair or point
    r5 = kmeans(x, 4, iters=5, init=init)
    assert r5.indices.tolist() == [0, 0, 2, 2, 3, 1]
    assert r5.inertia.item() == pytest.approx(0.005 + 0.045, rel=1e-4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("grouped", [False, True])
def test_kmeans_matches_plain_lloyd(metric, grouped):
    x, _, _ = blobs(800, 2, 24, 5, spread=0.3, seed=1)
    x = x if grouped else x[:, 0]
    init = kmeans(x, 24, iters=0, seed=7, metric=metric).centroids  # the random init, on the unit sphere for cosine
    r = kmeans(x, 24, iters=6, metric=metric, init=init)
    ref_c, ref_idx, ref_hist = kmeans_ref(x, init, iters=6, metric=metric)
    assert torch.equal(r.indices, ref_idx)
    torch.testing.assert_close(r.centroids, ref_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.inertia_history, ref_hist, rtol=1e-4, atol=1e-4)


def test_kmeans_dtypes_and_bad_inputs():
    x = torch.randn(100, 4)
    r16 = kmeans(x.bfloat16(), 5, iters=2)
    assert r16.centroids.dtype == torch.float32
    r64 = kmeans(x.double(), 5, iters=2)
    assert r64.centroids.dtype == torch.float64
    with pytest.raises(ValueError, match=r"kmeans: num_clusters must be in \[1, N\] = \[1, 100\], got 101"):
        kmeans(x, 101)
    with pytest.raises(ValueError, match="kmeans: metric"):
        kmeans(x, 5, metric="dot")
    with pytest.raises(ValueError, match="kmeans: x must be finite"):
        kmeans(torch.full((10, 2), float("nan")), 2)
    with pytest.raises(ValueError, match=r"kmeans: x must be \[N, d\] or \[N, G, d\]"):
        kmeans(torch.randn(10), 2)
    with pytest.raises(ValueError, match=r"kmeans: init centroids must be \[5, 4\]"):
        kmeans(x, 5, init=torch.randn(4, 4))
    with pytest.raises(ValueError, match="kmeans: init must be"):
        kmeans(x, 5, init="farthest")
