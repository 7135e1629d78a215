"""VQRAE (Du et al. 2025, "VQRAE: Representation Quantization Autoencoders for Multimodal Understanding, Generation
and Reconstruction", arXiv:2511.23386); docs/models.md, "VQRAE".

A representation autoencoder made discrete: a pretrained vision foundation model (VFM) is the encoder, its
continuous tokens serve understanding, a high-dimensional SimVQ codebook turns them into discrete tokens for
generation, and a symmetric ViT decoder maps the codes back to pixels::

    images [B, 3, H, W] in [-1, 1]
      encoder           the VFM: a ViT (``encoder="vit"``) or a fastvq.eval.FrozenImageEncoder   -> [B, N, width]
                        (its tokens are the continuous features an MLLM reads: :meth:`VQRAE.features`)
      quant_proj        Linear(width -> codebook_dim)                                            -> [B, N, codebook_dim]
      quantizer         SimVQ: codebook_size codes of codebook_dim (1,536 in the paper), l2       -> indices [B, h, w]
      decoder           Linear(codebook_dim -> decoder_width), ViT blocks, LayerNorm,
                        Linear(-> patch² · 3), pixel shuffle                                      -> [B, 3, H, W]

Training has two stages (:meth:`VQRAE.set_stage`):

1. the encoder is frozen; ``quant_proj``, the codebook map and the decoder learn from pixel reconstruction (L2,
   perceptual, GAN) and SimVQ's commitment loss;
2. the encoder trains too, held near its stage-1 self by a self-distillation term against a frozen copy taken
   when stage 2 begins (``fastvq.losses.frozen_copy`` / ``self_distillation_loss``).

What is the paper's (from its abstract and summaries; the paper's code was not reachable here): the VFM encoder,
the symmetric ViT decoder, SimVQ, the 1,536-d codebook with full usage, the two stages and their frozen parts,
L2 + perceptual + GAN reconstruction losses. What fastvq chooses, and why:

* the ``vqrae-paper`` preset builds the encoder as a ViT of SigLIP2-so400m/16's size (width 1,152, 27 blocks,
  16 heads, MLP 4,304), randomly initialised: no SigLIP2 / InternViT weights install offline. A user who has
  the weights on disk runs the paper's setting with ``encoder="timm:<model>", encoder_checkpoint=<file>``
  (``fastvq.eval.TimmImageEncoder``); the offline pretrained stand-in is ``encoder="efficientnet_lite0"`` (a
  small ImageNet CNN, **not** a SigLIP-class VFM), preset ``vqrae-efficientnet-lite0``;
* ViTs take 2-D RoPE in every block instead of SigLIP2's learned position table, so one model serves any
  multiple of the patch size; the codebook size (16,384) comes from secondary summaries of the paper;
* the self-distillation distance is the token MSE of ``fastvq.losses.self_distillation_loss`` (docs/models.md
  says why); the perceptual term is ``PerceptualFeatureLoss`` over EfficientNet-Lite0 (**not LPIPS**); the GAN
  term is the trainer's (``gan_weight`` over :attr:`VQRAE.last_layer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.losses import frozen_copy, reconstruction_loss, self_distillation_loss
from fastvq.models.blocks import ViTBlock
from fastvq.models.tokenizer import Tokenizer, TokenizerOutput, register_preset
from fastvq.nn import SimVQ
from fastvq.nn._quantizer import fp32_island

__all__ = ["VQRAEConfig", "VQRAE", "ViTEncoder", "ViTDecoder", "PretrainedEncoder"]

_STAGES = (1, 2)


@dataclass
class VQRAEConfig:
    """VQRAE's architecture, training stage and loss weights. Defaults are the paper's model (= ``vqrae-paper``).

    Encoder: ``encoder`` is ``"vit"`` (a ViT built here: ``patch_size``, ``width``, ``depth``, ``num_heads``,
    ``mlp_dim``; SigLIP2-so400m/16's size by default), ``"efficientnet_lite0"`` (``fastvq.eval.EfficientNetLite0``,
    the offline pretrained stand-in: 7 x 7 tokens of 1,280 at any input size) or ``"timm:<model name>"``
    (``fastvq.eval.TimmImageEncoder``, weights from the local file ``encoder_checkpoint``; ``""`` builds it
    untrained, which is what ``from_pretrained`` does before loading the saved weights). ``width`` is the
    encoder's token width, checked against a pretrained network's. For the pretrained encoders, which resize
    every image to their own input, images must be ``image_size`` square and their token grid times
    ``patch_size`` must equal ``image_size``.
    Decoder (symmetric: the presets mirror the encoder): ``decoder_width``, ``decoder_depth``,
    ``decoder_heads``, ``decoder_mlp_dim``; its patch head emits ``patch_size``² pixels per token.
    Quantizer: SimVQ with ``codebook_size`` codes of ``codebook_dim``; ``commitment_weight`` scales its
    ``mse(sg(z), q) + 0.25 · mse(z, sg(q))``; ``rotation_trick`` (else straight-through).
    ``stage``: 1 (encoder frozen) or 2 (encoder trained, self-distilled against a frozen copy);
    ``distill_weight`` and ``distill_metric`` (``"mse"`` or ``"cosine"``) weigh the stage-2 term.
    Loss weights used by ``forward``: ``l1_weight`` 0, ``l2_weight`` 1 (the paper's L2), ``perceptual_weight`` 1,
    ``vq_weight`` 1; ``gan_weight`` is the trainer's (0.5, LlamaGen's: the paper's λ_G was not in the sources
    reached, nor the other weights' values)."""

    image_size: int = 256
    in_channels: int = 3
    encoder: str = "vit"
    encoder_checkpoint: str = ""
    patch_size: int = 16
    width: int = 1152
    depth: int = 27
    num_heads: int = 16
    mlp_dim: int = 4304
    decoder_width: int = 1152
    decoder_depth: int = 27
    decoder_heads: int = 16
    decoder_mlp_dim: int = 4304
    codebook_dim: int = 1536
    codebook_size: int = 16384
    commitment_weight: float = 1.0
    rotation_trick: bool = False
    stage: int = 1
    distill_weight: float = 1.0
    distill_metric: str = "mse"
    l1_weight: float = 0.0
    l2_weight: float = 1.0
    perceptual_weight: float = 1.0
    vq_weight: float = 1.0
    gan_weight: float = 0.5

    def validate(self) -> None:
        who = "VQRAEConfig"
        if self.encoder not in ("vit", "efficientnet_lite0") and not (self.encoder.startswith("timm:")
                                                                     and len(self.encoder) > 5):
            raise ValueError(f"{who}: encoder must be 'vit', 'efficientnet_lite0' or 'timm:<model name>', "
                             f"got {self.encoder!r}")
        if self.encoder != "vit" and self.in_channels != 3:
            raise ValueError(f"{who}: the pretrained encoder {self.encoder!r} reads RGB images: in_channels must be 3, "
                             f"got {self.in_channels}")
        if self.encoder_checkpoint and not self.encoder.startswith("timm:"):
            raise ValueError(f"{who}: encoder_checkpoint is read only for encoder='timm:<model name>', got "
                             f"encoder={self.encoder!r}")
        for name in ("image_size", "in_channels", "patch_size", "width", "decoder_width", "decoder_depth",
                     "decoder_heads", "decoder_mlp_dim", "codebook_dim", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{who}: {name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"{who}: image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        dims = [("decoder", self.decoder_width, self.decoder_heads)]
        if self.encoder == "vit":
            if min(self.depth, self.num_heads, self.mlp_dim) < 1:
                raise ValueError(f"{who}: depth, num_heads and mlp_dim must be >= 1, got {self.depth}, "
                                 f"{self.num_heads}, {self.mlp_dim}")
            dims.append(("encoder", self.width, self.num_heads))
        for part, w, h in dims:
            if w % h or (w // h) % 4:
                raise ValueError(f"{who}: the {part} width {w} must split into {h} heads of a multiple of 4 "
                                 "channels (2-D RoPE)")
        if self.stage not in _STAGES:
            raise ValueError(f"{who}: stage must be 1 or 2, got {self.stage}")
        if self.distill_metric not in ("mse", "cosine"):
            raise ValueError(f"{who}: distill_metric must be 'mse' or 'cosine', got {self.distill_metric!r}")


def _init_weights(module: nn.Module) -> None:
    """timm's ViT initialisation of linears: truncated normal, std 0.02, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _blocks(width: int, depth: int, heads: int, mlp_dim: int) -> nn.ModuleList:
    # ViTBlock's hidden width is int(width · mlp_ratio); the half keeps it exactly mlp_dim under rounding
    ratio = (mlp_dim + 0.5) / width
    return nn.ModuleList(ViTBlock(width, heads, ratio, mlp="gelu", rope=True) for _ in range(depth))


class ViTEncoder(nn.Module):
    """A SigLIP-style ViT trunk (no class token, no pooling head) with 2-D RoPE in every block:
    ``images [B, in_channels, H, W] in [-1, 1] → tokens [B, (H/p)·(W/p), width]`` (row-major grid).

    ``patch_embed`` (conv p×p, stride p; SigLIP's input normalisation maps [0, 1] to exactly this [-1, 1])
    → ``blocks`` (pre-norm, GELU MLP of ``mlp_dim``) → ``norm`` (SigLIP's post-LayerNorm)."""

    def __init__(self, cfg: VQRAEConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.blocks = _blocks(cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)                  # [B, width, h, w]
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)              # [B, h·w, width]
        for blk in self.blocks:
            x = blk(x, grid)
        return self.norm(x)


class PretrainedEncoder(nn.Module):
    """A ``fastvq.eval.FrozenImageEncoder`` as VQRAE's encoder: ``images [B, 3, H, W] in [-1, 1] → tokens
    [B, T, C]`` (the network's tokens without its prefix tokens, e.g. a class token). The network resizes
    and normalises its input itself, and stays in eval mode (batch-norm statistics never move, also in stage
    2, where its weights train). :meth:`token_parameters` are the parameters its tokens depend on: all but a
    classifier or pooling head, which nothing would train in stage 2."""

    def __init__(self, net: nn.Module):
        super().__init__()
        from fastvq.eval.networks import EfficientNetLite0, TimmImageEncoder
        self.net = net
        self.num_prefix = int(getattr(net.net, "num_prefix_tokens", 0)) if isinstance(net, TimmImageEncoder) else 0
        if isinstance(net, EfficientNetLite0):
            self._heads = ("net.net._fc.",)
        elif isinstance(net, TimmImageEncoder):
            self._heads = tuple(f"net.net.{m}." for m in ("head", "attn_pool", "fc_norm", "head_drop"))
        else:
            self._heads = ()

    def forward(self, images: Tensor) -> Tensor:
        return self.net((images + 1) / 2).tokens[:, self.num_prefix:]

    def token_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(self._heads)]


def _build_encoder(cfg: VQRAEConfig) -> nn.Module:
    if cfg.encoder == "vit":
        return ViTEncoder(cfg)
    from fastvq.eval import networks  # the heavy import, only for a pretrained encoder
    if cfg.encoder == "efficientnet_lite0":
        net = networks.EfficientNetLite0()
    else:
        net = networks.TimmImageEncoder(cfg.encoder[5:], checkpoint=cfg.encoder_checkpoint or None,
                                        random_init=not cfg.encoder_checkpoint)
    if net.dim != cfg.width:
        raise ValueError(f"VQRAEConfig: width must be the encoder's token width, {net.dim} for {cfg.encoder!r}, got "
                         f"{cfg.width}")
    return PretrainedEncoder(net)


class ViTDecoder(nn.Module):
    """VQRAE's symmetric ViT decoder: ``codes [B, h·w, codebook_dim]`` and ``grid=(h, w)`` → ``images [B, C,
    p·h, p·w]``: ``embed`` (linear to ``decoder_width``) → ``blocks`` (as the encoder's, 2-D RoPE) → ``norm`` →
    ``head`` (linear to ``p²·C`` per token; its weight is :attr:`VQRAE.last_layer`) → pixel shuffle."""

    def __init__(self, cfg: VQRAEConfig):
        super().__init__()
        self.patch_size, self.out_channels = cfg.patch_size, cfg.in_channels
        self.embed = nn.Linear(cfg.codebook_dim, cfg.decoder_width)
        self.blocks = _blocks(cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads, cfg.decoder_mlp_dim)
        self.norm = nn.LayerNorm(cfg.decoder_width, eps=1e-6)
        self.head = nn.Linear(cfg.decoder_width, cfg.patch_size ** 2 * cfg.in_channels)

    def forward(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, _ = codes.shape
        x = self.embed(codes)
        for blk in self.blocks:
            x = blk(x, grid)
        x = self.head(self.norm(x))                                 # [B, h·w, C·p·p], channel-major per token
        x = x.transpose(1, 2).reshape(b, -1, grid[0], grid[1])      # [B, C·p·p, h, w]
        return F.pixel_shuffle(x, self.patch_size)                  # [B, C, p·h, p·w]


class VQRAE(Tokenizer):
    """VQRAE: ``encode`` / ``decode_indices`` / ``forward`` as :class:`~fastvq.models.tokenizer.Tokenizer`, plus
    :meth:`features` (the continuous tokens for understanding) and :meth:`set_stage`.

    * ``encode(images [B, C, H, W]) → TokenizerOutput(indices [B, h, w] int64, quantized [B, h·w, codebook_dim],
      extras {})``, ``h = H/p``, ``w = W/p`` for the ViT encoder (any multiple of ``p``, non-square too); run it in
      eval mode, where ``quantized`` is the codes of the indices (what :meth:`decode_indices` decodes);
    * ``decode_indices(indices [B, h, w]) → images [B, C, p·h, p·w]``, not clamped;
    * ``forward(images, texts=None) → (reconstruction, losses)``: the unweighted terms ``l1``, ``l2``,
      ``perceptual`` (when ``perceptual_weight > 0``), ``vq`` (SimVQ's weighted commitment loss; 0 in eval mode),
      ``quantize_to_input``, ``input_to_quantize``, ``distill`` (stage 2), ``loss`` = the weighted sum, and
      ``codebook_usage``: the fraction of codes used since ``model.quantizer.reset_usage()`` (a statistic for
      logging, in no loss). ``texts`` is accepted for the common API and not used (VQRAE has no text loss).

    Images are in ``[-1, 1]``. ``quant_proj`` and the quantizer run in fp32 with autocast off. The perceptual
    network is attached with :meth:`set_perceptual_loss` or built on first use; it is not a submodule.
    In stage 2 the teacher (the frozen copy of the encoder) is the submodule ``teacher``, saved with the model
    so a stage-2 checkpoint resumes exactly."""

    model_name = "vqrae"
    config_class = VQRAEConfig

    def __init__(self, config: VQRAEConfig | None = None):
        super().__init__()
        cfg = config if config is not None else VQRAEConfig()
        cfg.validate()
        self.config = cfg
        self.encoder = _build_encoder(cfg)
        self.quant_proj = nn.Linear(cfg.width, cfg.codebook_dim)
        self.decoder = ViTDecoder(cfg)
        modules = (self.quant_proj, self.decoder) + ((self.encoder,) if cfg.encoder == "vit" else ())
        for m in modules:
            m.apply(_init_weights)
        self.quantizer = SimVQ(cfg.codebook_dim, cfg.codebook_size, commitment_weight=cfg.commitment_weight,
                               rotation_trick=cfg.rotation_trick)
        self.teacher: nn.Module | None = None
        self._apply_stage(cfg.stage)

    # ---- the two training stages --------------------------------------------------------------------------------

    def _encoder_parameters(self) -> list[nn.Parameter]:
        enc = self.encoder
        return enc.token_parameters() if isinstance(enc, PretrainedEncoder) else list(enc.parameters())

    def _apply_stage(self, stage: int) -> None:
        self.encoder.requires_grad_(False)
        if stage == 1:
            self.teacher = None
        else:
            if self.teacher is None:
                self.teacher = frozen_copy(self.encoder)
            for p in self._encoder_parameters():
                p.requires_grad_(True)

    def set_stage(self, stage: int) -> VQRAE:
        """Switch the training stage (recorded in ``config.stage``, so checkpoints keep it):

        * 1: the encoder is frozen and the teacher dropped;
        * 2: the teacher becomes a frozen copy of the encoder as it is now (the stage-1 encoder, i.e. the
          pretrained VFM), unless the model is already in stage 2; the encoder's parameters train (a pretrained
          network's classifier / pooling head, which its tokens skip, stays frozen).

        Build the optimizer after this call: the set of trainable parameters changes. Returns ``self``."""
        if stage not in _STAGES:
            raise ValueError(f"VQRAE.set_stage: stage must be 1 or 2, got {stage!r}")
        self.config = replace(self.config, stage=stage)
        self._apply_stage(stage)
        return self

    def save_pretrained(self, directory):
        """As :meth:`Tokenizer.save_pretrained`, with ``encoder_checkpoint`` blanked in ``config.json``: the
        encoder's weights are in ``model.safetensors``, so the checkpoint does not depend on the original file."""
        kept = self.config
        self.config = replace(kept, encoder_checkpoint="")
        try:
            return super().save_pretrained(directory)
        finally:
            self.config = kept

    def train(self, mode: bool = True) -> VQRAE:
        """As ``nn.Module.train``; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ---- the model ----------------------------------------------------------------------------------------------

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight (``decoder.head.weight``), over which VQGAN's adaptive GAN weight is taken
        (``fastvq.losses.adaptive_gan_weight``)."""
        return self.decoder.head.weight

    def _check_images(self, images: Tensor) -> None:
        cfg, p = self.config, self.config.patch_size
        ok = isinstance(images, Tensor) and images.dim() == 4 and images.shape[1] == cfg.in_channels
        if cfg.encoder == "vit":
            ok = ok and images.shape[2] % p == 0 and images.shape[3] % p == 0 and images.shape[2] > 0
            want = f"[B, {cfg.in_channels}, H, W] with H and W multiples of {p}"
        else:
            ok = ok and tuple(images.shape[2:]) == (cfg.image_size, cfg.image_size)
            want = f"[B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}] (the {cfg.encoder} encoder)"
        if not ok:
            raise ValueError(f"VQRAE: images must be {want}, got {list(getattr(images, 'shape', []))}")
        if not images.is_floating_point():
            raise ValueError(f"VQRAE: images must be a float tensor in [-1, 1], got {images.dtype}")

    def _token_grid(self, images: Tensor, num_tokens: int) -> tuple[int, int]:
        p = self.config.patch_size
        if self.config.encoder == "vit":
            return images.shape[2] // p, images.shape[3] // p
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or side * p != self.config.image_size:
            raise ValueError(f"VQRAE: the {self.config.encoder} encoder gave {num_tokens} tokens; the decoder needs a "
                             f"square grid of image_size / patch_size = {self.config.image_size // p} per side")
        return side, side

    def features(self, images: Tensor) -> Tensor:
        """The encoder's continuous tokens ``[B, N, width]``: the semantic features VQRAE gives an MLLM for
        understanding (before quantization)."""
        self._check_images(images)
        return self.encoder(images)

    def _quantize(self, images: Tensor):
        """``images → (encoder tokens [B, N, width], grid, QuantizeOutput, breakdown)``; the output's
        ``quantized [B, N, codebook_dim]`` and ``indices [B, N]``. In eval mode ``quantized`` is the codes of the
        indices, exactly what :meth:`decode_indices` decodes."""
        tokens = self.features(images)  # [B, N, width]
        grid = self._token_grid(images, tokens.shape[1])
        with fp32_island(images.device):
            out, parts = self.quantizer(self.quant_proj(tokens.float()), return_loss_breakdown=True)
            if not self.training:
                out = out._replace(quantized=self.quantizer.get_output_from_indices(out.indices))
        return tokens, grid, out, parts

    def _decode(self, quantized: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.decoder(quantized, grid)

    def encode(self, images: Tensor) -> TokenizerOutput:
        _, grid, out, _ = self._quantize(images)
        return TokenizerOutput(out.indices.view(images.shape[0], *grid), out.quantized, {})

    def decode_indices(self, indices: Tensor, extras: dict[str, Any] | None = None) -> Tensor:
        if not isinstance(indices, Tensor) or indices.dim() != 3 or indices.is_floating_point():
            got = (f"{indices.dtype} {list(indices.shape)}" if isinstance(indices, Tensor)
                   else type(indices).__name__)
            raise ValueError(f"VQRAE.decode_indices: indices must be integer [B, h, w], got {got}")
        b, h, w = indices.shape
        codes = self.quantizer.get_output_from_indices(indices.reshape(b, h * w))  # [B, N, codebook_dim]
        return self._decode(codes, (h, w))

    def forward(self, images: Tensor, texts: Sequence[str] | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        tokens, grid, out, parts = self._quantize(images)
        rec = self._decode(out.quantized, grid)
        total, terms = reconstruction_loss(rec, images, cfg.l1_weight, cfg.l2_weight)
        losses = dict(terms, vq=out.loss, **parts)
        total = total + cfg.vq_weight * out.loss
        if cfg.perceptual_weight > 0:
            losses["perceptual"] = self._frozen_net("perceptual", images.device)(rec, images)
            total = total + cfg.perceptual_weight * losses["perceptual"]
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(images)
            losses["distill"] = self_distillation_loss(tokens, target, cfg.distill_metric)
            total = total + cfg.distill_weight * losses["distill"]
        losses["loss"] = total
        losses["codebook_usage"] = self.quantizer.codebook_usage()
        return rec, losses


# ---- presets ---------------------------------------------------------------------------------------------------

# The published setting: a SigLIP2-so400m/16-sized ViT encoder (random weights: see the module docstring), its
# mirror as the decoder, 256 px -> 16 x 16 tokens, SimVQ 16,384 x 1,536.
register_preset("vqrae-paper", VQRAE, VQRAEConfig())
# The offline pretrained stand-in VFM: EfficientNet-Lite0's 7 x 7 x 1,280 head tokens at 224 px (patch 32),
# a ViT-B-sized decoder (EfficientNet has no ViT to mirror), SimVQ 16,384 x 1,536.
register_preset("vqrae-efficientnet-lite0", VQRAE, VQRAEConfig(
    image_size=224, encoder="efficientnet_lite0", patch_size=32, width=1280, decoder_width=768, decoder_depth=12,
    decoder_heads=12, decoder_mlp_dim=3072))
# For step-time benchmarks: 128 px -> 16 x 16 tokens, width 384, 6 + 6 blocks, SimVQ 4,096 x 768.
register_preset("vqrae-small", VQRAE, VQRAEConfig(
    image_size=128, patch_size=8, width=384, depth=6, num_heads=6, mlp_dim=1536, decoder_width=384,
    decoder_depth=6, decoder_heads=6, decoder_mlp_dim=1536, codebook_dim=768, codebook_size=4096))
# CPU-sized: 32 px -> 8 x 8 tokens, width 96, 3 + 3 blocks, SimVQ 1,024 x 128.
register_preset("vqrae-tiny", VQRAE, VQRAEConfig(
    image_size=32, patch_size=4, width=96, depth=3, num_heads=4, mlp_dim=384, decoder_width=96, decoder_depth=3,
    decoder_heads=4, decoder_mlp_dim=384, codebook_dim=128, codebook_size=1024))
