"""Lookup-free (binary) quantization as an nn.Module, on fastvq's lfq ops: LFQ (MAGVIT-v2, Open-MAGVIT2,
MergeVQ), its spherical variant BSQ, and UniWeTok's SigLu-bounded 128-bit setting.

Every latent dimension is quantized to its sign; the code of a row (or of each group of ``g`` bits) is the
integer whose bit ``j`` is ``[z_j > 0]``. The codebook is implicit (``2^g`` entries per group) and has no
parameters; training signals are a commitment loss and the LFQ entropy loss, whose whole-codebook terms
:func:`fastvq.ops.lfq_entropy` evaluates exactly without materialising ``N x 2^g`` (docs/ops/lfq.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.ops.lfq import lfq_codes_from_ids, lfq_entropy, lfq_quantize

MAX_ID_BITS = 62  # an id must fit an int64
MAX_ENTROPY_BITS = 24  # the exact codebook entropy enumerates 2^g codes per group
MAX_COUNTED_BITS = 18  # usage counts are kept for groups of at most 2^18 codes
_BOUNDS = (None, "siglu")


class LFQ(nn.Module):
    """Lookup-free quantization: ``z [..., dim]`` -> signs, ids, and the LFQ training loss.

    ``forward(z)`` returns ``(quantized, ids, loss)`` like ``vector_quantize_pytorch``:

    1. ``bound="siglu"``: ``z <- 2 sigmoid(z) - 1`` (UniWeTok's SigLu, bounds ``z`` to ``(-1, 1)``);
    2. ``spherical=True``: ``z <- z / ||z||`` over the last dim (BSQ);
    3. ``codes, ids = lfq_quantize(sg(z), group_bits)``; ``q = codes`` (``codes / sqrt(dim)`` when
       spherical, so ``q`` lies on the unit sphere too);
    4. ``loss = commitment_weight * mse(z, sg(q)) + entropy_weight * (H_sample - H_codebook)``, the
       entropies of ``lfq_entropy(z_e, temperature, group_bits)`` with ``z_e = z`` (``z / sqrt(dim)`` when
       spherical: the entropy's logits ``2 <z_e, c> / temperature`` then use the scaled codes
       ``c / sqrt(dim)``, as BSQ). Minimising it makes each row's code distribution confident (low
       ``H_sample``) and the batch's use of the codebook uniform (high ``H_codebook``). Skipped when
       ``entropy_weight == 0``;
    5. ``quantized = z + sg(q - z)`` (straight-through estimator).

    The loss is computed in eval mode too. Shapes and dtypes: ``quantized`` is ``[..., dim]`` in ``z``'s
    dtype; ``ids`` int64 ``[...]`` (``group_bits == 0``) or ``[..., dim / group_bits]``; ``loss`` a 0-dim
    tensor (float32, or float64 for float64 ``z``, when the entropy term is on).

    Args:
        dim: bits per row (latent channels).
        group_bits: ``0``: one id of all ``dim <= 62`` bits per row; ``g``: ``dim / g`` ids of ``g`` bits.
            The entropy terms are per group (averaged over groups), so they need ``g <= 24`` (``dim <= 24``
            for one group) whenever ``entropy_weight != 0``.
        temperature: of the softmax over codes in the entropy loss (Open-MAGVIT2: 0.01).
        entropy_weight: weight of ``H_sample - H_codebook``.
        commitment_weight: weight of ``mse(z, sg(q))``.
        spherical: BSQ: project to the unit sphere, codes ``+-1 / sqrt(dim)``.
        bound: ``None`` or ``"siglu"``.

    Statistics (updated by training-mode forwards only): ``usage_counts`` int64 ``[G, 2^g]`` (kept when
    ``g <= 18``; ``None`` otherwise) for :meth:`codebook_usage`, ``last_code_probs [G, 2^g]`` (the batch's
    average code distribution from the entropy op; ``None`` until computed) and :attr:`last_perplexity`.
    """

    usage_counts: Tensor | None

    def __init__(self, dim: int, group_bits: int = 0, temperature: float = 0.01, entropy_weight: float = 0.1,
                 commitment_weight: float = 0.25, spherical: bool = False, bound: str | None = None):
        super().__init__()
        if dim < 1:
            raise ValueError(f"LFQ: dim must be positive, got {dim}")
        if group_bits == 0:
            if dim > MAX_ID_BITS:
                raise ValueError(f"LFQ: dim={dim} needs group_bits (an id of more than {MAX_ID_BITS} bits "
                                 "does not fit an int64)")
        elif not 1 <= group_bits <= MAX_ID_BITS:
            raise ValueError(f"LFQ: group_bits must be 0 or in [1, {MAX_ID_BITS}], got {group_bits}")
        elif dim % group_bits != 0:
            raise ValueError(f"LFQ: dim={dim} must be divisible by group_bits={group_bits}")
        bits = group_bits or dim
        if entropy_weight != 0 and bits > MAX_ENTROPY_BITS:
            raise ValueError(f"LFQ: the entropy loss enumerates each group's 2^g codes and needs g <= "
                             f"{MAX_ENTROPY_BITS}, got g={bits}; pass group_bits <= {MAX_ENTROPY_BITS} "
                             "or entropy_weight=0")
        if not temperature > 0:
            raise ValueError(f"LFQ: temperature must be positive, got {temperature}")
        if bound not in _BOUNDS:
            raise ValueError(f'LFQ: bound must be None or "siglu", got {bound!r}')
        self.dim = dim
        self.group_bits = group_bits
        self.bits_per_group = bits
        self.num_groups = dim // bits
        self.temperature = temperature
        self.entropy_weight = entropy_weight
        self.commitment_weight = commitment_weight
        self.spherical = spherical
        self.bound = bound
        self.code_scale = 1.0 / math.sqrt(dim) if spherical else 1.0
        counts = (torch.zeros(self.num_groups, 1 << bits, dtype=torch.long) if bits <= MAX_COUNTED_BITS
                  else None)
        self.register_buffer("usage_counts", counts, persistent=False)
        self.last_code_probs: Tensor | None = None

    # ---- presets --------------------------------------------------------------------------------------

    @classmethod
    def mergevq(cls, **overrides) -> LFQ:
        """MergeVQ's quantizer (Li et al., CVPR 2025), the Open-MAGVIT2 LFQ: an 18-bit latent quantized
        as one 18-bit id (an implicit codebook of 2^18 = 262,144 codes), softmax temperature 0.01 (inverse
        temperature 100), entropy weight 0.1, commitment weight 0.25. The exact whole-codebook entropy is
        the op's ``g = 18`` case. Keyword arguments override any setting."""
        return cls(**{"dim": 18, "group_bits": 0, "temperature": 0.01, "entropy_weight": 0.1,
                      "commitment_weight": 0.25, **overrides})

    @classmethod
    def bsq(cls, dim: int = 18, **overrides) -> LFQ:
        """BSQ-ViT's binary spherical quantizer (Zhao, Xiong & Krähenbühl, 2024) at its bottleneck widths
        ``L = 18`` or ``36``: the latent is L2-normalised and quantized to ``sign(u) / sqrt(L)``.
        ``dim=18``: one 18-bit id per row, exact entropy over all 2^18 codes; ``dim=36``: two 18-bit ids
        per row (``group_bits=18``), the entropy terms exact per group of 2^18 codes and averaged over the
        two groups (a 2^36 codebook has no tractable exact entropy; BSQ also factorises it over groups).
        Loss weights are the LFQ defaults; pass BSQ's own through ``overrides``."""
        if dim not in (18, 36):
            raise ValueError(f"LFQ.bsq: dim must be 18 or 36 (BSQ-ViT's bottlenecks), got {dim}")
        return cls(**{"dim": dim, "group_bits": 0 if dim == 18 else 18, "spherical": True, **overrides})

    @classmethod
    def uniwetok(cls, group_bits: int = 8, **overrides) -> LFQ:
        """UniWeTok's binary quantizer (Zhuang et al., 2026): a 128-bit latent (an implicit 2^128
        codebook) bounded by SigLu, ``2 sigmoid(z) - 1``, before quantization. A 128-bit id does not fit
        an int64, so ids and entropy terms are per group of ``group_bits`` (8: 16 ids of 256 codes; 16: 8
        ids of 65,536 codes) and the entropies are averaged over the groups. Keyword arguments override
        any setting."""
        if group_bits not in (8, 16):
            raise ValueError(f"LFQ.uniwetok: group_bits must be 8 or 16, got {group_bits}")
        return cls(**{"dim": 128, "group_bits": group_bits, "bound": "siglu", **overrides})

    # ---- forward --------------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, group_bits={self.group_bits}, temperature={self.temperature}, "
                f"entropy_weight={self.entropy_weight}, commitment_weight={self.commitment_weight}, "
                f"spherical={self.spherical}, bound={self.bound!r}")

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``z [..., dim]`` float -> ``(quantized [..., dim] like z, ids int64 [...] or [..., G], loss 0-dim)``."""
        if z.dim() == 0 or z.shape[-1] != self.dim:
            raise ValueError(f"LFQ: z must be [..., {self.dim}], got shape {list(z.shape)}")
        if self.bound == "siglu":
            z = 2.0 * torch.sigmoid(z) - 1.0
        if self.spherical:
            z = F.normalize(z, dim=-1)
        codes, ids = lfq_quantize(z.detach(), self.group_bits)
        q = codes * self.code_scale if self.spherical else codes  # no graph: codes come from sg(z)
        loss = self.commitment_weight * F.mse_loss(z, q)
        code_probs = None
        if self.entropy_weight != 0:
            z_e = z * self.code_scale if self.spherical else z
            sample_h, codebook_h, code_probs = lfq_entropy(z_e, self.temperature, self.group_bits,
                                                           return_code_probs=True)
            loss = loss + self.entropy_weight * (sample_h - codebook_h)
        if self.training:
            self._update_stats(ids, code_probs)
        quantized = z + (q - z).detach()  # straight-through
        return quantized, ids, loss

    @torch.no_grad()
    def ids_to_codes(self, ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """int64 ids (``[...]`` or ``[..., G]``, as :meth:`forward` returns them) -> the quantized vectors
        ``[..., dim]`` of ``dtype`` (``+-1``, or ``+-1 / sqrt(dim)`` when spherical)."""
        codes = lfq_codes_from_ids(ids, self.dim, self.group_bits, dtype)
        return codes * self.code_scale if self.spherical else codes

    # ---- statistics -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _update_stats(self, ids: Tensor, code_probs: Tensor | None) -> None:
        if self.usage_counts is not None:
            G, K = self.usage_counts.shape
            flat = (ids.reshape(-1, G) + torch.arange(G, device=ids.device) * K).reshape(-1)
            # index_add_ rather than bincount: a static output shape keeps torch.compile graphs whole
            self.usage_counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
        if code_probs is not None:
            self.last_code_probs = code_probs.detach()

    @torch.no_grad()
    def codebook_usage(self) -> Tensor:
        """Fraction of each group's ``2^g`` codes picked at least once since the last reset: float32 ``[G]``.
        Raises ``RuntimeError`` when the groups are too large to count (``g > 18``)."""
        if self.usage_counts is None:
            raise RuntimeError(f"LFQ: usage is counted for groups of at most {MAX_COUNTED_BITS} bits, "
                               f"this quantizer has {self.bits_per_group}")
        return (self.usage_counts > 0).float().mean(-1)

    @property
    def last_perplexity(self) -> Tensor | None:
        """``exp(H)`` of each group's average code distribution on the last training batch, ``[G]``: the
        effective number of codes in use (at most ``2^g``). ``None`` before the first entropy computation."""
        if self.last_code_probs is None:
            return None
        q = self.last_code_probs
        return torch.exp(-(q * q.clamp_min(torch.finfo(q.dtype).tiny).log()).sum(-1))

    @torch.no_grad()
    def reset_usage(self) -> None:
        """Clear ``usage_counts`` and ``last_code_probs``."""
        if self.usage_counts is not None:
            self.usage_counts.zero_()
        self.last_code_probs = None
