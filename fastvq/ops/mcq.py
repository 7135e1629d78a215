"""Multi-codebook quantization ops (UniTok MCQ): nearest-code search and code gather.

Each function here is a thin, documented call of a dispatcher op (``torch.ops.fastvq.*``), followed by
the op's fake (meta) kernel -- the single place of its shape logic -- and its autograd formula.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastvq.ops.segment import segment_sum

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def mcq_search(z: Tensor, codebooks: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Nearest code of each group's own codebook, without materialising distances.

    Args:
        z: ``[..., G, d]`` float32 / float16 / bfloat16 / float64, any strides.
        codebooks: ``[G, K, d]``, same dtype and device as ``z``.
        metric: ``"l2"``: ``indices[..., g] = argmin_k ||z[..., g, :] - codebooks[g, k]||^2`` and
            ``scores`` is that squared distance; ``"cosine"``: both sides L2-normalised (eps 1e-6, as
            ``F.normalize``), ``indices`` the argmax cosine and ``scores`` that cosine.

    Returns:
        ``(indices, scores)``: int64 ``[..., G]`` and float32 ``[..., G]``. Arithmetic is fp32; ties go
        to the smallest k. Codes with a NaN/inf entry are never chosen; a row with a NaN/inf entry (or a
        group without a finite code) gets index 0 and score NaN. Not differentiable (use
        :func:`mcq_gather` for a differentiable lookup).
    """
    return torch.ops.fastvq.mcq_search.default(z, codebooks, metric)


def mcq_gather(indices: Tensor, codebooks: Tensor) -> Tensor:
    """``codebooks[g, indices[..., g]]`` for every group: ``[..., G]`` int64/int32 indices and
    ``[G, K, d]`` codebooks -> ``[..., G, d]`` in the codebooks' dtype.

    An index of ``-1`` (a masked position, as the quantizer modules return it) gives a row of zeros and
    takes no part in the gradient. Any other index outside ``[0, K)`` raises ``IndexError`` naming it, on
    CPU and on CUDA alike (CUDA checks the range on the host before launching: one small device->host copy).

    Differentiable w.r.t. ``codebooks``: the backward sums the gradients of every row that picked a code
    with :func:`fastvq.ops.segment_sum` (which skips ``-1``): deterministic on CPU and CUDA, fp32
    accumulation."""
    return torch.ops.fastvq.mcq_gather.default(indices, codebooks)


# ---- fake kernels (shape logic for torch.compile / meta tensors) --------------------------------------

@torch.library.register_fake("fastvq::mcq_search")
def _mcq_search_fake(z: Tensor, codebooks: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    torch._check(metric in ("l2", "cosine"), lambda: f'mcq_search: metric must be "l2" or "cosine", got "{metric}"')
    torch._check(z.dim() >= 2, lambda: f"mcq_search: z must be [..., G, d] (at least 2 dims), got shape {list(z.shape)}")
    torch._check(codebooks.dim() == 3, lambda: f"mcq_search: codebooks must be [G, K, d], got shape {list(codebooks.shape)}")
    torch._check(z.dtype in _FLOATS, lambda: f"mcq_search: z must be float32, float16, bfloat16 or float64, got {z.dtype}")
    torch._check(codebooks.dtype == z.dtype, lambda: f"mcq_search: codebooks must have z's dtype {z.dtype}, got {codebooks.dtype}")
    torch._check(codebooks.device == z.device, lambda: f"mcq_search: codebooks must be on z's device {z.device}, got {codebooks.device}")
    torch._check(z.shape[-2] == codebooks.shape[0] and z.shape[-1] == codebooks.shape[2],
                 lambda: f"mcq_search: z must be [..., G, d] matching codebooks [G, K, d] = {list(codebooks.shape)}, "
                         f"got z shape {list(z.shape)}")
    torch._check(codebooks.shape[1] >= 1, lambda: "mcq_search: codebooks must hold at least one code (K >= 1)")
    out_shape = z.shape[:-1]
    return z.new_empty(out_shape, dtype=torch.long), z.new_empty(out_shape, dtype=torch.float32)


@torch.library.register_fake("fastvq::mcq_gather")
def _mcq_gather_fake(indices: Tensor, codebooks: Tensor) -> Tensor:
    torch._check(codebooks.dim() == 3, lambda: f"mcq_gather: codebooks must be [G, K, d], got shape {list(codebooks.shape)}")
    torch._check(indices.dtype in (torch.int64, torch.int32), lambda: f"mcq_gather: indices must be int64 or int32, got {indices.dtype}")
    torch._check(indices.device == codebooks.device, lambda: f"mcq_gather: indices must be on codebooks' device {codebooks.device}, got {indices.device}")
    torch._check(indices.dim() >= 1 and indices.shape[-1] == codebooks.shape[0],
                 lambda: f"mcq_gather: indices must be [..., G] with G == {codebooks.shape[0]}, got shape {list(indices.shape)}")
    return codebooks.new_empty((*indices.shape, codebooks.shape[2]))


# ---- autograd -----------------------------------------------------------------------------------------

def _mcq_search_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _mcq_search_backward(ctx, grad_indices, grad_scores):
    return None, None, None


torch.library.register_autograd(
    "fastvq::mcq_search", _mcq_search_backward, setup_context=_mcq_search_setup_context)


def _mcq_gather_setup_context(ctx, inputs, output):
    indices, codebooks = inputs
    ctx.save_for_backward(indices)
    ctx.codebooks_shape = codebooks.shape


def _mcq_gather_backward(ctx, grad: Tensor):
    (indices,) = ctx.saved_tensors
    G, K, d = ctx.codebooks_shape
    # grad_codebooks[g, k] = sum of grad[n, g] over the rows n with indices[n, g] == k: a deterministic
    # segment_sum on every backend (fp32 accumulation for 16-bit codebooks, rounded once at the end)
    N = math.prod(indices.shape[:-1])
    sums, _ = segment_sum(grad.reshape(N, G, d), indices.reshape(N, G), K)
    return None, sums.to(grad.dtype)


torch.library.register_autograd(
    "fastvq::mcq_gather", _mcq_gather_backward, setup_context=_mcq_gather_setup_context)
