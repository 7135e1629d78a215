"""fastvq.nn.VectorQuantize: search, outputs, masks, layouts, codebook learning (EMA, k-means init, dead
codes), gradient accumulation, DDP, the fp32 island and state dicts."""
import pytest
import torch
import torch.nn.functional as F

import fastvq
from fastvq.nn import VectorQuantize
from fastvq.nn._quantizer import rotation_trick

from ddp import run_ddp


def brute_indices(z, codebooks, cosine):
    """z [N, C, d], codebooks [C, K, d] -> (indices [N, C], gap between the best and second-best distance)."""
    z, cb = z.double(), codebooks.double()
    if cosine:
        dist = -torch.einsum("ncd,ckd->nck", F.normalize(z, dim=-1), F.normalize(cb, dim=-1))
    else:
        dist = (z[:, :, None] - cb[None]).square().sum(-1)
    two = dist.topk(2, dim=-1, largest=False)
    return two.indices[..., 0], two.values[..., 1] - two.values[..., 0]


def clustered(n, dim, centers=8, seed=0, scale=0.05):
    """n points near `centers` random centres (well separated codes, no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, dim, generator=g)
    return c[torch.randint(centers, (n,), generator=g)] + scale * torch.randn(n, dim, generator=g)


CONFIGS = {
    "l2": dict(dim=16, codebook_size=32),
    "cosine": dict(dim=16, codebook_size=32, use_cosine_sim=True),
    "shared-heads": dict(dim=16, codebook_size=32, heads=2, codebook_dim=8),
    "separate-heads-cosine": dict(dim=16, codebook_size=32, heads=4, codebook_dim=4, separate_codebook_per_head=True,
                                  use_cosine_sim=True),
    "projected": dict(dim=16, codebook_size=32, codebook_dim=6, heads=2, separate_codebook_per_head=True),
    "gemm-d64": dict(dim=64, codebook_size=40),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_search_outputs_and_indices_roundtrip(name):
    kw = CONFIGS[name]
    torch.manual_seed(1)
    vq = VectorQuantize(**kw).eval()
    x = torch.randn(3, 7, kw["dim"])
    quantized, indices, loss = vq(x)
    H, d = vq.heads, vq.codebook_dim
    assert indices.dtype == torch.int64 and indices.shape == ((3, 7, H) if H > 1 else (3, 7))
    assert quantized.shape == x.shape and quantized.dtype == x.dtype and loss.item() == 0.0
    # the nearest code, against a float64 brute force, wherever the choice is clear
    z = vq.project_in(x).reshape(-1, H, d)
    z = z if vq.separate_codebook_per_head else z.reshape(-1, 1, d)
    want, gap = brute_indices(z, vq.embed.detach(), vq.use_cosine_sim)
    got = indices.reshape(want.shape)
    clear = gap > 1e-4
    assert clear.float().mean() > 0.9 and torch.equal(got[clear], want[clear])
    # eval output = the codes (through project_out) = get_output_from_indices
    torch.testing.assert_close(quantized, vq.get_output_from_indices(indices), rtol=0, atol=0)
    codes = vq.get_codes_from_indices(indices)
    assert codes.shape == (3, 7, H * d)
    cb = vq.embed.detach()
    idx = indices.reshape(-1, H)
    rows = cb[torch.arange(H) % vq.num_codebooks, idx]  # [N, H, d]
    if vq.use_cosine_sim:
        rows = F.normalize(rows, dim=-1, eps=1e-6)
    torch.testing.assert_close(codes.reshape(-1, H, d), rows)


def test_minus_one_gives_zeros_and_bad_indices_raise():
    vq = VectorQuantize(dim=8, codebook_size=16, codebook_dim=4, heads=2, separate_codebook_per_head=True)
    idx = torch.tensor([[[3, -1], [-1, -1]]])  # [1, 2, heads]
    codes = vq.get_codes_from_indices(idx)
    torch.testing.assert_close(codes[0, 0, :4], vq.embed[0, 3])
    assert codes[0, 0, 4:].abs().sum() == 0 and codes[0, 1].abs().sum() == 0
    out = vq.get_output_from_indices(idx)
    assert out[0, 1].abs().sum() == 0 and out[0, 0].abs().sum() > 0  # all -1 -> zeros after project_out
    with pytest.raises(ValueError, match=r"VectorQuantize: indices must be in \[-1, 16\)"):
        vq.get_codes_from_indices(torch.tensor([[16, 0]]))
    with pytest.raises(ValueError, match=r"VectorQuantize: indices must be \[\.\.\., heads=2\]"):
        vq.get_codes_from_indices(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="VectorQuantize: indices must be an int64 or int32"):
        vq.get_codes_from_indices(torch.zeros(2, 2))


def test_bad_inputs_name_module_and_argument():
    vq = VectorQuantize(dim=8, codebook_size=16)
    with pytest.raises(ValueError, match=r"VectorQuantize: x must have 8 channels"):
        vq(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"VectorQuantize: mask must have x's token shape \[2, 3\]"):
        vq(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="VectorQuantize: mask must be a bool tensor"):
        vq(torch.randn(2, 3, 8), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="VectorQuantize: codebook_size must be a positive int"):
        VectorQuantize(dim=8, codebook_size=0)
    with pytest.raises(ValueError, match="VectorQuantize: rotation_trick and straight_through are exclusive"):
        VectorQuantize(dim=8, codebook_size=4, rotation_trick=True, straight_through=True)
    with pytest.raises(ValueError, match="VectorQuantize: ema_update=True and learnable_codebook=True"):
        VectorQuantize(dim=8, codebook_size=4, ema_update=True, learnable_codebook=True)
    with pytest.raises(ValueError, match="VectorQuantize: decay must be in"):
        VectorQuantize(dim=8, codebook_size=4, decay=1.5)


def test_named_tuple_breakdown_and_eval_loss():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=16, learnable_codebook=True, commitment_weight=0.25,
                        codebook_weight=2.0)
    x = torch.randn(4, 5, 8)
    out, parts = vq(x, return_loss_breakdown=True)
    quantized, indices, loss = out  # unpacks as three values
    assert out.quantized is quantized and out.indices is indices and out.loss is loss
    q = vq.get_codes_from_indices(indices)
    torch.testing.assert_close(parts["commitment"], F.mse_loss(x, q))
    torch.testing.assert_close(parts["codebook"], F.mse_loss(x, q))
    torch.testing.assert_close(loss, 0.25 * parts["commitment"] + 2.0 * parts["codebook"])
    vq.eval()
    assert vq(x).loss.item() == 0.0
    torch.testing.assert_close(vq(x, aux_loss_in_eval=True).loss, loss.detach())


def test_eval_changes_nothing():
    vq = VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=2, kmeans_init=True).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(4, 5, 8))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_masked_positions_change_nothing():
    torch.manual_seed(0)
    kw = dict(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=True,
              threshold_ema_dead_code=3, kmeans_init=True, kmeans_iters=3)
    x = clustered(40, 8).view(2, 20, 8)
    mask = torch.rand(2, 20) > 0.3
    noisy = torch.where(mask[..., None], x, 1e3 * torch.randn_like(x))  # outliers at masked positions
    outs = []
    for inp in (x, noisy):
        torch.manual_seed(0)
        vq = VectorQuantize(**kw)
        out, parts = vq(inp.requires_grad_(), mask=mask, return_loss_breakdown=True)
        out.quantized.sum().backward()
        outs.append((vq, out, inp.grad))
    (vq_a, a, ga), (vq_b, b, gb) = outs
    assert (a.indices[~mask] == -1).all() and (a.indices[mask] >= 0).all()
    assert a.quantized[~mask].abs().sum() == 0
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    assert torch.equal(a.loss, b.loss) and torch.equal(ga[mask], gb[mask])
    for k, v in vq_a.state_dict().items():  # k-means, EMA, dead codes and usage saw the kept rows only
        assert torch.equal(v, vq_b.state_dict()[k]), k
    assert vq_a.usage_counts.sum() == 2 * mask.sum()
    # the loss is the mean over kept positions only
    vq = VectorQuantize(dim=8, codebook_size=16, aux_loss_in_eval=True).eval()
    _, idx, loss = vq(x, mask=mask)
    q = vq.get_codes_from_indices(idx)
    torch.testing.assert_close(loss, F.mse_loss(x[mask], q[mask]))
    # lens is the sequence-length spelling of a mask
    lens = torch.tensor([5, 20])
    torch.testing.assert_close(vq(x, lens=lens).indices, vq(x, mask=torch.arange(20) < lens[:, None]).indices)


def test_channel_first_layouts():
    torch.manual_seed(0)
    last = VectorQuantize(dim=8, codebook_size=16, heads=2, codebook_dim=4).eval()
    x = torch.randn(2, 8, 3, 5)  # [B, C, H, W]
    for kw in (dict(accept_image_fmap=True), dict(channel_first=True), dict(channel_last=False)):
        first = VectorQuantize(dim=8, codebook_size=16, heads=2, codebook_dim=4, **kw).eval()
        first.load_state_dict(last.state_dict())
        q, idx, _ = first(x)
        q_l, idx_l, _ = last(x.permute(0, 2, 3, 1))
        assert idx.shape == (2, 3, 5, 2) and torch.equal(idx, idx_l)
        assert q.shape == x.shape and torch.equal(q, q_l.permute(0, 3, 1, 2))
        assert torch.equal(first.get_output_from_indices(idx), q)
        assert first.get_codes_from_indices(idx).shape == (2, 8, 3, 5)
    seq = VectorQuantize(dim=8, codebook_size=16, channel_last=False).eval()  # [B, C, N]
    q, idx, _ = seq(torch.randn(2, 8, 6), mask=torch.ones(2, 6, dtype=torch.bool))
    assert q.shape == (2, 8, 6) and idx.shape == (2, 6)


def ema_step_by_hand(vq, x):
    """One EMA step of vector-quantize-pytorch's Codebook (one-hot sums), for a single shared codebook."""
    z = x.reshape(-1, vq.codebook_dim).double()
    cb = vq.embed[0].double()
    idx = brute_indices(z[:, None], cb[None], False)[0][:, 0]
    onehot = F.one_hot(idx, vq.codebook_size).double()
    cs = vq.cluster_size[0].double().lerp(onehot.sum(0), 1 - vq.decay)
    avg = vq.embed_avg[0].double().lerp(onehot.t() @ z, 1 - vq.decay)
    n = cs.sum()
    return avg / ((cs + vq.eps) / (n + vq.codebook_size * vq.eps) * n)[:, None], cs


def test_ema_update_formula_and_usage():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=16, decay=0.7)
    x = clustered(64, 8, centers=5)
    want_embed, want_cs = ema_step_by_hand(vq, x)
    _, idx, _ = vq(x)
    torch.testing.assert_close(vq.embed[0], want_embed.float())
    torch.testing.assert_close(vq.cluster_size[0], want_cs.float())
    counts = torch.bincount(idx.flatten(), minlength=16)
    assert torch.equal(vq.usage_counts[0], counts)
    p = counts.double() / counts.sum()
    ppl = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    torch.testing.assert_close(vq.last_perplexity, ppl.float().view(1))
    torch.testing.assert_close(vq.codebook_usage(), (counts > 0).float().mean().view(1))
    vq.reset_usage()
    assert vq.usage_counts.sum() == 0 and vq.last_perplexity.sum() == 0
    # cosine codebooks stay unit-norm under the EMA
    cos = VectorQuantize(dim=8, codebook_size=16, use_cosine_sim=True)
    for _ in range(3):
        cos(torch.randn(32, 8))
    torch.testing.assert_close(cos.embed.norm(dim=-1), torch.ones(1, 16))


def test_freeze_codebook():
    vq = VectorQuantize(dim=8, codebook_size=16, freeze_codebook=True, threshold_ema_dead_code=5)
    embed = vq.embed.clone()
    vq(torch.randn(32, 8))
    assert torch.equal(vq.embed, embed) and vq.usage_counts.sum() == 32  # usage is still counted
    vq.freeze_codebook = False
    vq(torch.randn(32, 8), freeze_codebook=True)
    assert torch.equal(vq.embed, embed)
    vq(torch.randn(32, 8))
    assert not torch.equal(vq.embed, embed)


def test_kmeans_init():
    torch.manual_seed(0)
    x = clustered(96, 8, centers=6)
    mask = torch.ones(96, dtype=torch.bool)
    mask[::7] = False
    x_masked = torch.where(mask[:, None], x, torch.full_like(x, 1e4))
    vq = VectorQuantize(dim=8, codebook_size=6, kmeans_init=True, kmeans_iters=5, decay=1.0)
    assert not vq.initted and vq.embed.abs().sum() == 0
    vq(x_masked, mask=mask)
    assert vq.initted
    want = fastvq.ops.kmeans(x[mask], 6, iters=5, seed=0).centroids
    torch.testing.assert_close(vq.embed[0], want, atol=1e-3, rtol=1e-3)  # up to the Laplace smoothing
    embed = vq.embed.clone()
    vq.decay = 0.0  # the next batches update by EMA; k-means does not run again
    vq(torch.randn(96, 8) + 100)
    assert not torch.equal(vq.embed, embed) and vq.initted
    eval_only = VectorQuantize(dim=8, codebook_size=6, kmeans_init=True).eval()
    eval_only(x)
    assert not eval_only.initted  # eval forwards never initialise


def test_dead_codes_replaced_from_the_batch():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=12, threshold_ema_dead_code=2.0, decay=0.5)
    with torch.no_grad():
        vq.embed[0, :3] = torch.eye(4)[:3] * 10  # codes 3.. are far from the data: dead after one step
        vq.embed[0, 3:] = 1e3
        vq.embed_avg.copy_(vq.embed)
    x = clustered(40, 4, centers=3, scale=0.5) + torch.eye(4)[0] * 10
    mask = torch.ones(40, dtype=torch.bool)
    mask[-5:] = False
    x[-5:] = 777.0  # masked rows must never become codes
    vq(x, mask=mask)
    dead = (vq.embed[0] - 1e3).abs().sum(-1) > 1  # no longer the far-away init
    assert dead[3:].all()
    kept = x[mask]
    for code in vq.embed[0, 3:]:  # every replaced code is a kept vector of the batch
        assert (kept - code).abs().sum(-1).min() == 0
    assert len({tuple(c.tolist()) for c in vq.embed[0, 3:]}) == 9  # distinct rows
    torch.testing.assert_close(vq.cluster_size[0, 3:], torch.full((9,), 2.0))
    torch.testing.assert_close(vq.embed_avg[0, 3:], vq.embed[0, 3:] * 2.0)
    # more dead codes than kept vectors: as many as there are vectors are replaced now, the rest later
    few = VectorQuantize(dim=4, codebook_size=12, threshold_ema_dead_code=100.0)
    with torch.no_grad():
        few.embed.fill_(1e3)
        few.embed_avg.fill_(1e3)
    few(torch.randn(5, 4))
    assert ((few.embed[0] - 1e3).abs().sum(-1) > 1).sum() == 5


@pytest.mark.parametrize("kw", [
    dict(dim=8, codebook_size=16, threshold_ema_dead_code=1.5),
    dict(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=True,
         use_cosine_sim=True, threshold_ema_dead_code=1.0),
], ids=["l2", "separate-cosine"])
def test_gradient_accumulation_equals_one_big_batch(kw):
    data = [clustered(24, 8, centers=4, seed=s) for s in range(3)]
    masks = [torch.rand(24, generator=torch.Generator().manual_seed(s)) > 0.2 for s in range(3)]
    torch.manual_seed(0)
    accum = VectorQuantize(manual_ema_update=True, **kw)
    torch.manual_seed(0)
    big = VectorQuantize(**kw)
    for step in range(3):  # 3 optimizer steps of 3 micro-batches each
        idx_micro = [accum(x + step, mask=m).indices for x, m in zip(data, masks)]
        embed_before = accum.embed.clone()
        accum.update_codebook()
        assert not torch.equal(accum.embed, embed_before)
        idx_big = big(torch.cat(data) + step, mask=torch.cat(masks)).indices
        assert torch.equal(torch.cat(idx_micro), idx_big)
        for name in ("embed", "cluster_size", "embed_avg"):
            torch.testing.assert_close(getattr(accum, name), getattr(big, name), rtol=1e-5, atol=1e-5)
        assert torch.equal(accum.usage_counts, big.usage_counts)
    accum.update_codebook()  # nothing accumulated: a no-op
    torch.testing.assert_close(accum.embed, big.embed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(use_cosine_sim=True, heads=2, codebook_dim=6)], ids=["l2", "cosine-proj"])
def test_autocast_picks_the_fp32_codes(kw):
    torch.manual_seed(0)
    vq = VectorQuantize(dim=16, codebook_size=64, **kw).eval()
    x = torch.randn(8, 10, 16)
    q32, idx32, _ = vq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_ac, idx_ac, _ = vq(x)
        q_bf, idx_bf, _ = vq(x.bfloat16())
    assert torch.equal(idx_ac, idx32) and q_ac.dtype == torch.float32 and torch.equal(q_ac, q32)
    assert q_bf.dtype == torch.bfloat16
    assert torch.equal(idx_bf, vq(x.bfloat16().float()).indices)  # same codes as fp32 on the bf16 values


def test_estimators():
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    ste = VectorQuantize(dim=8, codebook_size=16, straight_through=True, commitment_weight=0.0)
    assert not ste.rotation_trick
    ste(x).quantized.backward(torch.ones(6, 8))
    torch.testing.assert_close(x.grad, torch.ones(6, 8))
    x.grad = None
    rot = VectorQuantize(dim=8, codebook_size=16, commitment_weight=0.0)
    assert rot.rotation_trick  # vector-quantize-pytorch's default for dim > 1
    rot.load_state_dict(ste.state_dict())
    quantized, idx, _ = rot(x)
    q = ste.get_codes_from_indices(idx)
    torch.testing.assert_close(quantized, q)
    quantized.backward(torch.ones(6, 8))
    x2 = x.detach().clone().requires_grad_()
    rotation_trick(x2, q).backward(torch.ones(6, 8))
    torch.testing.assert_close(x.grad, x2.grad)
    assert not VectorQuantize(dim=1, codebook_size=4).rotation_trick


def test_learnable_codebook_learns_by_gradient():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=16, learnable_codebook=True)
    assert isinstance(vq.embed, torch.nn.Parameter) and not vq.ema_update
    opt = torch.optim.SGD(vq.parameters(), lr=1.0)
    x = clustered(64, 8, centers=4)
    losses = []
    for _ in range(10):
        loss = vq(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and vq.usage_counts.sum() == 10 * 64


def test_state_dict_roundtrip():
    torch.manual_seed(0)
    kw = dict(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True, kmeans_init=True,
              threshold_ema_dead_code=1.0)
    vq = VectorQuantize(**kw)
    for s in range(3):
        vq(clustered(32, 8, seed=s))
    sd = vq.state_dict()
    for key in ("embed", "cluster_size", "embed_avg", "initted", "usage_counts", "last_perplexity", "update_steps"):
        assert key in sd
    fresh = VectorQuantize(**kw)
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = clustered(32, 8, seed=9)
    a, b = vq(x), fresh(x)  # training forwards: no k-means again, same EMA and dead-code choices
    assert torch.equal(a.indices, b.indices)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, vq.state_dict()[k]), k


DDP_BODY = """
import torch, torch.distributed as dist
from fastvq.nn import VectorQuantize
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
vq = VectorQuantize(**KW)
torch.manual_seed(0)
accum = VectorQuantize(manual_ema_update=True, **(KW | {"kmeans_init": False}))
for step in range(STEPS):
    x, m = ddp_batch(step)
    n = x.shape[0] // 2
    x, m = x[rank * n:(rank + 1) * n], m[rank * n:(rank + 1) * n]
    out = vq(x, mask=m)
    for part in (slice(0, 5), slice(5, n)):  # two micro-batches per rank, one update per step
        accum(x[part], mask=m[part])
    accum.update_codebook()
save_rank(vq.state_dict() | {"indices": out.indices} | {"accum." + k: v for k, v in accum.state_dict().items()})
dist.destroy_process_group()
"""

DDP_KW = dict(dim=8, codebook_size=12, heads=2, codebook_dim=4, separate_codebook_per_head=True, kmeans_init=True,
              kmeans_iters=4, threshold_ema_dead_code=1.5, decay=0.6)
DDP_STEPS = 4


def ddp_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(6, 8, generator=g)[torch.randint(6, (32,), generator=g)] + 0.05 * torch.randn(32, 8, generator=g)
    x[16:] += step  # the ranks see different data (rank 1 drifts: dead codes appear)
    return x, torch.rand(32, generator=g) > 0.15


def test_ddp_codebooks_identical_and_match_one_process(tmp_path):
    import inspect
    src = inspect.getsource(ddp_batch)
    script = f"KW = {DDP_KW!r}\nSTEPS = {DDP_STEPS}\n{src}\n{DDP_BODY}"
    ranks = run_ddp(script, tmp_path, nproc=2)
    for k in ranks[0]:
        if k != "indices":
            assert torch.equal(ranks[0][k], ranks[1][k]), f"{k} differs across ranks"
    torch.manual_seed(0)
    one = VectorQuantize(**DDP_KW)  # one process, the concatenated batch
    for step in range(DDP_STEPS):
        out = one(*ddp_batch(step))
    assert torch.equal(torch.cat([ranks[0]["indices"], ranks[1]["indices"]]), out.indices)
    assert ranks[0]["update_steps"] == DDP_STEPS and ranks[0]["initted"]
    assert torch.equal(ranks[0]["usage_counts"], one.usage_counts)
    for k in ("embed", "cluster_size", "embed_avg"):  # fp32 sums in another order: within 1e-5
        torch.testing.assert_close(ranks[0][k], getattr(one, k), rtol=1e-5, atol=1e-5)
    # gradient accumulation under DDP (2 micro-batches per rank, one update per step) = one process
    torch.manual_seed(0)
    one = VectorQuantize(**(DDP_KW | {"kmeans_init": False}))
    for step in range(DDP_STEPS):
        one(*ddp_batch(step))
    assert torch.equal(ranks[0]["accum.usage_counts"], one.usage_counts)
    for k in ("embed", "cluster_size", "embed_avg"):
        torch.testing.assert_close(ranks[0]["accum." + k], getattr(one, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(dim=8, codebook_size=16, heads=2, threshold_ema_dead_code=2.0, kmeans_init=True),
    dict(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=True, use_cosine_sim=True,
         learnable_codebook=True, threshold_ema_dead_code=1.0),
], ids=["ema-kmeans-dead", "learnable-cosine"])
def test_training_step_reads_nothing_back_to_the_host(kw, monkeypatch):
    """After the first forward (k-means init reads once), forwards and updates never read a tensor's value
    on the host: on a GPU they would not synchronise."""
    vq = VectorQuantize(manual_ema_update=True, **kw)
    vq(torch.randn(4, 6, 8))
    vq.update_codebook()

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor value")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    monkeypatch.setattr(torch, "bincount", host_read)
    x = torch.randn(4, 6, 8, requires_grad=True)
    out = vq(x, mask=torch.rand(4, 6) > 0.2)
    out.loss.backward()
    vq.update_codebook()
    vq.manual_ema_update = False
    vq(x)
    vq.eval()
    vq(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_training_matches_cpu():
    """The same training run (k-means init, EMA, dead codes, masks) on CUDA and on the CPU: same indices,
    codebooks within float32 rounding of the elementwise steps (the search, sums and k-means are
    bit-identical across the backends)."""
    kw = dict(dim=8, codebook_size=12, heads=2, codebook_dim=4, separate_codebook_per_head=True, kmeans_init=True,
              threshold_ema_dead_code=1.5, use_cosine_sim=True)
    runs = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        vq = VectorQuantize(**kw).to(device)
        for step in range(3):
            x, m = ddp_batch(step)
            out = vq(x.to(device), mask=m.to(device))
        runs.append((vq, out))
    (cpu, out_cpu), (gpu, out_gpu) = runs
    assert torch.equal(out_cpu.indices, out_gpu.indices.cpu())
    assert torch.equal(cpu.usage_counts, gpu.usage_counts.cpu())
    for k in ("embed", "cluster_size", "embed_avg"):
        torch.testing.assert_close(getattr(gpu, k).cpu(), getattr(cpu, k), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_training_step():
    """A training step (EMA, dead codes, masks) compiles as one graph (no data-dependent Python branch, no
    host read) and equals eager."""
    kw = dict(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=True,
              threshold_ema_dead_code=1.5)
    torch.manual_seed(0)
    eager = VectorQuantize(**kw)
    compiled = VectorQuantize(**kw)
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)
    for s in range(2):
        x, m = ddp_batch(s)
        a, b = eager(x, mask=m), step(x, mask=m)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(b.quantized, a.quantized)
        torch.testing.assert_close(b.loss, a.loss)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[k], v, rtol=1e-5, atol=1e-6)
