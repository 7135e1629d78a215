"""CPU == CUDA at the edges the per-family tests do not reach, and precision pinned where fastvq promises it.

The CUDA cases take the `cuda_ops` fixture (conftest.py): the CUDA kernels' own source on the emulator and,
when a GPU is present, on the GPU, always against the CPU op. Shapes past CUDA's grid limits run on a GPU
only (the emulator would spend minutes on 65,536 blocks that do almost nothing).
"""
import contextlib

import pytest
import torch

import fastvq
from fastvq.ops import decode_step, lfq_entropy, mcq_gather, mcq_search

from conftest import HAS_CUDA, devices

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


# ---- d == 0 (no dimensions: every code is at distance 0, the first one wins) ----------------------------

@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (70, 3, 129), (130, 2, 5)], ids=lambda s: "N{}-G{}-K{}".format(*s))
def test_mcq_search_d0(schedule, cuda_ops, metric, shape):
    # The reverse schedule runs the last warp first: without the barrier after the row statistics it read
    # ok_s / den_s before the first warps wrote them (mcq_search_kernel's d == 0 race).
    N, G, K = shape
    z, cb = torch.randn(N, G, 0), torch.randn(G, K, 0)
    idx, scores = cuda_ops.mcq_search(z, cb, metric)
    idx_cpu, scores_cpu = mcq_search(z, cb, metric)
    assert torch.equal(idx, idx_cpu) and torch.equal(scores, scores_cpu)
    assert (idx == 0).all() and (scores == 0).all()


def test_mcq_gather_d0(cuda_ops):
    idx, cb = torch.randint(0, 4, (5, 2)), torch.randn(2, 4, 0)
    out = cuda_ops.mcq_gather(idx, cb)
    assert out.shape == (5, 2, 0) and out.shape == mcq_gather(idx, cb).shape


# ---- grid limits: more than 65,535 blocks along y -------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cuda_mcq_search_more_groups_than_grid_y(metric):
    G = 65_537  # mcq_prepare_kernel and mcq_search_kernel put groups on grid.y (at most 65,535)
    z, cb = torch.randn(3, G, 2), torch.randn(G, 5, 2)
    idx, scores = mcq_search(z.cuda(), cb.cuda(), metric)
    idx_cpu, scores_cpu = mcq_search(z, cb, metric)
    assert torch.equal(idx.cpu(), idx_cpu) and torch.equal(scores.cpu(), scores_cpu)


@needs_cuda
def test_cuda_decode_more_chunks_than_grid_y():
    L = 65_535 * 32 + 40  # decode_chunk_kernel puts 32-key chunks on grid.y
    q, k, v = torch.randn(1, 2, 4), torch.randn(1, 1, L, 4) * 0.1, torch.randn(1, 1, L, 4)
    lengths = torch.tensor([L - 3])
    out = fastvq.ops.decode_attention(q.cuda(), k.cuda(), v.cuda(), lengths.cuda())
    assert torch.equal(out.cpu(), fastvq.ops.decode_attention(q, k, v, lengths))


# ---- a bf16 decode loop, step by step ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_step_loop_matches_cpu(cuda_ops, dtype):
    B, Hq, Hkv, Lmax, D, steps = 3, 8, 2, 40, 64, 12
    g = torch.Generator().manual_seed(5)
    caches = [(torch.zeros(B, Hkv, Lmax, D, dtype=dtype), torch.zeros(B, Hkv, Lmax, D, dtype=dtype),
               torch.zeros(B, dtype=torch.long)) for _ in range(2)]
    for step in range(steps):
        q = torch.randn(B, Hq, D, generator=g).to(dtype)
        kn, vn = torch.randn(B, Hkv, D, generator=g).to(dtype), torch.randn(B, Hkv, D, generator=g).to(dtype)
        keep = torch.rand(B, generator=g) < 0.6
        got = cuda_ops.decode_step(q, *caches[0], kn, vn, keep, None, None)
        want = decode_step(q, *caches[1], kn, vn, keep)
        assert torch.equal(got, want), f"step {step}"
        for a, b in zip(*caches):
            assert torch.equal(a, b), f"step {step}"


# ---- lfq_entropy's GEMMs stay IEEE fp32 whatever the matmul settings and autocast say -------------------

@contextlib.contextmanager
def _setting(name, device):
    prev_tf32 = torch.backends.cuda.matmul.fp32_precision
    prev_onednn = torch.backends.mkldnn.matmul.fp32_precision
    try:
        if name == "allow_tf32":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.mkldnn.matmul.fp32_precision = "tf32"
            yield
        elif name in ("high", "medium"):
            prev = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(name)
            try:
                yield
            finally:
                torch.set_float32_matmul_precision(prev)
        else:  # autocast: bf16 on the CPU, fp16 on CUDA
            with torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16):
                yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev_tf32
        torch.backends.mkldnn.matmul.fp32_precision = prev_onednn


def _entropy_and_grad(z, group_bits):
    z = z.detach().requires_grad_()
    sample, codebook, probs = lfq_entropy(z, 0.1, group_bits, return_code_probs=True)
    (sample - 0.7 * codebook + (probs * probs).sum()).backward()
    return sample.detach(), codebook.detach(), probs.detach(), z.grad


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("setting", ["allow_tf32", "high", "medium", "autocast"])
@pytest.mark.parametrize("group_bits", [0, 6], ids=lambda g: f"g{g or 'D'}")
def test_lfq_entropy_gemms_ignore_matmul_precision_and_autocast(device, setting, group_bits):
    z = (torch.randn(600, 18) * 0.4).to(device)  # D = 18: 2^9 x 2^9 GEMMs per group when ungrouped
    want = _entropy_and_grad(z, group_bits)
    settings = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision,
                torch.get_float32_matmul_precision())
    with _setting(setting, device):
        inner = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        got = _entropy_and_grad(z, group_bits)
        # the op restores the caller's settings
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == inner
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w), setting
    assert settings == (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision,
                        torch.get_float32_matmul_precision())


@needs_cuda
def test_tf32_setting_changes_a_plain_cuda_matmul():
    # The test above can fail on a GPU: TF32 does change an ordinary fp32 GEMM there.
    a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
    exact = a @ b
    with _setting("allow_tf32", "cuda"):
        tf32 = a @ b
    if torch.cuda.get_device_capability() >= (8, 0):
        assert not torch.equal(exact, tf32)


def test_autocast_changes_a_plain_cpu_bmm():
    # ... and on the CPU autocast does change an ordinary bmm (what lfq_entropy's orchestration calls).
    a, b = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.bmm(a, b).dtype == torch.bfloat16
