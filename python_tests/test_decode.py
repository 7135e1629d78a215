"""decode_attention / decode_step / kv_append / fastvq.nn.CompressedKVCache, first_occurrence and
merge_causal_mask against the pure-PyTorch references, and the MergeAR contract: a small transformer
decoding token by token with the compressed cache gives the logits of one full forward pass under the
merge mask.

The emulated CUDA kernels (torch.ops.fastvq_emu.decode_attention / decode_step / kv_append) are compared with the CPU
ops at the end of the file: bit-identical, by construction (docs/ops/decode.md).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvq
from fastvq.nn import CompressedKVCache, first_occurrence, merge_causal_mask
from fastvq.ops import decode_attention, decode_step, kv_append
from fastvq.reference import decode_attention_full_mask_ref, decode_attention_ref, decode_step_ref, kv_append_ref

from conftest import needs_emu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 80, 128]
GQA = [1, 2, 4, 8]
TOLS = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.float16: dict(rtol=2e-3, atol=1e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3)}


def make_cache(B, Hq, Hkv, Lmax, D, dtype, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Lmax, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Lmax, D, generator=gen).to(dtype)
    return q, k, v


def ragged_lengths(B, Lmax, dtype=torch.int64):
    """0, 1, Lmax, Lmax - 1, a chunk boundary, then random."""
    fixed = [0, 1, Lmax, max(Lmax - 1, 0), min(32, Lmax), min(33, Lmax)]
    vals = [fixed[i] if i < len(fixed) else int(torch.randint(0, Lmax + 1, ())) for i in range(B)]
    return torch.tensor(vals, dtype=dtype)


def assert_matches_reference(q, k, v, lengths, scale=None, bias=None):
    """The op against the float64 reference, rounded to q's dtype."""
    out = decode_attention(q, k, v, lengths, scale, bias)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    want = decode_attention_ref(q.double(), k.double(), v.double(), lengths, scale,
                                None if bias is None else bias.double())
    torch.testing.assert_close(out, want.to(q.dtype), **TOLS[q.dtype])
    empty = lengths == 0
    assert out[empty].eq(0).all(), "an empty cache gives zeros"
    return out


# ---- decode_attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("ratio", GQA, ids=lambda r: f"gqa{r}")
@pytest.mark.parametrize("D", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_matches_reference(dtype, D, ratio, with_bias):
    B, Hkv, Lmax = 7, 2, 70  # chunks of 32: two full and a partial one
    q, k, v = make_cache(B, Hkv * ratio, Hkv, Lmax, D, dtype)
    lengths = ragged_lengths(B, Lmax)
    bias = torch.randn(B, Lmax).to(dtype) if with_bias else None
    assert_matches_reference(q, k, v, lengths, bias=bias)


@pytest.mark.parametrize("Lmax", [1, 31, 32, 33, 64, 65, 257])
@pytest.mark.parametrize("D", [1, 7, 15, 16, 17, 33, 256])
def test_decode_attention_sizes_around_chunks_and_lanes(D, Lmax):
    q, k, v = make_cache(4, 4, 2, Lmax, D, torch.float32)
    lengths = torch.tensor([Lmax, 0, 1, (Lmax + 1) // 2])
    assert_matches_reference(q, k, v, lengths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_int32_lengths_and_scale(dtype):
    q, k, v = make_cache(6, 4, 4, 40, 64, dtype)
    lengths = ragged_lengths(6, 40, torch.int32)
    out = assert_matches_reference(q, k, v, lengths, scale=0.3)
    assert torch.equal(out, decode_attention(q, k, v, lengths.long(), 0.3))
    default = decode_attention(q, k, v, lengths)
    assert torch.equal(default, decode_attention(q, k, v, lengths, 1 / math.sqrt(64)))


def test_decode_attention_reads_only_the_valid_prefix():
    q, k, v = make_cache(3, 2, 1, 50, 32, torch.float32)
    lengths = torch.tensor([10, 50, 0])
    want = decode_attention(q, k, v, lengths)
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        k2[b, :, n:] = float("nan")
        v2[b, :, n:] = float("inf")
    got = decode_attention(q, k2, v2, lengths)
    assert torch.equal(got, want) and got.isfinite().all()


def test_decode_attention_non_contiguous_views():
    B, Hq, Hkv, Lmax, D = 5, 8, 2, 45, 64
    q, k, v = make_cache(B, Hq, Hkv, Lmax, D, torch.float32)
    lengths = ragged_lengths(B, Lmax)
    bias = torch.randn(B, Lmax)
    want = decode_attention(q, k, v, lengths, None, bias)
    # a slice of a longer buffer, a [B, L, H, D] buffer transposed, D-strided rows, a strided q and bias
    big = torch.randn(B, Hkv, Lmax + 20, D)
    big[:, :, :Lmax] = k
    sliced = big[:, :, :Lmax]
    blhd = k.transpose(1, 2).contiguous().transpose(1, 2)
    dstride = torch.zeros(B, Hkv, Lmax, 2 * D)
    dstride[..., ::2] = v
    vs = dstride[..., ::2]
    qs = torch.zeros(B, Hq, 3 * D)
    qs[..., ::3] = q
    bs = torch.zeros(Lmax, B)
    bs[:] = bias.t()
    cases = [(q, sliced, v, bias), (q, blhd, vs, bias), (qs[..., ::3], k, v, bs.t())]
    for qq, kk, vv, bb in cases:
        assert not (kk.is_contiguous() and vv.is_contiguous() and qq.is_contiguous() and bb.is_contiguous())
        assert torch.equal(decode_attention(qq, kk, vv, lengths, None, bb), want)
    lengths_view = torch.stack([lengths, lengths], 1)[:, 0]  # a strided lengths vector
    assert torch.equal(decode_attention(q, k, v, lengths_view, None, bias), want)


def test_decode_attention_bias_masks_and_counts():
    B, H, Lmax, D = 3, 4, 40, 32
    q, k, v = make_cache(B, H, H, Lmax, D, torch.float32)
    lengths = torch.tensor([40, 25, 9])
    # -inf bias == the compacted cache without those entries
    drop = torch.rand(B, Lmax) < 0.5
    drop[:, 0] = False
    bias = torch.zeros(B, Lmax).masked_fill(drop, float("-inf"))
    got = decode_attention(q, k, v, lengths, None, bias)
    for b in range(B):
        keep = (~drop[b, : lengths[b]]).nonzero().squeeze(1)
        kb, vb = k[b:b + 1, :, keep], v[b:b + 1, :, keep]
        want = decode_attention(q[b:b + 1], kb, vb, torch.tensor([len(keep)]))
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-6, atol=1e-6)
    # a log-count bias == an entry repeated count times
    counts = torch.randint(1, 4, (B, Lmax))
    got = decode_attention(q, k, v, lengths, None, counts.float().log())
    for b in range(B):
        n = int(lengths[b])
        rep = counts[b, :n]
        kb = k[b:b + 1, :, :n].repeat_interleave(rep, dim=2)
        vb = v[b:b + 1, :, :n].repeat_interleave(rep, dim=2)
        want = decode_attention_ref(q[b:b + 1].double(), kb.double(), vb.double(), torch.tensor([int(rep.sum())]))
        torch.testing.assert_close(got[b:b + 1], want.float(), rtol=1e-5, atol=2e-6)
    # every logit -inf -> zeros, like an empty cache
    all_masked = decode_attention(q, k, v, lengths, None, torch.full((B, Lmax), float("-inf")))
    assert all_masked.eq(0).all()


def test_decode_attention_numerically_stable_logits():
    q, k, v = make_cache(4, 2, 2, 90, 64, torch.float32)
    q = q * 300.0  # logits in the thousands: exp would overflow without the running maximum
    lengths = torch.tensor([90, 33, 1, 64])
    out = decode_attention(q, k, v, lengths)
    # fp32 logits of magnitude ~3000 carry absolute errors ~3e-4 (any fp32 implementation): looser tolerance
    want = decode_attention_ref(q.double(), k.double(), v.double(), lengths)
    torch.testing.assert_close(out, want.float(), rtol=1e-3, atol=1e-3)
    assert out.isfinite().all()
    out16 = decode_attention(q.half(), k.half(), v.half(), lengths)
    assert out16.isfinite().all()


def test_decode_attention_nan_propagates():
    q, k, v = make_cache(2, 2, 2, 20, 16, torch.float32)
    lengths = torch.tensor([20, 20])
    k[0, 1, 5, 3] = float("nan")
    out = decode_attention(q, k, v, lengths)
    assert out[0, 1].isnan().all() and out[0, 0].isfinite().all() and out[1].isfinite().all()


def test_decode_attention_empty_inputs():
    q, k, v = make_cache(0, 4, 2, 8, 16, torch.float32)
    assert decode_attention(q, k, v, torch.zeros(0, dtype=torch.long)).shape == (0, 4, 16)
    q, k, v = make_cache(3, 2, 1, 0, 16, torch.bfloat16)  # Lmax = 0
    out = decode_attention(q, k, v, torch.zeros(3, dtype=torch.long))
    assert out.shape == (3, 2, 16) and out.dtype == torch.bfloat16 and out.eq(0).all()


def test_decode_attention_cpu_isas_bit_identical(cpu_isa):
    """Every ISA (and the CUDA kernel, below) computes the same fp32 operations in the same order."""
    prev = fastvq.set_cpu_isa("scalar")
    try:
        cases = []
        # rows read in place (fp32, and 16-bit converted in registers) and through the fp32 tile (D % 16 != 0)
        for dtype, D in ((torch.float32, 64), (torch.float16, 80), (torch.bfloat16, 64), (torch.bfloat16, 7),
                         (torch.float32, 33)):
            q, k, v = make_cache(5, 8, 2, 70, D, dtype)
            lengths = ragged_lengths(5, 70)
            bias = torch.randn(5, 70)
            cases.append(((q, k, v, lengths, None, bias), decode_attention(q, k, v, lengths, None, bias)))
    finally:
        fastvq.set_cpu_isa(prev)
    for args, want in cases:
        assert torch.equal(decode_attention(*args), want)


def test_decode_attention_full_mask_baseline_agrees():
    """The uncompressed loop's step (full cache + boolean mask) equals decode_attention over the compacted
    cache of the unmasked rows."""
    B, H, T, D = 3, 4, 50, 32
    q, k, v = make_cache(B, H, H, T, D, torch.float32)
    mask = torch.rand(B, T) < 0.6
    mask[:, -1] = True
    full = decode_attention_full_mask_ref(q, k, v, mask)
    lengths = mask.sum(1)
    kc = torch.zeros(B, H, T, D)
    vc = torch.zeros(B, H, T, D)
    for b in range(B):
        idx = mask[b].nonzero().squeeze(1)
        kc[b, :, : len(idx)], vc[b, :, : len(idx)] = k[b, :, idx], v[b, :, idx]
    torch.testing.assert_close(decode_attention(q, kc, vc, lengths), full, rtol=1e-5, atol=2e-6)


def test_decode_attention_is_inference_only():
    q, k, v = make_cache(2, 2, 2, 5, 8, torch.float32)
    q.requires_grad_(True)
    out = decode_attention(q, k, v, torch.tensor([5, 3]))
    with pytest.raises(RuntimeError, match="decode_attention.*inference-only"):
        out.sum().backward()


# ---- kv_append ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_append_matches_reference(dtype, index_dtype):
    B, Hkv, Lmax, D = 6, 3, 7, 16
    kc = torch.randn(B, Hkv, Lmax, D).to(dtype)
    vc = torch.randn(B, Hkv, Lmax, D).to(dtype)
    lengths = torch.tensor([0, 1, 4, 2, 3, 0], dtype=index_dtype)
    for keep in (torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool),
                 torch.tensor([True, False, True, False, True, True])):
        k_new = torch.randn(B, Hkv, D).to(dtype)
        v_new = torch.randn(B, Hkv, D).to(dtype)
        want = kv_append_ref(kc, vc, lengths, k_new, v_new, keep)
        assert kv_append(kc, vc, lengths, k_new, v_new, keep) is None
        assert lengths.dtype == index_dtype
        for got, w in zip((kc, vc, lengths), want):
            assert torch.equal(got, w)


def test_kv_append_strided_views_and_full_cache_error():
    B, Hkv, Lmax, D = 3, 2, 4, 8
    kbuf = torch.zeros(B, Lmax, Hkv, 2 * D)
    kc = kbuf.transpose(1, 2)[..., ::2]  # [B, Hkv, Lmax, D], non-contiguous
    vc = torch.zeros(B, Hkv, Lmax + 3, D)[:, :, :Lmax]
    lengths = torch.zeros(B, dtype=torch.long)
    rows = []
    for step in range(Lmax):
        k_new = torch.randn(B, D, Hkv).transpose(1, 2)  # strided new rows
        v_new = torch.randn(B, Hkv, D)
        kv_append(kc, vc, lengths, k_new, v_new, torch.ones(B, dtype=torch.bool))
        rows.append((k_new.clone(), v_new.clone()))
    assert lengths.tolist() == [Lmax] * B
    for step, (k_new, v_new) in enumerate(rows):
        assert torch.equal(kc[:, :, step], k_new) and torch.equal(vc[:, :, step], v_new)
    # sequence 1 is full: an error, and nothing is written anywhere
    lengths[0] = 2
    before = (kc.clone(), vc.clone(), lengths.clone())
    with pytest.raises(RuntimeError, match=r"kv_append: the cache of sequence 1 is full \(lengths\[1\] = Lmax = 4\)"):
        kv_append(kc, vc, lengths, torch.ones(B, Hkv, D), torch.ones(B, Hkv, D), torch.tensor([True, True, False]))
    for got, want in zip((kc, vc, lengths), before):
        assert torch.equal(got, want)
    # a full sequence that is not kept is fine
    kv_append(kc, vc, lengths, torch.ones(B, Hkv, D), torch.ones(B, Hkv, D), torch.tensor([True, False, False]))
    assert lengths.tolist() == [3, 4, 4] and kc[0, :, 2].eq(1).all()


def test_kv_append_then_decode_equals_reference_loop():
    """Token-by-token: append where kept, attend over the compacted cache."""
    B, Hq, Hkv, D, steps = 4, 4, 2, 32, 40
    keep = torch.rand(steps, B) < 0.5
    kc = torch.zeros(B, Hkv, steps, D)
    vc = torch.zeros(B, Hkv, steps, D)
    lengths = torch.zeros(B, dtype=torch.int32)
    ks, vs = [], []
    for t in range(steps):
        k_new, v_new, q = torch.randn(B, Hkv, D), torch.randn(B, Hkv, D), torch.randn(B, Hq, D)
        kv_append(kc, vc, lengths, k_new, v_new, keep[t])
        ks.append(k_new), vs.append(v_new)
        full_k, full_v = torch.stack(ks, 2), torch.stack(vs, 2)
        want = decode_attention_full_mask_ref(q, full_k, full_v, keep[: t + 1].t())
        torch.testing.assert_close(decode_attention(q, kc, vc, lengths), want, rtol=1e-5, atol=2e-6)
    assert lengths.tolist() == keep.sum(0).tolist()


# ---- decode_step --------------------------------------------------------------------------------------

def three_op_step(q, kc, vc, lengths, k_new, v_new, keep, scale=None, bias=None):
    """What decode_step fuses: append for every sequence, attend, release the row of duplicates."""
    kv_append(kc, vc, lengths, k_new, v_new, torch.ones_like(keep))
    out = decode_attention(q, kc, vc, lengths, scale, bias)
    lengths.sub_((~keep).to(lengths.dtype))
    return out


def assert_step_matches(q, k, v, lengths, k_new, v_new, keep, scale=None, bias=None):
    """decode_step against the three-op sequence (bit for bit) and the float64 reference."""
    k1, v1, l1 = k.clone(), v.clone(), lengths.clone()
    want = three_op_step(q, k1, v1, l1, k_new, v_new, keep, scale, bias)
    k2, v2, l2 = k.clone(), v.clone(), lengths.clone()
    got = decode_step(q, k2, v2, l2, k_new, v_new, keep, scale, bias)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    assert torch.equal(l1, l2) and l2.tolist() == (lengths + keep.to(lengths.dtype)).tolist()
    for b in range(q.shape[0]):
        n = int(l2[b])
        assert torch.equal(k2[b, :, :n], k1[b, :, :n]) and torch.equal(v2[b, :, :n], v1[b, :, :n])
        assert torch.equal(k2[b, :, n:], k[b, :, n:]) and torch.equal(v2[b, :, n:], v[b, :, n:]), "rows past lengths untouched"
    ref_out, ref_k, ref_v, ref_len = decode_step_ref(q.double(), k.double(), v.double(), lengths, k_new.double(),
                                                     v_new.double(), keep, scale, None if bias is None else bias.double())
    torch.testing.assert_close(got, ref_out.to(q.dtype), **TOLS[q.dtype])
    assert torch.equal(l2, ref_len) and torch.equal(k2.double(), ref_k) and torch.equal(v2.double(), ref_v)
    return got


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("ratio", GQA, ids=lambda r: f"gqa{r}")
@pytest.mark.parametrize("D", HEAD_DIMS + [7], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_step_equals_append_attend_release(dtype, D, ratio, with_bias):
    B, Hkv, Lmax = 6, 2, 70
    q, k, v = make_cache(B, Hkv * ratio, Hkv, Lmax, D, dtype)
    lengths = torch.tensor([0, 1, 31, 32, 69, 40], dtype=torch.int32 if D % 2 else torch.int64)
    gen = torch.Generator().manual_seed(D * ratio)
    k_new, v_new = (torch.randn(B, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    keep = torch.tensor([True, False, True, False, True, True])
    bias = torch.randn(B, Lmax, generator=gen).to(dtype) if with_bias else None
    assert_step_matches(q, k, v, lengths, k_new, v_new, keep, None, bias)


def test_decode_step_keep_all_none_and_self_only():
    B, Hq, Hkv, Lmax, D = 4, 4, 2, 9, 16
    q, k, v = make_cache(B, Hq, Hkv, Lmax, D, torch.float32)
    k_new, v_new = torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
    lengths = torch.tensor([0, 3, 8, 5])
    for keep in (torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)):
        assert_step_matches(q, k, v, lengths, k_new, v_new, keep, 0.3)
    # an empty cache: the token attends to itself only, softmax of one logit is exactly 1
    lengths = torch.zeros(B, dtype=torch.long)
    out = decode_step(q, k.clone(), v.clone(), lengths, k_new, v_new, torch.zeros(B, dtype=torch.bool))
    assert torch.equal(out, v_new.repeat_interleave(Hq // Hkv, dim=1)) and lengths.eq(0).all()
    # no query heads: nothing to attend, the kept rows are still appended; no sequences: nothing at all
    kc, lengths = k.clone(), torch.tensor([0, 3, 8, 5])
    e = decode_step(q[:, :0], kc, v.clone(), lengths, k_new, v_new, torch.tensor([True, False, True, False]))
    assert e.shape == (B, 0, D) and lengths.tolist() == [1, 3, 9, 5] and torch.equal(kc[2, :, 8], k_new[2])
    e = decode_step(q[:0], k[:0], v[:0], lengths[:0], k_new[:0], v_new[:0], torch.ones(0, dtype=torch.bool))
    assert e.shape == (0, Hq, D)


def test_decode_step_strided_views():
    B, Hq, Hkv, Lmax, D = 3, 4, 2, 40, 32
    q, k, v = make_cache(B, Hq, Hkv, Lmax, D, torch.float16)
    big_k = torch.zeros(B, Lmax, Hkv, 2 * D, dtype=torch.float16)
    kt = big_k[..., ::2].transpose(1, 2)  # [B, Hkv, Lmax, D], D-strided, heads interleaved with rows
    kt.copy_(k)
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)
    k_new = torch.randn(B, D, Hkv).half().transpose(1, 2)  # D-strided rows
    v_new = torch.randn(B, Hkv, 2 * D).half()[..., D:]  # offset rows
    lengths = torch.tensor([39, 0, 17])
    keep = torch.tensor([True, True, False])
    got = assert_step_matches(q.transpose(0, 1).contiguous().transpose(0, 1), kt, vt, lengths, k_new, v_new, keep)
    assert got.is_contiguous()


def test_decode_step_loop_equals_full_mask_baseline():
    """Token by token over a random keep pattern: the compacted cache through decode_step gives the
    masked full-cache attention of every step (the MergeAR contract for one layer)."""
    B, Hq, Hkv, D, steps = 4, 4, 2, 32, 50
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(steps, B, generator=gen) < 0.45
    keep[0] = True
    kc = torch.zeros(B, Hkv, int(keep.sum(0).max()) + 1, D)
    vc = torch.zeros_like(kc)
    lengths = torch.zeros(B, dtype=torch.int32)
    ks, vs = [], []
    for t in range(steps):
        k_new, v_new, q = (torch.randn(B, h, D, generator=gen) for h in (Hkv, Hkv, Hq))
        out = decode_step(q, kc, vc, lengths, k_new, v_new, keep[t])
        ks.append(k_new), vs.append(v_new)
        mask = torch.cat([keep[:t].t(), torch.ones(B, 1, dtype=torch.bool)], 1)  # kept so far + itself
        want = decode_attention_full_mask_ref(q, torch.stack(ks, 2), torch.stack(vs, 2), mask)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
    assert lengths.tolist() == keep.sum(0).tolist()


def test_decode_step_cpu_isas_bit_identical(cpu_isa):
    B, Hq, Hkv, Lmax, D = 5, 8, 2, 70, 80
    q, k, v = make_cache(B, Hq, Hkv, Lmax, D, torch.bfloat16)
    k_new, v_new = torch.randn(B, Hkv, D).bfloat16(), torch.randn(B, Hkv, D).bfloat16()
    lengths, keep, bias = torch.tensor([0, 1, 33, 69, 50]), torch.tensor([True, False, True, True, False]), torch.randn(B, Lmax)
    prev = fastvq.set_cpu_isa("scalar")
    try:
        kc, vc, lc = k.clone(), v.clone(), lengths.clone()
        want = decode_step(q, kc, vc, lc, k_new, v_new, keep, None, bias)
    finally:
        fastvq.set_cpu_isa(prev)
    k2, v2, l2 = k.clone(), v.clone(), lengths.clone()
    assert torch.equal(decode_step(q, k2, v2, l2, k_new, v_new, keep, None, bias), want)
    assert torch.equal(k2, kc) and torch.equal(v2, vc) and torch.equal(l2, lc)


def test_decode_step_errors_write_nothing():
    q, k, v = make_cache(2, 4, 2, 6, 8, torch.float32)
    kn, vn = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    for lengths, keep, match in (
            (torch.tensor([6, 0]), torch.tensor([False, True]),
             r"decode_step: the cache of sequence 0 is full \(lengths\[0\] = Lmax = 6\): the token needs a free row even where it is not kept"),
            (torch.tensor([2, 7]), torch.tensor([True, True]), r"decode_step: lengths must be in \[0, Lmax - 1\] = \[0, 5\], got 7 at sequence 1"),
            (torch.tensor([2, -1]), torch.tensor([True, True]), r"decode_step: lengths must be in \[0, Lmax - 1\] = \[0, 5\], got -1 at sequence 1")):
        kc, vc, lc = k.clone(), v.clone(), lengths.clone()
        with pytest.raises(RuntimeError, match=match):
            decode_step(q, kc, vc, lc, kn, vn, keep)
        assert torch.equal(kc, k) and torch.equal(vc, v) and torch.equal(lc, lengths)


# ---- errors -------------------------------------------------------------------------------------------

def _qkv(B=2, Hq=4, Hkv=2, L=6, D=8, dtype=torch.float32):
    return make_cache(B, Hq, Hkv, L, D, dtype)


_q, _k, _v = _qkv()
_len = torch.tensor([3, 6])
_kn, _vn = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
_keep = torch.tensor([True, False])


@pytest.mark.parametrize(("call", "match"), [
    (lambda: decode_attention(_q.double(), _k.double(), _v.double(), _len), r"decode_attention: q must be float32, float16 or bfloat16, got Double"),
    (lambda: decode_attention(_q[0], _k, _v, _len), r"decode_attention: q must be \[B, Hq, D\]"),
    (lambda: decode_attention(_q, _k[0], _v[0], _len), r"decode_attention: k_cache must be \[B, Hkv, Lmax, D\], got shape \[2, 6, 8\]"),
    (lambda: decode_attention(_q, _k, _v[:, :, :5], _len), r"decode_attention: v_cache must have k_cache's shape"),
    (lambda: decode_attention(_q, _k.half(), _v.half(), _len), r"decode_attention: k_cache and v_cache must have q's dtype Float"),
    (lambda: decode_attention(_q, _k[:1], _v[:1], _len), r"decode_attention: k_cache must be \[B, Hkv, Lmax, D\] with B=2 and D=8"),
    (lambda: decode_attention(_q[..., :4], _k, _v, _len), r"decode_attention: k_cache .* with B=2 and D=4"),
    (lambda: decode_attention(_q[:, :3], _k, _v, _len), r"decode_attention: the query heads Hq=3 must be a multiple of the kv-heads Hkv=2"),
    (lambda: decode_attention(*_qkv(Hq=130, Hkv=2), _len), r"decode_attention: at most 64 query heads per kv-head, got Hq / Hkv = 65"),
    (lambda: decode_attention(*_qkv(D=257), _len), r"decode_attention: head dim D must be in \[1, 256\], got 257"),
    (lambda: decode_attention(_q, _k, _v, _len.float()), r"decode_attention: lengths must be int64 or int32, got Float"),
    (lambda: decode_attention(_q, _k, _v, _len[:1]), r"decode_attention: lengths must be \[B\] = \[2\], got shape \[1\]"),
    (lambda: decode_attention(_q, _k, _v, torch.tensor([3, 7])), r"decode_attention: lengths must be in \[0, Lmax\] = \[0, 6\], got 7 at sequence 1"),
    (lambda: decode_attention(_q, _k, _v, torch.tensor([-1, 2])), r"decode_attention: lengths must be in \[0, Lmax\] = \[0, 6\], got -1 at sequence 0"),
    (lambda: decode_attention(_q, _k, _v, _len, None, torch.randn(2, 5)), r"decode_attention: bias must be \[B, Lmax\] = \[2, 6\], got shape \[2, 5\]"),
    (lambda: decode_attention(_q, _k, _v, _len, None, torch.randn(2, 6).double()), r"decode_attention: bias must be float32, float16 or bfloat16, got Double"),
    (lambda: decode_attention(_q, _k, _v, _len, float("nan")), r"decode_attention: scale must be finite, got nan"),
    (lambda: decode_attention(_q, _k, _v, _len.to("meta")), r"decode_attention: lengths must be on cpu like the cache, got meta"),
    (lambda: decode_attention(_q, _k.to("meta"), _v, _len), r"decode_attention: q, k_cache and v_cache must be on one device"),
    (lambda: kv_append(_k.double(), _v.double(), _len, _kn.double(), _vn.double(), _keep), r"kv_append: k_cache must be float32, float16 or bfloat16, got Double"),
    (lambda: kv_append(_k[0], _v[0], _len, _kn, _vn, _keep), r"kv_append: k_cache must be \[B, Hkv, Lmax, D\], got shape \[2, 6, 8\]"),
    (lambda: kv_append(_k, _v[:, :1], _len, _kn, _vn, _keep), r"kv_append: v_cache must have k_cache's shape"),
    (lambda: kv_append(_k, _v, _len, _kn[:, :1], _vn, _keep), r"kv_append: k_new must be \[B, Hkv, D\] = \[2, 2, 8\], got shape \[2, 1, 8\]"),
    (lambda: kv_append(_k, _v, _len, _kn, _vn[..., :4], _keep), r"kv_append: v_new must have k_new's shape"),
    (lambda: kv_append(_k, _v, _len, _kn.half(), _vn.half(), _keep), r"kv_append: v_cache, k_new and v_new must have k_cache's dtype Float, got Half"),
    (lambda: kv_append(_k, _k, _len, _kn, _vn, _keep), r"kv_append: k_cache and v_cache must be different tensors"),
    (lambda: kv_append(_k, _v, _len.float(), _kn, _vn, _keep), r"kv_append: lengths must be int64 or int32, got Float"),
    (lambda: kv_append(_k, _v, _len, _kn, _vn, _keep.int()), r"kv_append: keep must be bool, got Int"),
    (lambda: kv_append(_k, _v, _len, _kn, _vn, _keep[:1]), r"kv_append: keep must be \[B\] = \[2\], got shape \[1\]"),
    (lambda: kv_append(_k, _v, torch.tensor([0, 9]), _kn, _vn, _keep), r"kv_append: lengths must be in \[0, Lmax\] = \[0, 6\], got 9 at sequence 1"),
    (lambda: kv_append(_k, _v, torch.tensor([6, 0]), _kn, _vn, _keep), r"kv_append: the cache of sequence 0 is full"),
    (lambda: kv_append(_k, _v, _len, _kn.to("meta"), _vn, _keep), r"kv_append: every tensor must be on k_cache's device cpu, got meta"),
    (lambda: decode_step(_q.double(), _k.double(), _v.double(), _len, _kn.double(), _vn.double(), _keep), r"decode_step: q must be float32, float16 or bfloat16, got Double"),
    (lambda: decode_step(_q[:, :3], _k, _v, _len, _kn, _vn, _keep), r"decode_step: the query heads Hq=3 must be a multiple of the kv-heads Hkv=2"),
    (lambda: decode_step(_q, _k, _v, _len, _kn, _vn, _keep, None, torch.randn(2, 5)), r"decode_step: bias must be \[B, Lmax\] = \[2, 6\], got shape \[2, 5\]"),
    (lambda: decode_step(_q, _k, _v, _len, _kn[:, :1], _vn, _keep), r"decode_step: k_new must be \[B, Hkv, D\] = \[2, 2, 8\], got shape \[2, 1, 8\]"),
    (lambda: decode_step(_q, _k, _v, _len, _kn, _vn[..., :4], _keep), r"decode_step: v_new must have k_new's shape"),
    (lambda: decode_step(_q, _k, _v, _len, _kn.half(), _vn.half(), _keep), r"decode_step: v_cache, k_new and v_new must have k_cache's dtype Float, got Half"),
    (lambda: decode_step(_q, _k, _k, _len, _kn, _vn, _keep), r"decode_step: k_cache and v_cache must be different tensors"),
    (lambda: decode_step(_q, _k, _v, _len.float(), _kn, _vn, _keep), r"decode_step: lengths must be int64 or int32, got Float"),
    (lambda: decode_step(_q, _k, _v, _len, _kn, _vn, _keep.int()), r"decode_step: keep must be bool, got Int"),
    (lambda: decode_step(_q, _k, _v, _len, _kn, _vn, _keep[:1]), r"decode_step: keep must be \[B\] = \[2\], got shape \[1\]"),
    (lambda: decode_step(_q, _k, _v, _len, _kn, _vn, _keep, float("inf")), r"decode_step: scale must be finite, got inf"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ---- dispatcher integration ---------------------------------------------------------------------------

def test_opcheck():
    for dtype in DTYPES:
        q, k, v = _qkv(B=3, Hq=4, Hkv=2, L=40, D=16, dtype=dtype)
        lengths = torch.tensor([40, 0, 17])
        torch.library.opcheck(torch.ops.fastvq.decode_attention.default, (q, k, v, lengths))
        torch.library.opcheck(torch.ops.fastvq.decode_attention.default,
                              (q, k, v, lengths.int(), 0.5, torch.randn(3, 40).to(dtype)))
        torch.library.opcheck(torch.ops.fastvq.decode_step.default,
                              (q, k.clone(), v.clone(), torch.tensor([39, 0, 17]), torch.randn(3, 2, 16).to(dtype),
                               torch.randn(3, 2, 16).to(dtype), torch.tensor([True, False, True]), 0.5,
                               torch.randn(3, 40).to(dtype)))
        torch.library.opcheck(torch.ops.fastvq.decode_step.default,
                              (q, k.clone(), v.clone(), torch.tensor([3, 0, 17], dtype=torch.int32),
                               torch.randn(3, 2, 16).to(dtype), torch.randn(3, 2, 16).to(dtype),
                               torch.tensor([False, False, True])))
        kc, vc = k.clone(), v.clone()
        torch.library.opcheck(torch.ops.fastvq.kv_append.default,
                              (kc, vc, torch.tensor([0, 39, 5]), torch.randn(3, 2, 16).to(dtype),
                               torch.randn(3, 2, 16).to(dtype), torch.tensor([True, False, True])))


def _step_three_ops(q, k_new, v_new, kc, vc, lengths, keep):
    kv_append(kc, vc, lengths, k_new, v_new, torch.ones_like(keep))
    out = decode_attention(q, kc, vc, lengths, None, None)
    lengths.sub_((~keep).to(lengths.dtype))
    return out * 2


def _step_fused(q, k_new, v_new, kc, vc, lengths, keep):
    return decode_step(q, kc, vc, lengths, k_new, v_new, keep, None, None) * 2


@pytest.mark.parametrize("step", [_step_three_ops, _step_fused], ids=["three_ops", "decode_step"])
def test_torch_compile_fullgraph(step):
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    B, Hq, Hkv, L, D = 3, 4, 2, 12, 16
    caches = [(torch.zeros(B, Hkv, L, D), torch.zeros(B, Hkv, L, D), torch.zeros(B, dtype=torch.long)) for _ in range(2)]
    for t in range(8):
        q, k_new, v_new = torch.randn(B, Hq, D), torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
        keep = torch.rand(B) < 0.6
        got = compiled(q, k_new, v_new, *caches[0], keep)
        want = step(q, k_new, v_new, *caches[1], keep)
        assert torch.equal(got, want)
        for a, b in zip(*caches):
            assert torch.equal(a, b)
    assert caches[0][2].gt(0).any()


def test_meta_tensors_shape_only():
    q = torch.empty(3, 8, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(3, 2, 100, 64, device="meta", dtype=torch.bfloat16)
    out = decode_attention(q, k, k.clone(), torch.empty(3, dtype=torch.int32, device="meta"))
    assert out.shape == (3, 8, 64) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    kn = torch.empty(3, 2, 64, device="meta", dtype=torch.bfloat16)
    out = decode_step(q, k, k.clone(), torch.empty(3, dtype=torch.int32, device="meta"), kn, kn.clone(),
                      torch.empty(3, dtype=torch.bool, device="meta"))
    assert out.shape == (3, 8, 64) and out.dtype == torch.bfloat16 and out.device.type == "meta"


# ---- fastvq.nn: merge masks and the compressed cache --------------------------------------------------

def brute_first_occurrence(ids):
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for b in range(ids.shape[0]):
        seen = set()
        for i, g in enumerate(ids[b].tolist()):
            out[b, i] = g not in seen
            seen.add(g)
    return out


def test_first_occurrence_and_merge_causal_mask():
    ids = torch.tensor([[0, 1, 0, 2, 1, 1, 5, 0], [3, 3, 3, 3, 3, 3, 3, 3]])
    keep = first_occurrence(ids)
    assert keep.tolist() == [[True, True, False, True, False, False, True, False], [True] + [False] * 7]
    for _ in range(5):
        r = torch.randint(0, 20, (4, 37))
        assert torch.equal(first_occurrence(r), brute_first_occurrence(r))
        assert torch.equal(first_occurrence(r.int()), brute_first_occurrence(r))
    assert first_occurrence(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    assert torch.equal(first_occurrence(ids[0]), keep[0])  # any leading shape
    mask = merge_causal_mask(ids)
    assert mask.shape == (2, 8, 8) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(8):
            for j in range(8):
                assert bool(mask[b, i, j]) == (j <= i and (bool(keep[b, j]) or i == j))
    with pytest.raises(TypeError, match="first_occurrence: group_ids must be an integer tensor"):
        first_occurrence(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"merge_causal_mask: group_ids must be \[B, L\]"):
        merge_causal_mask(torch.zeros(3, dtype=torch.long))


def test_compressed_kv_cache_bookkeeping():
    cache = CompressedKVCache(2, 3, 2, 8, max_kept=4)
    assert cache.k.shape == (2, 3, 2, 5, 8) and cache.capacity == 5
    keep = torch.tensor([[True, True, True], [False, True, True], [True, False, True], [False, True, False]])
    for t in range(4):
        for layer in range(2):
            k, v, q = torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 4, 8)
            cache.attend(layer, q, k, v, keep[t])
    assert cache.counts.tolist() == [2, 3, 3] and cache.lengths[1].tolist() == [2, 3, 3]
    assert cache.kept_positions(0).tolist() == [0, 2]
    assert cache.kept_positions(1).tolist() == [0, 1, 3]
    assert cache.kept_positions(2).tolist() == [0, 1, 2]
    stats = cache.memory_stats()
    row = 2 * 8 * 4 * 2
    assert stats["kv_used"] == 2 * 8 * row and stats["kv_full"] == 2 * 3 * 4 * row
    assert stats["kv_allocated"] == 2 * 3 * 5 * row and stats["kept_fraction"] == pytest.approx(8 / 12)
    cache.append(0, torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.tensor([True, False, False]))
    assert cache.lengths[0].tolist() == [3, 3, 3] and cache.kept_positions(0).tolist() == [0, 2, 4]
    cache.reset()
    assert cache.counts.tolist() == [0, 0, 0] and cache.steps == 0 and cache.positions.eq(-1).all()
    with pytest.raises(IndexError, match=r"CompressedKVCache.attend: layer must be in \[0, 2\), got 2"):
        cache.attend(2, torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), keep[0])
    with pytest.raises(ValueError, match=r"CompressedKVCache.append: k and v must be \[B, Hkv, D\]"):
        cache.append(0, torch.randn(3, 2, 7), torch.randn(3, 2, 7), keep[0])
    with pytest.raises(ValueError, match=r"CompressedKVCache.append: keep must be bool \[B\]"):
        cache.append(0, torch.randn(3, 2, 8), torch.randn(3, 2, 8), keep[0].int())
    with pytest.raises(ValueError, match="CompressedKVCache: max_kept must be an int >= 0"):
        CompressedKVCache(1, 1, 1, 8, max_kept=-1)
    with pytest.raises(ValueError, match="CompressedKVCache: dtype must be float32, float16 or bfloat16"):
        CompressedKVCache(1, 1, 1, 8, max_kept=3, dtype=torch.float64)
    # more first occurrences than max_kept: the op's full-cache error
    small = CompressedKVCache(1, 1, 1, 8, max_kept=1)
    one = torch.ones(1, dtype=torch.bool)
    small.attend(0, torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8), one)
    small.attend(0, torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8), ~one)  # a duplicate fits
    small.attend(0, torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8), one)  # uses the spare row
    with pytest.raises(RuntimeError, match=r"decode_step: the cache of sequence 0 is full \(lengths\[0\] = Lmax = 2\)"):
        small.attend(0, torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8), one)


class TinyMergeAR(nn.Module):
    """A small pre-norm decoder-only transformer (GQA attention, learned absolute positions) with a full
    forward under a boolean mask and a token-by-token decode over a CompressedKVCache."""

    def __init__(self, vocab=50, dim=64, heads=4, kv_heads=2, layers=3, max_len=64):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(dim), "q": nn.Linear(dim, heads * self.hd),
                "kv": nn.Linear(dim, 2 * kv_heads * self.hd), "o": nn.Linear(heads * self.hd, dim),
                "ln2": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
            }))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, mask):
        """tokens [B, L], mask [B, L, L] bool (True = attend) -> logits [B, L, vocab]"""
        B, L = tokens.shape
        x = self.tok(tokens) + self.pos(torch.arange(L))
        G = self.heads // self.kv_heads
        for blk in self.blocks:
            h = blk["ln1"](x)
            q = blk["q"](h).view(B, L, self.heads, self.hd).transpose(1, 2)
            k, v = blk["kv"](h).view(B, L, 2, self.kv_heads, self.hd).unbind(2)
            k = k.transpose(1, 2).repeat_interleave(G, 1)
            v = v.transpose(1, 2).repeat_interleave(G, 1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
            x = x + blk["o"](a.transpose(1, 2).reshape(B, L, -1))
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(self.ln(x))

    def decode_step(self, token, t, cache, keep):
        """token [B] at position t -> logits [B, vocab]; keep [B] bool: whether the token is kept."""
        B = token.shape[0]
        x = self.tok(token) + self.pos.weight[t]
        for i, blk in enumerate(self.blocks):
            h = blk["ln1"](x)
            q = blk["q"](h).view(B, self.heads, self.hd)
            k, v = blk["kv"](h).view(B, 2, self.kv_heads, self.hd).unbind(1)
            a = cache.attend(i, q, k.contiguous(), v.contiguous(), keep)
            x = x + blk["o"](a.reshape(B, -1))
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(self.ln(x))


@pytest.mark.parametrize("unique", [12, 40], ids=lambda u: f"groups{u}")
def test_mergear_contract_decode_equals_full_forward(unique):
    """Token-by-token decoding with the compressed cache (duplicates dropped after their own step) gives
    the logits of one full forward pass with merge_causal_mask, to fp32 tolerance."""
    torch.manual_seed(0)
    B, L = 3, 48
    model = TinyMergeAR(max_len=L).eval()
    tokens = torch.randint(0, 50, (B, L))
    group_ids = torch.randint(0, unique, (B, L))  # the merge map: position i belongs to group group_ids[i]
    keep = first_occurrence(group_ids)
    with torch.no_grad():
        full = model(tokens, merge_causal_mask(group_ids))
        cache = CompressedKVCache(len(model.blocks), B, model.kv_heads, model.hd, max_kept=int(keep.sum(1).max()))
        steps = torch.stack([model.decode_step(tokens[:, t], t, cache, keep[:, t]) for t in range(L)], 1)
        torch.testing.assert_close(steps, full, rtol=1e-4, atol=2e-5)
        assert cache.counts.tolist() == keep.sum(1).tolist() and cache.counts.max() < L
        for b in range(B):
            assert cache.kept_positions(b).tolist() == keep[b].nonzero().squeeze(1).tolist()
        # the contract is not vacuous: the plain causal mask gives different logits
        causal = torch.ones(L, L, dtype=torch.bool).tril().expand(B, L, L)
        assert (model(tokens, causal) - full).abs().max() > 1e-3


# ---- the CUDA kernels, emulated on the CPU (torch.ops.fastvq_emu.*; see test_cuda_emulated.py) ----------



# (B, Hq, Hkv, Lmax, D): vector loads (D a multiple of 4 / 8 with aligned rows) and the scalar path (D=7, 33)
EMU_SHAPES = [(3, 2, 2, 70, 64), (2, 8, 1, 33, 80), (3, 4, 2, 40, 7), (2, 4, 4, 65, 128), (2, 2, 1, 20, 33)]


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_decode_attention_bit_identical(schedule, cuda_ops, shape, dtype):
    B, Hq, Hkv, Lmax, D = shape
    q, k, v = make_cache(B, Hq, Hkv, Lmax, D, dtype)
    lengths = ragged_lengths(B, Lmax, torch.int32)
    bias = torch.randn(B, Lmax).to(dtype)
    bias[0, 3] = float("-inf")
    for args in ((q, k, v, lengths, None, None), (q, k, v, lengths.long(), 0.7, bias)):
        got = cuda_ops.decode_attention(*args)
        want = decode_attention(*args)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_emulated_decode_attention_strided_and_edge_cases(schedule, cuda_ops):
    B, Hq, Hkv, Lmax, D = 3, 4, 2, 36, 16
    q, k, v = make_cache(B, Hq, Hkv, Lmax, D, torch.float16)
    lengths = torch.tensor([36, 0, 5])
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)  # rows 16-byte aligned but not [Hkv, Lmax]-contiguous
    vs = torch.zeros(B, Hkv, Lmax, 2 * D, dtype=torch.float16)
    vs[..., ::2] = v
    vs = vs[..., ::2]  # D-strided: the scalar staging path
    k_off = torch.zeros(B * Hkv * Lmax * D + 1, dtype=torch.float16)[1:].view(B, Hkv, Lmax, D)
    k_off.copy_(k)  # misaligned base pointer: the scalar path too
    for kk, vv in ((kt, vs), (k_off, v)):
        got = cuda_ops.decode_attention(q, kk, vv, lengths, None, None)
        assert torch.equal(got, decode_attention(q, kk, vv, lengths))
    big = torch.randn(B, Hq, D) * 300  # large logits
    assert torch.equal(cuda_ops.decode_attention(big.half(), k, v, lengths, None, None),
                       decode_attention(big.half(), k, v, lengths))
    all_masked = torch.full((B, Lmax), float("-inf"), dtype=torch.float16)
    assert cuda_ops.decode_attention(q, k, v, lengths, None, all_masked).eq(0).all()
    e = cuda_ops.decode_attention(q[:0], k[:0], v[:0], lengths[:0], None, None)
    assert e.shape == (0, Hq, D)
    z = cuda_ops.decode_attention(q, k[:, :, :0], v[:, :, :0], torch.zeros(B, dtype=torch.long), None, None)
    assert z.shape == (B, Hq, D) and z.eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_kv_append(schedule, cuda_ops, dtype):
    B, Hkv, Lmax, D = 5, 3, 8, 20
    caches = [(torch.randn(B, Hkv, Lmax, D).to(dtype), torch.randn(B, Hkv, Lmax, D).to(dtype)) for _ in range(2)]
    caches[1] = (caches[0][0].clone(), caches[0][1].clone())
    lengths = [torch.tensor([0, 1, 5, 3, 2], dtype=torch.int32) for _ in range(2)]
    for keep in (torch.tensor([True, False, True, True, False]), torch.ones(B, dtype=torch.bool),
                 torch.zeros(B, dtype=torch.bool)):
        k_new, v_new = torch.randn(B, Hkv, D).to(dtype), torch.randn(B, Hkv, D).to(dtype)
        cuda_ops.kv_append(*caches[0], lengths[0], k_new, v_new, keep)
        kv_append(*caches[1], lengths[1], k_new, v_new, keep)
        assert torch.equal(lengths[0], lengths[1])
        for a, b in zip(caches[0], caches[1]):
            assert torch.equal(a, b)
    assert lengths[0].tolist() == [2, 2, 7, 5, 3]


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_decode_step_bit_identical(schedule, cuda_ops, shape, dtype):
    B, Hq, Hkv, Lmax, D = shape
    q, k, v = make_cache(B, Hq, Hkv, Lmax, D, dtype)
    lengths = ragged_lengths(B, Lmax - 1, torch.int32)  # a free row for every token
    k_new, v_new = torch.randn(B, Hkv, D).to(dtype), torch.randn(B, Hkv, D).to(dtype)
    keep = torch.arange(B) % 2 == 0
    bias = torch.randn(B, Lmax).to(dtype)
    bias[0, 0] = float("-inf")
    for args in ((None, None), (0.7, bias)):
        caches = [(k.clone(), v.clone(), lengths.clone()) for _ in range(2)]
        got = cuda_ops.decode_step(q, *caches[0], k_new, v_new, keep, *args)
        want = decode_step(q, *caches[1], k_new, v_new, keep, *args)
        assert got.dtype == dtype and torch.equal(got, want), (got.float() - want.float()).abs().max()
        for a, b in zip(*caches):
            assert torch.equal(a, b)


def test_emulated_decode_step_strided_and_edge_cases(schedule, cuda_ops):
    B, Hq, Hkv, Lmax, D = 3, 4, 2, 36, 16
    q, k, v = make_cache(B, Hq, Hkv, Lmax, D, torch.float16)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    k_new = torch.randn(B, D, Hkv).half().transpose(1, 2)  # D-strided token rows
    v_new = torch.randn(B, Hkv, D).half()
    lengths, keep = torch.tensor([35, 0, 32]), torch.tensor([True, False, True])
    caches = [(kt.clone(), v.clone(), lengths.clone()) for _ in range(2)]
    got = cuda_ops.decode_step(q, *caches[0], k_new, v_new, keep, None, None)
    assert torch.equal(got, decode_step(q, *caches[1], k_new, v_new, keep))
    for a, b in zip(*caches):
        assert torch.equal(a, b)
    # Hq = 0: nothing to attend, the kept rows are still appended
    kc, vc, lc = k.clone(), v.clone(), lengths.clone()
    e = cuda_ops.decode_step(q[:, :0], kc, vc, lc, k_new, v_new, keep, None, None)
    assert e.shape == (B, 0, D) and lc.tolist() == [36, 0, 33] and torch.equal(kc[2, :, 32], k_new[2])
