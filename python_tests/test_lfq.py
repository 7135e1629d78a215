"""lfq_quantize / lfq_codes_from_indices / lfq_entropy against the pure-PyTorch references (both bit orders, row
weights). The module fastvq.nn.LFQ is tested in test_lfq_nn.py.

The entropy oracle is the definition (lfq_entropy_ref: a softmax over every code, N x 2^g), cross-checked
with the factorised reference; the emulated CUDA kernels (torch.ops.fastvq_emu.lfq_*) are compared with
the CPU ops at the end of the file.
"""
import math

import pytest
import torch

from fastvq.ops import lfq_codes_from_indices, lfq_entropy, lfq_quantize
from fastvq.reference import (
    lfq_codes_from_indices_ref,
    lfq_entropy_factorized_ref,
    lfq_entropy_ref,
    lfq_quantize_ref,
)

from conftest import needs_emu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (D, group_bits): one index per row up to the 62-bit limit, and grouped indices (UniWeTok: 128 bits)
ID_LAYOUTS = [(1, 0), (7, 0), (8, 0), (9, 0), (18, 0), (31, 0), (33, 0), (62, 0),
              (6, 1), (36, 18), (124, 62), (128, 8), (128, 16), (128, 32)]
# (D, group_bits) small enough for the N x 2^g softmax definition
ENTROPY_LAYOUTS = [(1, 0), (2, 0), (5, 0), (8, 0), (12, 0), (12, 3), (12, 4), (10, 5), (9, 9), (6, 1)]
TEMPERATURES = [0.01, 0.1, 1.0]
ORDERS = ["msb", "lsb"]


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


# ---- lfq_quantize / lfq_codes_from_indices ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_bit_order_and_signs(dtype):
    # msb (default): dimension 0 is the most significant bit: [+, -, +, +] -> 8 + 2 + 1 = 11
    z = torch.tensor([[0.5, -2.0, 3.0, 0.25]], dtype=dtype)
    codes, indices = lfq_quantize(z)
    assert codes.dtype == dtype and codes.tolist() == [[1.0, -1.0, 1.0, 1.0]]
    assert indices.dtype == torch.int64 and indices.tolist() == [11]
    assert lfq_quantize(z, bit_order="lsb")[1].tolist() == [13]  # lsb: dimension j is bit j: 1 + 4 + 8
    # groups [+, -] and [+, +]: msb 2 and 3, lsb 1 and 3
    assert lfq_quantize(z, group_bits=2)[1].tolist() == [[2, 3]]
    assert lfq_quantize(z, 2, "lsb")[1].tolist() == [[1, 3]]
    # strictly z > 0: zeros, -0 and NaN are bit 0 / -1; the smallest positive value is bit 1
    tiny = torch.finfo(dtype).tiny
    edge = torch.tensor([0.0, -0.0, float("nan"), tiny, -float("inf"), float("inf"), -tiny], dtype=dtype)
    codes, indices = lfq_quantize(edge, bit_order="lsb")
    assert codes.tolist() == [-1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0], f"z > 0 is the bit, for every value: {edge}"
    assert indices.item() == (1 << 3) + (1 << 5)
    assert lfq_quantize(edge)[1].item() == (1 << 3) + (1 << 1)  # msb: dims 3 and 5 of 7 are bits 3 and 1
    if dtype in (torch.float32, torch.float64):  # subnormals are > 0 too
        sub = torch.tensor([tiny / 4, -tiny / 4], dtype=dtype)
        assert lfq_quantize(sub, bit_order="lsb")[1].item() == 1 and lfq_quantize(sub)[1].item() == 2


def test_msb_matches_vector_quantize_pytorch_mask():
    """vector-quantize-pytorch's LFQ packs with mask = 2^arange(d - 1, -1, -1): the first dim is the MSB."""
    z = torch.randn(50, 10)
    mask = 2 ** torch.arange(9, -1, -1)
    assert torch.equal(lfq_quantize(z)[1], ((z > 0).long() * mask).sum(-1))


@pytest.mark.parametrize("layout", ID_LAYOUTS, ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_quantize_matches_reference(layout, dtype, order):
    D, g = layout
    z = torch.randn(37, D).to(dtype)
    z[3, :] = 0.0  # all bits 0
    z[5, :] = 1.0  # all bits 1
    codes, indices = lfq_quantize(z, g, order)
    codes_ref, indices_ref = lfq_quantize_ref(z, g, order)
    assert codes.shape == z.shape and codes.dtype == dtype and codes.is_contiguous()
    assert indices.shape == indices_ref.shape == ((37,) if g == 0 else (37, D // g))
    assert torch.equal(codes, codes_ref) and torch.equal(indices, indices_ref)
    assert indices[3].eq(0).all() and indices[5].eq((1 << (g or D)) - 1).all()


@pytest.mark.parametrize("layout", [(1, 0), (9, 0), (62, 0), (128, 16)], ids=lambda l: "D{}-g{}".format(*l))
def test_bit_orders_are_bit_reversals(layout):
    D, g = layout
    bits = g or D
    z = torch.randn(64, D, dtype=torch.float64)
    msb, lsb = lfq_quantize(z, g)[1], lfq_quantize(z, g, "lsb")[1]
    flipped = lfq_quantize(z.view(64, D // bits, bits).flip(-1).reshape(64, D), g, "lsb")[1]
    assert torch.equal(msb, flipped)
    assert bits == 1 or not torch.equal(msb, lsb)


@pytest.mark.parametrize("layout", [(1, 0), (18, 0), (62, 0), (128, 8), (128, 16), (128, 32)],
                         ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_round_trips(layout, dtype, order):
    D, g = layout
    bits = g or D
    # z -> (codes, indices) -> codes
    z = torch.randn(2, 9, D).to(dtype)
    codes, indices = lfq_quantize(z, g, order)
    assert torch.equal(lfq_codes_from_indices(indices, D, g, dtype, order), codes)
    # indices -> codes -> indices, including 0 and the all-ones index of the group width
    index_shape = (40,) if g == 0 else (40, D // g)
    indices = torch.randint(0, 1 << bits, index_shape)
    indices[0], indices[1] = 0, (1 << bits) - 1
    codes = lfq_codes_from_indices(indices, D, g, dtype, order)
    assert codes.shape == (40, D) and codes.dtype == dtype
    assert torch.equal(codes, lfq_codes_from_indices_ref(indices, D, g, dtype, order))
    assert torch.equal(lfq_quantize(codes, g, order)[1], indices)


def test_codes_from_indices_default_dtype_and_bit_order():
    assert lfq_codes_from_indices(torch.tensor([11]), 4).tolist() == [[1.0, -1.0, 1.0, 1.0]]
    assert lfq_codes_from_indices(torch.tensor([13]), 4, bit_order="lsb").tolist() == [[1.0, -1.0, 1.0, 1.0]]
    assert lfq_codes_from_indices(torch.tensor([11]), 4).dtype == torch.float32
    assert lfq_codes_from_indices(torch.tensor([[2, 3]]), 4, 2).tolist() == [[1.0, -1.0, 1.0, 1.0]]
    top = lfq_codes_from_indices(torch.tensor([1 << 61]), 62)  # the highest bit of a 62-bit index: dim 0
    assert top[0, 0] == 1 and top[0, 1:].eq(-1).all()
    top = lfq_codes_from_indices(torch.tensor([1 << 61]), 62, bit_order="lsb")
    assert top[0, 61] == 1 and top[0, :61].eq(-1).all()


@pytest.mark.parametrize("order", ORDERS)
def test_non_contiguous_and_expanded_inputs(order):
    D = 16
    zbuf = torch.randn(5, 2 * D, 3)
    z = zbuf.transpose(1, 2)[..., ::2]  # [5, 3, D], last-dim stride 2
    assert not z.is_contiguous()
    for g in (0, 4):
        codes, indices = lfq_quantize(z, g, order)
        codes_c, indices_c = lfq_quantize(z.contiguous(), g, order)
        assert torch.equal(codes, codes_c) and torch.equal(indices, indices_c)
        assert indices.shape == ((5, 3) if g == 0 else (5, 3, D // g))
    ze = torch.randn(1, D).expand(6, D)  # stride-0 rows
    assert torch.equal(lfq_quantize(ze, 0, order)[1], lfq_quantize(ze[:1], 0, order)[1].expand(6))
    indices = torch.randint(0, 1 << 8, (4, 7)).t()  # [7, 4] transposed indices of 8-bit groups
    assert torch.equal(lfq_codes_from_indices(indices, 32, 8, bit_order=order),
                       lfq_codes_from_indices(indices.contiguous(), 32, 8, bit_order=order))


@pytest.mark.parametrize("order", ORDERS)
def test_empty_inputs(order):
    codes, indices = lfq_quantize(torch.randn(0, 18), bit_order=order)
    assert codes.shape == (0, 18) and indices.shape == (0,)
    codes, indices = lfq_quantize(torch.randn(3, 0, 16), 8, order)
    assert codes.shape == (3, 0, 16) and indices.shape == (3, 0, 2)
    assert lfq_codes_from_indices(torch.zeros(0, dtype=torch.long), 18, bit_order=order).shape == (0, 18)
    assert lfq_codes_from_indices(torch.zeros(2, 0, 4, dtype=torch.long), 32, 8, bit_order=order).shape == (2, 0, 32)


def test_quantize_is_not_differentiable():
    z = torch.randn(4, 8, requires_grad=True)
    codes, indices = lfq_quantize(z)
    assert not codes.requires_grad and not indices.requires_grad


# ---- lfq_entropy --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ENTROPY_LAYOUTS, ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_entropy_matches_softmax_definition(layout, temperature, dtype, order):
    D, g = layout
    z = torch.randn(3, 13, D, dtype=dtype) * 0.05  # |4 z / T| spans saturated and soft bits at T = 0.01
    got = lfq_entropy(z, temperature, g, return_code_probs=True, bit_order=order)
    want = lfq_entropy_ref(z, temperature, g, return_code_probs=True, bit_order=order)
    assert_entropy_close(got, want, dtype)
    sample, codebook = lfq_entropy(z, temperature, g, bit_order=order)
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
@pytest.mark.parametrize("order", ORDERS)
def test_entropy_large_groups_match_factorized_reference(layout, order):
    D, g = layout
    z = torch.randn(9, D, dtype=torch.float64) * 0.02
    weight = None
    if order == "lsb":  # (one of the two orders weighted: 2^24-entry distributions are slow to check)
        weight = torch.rand(9, dtype=torch.float64)
        weight[2] = 0.0
    got = lfq_entropy(z, 0.05, g, return_code_probs=True, weight=weight, bit_order=order)
    want = lfq_entropy_factorized_ref(z, 0.05, g, return_code_probs=True, weight=weight, bit_order=order)
    assert_entropy_close(got, want, torch.float64)


@pytest.mark.parametrize("layout", ENTROPY_LAYOUTS + [(16, 0), (16, 8)], ids=lambda l: "D{}-g{}".format(*l))
def test_references_agree(layout):
    """The factorised reference against the softmax definition (independent of the kernels)."""
    D, g = layout
    w = torch.rand(21, dtype=torch.float64) * (torch.rand(21) > 0.3)
    for temperature, order, weight in zip(TEMPERATURES, ["msb", "lsb", "msb"], [None, w, w]):
        z = torch.randn(21, D, dtype=torch.float64) * 0.05
        kw = dict(weight=weight, bit_order=order)
        got = lfq_entropy_factorized_ref(z, temperature, g, return_code_probs=True, **kw)
        assert_entropy_close(got, lfq_entropy_ref(z, temperature, g, return_code_probs=True, **kw), torch.float64)


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
    assert code_probs.tolist() == [[0.25, 0.5, 0.0, 0.25]]  # msb codes 0 = [-, -], 1 = [-, +], 3 = [+, +]
    _, _, code_probs = lfq_entropy(z, 0.01, return_code_probs=True, bit_order="lsb")
    assert code_probs.tolist() == [[0.25, 0.0, 0.5, 0.25]]  # lsb codes 0 = [-, -], 2 = [-, +], 3 = [+, +]
    # weights: the [-, +] rows count 0 and 0.5, the others 1: q = [1, 0.5, 0, 1] / 2.5
    w = torch.tensor([1.0, 0.0, 0.5, 1.0])
    _, codebook, code_probs = lfq_entropy(z, 0.01, return_code_probs=True, weight=w)
    torch.testing.assert_close(code_probs, torch.tensor([[0.4, 0.2, 0.0, 0.4]]))


def test_entropy_tiny_clamp_keeps_values_and_gradients_finite():
    """Saturated bits make most code probabilities exactly 0: -q log max(q, tiny) must stay finite."""
    for dtype in (torch.float32, torch.float64):
        z = (torch.randn(16, 10) * 10.0).to(dtype).requires_grad_(True)
        sample, codebook, code_probs = lfq_entropy(z, 0.01, return_code_probs=True)
        assert bool((code_probs == 0).any()) and torch.isfinite(codebook)
        (sample - codebook + code_probs.sum()).backward()
        assert bool(torch.isfinite(z.grad).all())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("weighted", [False, True])
def test_entropy_gradients_match_reference(order, weighted):
    """Analytic gradients (not only finite differences) against autograd through the definition, including
    low temperatures, both bit orders, and row weights (a row of weight 0 gets a zero gradient)."""
    for D, g in [(10, 0), (10, 5), (12, 3)]:
        for temperature in (0.05, 0.5):
            z = (torch.randn(17, D, dtype=torch.float64) * 0.05).requires_grad_(True)
            z_ref = z.detach().clone().requires_grad_(True)
            weight = None
            if weighted:
                weight = torch.rand(17, dtype=torch.float64)
                weight[[0, 5]] = 0.0
            w = torch.randn(D // (g or D), 1 << (g or D), dtype=torch.float64)
            kw = dict(weight=weight, bit_order=order)
            s, c, p = lfq_entropy(z, temperature, g, True, **kw)
            s_r, c_r, p_r = lfq_entropy_ref(z_ref, temperature, g, True, **kw)
            (0.3 * s - 0.7 * c + (p * w).sum()).backward()
            (0.3 * s_r - 0.7 * c_r + (p_r * w).sum()).backward()
            torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-8, atol=1e-10)
            if weighted:
                assert z.grad[[0, 5]].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_entropy_weights(dtype):
    """Bool and float weights: a mask equals selecting the rows; integer weights equal repeating rows; rows
    of weight 0 may hold NaN; all-zero weights give zeros; no weight equals all-ones weights bit for bit."""
    z = torch.randn(4, 9, 8, dtype=dtype) * 0.1
    mask = torch.rand(4, 9) > 0.4
    for g, order in [(0, "msb"), (4, "lsb")]:
        got = lfq_entropy(z, 0.1, g, True, weight=mask, bit_order=order)
        assert_entropy_close(got, lfq_entropy(z[mask], 0.1, g, True, bit_order=order), dtype)
        nan = z.clone()
        nan[~mask] = float("nan")
        for a, b in zip(lfq_entropy(nan, 0.1, g, True, weight=mask, bit_order=order), got):
            assert torch.equal(a, b)
        reps = torch.randint(0, 3, (4, 9))
        repeated = z.reshape(36, 8).repeat_interleave(reps.reshape(36), dim=0)
        got = lfq_entropy(z, 0.1, g, True, weight=reps.to(dtype), bit_order=order)
        assert_entropy_close(got, lfq_entropy(repeated, 0.1, g, True, bit_order=order), dtype)
        for a, b in zip(lfq_entropy(z, 0.1, g, True, weight=torch.ones(4, 9, dtype=torch.float16), bit_order=order),
                        lfq_entropy(z, 0.1, g, True, bit_order=order)):
            torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    zg = z.clone().requires_grad_(True)
    sample, codebook, code_probs = lfq_entropy(zg, 0.1, 4, True, weight=torch.zeros(4, 9, dtype=torch.bool))
    assert sample.item() == 0.0 and codebook.item() == 0.0 and code_probs.eq(0).all()
    (sample - codebook + code_probs.sum()).backward()
    assert zg.grad.eq(0).all()


@pytest.mark.parametrize("layout", [(1, 0), (5, 0), (6, 2), (6, 3)], ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("order", ORDERS)
def test_entropy_gradcheck(layout, order):
    D, g = layout
    z = (torch.randn(3, D, dtype=torch.float64) * 0.3).requires_grad_(True)
    w = torch.randn(D // (g or D), 1 << (g or D), dtype=torch.float64)
    rows = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    for weight in (None, rows):
        kw = dict(weight=weight, bit_order=order)
        assert torch.autograd.gradcheck(lambda x: lfq_entropy(x, 1.0, g, **kw)[0], (z,))
        assert torch.autograd.gradcheck(lambda x: lfq_entropy(x, 1.0, g, **kw)[1], (z,))
        assert torch.autograd.gradcheck(lambda x: lfq_entropy(x, 1.0, g, True, **kw)[2], (z,))

        def loss(x):
            sample, codebook, code_probs = lfq_entropy(x, 1.0, g, True, **kw)
            return 0.5 * sample - 2.0 * codebook + (code_probs * w).sum()

        assert torch.autograd.gradcheck(loss, (z,))


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
    (lambda: lfq_entropy(torch.randn(2, 8), weight=torch.ones(3)), "lfq_entropy: weight must have z's leading shape"),
    (lambda: lfq_entropy(torch.randn(2, 8), weight=torch.ones(2, dtype=torch.long)), "lfq_entropy: weight must be bool"),
    (lambda: lfq_quantize(torch.randn(2, 8), bit_order="big"), 'lfq_quantize: bit_order must be "msb" or "lsb", got "big"'),
    (lambda: lfq_codes_from_indices(torch.zeros(2, dtype=torch.long), 8, bit_order="little"),
     'lfq_codes_from_indices: bit_order must be "msb" or "lsb"'),
    (lambda: lfq_entropy(torch.randn(2, 8), bit_order="MSB"), 'lfq_entropy: bit_order must be "msb" or "lsb"'),
    (lambda: lfq_codes_from_indices(torch.tensor([256]), 8), "lfq_codes_from_indices.*indices"),
    (lambda: lfq_codes_from_indices(torch.tensor([[1, 256]]), 16, 8), "lfq_codes_from_indices.*indices"),
    (lambda: lfq_codes_from_indices(torch.tensor([1 << 18]), 18), "lfq_codes_from_indices.*indices"),
    (lambda: lfq_codes_from_indices(torch.tensor([-1]), 8), "lfq_codes_from_indices.*indices"),
    (lambda: lfq_codes_from_indices(torch.tensor([[0, -5]]), 124, 62), "lfq_codes_from_indices.*indices"),
    (lambda: lfq_codes_from_indices(torch.tensor([1.0]), 8), "lfq_codes_from_indices.*int64"),
    (lambda: lfq_codes_from_indices(torch.zeros(3, 3, dtype=torch.long), 32, 8), "lfq_codes_from_indices.*indices"),
    (lambda: lfq_codes_from_indices(torch.zeros(3, dtype=torch.long), 70), "lfq_codes_from_indices.*group_bits"),
    (lambda: lfq_codes_from_indices(torch.zeros(3, dtype=torch.long), 18, 4), "lfq_codes_from_indices.*divisible"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ---- dispatcher integration ---------------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
def test_opcheck(order):
    z = torch.randn(2, 7, 16)
    for g in (0, 4):
        torch.library.opcheck(torch.ops.fastvq.lfq_quantize.default, (z, g, order))
        torch.library.opcheck(torch.ops.fastvq.lfq_quantize.default, (z.bfloat16(), g, order))
    indices = torch.randint(0, 1 << 4, (9, 4))
    torch.library.opcheck(torch.ops.fastvq.lfq_codes_from_indices.default, (indices, 16, 4, torch.float16, order))
    torch.library.opcheck(torch.ops.fastvq.lfq_codes_from_indices.default, (indices[:, 0], 4, 0, None, order))
    mask = torch.rand(11) > 0.3
    for dtype in (torch.float32, torch.float64):
        zg = (torch.randn(11, 8, dtype=dtype) * 0.1).requires_grad_(True)
        for g, weight in ((0, None), (4, None), (4, mask), (0, torch.rand(11, dtype=dtype))):
            torch.library.opcheck(torch.ops.fastvq.lfq_entropy.default, (zg, 0.1, g, weight, order))
    zd = torch.randn(11, 8, dtype=torch.float64) * 0.1
    _, _, code_probs = lfq_entropy(zd, 0.1, 4, return_code_probs=True, bit_order=order)
    one = torch.ones((), dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastvq.lfq_entropy_backward.default,
                          (one, -one, torch.randn_like(code_probs), zd, code_probs, 0.1, 4, None, order))
    torch.library.opcheck(torch.ops.fastvq.lfq_entropy_backward.default,
                          (one, None, None, zd, code_probs, 0.1, 4, mask, order))


def test_torch_compile_fullgraph_ops():
    torch._dynamo.reset()

    def fn(z, w):
        codes, indices = lfq_quantize(z, 4, "lsb")
        sample, codebook, code_probs = lfq_entropy(z, 0.1, 4, return_code_probs=True, weight=w)
        return codes, indices, lfq_codes_from_indices(indices, z.shape[-1], 4, bit_order="lsb"), sample - codebook, code_probs

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    z = torch.randn(40, 12)
    w = torch.rand(40) > 0.5
    for n in (40, 13):
        for got, want in zip(compiled(z[:n], w[:n]), fn(z[:n], w[:n])):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_meta_tensors_shape_only():
    codes, indices = lfq_quantize(torch.empty(2, 3, 32, device="meta", dtype=torch.bfloat16), 8)
    assert codes.shape == (2, 3, 32) and codes.dtype == torch.bfloat16 and indices.shape == (2, 3, 4)
    assert indices.dtype == torch.int64
    codes = lfq_codes_from_indices(torch.empty(5, 4, dtype=torch.long, device="meta"), 32, 8, torch.float64)
    assert codes.shape == (5, 32) and codes.dtype == torch.float64
    s, c, p = lfq_entropy(torch.empty(7, 12, device="meta", dtype=torch.float16), 0.1, 4, True)
    assert s.shape == () and s.dtype == torch.float32 and p.shape == (3, 16)


# ---- the CUDA kernels, emulated on the CPU (torch.ops.fastvq_emu.*; see test_cuda_emulated.py) ----------



@pytest.mark.parametrize("layout", [(1, 0), (9, 0), (62, 0), (128, 8), (96, 32)], ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_quantize_and_codes_from_indices(schedule, cuda_ops, layout, dtype):
    D, g = layout
    zbuf = torch.randn(2 * D, 300).to(dtype)
    z = zbuf.t()[:, ::2]  # [300, D] non-contiguous: rows past one 256-thread block
    z[0, 0], z[1, 0], z[2, 0] = 0.0, float("nan"), -0.0
    codes, indices = cuda_ops.lfq_quantize(z, g)
    codes_cpu, indices_cpu = lfq_quantize(z, g)
    assert torch.equal(codes, codes_cpu) and torch.equal(indices, indices_cpu)
    unpacked = cuda_ops.lfq_codes_from_indices(indices, D, g, dtype)
    assert torch.equal(unpacked, codes_cpu)
    e_codes, e_indices = cuda_ops.lfq_quantize(z[:0], g)
    assert e_codes.shape == (0, D) and e_indices.shape == indices[:0].shape


@pytest.mark.parametrize("layout", [(1, 0), (7, 0), (12, 4), (15, 0), (16, 8)], ids=lambda l: "D{}-g{}".format(*l))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order, weighted", [("lsb", False), ("msb", True)])
def test_emulated_entropy_forward_and_backward(schedule, cuda_ops, layout, dtype, order, weighted):
    D, g = layout
    zbuf = (torch.randn(D, 2 * 70) * 0.05).to(dtype)
    z = zbuf.t()[::2]  # [70, D] non-contiguous
    weight = None
    if weighted:
        weight = torch.rand(70) * (torch.rand(70) > 0.3)
        z[weight == 0] = float("nan")  # rows of weight 0 are never read
    sample, codebook, code_probs = cuda_ops.lfq_entropy(z, 0.1, g, weight, order)
    want = lfq_entropy(z, 0.1, g, return_code_probs=True, weight=weight, bit_order=order)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = dict(rtol=1e-12, atol=1e-13) if acc == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for got_t, want_t in zip((sample, codebook, code_probs), want):
        assert got_t.dtype == acc and got_t.shape == want_t.shape
        torch.testing.assert_close(got_t, want_t, **tol)
    gs, gc = torch.tensor(0.3, dtype=acc), torch.tensor(-0.7, dtype=acc)
    gp = torch.randn_like(code_probs)
    for grads in ((gs, gc, gp), (gs, None, None), (None, gc, None), (None, None, gp)):
        grad_z = cuda_ops.lfq_entropy_backward(*grads, z, code_probs, 0.1, g, weight, order)
        grad_z_cpu = torch.ops.fastvq.lfq_entropy_backward(*grads, z, want[2], 0.1, g, weight, order)
        assert grad_z.shape == z.shape and grad_z.dtype == grad_z_cpu.dtype
        torch.testing.assert_close(grad_z, grad_z_cpu, **tol)
