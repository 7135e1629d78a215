"""fastvq.models.vqgan, the single-codebook baseline: presets, shapes, consistency, gradients, EMA codebook steps,
training, compile, checkpoints, errors. The tiny preset (and a micro variant) on CPU; the default config on meta."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fastvq.losses import PerceptualFeatureLoss, adaptive_gan_weight, hinge_g_loss
from fastvq.models import VQGAN, Tokenizer, TokenizerOutput, VQGANConfig, from_preset, from_pretrained, list_presets
from fastvq.models.tokenizer import WEIGHTS_NAME, config_from_dict, config_to_dict


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: OpenMP barriers cost more than they save on the shared 2 cores
    yield
    torch.set_num_threads(before)


class FakeFeatures(nn.Module):
    """A frozen two-level conv network with the multi-scale ``features`` interface PerceptualFeatureLoss reads."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def features(self, x):
        a = F.gelu(self.c1(x))
        return [a, self.c2(a)]


def tiny(**overrides) -> VQGAN:
    model = from_preset("vqgan-tiny", **overrides)
    model.set_perceptual_loss(PerceptualFeatureLoss(FakeFeatures(), levels=(0, 1), input_range=(-1.0, 1.0)))
    return model


def images(b=4, h=64, w=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_presets_and_config_round_trip():
    assert {"vqgan-tiny", "vqgan-small"} <= set(list_presets())
    model = from_preset("vqgan-tiny")
    assert isinstance(model, VQGAN) and isinstance(VQGAN.from_preset("vqgan-tiny"), Tokenizer)
    cfg = model.config
    assert (cfg.image_size, cfg.downsample, cfg.codebook_size, cfg.codebook_dim) == (64, 16, 1024, 8)
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 600_000  # sized like unitok-tiny (530,628)
    back = config_from_dict(VQGANConfig, json.loads(json.dumps(config_to_dict(cfg))), "test")
    assert back == cfg and isinstance(back.channel_mult, tuple)
    with pytest.raises(ValueError, match="VQGANConfig: image_size 60 must be a multiple of 16"):
        from_preset("vqgan-tiny", image_size=60)
    with pytest.raises(ValueError, match="VQGANConfig: channel_mult must be a non-empty tuple"):
        from_preset("vqgan-tiny", channel_mult=())


def test_tiny_shapes_and_single_codebook():
    model = tiny().eval()
    x = images(2, 64, 96)  # any multiple of 16, non-square too
    out = model.encode(x)
    assert isinstance(out, TokenizerOutput) and out.extras == {}
    assert out.indices.shape == (2, 4, 6) and out.indices.dtype == torch.int64
    assert 0 <= out.indices.min() and out.indices.max() < 1024
    assert out.quantized.shape == (2, 8, 4, 6)
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(2, 4, 6))  # unit-norm codes
    assert model.quantizer.embed.shape == (1, 1024, 8)  # one codebook
    assert model.decode_indices(out.indices).shape == x.shape
    rec, losses = model.train()(x, ["ignored", "captions"])
    assert rec.shape == x.shape
    assert set(losses) == {"l1", "l2", "perceptual", "vq", "commitment", "codebook", "loss"}
    torch.testing.assert_close(losses["loss"], losses["l2"] + losses["perceptual"] + 0.25 * losses["commitment"])


def test_default_config_shapes_with_fake_tensors():
    with torch.device("meta"):
        model = VQGAN(VQGANConfig(perceptual_weight=0.0))
    assert model.config.downsample == 16
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        z = model.encoder(torch.empty(1, 3, 256, 256))
        assert z.shape == (1, 256, 16, 16)
        assert model.decode_quantized(torch.empty(1, 8, 16, 16)).shape == (1, 3, 256, 256)


def test_decode_indices_equals_eval_forward():
    model = tiny().eval()
    x = images()
    with torch.no_grad():
        rec, losses = model(x)
        assert torch.equal(model.decode_indices(model.encode(x).indices), rec)
    assert losses["vq"] == 0


def test_gradients_reach_every_parameter_and_the_codebook_is_an_ema():
    model = tiny().train()
    perceptual = model._frozen["perceptual"]
    _, losses = model(images())
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "quantizer.embed" not in dict(model.named_parameters())  # a buffer, moved by the EMA
    assert all(not p.requires_grad and p.grad is None for p in perceptual.parameters())
    assert not any(k.startswith("c1.") for k in model.state_dict())


def test_manual_codebook_step_applies_the_ema_once():
    model = tiny(perceptual_weight=0.0, dead_code_threshold=0.0).train()
    model.quantizer.manual_ema_update = True
    before = model.quantizer.embed.clone()
    model(images(2, seed=1))
    model(images(2, seed=2))
    assert torch.equal(model.quantizer.embed, before) and int(model.quantizer.update_steps) == 0
    model.quantizer.update_codebook()
    assert int(model.quantizer.update_steps) == 1 and not torch.equal(model.quantizer.embed, before)
    assert int(model.quantizer.usage_counts.sum()) == 2 * 2 * 16


def test_one_optimizer_step_lowers_the_loss():
    model = tiny().train()
    x = images()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, before = model(x)
    before["loss"].backward()
    opt.step()
    opt.zero_grad()
    _, after = model(x)
    assert after["loss"] < before["loss"] - 1e-3, (before["loss"].item(), after["loss"].item())


def test_last_layer_feeds_the_adaptive_gan_weight():
    model = tiny(perceptual_weight=0.0).train()
    assert model.last_layer is model.decoder.conv_out.weight
    rec, losses = model(images())
    w = adaptive_gan_weight(losses["loss"], hinge_g_loss(rec.mean((1, 2, 3))), model.last_layer)
    assert w.dim() == 0 and torch.isfinite(w) and w > 0


def test_bf16_autocast_keeps_the_quantizer_in_fp32_and_picks_its_codes():
    model = tiny(perceptual_weight=0.0).eval()
    x = images(2)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x))
        fp32 = model.quantizer(z).indices
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.encoder(x)
            q = model.quantizer(z)
    assert h.dtype == torch.bfloat16 and torch.equal(q.indices, fp32)


def test_compile_encoder():
    """One graph, no breaks; aot_eager traces forward and backward without inductor's code generation."""
    model = tiny().train()
    x = images(2)
    compiled = torch.compile(model.encoder, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), model.encoder(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), model.encoder.conv_in.weight)[0]
    g_want = torch.autograd.grad(want.square().sum(), model.encoder.conv_in.weight)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-4)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(images())[1]["loss"].backward()  # the EMA moved the codebook, usage counted
    opt.step()
    model.eval().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model"] == "vqgan" and meta["config"]["channel_mult"] == [1, 1, 2, 2, 3]
    loaded = from_pretrained(tmp_path).eval()
    assert type(loaded) is VQGAN and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = images()
    with torch.no_grad():
        a, b = model.encode(x), loaded.encode(x)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(model.decode_indices(a.indices), loaded.decode_indices(b.indices))


def test_from_pretrained_strict_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    del state["quant_conv.bias"]
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing keys \['quant_conv\.bias'\]"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (2, 3, 60, 64), (3, 64, 64)])
def test_bad_images(shape):
    model = tiny()
    with pytest.raises(ValueError, match=r"VQGAN: images must be \[B, 3, H, W\].*multiples of 16"):
        model.encode(torch.zeros(shape))


def test_bad_indices_and_dtype():
    model = tiny()
    with pytest.raises(ValueError, match=r"VQGAN.decode_indices: indices must be integer \[B, h, w\]"):
        model.decode_indices(torch.zeros(2, 4, 4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="VQGAN: images must be a float tensor"):
        model.encode(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"VectorQuantize: .*indices"):
        model.decode_indices(torch.full((1, 4, 4), 1024))
