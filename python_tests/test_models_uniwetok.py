"""fastvq.models.uniwetok: shapes, the binary code and its bit order, the decoder's noise, consistency, gradients,
training, compile, checkpoints, errors. The tiny preset on CPU; the small and paper presets with fake tensors."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fastvq.losses import adaptive_gan_weight, non_saturating_g_loss
from fastvq.models import Tokenizer, TokenizerOutput, UniWeTok, UniWeTokConfig, from_preset, from_pretrained, \
    list_presets
from fastvq.models.tokenizer import config_from_dict, config_to_dict
from fastvq.models.uniwetok import DepthToSpaceUpsample, RegisterAttention, siglu
from tokenizer_testing import check_save_load_round_trip, check_strict_load_errors, fake_perceptual_loss, seeded_images


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class FakeTeacher(nn.Module):
    """A frozen distillation teacher: images in [0, 1] → tokens [B, 9, 16] on a 3x3 grid (not the tokenizer's
    grid, so the pooling to it is exercised)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.seen = None

    def forward(self, images):
        self.seen = images
        return F.adaptive_avg_pool2d(self.conv(images), 3).flatten(2).transpose(1, 2)


def tiny(**overrides) -> UniWeTok:
    model = from_preset("uniwetok-tiny", **overrides)
    model.set_perceptual_loss(fake_perceptual_loss())
    if model.config.distill_weight > 0:
        model.set_distill_encoder(FakeTeacher())
    return model


def images(b=4, h=32, w=32, seed=1):
    return seeded_images(b, h, w, seed)


# ---- presets and shapes --------------------------------------------------------------------------------------------

def test_presets_and_config_round_trip():
    assert {"uniwetok-tiny", "uniwetok-small", "uniwetok-paper"} <= set(list_presets())
    assert isinstance(UniWeTok.from_preset("uniwetok-tiny"), Tokenizer)
    cfg = from_preset("uniwetok-tiny", ch=64, num_heads=4).config
    assert (cfg.ch, cfg.num_heads, cfg.image_size, cfg.downsample) == (64, 4, 64, 16)
    back = config_from_dict(UniWeTokConfig, json.loads(json.dumps(config_to_dict(cfg))), "test")
    assert back == cfg and isinstance(back.ch_mult, tuple)
    with pytest.raises(ValueError, match="unknown preset 'uniwetok-huge'"):
        from_preset("uniwetok-huge")
    with pytest.raises(ValueError, match="uniwetok-tiny.*no_such_field"):
        from_preset("uniwetok-tiny", no_such_field=1)


@pytest.mark.parametrize("overrides, match", [
    (dict(ch=40), r"UniWeTokConfig: every width .* divisible by norm_groups=32, got widths \[40, 40, 80, 80, 80\]"),
    (dict(num_heads=3), r"UniWeTokConfig: the top width 64 must split into num_heads=3"),
    (dict(num_heads=32), r"UniWeTokConfig: the top width 64 .* multiple of 4"),
    (dict(code_bits=100), r"UniWeTokConfig: code_bits=100 must be a positive multiple of group_bits=8"),
    (dict(bit_order="big"), r"UniWeTokConfig: bit_order must be 'msb' or 'lsb', got 'big'"),
    (dict(image_size=72), r"UniWeTokConfig: image_size 72 must be a multiple of 16"),
    (dict(attn_blocks=0), r"UniWeTokConfig: num_res_blocks and attn_blocks must be >= 1"),
    (dict(distill_weight=-1.0), r"UniWeTokConfig: distill_weight must be >= 0"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        from_preset("uniwetok-tiny", **overrides)


def test_tiny_shapes_and_the_binary_code():
    model = tiny().eval()
    cfg = model.config
    x = images(2, 32, 64)  # no position table: any multiple of 16, non-square grids too
    with torch.no_grad():
        out = model.encode(x)
        latent = model.encoder(x)  # [B, 128, h, w]
    assert isinstance(out, TokenizerOutput) and out.extras == {"grid": (2, 4)}
    assert latent.shape == (2, 128, 2, 4) and latent.dtype == torch.float32
    assert latent.abs().max() < 1  # SigLu bounds the latent inside the codes ±1
    assert out.indices.shape == (2, 8, 16) and out.indices.dtype == torch.int64
    assert out.quantized.shape == (2, 8, 128)
    tokens = latent.flatten(2).transpose(1, 2)  # [B, h·w, 128], row-major
    torch.testing.assert_close(out.quantized, torch.where(tokens > 0, 1.0, -1.0), rtol=0, atol=0)
    # index of group g: sum_j [z[8g + j] > 0] 2^j (bit_order="lsb", BitDance's GFQ)
    bits = (tokens > 0).long().view(2, 8, 16, 8)
    assert torch.equal(out.indices, (bits * 2 ** torch.arange(8)).sum(-1))
    assert 0 <= out.indices.min() and out.indices.max() < 256 and cfg.num_codebooks == 16
    assert model.decode_indices(out.indices, out.extras).shape == x.shape
    rec, losses = model.train()(x)
    assert rec.shape == x.shape
    assert set(losses) == {"l1", "l2", "perceptual", "vq", "per_sample_entropy", "codebook_entropy", "commitment",
                           "loss"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_msb_bit_order_reverses_each_group():
    x = images(2)
    a, b = tiny().eval(), tiny(bit_order="msb").eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        ia, ib = a.encode(x).indices, b.encode(x).indices
    bits = (ia[..., None] >> torch.arange(8)) & 1  # lsb-first bits of a's indices
    assert torch.equal(ib, (bits * 2 ** torch.arange(7, -1, -1)).sum(-1))


def test_small_preset_shapes_with_fake_tensors():
    with torch.device("meta"):
        model = from_preset("uniwetok-small", perceptual_weight=0.0)
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 30e6
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        out = model.eval().encode(torch.empty(2, 3, 128, 128))
        assert out.indices.shape == (2, 16, 16) and out.quantized.shape == (2, 16, 128)
        assert model.decode_indices(out.indices, out.extras).shape == (2, 3, 128, 128)
        rec, losses = model.train()(torch.empty(2, 3, 128, 128))
        assert rec.shape == (2, 3, 128, 128) and losses["loss"].shape == ()


def _paper_count(c: UniWeTokConfig) -> tuple[int, int, int]:
    """The model's size in closed form from the layer list (UniWeTok's module, fastvq's blocks)."""
    def conv(i, o, k):
        return i * o * k * k + o

    def resblock(i, o):
        return 2 * i + conv(i, o, 3) + 2 * o + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    def attn(d):
        h = int(d * c.mlp_ratio)
        vit = 2 * d + d * 3 * d + d * d + d + 2 * d + 2 * (d * h + h) + h * d + d  # qkv without bias
        return c.num_registers * d + c.attn_blocks * vit

    n, z = c.num_res_blocks, c.code_bits
    w = [c.ch * m for m in c.ch_mult]
    encoder = (conv(3, w[0], 3) + sum(n * resblock(a, a) for a in w) + sum(conv(a, b, 3) for a, b in zip(w, w[1:]))
               + attn(w[-1]) + 2 * w[-1] + conv(w[-1], z, 1))
    r = w[::-1]
    ins = [r[0]] + r[:-1]
    decoder = (conv(2 * z, r[0], 3) + attn(r[0]) + n * resblock(r[0], r[0])
               + sum(2 * (2 * z * i + i) + resblock(i, o) + (n - 1) * resblock(o, o) for i, o in zip(ins, r))
               + sum(conv(o, 4 * o, 3) for o in r[:-1]) + 2 * r[-1] + conv(r[-1], 3, 3))
    return encoder, decoder, encoder + decoder


PAPER_PARAMS = 1_618_394_499  # fastvq's count of this configuration; UniWeTok publishes none reachable here


def test_paper_preset_on_meta_parameter_count():
    with torch.device("meta"):
        model = from_preset("uniwetok-paper")
    cfg = model.config
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.downsample, (cfg.image_size // cfg.downsample) ** 2) == (
        256, (1, 1, 2, 2, 4, 8), 4, 32, 64)
    assert (cfg.code_bits, cfg.group_bits, cfg.num_codebooks, cfg.bit_order) == (128, 8, 16, "lsb")
    assert (cfg.attn_blocks, cfg.num_heads, cfg.num_registers, int(2048 * cfg.mlp_ratio)) == (2, 16, 4, 5632)
    assert (cfg.l1_weight, cfg.perceptual_weight, cfg.entropy_weight, cfg.commitment_weight, cfg.inv_temperature,
            cfg.gan_weight, cfg.distill_weight) == (1.0, 1.0, 0.1, 0.25, 100.0, 0.1, 0.0)
    encoder, decoder, total = _paper_count(cfg)
    assert sum(p.numel() for p in model.encoder.parameters()) == encoder == 555_599_232
    assert sum(p.numel() for p in model.decoder.parameters()) == decoder == 1_062_795_267
    assert sum(p.numel() for p in model.parameters()) == total == PAPER_PARAMS
    assert not any(n.startswith("distill_proj") for n, _ in model.named_parameters())


def test_paper_preset_shapes_with_fake_tensors():
    with torch.device("meta"):
        model = from_preset("uniwetok-paper", perceptual_weight=0.0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        x = torch.empty(1, 3, 256, 256)
        out = model.eval().encode(x)
        assert out.indices.shape == (1, 64, 16) and out.quantized.shape == (1, 64, 128)
        assert model.decode_indices(out.indices).shape == (1, 3, 256, 256)
        assert model.encoder.attn(torch.empty(1, 2048, 8, 8)).shape == (1, 2048, 8, 8)
        rec, losses = model.train()(x)
        assert rec.shape == (1, 3, 256, 256) and losses["loss"].shape == ()


# ---- blocks of this model ------------------------------------------------------------------------------------------

def test_siglu_and_depth_to_space_order():
    x = torch.linspace(-6, 6, 25, dtype=torch.float64)
    torch.testing.assert_close(siglu(x), torch.tanh(x / 2), rtol=0, atol=1e-15)
    up = DepthToSpaceUpsample(3)
    x = torch.randn(2, 3, 4, 5)
    y, conv = up(x), up.conv(x)  # [2, 3, 8, 10], [2, 12, 4, 5]
    for i in range(2):
        for j in range(2):  # output (c, 2y + i, 2x + j) is conv channel (2i + j)·C + c at (y, x)
            assert torch.equal(y[:, :, i::2, j::2], conv[:, (2 * i + j) * 3:(2 * i + j + 1) * 3])


def test_register_attention_is_the_block_on_registers_then_grid_tokens():
    stage = RegisterAttention(32, 1, 2, 2.0, num_registers=4, rope_base=1e4).double()
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    y = stage(x)
    assert y.shape == x.shape and stage.registers.shape == (4, 32)
    # attention with registers equals the block on [registers; grid tokens] with grid=(3, 5), num_prefix=4
    tokens = torch.cat((stage.registers.expand(2, -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
    want = stage.blocks[0](tokens, grid=(3, 5), num_prefix=4)[:, 4:].transpose(1, 2).reshape(2, 32, 3, 5)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    # the registers reach the output: changing them changes it (a random change: LayerNorm removes a constant)
    with torch.no_grad():
        stage.registers.add_(torch.randn(4, 32, dtype=torch.float64))
    assert not torch.allclose(stage(x), y)


# ---- the decoder's noise, consistency ------------------------------------------------------------------------------

def test_decode_indices_equals_eval_forward():
    model = tiny().eval()
    x = images(3)
    with torch.no_grad():
        rec, losses = model(x)
        out = model.encode(x)
        assert torch.equal(model.decode_indices(out.indices, out.extras), rec)
        assert torch.equal(model.decode_indices(out.indices), rec)  # a square grid needs no extras
        again, _ = model(x)
        one = model.decode_indices(out.indices[2:3])  # one image alone: the same noise field
    assert torch.equal(again, rec)
    torch.testing.assert_close(one, rec[2:3], rtol=1e-5, atol=1e-5)
    assert losses["vq"] == 0  # no auxiliary loss in eval mode


def test_decoder_noise_fixed_field_and_seedable_training_noise():
    model = tiny(noise_seed=7, perceptual_weight=0.0)
    codes = torch.ones(3, 128, 2, 3)
    field = model.decoder_noise(codes, random=False)
    want = torch.randn(128, 2, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(field, want.expand(3, -1, -1, -1))
    drawn = model.decoder_noise(codes, random=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randn(3, 128, 2, 3, generator=torch.Generator().manual_seed(3)))
    model.train()
    x = images(2)
    with torch.no_grad():
        a, _ = model(x, generator=torch.Generator().manual_seed(5))
        b, _ = model(x, generator=torch.Generator().manual_seed(5))
        c, _ = model(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)  # the decoder sees the noise


# ---- losses, gradients, training ----------------------------------------------------------------------------------

def test_losses_are_the_documented_weighted_sum():
    model = tiny(distill_weight=0.5, distill_dim=16, l2_weight=0.3).train()
    x = images(2)
    rec, losses = model(x)
    with torch.no_grad():
        z = model.encoder(x).flatten(2).transpose(1, 2)  # the same latent (no randomness before the decoder)
    torch.testing.assert_close(losses["commitment"], (z - torch.where(z > 0, 1.0, -1.0)).square().mean())
    torch.testing.assert_close(losses["vq"], 0.1 * (losses["per_sample_entropy"] - losses["codebook_entropy"])
                               + 0.25 * losses["commitment"])
    torch.testing.assert_close(losses["l1"], (rec - x).abs().mean())
    want = (losses["l1"] + 0.3 * losses["l2"] + losses["perceptual"] + losses["vq"]
            + 0.5 * (losses["distill_pre"] + losses["distill_post"]) / 2)
    torch.testing.assert_close(losses["loss"], want)
    assert 0 < losses["codebook_entropy"] <= math.log(256) + 1e-5


def test_distillation_against_a_hand_computation():
    model = tiny(distill_weight=1.0, distill_dim=16, perceptual_weight=0.0).train()
    teacher = model._frozen["distill"]
    x = images(2, 64, 64)  # a 4x4 token grid: the teacher's 3x3 grid is pooled up to it
    _, losses = model(x)
    torch.testing.assert_close(teacher.seen, (x + 1) / 2)  # the teacher sees [0, 1] images
    with torch.no_grad():
        z = model.encoder(x).flatten(2).transpose(1, 2)  # [2, 16, 128]
        t = teacher((x + 1) / 2)                          # [2, 9, 16] on a 3x3 grid
        t = F.adaptive_avg_pool2d(t.transpose(1, 2).reshape(2, 16, 3, 3), (4, 4)).flatten(2).transpose(1, 2)
        for key, s in (("distill_pre", z), ("distill_post", torch.where(z > 0, 1.0, -1.0))):
            cos = F.cosine_similarity(model.distill_proj(s), t, dim=-1)
            torch.testing.assert_close(losses[key], (1 - cos).mean())


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one():
    model = tiny(distill_weight=1.0, distill_dim=16).train()
    perceptual, teacher = model._frozen["perceptual"], model._frozen["distill"]
    _, losses = model(images())
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = list(perceptual.parameters()) + list(teacher.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert not any(n.startswith(("conv.", "encoder.c1")) for n in model.state_dict())  # frozen nets: no submodules


def test_one_optimizer_step_lowers_the_loss():
    model = tiny().train()
    x = images(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, before = model(x, generator=torch.Generator().manual_seed(0))
    before["loss"].backward()
    opt.step()
    opt.zero_grad()
    _, after = model(x, generator=torch.Generator().manual_seed(0))
    assert after["loss"] < before["loss"] - 1e-3, (before["loss"].item(), after["loss"].item())


def test_last_layer_feeds_the_adaptive_gan_weight():
    model = tiny(perceptual_weight=0.0).train()
    assert model.last_layer is model.decoder.conv_out.weight
    rec, losses = model(images())
    w = adaptive_gan_weight(losses["loss"], non_saturating_g_loss(rec.mean((1, 2, 3))), model.last_layer)
    assert w.dim() == 0 and torch.isfinite(w) and w > 0


def test_bf16_autocast_keeps_the_quantizer_in_fp32():
    model = tiny(perceptual_weight=0.0).eval()
    x = images(2)
    with torch.no_grad():
        want = model.encode(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            top = model.encoder.conv_in(x)
            got = model.encode(x)
    assert top.dtype == torch.bfloat16 and got.quantized.dtype == torch.float32
    agree = (got.quantized == want.quantized).float().mean()
    assert agree > 0.9  # bf16 convolutions flip only the bits nearest zero


def test_compile_encoder():
    """One graph, no breaks (fullgraph); aot_eager traces forward and backward through AOTAutograd without
    inductor's code generation (minutes on the 2-core test machine)."""
    model = tiny().train()
    x = images(2)
    compiled = torch.compile(model.encoder, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    want = model.encoder(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), model.encoder.conv_in.weight)[0]
    g_want = torch.autograd.grad(want.square().sum(), model.encoder.conv_in.weight)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-4)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny(distill_weight=1.0, distill_dim=16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # move away from the initialisation, usage counters too
    model(images())[1]["loss"].backward()
    opt.step()
    check_save_load_round_trip(model, tmp_path, images())
    assert json.loads((tmp_path / "config.json").read_text())["config"]["ch_mult"] == [1, 1, 2, 2, 2]
    assert from_pretrained(tmp_path).state_dict()["quantizer.usage_counts"].sum() == 4 * 4 * 16  # B x tokens x groups


def test_from_pretrained_strict_errors(tmp_path):
    check_strict_load_errors(tiny(), tmp_path, drop_key="decoder.conv_out.bias", widen=("ch", 64))


# ---- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (2, 3, 60, 64), (3, 64, 64)])
def test_bad_images(shape):
    model = tiny()
    with pytest.raises(ValueError, match=r"UniWeTok: images must be \[B, 3, H, W\].*multiples of 16"):
        model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="UniWeTok: images"):
        model(torch.zeros(shape))


def test_bad_indices_texts_dtype_and_teacher():
    model = tiny()
    with pytest.raises(ValueError, match=r"UniWeTok.decode_indices: indices must be int64 \[B, h·w, 16\]"):
        model.decode_indices(torch.zeros(2, 16, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must be int64 .* got torch.int32"):
        model.decode_indices(torch.zeros(2, 16, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"extras\['grid'\] must be \(h, w\) with h·w = 16 tokens"):
        model.decode_indices(torch.zeros(2, 16, 16, dtype=torch.long), {"grid": (2, 4)})
    with pytest.raises(ValueError, match=r"extras\['grid'\] must be .* got \(3, 3\)"):
        model.decode_indices(torch.zeros(2, 10, 16, dtype=torch.long))  # not square and no grid
    with pytest.raises(ValueError, match="UniWeTok: images must be a float tensor"):
        model.encode(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="UniWeTok.forward: texts must be None"):
        model(images(), ["a caption"] * 4)
    distilling = tiny(distill_weight=1.0, distill_dim=32)  # the teacher gives 16-d tokens
    with pytest.raises(ValueError, match=r"teacher must return tokens \[B, T, 32\] .* got \[4, 9, 16\]"):
        distilling(images())


def test_dataclass_fields_are_documented():
    doc = UniWeTokConfig.__doc__
    for f in dataclasses.fields(UniWeTokConfig):
        if f.name not in ("image_size", "in_channels"):
            assert f"``{f.name}``" in doc, f.name
