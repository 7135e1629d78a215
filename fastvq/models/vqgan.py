"""A plain single-codebook VQGAN (Esser et al. 2021, "Taming Transformers"; the LlamaGen VQ tokenizer's shape):
the baseline the unified tokenizers are compared against (docs/models.md, "VQGAN baseline").

::

    images [B, 3, H, W] in [-1, 1]
      Encoder          conv_in, per level: num_res_blocks ResBlocks (+ Downsample but the last),
                       mid ResBlock / attention / ResBlock, GN + SiLU + conv_out       -> [B, z_channels, h, w]
      quant_conv       1x1 conv z_channels -> codebook_dim                              -> [B, codebook_dim, h, w]
      quantizer        fastvq.nn.VectorQuantize: ONE codebook of codebook_size codes    -> indices [B, h, w]
      post_quant_conv  1x1 conv codebook_dim -> z_channels
      Decoder          conv_in, mid, per level (reversed): num_res_blocks + 1 ResBlocks (+ Upsample),
                       GN + SiLU + conv_out (its weight is last_layer)                 -> [B, 3, H, W]

``h = H / 2^(levels - 1)``. The architecture is taming's ``Encoder``/``Decoder`` (ResBlocks with GroupNorm and
SiLU, single-head spatial attention in the middle, 2x nearest upsampling + conv); the defaults are LlamaGen's
VQ-16 widths (128 x (1, 1, 2, 2, 4), 2 ResBlocks per level, z 256, a 16,384 x 8-d codebook of unit-norm codes).
What fastvq does differently, and why:

* the codebook is learned by **EMA** (VQ-VAE-2; ``VectorQuantize(ema_update=True)``) with optional dead-code
  replacement, not by a codebook loss: the statistics are updated once per optimizer step by the trainer
  (``update_codebook``), which is the behaviour this baseline exists to exercise;
* taming's attention at the 16-px level of the paper model is kept only in the middle block;
* the perceptual term is ``fastvq.losses.PerceptualFeatureLoss`` over EfficientNet-Lite0 (**not LPIPS**), built
  lazily when ``perceptual_weight > 0``; the GAN term is the trainer's (over :attr:`VQGAN.last_layer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.losses import reconstruction_loss
from fastvq.models.blocks import Attention, Downsample, ResBlock, Upsample
from fastvq.models.tokenizer import Tokenizer, TokenizerOutput, register_preset
from fastvq.nn import VectorQuantize

__all__ = ["VQGANConfig", "VQGAN", "VQGANEncoder", "VQGANDecoder"]


@dataclass
class VQGANConfig:
    """The VQGAN baseline's architecture and loss weights (defaults: LlamaGen's VQ-16 shape).

    Encoder/decoder: ``base_channels`` times ``channel_mult`` per level (``len(channel_mult) - 1`` halvings),
    ``num_res_blocks`` per level, ``z_channels`` at the bottleneck, ``mid_attention`` (taming's middle
    attention block). Quantizer: one codebook of ``codebook_size`` codes of ``codebook_dim`` dims, unit-norm codes
    with ``cosine``, EMA ``decay``, dead codes below ``dead_code_threshold`` (EMA count) replaced from the batch,
    ``commitment_weight`` (β). Loss weights: ``l1_weight``, ``l2_weight``, ``perceptual_weight``, ``vq_weight``
    (used by ``forward``), ``gan_weight`` (used by the trainer)."""

    image_size: int = 256
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    mid_attention: bool = True
    codebook_size: int = 16384
    codebook_dim: int = 8
    cosine: bool = True
    decay: float = 0.99
    dead_code_threshold: float = 0.0
    commitment_weight: float = 0.25
    l1_weight: float = 0.0
    l2_weight: float = 1.0
    perceptual_weight: float = 1.0
    vq_weight: float = 1.0
    gan_weight: float = 0.5

    @property
    def downsample(self) -> int:
        """Pixels per token side: every level but the last halves the resolution."""
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        who = "VQGANConfig"
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"{who}: channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        for name in ("base_channels", "num_res_blocks", "z_channels", "codebook_size", "codebook_dim", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{who}: {name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.downsample:
            raise ValueError(f"{who}: image_size {self.image_size} must be a multiple of {self.downsample}")


def _groups(channels: int) -> int:
    """taming's 32 GroupNorm groups, or the largest divisor of ``channels`` below it for narrow layers."""
    return math.gcd(32, channels)


class SpatialAttention(nn.Module):
    """taming's ``AttnBlock``: ``x + Attn(GN(x))`` over the ``H·W`` positions of ``x [B, C, H, W]``, one head."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.attn = Attention(channels, num_heads=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # [B, H·W, C]
        return x + self.attn(t).transpose(1, 2).reshape(b, c, h, w)


def _mid(channels: int, attention: bool) -> nn.Sequential:
    blocks = [ResBlock(channels, channels, num_groups=_groups(channels))]
    if attention:
        blocks.append(SpatialAttention(channels))
    blocks.append(ResBlock(channels, channels, num_groups=_groups(channels)))
    return nn.Sequential(*blocks)


class VQGANEncoder(nn.Module):
    """``images [B, in_channels, H, W] → [B, z_channels, H/s, W/s]``, ``s = 2^(levels - 1)``."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        blocks, prev = [], cfg.base_channels
        for level, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(prev, w, num_groups=_groups(math.gcd(prev, w))))
                prev = w
            if level != len(widths) - 1:
                blocks.append(Downsample(prev))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid(prev, cfg.mid_attention)
        self.norm_out = nn.GroupNorm(_groups(prev), prev, eps=1e-6)
        self.conv_out = nn.Conv2d(prev, cfg.z_channels, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(images)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """``z [B, z_channels, h, w] → images [B, in_channels, s·h, s·w]``: the encoder mirrored, with
    ``num_res_blocks + 1`` ResBlocks per level as taming's decoder."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        prev = widths[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, prev, 3, padding=1)
        self.mid = _mid(prev, cfg.mid_attention)
        blocks = []
        for level, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(prev, w, num_groups=_groups(math.gcd(prev, w))))
                prev = w
            if level != len(widths) - 1:
                blocks.append(Upsample(prev))
        self.up = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(_groups(prev), prev, eps=1e-6)
        self.conv_out = nn.Conv2d(prev, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(Tokenizer):
    """The single-codebook VQGAN baseline, with the API of :class:`~fastvq.models.tokenizer.Tokenizer`.

    * ``encode(images [B, C, H, W]) → TokenizerOutput(indices [B, h, w] int64, quantized [B, codebook_dim, h, w],
      extras {})``, ``h = H/s``, ``w = W/s`` (``s = config.downsample``; any multiple of ``s`` works);
    * ``decode_indices(indices [B, h, w]) → images [B, C, s·h, s·w]``, not clamped;
    * ``forward(images, texts=None) → (reconstruction, losses)`` with the unweighted terms ``l1``, ``l2``,
      ``perceptual`` (when ``perceptual_weight > 0``), ``vq`` (``commitment_weight`` x the commitment term; 0 in
      eval mode), ``commitment``, ``codebook`` (0: the codebook is an EMA) and ``loss`` = the weighted sum.
      ``texts`` is accepted for the common API and ignored (no text tower).

    The quantizer runs in fp32 under autocast (``VectorQuantize``'s fp32 island). Its EMA statistics are applied
    by ``quantizer.update_codebook()``: at every training forward by default, once per optimizer step when the
    trainer sets ``quantizer.manual_ema_update = True``.
    """

    model_name = "vqgan"
    config_class = VQGANConfig

    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        cfg = config if config is not None else VQGANConfig()
        cfg.validate()
        self.config = cfg
        self.encoder = VQGANEncoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.quantizer = VectorQuantize(cfg.codebook_dim, cfg.codebook_size, use_cosine_sim=cfg.cosine,
                                        decay=cfg.decay, threshold_ema_dead_code=cfg.dead_code_threshold,
                                        commitment_weight=cfg.commitment_weight, channel_first=True)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.decoder = VQGANDecoder(cfg)

    @property
    def last_layer(self) -> Tensor:
        """``decoder.conv_out.weight``: VQGAN's adaptive GAN weight is taken over it."""
        return self.decoder.conv_out.weight

    def _quantize(self, images: Tensor):
        """``images → (QuantizeOutput, breakdown)``: ``quantized [B, codebook_dim, h, w]``, ``indices [B, h, w]``."""
        self._grid(images)
        z = self.quant_conv(self.encoder(images))  # [B, codebook_dim, h, w]
        return self.quantizer(z, return_loss_breakdown=True)

    def encode(self, images: Tensor) -> TokenizerOutput:
        out, _ = self._quantize(images)
        return TokenizerOutput(out.indices, out.quantized, {})

    def decode_quantized(self, quantized: Tensor) -> Tensor:
        """``quantized [B, codebook_dim, h, w] → images [B, C, s·h, s·w]``."""
        return self.decoder(self.post_quant_conv(quantized))

    def decode_indices(self, indices: Tensor, extras: dict[str, Any] | None = None) -> Tensor:
        if indices.dim() != 3 or indices.is_floating_point():
            raise ValueError(f"VQGAN.decode_indices: indices must be integer [B, h, w], got {indices.dtype} "
                             f"{list(indices.shape)}")
        return self.decode_quantized(self.quantizer.get_output_from_indices(indices))

    def forward(self, images: Tensor, texts=None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        out, parts = self._quantize(images)
        rec = self.decode_quantized(out.quantized)
        total, terms = reconstruction_loss(rec, images, cfg.l1_weight, cfg.l2_weight)
        losses = dict(terms, vq=out.loss, **parts)
        total = total + cfg.vq_weight * out.loss
        if cfg.perceptual_weight > 0:
            losses["perceptual"] = self._frozen_net("perceptual", images.device)(rec, images)
            total = total + cfg.perceptual_weight * losses["perceptual"]
        losses["loss"] = total
        return rec, losses


# ---- presets ---------------------------------------------------------------------------------------------------

# CPU-sized like unitok-tiny (545k vs 531k parameters): 64 px -> 4 x 4 tokens, widths 16/16/32/32/48, 1 ResBlock
# per level, one codebook of 1,024 8-d unit-norm codes (EMA, dead codes replaced).
register_preset("vqgan-tiny", VQGAN, VQGANConfig(
    image_size=64, base_channels=16, channel_mult=(1, 1, 2, 2, 3), num_res_blocks=1, z_channels=32,
    codebook_size=1024, codebook_dim=8, dead_code_threshold=1.0))
# A step up (still CPU-trainable): 64 px -> 8 x 8 tokens, widths 32/64/128/128, 2 ResBlocks per level.
register_preset("vqgan-small", VQGAN, VQGANConfig(
    image_size=64, base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=128,
    codebook_size=4096, codebook_dim=8, dead_code_threshold=1.0))
