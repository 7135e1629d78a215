"""UniTok (Ma et al. 2025, "UniTok: A Unified Tokenizer for Visual Generation and Understanding"); docs/models.md.

One tokenizer for generation and understanding: a ViTamin hybrid encoder, an attention-factorization projection
to 64-d, multi-codebook quantization (8 codebooks of 4,096 8-d cosine codes), the mirrored projection and decoder,
and a CLIP-style branch that aligns the mean-pooled quantized tokens with a text tower::

    images [B, 3, H, W] in [-1, 1]
      ViTaminEncoder    stem /2, MBConv stages /2 /2, strided conv /2, ViT blocks (GeGLU)   -> [B, N, width], N = HW/256
      quant_proj        AttnProjection(width -> code_dim)                                    -> [B, N, code_dim]
      quantizer         MultiCodebookQuantizer (num_codebooks x codebook_size, cosine)       -> indices [B, h, w, G]
      post_quant_proj   AttnProjection(code_dim -> width)                                    -> [B, N, width]
      ViTaminDecoder    ViT blocks, upsampling conv stages x16                               -> [B, 3, H, W]
      CLIP branch       mean over N -> LayerNorm -> Linear(width -> clip_dim)   vs   text tower -> Linear(text_dim -> clip_dim)

Facts (widths, depths, the projection, the decoder's inverted MBConv, the CLIP head on the *post-quantization*
tokens, the fp32 quantization island) come from the public UniTok code (``models/unitok.py``, ``models/vitamin.py``,
``models/vqvae.py``); the loss weights from the paper. What fastvq does differently, and why:

* the text tower is the frozen all-MiniLM-L6-v2 (``fastvq.eval.MiniLMTextEncoder``, 384-d) plus a learned linear
  projection, not UniTok's OpenCLIP text transformer initialised from ViTamin-L CLIP (no such weights install
  offline). It is optional and lazy: ``texts=None`` skips the contrastive loss, and the model builds, trains and
  saves without ``transformers``;
* the perceptual term is ``fastvq.losses.PerceptualFeatureLoss`` over EfficientNet-Lite0 (uncalibrated, **not
  LPIPS**), built lazily when ``perceptual_weight > 0``;
* the frozen networks are kept out of the module tree (no parameters, no state-dict entries): checkpoints hold the
  tokenizer only, and the frozen weights always come from their packages;
* the GAN term (``gan_weight`` x VQGAN's adaptive weight over :attr:`UniTok.last_layer`) is the trainer's, with
  ``fastvq.losses.GANLoss``; UniTok's optional codebook entropy loss (off in the paper's recipe) is not included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.losses import ClipContrastiveLoss, reconstruction_loss
from fastvq.models.blocks import (AttnProjection, LayerNorm2d, MBConv, Upsample, ViTaminStem, ViTBlock,
                                  _make_divisible)
from fastvq.models.tokenizer import Tokenizer, TokenizerOutput, perceptual_feature_loss, register_preset
from fastvq.nn import MultiCodebookQuantizer
from fastvq.nn._quantizer import fp32_island

__all__ = ["UniTokConfig", "UniTok", "ViTaminEncoder", "ViTaminDecoder"]


@dataclass
class UniTokConfig:
    """UniTok's architecture and loss weights. Defaults are the paper's model (= the ``unitok-paper`` preset).

    Encoder (ViTamin-L): ``stem_width``, MBConv ``conv_widths`` / ``conv_depths`` (each stage's first block has
    stride 2), then ``depth`` ViT blocks of ``width`` with ``num_heads`` heads and a GeGLU MLP of ``mlp_ratio``.
    Decoder: ``decoder_depth`` ViT blocks, then the conv stages in reverse with ``decoder_conv_depths``.
    Quantizer: ``quant_proj`` ``"attn"`` (UniTok's attention factorization, ``proj_heads`` heads) or ``"linear"``;
    ``num_codebooks`` codebooks of ``codebook_size`` codes of ``code_dim / num_codebooks`` dims, cosine,
    ``commitment_weight`` (UniTok's β). CLIP branch: ``clip_dim``, ``text_dim`` (the text tower's width),
    ``init_temperature``. Loss weights: ``l1_weight`` 0.2, ``l2_weight`` 1, ``perceptual_weight`` 1, ``vq_weight``
    1, ``contrastive_weight`` 1 (used by ``forward``); ``gan_weight`` 0.4 (used by the trainer).
    ``grad_checkpointing``: recompute each ViT block in the backward pass while training (UniTok's ``grad_ckpt``;
    same values and gradients, less activation memory at paper scale)."""

    image_size: int = 256
    in_channels: int = 3
    stem_width: int = 160
    conv_widths: tuple[int, ...] = (160, 320)
    conv_depths: tuple[int, ...] = (2, 4)
    width: int = 1024
    depth: int = 31
    num_heads: int = 16
    mlp_ratio: float = 2.0
    decoder_depth: int = 31
    decoder_conv_depths: tuple[int, ...] = (4, 2)
    quant_proj: str = "attn"
    proj_heads: int = 16
    code_dim: int = 64
    num_codebooks: int = 8
    codebook_size: int = 4096
    commitment_weight: float = 0.25
    clip_dim: int = 768
    text_dim: int = 384
    init_temperature: float = 0.07
    l1_weight: float = 0.2
    l2_weight: float = 1.0
    perceptual_weight: float = 1.0
    vq_weight: float = 1.0
    contrastive_weight: float = 1.0
    gan_weight: float = 0.4
    grad_checkpointing: bool = False

    @property
    def downsample(self) -> int:
        """Pixels per token side: the stem, each conv stage and the strided conv halve the resolution."""
        return 2 ** (len(self.conv_widths) + 2)

    def validate(self) -> None:
        who = "UniTokConfig"
        if len(self.conv_widths) != len(self.conv_depths) or len(self.conv_widths) != len(self.decoder_conv_depths):
            raise ValueError(f"{who}: conv_widths, conv_depths and decoder_conv_depths must have one entry per stage, "
                             f"got {self.conv_widths}, {self.conv_depths}, {self.decoder_conv_depths}")
        if min(self.conv_depths + self.decoder_conv_depths) < 1:
            raise ValueError(f"{who}: every conv stage needs at least one block (it holds the stride)")
        if self.quant_proj not in ("attn", "linear"):
            raise ValueError(f"{who}: quant_proj must be 'attn' or 'linear', got {self.quant_proj!r}")
        if self.image_size % self.downsample:
            raise ValueError(f"{who}: image_size {self.image_size} must be a multiple of {self.downsample}")


def minilm_text_encoder() -> nn.Module:
    """UniTok's default frozen text tower, ``fastvq.eval.MiniLMTextEncoder`` (imported on first use)."""
    from fastvq.eval import MiniLMTextEncoder
    return MiniLMTextEncoder()


def _init_weights(module: nn.Module) -> None:
    """timm's ViT initialisation for linears (truncated normal, std 0.02, zero bias) and ViTamin's for convs
    (normal with std ``sqrt(2 / fan_out)``, zero bias)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _run_blocks(blocks: nn.ModuleList, x: Tensor, checkpointing: bool) -> Tensor:
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


class ViTaminEncoder(nn.Module):
    """ViTamin's hybrid trunk as UniTok uses it (no class token, no position embedding, final LayerNorm):
    ``images [B, in_channels, H, W] → tokens [B, (H/s)·(W/s), width]``, ``s = 2^(stages + 2)`` (16 for ViTamin).

    ``stem`` (/2) → MBConv ``stages`` (/2 each) → ``to_tokens`` (LayerNorm2d + 3×3 conv stride 2 to ``width``,
    ViTamin's ``StridedConv``) → row-major tokens → ``blocks`` (pre-norm ViT, GeGLU MLP with its inner LayerNorm)
    → ``norm``."""

    def __init__(self, cfg: UniTokConfig):
        super().__init__()
        self.stem = ViTaminStem(cfg.in_channels, cfg.stem_width)
        blocks, prev = [], cfg.stem_width
        for w, n in zip(cfg.conv_widths, cfg.conv_depths):
            blocks += [MBConv(prev if d == 0 else w, w, stride=2 if d == 0 else 1) for d in range(n)]
            prev = w
        self.stages = nn.Sequential(*blocks)
        self.to_tokens = nn.Sequential(LayerNorm2d(prev, eps=1e-6), nn.Conv2d(prev, cfg.width, 3, stride=2, padding=1))
        self.blocks = nn.ModuleList(ViTBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, mlp="geglu", inner_norm=True)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, images: Tensor) -> Tensor:
        x = self.to_tokens(self.stages(self.stem(images)))  # [B, width, h, w]
        x = x.flatten(2).transpose(1, 2)                     # [B, h·w, width]
        return self.norm(_run_blocks(self.blocks, x, self.grad_checkpointing and self.training))


class InvMBConv(nn.Module):
    """The decoder's mirror of :class:`~fastvq.models.blocks.MBConv` (UniTok's ``InvMbConvLNBlock``),
    ``[B, in_ch, H, W] → [B, out_ch, stride·H, stride·W]``:
    ``h = conv1x1(GELU(dwconv3x3(up(GELU(conv1x1(LN2d(x)))))))``, ``y = shortcut(x) + h``, expansion
    ``make_divisible(4·out_ch, 8)``; for stride 2, ``up`` and the shortcut are :class:`Upsample` (nearest ×2 +
    3×3 conv), otherwise ``up`` is the identity and the shortcut a 1×1 conv when the widths differ."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, expand_ratio: float = 4.0):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvMBConv: stride must be 1 or 2, got {stride}")
        mid = _make_divisible(out_ch * expand_ratio)
        if stride == 2:
            self.shortcut = Upsample(in_ch, out_ch)
        else:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.pre_norm = LayerNorm2d(in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, mid, 1)
        self.up = Upsample(mid, mid) if stride == 2 else nn.Identity()
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(F.gelu(self.conv1(self.pre_norm(x))))
        h = F.gelu(self.conv2(h))
        return self.shortcut(x) + self.conv3(h)


class ViTaminDecoder(nn.Module):
    """UniTok's decoder, the encoder mirrored: ``tokens [B, h·w, width]`` and ``grid=(h, w)`` →
    ``images [B, in_channels, s·h, s·w]``.

    ``blocks`` (ViT, as the encoder's) → ``norm`` → feature map → ``up`` (:class:`Upsample` to the last conv
    width, ×2) → the conv stages in reverse order, each an :class:`InvMBConv` stack whose first block upsamples
    ×2 → ``out``: :class:`Upsample` (×2), LayerNorm2d + GELU, 3×3 conv to pixels (``out_conv``, whose weight is
    :attr:`UniTok.last_layer`)."""

    def __init__(self, cfg: UniTokConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ViTBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, mlp="geglu", inner_norm=True)
                                    for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        widths = tuple(reversed(cfg.conv_widths))
        self.up = Upsample(cfg.width, widths[0])
        stages, prev = [], widths[0]
        for w, n in zip(widths, cfg.decoder_conv_depths):
            stages += [InvMBConv(prev if d == 0 else w, w, stride=2 if d == 0 else 1) for d in range(n)]
            prev = w
        self.stages = nn.Sequential(*stages)
        self.out_up = Upsample(prev, prev)
        self.out_norm = LayerNorm2d(prev, eps=1e-6)
        self.out_conv = nn.Conv2d(prev, cfg.in_channels, 3, padding=1)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, c = tokens.shape
        x = _run_blocks(self.blocks, tokens, self.grad_checkpointing and self.training)
        x = self.norm(x).transpose(1, 2).reshape(b, c, grid[0], grid[1])  # [B, width, h, w]
        x = self.stages(self.up(x))
        return self.out_conv(F.gelu(self.out_norm(self.out_up(x))))


class UniTok(Tokenizer):
    """UniTok: ``encode`` / ``decode_indices`` / ``forward`` as :class:`~fastvq.models.tokenizer.Tokenizer`.

    * ``encode(images [B, C, H, W]) → TokenizerOutput(indices [B, h, w, num_codebooks] int64,
      quantized [B, h·w, code_dim] (unit-norm chunks), extras {})``, ``h = H/16``, ``w = W/16`` (ViTamin; any
      multiple of 16 works, the model has no position table); run it in eval mode;
    * ``decode_indices(indices [B, h, w, G]) → images [B, C, 16h, 16w]``, not clamped (clamp to [-1, 1] to view);
    * ``forward(images, texts=None) → (reconstruction, losses)`` with the unweighted terms ``l1``, ``l2``,
      ``perceptual`` (when ``perceptual_weight > 0``), ``vq`` (the quantizer's ``0.25·commitment + codebook``; 0 in
      eval mode), ``commitment``, ``codebook``, ``contrastive`` (when ``texts`` is given and
      ``contrastive_weight > 0``) and ``loss`` = the weighted sum of those terms. ``texts``: a list of ``B``
      captions for the text tower, or its features ``[B, text_dim]`` (a frozen tower's features can be cached).

    Images are in ``[-1, 1]``. The quantization path (``quant_proj``, quantizer, ``post_quant_proj``) runs in fp32
    with autocast off, as UniTok. The frozen text tower and perceptual network are attached with
    :meth:`set_text_encoder` / :meth:`set_perceptual_loss`, or built on first use (``fastvq.eval``, the ``[eval]``
    extra); they are not submodules. After each optimizer step, call ``model.contrastive.clamp_()`` (CLIP's
    logit-scale bound).
    """

    model_name = "unitok"
    config_class = UniTokConfig
    frozen_builders = {"text": minilm_text_encoder, "perceptual": perceptual_feature_loss}

    def __init__(self, config: UniTokConfig | None = None):
        super().__init__()
        cfg = config if config is not None else UniTokConfig()
        cfg.validate()
        self.config = cfg
        self.encoder = ViTaminEncoder(cfg)
        if cfg.quant_proj == "attn":
            self.quant_proj = AttnProjection(cfg.width, cfg.code_dim, cfg.proj_heads)
            self.post_quant_proj = AttnProjection(cfg.code_dim, cfg.width, cfg.proj_heads)
        else:
            self.quant_proj = nn.Linear(cfg.width, cfg.code_dim)
            self.post_quant_proj = nn.Linear(cfg.code_dim, cfg.width)
        self.decoder = ViTaminDecoder(cfg)
        self.clip_norm = nn.LayerNorm(cfg.width, eps=1e-6)   # UniTok's fc_norm
        self.clip_proj = nn.Linear(cfg.width, cfg.clip_dim)  # UniTok's projection
        self.text_proj = nn.Linear(cfg.text_dim, cfg.clip_dim)
        self.contrastive = ClipContrastiveLoss(cfg.init_temperature)
        for m in (self.encoder, self.quant_proj, self.post_quant_proj, self.decoder, self.clip_proj, self.text_proj):
            m.apply(_init_weights)
        self.quantizer = MultiCodebookQuantizer(cfg.code_dim, num_codebooks=cfg.num_codebooks,
                                                codebook_size=cfg.codebook_size, metric="cosine",
                                                commitment_weight=cfg.commitment_weight)

    # ---- the frozen networks ------------------------------------------------------------------------------------

    def set_text_encoder(self, encoder: nn.Module | None) -> None:
        """Use ``encoder`` (texts → ``[B, text_dim]`` or an object with ``.pooled [B, text_dim]``) as the frozen
        text tower; its parameters are frozen. ``None``: build ``fastvq.eval.MiniLMTextEncoder`` on first use."""
        self.set_frozen("text", encoder)

    # ---- the model ----------------------------------------------------------------------------------------------

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight (``decoder.out_conv.weight``): VQGAN's adaptive GAN weight is taken over it
        (``fastvq.losses.adaptive_gan_weight``; UniTok's ``get_last_param``)."""
        return self.decoder.out_conv.weight

    def _quantize(self, images: Tensor):
        """``images → (grid, QuantizeOutput, breakdown)``; ``quantized [B, N, code_dim]``, ``indices [B, N, G]``."""
        grid = self._grid(images)
        tokens = self.encoder(images)  # [B, N, width]
        with fp32_island(images.device):
            out, parts = self.quantizer(self.quant_proj(tokens.float()), return_loss_breakdown=True)
        return grid, out, parts

    def _decode(self, quantized: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``quantized [B, N, code_dim] → (post-quantization tokens [B, N, width] fp32, images)``."""
        with fp32_island(quantized.device):
            tokens = self.post_quant_proj(quantized.float())
        return tokens, self.decoder(tokens, grid)

    def encode(self, images: Tensor) -> TokenizerOutput:
        grid, out, _ = self._quantize(images)
        indices = out.indices.view(images.shape[0], grid[0], grid[1], self.config.num_codebooks)
        return TokenizerOutput(indices, out.quantized, {})

    def decode_indices(self, indices: Tensor, extras: dict[str, Any] | None = None) -> Tensor:
        G = self.config.num_codebooks
        if indices.dim() != 4 or indices.shape[-1] != G or indices.is_floating_point():
            raise ValueError(f"UniTok.decode_indices: indices must be integer [B, h, w, {G}], got "
                             f"{indices.dtype} {list(indices.shape)}")
        b, h, w, _ = indices.shape
        quantized = self.quantizer.get_output_from_indices(indices.reshape(b, h * w, G))  # [B, N, code_dim]
        return self._decode(quantized, (h, w))[1]

    def image_features(self, tokens: Tensor) -> Tensor:
        """The CLIP image embedding ``[B, clip_dim]`` (not normalised) from post-quantization tokens
        ``[B, N, width]``: ``Linear(LN(mean over N))``."""
        return self.clip_proj(self.clip_norm(tokens.mean(dim=1)))

    def embed_images(self, images: Tensor) -> Tensor:
        """The CLIP image embedding ``[B, clip_dim]`` of ``images [B, C, H, W]`` in ``[-1, 1]`` (encode, quantize,
        post-quantization projection, :meth:`image_features`); with :meth:`text_features`, the towers that
        zero-shot classification and retrieval use (``fastvq.train``'s evaluation hook)."""
        _, out, _ = self._quantize(images)
        with fp32_island(images.device):
            tokens = self.post_quant_proj(out.quantized.float())
        return self.image_features(tokens)

    def text_features(self, texts: Sequence[str] | Tensor) -> Tensor:
        """The CLIP text embedding ``[B, clip_dim]`` (not normalised): ``text_proj`` of the frozen tower's
        features (``texts``: captions, or the tower's features ``[B, text_dim]``)."""
        if isinstance(texts, Tensor):
            feats = texts
        else:
            with torch.no_grad():
                feats = self._frozen_net("text", self.text_proj.weight.device)(list(texts))
            feats = getattr(feats, "pooled", feats)
        if feats.dim() != 2 or feats.shape[1] != self.config.text_dim:
            raise ValueError(f"UniTok: text features must be [B, {self.config.text_dim}] (text_dim), got "
                             f"{list(feats.shape)}")
        return self.text_proj(feats.to(self.text_proj.weight.dtype).detach())

    def forward(self, images: Tensor, texts: Sequence[str] | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        if texts is not None and len(texts) != images.shape[0]:
            raise ValueError(f"UniTok.forward: texts must hold one caption (or feature row) per image, got "
                             f"{len(texts)} for {images.shape[0]} images")
        grid, out, parts = self._quantize(images)
        tokens, rec = self._decode(out.quantized, grid)
        total, terms = reconstruction_loss(rec, images, cfg.l1_weight, cfg.l2_weight)
        losses = dict(terms, vq=out.loss, **parts)
        total = total + cfg.vq_weight * out.loss
        if cfg.perceptual_weight > 0:
            losses["perceptual"] = self._frozen_net("perceptual", images.device)(rec, images)
            total = total + cfg.perceptual_weight * losses["perceptual"]
        if texts is not None and cfg.contrastive_weight > 0:
            losses["contrastive"], _ = self.contrastive(self.image_features(tokens), self.text_features(texts))
            total = total + cfg.contrastive_weight * losses["contrastive"]
        losses["loss"] = total
        return rec, losses


# ---- presets ---------------------------------------------------------------------------------------------------

# The published model: ViTamin-L encoder and its mirrored decoder, 256 px -> 16 x 16 tokens, MCQ 8 x 4,096 x 8-d.
register_preset("unitok-paper", UniTok, UniTokConfig())
# CPU-sized: 64 px -> 4 x 4 tokens, widths 16/32/64, 2 + 2 ViT blocks, 4 codebooks of 256 8-d codes.
register_preset("unitok-tiny", UniTok, UniTokConfig(
    image_size=64, stem_width=16, conv_widths=(16, 32), conv_depths=(1, 1), width=64, depth=2, num_heads=4,
    decoder_depth=2, decoder_conv_depths=(1, 1), proj_heads=2, code_dim=32, num_codebooks=4, codebook_size=256,
    clip_dim=64))
# Benchmark-sized (bench_models.py): 128 px -> 8 x 8 tokens, ViT 384 x 6, the paper's quantizer (8 x 4,096 x 8-d).
register_preset("unitok-small", UniTok, UniTokConfig(
    image_size=128, stem_width=32, conv_widths=(64, 128), conv_depths=(1, 2), width=384, depth=6, num_heads=6,
    decoder_depth=6, decoder_conv_depths=(2, 1), proj_heads=8, clip_dim=256))
