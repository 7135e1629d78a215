"""fastvq.nn.SimVQ against vector-quantize-pytorch's SimVQ (1.32.0, the test extra): its README example with
only the import changed, its checkpoints, and the same frozen codebook and map giving the same indices
(wherever the best/second-best gap is clear), outputs, losses and gradients."""
import pytest
import torch
from torch import nn

from fastvq.nn import SimVQ

vqp = pytest.importorskip("vector_quantize_pytorch")


def test_readme_example():
    # vector-quantize-pytorch's README, "SimVQ", with `from fastvq.nn import SimVQ`
    sim_vq = SimVQ(
        dim=512,
        codebook_size=1024,
        rotation_trick=True,  # use rotation trick from Fifty et al.
    )
    x = torch.randn(1, 1024, 512)
    quantized, indices, commit_loss = sim_vq(x)
    assert x.shape == quantized.shape
    assert torch.allclose(quantized, sim_vq.indices_to_codes(indices), atol=1e-6)


def clear_gap(x: torch.Tensor, codebook: torch.Tensor, rel: float = 1e-4) -> torch.Tensor:
    """Rows whose nearest and second-nearest codes are apart by more than rel of the distance (float64)."""
    dist = torch.cdist(x.double().reshape(-1, x.shape[-1]), codebook.double())
    two = dist.topk(2, largest=False).values
    return ((two[:, 1] - two[:, 0]) > rel * two[:, 0]).reshape(x.shape[:-1])


@pytest.mark.parametrize("kw", [
    dict(),
    dict(rotation_trick=False),
    dict(channel_first=True),
    dict(frozen_codebook_dim=24, input_to_quantize_commit_loss_weight=0.5, commitment_weight=0.3),
], ids=["defaults", "straight-through", "channel-first", "frozen-dim"])
def test_same_codebook_same_results(kw):
    torch.manual_seed(0)
    theirs = vqp.SimVQ(dim=48, codebook_size=500, **kw)
    ours = SimVQ(dim=48, codebook_size=500, **kw)
    ours.load_state_dict(theirs.state_dict())  # their checkpoint loads as is (usage counts start at zero)
    with torch.no_grad():  # spread the codes: a map near the identity
        f = ours.frozen_codebook_dim
        theirs.code_transform.weight.copy_(torch.eye(48, f) + 0.2 * torch.randn(48, f))
        ours.code_transform.weight.copy_(theirs.code_transform.weight)

    shape = (2, 48, 6, 7) if kw.get("channel_first") else (3, 60, 48)
    x = torch.randn(shape)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    q, idx, loss = ours(x_ours)
    q_ref, idx_ref, loss_ref = theirs(x_theirs)

    x_last = x.movedim(1, -1) if kw.get("channel_first") else x
    clear = clear_gap(x_last, theirs.codebook.detach())
    assert clear.float().mean() > 0.95
    assert idx.shape == idx_ref.shape and torch.equal(idx[clear], idx_ref[clear])
    if torch.equal(idx, idx_ref):
        torch.testing.assert_close(q, q_ref)
        torch.testing.assert_close(loss, loss_ref)
        w = torch.randn_like(q)
        ((q * w).sum() + loss).backward()
        ((q_ref * w).sum() + loss_ref).backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad)
        torch.testing.assert_close(ours.code_transform.weight.grad, theirs.code_transform.weight.grad)
        torch.testing.assert_close(ours.indices_to_codes(idx), theirs.indices_to_codes(idx_ref))
    else:  # a near-tie went the other way: compare the rows that agree
        same = idx == idx_ref
        q_rows = q.movedim(1, -1) if kw.get("channel_first") else q
        q_ref_rows = q_ref.movedim(1, -1) if kw.get("channel_first") else q_ref
        torch.testing.assert_close(q_rows[same], q_ref_rows[same])


def test_custom_transform_module():
    # the map can be any module, as in vector-quantize-pytorch's sim_vq.py example
    torch.manual_seed(0)
    make_map = lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))  # noqa: E731
    theirs = vqp.SimVQ(dim=32, codebook_size=128, codebook_transform=make_map(), channel_first=True)
    ours = SimVQ(dim=32, codebook_size=128, codebook_transform=make_map(), channel_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 8, 8)
    q, idx, loss = ours(x)
    q_ref, idx_ref, loss_ref = theirs(x)
    clear = clear_gap(x.movedim(1, -1), theirs.codebook.detach())
    assert torch.equal(idx[clear], idx_ref[clear])
    if torch.equal(idx, idx_ref):
        torch.testing.assert_close(q, q_ref)
        torch.testing.assert_close(loss, loss_ref)
