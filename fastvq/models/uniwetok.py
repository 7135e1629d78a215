"""UniWeTok (Zhuang et al. 2026, "UniWeTok: An Unified Binary Tokenizer with Codebook Size 2^128 for Unified
Multimodal Large Language Model", arXiv:2602.14178); docs/models.md.

A convolution-attention hybrid autoencoder with a 128-bit binary bottleneck (an implicit codebook of 2^128 codes),
32x downsampling (64 tokens at 256 px), quantized group-wise (GFQ: 16 groups of 8 bits)::

    images [B, 3, H, W] in [-1, 1]
      Encoder     conv_in, per level: ResBlocks + Downsample (x len(ch_mult)-1),         -> [B, top, h, w]
                  ViT blocks over [4 registers; h·w tokens] with 2-D RoPE, GroupNorm, conv 1x1, SigLu
                                                                                        -> latent [B, 128, h, w] in (-1, 1)
      quantizer   LFQ: sign per bit, 16 groups of 8 bits, group-wise entropy + commitment
                                                                                        -> indices [B, h·w, 16], codes ±1
      Decoder     conv_in(concat(codes, noise)), ViT blocks with 4 registers and 2-D RoPE, mid ResBlocks,
                  per level: AdaptiveGroupNorm(cond = code statistics), ResBlocks, depth-to-space upsampling
                  GroupNorm, SiLU, conv 3x3                                             -> [B, 3, H, W]

Facts come from the public UniWeTok module (BitDance repository, ``modeling/vision_encoder/autoencoder_uni.py``:
the encoder's ResBlock levels without a mid block, the 4 register tokens and 2-D RoPE of its attention blocks, the
``2 sigmoid(x) - 1`` output, the decoder's noise concatenation, one adaptive GroupNorm per level conditioned on the
per-channel standard deviation and mean of the code, its depth-to-space ``Upsampler``), BitDance's ``gfq.py``
(group-wise LFQ with least-significant-bit-first indices), and WeTok's released configs (widths and loss weights).

What fastvq does differently, and why:

* **Pre-Post Distillation** and the **Generative-Aware Prior** are named by the paper without a public definition
  (teacher, layers, distances, the prior's model and schedule). fastvq implements *neither*. In their place it
  offers one optional, documented term, off by default in every preset (``distill_weight=0``): a cosine feature
  distillation of a linear projection of the code, before quantization (the SigLu-bounded latent) and after it
  (the straight-through codes), against the tokens of a frozen ``fastvq.eval.FrozenImageEncoder`` (default
  EfficientNet-Lite0, the offline stand-in ImageNet CNN; not SigLIP, not the paper's teacher). It is fastvq's
  feature, not the paper's PPD. Nothing stands in for the Generative-Aware Prior.
* Blocks are fastvq's shared ones: ``ResBlock`` convs have biases (UniWeTok's have none); ``Downsample`` pads
  right/bottom then convolves (UniWeTok's conv pads 1 on every side); the attention blocks are ``ViTBlock`` with
  LayerNorm and a GeGLU MLP of UniWeTok's hidden width (UniWeTok: RMSNorm and SwiGLU, no biases); ``RoPE2D`` uses
  the integer grid coordinates (UniWeTok's code rescales them to a fixed span of about [0.5, 7.5] whatever the
  grid; on the 8x8 grid of 256 px both have unit spacing and the same frequencies, so the relative rotations
  agree up to a fixed permutation of the q/k channels: axis order and pair layout); ``AdaptiveGroupNorm`` takes one condition
  ``[std; mean]`` of the code for both its scale and shift (UniWeTok feeds the std to the scale and the mean to
  the shift only: the special case with the cross weights at zero).
* The decoder's noise: training draws fresh N(0, 1) noise (``forward(..., generator=)`` makes it reproducible);
  evaluation and :meth:`UniWeTok.decode_indices` use one fixed N(0, 1) field per grid size, drawn from
  ``noise_seed`` and shared by every image, so that ``decode_indices(encode(x))`` equals the eval forward bit for
  bit and a reconstruction does not depend on the batch. Zero noise would be off the training distribution.
  UniWeTok's code draws fresh noise at inference too.
* The group-wise entropy is LFQ's per-group entropies averaged over the 16 groups; BitDance's ``GFQ`` pools the
  16 groups' code distributions into one before taking the codebook entropy.
* Perceptual term: ``fastvq.losses.PerceptualFeatureLoss`` over EfficientNet-Lite0 (uncalibrated, **not LPIPS**);
  GAN term (``gan_weight``, WeTok's fixed generator weight 0.1) in the trainer with ``fastvq.losses.GANLoss``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.losses import reconstruction_loss
from fastvq.models.blocks import AdaptiveGroupNorm, Downsample, ResBlock, ViTBlock
from fastvq.models.tokenizer import (Tokenizer, TokenizerOutput, efficientnet_lite0, perceptual_feature_loss,
                                     register_preset)
from fastvq.nn import LFQ

__all__ = ["UniWeTokConfig", "UniWeTok", "UniWeTokEncoder", "UniWeTokDecoder", "RegisterAttention",
           "DepthToSpaceUpsample", "siglu"]


@dataclass
class UniWeTokConfig:
    """UniWeTok's architecture and loss weights. Defaults are the ``uniwetok-paper`` preset (its widths are WeTok's
    released 32x configuration: UniWeTok's own ``ae_config.json`` is on the Hugging Face hub, not reachable here).

    Conv trunk: ``ch`` x ``ch_mult`` widths, one level per entry, ``num_res_blocks`` ResBlocks per level,
    ``len(ch_mult) - 1`` downsamplings (32x for 6 levels); GroupNorms of ``norm_groups`` groups. Attention:
    ``attn_blocks`` ViT blocks at the top width in encoder and decoder, ``num_heads`` heads, GeGLU hidden width
    ``mlp_ratio`` x the top width (2.75: UniWeTok's SwiGLU width ``find_multiple(8·top/3, 256)`` at top = 2048),
    ``num_registers`` register tokens, RoPE base ``rope_base``. Code: ``code_bits`` bits in groups of
    ``group_bits`` (indices ``[B, h·w, code_bits / group_bits]``, each in ``[0, 2^group_bits)``, ``bit_order``
    ``"lsb"``: bit ``j`` of a group has weight ``2^j``, as BitDance's ``GFQ``). Quantizer losses (LFQ): entropy
    weight ``entropy_weight`` (WeTok's ``codebook_weight`` 0.1) with ``diversity_gamma`` and ``inv_temperature``
    (100), ``commitment_weight`` 0.25. Decoder noise: ``noise_seed`` (the eval noise field). Loss weights used by
    ``forward``: ``l1_weight`` 1 (WeTok's pixel loss is L1), ``l2_weight`` 0, ``perceptual_weight`` 1,
    ``distill_weight`` 0 (fastvq's optional feature distillation; the teacher's token width ``distill_dim``); used
    by the trainer: ``gan_weight`` 0.1 (WeTok's ``gen_loss_weight``, a fixed weight)."""

    image_size: int = 256
    in_channels: int = 3
    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 8)
    num_res_blocks: int = 4
    norm_groups: int = 32
    attn_blocks: int = 2
    num_heads: int = 16
    mlp_ratio: float = 2.75
    num_registers: int = 4
    rope_base: float = 10000.0
    code_bits: int = 128
    group_bits: int = 8
    bit_order: str = "lsb"
    entropy_weight: float = 0.1
    diversity_gamma: float = 1.0
    inv_temperature: float = 100.0
    commitment_weight: float = 0.25
    noise_seed: int = 0
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0
    distill_weight: float = 0.0
    distill_dim: int = 1280
    gan_weight: float = 0.1

    @property
    def downsample(self) -> int:
        """Pixels per token side: each level but the last halves the resolution."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def num_codebooks(self) -> int:
        """Index groups per token, the quantizer's ``num_codebooks`` (16: 128 bits in groups of 8)."""
        return self.code_bits // self.group_bits

    def validate(self) -> None:
        who = "UniWeTokConfig"
        if not self.ch_mult or min(self.ch_mult) < 1 or self.ch < 1:
            raise ValueError(f"{who}: ch and every ch_mult entry must be positive, got ch={self.ch}, "
                             f"ch_mult={self.ch_mult}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"{who}: every width ch * ch_mult must be divisible by norm_groups={self.norm_groups}, "
                             f"got widths {bad}")
        if self.num_res_blocks < 1 or self.attn_blocks < 1:
            raise ValueError(f"{who}: num_res_blocks and attn_blocks must be >= 1, got {self.num_res_blocks} and "
                             f"{self.attn_blocks}")
        top = self.ch * self.ch_mult[-1]
        if top % self.num_heads or (top // self.num_heads) % 4:
            raise ValueError(f"{who}: the top width {top} must split into num_heads={self.num_heads} heads whose "
                             f"dim is a multiple of 4 (2-D RoPE)")
        if self.num_registers < 0:
            raise ValueError(f"{who}: num_registers must be >= 0, got {self.num_registers}")
        if self.group_bits < 1 or self.code_bits % self.group_bits:
            raise ValueError(f"{who}: code_bits={self.code_bits} must be a positive multiple of group_bits="
                             f"{self.group_bits}")
        if self.bit_order not in ("msb", "lsb"):
            raise ValueError(f"{who}: bit_order must be 'msb' or 'lsb', got {self.bit_order!r}")
        if self.image_size % self.downsample:
            raise ValueError(f"{who}: image_size {self.image_size} must be a multiple of {self.downsample}")
        if self.distill_weight < 0 or self.distill_dim < 1:
            raise ValueError(f"{who}: distill_weight must be >= 0 and distill_dim >= 1, got {self.distill_weight} "
                             f"and {self.distill_dim}")


def siglu(x: Tensor) -> Tensor:
    """UniWeTok's SigLu, ``2 sigmoid(x) - 1 = tanh(x / 2)``: bounds the encoder output to (-1, 1), inside the
    binary codes ±1."""
    return 2.0 * torch.sigmoid(x) - 1.0


class RegisterAttention(nn.Module):
    """UniWeTok's attention stage on a feature map ``[B, C, h, w] → [B, C, h, w]``: the ``h·w`` tokens (row-major)
    behind ``num_registers`` learned register tokens, through ``depth`` pre-norm :class:`ViTBlock` s with
    bidirectional attention and 2-D RoPE on the grid tokens (registers unrotated); the registers are dropped at
    the end. RoPE takes the grid at call time, so any resolution works. The registers start as ViT's truncated
    N(0, 0.02²) (UniWeTok's ``nn.Embedding`` starts at N(0, 1))."""

    def __init__(self, width: int, depth: int, num_heads: int, mlp_ratio: float, num_registers: int,
                 rope_base: float):
        super().__init__()
        self.registers = nn.Parameter(torch.empty(num_registers, width))  # [P, C]
        nn.init.trunc_normal_(self.registers, std=0.02)
        self.blocks = nn.ModuleList(ViTBlock(width, num_heads, mlp_ratio, mlp="geglu", qkv_bias=False, rope=True,
                                             rope_base=rope_base) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.registers.shape[0]
        tokens = torch.cat((self.registers.to(x.dtype).expand(b, -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
        for blk in self.blocks:
            tokens = blk(tokens, grid=(h, w), num_prefix=p)  # [B, P + h·w, C]
        return tokens[:, p:].transpose(1, 2).reshape(b, c, h, w)


class DepthToSpaceUpsample(nn.Module):
    """UniWeTok's (and Open-MAGVIT2's) ``Upsampler``: a 3x3 conv to ``4C`` channels, then depth-to-space in DCR
    order, ``[B, C, H, W] → [B, C, 2H, 2W]``: output ``(c, 2y + i, 2x + j)`` is conv channel
    ``(2i + j)·C + c`` at ``(y, x)`` (``pixel_shuffle`` uses ``4c + 2i + j``; the order matters only for loading
    their weights)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.conv(x).view(b, 2, 2, c, h, w)                    # [B, i, j, C, H, W]
        return y.permute(0, 3, 4, 1, 5, 2).reshape(b, c, 2 * h, 2 * w)  # [B, C, H, i, W, j]


class UniWeTokEncoder(nn.Module):
    """``images [B, in_channels, H, W] → latent [B, code_bits, H/s, W/s]`` in (-1, 1), ``s = 2^(levels - 1)``.

    ``conv_in`` (3x3 to ``ch``) → per level ``l``: ``num_res_blocks`` :class:`ResBlock` s at width
    ``ch·ch_mult[l]``, then (all levels but the last) :class:`Downsample` to the next width → ``attn``
    (:class:`RegisterAttention` at the top width) → ``norm_out`` (GroupNorm) → ``conv_out`` (1x1 to ``code_bits``)
    → :func:`siglu`, computed in fp32 (the quantizer's input)."""

    def __init__(self, cfg: UniWeTokConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(*(ResBlock(w, w, num_groups=cfg.norm_groups) for _ in range(cfg.num_res_blocks)))
            for w in widths)
        self.downsamples = nn.ModuleList(Downsample(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.attn = RegisterAttention(widths[-1], cfg.attn_blocks, cfg.num_heads, cfg.mlp_ratio, cfg.num_registers,
                                      cfg.rope_base)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], cfg.code_bits, 1)

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv_in(images)
        for i, level in enumerate(self.levels):
            x = level(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        x = self.conv_out(self.norm_out(self.attn(x)))  # [B, code_bits, h, w]
        return siglu(x.float())


class UniWeTokDecoder(nn.Module):
    """``codes [B, code_bits, h, w]`` (±1) and ``noise`` of the same shape → ``images [B, in_channels, s·h, s·w]``.

    ``conv_in`` (3x3 on the channel concat of codes and noise, to the top width) → ``attn``
    (:class:`RegisterAttention`, its own registers) → ``mid`` (``num_res_blocks`` ResBlocks) → per level from the
    top: ``adaptive[l]`` (:class:`AdaptiveGroupNorm` conditioned on ``[std; mean]`` of the codes over positions,
    ``[B, 2·code_bits]``), ``levels[l]`` (ResBlocks to the level's width), ``upsamples[l]``
    (:class:`DepthToSpaceUpsample`, all levels but the last) → ``norm_out`` (GroupNorm) → SiLU → ``conv_out``
    (3x3 to pixels; its weight is :attr:`UniWeTok.last_layer`)."""

    def __init__(self, cfg: UniWeTokConfig):
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # top level first
        g, n = cfg.norm_groups, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(2 * cfg.code_bits, widths[0], 3, padding=1)
        self.attn = RegisterAttention(widths[0], cfg.attn_blocks, cfg.num_heads, cfg.mlp_ratio, cfg.num_registers,
                                      cfg.rope_base)
        self.mid = nn.Sequential(*(ResBlock(widths[0], widths[0], num_groups=g) for _ in range(n)))
        ins = [widths[0]] + widths[:-1]  # each level's input width
        self.adaptive = nn.ModuleList(AdaptiveGroupNorm(c, 2 * cfg.code_bits, g) for c in ins)
        self.levels = nn.ModuleList(
            nn.Sequential(*(ResBlock(c_in if k == 0 else c, c, num_groups=g) for k in range(n)))
            for c_in, c in zip(ins, widths))
        self.upsamples = nn.ModuleList(DepthToSpaceUpsample(c) for c in widths[:-1])
        self.norm_out = nn.GroupNorm(g, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, codes: Tensor, noise: Tensor) -> Tensor:
        flat = codes.flatten(2)                                                        # [B, z, h·w]
        cond = torch.cat(((flat.var(-1, unbiased=False) + 1e-6).sqrt(), flat.mean(-1)), dim=1)  # [B, 2z]
        x = self.attn(self.conv_in(torch.cat((codes, noise), dim=1)))
        x = self.mid(x)
        for i, (norm, level) in enumerate(zip(self.adaptive, self.levels)):
            x = level(norm(x, cond))
            if i < len(self.upsamples):
                x = self.upsamples[i](x)
        return self.conv_out(F.silu(self.norm_out(x)))


class UniWeTok(Tokenizer):
    """UniWeTok: ``encode`` / ``decode_indices`` / ``forward`` as :class:`~fastvq.models.tokenizer.Tokenizer`.

    * ``encode(images [B, C, H, W]) → TokenizerOutput(indices [B, h·w, G] int64, quantized [B, h·w, code_bits]
      (±1, float32), extras {"grid": (h, w)})``, ``h = H/s``, ``w = W/s`` (``s = 32`` for the paper; any multiple
      of ``s`` works, the model has no position table), ``G = code_bits / group_bits`` (16), each index in
      ``[0, 2^group_bits)`` with bit ``j`` of the group ``(z[g·8 + j] > 0)`` weighted ``2^j`` (``bit_order="lsb"``);
      run it in eval mode;
    * ``decode_indices(indices [B, h·w, G], extras=None) → images [B, C, s·h, s·w]``, not clamped; the grid comes
      from ``extras["grid"]``, or is square. Deterministic: the decoder's noise is the fixed field of
      ``noise_seed``, as in the eval forward, so ``decode_indices(encode(x))`` equals the eval reconstruction;
    * ``forward(images, texts=None, *, generator=None) → (reconstruction, losses)`` with the unweighted terms
      ``l1``, ``l2``, ``perceptual`` (when ``perceptual_weight > 0``), ``vq`` (the quantizer's
      ``entropy_weight · (per_sample_entropy − diversity_gamma · codebook_entropy) + commitment_weight ·
      commitment``; 0 in eval mode), ``per_sample_entropy``, ``codebook_entropy``, ``commitment``,
      ``distill_pre`` / ``distill_post`` (when ``distill_weight > 0``) and ``loss`` = ``l1_weight·l1 +
      l2_weight·l2 + perceptual_weight·perceptual + vq + distill_weight·(distill_pre + distill_post)/2``.
      ``generator`` seeds the training noise. UniWeTok has no text tower: ``texts`` must be ``None``.

    Images are in ``[-1, 1]``. The quantizer runs in fp32 with autocast off. The frozen networks (the perceptual
    loss's encoder, the distillation teacher) are attached with :meth:`set_perceptual_loss` /
    :meth:`set_distill_encoder` or built on first use; they are not submodules, and checkpoints never hold them.
    """

    model_name = "uniwetok"
    config_class = UniWeTokConfig
    frozen_builders = {"perceptual": perceptual_feature_loss, "distill": efficientnet_lite0}

    def __init__(self, config: UniWeTokConfig | None = None):
        super().__init__()
        cfg = config if config is not None else UniWeTokConfig()
        cfg.validate()
        self.config = cfg
        self.encoder = UniWeTokEncoder(cfg)
        # UniWeTok's GFQ as LFQ.uniwetok(256) without its bound: the encoder applies SigLu itself, as UniWeTok's code
        self.quantizer = LFQ(dim=cfg.code_bits, codebook_size=2 ** cfg.group_bits, num_codebooks=cfg.num_codebooks,
                             entropy_loss_weight=cfg.entropy_weight, diversity_gamma=cfg.diversity_gamma,
                             commitment_loss_weight=cfg.commitment_weight, inv_temperature=cfg.inv_temperature,
                             bit_order=cfg.bit_order, channel_first=False, keep_num_codebooks_dim=True)
        self.decoder = UniWeTokDecoder(cfg)
        if cfg.distill_weight > 0:
            self.distill_proj = nn.Linear(cfg.code_bits, cfg.distill_dim)

    # ---- the frozen networks ------------------------------------------------------------------------------------

    def set_distill_encoder(self, encoder: nn.Module | None) -> None:
        """Use ``encoder`` (images in [0, 1] → tokens ``[B, T, distill_dim]`` with ``T`` a square grid, or an
        object with ``.tokens``, as ``fastvq.eval.FrozenImageEncoder``) as the distillation teacher; its
        parameters are frozen. ``None``: build ``fastvq.eval.EfficientNetLite0`` (7x7 tokens of 1280) on first
        use."""
        self.set_frozen("distill", encoder)

    # ---- the model ----------------------------------------------------------------------------------------------

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight (``decoder.conv_out.weight``), for VQGAN's adaptive GAN weight
        (``fastvq.losses.adaptive_gan_weight``) when the trainer uses one instead of WeTok's fixed weight."""
        return self.decoder.conv_out.weight

    def _quantize(self, images: Tensor):
        """``images → (grid, latent [B, h·w, code_bits] (SigLu-bounded, fp32), QuantizeOutput, breakdown)``."""
        grid = self._grid(images)
        latent = self.encoder(images).flatten(2).transpose(1, 2)  # [B, h·w, code_bits], row-major tokens
        out, parts = self.quantizer(latent, return_loss_breakdown=True)
        return grid, latent, out, parts

    def decoder_noise(self, codes: Tensor, random: bool, generator: torch.Generator | None = None) -> Tensor:
        """The noise concatenated to ``codes [B, z, h, w]``: fresh N(0, 1) draws when ``random`` (from
        ``generator`` when given), otherwise the fixed field: one ``[z, h, w]`` N(0, 1) draw from a CPU generator
        seeded with ``noise_seed``, the same for every image of the batch (and on every device)."""
        if random:
            return torch.randn(codes.shape, generator=generator, device=codes.device, dtype=codes.dtype)
        g = torch.Generator().manual_seed(self.config.noise_seed)
        field = torch.randn(codes.shape[1:], generator=g)  # [z, h, w]
        return field.to(device=codes.device, dtype=codes.dtype).expand_as(codes)

    def _decode(self, codes: Tensor, grid: tuple[int, int], random: bool,
                generator: torch.Generator | None = None) -> Tensor:
        """``codes [B, h·w, code_bits]`` → images; ``random`` noise in training, the fixed field otherwise."""
        b, n, z = codes.shape
        codes = codes.transpose(1, 2).reshape(b, z, grid[0], grid[1])
        return self.decoder(codes, self.decoder_noise(codes, random, generator))

    def encode(self, images: Tensor) -> TokenizerOutput:
        grid, _, out, _ = self._quantize(images)
        return TokenizerOutput(out.indices, out.quantized, {"grid": grid})

    def decode_indices(self, indices: Tensor, extras: dict[str, Any] | None = None) -> Tensor:
        G = self.config.num_codebooks
        if indices.dim() != 3 or indices.shape[-1] != G or indices.dtype != torch.int64:
            raise ValueError(f"UniWeTok.decode_indices: indices must be int64 [B, h·w, {G}], got {indices.dtype} "
                             f"{list(indices.shape)}")
        n = indices.shape[1]
        grid = tuple((extras or {}).get("grid", (math.isqrt(n), math.isqrt(n))))
        if len(grid) != 2 or grid[0] * grid[1] != n:
            raise ValueError(f"UniWeTok.decode_indices: extras['grid'] must be (h, w) with h·w = {n} tokens (or "
                             f"omitted for a square grid), got {grid}")
        codes = self.quantizer.get_codes_from_indices(indices)  # [B, h·w, code_bits] float32, ±1
        return self._decode(codes, grid, random=False)

    def distill_losses(self, images: Tensor, latent: Tensor, quantized: Tensor,
                       grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """fastvq's optional feature distillation (not the paper's PPD, whose form is not public): the teacher's
        tokens ``[B, T, D]`` (a square grid, average-pooled to the tokenizer's ``grid``) against
        ``distill_proj`` of the pre-quantization ``latent`` and of the post-quantization ``quantized`` codes (each
        ``[B, h·w, code_bits]``); returns the two ``mean (1 − cos)`` distances."""
        with torch.no_grad():
            out = self._frozen_net("distill", images.device)((images.float() + 1) / 2)
            teacher = getattr(out, "tokens", out)
        b, t, d = teacher.shape
        side = math.isqrt(t)
        if side * side != t or d != self.config.distill_dim:
            raise ValueError(f"UniWeTok: the distillation teacher must return tokens [B, T, {self.config.distill_dim}] "
                             f"(distill_dim) with T a square grid, got {list(teacher.shape)}")
        target = F.adaptive_avg_pool2d(teacher.float().transpose(1, 2).reshape(b, d, side, side), grid)
        target = target.flatten(2).transpose(1, 2)  # [B, h·w, D]

        def dist(x: Tensor) -> Tensor:
            return (1 - F.cosine_similarity(self.distill_proj(x), target, dim=-1, eps=1e-8)).mean()

        return dist(latent), dist(quantized)

    def forward(self, images: Tensor, texts: Sequence[str] | Tensor | None = None, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        if texts is not None:
            raise ValueError("UniWeTok.forward: texts must be None (UniWeTok has no text tower; its semantics come "
                             "from distillation)")
        grid, latent, out, parts = self._quantize(images)
        rec = self._decode(out.quantized, grid, random=self.training, generator=generator)
        total, terms = reconstruction_loss(rec, images, cfg.l1_weight, cfg.l2_weight)
        losses = dict(terms, vq=out.loss, **parts)
        total = total + out.loss
        if cfg.perceptual_weight > 0:
            losses["perceptual"] = self._frozen_net("perceptual", images.device)(rec, images)
            total = total + cfg.perceptual_weight * losses["perceptual"]
        if cfg.distill_weight > 0:
            losses["distill_pre"], losses["distill_post"] = self.distill_losses(images, latent, out.quantized, grid)
            total = total + cfg.distill_weight * (losses["distill_pre"] + losses["distill_post"]) / 2
        losses["loss"] = total
        return rec, losses


# ---- presets ---------------------------------------------------------------------------------------------------

# The published design: UniWeTok's module with WeTok's 32x widths (ch 256, ch_mult 1-1-2-2-4-8, 4 ResBlocks per
# level), 2 attention blocks of 16 heads at 2048 wide, 256 px -> 8 x 8 tokens of 128 bits (16 groups of 8).
register_preset("uniwetok-paper", UniWeTok, UniWeTokConfig())
# Step-time benchmark size: 128 px -> 4 x 4 tokens (32x), widths 64..256, 2 ResBlocks per level, the paper's code.
register_preset("uniwetok-small", UniWeTok, UniWeTokConfig(
    image_size=128, ch=64, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_blocks=2, num_heads=4, mlp_ratio=3.0))
# CPU-sized: 64 px -> 4 x 4 tokens (16x), widths 32..64, 1 ResBlock per level, 1 attention block, the paper's code.
register_preset("uniwetok-tiny", UniWeTok, UniWeTokConfig(
    image_size=64, ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, attn_blocks=1, num_heads=2, mlp_ratio=4.0))
