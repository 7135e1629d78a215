"""vector-quantize-pytorch's README examples for VectorQuantize, run on fastvq by changing only the import, and
compared with vector-quantize-pytorch itself on the same codebooks (its state dict loads into ours) and inputs:
identical indices wherever the best/second-best gap is clear, outputs and losses within float32 tolerance, and
the same EMA codebooks after a few training steps on the same data. k-means init and dead-code replacement
draw random vectors (each library its own way): those are compared by their statistics."""
import pytest
import torch
import torch.nn.functional as F

import fastvq.nn

vqp = pytest.importorskip("vector_quantize_pytorch",
                          reason="vector-quantize-pytorch (the peer library) is not installed: pip install "
                                 "vector-quantize-pytorch")

# README example -> (constructor keywords, input shape): the README's keywords and dims, with fewer tokens
# and codes (the README's 1,024 tokens and 8,196 codes take minutes on a CPU here)
EXAMPLES = {
    "basic": (dict(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0), (1, 256, 256)),
    "lower-codebook-dim": (dict(dim=256, codebook_size=256, codebook_dim=16), (1, 256, 256)),
    "cosine": (dict(dim=256, codebook_size=256, use_cosine_sim=True), (1, 256, 256)),
    "multi-head-shared": (dict(dim=256, codebook_dim=32, heads=8, separate_codebook_per_head=False,
                               codebook_size=512), (1, 256, 256)),
    "multi-head-separate": (dict(dim=256, codebook_dim=32, heads=8, separate_codebook_per_head=True,
                                 codebook_size=512), (1, 256, 256)),
    "image-fmap": (dict(dim=256, codebook_size=512, accept_image_fmap=True), (1, 256, 16, 16)),
    "sequence-channel-first": (dict(dim=64, codebook_size=128, channel_last=False), (2, 64, 100)),
}


def codebook_space(ours, x):
    """x in the module's input layout -> z [n, C, d] (per codebook rows) as the module searches them."""
    if ours.channel_first:
        x = x.movedim(1, -1)
    with torch.no_grad():
        z = ours._encode(x)
    return ours._rows(z)


def clear_choice(ours, x, margin=1e-4):
    """[n, C] bool: where the best code beats the second best by more than `margin` (float64 distances)."""
    z = codebook_space(ours, x).double()
    cb = ours.embed.detach().double()
    if ours.use_cosine_sim:
        dist = -torch.einsum("ncd,ckd->nck", z, F.normalize(cb, dim=-1))
    else:  # |z|^2 - 2 z.c + |c|^2 in float64
        dist = (z.square().sum(-1)[..., None] - 2 * torch.einsum("ncd,ckd->nck", z, cb)
                + cb.square().sum(-1)[None])
    two = dist.topk(2, dim=-1, largest=False).values
    return (two[..., 1] - two[..., 0]) > margin


def pair(kw, seed=0):
    torch.manual_seed(seed)
    theirs = vqp.VectorQuantize(**kw)
    ours = fastvq.nn.VectorQuantize(**kw)
    ours.load_state_dict(theirs.state_dict())  # same codebook, cluster sizes and projections
    return theirs, ours


def assert_same_step(theirs, ours, x, mask=None):
    clear = clear_choice(ours, x)  # on the codebooks before this step's update
    kwargs = {} if mask is None else {"mask": mask}
    q_t, idx_t, loss_t = theirs(x, **kwargs)
    q_o, idx_o, loss_o = ours(x, **kwargs)
    assert idx_o.shape == idx_t.shape and q_o.shape == q_t.shape == x.shape
    it, io = idx_t.reshape(clear.shape), idx_o.reshape(clear.shape)  # [n, C] rows per codebook
    assert clear.float().mean() > 0.95
    assert torch.equal(it[clear], io[clear])
    same = idx_t == idx_o  # positions where every head chose the same code: same output
    same = same.all(-1) if ours.heads > 1 else same
    if ours.channel_first:
        keep = same[:, None].expand_as(q_o)
    else:
        keep = same[..., None].expand_as(q_o)
    torch.testing.assert_close(q_o[keep], q_t[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-4, atol=1e-6)
    return idx_o


@pytest.mark.parametrize("example", EXAMPLES)
def test_readme_example_matches_peer(example):
    kw, shape = EXAMPLES[example]
    theirs, ours = pair(kw)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(shape, generator=g) for _ in range(3)]
    theirs.eval(), ours.eval()
    idx = assert_same_step(theirs, ours, xs[0])
    out_o, out_t = ours.get_output_from_indices(idx), theirs.get_output_from_indices(idx)
    if ours.heads > 1 and not ours.separate_codebook_per_head:  # theirs keeps the heads apart: [..., h, d]
        out_t = out_t.flatten(-2)
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-6)
    theirs.train(), ours.train()
    for x in xs:  # EMA training steps on the same data
        assert_same_step(theirs, ours, x)
    for name in ("embed", "cluster_size", "embed_avg"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs._codebook, name), rtol=1e-4, atol=1e-5)


def test_readme_masks_match_peer():
    theirs, ours = pair(dict(dim=256, codebook_size=512))
    x = torch.randn(2, 300, 256)
    mask = torch.arange(300) < torch.tensor([300, 170])[:, None]
    for _ in range(2):
        idx = assert_same_step(theirs, ours, x, mask)
        assert (idx[~mask] == -1).all()
    torch.testing.assert_close(ours.embed, theirs._codebook.embed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.cluster_size, theirs._codebook.cluster_size, rtol=1e-4, atol=1e-5)


def test_readme_kmeans_init_statistics():
    kw = dict(dim=256, codebook_size=256, kmeans_init=True, kmeans_iters=10)
    theirs, ours = pair(kw)
    x = torch.randn(16, 256)
    x = x[torch.randint(16, (1024,))] + 0.3 * torch.randn(1024, 256)  # 16 clusters
    theirs(x[None]), ours(x[None])
    assert bool(theirs._codebook.initted) and bool(ours.initted)
    theirs.eval(), ours.eval()
    err = [F.mse_loss(m(x[None])[0][0], x).item() for m in (theirs, ours)]
    assert err[1] < 1.1 * err[0]  # k-means of the same batch: as good a codebook
    torch.testing.assert_close(ours.cluster_size.sum(), theirs._codebook.cluster_size.sum(), rtol=1e-4, atol=0)


def test_readme_dead_codes_statistics():
    kw = dict(dim=256, codebook_size=512, threshold_ema_dead_code=2)
    theirs, ours = pair(kw)
    x = torch.randn(1, 512, 256)
    idx = assert_same_step(theirs, ours, x)  # the same choices, so the same codes die
    counts = torch.bincount(idx.flatten(), minlength=512).float()
    dead = torch.ones(512).lerp(counts, 1 - 0.8) < 2  # EMA count below the threshold
    assert dead.sum() > 100
    torch.testing.assert_close(ours.cluster_size, theirs._codebook.cluster_size)
    assert (ours.cluster_size[0, dead] == 2.0).all()  # reset to the threshold
    rows = x[0]
    for vq_codes in (theirs._codebook.embed[0], ours.embed[0]):
        d = (vq_codes[dead][:, None] - rows[None]).abs().amax(-1).min(-1).values
        assert d.max() == 0  # each replacement is a vector of the batch
