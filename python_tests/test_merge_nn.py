"""The merge references (fastvq.reference.merge) and the token-merging ViT layer (fastvq.nn.merge).

- bipartite_merge_ref against hand-worked examples and an independent pure-Python brute force; the dense
  ToMe baseline (tome_merge_dense_ref + unmerge_dense_ref) against the integer source map over MergeVQ's
  256 -> 36 schedule;
- merge_schedule, proportional_attention_bias;
- MergingViTBlock against a re-implementation on the references, and a 12-block stack end to end: the
  source map traced independently from every step's assign, sizes and recovery consistent with it,
  gradients, torch.compile.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastvq.nn.merge as nn_merge
from fastvq.nn.merge import MergingViTBlock, merge_schedule, mergeable_count, proportional_attention_bias
from fastvq.ops.merge import unmerge
from fastvq.reference import (
    bipartite_merge_ref,
    compose_source_ref,
    tome_merge_dense_ref,
    unmerge_dense_ref,
    unmerge_ref,
)

from conftest import devices

INF = float("inf")


# ---- an independent brute force: plain Python over one image --------------------------------------------

def brute_force_merge(x, metric, sizes, r, protect_first):
    """One image: ``x [T, C]``, ``metric [T, Cm]``, ``sizes [T]`` -> (merged float64 [T - r, C], sizes
    float64 [T - r], assign list), by the letter of the op's contract."""
    T = x.shape[0]
    A, Bset = list(range(0, T, 2)), list(range(1, T, 2))
    m = metric.double().tolist()

    def cosine(i, j):
        dot = sum(p * q for p, q in zip(m[i], m[j]))
        ni = max(math.sqrt(sum(p * p for p in m[i])), 1e-6)
        nj = max(math.sqrt(sum(q * q for q in m[j])), 1e-6)
        c = dot / (ni * nj)
        return -INF if math.isnan(c) else c

    best, score = {}, {}
    for a in A:
        best[a], score[a] = None, -INF
        for b in Bset:  # strictly greater: ties keep the smaller b
            c = cosine(a, b)
            if best[a] is None or c > score[a]:
                best[a], score[a] = b, c
    candidates = [a for a in A if not (protect_first and a == 0)]
    chosen = sorted(candidates, key=lambda a: (-score[a], a))[:r]
    kept = [a for a in A if a not in chosen]
    order = kept + Bset
    slot = {t: i for i, t in enumerate(order)}
    for a in chosen:
        slot[a] = slot[best[a]]
    xs, ss = [], []
    for t in order:
        num, den = x[t].double() * float(sizes[t]), float(sizes[t])
        if t in kept:
            num = x[t].double()
        for a in sorted(chosen):
            if best[a] == t:
                num, den = num + x[a].double() * float(sizes[a]), den + float(sizes[a])
        xs.append(num / den if t not in kept else num)
        ss.append(den)
    C = x.shape[1]
    merged = torch.stack(xs) if xs else torch.zeros(0, C, dtype=torch.float64)
    return merged, torch.tensor(ss, dtype=torch.float64), [slot[t] for t in range(T)]


# ---- bipartite_merge_ref: hand-worked examples -------------------------------------------------------

# T = 5: A = positions 0, 2, 4; B = 1, 3. best: 0 -> 1 (cosine 1), 2 -> 3 (1), 4 -> 1 (3/sqrt(10) = 0.949).
# Scores tie between 0 and 2: the smaller index merges first, unless token 0 is protected.
METRIC5 = [[5.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [3.0, -1.0]]
X5 = [10.0, 20.0, 30.0, 40.0, 50.0]
S5 = [1.0, 2.0, 3.0, 4.0, 5.0]
HAND5 = [  # (protect_first, r, assign, merged values, merged sizes)
    (False, 0, [0, 3, 1, 4, 2], [10, 30, 50, 20, 40], [1, 3, 5, 2, 4]),
    (False, 1, [2, 2, 0, 3, 1], [30, 50, (40 + 10) / 3, 40], [3, 5, 3, 4]),
    (False, 2, [1, 1, 2, 2, 0], [50, (40 + 10) / 3, (160 + 90) / 7], [5, 3, 7]),
    (False, 3, [0, 0, 1, 1, 0], [(40 + 10 + 250) / 8, (160 + 90) / 7], [8, 7]),
    (True, 0, [0, 3, 1, 4, 2], [10, 30, 50, 20, 40], [1, 3, 5, 2, 4]),
    (True, 1, [0, 2, 3, 3, 1], [10, 50, 20, (160 + 90) / 7], [1, 5, 2, 7]),
    (True, 2, [0, 1, 2, 2, 1], [10, (40 + 250) / 7, (160 + 90) / 7], [1, 7, 7]),
]


def _example5(dtype=torch.float32):
    x = torch.tensor(X5, dtype=dtype)[None, :, None] * torch.tensor([1.0, -1.0], dtype=dtype)  # [1, 5, 2]
    return x, torch.tensor([METRIC5], dtype=dtype), torch.tensor([S5], dtype=dtype)


@pytest.mark.parametrize("case", HAND5, ids=lambda c: f"protect{int(c[0])}-r{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merge_ref_hand_worked(case, dtype):
    protect, r, assign, values, msizes = case
    x, metric, sizes = _example5(dtype)
    merged, merged_sizes, got_assign = bipartite_merge_ref(x, metric, sizes, r, protect)
    assert got_assign.dtype == torch.int64 and got_assign.tolist() == [assign]
    assert merged.dtype == dtype and merged.shape == (1, 5 - r, 2)
    want = torch.tensor(values, dtype=torch.float64)
    torch.testing.assert_close(merged[0].double(), torch.stack([want, -want], -1), rtol=1e-6, atol=0)
    assert merged_sizes.dtype == dtype and merged_sizes.tolist() == [[float(s) for s in msizes]]


def test_merge_ref_ties_go_to_the_smaller_b():
    # a0 has cosine 1 with both b1 and b3, a2 cosine 0 with both: every A token picks b1
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    x, sizes = torch.arange(4.0).view(1, 4, 1), torch.ones(1, 4)
    _, _, assign = bipartite_merge_ref(x, metric, sizes, 1)
    assert assign.tolist() == [[1, 1, 0, 2]]  # a0 (score 1) merges into b1; output [x2, b1, b3]
    merged, merged_sizes, assign = bipartite_merge_ref(x, metric, sizes, 2)
    assert assign.tolist() == [[0, 0, 0, 1]]
    assert merged.flatten().tolist() == [(0 + 1 + 2) / 3, 3.0] and merged_sizes.tolist() == [[3.0, 1.0]]


@pytest.mark.parametrize("row, r, assign", [
    (0, 2, [0, 1, 2, 2, 1]),  # a NaN A row scores -inf: it merges last ...
    (0, 3, [0, 0, 1, 1, 0]),  # ... into the first B token
    (3, 1, [2, 2, 0, 3, 1]),  # a NaN B row is nobody's best: a2 (cosine 0 with b1) goes to b1, scores 0
    (3, 2, [1, 1, 0, 2, 1]),
])
def test_merge_ref_nan_metric_rows_sort_last(row, r, assign):
    x, metric, sizes = _example5()
    metric[0, row] = float("nan")
    merged, _, got = bipartite_merge_ref(x, metric, sizes, r)
    assert got.tolist() == [assign] and bool(merged.isfinite().all())


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 16, 17])
@pytest.mark.parametrize("protect_first", [False, True])
def test_merge_ref_matches_brute_force(T, protect_first):
    n, C, Cm = 3, 5, 4
    x, metric, sizes = torch.randn(n, T, C), torch.randn(n, T, Cm), torch.rand(n, T) * 3 + 0.25
    if T >= 4:
        metric[1, 2] = 0.0  # cosine 0 with everything (F.normalize's eps)
        metric[2, 3] = float("nan")
    limit = mergeable_count(T, protect_first)
    for r in sorted({0, 1, limit // 2, limit} & set(range(limit + 1))):
        merged, merged_sizes, assign = bipartite_merge_ref(x, metric, sizes, r, protect_first)
        assert merged.shape == (n, T - r, C) and merged_sizes.shape == (n, T - r) and assign.shape == (n, T)
        for i in range(n):
            want_x, want_s, want_assign = brute_force_merge(x[i], metric[i], sizes[i], r, protect_first)
            assert assign[i].tolist() == want_assign, f"T={T} r={r} image {i}"
            torch.testing.assert_close(merged[i].double(), want_x, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(merged_sizes[i].double(), want_s, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_merge_ref_dtypes_and_noncontiguous(dtype):
    x = torch.randn(2, 11, 6, dtype=torch.float64).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    metric, sizes = torch.randn(2, 11, 4, 2).to(dtype)[..., 0], (torch.rand(2, 22) + 0.5).to(dtype)[:, ::2]
    assert not (x.is_contiguous() or metric.is_contiguous() or sizes.is_contiguous())
    merged, merged_sizes, assign = bipartite_merge_ref(x, metric, sizes, 4)
    assert merged.dtype == dtype and merged_sizes.dtype == dtype
    for i in range(2):
        want_x, want_s, want_assign = brute_force_merge(x[i], metric[i], sizes[i], 4, False)
        assert assign[i].tolist() == want_assign
        torch.testing.assert_close(merged[i], want_x.to(dtype))  # rounded once from float64
        torch.testing.assert_close(merged_sizes[i], want_s.to(dtype))


def test_merge_ref_edge_sizes():
    # T = 1: nothing to merge into; T = 2: one merge, none when the only A token is protected
    x, metric, sizes = torch.randn(2, 1, 3), torch.randn(2, 1, 4), torch.ones(2, 1)
    merged, merged_sizes, assign = bipartite_merge_ref(x, metric, sizes, 0)
    assert torch.equal(merged, x) and torch.equal(merged_sizes, sizes) and assign.tolist() == [[0], [0]]
    x, metric, sizes = torch.randn(2, 2, 3), torch.randn(2, 2, 4), torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    merged, merged_sizes, assign = bipartite_merge_ref(x, metric, sizes, 1)
    assert assign.tolist() == [[0, 0], [0, 0]] and merged_sizes.tolist() == [[4.0], [4.0]]
    torch.testing.assert_close(merged[:, 0], (x * sizes[..., None]).sum(1) / 4)
    assert mergeable_count(2, True) == 0 and bipartite_merge_ref(x, metric, sizes, 0, True)[2].tolist() == [[0, 1]] * 2
    # empty batch
    merged, merged_sizes, assign = bipartite_merge_ref(torch.randn(0, 6, 3), torch.randn(0, 6, 2), torch.ones(0, 6), 3)
    assert merged.shape == (0, 3, 3) and assign.shape == (0, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merge_ref_r0_reorders_and_copies(dtype):
    x, metric, sizes = torch.randn(2, 7, 3, dtype=dtype), torch.randn(2, 7, 4), torch.rand(2, 7, dtype=dtype) + 0.5
    merged, merged_sizes, assign = bipartite_merge_ref(x, metric, sizes, 0)
    perm = [0, 2, 4, 6, 1, 3, 5]  # A then B
    assert torch.equal(merged, x[:, perm]) and torch.equal(merged_sizes, sizes[:, perm])
    assert assign.tolist() == [[0, 4, 1, 5, 2, 6, 3]] * 2
    # with merges, the B tokens nothing merged into are copied bit for bit too
    merged, _, assign = bipartite_merge_ref(x, metric, sizes, 1)
    untouched = [j for j in range(3) if (assign[0] == 3 + j).sum() == 1]
    assert len(untouched) == 2
    assert torch.equal(merged[0, [3 + j for j in untouched]], x[0, [2 * j + 1 for j in untouched]])


def test_merge_ref_gradcheck():
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    metric, sizes = torch.randn(2, 9, 4, dtype=torch.float64), torch.rand(2, 9, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda t: bipartite_merge_ref(t, metric, sizes, 3, True)[0], (x,))


@pytest.mark.parametrize("call, match", [
    (lambda x, m, s: bipartite_merge_ref(x, m, s, 5), r"r must be in \[0, 4\].*got r=5"),
    (lambda x, m, s: bipartite_merge_ref(x, m, s, 4, True), r"r must be in \[0, 3\].*protect_first=True.*got r=4"),
    (lambda x, m, s: bipartite_merge_ref(x, m, s, -1), r"r must be in \[0, 4\].*got r=-1"),
    (lambda x, m, s: bipartite_merge_ref(x, m, s, 1.0), "r must be an int"),
    (lambda x, m, s: bipartite_merge_ref(x[0], m, s, 1), r"x must be \[B, T, C\]"),
    (lambda x, m, s: bipartite_merge_ref(x, m[:, :5], s, 1), r"metric must be \[B, T, Cm\] with B, T = \[2, 7\]"),
    (lambda x, m, s: bipartite_merge_ref(x, m, s[:1], 1), r"sizes must be \[B, T\] = \[2, 7\]"),
    (lambda x, m, s: bipartite_merge_ref(x.long(), m, s, 1), "x must be float32"),
    (lambda x, m, s: bipartite_merge_ref(x, m, s - 1.0, 1), "sizes must be > 0"),
    (lambda x, m, s: tome_merge_dense_ref(x, m, s, None, 5), r"r must be in \[0, 4\]"),
])
def test_merge_ref_errors(call, match):
    x, metric, sizes = torch.randn(2, 7, 3), torch.randn(2, 7, 4), torch.ones(2, 7)
    with pytest.raises(ValueError, match="^(bipartite_merge_ref|tome_merge_dense_ref): " + match):
        call(x, metric, sizes)


# ---- compose_source_ref / unmerge_ref ----------------------------------------------------------------

def test_compose_and_unmerge_ref():
    source = torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    assign = torch.tensor([[2, 2, 0, 3, 1], [0, 1, 2, 2, 1]])
    composed = compose_source_ref(source, assign)
    assert composed.tolist() == [[2, 2, 0, 3, 1], [1, 2, 2, 1, 0]]
    merged = torch.randn(2, 4, 3, requires_grad=True)
    out = unmerge_ref(merged, composed)
    assert out.shape == (2, 5, 3)
    for b in range(2):
        for p in range(5):
            assert torch.equal(out[b, p], merged[b, composed[b, p]])
    out.sum().backward()  # the gradient of a token is the number of positions it stands for
    counts = torch.stack([torch.bincount(c, minlength=4) for c in composed]).float()
    assert torch.equal(merged.grad, counts[..., None].expand(2, 4, 3))


@pytest.mark.parametrize("call, match", [
    (lambda: compose_source_ref(torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.long)),
     "compose_source_ref: source must be int64"),
    (lambda: compose_source_ref(torch.zeros(3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)),
     r"compose_source_ref: source must be \[B, T0\] with B = 2"),
    (lambda: compose_source_ref(torch.full((2, 5), 3), torch.zeros(2, 3, dtype=torch.long)),
     r"compose_source_ref: source values must be token indices in \[0, 3\)"),
    (lambda: compose_source_ref(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 3)),
     r"compose_source_ref: assign must be int64 \[B, T\]"),
    (lambda: unmerge_ref(torch.randn(2, 3), torch.zeros(2, 5, dtype=torch.long)),
     r"unmerge_ref: merged must be \[B, T, C\]"),
    (lambda: unmerge_ref(torch.randn(2, 3, 4), torch.full((2, 5), -1)), r"unmerge_ref: source values must be"),
])
def test_compose_and_unmerge_ref_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- the dense ToMe baseline agrees with the integer source map ---------------------------------------

@pytest.mark.parametrize("T, target, protect_first", [(256, 36, False), (197, 50, True)])
def test_dense_baseline_matches_source_map(T, target, protect_first):
    n, C, Cm = 2, 32, 16
    x = torch.randn(n, T, C)
    sizes = torch.ones(n, T)
    source = torch.arange(T).repeat(n, 1)
    xd, sd, dense = x, sizes, None
    for r in merge_schedule(T, target, 4, protect_first):
        metric = torch.randn(n, x.shape[1], Cm)
        x, sizes, assign = bipartite_merge_ref(x, metric, sizes, r, protect_first)
        source = compose_source_ref(source, assign)
        xd, sd, dense = tome_merge_dense_ref(xd, metric, sd, dense, r, protect_first)
        torch.testing.assert_close(xd, x, rtol=1e-5, atol=1e-5)
        assert torch.equal(sd, sizes)
        assert dense.shape == (n, x.shape[1], T) and torch.equal(dense.sum(1), torch.ones(n, T))  # one-hot columns
        assert torch.equal(dense.argmax(1), source), "the dense source's token of each position"
    assert x.shape[1] == target
    torch.testing.assert_close(unmerge_dense_ref(xd, dense), unmerge_ref(x, source), rtol=1e-5, atol=1e-5)


def test_dense_baseline_r0_is_identity():
    x, metric, sizes = torch.randn(2, 6, 3), torch.randn(2, 6, 4), torch.ones(2, 6)
    merged, merged_sizes, source = tome_merge_dense_ref(x, metric, sizes, None, 0)
    assert merged is x and merged_sizes is sizes and torch.equal(source, torch.eye(6).expand(2, 6, 6))


# ---- merge_schedule --------------------------------------------------------------------------------------

def _check_schedule(schedule, tokens, target, layers, protect_first):
    assert len(schedule) == layers and sum(schedule) == tokens - target
    t = tokens
    for r in schedule:
        assert 0 <= r <= mergeable_count(t, protect_first), f"r={r} infeasible at T={t}: {schedule}"
        t -= r


@pytest.mark.parametrize("target", [144, 36])
@pytest.mark.parametrize("layers", [3, 4, 6, 12])
def test_merge_schedule_mergevq(target, layers):
    schedule = merge_schedule(256, target, layers)
    _check_schedule(schedule, 256, target, layers, False)
    q, e = divmod(256 - target, layers)
    if target == 144:  # the even split is feasible, larger steps first
        assert schedule == [q + 1] * e + [q] * (layers - e)


def test_merge_schedule_examples():
    assert merge_schedule(256, 144, 4) == [28, 28, 28, 28]
    assert merge_schedule(256, 36, 4) == [61, 61, 61, 37]  # 55 each would leave 91 -> 45 at the last layer
    assert merge_schedule(256, 36, 3) == [109, 74, 37]
    # ViT-B/16 ToMe (r = 16, class token): the 12th layer has 21 tokens, of which at most 10 can merge
    assert merge_schedule(197, 11, 12, protect_first=True) == [16] * 11 + [10]
    assert merge_schedule(10, 10, 3) == [0, 0, 0] and merge_schedule(5, 5, 0) == []
    assert merge_schedule(1, 1, 2) == [0, 0] and merge_schedule(2, 1, 1) == [1]


def test_merge_schedule_is_feasible_and_min_max():
    import itertools
    for tokens in range(0, 12):
        for protect_first in (False, True):
            for layers in range(0, 4):
                for target in range(tokens + 1):
                    every = [s for s in itertools.product(range(tokens + 1), repeat=layers)
                             if sum(s) == tokens - target and all(
                                 r <= mergeable_count(tokens - sum(s[:i]), protect_first) for i, r in enumerate(s))]
                    if not every:
                        with pytest.raises(ValueError):
                            merge_schedule(tokens, target, layers, protect_first)
                        continue
                    schedule = merge_schedule(tokens, target, layers, protect_first)
                    _check_schedule(schedule, tokens, target, layers, protect_first)
                    assert max(schedule, default=0) == min(max(s, default=0) for s in every)


@pytest.mark.parametrize("args, match", [
    ((256, 36, 2), "2 layers cannot take 256 tokens down to 36.*64 tokens is the fewest"),
    ((197, 13, 4, True), r"4 layers cannot take 197 tokens down to 13 \(protect_first=True\).*ceil\(T/2\) - 1"),
    ((256, 257, 4), r"target must be in \[0, tokens=256\], got 257"),
    ((256, 36, -1), "tokens and layers must be >= 0"),
    ((4, 3, 0), "0 layers cannot take 4 tokens down to 3"),
])
def test_merge_schedule_errors(args, match):
    with pytest.raises(ValueError, match="^merge_schedule: " + match):
        merge_schedule(*args)


# ---- proportional_attention_bias --------------------------------------------------------------------------

def test_proportional_attention_bias_in_sdpa():
    B, H, T, d = 2, 3, 7, 8
    sizes = torch.tensor([[1.0, 2.0, 3.0, 1.0, 5.0, 1.0, 4.0], [1.0] * 7])
    bias = proportional_attention_bias(sizes)
    assert bias.shape == (B, 1, 1, T) and bias.dtype == torch.float32
    assert torch.equal(bias[:, 0, 0], sizes.log()) and torch.equal(bias[1], torch.zeros(1, 1, T))
    assert proportional_attention_bias(sizes, torch.bfloat16).dtype == torch.bfloat16
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d) + sizes.log()[:, None, None, :]
    torch.testing.assert_close(got, logits.softmax(-1) @ v)
    # a key of size s weighs as s copies of itself
    dup = [0, 1, 1, 2, 2, 2, 3, 4, 4, 4, 4, 4, 5, 6, 6, 6, 6]
    expanded = F.scaled_dot_product_attention(q[:1], k[:1, :, dup], v[:1, :, dup])
    torch.testing.assert_close(got[:1], expanded)
    with pytest.raises(ValueError, match=r"proportional_attention_bias: sizes must be \[B, T\]"):
        proportional_attention_bias(sizes[0])


# ---- MergingViTBlock ------------------------------------------------------------------------------------

def block_ref(block, x, sizes, source, r):
    """MergingViTBlock's forward written out on the references (explicit softmax attention)."""
    B, T, C = x.shape
    H, d = block.num_heads, block.head_dim
    h = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    q, k, v = F.linear(h, block.qkv.weight, block.qkv.bias).view(B, T, 3, H, d).unbind(2)  # [B, T, H, d] each
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + sizes.log()[:, None, None, :]
    attn = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(B, T, C)
    x = x + block.proj(attn)
    if r > 0:
        x, sizes, assign = bipartite_merge_ref(x, k.mean(2), sizes, r, block.protect_first)
        source = compose_source_ref(source, assign)
    h = F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    return x + block.mlp[2](F.gelu(block.mlp[0](h))), sizes, source


@pytest.mark.parametrize("protect_first", [False, True])
@pytest.mark.parametrize("r", [0, 5, 16])
def test_block_matches_reference(protect_first, r):
    block = MergingViTBlock(48, 4, r=r, protect_first=protect_first).double()
    x = torch.randn(2, 33, 48, dtype=torch.float64)
    sizes = torch.randint(1, 5, (2, 33)).double()
    source = torch.randint(0, 33, (2, 90))
    out, out_sizes, out_source = block(x, sizes, source)
    want, want_sizes, want_source = block_ref(block, x, sizes, source, r)
    assert out.shape == (2, 33 - r, 48)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(out_sizes, want_sizes) and torch.equal(out_source, want_source)


def test_block_defaults_and_r_override():
    block = MergingViTBlock(32, 2, r=6)
    x = torch.randn(3, 20, 32)
    out, sizes, source = block(x)
    assert out.shape == (3, 14, 32) and sizes.dtype == torch.float32 and source.shape == (3, 20)
    assert torch.equal(torch.stack([torch.bincount(s, minlength=14) for s in source]).float(), sizes)
    out0, sizes0, source0 = block(x, r=0)  # no merge: no reordering either
    want, _, _ = block_ref(block, x, torch.ones(3, 20), torch.arange(20).repeat(3, 1), 0)
    torch.testing.assert_close(out0, want)
    assert torch.equal(sizes0, torch.ones(3, 20)) and torch.equal(source0, torch.arange(20).repeat(3, 1))
    assert block(x, r=10)[0].shape == (3, 10, 32)
    with pytest.raises(ValueError, match="MergingViTBlock: dim=30 must be a positive multiple of num_heads=4"):
        MergingViTBlock(30, 4)


STACKS = {  # name: (tokens, schedule, protect_first)
    "vitb16-tome": (197, [16] * 11 + [10], True),
    "mergevq-256-36": (256, merge_schedule(256, 36, 12), False),
    "mergevq-256-144": (256, merge_schedule(256, 144, 12), False),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", list(STACKS))
def test_stack_end_to_end_source_recovery(name, device, monkeypatch):
    T, schedule, protect_first = STACKS[name]
    B, C = 2, 64
    blocks = torch.nn.ModuleList(MergingViTBlock(C, 4, r=r, protect_first=protect_first) for r in schedule).to(device)
    assigns = []

    def recording_merge(*args):
        out = bipartite_merge(*args)
        assigns.append(out[2].cpu())
        return out

    bipartite_merge = nn_merge.bipartite_merge
    monkeypatch.setattr(nn_merge, "bipartite_merge", recording_merge)

    x0 = torch.randn(B, T, C, device=device, requires_grad=True)
    x, sizes, source = x0, None, None
    for block in blocks:
        x, sizes, source = block(x, sizes, source)
    assert len(assigns) == sum(r > 0 for r in schedule) and x.shape == (B, T - sum(schedule), C)

    # trace every original position through each step's assign, in plain Python
    owner = [list(range(T)) for _ in range(B)]
    t = T
    for r, assign in zip([r for r in schedule if r > 0], assigns):
        assert assign.shape == (B, t)
        for b in range(B):
            a = assign[b].tolist()
            keep = (t + 1) // 2 - r
            assert a[1::2] == list(range(keep, t - r)), "B tokens come last, in order"
            unmerged = [s for s in a[0::2] if s < keep]
            assert unmerged == list(range(keep)), "unmerged A tokens first, in order"
            if protect_first:
                assert a[0] == 0
            owner[b] = [a[o] for o in owner[b]]
        t -= r
    assert torch.equal(source.cpu(), torch.tensor(owner)), "source map vs the traced assigns"
    # each token's size is the number of original positions it absorbed; a class token absorbed nothing
    counts = torch.stack([torch.bincount(s, minlength=x.shape[1]) for s in source.cpu()])
    assert torch.equal(sizes.cpu(), counts.float())
    if protect_first:
        assert (source[:, 0] == 0).all() and (counts[:, 0] == 1).all()
    # recovery: every position gets the row of the token that absorbed it
    grid = unmerge(x, source)
    assert grid.shape == (B, T, C)
    assert torch.equal(grid, unmerge_ref(x, source))
    for b in range(B):
        assert torch.equal(grid[b], x[b, source[b]])
    # gradients reach the input and every parameter
    grid.square().mean().backward()
    assert x0.grad is not None and bool(x0.grad.isfinite().all()) and x0.grad.abs().sum() > 0
    for pname, p in blocks.named_parameters():
        assert p.grad is not None and bool(p.grad.isfinite().all()), pname
        assert p.grad.abs().sum() > 0, pname


def test_block_torch_compile_fullgraph():
    torch._dynamo.reset()
    block = MergingViTBlock(32, 2, r=7, protect_first=True)
    x = torch.randn(2, 25, 32)
    sizes = torch.randint(1, 4, (2, 25)).float()
    source = torch.randint(0, 25, (2, 60))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out, out_sizes, out_source = compiled(x, sizes, source)
    want, want_sizes, want_source = block(x, sizes, source)
    torch.testing.assert_close(out, want)
    assert torch.equal(out_sizes, want_sizes) and torch.equal(out_source, want_source)
    xg = x.clone().requires_grad_()
    unmerge(compiled(xg, sizes, source)[0], out_source).sum().backward()
    assert xg.grad is not None and bool(xg.grad.isfinite().all())
