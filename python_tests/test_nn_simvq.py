"""fastvq.nn.SimVQ: values against a plain-PyTorch formulation, masks, eval, channel-first, codes from
indices, the fp32 island, usage counters and DDP."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvq.nn import SimVQ
from fastvq.nn._quantizer import QuantizeOutput, rotation_trick

from ddp import run_ddp


def make(dim=40, codebook_size=300, **kw):
    torch.manual_seed(0)
    m = SimVQ(dim=dim, codebook_size=codebook_size, **kw)
    with torch.no_grad():  # a transform near the identity, so the codes are spread like the Gaussian
        m.code_transform.weight.copy_(torch.eye(dim, m.frozen_codebook_dim) + 0.1 * torch.randn(dim, m.frozen_codebook_dim))
    return m


def plain(m: SimVQ, x: torch.Tensor):
    """vector-quantize-pytorch's SimVQ forward written in plain PyTorch: (quantized, indices, loss)."""
    codebook = m.code_transform(m.frozen_codebook)
    indices = torch.cdist(x.detach(), codebook.detach()).argmin(-1)
    q = codebook[indices]
    loss = F.mse_loss(x.detach(), q) + m.input_to_quantize_commit_loss_weight * F.mse_loss(x, q.detach())
    out = rotation_trick(x, q) if m.rotation_trick else x + (q - x).detach()
    return out, indices, m.commitment_weight * loss


@pytest.mark.parametrize("rotation", [True, False], ids=["rotation", "straight-through"])
def test_forward_and_gradients_match_plain_pytorch(rotation):
    m = make(rotation_trick=rotation, commitment_weight=0.7)
    x = torch.randn(3, 50, 40, requires_grad=True)
    out = m(x)
    assert isinstance(out, QuantizeOutput) and out.indices.dtype == torch.int64 and out.indices.shape == (3, 50)
    w = torch.randn_like(x)
    grads = torch.autograd.grad((out.quantized * w).sum() + out.loss, [x, m.code_transform.weight])

    x2 = x.detach().clone().requires_grad_()
    ref_q, ref_idx, ref_loss = plain(m, x2)
    ref_grads = torch.autograd.grad((ref_q * w).sum() + ref_loss, [x2, m.code_transform.weight])
    assert torch.equal(out.indices, ref_idx)
    torch.testing.assert_close(out.quantized, ref_q)
    torch.testing.assert_close(out.quantized, m.codebook[ref_idx].detach())  # the value is the code
    torch.testing.assert_close(out.loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert grads[1].abs().sum() > 0  # the loss trains the linear map


def test_loss_breakdown_and_eval():
    m = make(input_to_quantize_commit_loss_weight=0.3, commitment_weight=2.0)
    x = torch.randn(4, 9, 40)
    out, parts = m(x, return_loss_breakdown=True)
    assert set(parts) == {"quantize_to_input", "input_to_quantize"}
    torch.testing.assert_close(parts["quantize_to_input"], F.mse_loss(x, out.quantized))
    torch.testing.assert_close(parts["input_to_quantize"], parts["quantize_to_input"])  # same value, other side
    torch.testing.assert_close(out.loss, 2.0 * (parts["quantize_to_input"] + 0.3 * parts["input_to_quantize"]))

    m.eval()
    before = m.usage_counts.clone()
    ev = m(x)
    assert ev.loss.item() == 0 and torch.equal(ev.indices, out.indices)
    assert torch.equal(m.usage_counts, before)  # eval forwards update no statistics
    ev, parts_eval = m(x, return_loss_breakdown=True)  # the terms are still reported
    assert ev.loss.item() == 0 and torch.equal(parts_eval["quantize_to_input"], parts["quantize_to_input"])
    m.aux_loss_in_eval = True
    torch.testing.assert_close(m(x).loss, out.loss)


def test_mask():
    m = make()
    x = torch.randn(2, 30, 40, requires_grad=True)
    mask = torch.rand(2, 30) > 0.4
    out, parts = m(x, mask=mask, return_loss_breakdown=True)
    assert (out.indices[~mask] == -1).all() and (out.indices[mask] >= 0).all()
    assert (out.quantized[~mask] == 0).all()
    full = m(x)
    assert torch.equal(out.indices[mask], full.indices[mask])
    torch.testing.assert_close(out.quantized[mask], full.quantized[mask])
    kept = x[mask]
    torch.testing.assert_close(parts["quantize_to_input"], F.mse_loss(kept, out.quantized[mask]))
    counts = torch.bincount(full.indices[mask], minlength=300)
    assert torch.equal(m.usage_counts, counts + torch.bincount(full.indices.reshape(-1), minlength=300))

    # masked positions change nothing and receive no gradient, even when they hold garbage
    (gx, gw) = torch.autograd.grad(out.quantized.sum() + out.loss, [x, m.code_transform.weight])
    assert (gx[~mask] == 0).all()
    x_bad = x.detach().clone()
    x_bad[~mask] = 1e4
    x_bad.requires_grad_()
    out_bad = m(x_bad, mask=mask)
    (gx_bad, gw_bad) = torch.autograd.grad(out_bad.quantized.sum() + out_bad.loss, [x_bad, m.code_transform.weight])
    assert torch.equal(out_bad.indices, out.indices) and torch.equal(out_bad.quantized, out.quantized)
    assert torch.equal(out_bad.loss, out.loss) and torch.equal(gx_bad, gx) and torch.equal(gw_bad, gw)

    nothing = m(x, mask=torch.zeros(2, 30, dtype=torch.bool))
    assert (nothing.indices == -1).all() and nothing.loss.item() == 0 and (nothing.quantized == 0).all()


def test_channel_first():
    m = make(channel_first=True)
    x = torch.randn(2, 40, 5, 6)
    out = m(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 5, 6)
    m.channel_first = False
    last = m(x.permute(0, 2, 3, 1))
    m.channel_first = True
    assert torch.equal(out.indices, last.indices)
    assert torch.equal(out.quantized, last.quantized.permute(0, 3, 1, 2))
    mask = torch.rand(2, 5, 6) > 0.5
    masked = m(x, mask=mask)
    assert (masked.indices[~mask] == -1).all() and (masked.quantized.permute(0, 2, 3, 1)[~mask] == 0).all()
    out_from_idx = m.get_output_from_indices(masked.indices)
    assert out_from_idx.shape == x.shape
    torch.testing.assert_close(out_from_idx, masked.quantized)
    assert torch.equal(m.indices_to_codes(masked.indices), out_from_idx)


def test_codes_from_indices():
    m = make()
    x = torch.randn(7, 11, 40)
    out = m(x)
    idx = out.indices.clone()
    idx[0, :3] = -1
    codes = m.get_codes_from_indices(idx)
    assert codes.shape == (7, 11, 40)
    assert (codes[0, :3] == 0).all()
    torch.testing.assert_close(codes[idx >= 0], out.quantized[idx >= 0])
    assert torch.equal(m.get_output_from_indices(idx), codes)
    assert torch.equal(m.get_codes_from_indices(idx.int()), codes)
    codes.sum().backward()  # differentiable w.r.t. the linear map
    assert m.code_transform.weight.grad.abs().sum() > 0
    # -1 gives zeros even through a transform with a bias
    mb = SimVQ(dim=8, codebook_size=5, codebook_transform=nn.Linear(8, 8))
    assert (mb.get_codes_from_indices(torch.tensor([-1, 2]))[0] == 0).all()
    for bad in (300, -2):
        with pytest.raises(IndexError, match=rf"SimVQ: indices must be in \[0, codebook_size\) = \[0, 300\) or -1 "
                                             rf"\(masked\), got {bad}"):
            m.get_codes_from_indices(torch.tensor([0, bad]))
    with pytest.raises(TypeError, match="SimVQ: indices must be an int64 or int32 tensor"):
        m.get_codes_from_indices(torch.zeros(3))


def test_custom_transform_and_frozen_dim():
    # vector-quantize-pytorch's README example: an MLP map from a narrower frozen codebook
    torch.manual_seed(0)
    transform = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))
    m = SimVQ(dim=32, codebook_size=64, codebook_transform=transform, frozen_codebook_dim=16, channel_first=True)
    assert m.frozen_codebook.shape == (64, 16) and not m.frozen_codebook.requires_grad
    assert [p is q for p, q in zip(m.parameters(), transform.parameters())] == [True] * 4  # only the map learns
    x = torch.randn(2, 32, 4, 4)
    quantized, indices, loss = m(x)
    loss.backward()
    assert all(p.grad is not None for p in transform.parameters())
    torch.testing.assert_close(m.indices_to_codes(indices), quantized)


def test_frozen_codebook_init():
    torch.manual_seed(0)
    m = SimVQ(dim=256, codebook_size=4096)
    assert m.frozen_codebook.shape == (4096, 256)
    assert abs(m.frozen_codebook.pow(2).sum(-1).mean().item() - 1.0) < 0.01  # randn * dim^-0.5: unit norm
    assert isinstance(m.code_transform, nn.Linear) and m.code_transform.bias is None
    m2 = SimVQ(dim=8, codebook_size=10, init_fn=lambda c: c * 0 + 1)
    assert (m2.frozen_codebook == 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_picks_the_fp32_codes(dtype):
    m = make(dim=64, codebook_size=2048)
    x = torch.randn(16, 64, 64)
    ref = m(x)
    with torch.autocast("cpu", dtype=dtype):
        out = m(x)
    assert torch.equal(out.indices, ref.indices)
    assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss)
    # without the island the map would run in 16 bits, and pick other codes: the test can fail
    with torch.autocast("cpu", dtype=dtype):
        low = m.code_transform(m.frozen_codebook)
    assert low.dtype == dtype
    assert not torch.equal(torch.cdist(x, low.float()).argmin(-1), ref.indices)
    # 16-bit input: the output comes back in its dtype, the codes are those of its fp32 value
    half = m(x.to(dtype))
    assert half.quantized.dtype == dtype and torch.equal(half.indices, m(x.to(dtype).float()).indices)


def test_usage_counters_and_state_dict():
    m = make()
    x = torch.randn(2, 400, 40)
    idx = m(x).indices
    assert torch.equal(m.usage_counts, torch.bincount(idx.reshape(-1), minlength=300))
    assert m.codebook_usage().item() == (m.usage_counts > 0).float().mean().item()
    assert 0 < m.codebook_usage().item() <= 1
    sd = m.state_dict()
    assert set(sd) == {"frozen_codebook", "code_transform.weight", "usage_counts"}
    m2 = SimVQ(dim=40, codebook_size=300)
    m2.load_state_dict(sd)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert torch.equal(m2(x).indices, m(x).indices)
    # a vector-quantize-pytorch checkpoint (no usage counts) loads strictly, with the counts at zero
    m2.load_state_dict({k: v for k, v in sd.items() if k != "usage_counts"})
    assert (m2.usage_counts == 0).all()
    m.reset_usage()
    assert m.codebook_usage().item() == 0


def test_training_step_compiles_without_graph_breaks():
    # fullgraph: no .item(), no bincount, no data-dependent shape in a training forward (a host sync would
    # break the graph); the compiled step updates the usage counts like the eager one
    m, eager = make(), make()
    x = torch.randn(3, 20, 40)
    mask = torch.rand(3, 20) > 0.3
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True)(x, mask=mask)
    ref = eager(x, mask=mask)
    assert torch.equal(out.indices, ref.indices) and torch.equal(m.usage_counts, eager.usage_counts)
    torch.testing.assert_close(out.loss, ref.loss)
    assert torch.equal(m.usage_counts, torch.bincount(ref.indices[mask], minlength=300))


@pytest.mark.parametrize("kw, match", [
    (dict(dim=0, codebook_size=4), "SimVQ: dim must be positive"),
    (dict(dim=4, codebook_size=0), "SimVQ: codebook_size must be positive"),
    (dict(dim=4, codebook_size=4, frozen_codebook_dim=0), "SimVQ: frozen_codebook_dim must be positive"),
])
def test_bad_keywords(kw, match):
    with pytest.raises(ValueError, match=match):
        SimVQ(**kw)


def test_bad_inputs():
    m = make()
    with pytest.raises(ValueError, match=r"SimVQ: x must have dim = 40 channels in the last dim, got shape \[2, 3, 8\]"):
        m(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="SimVQ: mask must be a bool tensor"):
        m(torch.randn(2, 3, 40), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"SimVQ: mask must have x's token shape \[2, 3\]"):
        m(torch.randn(2, 3, 40), mask=torch.ones(2, 4, dtype=torch.bool))
    cf = make(channel_first=True)
    with pytest.raises(ValueError, match=r"SimVQ: x must have dim = 40 channels in dim 1, got shape \[2, 8, 3\]"):
        cf(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="SimVQ: x must be channel-first"):
        cf(torch.randn(2, 40))


DDP_BODY = """
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from fastvq.nn import SimVQ
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)  # different initial values: DDP must broadcast rank 0's frozen codebook and map
m = SimVQ(dim=32, codebook_size=64)
ddp = DDP(m)
opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
for step in range(4):
    g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
    x = torch.randn(2, 24, 32, generator=g)
    mask = torch.rand(2, 24, generator=g) > 0.25
    out = ddp(x, mask=mask)
    (out.quantized.square().mean() + out.loss).backward()
    opt.step()
    opt.zero_grad()
save_rank({"weight": m.code_transform.weight, "frozen": m.frozen_codebook, "usage": m.usage_counts})
"""


def test_ddp_ranks_stay_identical(tmp_path):
    ranks = run_ddp(DDP_BODY, tmp_path)
    for key in ("weight", "frozen", "usage"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # one process on the concatenated batches: the same map (DDP averages gradients of equal batches) and
    # the same usage counts
    torch.manual_seed(0)
    m = SimVQ(dim=32, codebook_size=64)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for step in range(4):
        xs, masks = [], []
        for rank in range(2):
            g = torch.Generator().manual_seed(1000 * step + rank)
            xs.append(torch.randn(2, 24, 32, generator=g))
            masks.append(torch.rand(2, 24, generator=g) > 0.25)
        outs = [m(x, mask=k) for x, k in zip(xs, masks)]  # per rank, as each rank's loss is its own mean
        sum((o.quantized.square().mean() + o.loss) / 2 for o in outs).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(ranks[0]["frozen"], m.frozen_codebook)
    assert torch.equal(ranks[0]["usage"], m.usage_counts)
    assert ranks[0]["usage"].sum() > 0
    torch.testing.assert_close(ranks[0]["weight"], m.code_transform.weight.detach(), rtol=1e-5, atol=1e-6)
