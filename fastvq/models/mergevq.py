"""MergeVQ (Li et al., CVPR 2025, "MergeVQ: A Unified Framework for Visual Generation and Representation with
Disentangled Token Merging and Quantization"); docs/models.md, "MergeVQ".

A ViT encoder with ToMe token merging keeps K of the N grid tokens (plus a class token), quantizes only those K
with an 18-bit LFQ, and records the integer *source map* of where every grid position went; the decoder gets the
full grid back by unmerging (or by a learned source recovery) and reconstructs the image. The class token is
distilled from a frozen teacher::

    images [B, 3, H, W] in [-1, 1]
      stem          "cnn": conv + VQGAN ResBlocks, stride-2 convs (/16)  |  "patch": 16x16 patch conv + GN (MergeVQ-R)
                                                                          -> [B, N, width], N = (H/16)(W/16)
      ViT           [CLS] + N tokens, depth x MergeVQBlock (ToMe merge between attention and MLP, log-size bias,
                    CLS protected), r per block from merge_schedule(N + 1 -> K + 1)   -> CLS [B, width], K tokens
      order         kept tokens in first-occurrence raster order; source [B, N] int64 in [0, K)
      quant_in      GroupNorm, SiLU, Linear(width -> 18)                  -> z [B, K, 18]
      quantizer     LFQ, one 18-bit index per token (lsb first, Open-MAGVIT2) -> indices [B, K]
      recovery      unmerge(quantized, source)  |  SourceRecovery (cross-attention, predicts the source) -> [B, N, 18]
      decoder       conv, ViT blocks (depthwise-conv MLP), AdaGN + ResBlocks + pixel-shuffle x2 stages -> [B, 3, H, W]
      distillation  MLP head on CLS -> KL(T = 4) against the frozen teacher's pooled features

Facts come from the public MergeVQ code (``taming/modules/diffusionmodules/model_mergevq.py``, ``tome/timm.py``,
``taming/models/lfqgan_rep.py``, ``configs/gpu_s1/*.yaml``, commit 7c751f1); the differences, and why, are listed in
docs/models.md. In short: the teacher is EfficientNet-Lite0 (an offline stand-in for DINOv2-B, named as such), the
perceptual term is ``PerceptualFeatureLoss`` (not LPIPS), the shared ``ResBlock`` has conv biases, the adaptive
GroupNorm reads both code statistics, the merge schedule is fastvq's even split, and keep counts are drawn from
torch's RNG. The GAN term is the trainer's (``fastvq.losses.GANLoss`` over :attr:`MergeVQ.last_layer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.losses import kl_distillation_loss, reconstruction_loss
from fastvq.models.blocks import AdaptiveGroupNorm, Attention, ResBlock
from fastvq.models.tokenizer import (Tokenizer, TokenizerOutput, efficientnet_lite0, perceptual_feature_loss,
                                     register_preset)
from fastvq.nn import LFQ, MergingViTBlock, first_occurrence, merge_schedule
from fastvq.nn._quantizer import fp32_island
from fastvq.ops.merge import unmerge

__all__ = ["MergeVQConfig", "MergeVQ", "MergeVQEncoder", "MergeVQDecoder", "MergeVQBlock", "SourceRecovery",
           "keep_distribution"]

_DISTILL_HEADS = (None, "mlp3", "mlp_ln")


def keep_distribution(eval_keep: int, count: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """MergeVQ's training keep counts and their probabilities (``generate_prob_list``, ``gaussian-<count>``): the
    ``count`` perfect squares ``(sqrt(eval_keep) + j - 1)^2``, ``j = 0 ... count - 1``, with weights
    ``exp(-(j - 1)^2 / (2 · 0.5^2)) + 0.05`` normalised, so the eval count (``j = 1``) is drawn most often.
    ``keep_distribution(144, 6)`` gives ``(121, 144, ..., 256)`` with probabilities ``(0.118, 0.668, 0.118, 0.032,
    0.032, 0.032)``."""
    side = math.isqrt(eval_keep)
    if side * side != eval_keep or side < 2 or count < 2:
        raise ValueError(f"keep_distribution: eval_keep must be a perfect square >= 4 and count >= 2, got "
                         f"eval_keep={eval_keep}, count={count}")
    candidates = tuple((side + i) ** 2 for i in range(-1, count - 1))
    weights = [math.exp(-((j - 1) ** 2) / (2 * 0.5 ** 2)) + 0.05 for j in range(count)]
    return candidates, tuple(w / sum(weights) for w in weights)


_GR_KEEP = keep_distribution(144, 6)


@dataclass
class MergeVQConfig:
    """MergeVQ's architecture and loss weights. Defaults are MergeVQ (G+R) (= the ``mergevq-gr-paper`` preset).

    Encoder: ``encoder="cnn"``: ``conv_in`` to ``ch``, then per level of ``ch_mult`` ``num_res_blocks`` VQGAN
    ResBlocks to ``ch · mult`` and a stride-2 3×3 conv (none after the last level), width ``ch · ch_mult[-1]``;
    ``encoder="patch"`` (MergeVQ-R): a ``2^(levels-1)`` patch conv to ``patch_width`` + GroupNorm. Then a class
    token and ``depth`` merging ViT blocks (``num_heads``, ``mlp_ratio``, LayerScale ``layer_scale_init``).
    Merging: ``eval_keep`` grid tokens are kept in eval mode; training draws ``keep_candidates`` with
    ``keep_probs`` (:meth:`MergeVQ.sample_keep`). Quantizer: LFQ with ``code_bits`` bits, ``entropy_weight``,
    ``commitment_weight``, ``inv_temperature``. Recovery: ``"unmerge"`` (the source map) or ``"learned"``
    (:class:`SourceRecovery` of ``recovery_width`` / ``recovery_depth`` / ``recovery_heads``). Decoder:
    ``decoder_depth`` ViT blocks of width ``ch · ch_mult[-1]`` with ``decoder_heads`` heads, then the levels in
    reverse with ``num_res_blocks + num_res_extra`` ResBlocks (level 0: ``num_res_blocks``). Distillation: a CLS
    head (``"mlp3"``: MergeVQ's ``layer3``; ``"mlp_ln"``: its default head with a LayerNorm; ``None``: no head)
    predicting ``distill_dim`` teacher features, KL at ``distill_temperature``. Loss weights: ``l1_weight``,
    ``perceptual_weight``, ``distill_weight``, ``source_weight`` (the learned recovery's cross-entropy), used by
    ``forward``; ``gan_weight`` (a fixed weight, MergeVQ's ``gen_loss_weight``, not VQGAN's adaptive one) and
    ``lecam_weight``, used by the trainer."""

    image_size: int = 256
    in_channels: int = 3
    encoder: str = "cnn"
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 1, 2, 4, 8)
    num_res_blocks: int = 4
    patch_width: int = 768
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-5
    eval_keep: int = 144
    keep_candidates: tuple[int, ...] = _GR_KEEP[0]
    keep_probs: tuple[float, ...] = _GR_KEEP[1]
    code_bits: int = 18
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25
    inv_temperature: float = 100.0
    recovery: str = "unmerge"
    recovery_width: int = 384
    recovery_depth: int = 2
    recovery_heads: int = 8
    decoder_depth: int = 12
    decoder_heads: int = 8
    num_res_extra: int = 1
    distill_head: str | None = "mlp3"
    distill_dim: int = 768
    distill_temperature: float = 4.0
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    distill_weight: float = 1.0
    source_weight: float = 1.0
    gan_weight: float = 0.1
    lecam_weight: float = 0.01

    @property
    def downsample(self) -> int:
        """Pixels per token side: one halving per level after the first."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def width(self) -> int:
        """The encoder ViT's width."""
        return self.patch_width if self.encoder == "patch" else self.ch * self.ch_mult[-1]

    @property
    def grid_tokens(self) -> int:
        """Grid tokens ``N`` at ``image_size``."""
        return (self.image_size // self.downsample) ** 2

    def validate(self) -> None:
        who = "MergeVQConfig"
        if self.encoder not in ("cnn", "patch"):
            raise ValueError(f"{who}: encoder must be 'cnn' or 'patch', got {self.encoder!r}")
        if self.recovery not in ("unmerge", "learned"):
            raise ValueError(f"{who}: recovery must be 'unmerge' or 'learned', got {self.recovery!r}")
        if self.distill_head not in _DISTILL_HEADS:
            raise ValueError(f"{who}: distill_head must be None, 'mlp3' or 'mlp_ln', got {self.distill_head!r}")
        if not self.ch_mult or self.num_res_blocks < 1 or self.depth < 1:
            raise ValueError(f"{who}: ch_mult must be non-empty and num_res_blocks, depth >= 1, got "
                             f"{self.ch_mult}, {self.num_res_blocks}, {self.depth}")
        widths = [self.ch * m for m in self.ch_mult] + [self.width]
        if any(w % 32 for w in widths):
            raise ValueError(f"{who}: every width must be a multiple of 32 (GroupNorm's 32 groups), got {widths}")
        for name, dim, heads in (("width", self.width, self.num_heads),
                                 ("decoder width", self.ch * self.ch_mult[-1], self.decoder_heads),
                                 ("recovery_width", self.recovery_width, self.recovery_heads)):
            if dim % heads:
                raise ValueError(f"{who}: {name} {dim} must be divisible by its heads {heads}")
        if self.image_size % self.downsample:
            raise ValueError(f"{who}: image_size {self.image_size} must be a multiple of {self.downsample}")
        if len(self.keep_candidates) != len(self.keep_probs) or not self.keep_candidates:
            raise ValueError(f"{who}: keep_candidates and keep_probs must be non-empty and of equal length, got "
                             f"{self.keep_candidates}, {self.keep_probs}")
        if min(self.keep_probs) < 0 or not sum(self.keep_probs) > 0:
            raise ValueError(f"{who}: keep_probs must be >= 0 with a positive sum, got {self.keep_probs}")
        for keep in (self.eval_keep, *self.keep_candidates):
            _check_keep(keep, self.grid_tokens, self.depth, who)


def _check_keep(keep: int, tokens: int, depth: int, who: str) -> list[int]:
    """The per-block ``r`` that takes ``tokens`` grid tokens (plus the protected class token) to ``keep`` in
    ``depth`` blocks; a ``ValueError`` naming ``who`` when ``keep`` is not an int in ``[1, tokens]`` or cannot be
    reached (a block merges at most half of its tokens)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= tokens:
        raise ValueError(f"{who}: keep must be an int in [1, {tokens}] (the grid tokens), got {keep!r}")
    try:
        return merge_schedule(tokens + 1, keep + 1, depth, protect_first=True)
    except ValueError as e:
        raise ValueError(f"{who}: keep={keep} of {tokens} tokens is not reachable in {depth} merging blocks ({e})") \
            from None


def _init_vit(module: nn.Module) -> None:
    """MergeVQ's transformer initialisation (``TransformerBlock.init_weights``): truncated normal, std 0.02, for
    linear and conv weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class LayerScale(nn.Module):
    """timm's LayerScale: ``x · γ`` with a learned per-channel ``γ [dim]`` initialised to ``init``."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class MergeVQBlock(MergingViTBlock):
    """MergeVQ's encoder block: :class:`fastvq.nn.MergingViTBlock` (pre-norm, ToMe merge between attention and
    MLP, ``log(size)`` attention bias, source tracking) with timm's LayerScale on both residual branches (MergeVQ
    builds timm ``Block``\\ s with ``init_values=1e-5``): the attention projection and the MLP end in a
    :class:`LayerScale`. ``forward(x [B, T, dim], sizes, source, r) → (x [B, T - r, dim], sizes, source)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale_init: float):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=True, protect_first=True)
        self.proj = nn.Sequential(self.proj, LayerScale(dim, layer_scale_init))
        self.mlp.append(LayerScale(dim, layer_scale_init))


def _first_occurrence_order(tokens: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
    """Renumber the kept tokens by the raster position where each first occurs: ``tokens [B, K, C]``, ``source
    [B, N]`` (every value in ``[0, K)`` used) → the same tokens permuted so that token ``k`` is the ``k``-th to
    appear in ``source``, and ``source`` relabelled to match (so ``source[:, 0] == 0`` and each new value is one
    above the running maximum). MergeAR keeps exactly these first occurrences (docs/ops/decode.md)."""
    B, N = source.shape
    K = tokens.shape[1]
    positions = torch.arange(N, device=source.device).expand(B, N)
    first = first_occurrence(source)                                                # [B, N], K True per row
    first_pos = torch.where(first, positions, N).sort(dim=1).values[:, :K]          # [B, K] ascending
    old = source.gather(1, first_pos)                                               # [B, K]: old id of token k
    tokens = tokens.gather(1, old[..., None].expand(-1, -1, tokens.shape[2]))
    rank = torch.empty_like(old).scatter_(1, old, positions[:, :K].contiguous())    # old id -> new id
    return tokens, rank.gather(1, source)


class MergeVQEncoder(nn.Module):
    """MergeVQ's encoder: ``forward(images [B, C, H, W], keep) → (z [B, keep, code_bits], cls [B, width],
    source [B, N] int64)``, ``N = (H/s)(W/s)``, ``s = 2^(levels - 1)``.

    ``stem`` (CNN or patch embedding, :class:`MergeVQConfig`) → ``[CLS] + N`` tokens (no position embedding;
    the CNN's padding gives position) → ``blocks`` (:class:`MergeVQBlock`, the per-block ``r`` from
    :func:`fastvq.nn.merge_schedule` taking ``N + 1`` tokens to ``keep + 1``; the class token never merges) →
    the kept grid tokens in first-occurrence raster order with their source map → ``quant_in`` (GroupNorm, SiLU,
    ``Linear(width → code_bits)``: MergeVQ's ``norm_out``, ``act_out`` and 1×1 ``conv_out``; in fp32 with
    autocast off, like the quantizer after it). ``cls`` is the class token after the last block (MergeVQ has no
    final norm)."""

    def __init__(self, cfg: MergeVQConfig):
        super().__init__()
        if cfg.encoder == "cnn":
            layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)]
            prev = cfg.ch
            for level, mult in enumerate(cfg.ch_mult):
                for _ in range(cfg.num_res_blocks):
                    layers.append(ResBlock(prev, cfg.ch * mult))
                    prev = cfg.ch * mult
                if level < len(cfg.ch_mult) - 1:  # a 3x3 stride-2 conv, symmetric padding (not VQGAN's)
                    layers.append(nn.Conv2d(prev, prev, 3, stride=2, padding=1))
            self.stem = nn.Sequential(*layers)
        else:
            p = cfg.downsample
            self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, cfg.width, p, stride=p),
                                      nn.GroupNorm(cfg.width, cfg.width, eps=1e-6))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = nn.ModuleList(MergeVQBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.layer_scale_init)
                                    for _ in range(cfg.depth))
        self.norm_out = nn.GroupNorm(32, cfg.width, eps=1e-6)
        self.quant_in = nn.Linear(cfg.width, cfg.code_bits)
        self.blocks.apply(_init_vit)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, images: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
        x = self.stem(images)                                         # [B, width, h, w]
        b, _, h, w = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1).to(x.dtype), x.flatten(2).transpose(1, 2)), dim=1)
        sizes = source = None
        for blk, r in zip(self.blocks, _check_keep(keep, h * w, len(self.blocks), "MergeVQEncoder")):
            x, sizes, source = blk(x, sizes, source, r=r)             # [B, T - r, width], [B, T - r], [B, 1 + N]
        tokens, source = _first_occurrence_order(x[:, 1:], source[:, 1:] - 1)  # CLS stays slot 0, holds only itself
        with fp32_island(images.device):  # the quantizer's input in fp32 under autocast (its signs are the codes)
            z = F.silu(self.norm_out(tokens.float().transpose(1, 2))).transpose(1, 2)
            z = self.quant_in(z)
        return z, x[:, 0], source


class _CrossAttentionBlock(nn.Module):
    """MergeVQ's ``CrossAttentionBlock``: ``q = q + γ1 · proj(attn(LN(q), kv))``, ``q = q + γ2 · MLP(LN(q))``;
    ``q [B, Nq, dim]``, ``kv [B, Nk, dim]`` (already normalised by the caller)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale_init: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ls2 = LayerScale(dim, layer_scale_init)

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        b, nq, c = q.shape
        h = self.num_heads
        query = self.q(self.norm1(q)).view(b, nq, h, c // h).transpose(1, 2)           # [B, h, Nq, c/h]
        k, v = self.kv(kv).view(b, kv.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)  # [B, h, Nk, c/h] each
        o = F.scaled_dot_product_attention(query, k, v).transpose(1, 2).reshape(b, nq, c)
        q = q + self.ls1(self.proj(o))
        return q + self.ls2(self.mlp(self.norm2(q)))


class SourceRecovery(nn.Module):
    """MergeVQ's learned source recovery: ``forward(tokens [B, K, code_bits]) → logits [B, N, K]``, the score of
    each kept token as the source of each of the ``N`` grid positions.

    ``kv = LN(Linear(tokens))``; ``N`` learned position queries pass ``depth`` cross-attention blocks over
    ``kv``; ``logits = head(q) · head(kv)ᵀ`` (MergeVQ's ``rec_head`` on both sides). The decoder unmerges with
    ``argmax`` over ``K``, so decoding needs no source map; training adds the cross-entropy against the encoder's
    source (``MergeVQ`` ``source_recovery`` loss). Queries are initialised with std 0.02 (MergeVQ: 1e-6)."""

    def __init__(self, code_bits: int, num_positions: int, width: int, depth: int, num_heads: int,
                 layer_scale_init: float):
        super().__init__()
        self.embed = nn.Linear(code_bits, width)
        self.norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.zeros(1, num_positions, width))
        self.blocks = nn.ModuleList(_CrossAttentionBlock(width, num_heads, 4.0, layer_scale_init)
                                    for _ in range(depth))
        self.head = nn.Linear(width, width)
        self.apply(_init_vit)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        kv = self.norm(self.embed(tokens))                            # [B, K, width]
        q = self.queries.expand(tokens.shape[0], -1, -1).to(kv.dtype)  # [B, N, width]
        for blk in self.blocks:
            q = blk(q, kv)
        return self.head(q) @ self.head(kv).transpose(1, 2)          # [B, N, K]


class _DecoderBlock(nn.Module):
    """The decoder's transformer block (MergeVQ's ``Block`` with ``MixMlp``): ``x + γ1 · attn(LN(x))``, then
    ``x + γ2 · fc2(GELU(dwconv3x3(fc1(LN(x)))))``, the depthwise conv over the ``grid``; ``x [B, h·w, dim]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale_init: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls2 = LayerScale(dim, layer_scale_init)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        h = self.fc1(self.norm2(x)).transpose(1, 2).unflatten(2, grid)  # [B, hidden, h, w]
        h = self.dwconv(h).flatten(2).transpose(1, 2)
        return x + self.ls2(self.fc2(F.gelu(h)))


class _PixelShuffleUpsample(nn.Module):
    """Open-MAGVIT2's ``Upsampler``: a 3×3 conv to ``4·C`` channels, then depth-to-space ×2;
    ``[B, C, H, W] → [B, C, 2H, 2W]`` (``pixel_shuffle``'s channel order; MergeVQ's DCR order is a fixed
    permutation of the conv's output channels, so the two are the same function class)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class _DecoderStage(nn.Module):
    """One decoder level: adaptive GroupNorm conditioned on the code statistics, ResBlocks, optional ×2."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, cond_dim: int, upsample: bool):
        super().__init__()
        self.norm = AdaptiveGroupNorm(in_ch, cond_dim)
        self.blocks = nn.Sequential(*(ResBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(num_blocks)))
        self.upsample = _PixelShuffleUpsample(out_ch) if upsample else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.upsample(self.blocks(self.norm(x, cond)))


class MergeVQDecoder(nn.Module):
    """MergeVQ's decoder (Open-MAGVIT2's with a transformer in front): ``z [B, code_bits, h, w]`` (the recovered
    full grid of quantized codes) → ``images [B, in_channels, s·h, s·w]``.

    ``conv_in`` (3×3 to ``D = ch · ch_mult[-1]``) → ``+ pos_embed`` (a depthwise 3×3 conv: the only position
    signal) → ``blocks`` (:class:`_DecoderBlock`) → the levels from the deepest: :class:`AdaptiveGroupNorm` whose
    scale and shift are predicted from ``cond = [std(z), mean(z)]`` over the grid ``[B, 2·code_bits]``, ResBlocks
    (``num_res_blocks + num_res_extra``; level 0 ``num_res_blocks``), pixel-shuffle ×2 (all but level 0) →
    GroupNorm, SiLU, ``conv_out`` (3×3, whose weight is :attr:`MergeVQ.last_layer`)."""

    def __init__(self, cfg: MergeVQConfig):
        super().__init__()
        dim = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.code_bits, dim, 3, padding=1)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.blocks = nn.ModuleList(_DecoderBlock(dim, cfg.decoder_heads, cfg.mlp_ratio, cfg.layer_scale_init)
                                    for _ in range(cfg.decoder_depth))
        stages, prev = [], dim
        for level in reversed(range(len(cfg.ch_mult))):
            out = cfg.ch * cfg.ch_mult[level]
            n = cfg.num_res_blocks + (cfg.num_res_extra if level > 0 else 0)
            stages.append(_DecoderStage(prev, out, n, 2 * cfg.code_bits, upsample=level > 0))
            prev = out
        self.stages = nn.ModuleList(stages)
        self.norm_out = nn.GroupNorm(32, prev, eps=1e-6)
        self.conv_out = nn.Conv2d(prev, cfg.in_channels, 3, padding=1)
        for m in (self.pos_embed, self.blocks):
            m.apply(_init_vit)

    def forward(self, z: Tensor) -> Tensor:
        b, _, h, w = z.shape
        cond = torch.cat((z.var(dim=(2, 3), unbiased=False).add(1e-6).sqrt(), z.mean(dim=(2, 3))), dim=1)
        x = self.conv_in(z)
        x = x + self.pos_embed(x)                                   # [B, D, h, w]
        tokens = x.flatten(2).transpose(1, 2)                       # [B, h·w, D]
        for blk in self.blocks:
            tokens = blk(tokens, (h, w))
        x = tokens.transpose(1, 2).reshape(b, -1, h, w)
        for stage in self.stages:
            x = stage(x, cond)
        return self.conv_out(F.silu(self.norm_out(x)))


class MergeVQ(Tokenizer):
    """MergeVQ: ``encode`` / ``decode_indices`` / ``forward`` as :class:`~fastvq.models.tokenizer.Tokenizer`.

    * ``encode(images [B, C, H, W], keep=None) → TokenizerOutput(indices [B, K] int64 (one 18-bit LFQ index per
      kept token, in first-occurrence raster order), quantized [B, K, code_bits] (±1), extras)``, ``K = keep``
      (default ``eval_keep``); ``extras = {"source": [B, N] int64, "keep": K, "grid": (h, w)}``: kept token
      ``source[b, p]`` holds grid position ``p``, ``N = h·w``, ``h = H/s``;
    * ``decode_indices(indices [B, K], extras) → images [B, C, s·h, s·w]``, not clamped; ``"unmerge"`` recovery
      needs ``extras["source"]`` (and ``"grid"`` for a non-square grid), ``"learned"`` recovery predicts the
      source and needs at most ``"grid"``;
    * ``forward(images, texts=None, *, keep=None, generator=None) → (reconstruction, losses)`` with the
      unweighted terms ``l1``, ``l2`` (logged, weight 0 as MergeVQ), ``perceptual`` (when ``perceptual_weight >
      0``), ``vq`` (LFQ's ``0.1 · entropy + 0.25 · commitment``; 0 in eval), ``per_sample_entropy``,
      ``codebook_entropy``, ``commitment``, ``distill`` (with a head and ``distill_weight > 0``),
      ``source_recovery`` (learned recovery) and ``loss``, the weighted sum. In training mode ``keep`` defaults to
      :meth:`sample_keep` (``generator``, or torch's global RNG); in eval mode to ``eval_keep``. MergeVQ has no
      text branch: ``texts`` must be ``None``.

    Images are in ``[-1, 1]``. The frozen teacher and perceptual network are attached with :meth:`set_teacher` /
    :meth:`set_perceptual_loss`, or built on first use (``fastvq.eval``, the ``[eval]`` extra); they are not
    submodules, so checkpoints hold the tokenizer only.
    """

    model_name = "mergevq"
    config_class = MergeVQConfig
    frozen_builders = {"teacher": efficientnet_lite0, "perceptual": perceptual_feature_loss}

    def __init__(self, config: MergeVQConfig | None = None):
        super().__init__()
        cfg = config if config is not None else MergeVQConfig()
        cfg.validate()
        self.config = cfg
        self.encoder = MergeVQEncoder(cfg)
        self.quantizer = LFQ.mergevq(codebook_size=2 ** cfg.code_bits, entropy_loss_weight=cfg.entropy_weight,
                                     commitment_loss_weight=cfg.commitment_weight,
                                     inv_temperature=cfg.inv_temperature)
        self.recovery = None
        if cfg.recovery == "learned":
            self.recovery = SourceRecovery(cfg.code_bits, cfg.grid_tokens, cfg.recovery_width, cfg.recovery_depth,
                                           cfg.recovery_heads, cfg.layer_scale_init)
        self.decoder = MergeVQDecoder(cfg)
        self.distill_head = None
        if cfg.distill_head is not None:
            w, hidden = cfg.width, 4 * cfg.width
            middle = (nn.Linear(hidden, hidden), nn.GELU()) if cfg.distill_head == "mlp3" else (nn.LayerNorm(hidden),)
            self.distill_head = nn.Sequential(nn.Linear(w, hidden), nn.GELU(), *middle,
                                              nn.Linear(hidden, cfg.distill_dim))

    # ---- the frozen networks ------------------------------------------------------------------------------------

    def set_teacher(self, teacher: nn.Module | None) -> None:
        """Use ``teacher`` (images ``[B, 3, H, W]`` in ``[0, 1]`` → ``[B, distill_dim]`` or an object with
        ``.pooled``, e.g. a ``fastvq.eval.FrozenImageEncoder``) as the distillation teacher; its parameters are
        frozen. ``None``: build ``fastvq.eval.EfficientNetLite0`` (pooled 1280-d; the offline stand-in for
        MergeVQ's DINOv2-B, whose pooled output is 768-d) on first use."""
        self.set_frozen("teacher", teacher)

    # ---- the model ----------------------------------------------------------------------------------------------

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight (``decoder.conv_out.weight``), for a GAN weight taken over it
        (``fastvq.losses.adaptive_gan_weight``); MergeVQ itself uses the fixed ``gan_weight``."""
        return self.decoder.conv_out.weight

    def sample_keep(self, generator: torch.Generator | None = None) -> int:
        """A training keep count: one of ``keep_candidates`` drawn with ``keep_probs`` from ``generator`` (a CPU
        ``torch.Generator``; ``None``: torch's global RNG, so ``torch.manual_seed`` makes it reproducible)."""
        probs = torch.tensor(self.config.keep_probs, dtype=torch.float64)
        return self.config.keep_candidates[int(torch.multinomial(probs, 1, generator=generator))]

    def _quantize(self, images: Tensor, keep: int):
        """``images → (grid, QuantizeOutput(quantized [B, K, bits], indices [B, K], loss), breakdown, cls [B, width],
        source [B, N])``."""
        grid = self._grid(images)
        z, cls, source = self.encoder(images, keep)
        out, parts = self.quantizer(z, return_loss_breakdown=True)
        return grid, out, parts, cls, source

    def _recover(self, quantized: Tensor, source: Tensor | None, grid: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """``quantized [B, K, bits]`` → ``(full grid [B, bits, h, w], recovery logits [B, N, K] or None)``: unmerge
        with ``source`` (``"unmerge"``) or with the learned recovery's argmax (``"learned"``)."""
        logits = None
        if self.recovery is not None:
            n = self.recovery.queries.shape[1]
            if grid[0] * grid[1] != n:
                raise ValueError(f"MergeVQ: the learned source recovery has {n} position queries (the preset's "
                                 f"{self.config.image_size} px), got a {grid[0]}x{grid[1]} grid")
            logits = self.recovery(quantized)
            source = logits.argmax(dim=-1)
        full = unmerge(quantized, source)                             # [B, N, bits]
        return full.transpose(1, 2).unflatten(2, grid), logits

    def encode(self, images: Tensor, keep: int | None = None) -> TokenizerOutput:
        keep = self.config.eval_keep if keep is None else keep
        grid, out, _, _, source = self._quantize(images, keep)
        return TokenizerOutput(out.indices, out.quantized, {"source": source, "keep": keep, "grid": grid})

    def decode_indices(self, indices: Tensor, extras: dict[str, Any] | None = None) -> Tensor:
        who = "MergeVQ.decode_indices"
        if indices.dim() != 2 or indices.dtype != torch.int64:
            raise ValueError(f"{who}: indices must be int64 [B, K], got {indices.dtype} {list(indices.shape)}")
        extras = extras or {}
        source = extras.get("source")
        if self.recovery is None:
            if source is None:
                raise ValueError(f"{who}: recovery='unmerge' needs extras['source'] (encode's source map [B, N])")
            if source.dim() != 2 or source.shape[0] != indices.shape[0] or source.dtype != torch.int64:
                raise ValueError(f"{who}: extras['source'] must be int64 [B={indices.shape[0]}, N], got "
                                 f"{source.dtype} {list(source.shape)}")
            n = source.shape[1]
        else:
            n = self.config.grid_tokens
        grid = extras.get("grid")
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{who}: a non-square grid of {n} tokens needs extras['grid'] = (h, w)")
            grid = (side, side)
        grid = (int(grid[0]), int(grid[1]))
        if grid[0] * grid[1] != n:
            raise ValueError(f"{who}: extras['grid'] {grid} does not hold the {n} positions of the source map")
        quantized = self.quantizer.get_output_from_indices(indices)  # [B, K, bits]
        return self.decoder(self._recover(quantized, source, grid)[0])

    def _distill(self, cls: Tensor, images: Tensor) -> Tensor:
        """KL(T) between ``distill_head(cls [B, width])`` and the frozen teacher's pooled features of ``images``."""
        with torch.no_grad():
            target = self._frozen_net("teacher", images.device)((images.float() + 1) / 2)
        target = getattr(target, "pooled", target)
        if target.dim() != 2 or target.shape[1] != self.config.distill_dim:
            raise ValueError(f"MergeVQ: the teacher's pooled features must be [B, {self.config.distill_dim}] "
                             f"(distill_dim), got {list(target.shape)}; build the model with distill_dim="
                             f"{target.shape[-1]} for this teacher (EfficientNet-Lite0: 1280)")
        return kl_distillation_loss(self.distill_head(cls), target, self.config.distill_temperature)

    def distill_loss(self, images: Tensor, teacher_images: Tensor | None = None, keep: int | None = None) -> Tensor:
        """MergeVQ's two-view distillation: the CLS head on an encoder pass over ``images`` (its strongly augmented
        view) against the teacher on ``teacher_images`` (its weak view; default ``images``), both ``[B, C, H, W]``
        in ``[-1, 1]``; ``keep`` as in :meth:`forward`. ``forward`` distils on its own view and pass."""
        if self.distill_head is None:
            raise ValueError("MergeVQ.distill_loss: the model has no distillation head (distill_head=None)")
        self._grid(images)
        keep = (self.sample_keep() if self.training else self.config.eval_keep) if keep is None else keep
        _, cls, _ = self.encoder(images, keep)
        return self._distill(cls, images if teacher_images is None else teacher_images)

    def forward(self, images: Tensor, texts: Any = None, *, keep: int | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        if texts is not None:
            raise ValueError("MergeVQ.forward: MergeVQ has no text branch; texts must be None")
        if keep is None:
            keep = self.sample_keep(generator) if self.training else cfg.eval_keep
        grid, out, parts, cls, source = self._quantize(images, keep)
        full, logits = self._recover(out.quantized, source, grid)
        rec = self.decoder(full)
        total, terms = reconstruction_loss(rec, images, cfg.l1_weight, 0.0)
        losses = dict(terms, vq=out.loss, **parts)
        total = total + out.loss
        if cfg.perceptual_weight > 0:
            losses["perceptual"] = self._frozen_net("perceptual", images.device)(rec, images)
            total = total + cfg.perceptual_weight * losses["perceptual"]
        if self.distill_head is not None and cfg.distill_weight > 0:
            losses["distill"] = self._distill(cls, images)
            total = total + cfg.distill_weight * losses["distill"]
        if logits is not None:
            losses["source_recovery"] = F.cross_entropy(logits.flatten(0, 1).float(), source.flatten())
            total = total + cfg.source_weight * losses["source_recovery"]
        losses["loss"] = total
        return rec, losses


# ---- presets ---------------------------------------------------------------------------------------------------

# MergeVQ (G+R), configs/gpu_s1/imagenet_mergevq_256_GR_d64_8gpu_200ep.yaml: CNN stem 64 x (1, 1, 2, 4, 8) with 4
# ResBlocks per level, 256 px -> 16 x 16, 12 blocks of 512 / 8 heads, keep 144 (train 121..256), 'layer3' head.
register_preset("mergevq-gr-paper", MergeVQ, MergeVQConfig())
register_preset("mergevq-paper", MergeVQ, MergeVQConfig())  # the unified model: MergeVQ (G+R)
# MergeVQ (G), ..._256_G_d64_8gpu_100ep.yaml: 64 x (1, 2, 4, 8): 256 px -> 32 x 32 = 1,024 tokens, keep 256
# (train 225..529), the LayerNorm head, distillation weight 0.1.
_G_KEEP = keep_distribution(256, 9)
register_preset("mergevq-g-paper", MergeVQ, MergeVQConfig(
    ch_mult=(1, 2, 4, 8), eval_keep=256, keep_candidates=_G_KEEP[0], keep_probs=_G_KEEP[1], distill_head="mlp_ln",
    distill_weight=0.1))
# MergeVQ (R), ..._256_R_vitb_d64_8gpu_270ep.yaml: a ViT-B encoder (16 x 16 patches, 768 wide, 12 heads of 64),
# keep 64 (train 49..144); the decoder as G+R.
_R_KEEP = keep_distribution(64, 6)
register_preset("mergevq-r-paper", MergeVQ, MergeVQConfig(
    encoder="patch", num_heads=12, eval_keep=64, keep_candidates=_R_KEEP[0], keep_probs=_R_KEEP[1]))
# CPU-sized: 32 px -> 8 x 8 tokens, keep 36 (train 25..64), widths 32/64, 2 + 2 blocks; the head predicts
# EfficientNet-Lite0's 1280-d pooled features (the offline stand-in teacher).
_TINY_KEEP = keep_distribution(36, 4)
register_preset("mergevq-tiny", MergeVQ, MergeVQConfig(
    image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, depth=2, num_heads=4, eval_keep=36,
    keep_candidates=_TINY_KEEP[0], keep_probs=_TINY_KEEP[1], recovery_width=64, recovery_depth=1,
    recovery_heads=4, decoder_depth=2, decoder_heads=4, distill_dim=1280))
# The step-time benchmark's size: 128 px -> 16 x 16 tokens (keep 144 as G+R), widths 64..256, 8 + 8 blocks.
register_preset("mergevq-small", MergeVQ, MergeVQConfig(
    image_size=128, ch_mult=(1, 1, 2, 4), num_res_blocks=2, depth=8, num_heads=8, recovery_width=256,
    recovery_heads=8, decoder_depth=8, decoder_heads=8, distill_dim=1280))
