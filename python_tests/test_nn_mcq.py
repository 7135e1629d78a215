"""fastvq.nn.MultiCodebookQuantizer (UniTok's MCQ, a VectorQuantize preset): against the pure-PyTorch
reference, both keyword spellings, the UniTok defaults, statistics, legacy state dicts and bad input."""
import pytest
import torch

import fastvq
from fastvq.nn import MultiCodebookQuantizer, VectorQuantize
from fastvq.reference import multi_codebook_quantize_ref

METRICS = ["l2", "cosine"]


@pytest.mark.parametrize("metric", METRICS)
def test_module_matches_reference(metric):
    torch.manual_seed(1)
    q = MultiCodebookQuantizer(dim=64, num_codebooks=8, codebook_size=512, metric=metric)
    with torch.no_grad():
        q.codebooks.normal_()  # spread codes so the nearest one is unambiguous
    z = torch.randn(4, 10, 64, requires_grad=True)
    quantized, indices, loss = q(z)
    cb_ref = q.codebooks.detach().clone().requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    quantized_r, indices_r, loss_r = multi_codebook_quantize_ref(z_ref, cb_ref, metric, 0.25, 1.0)
    assert torch.equal(indices, indices_r)
    assert indices.shape == (4, 10, 8) and quantized.shape == z.shape
    torch.testing.assert_close(quantized, quantized_r)
    torch.testing.assert_close(loss, loss_r)
    w = torch.randn_like(z)
    (loss + (quantized * w).sum()).backward()
    (loss_r + (quantized_r * w).sum()).backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(q.codebooks.grad, cb_ref.grad)
    if metric == "cosine":  # unit-norm chunks, as UniTok
        torch.testing.assert_close(quantized.detach().view(4, 10, 8, 8).norm(dim=-1), torch.ones(4, 10, 8))
    torch.testing.assert_close(q.get_output_from_indices(indices), quantized.detach())
    torch.testing.assert_close(q.get_codes_from_indices(indices), quantized.detach())


def test_unitok_defaults_and_vqp_spelling():
    torch.manual_seed(0)
    unitok = MultiCodebookQuantizer()
    assert (unitok.dim, unitok.heads, unitok.codebook_size, unitok.codebook_dim) == (64, 8, 4096, 8)
    assert unitok.use_cosine_sim and unitok.learnable_codebook and not unitok.ema_update
    assert not unitok.rotation_trick and unitok.commitment_weight == 0.25 and unitok.codebook_weight == 1.0
    assert not unitok.has_projections and unitok.separate_codebook_per_head
    assert isinstance(unitok.codebooks, torch.nn.Parameter) and unitok.codebooks.abs().max() <= 1 / 4096
    torch.manual_seed(0)
    vqp = MultiCodebookQuantizer(dim=64, heads=8, separate_codebook_per_head=True, codebook_dim=8,
                                 use_cosine_sim=True, codebook_size=4096)
    torch.manual_seed(0)
    l2 = MultiCodebookQuantizer(dim=32, num_codebooks=4, codebook_size=16, metric="l2")
    assert not l2.use_cosine_sim and l2.codebook_dim == 8
    assert isinstance(unitok, VectorQuantize)
    for k, v in unitok.state_dict().items():
        assert torch.equal(v, vqp.state_dict()[k]), k
    x = torch.randn(2, 5, 64)
    assert torch.equal(unitok(x).indices, vqp(x).indices)


def test_bad_arguments():
    with pytest.raises(ValueError, match="MultiCodebookQuantizer: dim .10. must be a positive multiple of"):
        MultiCodebookQuantizer(dim=10, num_codebooks=3)
    with pytest.raises(ValueError, match="MultiCodebookQuantizer: metric must be"):
        MultiCodebookQuantizer(metric="dot")
    with pytest.raises(ValueError, match="num_codebooks .4. and heads .8. name the same thing"):
        MultiCodebookQuantizer(num_codebooks=4, heads=8)
    with pytest.raises(ValueError, match="contradicts use_cosine_sim"):
        MultiCodebookQuantizer(metric="l2", use_cosine_sim=True)
    with pytest.raises(ValueError, match="separate_codebook_per_head must be True"):
        MultiCodebookQuantizer(separate_codebook_per_head=False)
    with pytest.raises(TypeError):
        MultiCodebookQuantizer(64, 8, 4096)  # keyword-only: the two libraries' positional orders differ
    q = MultiCodebookQuantizer(dim=16, num_codebooks=2, codebook_size=8)
    with pytest.raises(ValueError, match=r"MultiCodebookQuantizer: x must have 16 channels"):
        q(torch.randn(3, 15))
    with pytest.raises(ValueError, match=r"MultiCodebookQuantizer: mask must have x's token shape \[3\]"):
        q(torch.randn(3, 16), mask=torch.ones(4, dtype=torch.bool))


def test_usage_statistics_without_host_sync_buffers():
    q = MultiCodebookQuantizer(dim=16, num_codebooks=2, codebook_size=8, metric="l2")
    with torch.no_grad():
        q.codebooks.copy_(torch.randn(2, 8, 8))
    z = q.codebooks.detach()[[0, 1], :4].permute(1, 0, 2).reshape(4, 16)  # codes 0..3 of both books
    _, indices, loss = q(z)
    assert indices.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(q.codebook_usage(), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(q.last_perplexity, torch.tensor([4.0, 4.0]))
    assert "usage_counts" in q.state_dict() and "last_perplexity" in q.state_dict()  # persistent
    q.eval()
    q(torch.randn(100, 16))
    torch.testing.assert_close(q.codebook_usage(), torch.tensor([0.5, 0.5]))  # eval does not count
    q.reset_usage()
    assert q.codebook_usage().sum() == 0


def test_masks_and_channel_first():
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(dim=16, num_codebooks=2, codebook_size=8, channel_first=True)
    x = torch.randn(2, 16, 3, 4, requires_grad=True)
    mask = torch.rand(2, 3, 4) > 0.4
    out = q(x, mask=mask)
    assert out.indices.shape == (2, 3, 4, 2) and (out.indices[~mask] == -1).all()
    assert out.quantized.shape == x.shape and out.quantized.permute(0, 2, 3, 1)[~mask].abs().sum() == 0
    out.loss.backward()
    assert x.grad.permute(0, 2, 3, 1)[~mask].abs().sum() == 0  # masked positions take no part in the loss
    assert q.usage_counts.sum() == 2 * mask.sum()


def test_training_step_and_bf16_input():
    q = MultiCodebookQuantizer(dim=64, num_codebooks=8, codebook_size=64)
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    z = torch.randn(32, 64)
    losses = []
    for _ in range(5):
        _, _, loss = q(z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the codebook loss pulls codes towards the data
    quantized, indices, loss = q(z.bfloat16())
    assert quantized.dtype == torch.bfloat16 and indices.shape == (32, 8)


def test_ema_variant_and_legacy_state_dict():
    torch.manual_seed(0)
    ema = MultiCodebookQuantizer(dim=16, num_codebooks=2, codebook_size=8, learnable_codebook=False,
                                 threshold_ema_dead_code=1.0, kmeans_init=True)
    assert ema.ema_update and not isinstance(ema.embed, torch.nn.Parameter)
    x = torch.randn(64, 16)
    ema(x)
    assert ema.initted
    torch.testing.assert_close(ema.embed.norm(dim=-1), torch.ones(2, 8))  # cosine EMA codebooks: unit norm
    # a state dict of the earlier MultiCodebookQuantizer (one `codebooks` parameter) loads
    legacy = {"codebooks": torch.randn(2, 8, 8)}
    q = MultiCodebookQuantizer(dim=16, num_codebooks=2, codebook_size=8)
    q.load_state_dict(legacy)
    assert torch.equal(q.codebooks, legacy["codebooks"])


def test_gemm_path():
    """8-d chunks take the direct search; 64-d chunks the GEMM path: both equal the brute force."""
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(dim=128, num_codebooks=2, codebook_size=300, metric="l2").eval()
    with torch.no_grad():
        q.codebooks.normal_()
    x = torch.randn(50, 128)
    dist = torch.cdist(x.view(50, 2, 64).transpose(0, 1).double(), q.codebooks.double())  # [2, 50, 300]
    assert torch.equal(q(x).indices, dist.argmin(-1).t())
    assert fastvq.nn.MultiCodebookQuantizer is MultiCodebookQuantizer
