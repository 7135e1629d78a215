"""Helpers the four tokenizer test files share (not a test module): a tiny frozen perceptual network, seeded
images, and the checkpoint checks every tokenizer must pass."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvq.losses import PerceptualFeatureLoss
from fastvq.models import from_pretrained
from fastvq.models.tokenizer import WEIGHTS_NAME


class FakeFeatures(nn.Module):
    """A frozen two-level conv network with the multi-scale ``features`` interface PerceptualFeatureLoss reads."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def features(self, x):
        a = F.gelu(self.c1(x))
        return [a, self.c2(a)]


def fake_perceptual_loss() -> PerceptualFeatureLoss:
    """The perceptual term over :class:`FakeFeatures`: the real loss's code path, no download, milliseconds."""
    return PerceptualFeatureLoss(FakeFeatures(), levels=(0, 1), input_range=(-1.0, 1.0))


def seeded_images(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """``[b, 3, h, w]`` uniform in ``[-1, 1]`` from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def check_save_load_round_trip(model, tmp_path, x: torch.Tensor, **encode_kwargs) -> None:
    """``save_pretrained`` then ``from_pretrained`` (the generic loader and the class's own) gives the same
    class, config and state, and the same indices and decoded images on ``x``."""
    model.eval()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model"] == model.model_name
    loaded = from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        a, b = model.encode(x, **encode_kwargs), loaded.encode(x, **encode_kwargs)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(model.decode_indices(a.indices, a.extras), loaded.decode_indices(b.indices, b.extras))
    assert type(type(model).from_pretrained(tmp_path)) is type(model)


def check_strict_load_errors(model, tmp_path, drop_key: str, widen: tuple[str, int]) -> None:
    """``from_pretrained`` names a missing and an unexpected key, a shape mismatch (config field ``widen``
    changed), and a directory without a checkpoint."""
    from safetensors.torch import load_file, save_file
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    del state[drop_key]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    missing = re.escape(f"missing keys ['{drop_key}']")
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{missing}.*unexpected keys \['extra\.weight'\]"):
        from_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"][widen[0]] = widen[1]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape mismatches"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "nowhere")
