"""Lookup-free (binary) quantization as an nn.Module on fastvq's lfq ops, with vector-quantize-pytorch's
``LFQ`` keywords and defaults: LFQ (MAGVIT-v2, Open-MAGVIT2, MergeVQ), its spherical variant BSQ, and
UniWeTok's SigLu-bounded 128-bit setting as presets.

Every latent dimension is quantized to its sign; the index of a codebook's ``d`` bits is the integer whose bit
``d - 1 - j`` is ``[x_j > 0]`` (``bit_order="msb"``, vector-quantize-pytorch's order). The codebook is implicit
(``2^d`` entries per codebook) and has no parameters; training signals are the LFQ entropy loss, whose
whole-codebook terms :func:`fastvq.ops.lfq_entropy` evaluates exactly without materialising ``N x 2^d``, and a
commitment loss. docs/nn/lfq.md has the keyword mapping, the presets and the DDP semantics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.nn._quantizer import (QuantizeOutput, all_reduce_mean, all_reduce_sum_, check_mask, fp32_island,
                                  masked_mse, straight_through, to_channel_last, world_size)
from fastvq.ops.lfq import BIT_ORDERS, lfq_codes_from_indices, lfq_entropy, lfq_quantize

MAX_CODEBOOK_BITS = 62  # an index must fit an int64
MAX_ENTROPY_BITS = 24  # the exact codebook entropy enumerates 2^d codes per codebook
MAX_COUNTED_BITS = 18  # usage counts are kept for codebooks of at most 2^18 codes
_BOUNDS = (None, "siglu")


class LFQ(nn.Module):
    """Lookup-free quantization, vector-quantize-pytorch's ``LFQ`` on fastvq's kernels.

    ``forward(x)`` with ``x [..., dim]`` (or channel-first ``[B, dim, *spatial]``) returns
    ``QuantizeOutput(quantized, indices, loss)``:

    1. ``x <- project_in(x)`` when ``dim != num_codebooks * d`` (``d = log2(codebook_size)``);
    2. ``soft_clamp_input_value`` v: ``x <- v tanh(x / v)``; ``bound="siglu"`` (UniWeTok):
       ``x <- 2 sigmoid(x) - 1``;
    3. split into ``[..., num_codebooks, d]``; ``spherical`` (BSQ): ``x <- codebook_scale * x / ||x||`` per
       codebook. Codes are ``+-m`` with ``m = codebook_scale`` (``codebook_scale / sqrt(d)`` when spherical);
    4. ``q = m sign(x)`` (``-m`` at 0 and NaN), ``indices`` int64 ``[..., num_codebooks]`` (the last dim
       dropped unless ``keep_num_codebooks_dim``);
    5. in training (or with ``aux_loss_in_eval``), over the unmasked positions:
       ``per_sample_entropy`` and ``codebook_entropy`` of the softmax over each codebook's ``2^d`` codes of
       logits ``2 <x, c> inv_temperature`` (exact, averaged over codebooks; the codebook entropy uses the code
       distribution averaged over every rank under torch.distributed), ``commitment = mse(x, sg(q))``;
       ``loss = entropy_loss_weight * (per_sample_entropy - diversity_gamma * codebook_entropy)
       + commitment_loss_weight * commitment`` (the entropy term through ``softplus(. + entropy_loss_offset)``
       with ``experimental_softplus_entropy_loss``). A term of weight 0 is not computed (0 in the breakdown,
       as vector-quantize-pytorch). In eval the loss is 0;
    6. ``quantized = straight_through_activation(x) + sg(q - .)`` in training, ``q`` in eval; masked
       positions get 0 and index -1; then ``project_out`` and back to channel-first.

    The quantization and the losses run in fp32 under autocast (float64 stays float64); ``quantized`` has
    the dtype ``project_in``'s output had. ``loss`` is 0-dim float32 (float64 for float64 input).

    Args (vector-quantize-pytorch's names and defaults unless marked):
        dim: input channels; default ``num_codebooks * log2(codebook_size)``.
        codebook_size: ``2^d`` codes per codebook; default ``2^dim``.
        entropy_loss_weight, commitment_loss_weight, diversity_gamma: the loss weights above (0.1, 0., 1.).
        straight_through_activation: applied to ``x`` before the straight-through estimator.
        num_codebooks: independent codebooks of ``d`` bits each (fastvq's former ``group_bits``).
        keep_num_codebooks_dim: indices keep their codebook dim; default ``num_codebooks > 1``.
        codebook_scale: the code magnitude (before the sphere's ``1 / sqrt(d)``).
        has_projections, projection_has_bias: the ``project_in`` / ``project_out`` linears.
        soft_clamp_input_value: tanh soft clamp of the input to ``(-v, v)``; must be ``>= codebook_scale``.
        channel_first: ``[B, dim, *spatial]`` input; ``None`` (default): when ``x.dim() >= 4``.
        experimental_softplus_entropy_loss, entropy_loss_offset: see step 5.
        spherical: BSQ (binary spherical quantization), per codebook as vector-quantize-pytorch.
        bit_order (fastvq): ``"msb"`` (vector-quantize-pytorch, BSQ-ViT) or ``"lsb"`` (Open-MAGVIT2, MergeVQ:
            their ``2 ** arange(d)`` mask).
        inv_temperature (fastvq; vector-quantize-pytorch has it as a forward argument, default 100 there too):
            the entropy's inverse temperature; ``forward(..., inv_temperature=...)`` overrides it.
        bound (fastvq): ``None`` or ``"siglu"`` (UniWeTok).
        aux_loss_in_eval (fastvq): compute the loss in eval mode too.

    Not supported (a clear error): ``frac_per_sample_entropy < 1`` (a memory saving for the ``N x 2^d``
    softmax, which fastvq never materialises), ``cosine_sim_project_in``, ``orthogonal_rotation`` and
    ``force_quantization_f32=False`` (fastvq always quantizes in fp32).

    Statistics (training-mode forwards, all-reduced under torch.distributed, no host synchronisation):
    ``usage_counts`` int64 ``[num_codebooks, 2^d]`` (a persistent buffer, ``d <= 18``; ``None`` otherwise) for
    :meth:`codebook_usage`; ``last_code_probs [num_codebooks, 2^d]`` (the last batch's average code
    distribution, in ``bit_order``) and :attr:`last_perplexity`.
    """

    usage_counts: Tensor | None

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        channel_first: bool | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
        bit_order: str = "msb",
        inv_temperature: float = 100.0,
        bound: str | None = None,
        aux_loss_in_eval: bool = False,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ: either dim or codebook_size must be given")
        if num_codebooks < 1:
            raise ValueError(f"LFQ: num_codebooks must be >= 1, got {num_codebooks}")
        if codebook_size is None:
            if dim < 1 or dim % num_codebooks:
                raise ValueError(f"LFQ: dim={dim} must be a positive multiple of num_codebooks={num_codebooks} "
                                 "when codebook_size is not given")
            codebook_size = 2 ** (dim // num_codebooks)
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"LFQ: codebook_size must be a power of 2 (>= 2), got {codebook_size}")
        d = codebook_size.bit_length() - 1
        if d > MAX_CODEBOOK_BITS:
            raise ValueError(f"LFQ: codebook_size=2^{d} does not fit an int64 index; use num_codebooks codebooks "
                             f"of at most 2^{MAX_CODEBOOK_BITS} codes")
        if entropy_loss_weight != 0 and d > MAX_ENTROPY_BITS:
            raise ValueError(f"LFQ: the entropy loss enumerates each codebook's 2^d codes and needs d <= "
                             f"{MAX_ENTROPY_BITS}, got codebook_size=2^{d}; use more num_codebooks or "
                             "entropy_loss_weight=0")
        codebook_dims = d * num_codebooks
        dim = codebook_dims if dim is None else dim
        if dim < 1:
            raise ValueError(f"LFQ: dim must be positive, got {dim}")
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("LFQ: keep_num_codebooks_dim=False needs num_codebooks == 1")
        if bit_order not in BIT_ORDERS:
            raise ValueError(f'LFQ: bit_order must be "msb" or "lsb", got {bit_order!r}')
        if bound not in _BOUNDS:
            raise ValueError(f'LFQ: bound must be None or "siglu", got {bound!r}')
        if not inv_temperature > 0:
            raise ValueError(f"LFQ: inv_temperature must be positive, got {inv_temperature}")
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(f"LFQ: soft_clamp_input_value={soft_clamp_input_value} must be >= codebook_scale="
                             f"{codebook_scale}")
        if frac_per_sample_entropy != 1.0:
            raise ValueError("LFQ: frac_per_sample_entropy < 1 is not supported: it subsamples rows to save the "
                             "N x 2^d softmax's memory, which fastvq's exact entropy never allocates")
        if cosine_sim_project_in or orthogonal_rotation or not force_quantization_f32:
            raise ValueError("LFQ: cosine_sim_project_in, orthogonal_rotation and force_quantization_f32=False "
                             "are not supported (docs/nn/lfq.md)")
        self.dim, self.codebook_size, self.codebook_dim, self.num_codebooks = dim, codebook_size, d, num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.activation = straight_through_activation if straight_through_activation is not None else nn.Identity()
        self.codebook_scale = codebook_scale
        self.soft_clamp_input_value = soft_clamp_input_value
        self.channel_first = channel_first
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self.spherical = spherical
        self.bit_order = bit_order
        self.inv_temperature = inv_temperature
        self.bound = bound
        self.aux_loss_in_eval = aux_loss_in_eval
        self.code_scale = codebook_scale / math.sqrt(d) if spherical else codebook_scale
        has_projections = dim != codebook_dims if has_projections is None else has_projections
        self.has_projections = has_projections
        self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias) if has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias) if has_projections else nn.Identity()
        counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.long) if d <= MAX_COUNTED_BITS else None
        self.register_buffer("usage_counts", counts)
        self.last_code_probs: Tensor | None = None

    # ---- presets --------------------------------------------------------------------------------------

    @classmethod
    def mergevq(cls, **overrides) -> LFQ:
        """MergeVQ's quantizer (Li et al., CVPR 2025), the Open-MAGVIT2 LFQ: an 18-bit latent quantized
        as one 18-bit index (an implicit codebook of 2^18 = 262,144 codes), inverse temperature 100, entropy
        weight 0.1, commitment weight 0.25. Indices are packed least-significant-bit first
        (``bit_order="lsb"``), as Open-MAGVIT2's ``2 ** arange(codebook_dim)`` mask (docs/ops/lfq.md), so they
        match that code's tokens. The exact whole-codebook entropy is the op's ``d = 18`` case. Keyword
        arguments override any setting."""
        return cls(**{"codebook_size": 2 ** 18, "inv_temperature": 100.0, "entropy_loss_weight": 0.1,
                      "commitment_loss_weight": 0.25, "bit_order": "lsb", **overrides})

    @classmethod
    def bsq(cls, dim: int = 18, **overrides) -> LFQ:
        """BSQ-ViT's binary spherical quantizer (Zhao, Xiong & Krähenbühl, 2024) at its bottleneck widths
        ``L = 18`` or ``36``: the latent is L2-normalised and quantized to ``sign(u) / sqrt(L)``.
        ``dim=18``: one 18-bit index per row, exact entropy over all 2^18 codes; ``dim=36``: two codebooks
        of 2^18 codes (two indices per row), each normalised on its own sphere (vector-quantize-pytorch's
        ``num_codebooks`` semantics; BSQ-ViT normalises all 36 dims together and factorises its entropy
        over groups of 9 bits). Indices are most-significant-bit first, as BSQ-ViT's ``basis``. Loss weights
        are the LFQ defaults plus a 0.25 commitment weight."""
        if dim not in (18, 36):
            raise ValueError(f"LFQ.bsq: dim must be 18 or 36 (BSQ-ViT's bottlenecks), got {dim}")
        return cls(**{"codebook_size": 2 ** 18, "num_codebooks": dim // 18, "spherical": True,
                      "commitment_loss_weight": 0.25, **overrides})

    @classmethod
    def uniwetok(cls, codebook_size: int = 256, **overrides) -> LFQ:
        """UniWeTok's binary quantizer (Zhuang et al., 2026): a 128-bit latent (an implicit 2^128 codebook)
        bounded by SigLu, ``2 sigmoid(z) - 1``, before quantization. A 128-bit index does not fit an
        int64, so the latent is split into codebooks of ``codebook_size`` codes (256: 16 indices of 8 bits;
        65,536: 8 indices of 16 bits) whose entropies are averaged (UniWeTok's group-wise entropy).
        Keyword arguments override any setting."""
        if codebook_size not in (256, 65536):
            raise ValueError(f"LFQ.uniwetok: codebook_size must be 256 or 65536, got {codebook_size}")
        bits = codebook_size.bit_length() - 1
        return cls(**{"dim": 128, "codebook_size": codebook_size, "num_codebooks": 128 // bits, "bound": "siglu",
                      "commitment_loss_weight": 0.25, **overrides})

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
                f"entropy_loss_weight={self.entropy_loss_weight}, commitment_loss_weight="
                f"{self.commitment_loss_weight}, diversity_gamma={self.diversity_gamma}, "
                f"inv_temperature={self.inv_temperature}, spherical={self.spherical}, bound={self.bound!r}, "
                f"bit_order={self.bit_order!r}")

    # ---- forward --------------------------------------------------------------------------------------

    def forward(self, x: Tensor, inv_temperature: float | None = None, return_loss_breakdown: bool = False,
                mask: Tensor | None = None, aux_loss_in_eval: bool | None = None):
        """``x [..., dim]`` (or channel-first) -> ``QuantizeOutput(quantized like x, indices int64, loss 0-dim)``,
        and the unweighted ``{"per_sample_entropy", "codebook_entropy", "commitment"}`` with
        ``return_loss_breakdown=True``. ``mask``: bool, ``x``'s token shape (``[B, *spatial]`` for
        channel-first input); ``False`` positions get index -1, zero output, and take no part in any loss or
        statistic."""
        channel_first = x.dim() >= 4 if self.channel_first is None else self.channel_first
        x, to_input_layout = to_channel_last(x, channel_first, "LFQ")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"LFQ: x must have {self.dim} channels (the last dim, or dim 1 when channel-first), "
                             f"got shape {list(x.shape)}")
        mask = check_mask(mask, x.shape[:-1], x.device, "LFQ")
        if mask is not None:  # masked tokens' values (even NaN) reach no output, loss or gradient
            x = torch.where(mask[..., None], x, 0.0)
        inv_temperature = self.inv_temperature if inv_temperature is None else inv_temperature
        if not inv_temperature > 0:
            raise ValueError(f"LFQ: inv_temperature must be positive, got {inv_temperature}")
        with_loss = self.training or (self.aux_loss_in_eval if aux_loss_in_eval is None else aux_loss_in_eval)
        x = self.project_in(x)
        out_dtype = x.dtype
        C, d, m = self.num_codebooks, self.codebook_dim, self.code_scale
        with fp32_island(x.device):
            x = x if x.dtype == torch.float64 else x.float()
            if self.soft_clamp_input_value is not None:
                v = self.soft_clamp_input_value
                x = (x / v).tanh() * v
            if self.bound == "siglu":
                x = 2.0 * torch.sigmoid(x) - 1.0
            x = x.unflatten(-1, (C, d))  # [..., C, d]
            if self.spherical:
                x = F.normalize(x, dim=-1) * self.codebook_scale
            codes, indices = lfq_quantize(x.detach().flatten(-2), d, self.bit_order)  # [..., C*d], [..., C]
            q = (codes * m).unflatten(-1, (C, d))
            zero = x.new_zeros(())
            per_sample = codebook_h = commitment = zero
            code_probs = None
            if with_loss and self.entropy_loss_weight != 0:
                per_sample, codebook_h, code_probs = self._entropy(x, mask, 1.0 / inv_temperature)
            if with_loss and self.commitment_loss_weight != 0:
                commitment = masked_mse(x, q.detach(), mask)
            if self.training:
                y = straight_through(self.activation(x), q)
                self._update_stats(indices, mask, code_probs)
            else:
                y = q
            if mask is not None:
                indices = torch.where(mask[..., None], indices, -1)
            entropy_aux = per_sample - self.diversity_gamma * codebook_h
            if with_loss and self.experimental_softplus_entropy_loss:
                entropy_aux = F.softplus(entropy_aux + self.entropy_loss_offset)
            loss = entropy_aux * self.entropy_loss_weight + commitment * self.commitment_loss_weight
            y = y.flatten(-2).to(out_dtype)
        y = self.project_out(y)
        if mask is not None:
            y = torch.where(mask[..., None], y, 0.0)  # after project_out: its bias does not reach masked positions
        y = to_input_layout(y)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        out = QuantizeOutput(y, indices, loss)
        if not return_loss_breakdown:
            return out
        return out, {"per_sample_entropy": per_sample, "codebook_entropy": codebook_h, "commitment": commitment}

    def _entropy(self, x: Tensor, mask: Tensor | None, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample and codebook entropies of ``x [..., C, d]`` over the unmasked rows, and the code
        distribution ``[C, 2^d]``; under torch.distributed the codebook entropy is that of the distribution
        over every rank's rows (differentiably all-reduced, weighted by each rank's number of rows)."""
        z_e = (x * self.code_scale).flatten(-2)  # logits 2 <x, c> / T with codes c = +-m
        per_sample, codebook_h, code_probs = lfq_entropy(z_e, temperature, self.codebook_dim, True, weight=mask,
                                                         bit_order=self.bit_order)
        if world_size() > 1:
            rows = z_e.new_tensor(z_e[..., 0].numel()) if mask is None else mask.sum().to(z_e.dtype)
            total = all_reduce_sum_(rows.clone())
            code_probs = all_reduce_mean(code_probs * rows) * world_size() / total.clamp_min(1)
            tiny = torch.finfo(code_probs.dtype).tiny
            codebook_h = -(code_probs * code_probs.clamp_min(tiny).log()).sum(-1).mean()
        return per_sample, codebook_h, code_probs

    # ---- indices -> codes ---------------------------------------------------------------------------------

    @torch.no_grad()
    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """int64 indices ``[..., num_codebooks]`` (``[...]`` without ``keep_num_codebooks_dim``), as
        :meth:`forward` returns them -> codes ``[..., num_codebooks * d]`` float32 in the codebook space
        (``+-m``, before ``project_out``, channel-last); ``-1`` gives zeros."""
        if indices.dtype != torch.long:
            raise TypeError(f"LFQ: indices must be int64, got {indices.dtype}")
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        if indices.dim() == 0 or indices.shape[-1] != self.num_codebooks:
            raise ValueError(f"LFQ: indices must be [..., {self.num_codebooks}] (num_codebooks), got shape "
                             f"{list(indices.shape)}")
        valid = indices >= 0
        codes = lfq_codes_from_indices(torch.where(valid, indices, 0), self.num_codebooks * self.codebook_dim,
                                       self.codebook_dim, torch.float32, self.bit_order)
        codes = torch.where(valid[..., None], codes.unflatten(-1, (self.num_codebooks, -1)) * self.code_scale, 0.0)
        return codes.flatten(-2)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What :meth:`forward` outputs for ``indices``: the codes through ``project_out``, channel-first when
        the module is (``channel_first=None``: when the indices have the ``[B, *spatial]`` shape of a 4-d or
        larger input, as vector-quantize-pytorch). A position whose indices are all ``-1`` gives zeros."""
        return self.indices_to_codes(indices)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """vector-quantize-pytorch's spelling: codes of ``indices``, through ``project_out`` when asked,
        channel-first as :meth:`get_output_from_indices`."""
        codes = self.get_codes_from_indices(indices)
        if project_out and self.has_projections:
            kept = (indices >= 0) if not self.keep_num_codebooks_dim else (indices >= 0).any(-1)
            codes = torch.where(kept[..., None], self.project_out(codes), 0.0)
        channel_first = self.channel_first
        if channel_first is None:
            channel_first = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        if channel_first:
            codes = codes.permute(0, codes.dim() - 1, *range(1, codes.dim() - 1))
        return codes

    # ---- statistics -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _update_stats(self, indices: Tensor, mask: Tensor | None, code_probs: Tensor | None) -> None:
        if self.usage_counts is not None:
            C, K = self.usage_counts.shape
            flat = (indices.reshape(-1, C) + torch.arange(C, device=indices.device) * K).reshape(-1)
            ones = torch.ones_like(flat) if mask is None else mask.reshape(-1, 1).expand(-1, C).reshape(-1).long()
            counts = torch.zeros_like(self.usage_counts)
            # index_add_ rather than bincount: a static output shape, no host synchronisation
            counts.view(-1).index_add_(0, flat, ones)
            self.usage_counts += all_reduce_sum_(counts)
        if code_probs is not None:
            self.last_code_probs = code_probs.detach()

    @torch.no_grad()
    def codebook_usage(self) -> Tensor:
        """Fraction of each codebook's ``2^d`` codes picked at least once since the last reset: float32
        ``[num_codebooks]``. Raises ``RuntimeError`` when the codebooks are too large to count (``d > 18``)."""
        if self.usage_counts is None:
            raise RuntimeError(f"LFQ: usage is counted for codebooks of at most 2^{MAX_COUNTED_BITS} codes, "
                               f"this quantizer has 2^{self.codebook_dim}")
        return (self.usage_counts > 0).float().mean(-1)

    @property
    def last_perplexity(self) -> Tensor | None:
        """``exp(H)`` of each codebook's average code distribution on the last training batch,
        ``[num_codebooks]``: the effective number of codes in use (at most ``2^d``). ``None`` before the first
        entropy computation."""
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
