"""SimVQ (Zhu et al. 2024, arXiv:2411.02038), VQRAE's quantizer: a frozen random codebook read through a
learned linear map, on fastvq's mcq ops."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fastvq.nn._quantizer import (QuantizeOutput, all_reduce_sum_, check_mask, fp32_island, masked_mse,
                                  rotation_trick, straight_through, to_channel_last)
from fastvq.ops.mcq import mcq_gather, mcq_search


def _identity(t: Tensor) -> Tensor:
    return t


def _fill_missing_usage(module: SimVQ, state_dict: dict, prefix: str, *args) -> None:
    # a vector-quantize-pytorch SimVQ checkpoint has no usage counts: they start at zero
    state_dict.setdefault(prefix + "usage_counts", torch.zeros_like(module.usage_counts))


class SimVQ(nn.Module):
    """Vector quantization against an implicit codebook ``C = code_transform(frozen_codebook)``: the codes
    themselves are a frozen Gaussian ``[codebook_size, frozen_codebook_dim]`` (``randn * frozen_dim**-0.5``),
    and only the map (by default ``nn.Linear(frozen_codebook_dim, dim, bias=False)``) learns, so every
    code moves with every update and the codebook does not collapse (SimVQ reports ~100% usage).

    Keywords, defaults and formulas are vector-quantize-pytorch's ``SimVQ`` (1.32.0), so code written for it
    runs unchanged, and its state dicts load (``frozen_codebook``, ``code_transform.*``; a missing
    ``usage_counts`` loads as zeros).

    ``forward(x, mask=None, return_loss_breakdown=False)``, ``x [..., dim]`` (or ``[B, dim, *spatial]`` with
    ``channel_first=True``), any float dtype:

    * search: ``indices = argmin_k ||x - C_k||^2`` (fastvq's ``mcq_search``, exact fp32; ``dim >= 32``
      runs its GEMM path without materialising the ``N x K`` distances); int64 ``[...]``
      (``[B, *spatial]``).
    * ``q = C[indices]`` through ``mcq_gather``, so the loss's gradient reaches ``code_transform``;
    * ``loss = commitment_weight * (mse(sg(x), q) + input_to_quantize_commit_loss_weight * mse(x, sg(q)))``:
      the first term trains the map, the second commits the encoder; breakdown keys ``"quantize_to_input"``
      and ``"input_to_quantize"`` (unweighted). ``0`` in eval mode unless ``aux_loss_in_eval=True``;
    * ``quantized``: the rotation trick (``rotation_trick=True``, the default) or the straight-through
      estimator carries the gradient from ``q``'s value to ``x`` (neither sends gradient to ``q``).

    ``mask`` (bool, ``x``'s token shape): ``False`` positions get index ``-1``, a zero output and no
    gradient, and take no part in the loss or the usage counts.

    fp32 island: under bf16/fp16 autocast the transform, search and loss run in fp32, so the codes chosen
    are those of an fp32 forward; ``quantized`` is cast back to ``x``'s dtype.

    Statistics: training-mode forwards add each kept row's code to ``usage_counts`` (int64 ``[K]``, a
    persistent buffer, all-reduced over ``torch.distributed`` ranks, no host synchronisation);
    :meth:`codebook_usage` reads the fraction of codes used since the last :meth:`reset_usage`.
    """

    usage_counts: Tensor
    frozen_codebook: Tensor

    def __init__(self, dim: int, codebook_size: int, codebook_transform: nn.Module | None = None,
                 init_fn: Callable[[Tensor], Tensor] = _identity, channel_first: bool = False,
                 rotation_trick: bool = True, input_to_quantize_commit_loss_weight: float = 0.25,
                 commitment_weight: float = 1.0, frozen_codebook_dim: int | None = None,
                 aux_loss_in_eval: bool = False):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"SimVQ: dim must be positive, got {dim}")
        if codebook_size <= 0:
            raise ValueError(f"SimVQ: codebook_size must be positive, got {codebook_size}")
        frozen_codebook_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        if frozen_codebook_dim <= 0:
            raise ValueError(f"SimVQ: frozen_codebook_dim must be positive, got {frozen_codebook_dim}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.frozen_codebook_dim = frozen_codebook_dim
        self.channel_first = channel_first
        self.rotation_trick = rotation_trick
        self.input_to_quantize_commit_loss_weight = input_to_quantize_commit_loss_weight
        self.commitment_weight = commitment_weight
        self.aux_loss_in_eval = aux_loss_in_eval

        codebook = init_fn(torch.randn(codebook_size, frozen_codebook_dim) * frozen_codebook_dim ** -0.5)
        self.register_buffer("frozen_codebook", codebook)  # [K, frozen_codebook_dim], not trained
        self.code_transform = (nn.Linear(frozen_codebook_dim, dim, bias=False)
                               if codebook_transform is None else codebook_transform)
        self.register_buffer("usage_counts", torch.zeros(codebook_size, dtype=torch.long))
        self.register_load_state_dict_pre_hook(_fill_missing_usage)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, "
                f"frozen_codebook_dim={self.frozen_codebook_dim}, rotation_trick={self.rotation_trick}, "
                f"commitment_weight={self.commitment_weight}, "
                f"input_to_quantize_commit_loss_weight={self.input_to_quantize_commit_loss_weight}")

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook ``code_transform(frozen_codebook)``: ``[K, dim]``, differentiable."""
        return self.code_transform(self.frozen_codebook)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_loss_breakdown: bool = False):
        x_dtype = x.dtype
        x, to_input_layout = to_channel_last(x, self.channel_first, "SimVQ")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            where = "dim 1" if self.channel_first else "the last dim"
            raise ValueError(f"SimVQ: x must have dim = {self.dim} channels in {where}, got shape "
                             f"{list(to_input_layout(x).shape)}")
        token_shape = x.shape[:-1]
        mask = check_mask(mask, token_shape, x.device, "SimVQ")
        need_loss = self.training or self.aux_loss_in_eval

        with fp32_island(x.device):
            x = x.float()
            codebook = self.codebook.float()  # [K, dim]
            rows = x.reshape(-1, 1, self.dim)  # [N, 1, dim]: one group
            indices, _ = mcq_search(rows.detach(), codebook.detach()[None])  # [N, 1]
            if mask is not None:
                indices = indices.masked_fill(~mask.reshape(-1, 1), -1)
            q = mcq_gather(indices, codebook[None]).reshape(x.shape)  # -1 -> zeros
            indices = indices.reshape(token_shape)

            breakdown = {}
            if need_loss or return_loss_breakdown:
                breakdown = {"quantize_to_input": masked_mse(x.detach(), q, mask),
                             "input_to_quantize": masked_mse(x, q.detach(), mask)}
            if need_loss:
                loss = self.commitment_weight * (breakdown["quantize_to_input"]
                                                 + self.input_to_quantize_commit_loss_weight
                                                 * breakdown["input_to_quantize"])
            else:
                loss = x.new_zeros(())
            quantized = rotation_trick(x, q) if self.rotation_trick else straight_through(x, q)
            if mask is not None:
                quantized = torch.where(mask[..., None], quantized, quantized.new_zeros(()))

        if self.training:
            self._count_usage(indices)
        out = QuantizeOutput(to_input_layout(quantized.to(x_dtype)), indices, loss)
        return (out, breakdown) if return_loss_breakdown else out

    # ---- codes from indices ---------------------------------------------------------------------------------

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """int ``[...]`` indices in ``[0, K)`` or ``-1`` -> codes ``[..., dim]`` (``-1`` -> zeros),
        differentiable w.r.t. ``code_transform``. Only the requested codes are transformed."""
        self._check_indices(indices)
        indices = indices.long()
        codes = self.code_transform(self.frozen_codebook[indices.clamp_min(0)])
        return codes.masked_fill((indices == -1)[..., None], 0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What ``forward`` outputs for these indices: ``[..., dim]``, or ``[B, dim, *spatial]`` for
        ``[B, *spatial]`` indices with ``channel_first=True``; ``-1`` -> zeros."""
        codes = self.get_codes_from_indices(indices)
        if self.channel_first:
            codes = codes.permute(0, codes.dim() - 1, *range(1, codes.dim() - 1))
        return codes

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """vector-quantize-pytorch's name for :meth:`get_output_from_indices` on its ``SimVQ``, kept so its
        users' code runs unchanged."""
        return self.get_output_from_indices(indices)

    def _check_indices(self, indices: Tensor) -> None:
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"SimVQ: indices must be an int64 or int32 tensor, got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if self.channel_first and indices.dim() < 2:
            raise ValueError(f"SimVQ: indices must be [B, *spatial] with channel_first=True, got shape "
                             f"{list(indices.shape)}")
        if indices.numel():
            lo, hi = (int(v) for v in torch.aminmax(indices))
            if lo < -1 or hi >= self.codebook_size:
                bad = lo if lo < -1 else hi
                raise IndexError(f"SimVQ: indices must be in [0, codebook_size) = [0, {self.codebook_size}) "
                                 f"or -1 (masked), got {bad}")

    # ---- statistics -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _count_usage(self, indices: Tensor) -> None:
        flat = indices.reshape(-1)
        counts = torch.zeros_like(self.usage_counts)
        counts.index_add_(0, flat.clamp_min(0), (flat >= 0).long())  # masked rows (-1) add 0
        self.usage_counts += all_reduce_sum_(counts)

    @torch.no_grad()
    def codebook_usage(self) -> Tensor:
        """Fraction of the ``codebook_size`` codes picked at least once by a kept row since the last
        :meth:`reset_usage` (over all ranks): a float scalar tensor in ``[0, 1]``."""
        return (self.usage_counts > 0).float().mean()

    @torch.no_grad()
    def reset_usage(self) -> None:
        self.usage_counts.zero_()
