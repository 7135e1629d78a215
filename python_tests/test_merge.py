"""Token-merging ops (bipartite_merge, compose_source, unmerge, unmerge_backward) against the pure-PyTorch
reference (fastvq/reference/merge.py): every dtype, edge sizes (T = 0, 1, 2, odd), r = 0 and r = max,
protect_first, ties, non-finite metrics, strided inputs; bit-identical repeats and ISA paths; gradients,
opcheck, torch.compile, every error; the CUDA kernels emulated on the CPU (torch.ops.fastvq_emu.*)."""

import pytest
import torch

import fastvq
from fastvq.ops import bipartite_merge, bipartite_merge_backward, compose_source, unmerge, unmerge_backward
from fastvq.reference import bipartite_merge_ref, compose_source_ref, unmerge_ref
from fastvq.reference.merge import mergeable_count

from conftest import needs_emu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 1e-3),
       torch.bfloat16: (1.6e-2, 1e-2)}
# (B, T, C, Cm): T = 0, 1, 2, odd, next to a vector width, ViT-B/16 with a class token, past the 32-column pad
SHAPES = [(1, 0, 3, 4), (2, 1, 3, 4), (2, 2, 5, 3), (3, 7, 9, 8), (2, 33, 17, 16), (2, 65, 8, 33), (1, 197, 24, 64)]


def make(B, T, C, Cm, dtype=torch.float32, mdtype=None, sizes_dtype=None):
    x = torch.randn(B, T, C, dtype=torch.float64).to(dtype)
    metric = torch.randn(B, T, Cm, dtype=torch.float64).to(mdtype or dtype)
    sizes = torch.randint(1, 5, (B, T)).to(sizes_dtype or dtype)
    return x, metric, sizes


def r_values(T, protect_first):
    m = mergeable_count(T, protect_first)
    return sorted({0, min(1, m), m // 2, m})


def assert_merge_matches(out, ref, dtype):
    merged, sizes_out, assign = out
    rmerged, rsizes, rassign = ref
    assert torch.equal(assign, rassign)
    assert merged.dtype == rmerged.dtype and sizes_out.dtype == rsizes.dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(merged, rmerged, rtol=rtol, atol=atol)
    torch.testing.assert_close(sizes_out, rsizes, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-C{}-Cm{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("protect_first", [False, True], ids=["all", "protect"])
def test_bipartite_merge_matches_reference(shape, dtype, protect_first):
    x, metric, sizes = make(*shape, dtype=dtype)
    for r in r_values(shape[1], protect_first):
        out = bipartite_merge(x, metric, sizes, r, protect_first)
        assert out[0].shape == (shape[0], shape[1] - r, shape[2])
        assert_merge_matches(out, bipartite_merge_ref(x, metric, sizes, r, protect_first), dtype)


def test_bipartite_merge_every_isa_is_bitwise_equal(cpu_isa):
    x, metric, sizes = make(2, 131, 20, 40)
    out = bipartite_merge(x, metric, sizes, 50)
    assert_merge_matches(out, bipartite_merge_ref(x, metric, sizes, 50), torch.float32)
    prev = fastvq.set_cpu_isa("auto")
    try:
        auto = bipartite_merge(x, metric, sizes, 50)
    finally:
        fastvq.set_cpu_isa(prev)
    for a, b in zip(out, auto):
        assert torch.equal(a, b)


def test_batch_and_single_image_paths_agree():
    # many images: one image per task; few: an image's rows split over tasks. Same bits either way.
    x, metric, sizes = make(8, 150, 12, 24)
    batched = bipartite_merge(x, metric, sizes, 40)
    for b in (0, 5):
        single = bipartite_merge(x[b:b + 1], metric[b:b + 1], sizes[b:b + 1], 40)
        assert all(torch.equal(u[b:b + 1], v) for u, v in zip(batched, single))


def test_mixed_dtypes_and_strided_inputs():
    B, T, C, Cm = 3, 40, 12, 10
    xbuf = torch.randn(T, B, 2 * C).to(torch.bfloat16)
    x = xbuf.transpose(0, 1)[..., ::2]  # [B, T, C], non-contiguous
    metric = torch.randn(B, Cm, T).transpose(1, 2)  # float32, strided
    sizes = torch.randint(1, 9, (T, B)).double().t()  # float64, transposed
    assert not (x.is_contiguous() or metric.is_contiguous() or sizes.is_contiguous())
    out = bipartite_merge(x, metric, sizes, 15, True)
    ref = bipartite_merge_ref(x, metric, sizes, 15, True)
    assert torch.equal(out[2], ref[2]) and out[1].dtype == torch.float64
    torch.testing.assert_close(out[0], ref[0], rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
    contiguous = bipartite_merge(x.contiguous(), metric.contiguous(), sizes.contiguous(), 15, True)
    for a, b in zip(out, contiguous):
        assert torch.equal(a, b)


def test_metric_view_of_x_is_read_in_place():
    # float32 metric rows with unit channel stride are read without a copy: a view of x's first channels,
    # an expanded batch, and a sliced token axis must give the contiguous copy's result
    x, _, sizes = make(3, 31, 40, 1)
    views = [x[..., :16], x[:1, :, 8:24].expand(3, 31, 16), x.repeat(1, 2, 1)[:, ::2, :16]]
    for metric in views:
        out = bipartite_merge(x, metric, sizes, 9)
        again = bipartite_merge(x, metric.contiguous(), sizes, 9)
        assert all(torch.equal(a, b) for a, b in zip(out, again))
        assert torch.equal(out[2], bipartite_merge_ref(x, metric, sizes, 9)[2])


def test_hand_worked_example():
    # T=5: A = {0, 2, 4}, B = {1, 3}. Token 2 is a copy of 3 (cos 1), token 4 is close to 1, token 0 is far.
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0.1]]])
    x = torch.arange(5.0).view(1, 5, 1) * torch.tensor([1.0, 10.0])  # [1, 5, 2]
    sizes = torch.tensor([[1.0, 2, 1, 3, 1]])
    merged, msizes, assign = bipartite_merge(x, metric, sizes, 2)
    # unmerged A: token 0 (slot 0); then B tokens 1 (slot 1) and 3 (slot 2); 4 -> 1, 2 -> 3
    assert assign.tolist() == [[0, 1, 2, 2, 1]]
    assert msizes.tolist() == [[1.0, 3.0, 4.0]]
    torch.testing.assert_close(merged[0, :, 0], torch.tensor([0.0, (1 * 2 + 4 * 1) / 3, (3 * 3 + 2 * 1) / 4]))
    # protect_first keeps token 0 even when it is the best match
    metric2 = metric.clone()
    metric2[0, 0] = metric2[0, 3]
    _, _, assign2 = bipartite_merge(x, metric2, sizes, 2, protect_first=True)
    assert assign2[0, 0] == 0 and assign2[0, 2] == assign2[0, 3] and assign2[0, 4] == assign2[0, 1]
    _, _, assign3 = bipartite_merge(x, metric2, sizes, 1)
    assert assign3[0, 0] == assign3[0, 3]  # without protection, the tie between tokens 0 and 2 -> token 0


def test_ties_go_to_smaller_index():
    B, T, Cm = 1, 12, 6
    metric = torch.randn(B, T, Cm, dtype=torch.float64)
    metric[0, 3] = metric[0, 7] = metric[0, 11] = metric[0, 1]  # B tokens j=0,1,3,5 identical
    metric[0, 4] = metric[0, 8] = metric[0, 1] * 2.0  # A tokens i=2,4 point the same way: scores tie at 1
    for dtype in (torch.float64, torch.float32):
        m = metric.to(dtype)
        x, _, sizes = make(B, T, 4, Cm)
        _, _, assign = bipartite_merge(x, m, sizes, 1)
        # the best partner of i=2 is the first of the identical B tokens (position 1); of the tied A tokens,
        # the smaller (position 4) merges
        assert assign[0, 4] == assign[0, 1] and assign[0, 8] != assign[0, 1]
        assert torch.equal(assign, bipartite_merge_ref(x, m, sizes, 1)[2])


def test_non_finite_metric_rows_rank_last():
    x, metric, sizes = make(2, 11, 3, 5, dtype=torch.float64)
    metric[0, 2, 1] = float("nan")  # an A row: its score is -inf, merged last
    metric[1, 3, 0] = float("inf")  # a B row: never the best partner of a finite A row
    for r in range(mergeable_count(11) + 1):
        out = bipartite_merge(x, metric, sizes, r)
        assert_merge_matches(out, bipartite_merge_ref(x, metric, sizes, r), torch.float64)
        if r < mergeable_count(11):
            assert out[2][0, 2] < 6 - r  # token 2 stays unmerged until every other A token merged
    _, _, assign = bipartite_merge(x, metric, sizes, 5)
    assert not (assign[1, 0::2] == assign[1, 3]).any()


def test_untouched_tokens_are_bit_exact_copies():
    x, metric, sizes = make(2, 50, 16, 8)
    sizes = sizes * 3.7  # x * s / s would round
    merged, msizes, assign = bipartite_merge(x, metric, sizes, 10)
    counts = torch.zeros(2, 40, dtype=torch.long).scatter_add_(1, assign, torch.ones_like(assign))
    singles = counts == 1
    owners = torch.full((2, 40), -1, dtype=torch.long).scatter_(1, assign, torch.arange(50).expand(2, 50))
    for b in range(2):
        for slot in torch.nonzero(singles[b]).flatten().tolist():
            assert torch.equal(merged[b, slot], x[b, owners[b, slot]])
            assert msizes[b, slot] == sizes[b, owners[b, slot]]


def test_repeated_runs_are_bit_identical():
    x, metric, sizes = make(4, 256, 64, 32)
    first = bipartite_merge(x, metric, sizes, 64)
    src = compose_source(torch.arange(256).expand(4, 256), first[2])
    g = torch.randn(4, 256, 64)
    gb = unmerge_backward(g, src, 192)
    for _ in range(3):
        again = bipartite_merge(x, metric, sizes, 64)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert torch.equal(unmerge_backward(g, src, 192), gb)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_source_chain_and_unmerge_match_reference(dtype):
    B, T, C = 3, 64, 7
    x, _, sizes = make(B, T, C, 4, dtype=dtype)
    source = torch.arange(T).expand(B, T)
    ref_source = source
    cur, cur_sizes = x, sizes
    for r in (16, 12, 10, 6):
        metric = torch.randn(B, cur.shape[1], 5)
        cur, cur_sizes, assign = bipartite_merge(cur, metric, cur_sizes, r)
        source = compose_source(source, assign)
        ref_source = compose_source_ref(ref_source, assign)
        assert torch.equal(source, ref_source)
    assert cur.shape[1] == T - 44 and int(source.max()) == T - 45
    full = unmerge(cur, source)
    assert torch.equal(full, unmerge_ref(cur, source))
    # every original position reads the token that absorbed it; total size is conserved
    torch.testing.assert_close(cur_sizes.double().sum(1), sizes.double().sum(1))
    # strided source / merged
    src_nc = source.t().contiguous().t()
    cur_nc = cur.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(unmerge(cur_nc, src_nc), full)
    assert torch.equal(compose_source(src_nc, assign), compose_source(source, assign))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unmerge_backward_is_an_ordered_segmented_sum(dtype):
    B, T0, T, C = 2, 70, 9, 300  # C past the 256-channel task size
    source = torch.randint(0, T, (B, T0))
    source[:, :T] = torch.arange(T)  # every token present ...
    source[1, :T] = 0  # ... except in image 1, where tokens 1..8 may be missing (zero rows)
    grad = torch.randn(B, T0, C, dtype=torch.float64).to(dtype)
    out = unmerge_backward(grad, source, T)
    ref = torch.zeros(B, T, C, dtype=torch.float64).index_add_(1, torch.tensor(0), torch.zeros(B, 1, C, dtype=torch.float64))
    for b in range(B):
        ref[b].index_add_(0, source[b], grad[b].double())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref.to(dtype), rtol=rtol, atol=atol * 4)
    # fp32 accumulation in ascending p, from 0: exactly a sequential sum
    if dtype == torch.float32:
        seq = torch.zeros(B, T, C)
        for p in range(T0):
            for b in range(B):
                seq[b, source[b, p]] += grad[b, p]
        assert torch.equal(out, seq)
    assert torch.equal(unmerge_backward(grad.transpose(1, 2).contiguous().transpose(1, 2), source, T), out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bipartite_merge_backward_is_a_scaled_gather(dtype):
    x, metric, sizes = make(3, 21, 10, 4, dtype=dtype, sizes_dtype=torch.float32)
    merged, msizes, assign = bipartite_merge(x, metric, sizes, 7, True)
    g = torch.randn(merged.shape, dtype=torch.float64).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    out = bipartite_merge_backward(g, sizes, msizes, assign)
    w = sizes.double() / msizes.double().gather(1, assign)
    ref = g.double().gather(1, assign.unsqueeze(-1).expand(-1, -1, 10)) * w.unsqueeze(-1)
    rtol, atol = TOL[dtype]
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref.to(dtype), rtol=rtol, atol=atol)
    if dtype == torch.float32:  # the weight is s / S in fp32, then one product
        exact = g.gather(1, assign.unsqueeze(-1).expand(-1, -1, 10)) * (sizes / msizes.gather(1, assign)).unsqueeze(-1)
        assert torch.equal(out, exact)


def test_empty_inputs():
    for B, T, C, Cm in [(0, 5, 3, 2), (2, 0, 3, 2), (2, 6, 0, 2), (2, 6, 3, 0)]:
        x, metric, sizes = make(B, T, C, Cm)
        r = min(1, mergeable_count(T))
        out = bipartite_merge(x, metric, sizes, r)
        ref = bipartite_merge_ref(torch.randn(B, T, 1), metric, sizes, r)  # (the reference's C >= 1)
        assert out[0].shape == (B, T - r, C) and torch.equal(out[2], ref[2])
    src = torch.zeros(2, 0, dtype=torch.long)
    assert compose_source(src, torch.zeros(2, 3, dtype=torch.long)).shape == (2, 0)
    assert unmerge(torch.randn(2, 3, 4), src).shape == (2, 0, 4)
    assert torch.equal(unmerge_backward(torch.randn(2, 0, 4), src, 3), torch.zeros(2, 3, 4))


def test_gradients():
    x, metric, sizes = make(2, 13, 4, 3, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: bipartite_merge(t, metric, sizes, 5, True)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda t: bipartite_merge(t, metric, sizes, 5, True)[0], (x,))
    merged = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    source = torch.randint(0, 5, (2, 11))
    assert torch.autograd.gradcheck(lambda m: unmerge(m, source), (merged,))
    assert torch.autograd.gradgradcheck(lambda m: unmerge(m, source), (merged,))
    g = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unmerge_backward(t, source, 5), (g,))
    # the weighted-mean gradient in float32 against the reference's autograd
    x32, metric32, sizes32 = make(2, 30, 6, 4)
    x32.requires_grad_(True)
    w = torch.randn(2, 20, 6)
    (gx,) = torch.autograd.grad((bipartite_merge(x32, metric32, sizes32, 10)[0] * w).sum(), x32)
    (gref,) = torch.autograd.grad((bipartite_merge_ref(x32, metric32, sizes32, 10)[0] * w).sum(), x32)
    torch.testing.assert_close(gx, gref)


def test_opcheck():
    x, metric, sizes = make(2, 9, 4, 3)
    torch.library.opcheck(torch.ops.fastvq.bipartite_merge.default, (x, metric, sizes, 3, False))
    torch.library.opcheck(torch.ops.fastvq.bipartite_merge.default, (x.double(), metric.half(), sizes, 4, True))
    _, _, assign = bipartite_merge(x, metric, sizes, 3)
    source = torch.arange(9).expand(2, 9).contiguous()
    torch.library.opcheck(torch.ops.fastvq.compose_source.default, (source, assign))
    merged = torch.randn(2, 6, 4)
    src = compose_source(source, assign)
    torch.library.opcheck(torch.ops.fastvq.unmerge.default, (merged, src))
    torch.library.opcheck(torch.ops.fastvq.unmerge_backward.default, (torch.randn(2, 9, 4), src, 6))
    _, msizes, _ = bipartite_merge(x, metric, sizes, 3)
    torch.library.opcheck(torch.ops.fastvq.bipartite_merge_backward.default, (torch.randn(2, 6, 4), sizes, msizes, assign))


def test_compile_fullgraph():
    def merge_and_recover(x, metric, sizes, source):
        merged, sizes, assign = bipartite_merge(x, metric, sizes, 8, True)
        source = compose_source(source, assign)
        return unmerge(merged * 2, source), sizes

    x, metric, sizes = make(2, 25, 6, 5)
    source = torch.arange(25).expand(2, 25).contiguous()
    compiled = torch.compile(merge_and_recover, fullgraph=True, backend="eager")
    a, b = compiled(x, metric, sizes, source)
    ea, eb = merge_and_recover(x, metric, sizes, source)
    assert torch.equal(a, ea) and torch.equal(b, eb)


def test_compile_backward_ops_fullgraph():
    x, metric, sizes = make(2, 25, 6, 5)
    merged, msizes, assign = bipartite_merge(x, metric, sizes, 8, True)
    source = compose_source(torch.arange(25).expand(2, 25).contiguous(), assign)
    g_merged, g_full = torch.randn_like(merged), torch.randn(2, 25, 6)

    def backward_ops(g_merged, g_full):
        return bipartite_merge_backward(g_merged, sizes, msizes, assign), unmerge_backward(g_full, source, 17)

    compiled = torch.compile(backward_ops, fullgraph=True, backend="eager")
    for a, b in zip(compiled(g_merged, g_full), backward_ops(g_merged, g_full)):
        assert torch.equal(a, b)
    # a compiled forward differentiates through the registered autograd (traced by aot_eager)
    xg = x.clone().requires_grad_(True)
    loss = torch.compile(lambda t: unmerge(bipartite_merge(t, metric, sizes, 8, True)[0], source).square().sum(),
                         fullgraph=True, backend="aot_eager")(xg)
    (grad,) = torch.autograd.grad(loss, xg)
    (grad_eager,) = torch.autograd.grad(unmerge(bipartite_merge(xg, metric, sizes, 8, True)[0], source).square().sum(), xg)
    assert torch.equal(grad, grad_eager)


def test_meta_tensors():
    x = torch.empty(2, 9, 4, device="meta")
    merged, msizes, assign = bipartite_merge(x, torch.empty(2, 9, 3, device="meta"),
                                             torch.empty(2, 9, device="meta", dtype=torch.float64), 4, True)
    assert merged.shape == (2, 5, 4) and msizes.dtype == torch.float64 and assign.dtype == torch.int64


def test_errors():
    x, metric, sizes = make(2, 9, 4, 3)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: r must be in \[0, 5\].*got 6"):
        bipartite_merge(x, metric, sizes, 6)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: r must be in \[0, 4\].*protect_first.*got 5"):
        bipartite_merge(x, metric, sizes, 5, True)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: r must be in \[0, 5\].*got -1"):
        bipartite_merge(x, metric, sizes, -1)
    x1, m1, s1 = make(2, 1, 4, 3)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: r must be in \[0, 0\].*T=1"):
        bipartite_merge(x1, m1, s1, 1)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: x must be \[B, T, C\]"):
        bipartite_merge(x[0], metric, sizes, 1)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: metric must be \[B, T, Cm\] with B, T of x"):
        bipartite_merge(x, metric[:, :8], sizes, 1)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: sizes must be \[B, T\] with B, T of x"):
        bipartite_merge(x, metric, sizes[:1], 1)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: metric must be float32, float16, bfloat16 or float64, got Long"):
        bipartite_merge(x, metric.long(), sizes, 1)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: sizes must be > 0, got sizes\[1, 4\] = 0"):
        s = sizes.clone()
        s[1, 4] = 0
        bipartite_merge(x, metric, s, 1)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: sizes must be > 0, got sizes\[0, 2\] = nan"):
        s = sizes.clone()
        s[0, 2] = float("nan")
        bipartite_merge(x, metric, s, 1)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: metric must be on x's device"):
        bipartite_merge(x, metric.to("meta"), sizes, 1)
    source = torch.arange(9).expand(2, 9).contiguous()
    assign = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"compose_source: source\[0, 8\] = 8 is out of range \[0, 8\)"):
        compose_source(source, assign)
    with pytest.raises(RuntimeError, match=r"compose_source: source must be int64, got Int"):
        compose_source(source.int(), assign)
    with pytest.raises(RuntimeError, match=r"compose_source: source must be \[B, T0\] with B=2"):
        compose_source(source[:1], assign)
    with pytest.raises(RuntimeError, match=r"unmerge: source\[1, 3\] = -1 is out of range \[0, 5\)"):
        bad = torch.zeros(2, 9, dtype=torch.long)
        bad[1, 3] = -1
        unmerge(torch.randn(2, 5, 3), bad)
    with pytest.raises(RuntimeError, match=r"unmerge: merged must be float32"):
        unmerge(torch.zeros(2, 5, 3, dtype=torch.long), source)
    with pytest.raises(RuntimeError, match=r"unmerge_backward: source\[0, 8\] = 8 is out of range \[0, 8\)"):
        unmerge_backward(torch.randn(2, 9, 3), source, 8)
    with pytest.raises(RuntimeError, match=r"unmerge_backward: source must be \[B, T0\] with T0=9"):
        unmerge_backward(torch.randn(2, 9, 3), source[:, :5], 9)
    _, msizes, assign = bipartite_merge(x, metric, sizes, 3)
    bad_assign = assign.clone()
    bad_assign[1, 2] = 6
    with pytest.raises(RuntimeError, match=r"bipartite_merge_backward: assign\[1, 2\] = 6 is out of range \[0, 6\)"):
        bipartite_merge_backward(torch.randn(2, 6, 4), sizes, msizes, bad_assign)
    with pytest.raises(RuntimeError, match=r"bipartite_merge_backward: merged_sizes must be a float \[B, T'\] tensor"):
        bipartite_merge_backward(torch.randn(2, 6, 4), sizes, msizes[:, :5], assign)
    with pytest.raises(RuntimeError, match=r"bipartite_merge_backward: sizes must be a float \[B, T\] tensor like assign"):
        bipartite_merge_backward(torch.randn(2, 6, 4), sizes[:, :8], msizes, assign)


# ---- the CUDA kernels, emulated on the CPU ------------------------------------------------------------



# T = 1, 2, odd; more A tokens than one match block (128) and one score tile (256); B past one select block
EMU_SHAPES = [(2, 1, 3, 4), (3, 2, 5, 3), (2, 9, 4, 5), (2, 75, 6, 33), (1, 600, 3, 4)]


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "B{}-T{}-C{}-Cm{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bipartite_merge_emulated(schedule, cuda_ops, shape, dtype):
    x, metric, sizes = make(*shape, dtype=dtype)
    for protect_first in (False, True):
        for r in r_values(shape[1], protect_first):
            out = cuda_ops.bipartite_merge(x, metric, sizes, r, protect_first)
            cpu = bipartite_merge(x, metric, sizes, r, protect_first)
            for a, b in zip(out, cpu):
                assert torch.equal(a, b), (protect_first, r)


def test_merge_ops_emulated_edge_inputs(schedule, cuda_ops):
    # ties, NaN rows, strided mixed dtypes, channels past one block (128), metric rows past the 64-row tile
    B, T, C, Cm = 2, 41, 130, 600
    x = torch.randn(T, B, C).transpose(0, 1)
    metric = torch.randn(B, T, Cm).half()
    metric[0, 5] = metric[0, 7] = metric[0, 9]
    metric[1, 4, 3] = float("nan")
    sizes = torch.randint(1, 4, (B, T)).double()
    out = cuda_ops.bipartite_merge(x, metric, sizes, 14, True)
    cpu = bipartite_merge(x, metric, sizes, 14, True)
    assert all(torch.equal(a, b) for a, b in zip(out, cpu))
    assert torch.equal(out[2], bipartite_merge_ref(x, metric, sizes, 14, True)[2])
    source = torch.randint(0, T, (T, B)).t()  # strided source
    merged, assign = out[0], out[2]
    assert torch.equal(cuda_ops.compose_source(source, assign), compose_source(source, assign))
    src = compose_source(source, assign)
    assert torch.equal(cuda_ops.unmerge(merged, src), unmerge(merged, src))
    for dtype in DTYPES:
        g = torch.randn(B, T, C).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(cuda_ops.unmerge_backward(g, src, T - 14), unmerge_backward(g, src, T - 14))
    msizes = out[1]
    for dtype in DTYPES:
        g = torch.randn(B, T - 14, C).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(cuda_ops.bipartite_merge_backward(g, sizes, msizes, assign),
                           bipartite_merge_backward(g, sizes, msizes, assign))
    e = cuda_ops.unmerge_backward(torch.randn(B, 0, 3), torch.zeros(B, 0, dtype=torch.long), 4)
    assert torch.equal(e, torch.zeros(B, 4, 3))


def test_merge_ops_emulated_host_checks(cuda_ops):
    # host-side checks are shared with the CPU op (bad values: test_cuda_errors.py)
    x, metric, sizes = make(2, 9, 4, 3)
    with pytest.raises(RuntimeError, match=r"bipartite_merge: r must be in \[0, 5\]"):
        cuda_ops.bipartite_merge(x, metric, sizes, 9)
