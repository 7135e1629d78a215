"""fastvq.nn.LFQ as a drop-in for vector-quantize-pytorch's LFQ (issue 13, deliverable 7).

1. vector-quantize-pytorch's README LFQ examples, ported by changing only the import.
2. Against vector_quantize_pytorch.LFQ on the same inputs and projection weights: identical indices (both pack
   the first dimension as the most significant bit), equal quantized outputs, and losses within tolerance.

Where the losses differ, and why: vector-quantize-pytorch computes ``-sum p log(max(p, 1e-5))``, fastvq the exact
``-sum p log(max(p, tiny))``. Codes of probability below 1e-5 (most of them in a codebook of 2^17 codes or more)
add ``-p log(1e-5)`` there instead of ``-p log p``: its codebook entropy is capped at ``log(1e5) = 11.51`` nats
(2^18 codes: 12.48 exact) and has no gradient from those codes. With the clamp lowered to ``tiny`` in
vector-quantize-pytorch (monkeypatched), the two agree to float32 rounding. With a mask,
vector-quantize-pytorch 1.32.0 averages the code distribution over nothing (it flattens the kept rows with the
codebook dim, ``'b n ... -> (b n) ...'``, before ``reduce('... c d -> c d')``), so its batch entropy equals its
per-sample entropy; fastvq's masked losses are compared with vector-quantize-pytorch's on the kept rows alone.

Skipped, with the reason, when vector_quantize_pytorch is not installed (it is a test extra).
"""
import math

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch (the peer) is not installed")
lfq_module = pytest.importorskip("vector_quantize_pytorch.lookup_free_quantization")


# ---- the README examples, with `from fastvq.nn import LFQ` as the only change ---------------------------------

def test_readme_lfq_image():
    from fastvq.nn import LFQ

    # you can specify either dim or codebook_size
    # if both specified, will be validated against each other

    quantizer = LFQ(
        codebook_size = 65536,      # codebook size, must be a power of 2
        dim = 16,                   # this is the input feature dimension, defaults to log2(codebook_size) if not defined
        entropy_loss_weight = 0.1,  # how much weight to place on entropy loss
        diversity_gamma = 1.        # within entropy loss, how much weight to give to diversity of codes, taken from https://arxiv.org/abs/1911.05894
    )

    image_feats = torch.randn(1, 16, 32, 32)

    quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.)  # you may want to experiment with temperature

    # (1, 16, 32, 32), (1, 32, 32), ()

    assert (quantized == quantizer.indices_to_codes(indices)).all()
    assert quantized.shape == (1, 16, 32, 32) and indices.shape == (1, 32, 32) and entropy_aux_loss.shape == ()


def test_readme_lfq_sequence_and_video():
    from fastvq.nn import LFQ

    quantizer = LFQ(
        codebook_size = 65536,
        dim = 16,
        entropy_loss_weight = 0.1,
        diversity_gamma = 1.
    )

    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)

    assert seq.shape == quantized.shape

    video_feats = torch.randn(1, 16, 10, 32, 32)
    quantized, *_ = quantizer(video_feats)

    assert video_feats.shape == quantized.shape


def test_readme_lfq_multiple_codebooks():
    from fastvq.nn import LFQ

    quantizer = LFQ(
        codebook_size = 4096,
        dim = 16,
        num_codebooks = 4  # 4 codebooks, total codebook dimension is log2(4096) * 4
    )

    image_feats = torch.randn(1, 16, 32, 32)

    quantized, indices, entropy_aux_loss = quantizer(image_feats)

    # (1, 16, 32, 32), (1, 32, 32, 4), ()

    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()
    assert indices.shape == (1, 32, 32, 4)


# ---- against vector_quantize_pytorch.LFQ ----------------------------------------------------------------------

PEERS = {
    "readme": dict(codebook_size=256, dim=8),
    "codebooks-projections": dict(codebook_size=64, dim=20, num_codebooks=3, commitment_loss_weight=0.5),
    "spherical-scale": dict(codebook_size=128, num_codebooks=2, spherical=True, codebook_scale=2.0,
                            commitment_loss_weight=0.25),
    "clamp-gamma": dict(codebook_size=32, soft_clamp_input_value=1.5, diversity_gamma=2.0,
                        entropy_loss_weight=0.3, commitment_loss_weight=0.1),
    "softplus": dict(codebook_size=16, experimental_softplus_entropy_loss=True, entropy_loss_offset=3.0),
}


def pair(config):
    from fastvq.nn import LFQ
    torch.manual_seed(3)
    theirs = vqp.LFQ(**config)
    ours = LFQ(**config)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)  # the projections
    assert set(unexpected) == {"mask"} and set(missing) <= {"usage_counts"}
    return ours, theirs


def run_both(ours, theirs, x, mask=None, inv_temperature=100.0):
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (o, ob) = ours(xo, inv_temperature=inv_temperature, mask=mask, return_loss_breakdown=True)
    (t, tb) = theirs(xt, inv_temperature=inv_temperature, mask=mask, return_loss_breakdown=True)
    return (o, ob, xo), (t, tb._asdict(), xt)


@pytest.mark.parametrize("config", PEERS.values(), ids=PEERS.keys())
@pytest.mark.parametrize("masked", [False, True])
def test_against_vector_quantize_pytorch(config, masked, monkeypatch):
    # vector-quantize-pytorch with its 1e-5 clamp lowered to tiny: the exact entropy, as fastvq computes it
    tiny = torch.finfo(torch.float32).tiny
    monkeypatch.setattr(lfq_module, "log", lambda t, eps=tiny: t.clamp(min=eps).log())
    ours, theirs = pair(config)
    x = torch.randn(2, 37, theirs.dim) * 0.1
    mask = torch.rand(2, 37) > 0.3 if masked else None
    (o, ob, xo), (t, tb, xt) = run_both(ours, theirs, x, mask, inv_temperature=10.0)
    kept = slice(None) if mask is None else mask
    assert torch.equal(o.indices[kept], t.indices[kept])
    # bit-identical, except spherical codes: m = scale / sqrt(d) here, l2norm(+-scale) * scale (float32) there
    ulp = dict(rtol=2.5e-7, atol=0) if ours.spherical else dict(rtol=0, atol=0)
    torch.testing.assert_close(o.quantized[kept], t.quantized[kept], **ulp)
    if masked:
        # vector-quantize-pytorch 1.32.0 flattens the kept rows with the codebook dim before averaging, so with
        # a mask its batch entropy is the per-sample entropy; the losses to match are those of the kept rows
        torch.testing.assert_close(tb["batch_entropy"], tb["per_sample_entropy"])
        theirs.zero_grad()
        (t, tb, xt) = run_both(ours, theirs, x[mask][None], inv_temperature=10.0)[1]
    torch.testing.assert_close(ob["per_sample_entropy"], tb["per_sample_entropy"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ob["codebook_entropy"], tb["batch_entropy"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ob["commitment"], tb["commitment"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(o.loss, t.entropy_aux_loss, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(o.quantized[kept])
    (o.loss + (o.quantized[kept] * w).sum()).backward()
    (t.entropy_aux_loss + (t.quantized.reshape(w.shape) * w).sum()).backward()
    torch.testing.assert_close(xo.grad[kept], xt.grad.reshape(w.shape[:-1] + (-1,)), rtol=1e-4, atol=1e-6)
    if masked:
        assert bool((xo.grad[~mask] == 0).all())
    # eval: both return the codes and a zero loss
    o, t = ours.eval()(x), theirs.eval()(x)
    assert torch.equal(o.indices, t.indices)
    torch.testing.assert_close(o.quantized, t.quantized, **ulp)
    assert o.loss.item() == 0.0 and t.entropy_aux_loss.item() == 0.0
    torch.testing.assert_close(ours.indices_to_codes(o.indices), theirs.indices_to_codes(t.indices), **ulp)


def test_entropy_clamp_difference():
    """Unpatched vector-quantize-pytorch: equal where no code probability is below 1e-5; with 2^18 codes,
    its codebook entropy saturates at log(1e5) while fastvq's is the exact value near 18 log 2."""
    ours, theirs = pair(dict(codebook_size=16))
    x = torch.randn(1, 64, 4) * 0.1
    (o, ob, _), (t, tb, _) = run_both(ours, theirs, x, inv_temperature=1.0)  # soft: every p > 1e-5
    torch.testing.assert_close(o.loss, t.entropy_aux_loss, rtol=1e-5, atol=1e-6)
    ours, theirs = pair(dict(codebook_size=2 ** 18))
    x = torch.randn(1, 64, 18) * 1e-3  # nearly uniform over 2^18 codes: every q[c] ~ 3.8e-6 < 1e-5
    (o, ob, _), (t, tb, _) = run_both(ours, theirs, x, inv_temperature=1.0)
    assert torch.equal(o.indices, t.indices)
    assert ob["codebook_entropy"].item() == pytest.approx(18 * math.log(2), abs=1e-3)
    assert tb["batch_entropy"].item() == pytest.approx(math.log(1e5), abs=1e-3)
