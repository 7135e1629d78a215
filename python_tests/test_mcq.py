"""mcq_search / mcq_gather against the pure-PyTorch references (the module: test_nn_mcq.py)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fastvq
from fastvq.ops import mcq_gather, mcq_search
from fastvq.reference import mcq_gather_ref, mcq_search_ref

from conftest import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
METRICS = ["l2", "cosine"]
# (N, G, K, d): rows 0/1/odd/large, G 1-16, K 1/2/17/4096/4097 and tile edges, d 1-64 off the vector widths
SHAPES = [
    (0, 2, 5, 4),
    (1, 1, 1, 1),
    (1, 3, 2, 7),
    (7, 2, 17, 8),
    (9, 2, 31, 1),
    (33, 4, 64, 9),
    (65, 1, 65, 16),
    (31, 16, 129, 3),
    (130, 8, 4096, 8),
    (17, 2, 300, 64),
    (5, 1, 4097, 33),
    (3, 1, 40, 100),
]


def objective64(z, cb, metric):
    """float64 objective [N, G, K] (larger is better) on the same (dtype-rounded) inputs."""
    x = z.double().reshape(-1, cb.shape[0], cb.shape[2])
    c = cb.double()
    if metric == "l2":  # expanded form: float64 keeps its cancellation error far below fp32 resolution
        return -((x * x).sum(-1)[..., None] - 2 * torch.einsum("ngd,gkd->ngk", x, c) + (c * c).sum(-1)[None])
    return torch.einsum("ngd,gkd->ngk", F.normalize(x, dim=-1, eps=1e-6), F.normalize(c, dim=-1, eps=1e-6))


def assert_search_matches(z, cb, metric, idx, scores, gap_tol=None):
    """Indices equal the float64 argmax wherever the best/second-best gap is clear; scores match the
    reference's within fp32 tolerance everywhere."""
    G, K, d = cb.shape
    assert idx.dtype == torch.int64 and scores.dtype == torch.float32
    assert idx.shape == z.shape[:-1] and scores.shape == z.shape[:-1]
    if z.numel() == 0:
        return
    assert bool(((idx >= 0) & (idx < K)).all())
    obj = objective64(z, cb, metric)  # [N, G, K]
    top = obj.topk(min(2, K), dim=-1)
    best = top.indices[..., 0]
    scale = (obj.abs().amax(-1) + 1.0) if metric == "l2" else torch.ones_like(top.values[..., 0])
    gap = (top.values[..., 0] - top.values[..., 1]) if K > 1 else torch.full_like(scale, math.inf)
    clear = gap > (gap_tol or 1e-4) * scale
    flat_idx = idx.reshape(-1, G)
    assert torch.equal(flat_idx[clear], best[clear]), "indices differ where the gap is clear"
    # scores: exactly the objective of the chosen code (recomputed in float64), to fp32 precision
    chosen = obj.gather(-1, flat_idx[..., None])[..., 0]
    want = -chosen if metric == "l2" else chosen
    torch.testing.assert_close(scores.reshape(-1, G).double(), want, rtol=2e-5, atol=2e-5 * scale.max().item())
    ref_idx, ref_scores = mcq_search_ref(z, cb, metric)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4 * scale.max().item())


def make_inputs(N, G, K, d, dtype, device="cpu", lead=None):
    z = torch.randn(*(lead or (N,)), G, d, device=device).to(dtype)
    cb = torch.randn(G, K, d, device=device).to(dtype)
    return z, cb


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-G{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_search_matches_reference(cpu_isa, shape, metric, dtype):
    N, G, K, d = shape
    z, cb = make_inputs(N, G, K, d, dtype)
    idx, scores = mcq_search(z, cb, metric)
    assert_search_matches(z, cb, metric, idx, scores)


@pytest.mark.parametrize("metric", METRICS)
def test_search_large_unitok_shape(metric):
    z, cb = make_inputs(3000, 8, 4096, 8, torch.float32)
    idx, scores = mcq_search(z, cb, metric)
    ref_idx, ref_scores = mcq_search_ref(z, cb, metric)
    # fp32 near-ties may legitimately break differently; they must be rare and within tolerance
    assert (idx == ref_idx).float().mean() > 0.999
    assert_search_matches(z, cb, metric, idx, scores)


@pytest.mark.parametrize("metric", METRICS)
def test_search_vector_paths_agree_bitwise(metric):
    """AVX2 and AVX-512 run the same fma chains: identical bits, not just close."""
    supported = fastvq.build_info()["cpu_isa_supported"]
    if supported != "avx512":
        pytest.skip("needs an AVX-512 machine to compare both paths")
    z, cb = make_inputs(300, 4, 1000, 12, torch.float32)
    outs = []
    for isa in ("avx2", "avx512"):
        prev = fastvq.set_cpu_isa(isa)
        try:
            outs.append(mcq_search(z, cb, metric))
        finally:
            fastvq.set_cpu_isa(prev)
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("metric", METRICS)
def test_search_non_contiguous_and_batched(cpu_isa, metric):
    G, K, d = 4, 70, 9
    # z [B, T, G, d] from a permuted buffer with a d-stride of 2; codebooks transposed from [K, G, d]
    zbuf = torch.randn(G, 3, 5, 2 * d)
    z = zbuf.permute(1, 2, 0, 3)[..., ::2]
    cb = torch.randn(K, G, d).transpose(0, 1)
    assert not z.is_contiguous() and not cb.is_contiguous()
    idx, scores = mcq_search(z, cb, metric)
    assert idx.shape == (3, 5, G)
    idx_c, scores_c = mcq_search(z.contiguous(), cb.contiguous(), metric)
    assert torch.equal(idx, idx_c) and torch.equal(scores, scores_c)
    assert_search_matches(z, cb, metric, idx, scores)
    # expanded (stride-0) rows
    ze = torch.randn(1, G, d).expand(6, G, d)
    idx_e, _ = mcq_search(ze, cb, metric)
    assert torch.equal(idx_e, idx_e[:1].expand(6, G))


def test_search_ties_pick_smallest_index(cpu_isa):
    K, d = 200, 4
    cb = torch.full((1, K, d), 3.0)
    cb[0, [17, 70, 150]] = 1.0  # three exact copies of the nearest code, across code tiles
    z = torch.ones(5, 1, d)
    for metric in METRICS:
        idx, scores = mcq_search(z, cb, metric)
        # l2: 17 is the first of the exact copies; cosine: every code is parallel to z -> 0
        assert idx.flatten().tolist() == [17 if metric == "l2" else 0] * 5
        ref_idx, _ = mcq_search_ref(z, cb, metric)
        assert torch.equal(idx, ref_idx)


def test_search_non_finite(cpu_isa):
    G, K, d = 1, 80, 5
    cb = torch.randn(G, K, d)
    z = cb[:, [3, 7, 70, 9]].transpose(0, 1).clone()  # rows = codes 3, 7, 70, 9 exactly
    cb[0, 7, 2] = float("nan")  # code 7 can never win
    cb[0, 70, 0] = float("inf")
    z[3, 0, 1] = float("-inf")  # row 3 is non-finite
    for metric in METRICS:
        idx, scores = mcq_search(z, cb, metric)
        ref_idx, ref_scores = mcq_search_ref(z, cb, metric)
        assert idx[0, 0] == 3
        assert idx[1, 0] not in (7, 70) and idx[2, 0] not in (7, 70)
        assert idx[3, 0] == 0 and torch.isnan(scores[3, 0])
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(scores, ref_scores, equal_nan=True, rtol=1e-4, atol=1e-4)
        # a NaN row and an all-non-finite codebook
        idx2, scores2 = mcq_search(torch.full((2, 1, d), float("nan")), cb, metric)
        assert idx2.tolist() == [[0], [0]] and bool(torch.isnan(scores2).all())
        idx3, scores3 = mcq_search(z[:3], torch.full_like(cb, float("nan")), metric)
        assert idx3.eq(0).all() and bool(torch.isnan(scores3).all())


def test_search_zero_vectors_cosine(cpu_isa):
    cb = torch.randn(2, 10, 6)
    cb[1, 0] = 0.0
    z = torch.zeros(3, 2, 6)
    idx, scores = mcq_search(z, cb, "cosine")  # every cosine is 0 -> index 0, score 0
    assert idx.eq(0).all() and scores.eq(0).all()


def test_search_empty_groups_and_dims():
    idx, scores = mcq_search(torch.randn(4, 0, 3), torch.randn(0, 5, 3))
    assert idx.shape == (4, 0) and scores.shape == (4, 0)
    idx, scores = mcq_search(torch.randn(4, 2, 0), torch.randn(2, 5, 0))  # d = 0: every distance is 0
    assert idx.eq(0).all() and scores.eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_gather_matches_reference(dtype, index_dtype):
    G, K, d = 3, 17, 5
    cb = torch.randn(K, G, d).to(dtype).transpose(0, 1)  # non-contiguous codebooks
    idx = torch.randint(0, K, (2, 7, G)).to(index_dtype)
    out = mcq_gather(idx, cb)
    assert out.dtype == dtype and out.shape == (2, 7, G, d)
    assert torch.equal(out, mcq_gather_ref(idx, cb))
    idx_nc = torch.randint(0, K, (G, 9)).to(index_dtype).t()
    assert torch.equal(mcq_gather(idx_nc, cb), mcq_gather_ref(idx_nc, cb))
    assert mcq_gather(idx[:0], cb).shape == (0, 7, G, d)


def _mask_some(idx: Tensor, every: int = 3) -> Tensor:
    """idx with every `every`-th entry (flat order) set to -1, the index of a masked position."""
    idx = idx.clone()
    idx.view(-1)[::every] = -1
    return idx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_gather_minus_one_gives_zeros(dtype, index_dtype):
    G, K, d = 3, 17, 5
    cb = torch.randn(K, G, d).to(dtype).transpose(0, 1)
    idx = _mask_some(torch.randint(0, K, (4, 7, G))).to(index_dtype)
    out = mcq_gather(idx, cb)
    assert torch.equal(out, mcq_gather_ref(idx, cb))
    masked = idx == -1
    assert masked.any() and (~masked).any()
    assert (out[masked] == 0).all() and not out[masked].signbit().any()  # +0, not -0
    assert torch.equal(out[~masked], mcq_gather_ref(idx.clamp_min(0), cb)[~masked])
    idx_nc = _mask_some(torch.randint(0, K, (G, 9)), every=2).to(index_dtype).t()
    assert torch.equal(mcq_gather(idx_nc, cb), mcq_gather_ref(idx_nc, cb))
    # every index masked, even with an empty codebook
    assert torch.equal(mcq_gather(torch.full((5, G), -1), cb), torch.zeros(5, G, d, dtype=dtype))
    empty = torch.randn(G, 0, d, dtype=dtype, requires_grad=dtype.is_floating_point)
    out = mcq_gather(torch.full((5, G), -1), empty)
    assert torch.equal(out, torch.zeros(5, G, d, dtype=dtype))
    out.sum().backward()
    assert empty.grad.shape == (G, 0, d)


@pytest.mark.parametrize("bad", [4, 5, -2, -5, 2**40])
def test_gather_out_of_range_raises(bad):
    cb = torch.randn(2, 4, 3)
    idx = torch.zeros(5, 2, dtype=torch.long)
    idx[1, 0] = -1  # a masked row is fine
    idx[3, 1] = bad
    with pytest.raises(IndexError, match=r"mcq_gather: indices must be in \[0, K\) = \[0, 4\) or -1 \(a masked "
                                         rf"row\), got {bad} at row 3, group 1"):
        mcq_gather(idx, cb)
    with pytest.raises(IndexError, match="mcq_gather: indices must be in"):
        mcq_gather(torch.zeros(5, 2, dtype=torch.long), torch.randn(2, 0, 3))  # index 0 of an empty codebook


@pytest.mark.parametrize("masked", [False, True], ids=["all-kept", "some-masked"])
def test_gather_gradcheck(masked):
    G, K, d = 2, 3, 4  # few codes, many rows: repeated indices must accumulate
    cb = torch.randn(G, K, d, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, K, (4, 5, G))
    if masked:
        idx = _mask_some(idx)
    assert torch.autograd.gradcheck(lambda c: mcq_gather(idx, c), (cb,))
    assert torch.autograd.gradgradcheck(lambda c: mcq_gather(idx, c), (cb,))


def test_gather_grad_matches_reference():
    cb = torch.randn(4, 50, 8, requires_grad=True)
    idx = _mask_some(torch.randint(0, 50, (300, 4)), every=7)
    w = torch.randn(300, 4, 8)
    (g,) = torch.autograd.grad((mcq_gather(idx, cb) * w).sum(), cb)
    (g_ref,) = torch.autograd.grad((mcq_gather_ref(idx, cb) * w).sum(), cb)
    torch.testing.assert_close(g, g_ref)
    # a masked row sends nothing back: the gradient is that of the kept rows alone
    keep = idx != -1
    (g_kept,) = torch.autograd.grad((mcq_gather(idx, cb) * w * keep[..., None]).sum(), cb)
    assert torch.equal(g, g_kept)


def test_search_is_not_differentiable():
    z = torch.randn(5, 2, 3, requires_grad=True)
    idx, scores = mcq_search(z, torch.randn(2, 4, 3))
    assert not scores.requires_grad and not idx.requires_grad


def test_opcheck():
    z, cb = make_inputs(37, 3, 50, 6, torch.float32)
    for metric in METRICS:
        torch.library.opcheck(torch.ops.fastvq.mcq_search.default, (z, cb, metric))
    torch.library.opcheck(torch.ops.fastvq.mcq_search.default, (z.half(), cb.half()))
    cbg = torch.randn(3, 50, 6, requires_grad=True)
    idx = _mask_some(torch.randint(0, 50, (11, 3)))
    torch.library.opcheck(torch.ops.fastvq.mcq_gather.default, (idx, cbg))
    torch.library.opcheck(torch.ops.fastvq.mcq_gather.default, (idx.int(), cbg.detach().bfloat16()))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def quantize(z, cb):
        idx, scores = mcq_search(z, cb, "cosine")
        idx = torch.where(scores > 0, idx, -1)  # a mask: -1 rows gather zeros
        return mcq_gather(idx, cb), idx, scores

    z, cb = make_inputs(40, 4, 64, 8, torch.float32)
    compiled = torch.compile(quantize, fullgraph=True, dynamic=True)
    for n in (40, 13):
        out, idx, scores = compiled(z[:n], cb)
        ref_out, ref_idx, ref_scores = quantize(z[:n], cb)
        assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out) and torch.equal(scores, ref_scores)


def test_meta_tensors_shape_only():
    idx, scores = mcq_search(torch.empty(2, 3, 4, 8, device="meta"), torch.empty(4, 10, 8, device="meta"))
    assert idx.shape == (2, 3, 4) and idx.dtype == torch.int64 and scores.dtype == torch.float32
    out = mcq_gather(torch.empty(5, 4, dtype=torch.long, device="meta"), torch.empty(4, 10, 8, device="meta"))
    assert out.shape == (5, 4, 8)


@pytest.mark.parametrize("args, match", [
    (lambda: (torch.randn(4, 2, 3), torch.randn(2, 5, 3).double()), "mcq_search: codebooks must have z's dtype"),
    (lambda: (torch.randint(0, 3, (4, 2, 3)), torch.randint(0, 3, (2, 5, 3))), "mcq_search: z must be float32"),
    (lambda: (torch.randn(4, 3, 3), torch.randn(2, 5, 3)), r"mcq_search: z must be \[\.\.\., G, d\] with G"),
    (lambda: (torch.randn(4, 2, 4), torch.randn(2, 5, 3)), r"mcq_search: z must be \[\.\.\., G, d\] with d"),
    (lambda: (torch.randn(3), torch.randn(2, 5, 3)), "mcq_search: z must be"),
    (lambda: (torch.randn(4, 2, 3), torch.randn(5, 3)), r"mcq_search: codebooks must be \[G, K, d\]"),
    (lambda: (torch.randn(4, 2, 3), torch.randn(2, 0, 3)), r"mcq_search: codebooks must hold at least one code"),
])
def test_search_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        mcq_search(*args())


def test_search_bad_metric_and_device():
    with pytest.raises(RuntimeError, match='mcq_search: metric must be "l2" or "cosine", got "dot"'):
        mcq_search(torch.randn(4, 2, 3), torch.randn(2, 5, 3), "dot")
    with pytest.raises(RuntimeError, match="mcq_search: codebooks must be on z's device"):
        mcq_search(torch.randn(4, 2, 3), torch.randn(2, 5, 3, device="meta"))


@pytest.mark.parametrize("args, match", [
    (lambda: (torch.zeros(4, 2), torch.randn(2, 5, 3)), "mcq_gather: indices must be int64 or int32"),
    (lambda: (torch.zeros(4, 3, dtype=torch.long), torch.randn(2, 5, 3)), r"mcq_gather: indices must be \[\.\.\., G\]"),
    (lambda: (torch.zeros(4, 2, dtype=torch.long), torch.randn(10, 3)), r"mcq_gather: codebooks must be \[G, K, d\]"),
    (lambda: (torch.zeros(4, 2, dtype=torch.long), torch.randint(0, 2, (2, 5, 3))), "mcq_gather: codebooks must be float"),
])
def test_gather_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        mcq_gather(*args())


# ---- CUDA (runs only where a GPU is present) ----------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_bitwise(metric, dtype):
    for N, G, K, d in SHAPES:
        z, cb = make_inputs(N, G, K, d, dtype)
        prev = fastvq.set_cpu_isa("auto")
        idx, scores = mcq_search(z, cb, metric)
        fastvq.set_cpu_isa(prev)
        idx_c, scores_c = mcq_search(z.cuda(), cb.cuda(), metric)
        assert torch.equal(idx, idx_c.cpu())
        torch.testing.assert_close(scores, scores_c.cpu(), rtol=0, atol=0, equal_nan=True)
        assert torch.equal(mcq_gather(idx_c, cb.cuda()).cpu(), mcq_gather(idx, cb))
        masked = _mask_some(idx)  # -1 rows: zeros on both devices
        assert torch.equal(mcq_gather(masked.cuda(), cb.cuda()).cpu(), mcq_gather(masked, cb))


def test_build_info():
    info = fastvq.build_info()
    assert info["version"] == fastvq.__version__
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_isa"] in ("scalar", "avx2", "avx512")
    if info["cuda"] or os.environ.get("FASTVQ_REQUIRE_CUDA") == "1":
        assert info["cuda"] and info["cuda_archs"] and info["nvcc"]
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        fastvq.set_cpu_isa("sse9")
    prev = fastvq.set_cpu_isa("scalar")
    try:
        assert fastvq.cpu_isa() == "scalar" and fastvq.build_info()["cpu_isa"] == "scalar"
        assert fastvq.set_cpu_isa("auto") == "scalar"
        assert fastvq.cpu_isa() == info["cpu_isa_supported"]
    finally:
        fastvq.set_cpu_isa(prev)
