"""lfq_quantize / lfq_codes_from_ids / lfq_entropy / fastvq.nn.LFQ against the pure-PyTorch references.

The entropy oracle is the definition (lfq_entropy_ref: a softmax over every code, N x 2^g), cross-checked
with the factorised reference; the emulated CUDA kernels (torch.ops.fastvq_emu.lfq_*) are compared with
the CPU ops at the end of the file.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fastvq.nn import LFQ
from fastvq.ops import lfq_codes_from_ids, lfq_entropy, lfq_quantize
from fastvq.reference import (
    lfq_codes_from_ids_ref,
    lfq_entropy_factorized_ref,
    lfq_entropy_ref,
    lfq_loss_ref,
    lfq_quantize_ref,
)

from conftest import needs_emu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (D, group_bits): one id per row up to the 62-bit limit, and grouped ids (UniWeTok: 128 bits)
ID_LAYOUTS = [(1, 0), (7, 0), (8, 0), (9, 0), (18, 0), (31, 0), (33, 0), (62, 0),
              (6, 1), (36, 18), (124, 62), (128, 8), (128, 16), (128, 32)]
# (D, group_bits) small enough for the N x 2^g softmax definition
ENTROPY_LAYOUTS = [(1, 0), (2, 0), (5, 0), (8, 0), (12, 0), (12, 3), (12, 4), (10, 5), (9, 9), (6, 1)]
TEMPERATURES = [0.01, 0.1, 1.0]


def entropy_tols(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def assert_entropy_close(got, want, dtype):
    """(sample, codebook, code_probs) of the op against a reference's."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sample, codebook, code_probs = got
    assert sample.shape == () and codebook.shape == () and code_probs.shape == want[2].shape
    assert sample.dtype == codebook.dtype == code_probs.dtype == acc
    tol = entropy_tols(dtype)
    torch.testing.assert_close(sample, want[0], **tol)
    torch.testing.assert_close(codebook, want[1], **tol)
    torch.testing.assert_close(code_probs, want[2], rtol=tol["rtol"], atol=tol["atol"] / 10)


# ---- lfq_quantize / lfq_codes_from_ids ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_bit_order_and_signs(dtype):
    # dimension j <-> bit j (little-endian): [+, -, +, +] -> 1 + 4 + 8 = 13
    z = torch.tensor([[0.5, -2.0, 3.0, 0.25]], dtype=dtype)
    codes, ids = lfq_quantize(z)
    assert codes.dtype == dtype and codes.tolist() == [[1.0, -1.0, 1.0, 1.0]]
    assert ids.dtype == torch.int64 and ids.tolist() == [13]
    _, gids = lfq_quantize(z, group_bits=2)  # groups [+, -] -> 1 and [+, +] -> 3
    assert gids.tolist() == [[1, 3]]
    # strictly z > 0: zeros, -0 and NaN are bit 0 / -1; the smallest positive value is bit 1
    tiny = torch.finfo(dtype).tiny
    edge = torch.tensor([0.0, -0.0, float("nan"), tiny, -float("inf"), float("inf"), -tiny], dtype=dtype)
    codes, ids = lfq_quantize(edge)
    assert codes.tolist() == [-1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0], f"z > 0 is the bit, for every value: {edge}"
    assert ids.item() == (1 << 3) + (1 << 5)
    if dtype in (torch.float32, torch.float64):  # subnormals are > 0 too
        sub = torch.tensor([tiny / 4, -tiny / 4], dtype=dtype)
        assert lfq_quantize(sub)[1].item() == 1


@pytest.mark.parametrize("layout", ID_LAYOUTS, ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_matches_reference(layout, dtype):
    D, g = layout
    z = torch.randn(37, D).to(dtype)
    z[3, :] = 0.0  # all bits 0
    z[5, :] = 1.0  # all bits 1
    codes, ids = lfq_quantize(z, g)
    codes_ref, ids_ref = lfq_quantize_ref(z, g)
    assert codes.shape == z.shape and codes.dtype == dtype and codes.is_contiguous()
    assert ids.shape == ids_ref.shape == ((37,) if g == 0 else (37, D // g))
    assert torch.equal(codes, codes_ref) and torch.equal(ids, ids_ref)
    assert ids[3].eq(0).all() and ids[5].eq((1 << (g or D)) - 1).all()


@pytest.mark.parametrize("layout", [(1, 0), (18, 0), (62, 0), (128, 8), (128, 16), (128, 32)],
                         ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trips(layout, dtype):
    D, g = layout
    bits = g or D
    # z -> (codes, ids) -> codes
    z = torch.randn(2, 9, D).to(dtype)
    codes, ids = lfq_quantize(z, g)
    assert torch.equal(lfq_codes_from_ids(ids, D, g, dtype), codes)
    # ids -> codes -> ids, including 0 and the all-ones id of the group width
    id_shape = (40,) if g == 0 else (40, D // g)
    ids = torch.randint(0, 1 << bits, id_shape)
    ids[0], ids[1] = 0, (1 << bits) - 1
    codes = lfq_codes_from_ids(ids, D, g, dtype)
    assert codes.shape == (40, D) and codes.dtype == dtype
    assert torch.equal(codes, lfq_codes_from_ids_ref(ids, D, g, dtype))
    assert torch.equal(lfq_quantize(codes, g)[1], ids)


def test_codes_from_ids_default_dtype_and_bit_order():
    assert lfq_codes_from_ids(torch.tensor([13]), 4).tolist() == [[1.0, -1.0, 1.0, 1.0]]
    assert lfq_codes_from_ids(torch.tensor([13]), 4).dtype == torch.float32
    assert lfq_codes_from_ids(torch.tensor([[1, 3]]), 4, 2).tolist() == [[1.0, -1.0, 1.0, 1.0]]
    top = lfq_codes_from_ids(torch.tensor([1 << 61]), 62)  # the highest bit of a 62-bit id
    assert top[0, 61] == 1 and top[0, :61].eq(-1).all()


def test_non_contiguous_and_expanded_inputs():
    D = 16
    zbuf = torch.randn(5, 2 * D, 3)
    z = zbuf.transpose(1, 2)[..., ::2]  # [5, 3, D], last-dim stride 2
    assert not z.is_contiguous()
    for g in (0, 4):
        codes, ids = lfq_quantize(z, g)
        codes_c, ids_c = lfq_quantize(z.contiguous(), g)
        assert torch.equal(codes, codes_c) and torch.equal(ids, ids_c)
        assert ids.shape == ((5, 3) if g == 0 else (5, 3, D // g))
    ze = torch.randn(1, D).expand(6, D)  # stride-0 rows
    assert torch.equal(lfq_quantize(ze)[1], lfq_quantize(ze[:1])[1].expand(6))
    ids = torch.randint(0, 1 << 8, (4, 7)).t()  # [7, 4] transposed ids of 8-bit groups
    assert torch.equal(lfq_codes_from_ids(ids, 32, 8), lfq_codes_from_ids(ids.contiguous(), 32, 8))


def test_empty_inputs():
    codes, ids = lfq_quantize(torch.randn(0, 18))
    assert codes.shape == (0, 18) and ids.shape == (0,)
    codes, ids = lfq_quantize(torch.randn(3, 0, 16), group_bits=8)
    assert codes.shape == (3, 0, 16) and ids.shape == (3, 0, 2)
    assert lfq_codes_from_ids(torch.zeros(0, dtype=torch.long), 18).shape == (0, 18)
    assert lfq_codes_from_ids(torch.zeros(2, 0, 4, dtype=torch.long), 32, 8).shape == (2, 0, 32)


def test_quantize_is_not_differentiable():
    z = torch.randn(4, 8, requires_grad=True)
    codes, ids = lfq_quantize(z)
    assert not codes.requires_grad and not ids.requires_grad


# ---- lfq_entropy --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ENTROPY_LAYOUTS, ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_entropy_matches_softmax_definition(layout, temperature, dtype):
    D, g = layout
    z = torch.randn(3, 13, D, dtype=dtype) * 0.05  # |4 z / T| spans saturated and soft bits at T = 0.01
    got = lfq_entropy(z, temperature, g, return_code_probs=True)
    want = lfq_entropy_ref(z, temperature, g, return_code_probs=True)
    assert_entropy_close(got, want, dtype)
    sample, codebook = lfq_entropy(z, temperature, g)
    assert torch.equal(sample, got[0]) and torch.equal(codebook, got[1])
    torch.testing.assert_close(got[2].sum(-1), torch.ones(D // (g or D), dtype=got[2].dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_entropy_half_inputs_compute_in_float32(dtype):
    z = (torch.randn(31, 10) * 0.1).to(dtype)
    got = lfq_entropy(z, 0.1, 5, return_code_probs=True)
    assert_entropy_close(got, lfq_entropy_ref(z, 0.1, 5, return_code_probs=True), torch.float32)


def test_entropy_non_contiguous_and_batched():
    zbuf = torch.randn(12, 5, 2 * 9, dtype=torch.float64) * 0.1
    z = zbuf.transpose(0, 1)[..., ::2]  # [5, 12, 9]
    assert not z.is_contiguous()
    for g in (0, 3):
        got = lfq_entropy(z, 0.1, g, return_code_probs=True)
        assert_entropy_close(got, lfq_entropy_ref(z, 0.1, g, return_code_probs=True), torch.float64)
        contiguous = lfq_entropy(z.contiguous(), 0.1, g, return_code_probs=True)
        for a, b in zip(got, contiguous):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("temperature", [0.01, 0.1])
def test_entropy_full_logits_d18_float64(temperature):
    """The N x 2^18 definition (64 x 262,144 float64 logits) to 1e-6."""
    z = torch.randn(64, 18, dtype=torch.float64) * 0.02
    sample, codebook, code_probs = lfq_entropy(z, temperature, return_code_probs=True)
    sample_r, codebook_r, code_probs_r = lfq_entropy_ref(z, temperature, return_code_probs=True)
    assert code_probs.shape == (1, 1 << 18)
    assert abs(sample.item() - sample_r.item()) < 1e-6 and abs(codebook.item() - codebook_r.item()) < 1e-6
    torch.testing.assert_close(code_probs, code_probs_r, rtol=0, atol=1e-9)
    # concavity: H(mean of distributions) >= mean of H; and at most log 2^18; soft enough to test
    assert 1.0 < sample.item() < codebook.item() < 18 * math.log(2)


@pytest.mark.parametrize("layout", [(24, 0), (36, 18), (128, 16), (128, 8)], ids=lambda l: "D{}-g{}".format(*l))
def test_entropy_large_groups_match_factorized_reference(layout):
    D, g = layout
    z = torch.randn(9, D, dtype=torch.float64) * 0.02
    got = lfq_entropy(z, 0.05, g, return_code_probs=True)
    assert_entropy_close(got, lfq_entropy_factorized_ref(z, 0.05, g, return_code_probs=True), torch.float64)


@pytest.mark.parametrize("layout", ENTROPY_LAYOUTS + [(16, 0), (16, 8)], ids=lambda l: "D{}-g{}".format(*l))
def test_references_agree(layout):
    """The factorised reference against the softmax definition (independent of the kernels)."""
    D, g = layout
    for temperature in TEMPERATURES:
        z = torch.randn(21, D, dtype=torch.float64) * 0.05
        got = lfq_entropy_factorized_ref(z, temperature, g, return_code_probs=True)
        assert_entropy_close(got, lfq_entropy_ref(z, temperature, g, return_code_probs=True), torch.float64)


def test_entropy_closed_forms():
    # z = 0: every bit is a fair coin, every code has probability 2^-g -> both entropies are g log 2
    for D, g in [(6, 0), (12, 4)]:
        bits = g or D
        sample, codebook, code_probs = lfq_entropy(torch.zeros(5, D, dtype=torch.float64), 0.01, g, True)
        assert sample.item() == pytest.approx(bits * math.log(2), abs=1e-12)
        assert codebook.item() == pytest.approx(bits * math.log(2), abs=1e-12)
        torch.testing.assert_close(code_probs, torch.full_like(code_probs, 2.0 ** -bits))
    # saturated bits (|4 z / T| = 4e4): deterministic codes, sample entropy 0; 4 rows on 3 distinct codes
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 100.0
    sample, codebook, code_probs = lfq_entropy(z, 0.01, return_code_probs=True)
    assert sample.item() == 0.0
    assert codebook.item() == pytest.approx(-(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)), rel=1e-6)
    assert code_probs.tolist() == [[0.25, 0.0, 0.5, 0.25]]  # codes 0 = [-, -], 2 = [-, +], 3 = [+, +]


def test_entropy_tiny_clamp_keeps_values_and_gradients_finite():
    """Saturated bits make most code probabilities exactly 0: -q log max(q, tiny) must stay finite."""
    for dtype in (torch.float32, torch.float64):
        z = (torch.randn(16, 10) * 10.0).to(dtype).requires_grad_(True)
        sample, codebook, code_probs = lfq_entropy(z, 0.01, return_code_probs=True)
        assert bool((code_probs == 0).any()) and torch.isfinite(codebook)
        (sample - codebook + code_probs.sum()).backward()
        assert bool(torch.isfinite(z.grad).all())


def test_entropy_gradients_match_reference():
    """Analytic gradients (not only finite differences) against autograd through the definition, including
    low temperatures."""
    for D, g in [(10, 0), (10, 5), (12, 3)]:
        for temperature in (0.05, 0.5):
            z = (torch.randn(17, D, dtype=torch.float64) * 0.05).requires_grad_(True)
            z_ref = z.detach().clone().requires_grad_(True)
            w = torch.randn(D // (g or D), 1 << (g or D), dtype=torch.float64)
            s, c, p = lfq_entropy(z, temperature, g, return_code_probs=True)
            s_r, c_r, p_r = lfq_entropy_ref(z_ref, temperature, g, return_code_probs=True)
            (0.3 * s - 0.7 * c + (p * w).sum()).backward()
            (0.3 * s_r - 0.7 * c_r + (p_r * w).sum()).backward()
            torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("layout", [(1, 0), (5, 0), (6, 2), (6, 3)], ids=lambda l: "D{}-g{}".format(*l))
def test_entropy_gradcheck(layout):
    D, g = layout
    z = (torch.randn(3, D, dtype=torch.float64) * 0.3).requires_grad_(True)
    w = torch.randn(D // (g or D), 1 << (g or D), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: lfq_entropy(x, 1.0, g)[0], (z,))
    assert torch.autograd.gradcheck(lambda x: lfq_entropy(x, 1.0, g)[1], (z,))
    assert torch.autograd.gradcheck(lambda x: lfq_entropy(x, 1.0, g, True)[2], (z,))

    def weighted(x):
        sample, codebook, code_probs = lfq_entropy(x, 1.0, g, return_code_probs=True)
        return 0.5 * sample - 2.0 * codebook + (code_probs * w).sum()

    assert torch.autograd.gradcheck(weighted, (z,))


# ---- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: lfq_quantize(torch.randn(2, 70)), "lfq_quantize.*group_bits"),
    (lambda: lfq_quantize(torch.randn(2, 18), 4), "lfq_quantize.*divisible"),
    (lambda: lfq_quantize(torch.randn(2, 128), 64), "lfq_quantize.*group_bits"),
    (lambda: lfq_quantize(torch.randint(0, 3, (2, 8))), "lfq_quantize.*z must be float32"),
    (lambda: lfq_entropy(torch.randn(2, 28)), "lfq_entropy.*group.bits"),
    (lambda: lfq_entropy(torch.randn(2, 56), 0.01, 28), "lfq_entropy.*group.bits.*24"),
    (lambda: lfq_entropy(torch.randn(2, 18), 0.01, 4), "lfq_entropy.*divisible"),
    (lambda: lfq_entropy(torch.randn(0, 8)), "lfq_entropy.*at least one row"),
    (lambda: lfq_entropy(torch.randn(4, 0, 8), 0.1, 4), "lfq_entropy.*at least one row"),
    (lambda: lfq_entropy(torch.randint(0, 3, (2, 8))), "lfq_entropy.*z must be float32"),
    (lambda: lfq_entropy(torch.randn(2, 8), 0.0), "lfq_entropy.*temperature"),
    (lambda: lfq_codes_from_ids(torch.tensor([256]), 8), "lfq_codes_from_ids.*ids"),
    (lambda: lfq_codes_from_ids(torch.tensor([[1, 256]]), 16, 8), "lfq_codes_from_ids.*ids"),
    (lambda: lfq_codes_from_ids(torch.tensor([1 << 18]), 18), "lfq_codes_from_ids.*ids"),
    (lambda: lfq_codes_from_ids(torch.tensor([-1]), 8), "lfq_codes_from_ids.*ids"),
    (lambda: lfq_codes_from_ids(torch.tensor([[0, -5]]), 124, 62), "lfq_codes_from_ids.*ids"),
    (lambda: lfq_codes_from_ids(torch.tensor([1.0]), 8), "lfq_codes_from_ids.*int64"),
    (lambda: lfq_codes_from_ids(torch.zeros(3, 3, dtype=torch.long), 32, 8), "lfq_codes_from_ids.*ids"),
    (lambda: lfq_codes_from_ids(torch.zeros(3, dtype=torch.long), 70), "lfq_codes_from_ids.*group_bits"),
    (lambda: lfq_codes_from_ids(torch.zeros(3, dtype=torch.long), 18, 4), "lfq_codes_from_ids.*divisible"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ---- dispatcher integration ---------------------------------------------------------------------------

def test_opcheck():
    z = torch.randn(2, 7, 16)
    for g in (0, 4):
        torch.library.opcheck(torch.ops.fastvq.lfq_quantize.default, (z, g))
        torch.library.opcheck(torch.ops.fastvq.lfq_quantize.default, (z.bfloat16(), g))
    ids = torch.randint(0, 1 << 4, (9, 4))
    torch.library.opcheck(torch.ops.fastvq.lfq_codes_from_ids.default, (ids, 16, 4, torch.float16))
    torch.library.opcheck(torch.ops.fastvq.lfq_codes_from_ids.default, (ids[:, 0], 4, 0, None))
    for dtype in (torch.float32, torch.float64):
        zg = (torch.randn(11, 8, dtype=dtype) * 0.1).requires_grad_(True)
        for g in (0, 4):
            torch.library.opcheck(torch.ops.fastvq.lfq_entropy.default, (zg, 0.1, g))
    zd = torch.randn(11, 8, dtype=torch.float64) * 0.1
    _, _, code_probs = lfq_entropy(zd, 0.1, 4, return_code_probs=True)
    one = torch.ones((), dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastvq.lfq_entropy_backward.default,
                          (one, -one, torch.randn_like(code_probs), zd, code_probs, 0.1, 4))
    torch.library.opcheck(torch.ops.fastvq.lfq_entropy_backward.default,
                          (one, None, None, zd, code_probs, 0.1, 4))


def test_torch_compile_fullgraph_ops():
    torch._dynamo.reset()

    def fn(z):
        codes, ids = lfq_quantize(z, 4)
        sample, codebook, code_probs = lfq_entropy(z, 0.1, 4, return_code_probs=True)
        return codes, ids, lfq_codes_from_ids(ids, z.shape[-1], 4), sample - codebook, code_probs

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    z = torch.randn(40, 12)
    for n in (40, 13):
        for got, want in zip(compiled(z[:n]), fn(z[:n])):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_meta_tensors_shape_only():
    codes, ids = lfq_quantize(torch.empty(2, 3, 32, device="meta", dtype=torch.bfloat16), 8)
    assert codes.shape == (2, 3, 32) and codes.dtype == torch.bfloat16 and ids.shape == (2, 3, 4)
    assert ids.dtype == torch.int64
    codes = lfq_codes_from_ids(torch.empty(5, 4, dtype=torch.long, device="meta"), 32, 8, torch.float64)
    assert codes.shape == (5, 32) and codes.dtype == torch.float64
    s, c, p = lfq_entropy(torch.empty(7, 12, device="meta", dtype=torch.float16), 0.1, 4, True)
    assert s.shape == () and s.dtype == torch.float32 and p.shape == (3, 16)


# ---- the module ---------------------------------------------------------------------------------------

MODULE_CONFIGS = {
    "plain": dict(dim=10),
    "groups": dict(dim=12, group_bits=4, temperature=0.1),
    "spherical": dict(dim=12, spherical=True),
    "spherical-groups": dict(dim=12, group_bits=6, spherical=True, temperature=0.05),
    "siglu-groups": dict(dim=16, group_bits=8, bound="siglu", temperature=0.5),
    "siglu-spherical": dict(dim=8, bound="siglu", spherical=True, entropy_weight=0.3),
    "no-entropy": dict(dim=40, group_bits=0, entropy_weight=0.0),
}


def ref_kwargs(q: LFQ) -> dict:
    return dict(group_bits=q.group_bits, temperature=q.temperature, entropy_weight=q.entropy_weight,
                commitment_weight=q.commitment_weight, spherical=q.spherical, bound=q.bound)


@pytest.mark.parametrize("config", MODULE_CONFIGS.values(), ids=MODULE_CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_module_matches_reference(config, dtype):
    q = LFQ(**config)
    z = (torch.randn(3, 11, q.dim, dtype=dtype) * 0.2).requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    quantized, ids, loss = q(z)
    quantized_r, ids_r, loss_r = lfq_loss_ref(z_ref, **ref_kwargs(q))
    G = q.num_groups
    assert torch.equal(ids, ids_r) and ids.shape == ((3, 11) if q.group_bits == 0 else (3, 11, G))
    assert quantized.shape == z.shape and quantized.dtype == dtype
    torch.testing.assert_close(quantized, quantized_r)
    torch.testing.assert_close(loss, loss_r, **entropy_tols(dtype))
    w = torch.randn_like(z)
    (loss + (quantized * w).sum()).backward()
    (loss_r + (quantized_r * w).sum()).backward()
    torch.testing.assert_close(z.grad, z_ref.grad, **entropy_tols(dtype))
    codes = q.ids_to_codes(ids, dtype)
    torch.testing.assert_close(codes, quantized.detach())  # the forward's values are the codes
    if q.spherical:
        torch.testing.assert_close(codes.norm(dim=-1), torch.ones(3, 11, dtype=dtype))
    else:
        assert bool(codes.abs().eq(1).all())


@pytest.mark.parametrize("preset, dim, group_bits, ids_per_row", [
    (lambda: LFQ.mergevq(), 18, 0, None),
    (lambda: LFQ.bsq(), 18, 0, None),
    (lambda: LFQ.bsq(dim=36), 36, 18, 2),
    (lambda: LFQ.uniwetok(), 128, 8, 16),
    (lambda: LFQ.uniwetok(group_bits=16), 128, 16, 8),
], ids=["mergevq", "bsq18", "bsq36", "uniwetok8", "uniwetok16"])
def test_presets(preset, dim, group_bits, ids_per_row):
    q = preset()
    assert (q.dim, q.group_bits) == (dim, group_bits)
    z = torch.randn(2, 8, dim, requires_grad=True)
    quantized, ids, loss = q(z)
    assert ids.shape == ((2, 8) if ids_per_row is None else (2, 8, ids_per_row))
    quantized_r, ids_r, loss_r = lfq_loss_ref(z.detach(), **ref_kwargs(q), entropy_fn=lfq_entropy_factorized_ref)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(quantized, quantized_r)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    (loss + quantized.square().sum()).backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())
    torch.testing.assert_close(q.ids_to_codes(ids), quantized.detach())
    assert q.usage_counts is not None and q.usage_counts.sum() == 16 * q.num_groups


def test_preset_settings_and_overrides():
    m = LFQ.mergevq()
    settings = (m.temperature, m.entropy_weight, m.commitment_weight, m.spherical, m.bound)
    assert settings == (0.01, 0.1, 0.25, False, None)
    assert LFQ.bsq(36).spherical and LFQ.bsq(36).num_groups == 2
    u = LFQ.uniwetok(16, entropy_weight=0.05)
    assert u.bound == "siglu" and u.num_groups == 8 and u.entropy_weight == 0.05
    with pytest.raises(ValueError, match="LFQ.bsq: dim must be 18 or 36"):
        LFQ.bsq(dim=20)
    with pytest.raises(ValueError, match="LFQ.uniwetok: group_bits must be 8 or 16"):
        LFQ.uniwetok(group_bits=4)


def test_module_statistics():
    q = LFQ(dim=4, group_bits=2, temperature=1.0)
    assert q.usage_counts.shape == (2, 4) and q.last_code_probs is None and q.last_perplexity is None
    # rows [+, -, -, -] and [-, +, -, -]: group 0 sees ids 1 and 2, group 1 sees id 0 twice
    z = torch.tensor([[1.0, -1.0, -1.0, -1.0], [-1.0, 1.0, -1.0, -1.0]])
    _, ids, _ = q(z)
    assert ids.tolist() == [[1, 0], [2, 0]]
    assert q.usage_counts.tolist() == [[0, 1, 1, 0], [2, 0, 0, 0]]
    torch.testing.assert_close(q.codebook_usage(), torch.tensor([0.5, 0.25]))
    _, _, code_probs = lfq_entropy(z, 1.0, 2, return_code_probs=True)
    torch.testing.assert_close(q.last_code_probs, code_probs)
    want_ppl = torch.exp(-(code_probs * code_probs.log()).sum(-1))
    torch.testing.assert_close(q.last_perplexity, want_ppl)
    assert bool((q.last_perplexity > 1).all()) and bool((q.last_perplexity <= 4).all())
    q.eval()
    _, _, loss = q(torch.randn(50, 4))  # eval: the loss is computed, nothing is counted
    assert loss.item() != 0.0 and q.usage_counts.sum() == 4
    q.train()
    q.reset_usage()
    assert q.usage_counts.sum() == 0 and q.last_code_probs is None
    big = LFQ(dim=20)  # 2^20 codes: not counted, entropy still exact
    assert big.usage_counts is None
    big(torch.randn(3, 20))
    assert big.last_code_probs.shape == (1, 1 << 20)
    with pytest.raises(RuntimeError, match="LFQ: usage is counted for groups of at most 18 bits"):
        big.codebook_usage()


def test_module_without_entropy_term():
    with pytest.raises(ValueError, match="LFQ: dim=64 needs group_bits"):  # ids, not the entropy
        LFQ(dim=64, entropy_weight=0.0)
    q = LFQ(dim=40, entropy_weight=0.0)  # 40 > 24 is fine without the entropy term
    z = torch.randn(5, 40)
    _, _, loss = q(z)
    torch.testing.assert_close(loss, 0.25 * F.mse_loss(z, torch.where(z > 0, 1.0, -1.0)))
    assert q.last_code_probs is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=70), r"LFQ: dim=70 needs group_bits"),
    (dict(dim=18, group_bits=4), r"LFQ: dim=18 must be divisible by group_bits=4"),
    (dict(dim=128, group_bits=64, entropy_weight=0.0), r"LFQ: group_bits must be 0 or in \[1, 62\]"),
    (dict(dim=56, group_bits=28), r"LFQ: the entropy loss .* needs g <= 24, got g=28"),
    (dict(dim=30), r"LFQ: the entropy loss .* needs g <= 24, got g=30"),
    (dict(dim=8, bound="tanh"), r'LFQ: bound must be None or "siglu"'),
    (dict(dim=8, temperature=0.0), r"LFQ: temperature must be positive"),
    (dict(dim=0), r"LFQ: dim must be positive"),
])
def test_module_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LFQ(**kwargs)


def test_module_bad_input_and_dtypes():
    q = LFQ(dim=8)
    with pytest.raises(ValueError, match=r"LFQ: z must be \[\.\.\., 8\]"):
        q(torch.randn(3, 9))
    quantized, ids, loss = q(torch.randn(4, 8).bfloat16())
    assert quantized.dtype == torch.bfloat16 and ids.shape == (4,) and loss.dtype == torch.float32
    assert LFQ(dim=56, group_bits=28, entropy_weight=0.0)(torch.randn(2, 56))[1].shape == (2, 2)


def test_training_moves_entropy_terms():
    """SGD on z alone: the entropy loss makes bits confident (sample entropy down) and spreads a
    collapsed batch over the codebook (codebook entropy up); the commitment loss pulls z to the codes."""
    torch.manual_seed(2)
    z = torch.nn.Parameter(1.0 + 0.3 * torch.randn(64, 6))  # nearly every row on the all-ones code
    q = LFQ(dim=6, temperature=1.0, entropy_weight=1.0, commitment_weight=0.0)
    opt = torch.optim.SGD([z], lr=1.0)
    first = lfq_entropy(z.detach(), 1.0)
    losses = []
    for _ in range(40):
        _, _, loss = q(z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    last = lfq_entropy(z.detach(), 1.0)
    assert losses[-1] < losses[0] - 0.5
    assert last[1] > first[1] + 0.5  # codebook entropy up
    assert q.codebook_usage().item() > 2 / 64  # more than the one or two codes it started on
    # commitment only: each step moves z a fixed fraction towards its (unchanged) code, d mse / dz =
    # 2 (z - q) / numel, so with lr = numel / 4 the loss shrinks by exactly (1 - 1/2)^2 per step
    c = LFQ(dim=6, entropy_weight=0.0, commitment_weight=1.0)
    zc = torch.nn.Parameter(torch.randn(32, 6, dtype=torch.float64))
    opt = torch.optim.SGD([zc], lr=32 * 6 / 4)
    losses = []
    for _ in range(5):
        _, _, loss = c(zc)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses == pytest.approx([losses[0] * 0.25 ** k for k in range(5)], rel=1e-9)


@pytest.mark.parametrize("config", ["groups", "siglu-spherical"])
def test_module_torch_compile_fullgraph(config):
    torch._dynamo.reset()
    counters.clear()
    q_eager, q_compiled = LFQ(**MODULE_CONFIGS[config]), LFQ(**MODULE_CONFIGS[config])
    compiled = torch.compile(q_compiled, fullgraph=True)
    z = torch.randn(6, 7, q_eager.dim) * 0.3

    def run(module):
        for _ in range(2):  # the second call runs the cached graph
            x = z.clone().requires_grad_(True)
            quantized, ids, loss = module(x)
            (loss + quantized.sum()).backward()
        return quantized.detach(), ids, loss.detach(), x.grad

    for got, want in zip(run(compiled), run(q_eager)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1  # one graph, compiled once, reused
    assert torch.equal(q_compiled.usage_counts, q_eager.usage_counts)
    torch.testing.assert_close(q_compiled.last_code_probs, q_eager.last_code_probs)


# ---- the CUDA kernels, emulated on the CPU (torch.ops.fastvq_emu.*; see test_cuda_emulated.py) ----------



@pytest.mark.parametrize("layout", [(1, 0), (9, 0), (62, 0), (128, 8), (96, 32)], ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_quantize_and_codes_from_ids(schedule, cuda_ops, layout, dtype):
    D, g = layout
    zbuf = torch.randn(2 * D, 300).to(dtype)
    z = zbuf.t()[:, ::2]  # [300, D] non-contiguous: rows past one 256-thread block
    z[0, 0], z[1, 0], z[2, 0] = 0.0, float("nan"), -0.0
    codes, ids = cuda_ops.lfq_quantize(z, g)
    codes_cpu, ids_cpu = lfq_quantize(z, g)
    assert torch.equal(codes, codes_cpu) and torch.equal(ids, ids_cpu)
    unpacked = cuda_ops.lfq_codes_from_ids(ids, D, g, dtype)
    assert torch.equal(unpacked, codes_cpu)
    e_codes, e_ids = cuda_ops.lfq_quantize(z[:0], g)
    assert e_codes.shape == (0, D) and e_ids.shape == ids[:0].shape


@pytest.mark.parametrize("layout", [(1, 0), (7, 0), (12, 4), (15, 0), (16, 8)], ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_emulated_entropy_forward_and_backward(schedule, cuda_ops, layout, dtype):
    D, g = layout
    zbuf = (torch.randn(D, 2 * 70) * 0.05).to(dtype)
    z = zbuf.t()[::2]  # [70, D] non-contiguous
    sample, codebook, code_probs = cuda_ops.lfq_entropy(z, 0.1, g)
    want = lfq_entropy(z, 0.1, g, return_code_probs=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = dict(rtol=1e-12, atol=1e-13) if acc == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for got_t, want_t in zip((sample, codebook, code_probs), want):
        assert got_t.dtype == acc and got_t.shape == want_t.shape
        torch.testing.assert_close(got_t, want_t, **tol)
    gs, gc = torch.tensor(0.3, dtype=acc), torch.tensor(-0.7, dtype=acc)
    gp = torch.randn_like(code_probs)
    for grads in ((gs, gc, gp), (gs, None, None), (None, gc, None), (None, None, gp)):
        grad_z = cuda_ops.lfq_entropy_backward(*grads, z, code_probs, 0.1, g)
        grad_z_cpu = torch.ops.fastvq.lfq_entropy_backward(*grads, z, want[2], 0.1, g)
        assert grad_z.shape == z.shape and grad_z.dtype == grad_z_cpu.dtype
        torch.testing.assert_close(grad_z, grad_z_cpu, **tol)
