"""Every CUDA kernel, executed from its own .cu source on the CPU by the emulation build
(torch.ops.fastvq_emu.*), against the CPU op and the reference, under every schedule.

The emulation library is built by FASTVQ_EMU=1 (FASTVQ_EMU_ASAN=1 for the sanitizer variant, selected
with FASTVQ_EMU_VARIANT=asan in a process started with libasan preloaded: scripts/test.sh does both).
Without it these tests skip, unless FASTVQ_REQUIRE_EMU=1 (CI), where a missing build fails.
"""

import pytest
import torch

import fastvq
import fastvq.emu as emu
from fastvq.reference import mcq_gather_ref, mcq_search_ref

from conftest import CUDA_BACKENDS, EMU_MISSING, needs_emu
from test_mcq import DTYPES, METRICS, assert_search_matches, make_inputs

if EMU_MISSING is not None and "cuda" not in CUDA_BACKENDS:
    pytest.skip(EMU_MISSING, allow_module_level=True)

# The AVX-512/AVX2 CPU kernels use the same fp32 fma chains as the CUDA kernel: bit-identical results.
BITWISE = fastvq.build_info()["cpu_isa_supported"] != "scalar"
# (N, G, K, d): partial row blocks (64 rows/block), K off the 128-code tile, d past the 32-dim chunk
SHAPES = [(1, 1, 1, 1), (7, 2, 17, 8), (70, 3, 129, 9), (65, 1, 300, 33), (5, 2, 40, 70)]


def cpu_search(z, cb, metric):
    prev = fastvq.set_cpu_isa("auto")
    try:
        return fastvq.ops.mcq_search(z, cb, metric)
    finally:
        fastvq.set_cpu_isa(prev)


@needs_emu
def test_every_op_has_an_emulated_cuda_kernel():
    ops = [name for name in dir(torch.ops.fastvq) if not name.startswith("_")
           and isinstance(getattr(torch.ops.fastvq, name), torch._ops.OpOverloadPacket)]
    assert ops, "no fastvq ops found"
    for name in ops:
        op = getattr(torch.ops.fastvq_emu, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU"), (
            f"{name}: no emulated CUDA kernel registered (its .cu must register through common/cuda_compat.h)")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-G{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mcq_search_emulated(schedule, cuda_ops, shape, metric, dtype):
    N, G, K, d = shape
    z, cb = make_inputs(N, G, K, d, dtype)
    idx, scores = cuda_ops.mcq_search(z, cb, metric)
    idx_cpu, scores_cpu = cpu_search(z, cb, metric)
    if BITWISE:
        assert torch.equal(idx, idx_cpu)
        torch.testing.assert_close(scores, scores_cpu, rtol=0, atol=0, equal_nan=True)
    assert_search_matches(z, cb, metric, idx, scores)


@pytest.mark.parametrize("metric", METRICS)
def test_mcq_search_emulated_edge_inputs(schedule, cuda_ops, metric):
    # ties across tiles, non-finite rows and codes, zero rows, strided views, empty
    K, d = 300, 5
    cb = torch.randn(2, K, d)
    cb[0, [3, 140, 260]] = 1.0  # exact copies
    cb[1, 7, 2] = float("nan")
    cb[1, 200, 0] = float("inf")
    zbuf = torch.randn(2, 9, 2 * d)
    z = zbuf.transpose(0, 1)[..., ::2]  # [9, 2, d], non-contiguous
    z[0, 0] = 1.0
    z[1, 1, 3] = float("nan")
    z[2] = 0.0
    idx, scores = cuda_ops.mcq_search(z, cb, metric)
    idx_ref, scores_ref = mcq_search_ref(z, cb, metric)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(scores, scores_ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert idx[0, 0] == (3 if metric == "l2" else idx_ref[0, 0]) and idx[1, 1] == 0 and torch.isnan(scores[1, 1])
    if BITWISE:
        idx_cpu, scores_cpu = cpu_search(z, cb, metric)
        assert torch.equal(idx, idx_cpu)
        torch.testing.assert_close(scores, scores_cpu, rtol=0, atol=0, equal_nan=True)
    e_idx, e_scores = cuda_ops.mcq_search(torch.randn(0, 2, d), cb, metric)
    assert e_idx.shape == (0, 2) and e_scores.shape == (0, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_mcq_gather_emulated(schedule, cuda_ops, dtype, index_dtype):
    G, K, d = 3, 17, 5
    cb = torch.randn(K, G, d).to(dtype).transpose(0, 1)
    idx = torch.randint(0, K, (130, G)).to(index_dtype)
    assert torch.equal(cuda_ops.mcq_gather(idx, cb), fastvq.ops.mcq_gather(idx, cb))
    idx_nc = torch.randint(0, K, (G, 9)).to(index_dtype).t()
    assert torch.equal(cuda_ops.mcq_gather(idx_nc, cb), fastvq.ops.mcq_gather(idx_nc, cb))
    masked = idx.clone()
    masked.view(-1)[::3] = -1  # masked positions: zero rows
    out = cuda_ops.mcq_gather(masked, cb)
    assert torch.equal(out, fastvq.ops.mcq_gather(masked, cb)) and torch.equal(out, mcq_gather_ref(masked, cb))


@needs_emu
def test_os_thread_mode():
    z, cb = make_inputs(70, 2, 129, 9, torch.float32)
    emu.set_mode("threads")
    try:
        idx, scores = torch.ops.fastvq_emu.mcq_search(z, cb, "cosine")
    finally:
        emu.set_mode("fibers")
    idx_f, scores_f = torch.ops.fastvq_emu.mcq_search(z, cb, "cosine")
    assert torch.equal(idx, idx_f) and torch.equal(scores, scores_f)


@needs_emu
def test_bad_schedule_names():
    with pytest.raises(RuntimeError, match="schedule must be forward, reverse or shuffled"):
        emu.set_schedule("backwards")
    with pytest.raises(RuntimeError, match="mode must be fibers or threads"):
        emu.set_mode("gpu")


# ---- segment_sum ---------------------------------------------------------------------------------------

# (N, G, K, d): several blocks of 256 (segment, column) threads, d = 0, K = 1, G > 1, empty
SEGMENT_SHAPES = [(0, None, 3, 4), (1, None, 1, 1), (40, None, 7, 9), (300, None, 64, 33), (70, 3, 5, 0),
                  (65, 8, 9, 8), (200, 2, 1, 70)]


def _segment_inputs(N, G, K, d, dtype, index_dtype, weighted):
    from test_segment import make
    values, index, weight = make(N, G, K, d, dtype, index_dtype, skip=0.2, weighted=weighted)
    if weight is not None:
        weight = weight.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return values, index, weight


@pytest.mark.parametrize("shape", SEGMENT_SHAPES, ids=lambda s: "N{}-G{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_segment_sum_emulated(schedule, shape, dtype, weighted):
    """The CUDA kernels' sums are the CPU kernel's, bit for bit, under every schedule."""
    values, index, weight = _segment_inputs(*shape, dtype, torch.int64, weighted)
    sums, counts = torch.ops.fastvq_emu.segment_sum(values, index, shape[2], weight)
    sums_cpu, counts_cpu = torch.ops.fastvq.segment_sum(values, index, shape[2], weight)
    assert sums.dtype == sums_cpu.dtype and sums.shape == sums_cpu.shape
    assert torch.equal(sums, sums_cpu) and torch.equal(counts, counts_cpu)


def test_segment_sum_emulated_strided_int32(schedule):
    N, G, K, d = 50, 3, 6, 5
    values = torch.randn(G, N, 2 * d).transpose(0, 1)[..., ::2]
    index = torch.randint(-1, K, (G, N), dtype=torch.int32).t()
    weight = torch.rand(G, N).t()
    for w in (None, weight):
        got = torch.ops.fastvq_emu.segment_sum(values, index, K, w)
        want = torch.ops.fastvq.segment_sum(values, index, K, w)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got = torch.ops.fastvq_emu.segment_sum(values, torch.full((N, G), -1, dtype=torch.int32), K)
    assert not got[0].any() and not got[1].any()
    got = torch.ops.fastvq_emu.segment_sum(values[:, 0], index[:, 0], K)
    want = torch.ops.fastvq.segment_sum(values[:, 0], index[:, 0], K)
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("bad", [6, -2])
def test_segment_sum_emulated_bad_index_raises(bad):
    values = torch.randn(8, 2, 3)
    index = torch.zeros(8, 2, dtype=torch.long)
    index[5, 0] = bad
    with pytest.raises(IndexError, match=r"segment_sum: index must be in \[0, num_segments\) = \[0, 6\) or -1 "
                                         rf"\(skipped\), got {bad} at row 5, group 0"):
        torch.ops.fastvq_emu.segment_sum(values, index, 6)
    with pytest.raises(RuntimeError, match=r"segment_sum: values \[N, d\] need index \[N\]"):
        torch.ops.fastvq_emu.segment_sum(values, index[:, 0], 6)
    index[5, 0] = 5
    got = torch.ops.fastvq_emu.segment_sum(values, index, 6)
    assert torch.equal(got[0], torch.ops.fastvq.segment_sum(values, index, 6)[0])
