"""mcq_search's GEMM path (d >= 32): against the reference, the exactness contract (adversarially), the
edge shapes of its blocking, and its CUDA kernels emulated on the CPU (every schedule; ASan in
scripts/test.sh)."""
import pytest
import torch
import torch.nn.functional as F

import fastvq
import fastvq.emu as emu  # noqa: F401  (the schedule fixture needs the emulation build loaded)
from fastvq.ops import mcq_search
from fastvq.reference import mcq_search_ref
from fastvq.reference.mcq import mcq_search_eps

from conftest import EMU_MISSING, needs_emu
from test_mcq import DTYPES, METRICS, assert_search_matches, make_inputs

# (N, G, K, d): d at the threshold (32, 33), past one d block (385 > 1.5 * 256: a C tile), VQRAE's 1536,
# 4096; K = 1 and off every tile (6, 12, 64, 2048-code blocks); N = 0/1 and small N (code slices);
# several groups.
SHAPES = [
    (0, 1, 5, 32),
    (1, 1, 1, 32),
    (1, 1, 7, 33),
    (17, 2, 65, 32),
    (130, 1, 257, 64),
    (40, 3, 100, 100),
    (33, 1, 2100, 48),
    (70, 1, 300, 385),
    (9, 1, 300, 1536),
    (3, 1, 61, 4096),
    (2, 1, 5000, 48),
]


def objective64(z, cb, metric):
    """float64 objective [N, G, K] of the fp32-rounded inputs (larger is better; l2: minus the distance)."""
    G, K, d = cb.shape
    x = z.float().double().reshape(-1, G, d)
    c = cb.float().double()
    if metric == "l2":
        return -((x[:, :, None, :] - c[None]) ** 2).sum(-1)
    return torch.einsum("ngd,gkd->ngk", F.normalize(x, dim=-1, eps=1e-6), F.normalize(c, dim=-1, eps=1e-6))


def assert_contract(z, cb, metric, idx):
    """The documented contract: the exact best wherever the gap exceeds eps, and always within eps."""
    G, K, d = cb.shape
    obj = objective64(z, cb, metric)  # [N, G, K]
    eps = mcq_search_eps(z, cb, metric).reshape(-1, G)
    flat = idx.reshape(-1, G)
    best = obj.amax(-1)
    chosen = obj.gather(-1, flat[..., None])[..., 0]
    assert bool((best - chosen <= eps).all()), f"a result is further than eps from the best: {(best - chosen).max()}"
    if K > 1:
        top = obj.topk(2, dim=-1)
        clear = top.values[..., 0] - top.values[..., 1] > eps
        assert torch.equal(flat[clear], top.indices[..., 0][clear])
        return int(clear.sum())
    return flat.numel()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-G{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_path_matches_reference(cpu_isa, shape, metric, dtype):
    N, G, K, d = shape
    z, cb = make_inputs(N, G, K, d, dtype)
    idx, scores = mcq_search(z, cb, metric)
    assert_search_matches(z, cb, metric, idx, scores)
    if N:
        assert_contract(z, cb, metric, idx)


@pytest.mark.parametrize("metric", METRICS)
def test_gemm_path_non_contiguous_and_batched(cpu_isa, metric):
    G, K, d = 2, 70, 40
    zbuf = torch.randn(G, 3, 5, 2 * d)
    z = zbuf.permute(1, 2, 0, 3)[..., ::2]  # [3, 5, G, d], d-stride 2
    cb = torch.randn(K, G, d).transpose(0, 1)  # [G, K, d] from [K, G, d]
    assert not z.is_contiguous() and not cb.is_contiguous()
    idx, scores = mcq_search(z, cb, metric)
    idx_c, scores_c = mcq_search(z.contiguous(), cb.contiguous(), metric)
    assert idx.shape == (3, 5, G)
    assert torch.equal(idx, idx_c) and torch.equal(scores, scores_c)
    assert_search_matches(z, cb, metric, idx, scores)
    ze = torch.randn(1, G, d).expand(6, G, d)  # stride-0 rows
    idx_e, _ = mcq_search(ze, cb, metric)
    assert torch.equal(idx_e, idx_e[:1].expand(6, G))


def test_gemm_path_duplicated_codes_pick_smallest_index(cpu_isa):
    # exact copies of the nearest code in different code blocks (2048 codes), micro-tiles and slices
    K, d = 4500, 48
    cb = torch.randn(1, K, d) * 3
    target = torch.randn(d)
    for k in (5, 6, 2047, 2048, 4499):
        cb[0, k] = target
    z = (target + 0.01 * torch.randn(4, d))[:, None, :]
    for metric in METRICS:
        idx, _ = mcq_search(z, cb, metric)
        assert idx.flatten().tolist() == [5] * 4
        assert torch.equal(idx, mcq_search_ref(z, cb, metric)[0])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("d", [32, 1536])
def test_gemm_path_near_ties(cpu_isa, metric, d):
    """Codes at a controlled distance gap around eps from the best: the contract must hold on both sides."""
    torch.manual_seed(3)
    N, K = 24, 40
    z = torch.randn(N, 1, d)
    base = z[:, 0] + 0.5 * torch.randn(N, d) if metric == "l2" else z[:, 0].clone()  # row n's best: code n
    cb = torch.cat([base, torch.randn(K - N, d) * 4])[None]  # [1, K, d]; the far codes set C
    eps = mcq_search_eps(z, cb, metric)[:, 0]  # [N] (rivals below do not raise C)
    rivals = []
    for n in range(N):
        factor = [0.25, 0.9, 1.1, 4.0][n % 4]
        w = torch.randn(d, dtype=torch.float64)
        if metric == "l2":  # an offset perpendicular to z - base adds exactly |offset|^2 to the distance
            r = (z[n, 0] - base[n]).double()
            w -= (w @ r) / (r @ r) * r
            delta = (factor * eps[n].item()) ** 0.5 / w.norm()
            rivals.append((base[n].double() + delta * w).float())
        else:  # rotate away from z in the plane (z, w): cosine 1 - factor * eps
            zn = z[n, 0].double() / z[n, 0].double().norm()
            w -= (w @ zn) * zn
            w /= w.norm()
            cos = 1 - factor * eps[n].item()
            rivals.append(((cos * zn + (1 - cos * cos) ** 0.5 * w) * 3).float())
    cb = torch.cat([cb, torch.stack(rivals)[None]], dim=1)
    idx, _ = mcq_search(z, cb, metric)
    assert_contract(z, cb, metric, idx)


@pytest.mark.parametrize("metric", METRICS)
def test_gemm_path_large_norms(cpu_isa, metric):
    """A large common offset: the expanded form loses bits to cancellation; eps grows as C^2 and must hold."""
    d, K = 64, 300
    cb = 1000 + torch.randn(1, K, d)
    z = 1000 + torch.randn(50, 1, d)
    idx, scores = mcq_search(z, cb, metric)
    assert_contract(z, cb, metric, idx)
    # scaled-up but centred data keep their ranking exactly where the gap is clear
    cb2, z2 = torch.randn(1, K, d) * 1e6, torch.randn(50, 1, d) * 1e6
    idx2, _ = mcq_search(z2, cb2, metric)
    assert assert_contract(z2, cb2, metric, idx2) > 40


def test_gemm_path_non_finite(cpu_isa):
    G, K, d = 1, 80, 40
    cb = torch.randn(G, K, d)
    z = cb[:, [3, 7, 70, 9]].transpose(0, 1).clone()
    cb[0, 7, 2] = float("nan")
    cb[0, 70, 0] = float("inf")
    z[3, 0, 1] = float("-inf")
    for metric in METRICS:
        idx, scores = mcq_search(z, cb, metric)
        ref_idx, ref_scores = mcq_search_ref(z, cb, metric)
        assert idx[0, 0] == 3 and idx[3, 0] == 0 and torch.isnan(scores[3, 0])
        assert idx[1, 0] not in (7, 70) and idx[2, 0] not in (7, 70)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(scores, ref_scores, equal_nan=True, rtol=1e-4, atol=1e-4)
        idx3, scores3 = mcq_search(z[:3], torch.full_like(cb, float("nan")), metric)
        assert idx3.eq(0).all() and bool(torch.isnan(scores3).all())
    idx0, scores0 = mcq_search(torch.zeros(3, 1, d), cb, "cosine")  # zero rows: every cosine 0 -> 0
    assert idx0.eq(0).all() and scores0.eq(0).all()


def test_gemm_path_huge_codebook_small_n(cpu_isa):
    """K = 2^20 codes at N = 3: code blocks and slices; memory stays O(N + tile) (no [N, K] matrix)."""
    if cpu_isa == "scalar":
        pytest.skip("the scalar path is covered at smaller K; 2^20 codes take long without vectors")
    K, d = 1 << 20, 32
    g = torch.Generator().manual_seed(5)
    cb = torch.randn(1, K, d, generator=g)
    z = torch.randn(3, 1, d, generator=g)
    z[1, 0] = cb[0, K - 1]  # the last code is an exact hit
    for metric in METRICS:
        idx, scores = mcq_search(z, cb, metric)
        ref_idx, ref_scores = mcq_search_ref(z, cb, metric)
        assert idx[1, 0] == K - 1
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_gemm_path_opcheck_and_compile():
    z, cb = make_inputs(37, 2, 50, 40, torch.float32)
    for metric in METRICS:
        torch.library.opcheck(torch.ops.fastvq.mcq_search.default, (z, cb, metric))
    torch.library.opcheck(torch.ops.fastvq.mcq_search.default, (z.bfloat16(), cb.bfloat16()))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: mcq_search(a, b, "l2"), fullgraph=True)
    idx, scores = compiled(z, cb)
    ref_idx, ref_scores = mcq_search(z, cb, "l2")
    assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)


def test_gemm_path_bad_inputs():
    with pytest.raises(RuntimeError, match=r"mcq_search: z must be \[\.\.\., G, d\] with d == codebooks.size\(2\) == 32"):
        mcq_search(torch.randn(4, 1, 33), torch.randn(1, 5, 32))
    with pytest.raises(RuntimeError, match="mcq_search: codebooks must have z's dtype"):
        mcq_search(torch.randn(4, 1, 64), torch.randn(1, 5, 64).half())
    with pytest.raises(RuntimeError, match="mcq_search: codebooks must hold at least one code"):
        mcq_search(torch.randn(4, 1, 64), torch.randn(1, 0, 64))
    with pytest.raises(RuntimeError, match='mcq_search: metric must be "l2" or "cosine"'):
        mcq_search(torch.randn(4, 1, 64), torch.randn(1, 5, 64), "ip")


@pytest.mark.parametrize("metric", METRICS)
def test_gemm_path_through_the_module(metric):
    """MultiCodebookQuantizer with 2 codebooks of 64-d codes: the GEMM path, forward and backward."""
    from fastvq.reference import multi_codebook_quantize_ref

    torch.manual_seed(1)
    q = fastvq.nn.MultiCodebookQuantizer(dim=128, num_codebooks=2, codebook_size=300, metric=metric)
    with torch.no_grad():
        q.codebooks.normal_()
    z = torch.randn(3, 7, 128, requires_grad=True)
    quantized, indices, loss = q(z)
    cb_ref = q.codebooks.detach().clone().requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    quantized_r, indices_r, loss_r = multi_codebook_quantize_ref(z_ref, cb_ref, metric, 0.25, 1.0)
    assert torch.equal(indices, indices_r)
    torch.testing.assert_close(quantized, quantized_r)
    torch.testing.assert_close(loss, loss_r)
    (loss + quantized.sum()).backward()
    (loss_r + quantized_r.sum()).backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(q.codebooks.grad, cb_ref.grad)


# ---- the CUDA kernels, emulated on the CPU ------------------------------------------------------------

# (N, G, K, d): partial 128-row blocks, K off the 64-code tile, d off the 16-dim chunk, split-K (small N)
EMU_SHAPES = [(1, 1, 1, 32), (130, 2, 65, 33), (5, 1, 300, 100), (3, 1, 70, 1536), (200, 1, 129, 48)]
BITWISE = fastvq.build_info()["cpu_isa_supported"] != "scalar"


def cpu_search(z, cb, metric):
    prev = fastvq.set_cpu_isa("auto")
    try:
        return mcq_search(z, cb, metric)
    finally:
        fastvq.set_cpu_isa(prev)


@needs_emu
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "N{}-G{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mcq_gemm_search_emulated(schedule, shape, metric, dtype):
    N, G, K, d = shape
    z, cb = make_inputs(N, G, K, d, dtype)
    idx, scores = torch.ops.fastvq_emu.mcq_search(z, cb, metric)
    if BITWISE:  # the same fma chains as the CPU's vector paths: the same bits
        idx_cpu, scores_cpu = cpu_search(z, cb, metric)
        assert torch.equal(idx, idx_cpu)
        torch.testing.assert_close(scores, scores_cpu, rtol=0, atol=0, equal_nan=True)
    assert_search_matches(z, cb, metric, idx, scores)
    assert_contract(z, cb, metric, idx)


@needs_emu
@pytest.mark.parametrize("metric", METRICS)
def test_mcq_gemm_search_emulated_edge_inputs(schedule, metric):
    # duplicated codes across tiles and splits, non-finite rows and codes, zero rows, strided views
    K, d = 300, 40
    cb = torch.randn(2, K, d)
    cb[0, [3, 64, 260]] = 1.0
    cb[1, 7, 2] = float("nan")
    cb[1, 200, 0] = float("inf")
    zbuf = torch.randn(2, 9, 2 * d)
    z = zbuf.transpose(0, 1)[..., ::2]  # [9, 2, d], non-contiguous
    z[0, 0] = 1.0
    z[1, 1, 3] = float("nan")
    z[2] = 0.0
    idx, scores = torch.ops.fastvq_emu.mcq_search(z, cb, metric)
    idx_ref, scores_ref = mcq_search_ref(z, cb, metric)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(scores, scores_ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert idx[0, 0] == (3 if metric == "l2" else idx_ref[0, 0]) and idx[1, 1] == 0 and torch.isnan(scores[1, 1])
    if BITWISE:
        idx_cpu, scores_cpu = cpu_search(z, cb, metric)
        assert torch.equal(idx, idx_cpu)
        torch.testing.assert_close(scores, scores_cpu, rtol=0, atol=0, equal_nan=True)
    e_idx, e_scores = torch.ops.fastvq_emu.mcq_search(torch.randn(0, 2, d), cb, metric)
    assert e_idx.shape == (0, 2) and e_scores.shape == (0, 2)


@needs_emu
def test_mcq_gemm_search_emulated_bad_inputs():
    with pytest.raises(RuntimeError, match=r"mcq_search: z must be \[\.\.\., G, d\] with d"):
        torch.ops.fastvq_emu.mcq_search(torch.randn(4, 1, 33), torch.randn(1, 5, 32))
    with pytest.raises(RuntimeError, match="mcq_search: codebooks must have z's dtype"):
        torch.ops.fastvq_emu.mcq_search(torch.randn(4, 1, 64), torch.randn(1, 5, 64).half())
