"""Lookup-free and binary quantization ops (MergeVQ LFQ, BSQ, UniWeTok): sign quantization with bit
packing, and the exact factorised entropy losses.

Each function is a documented call of a dispatcher op (``torch.ops.fastvq.*``), followed by the op's fake
kernel (its only shape logic) and its autograd formula. Semantics: docs/ops/lfq.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_ID_BITS = 62
MAX_ENTROPY_BITS = 24


def lfq_quantize(z: Tensor, group_bits: int = 0) -> tuple[Tensor, Tensor]:
    """Sign quantization with bit packing.

    Args:
        z: ``[..., D]`` float32/float16/bfloat16/float64, any strides.
        group_bits: 0 packs all D bits into one id (``D <= 62``); ``g > 0`` packs each run of g dims
            into its own id (``D % g == 0``, ``g <= 62``).

    Returns:
        ``codes``: z's shape and dtype, ``+1`` where ``z > 0`` else ``-1`` (zero and NaN give ``-1``);
        ``ids``: int64 ``[...]`` (``group_bits=0``) or ``[..., D / g]``, bit j of an id = ``[z_j > 0]`` for
        the j-th dim of its group (little-endian). Not differentiable (use a straight-through estimator).
    """
    return torch.ops.fastvq.lfq_quantize.default(z, group_bits)


def lfq_codes_from_ids(ids: Tensor, dim: int, group_bits: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Exact inverse of :func:`lfq_quantize`'s packing: int64 ids ``[...]`` (``group_bits=0``) or
    ``[..., dim / g]`` -> codes ``[..., dim]`` of ``+-1`` in ``dtype``. Ids outside ``[0, 2^g)`` raise on
    CPU and trip a device-side assert on CUDA."""
    return torch.ops.fastvq.lfq_codes_from_ids.default(ids, dim, group_bits, dtype)


def lfq_entropy(z: Tensor, temperature: float = 0.01, group_bits: int = 0,
                return_code_probs: bool = False) -> tuple[Tensor, ...]:
    """Exact entropy terms of LFQ's loss without the ``N x 2^D`` logit matrix.

    With ``p = sigmoid(4 z / temperature)`` (the per-bit marginals of the softmax over codes
    ``c in {-1,+1}^g`` of logits ``2 <z, c> / temperature``), per group of g bits (all D when
    ``group_bits=0``; ``g <= 24``):

    - ``sample_entropy`` = mean over rows of the sum of the group's per-bit binary entropies;
    - ``codebook_entropy`` = ``H(q)`` of the batch-averaged code distribution
      ``q[c] = mean_n prod_j p_nj(c_j)``, as ``-sum q log max(q, tiny)``.

    Both are averaged over groups. Computed in float64 for float64 ``z``, else float32; differentiable
    w.r.t. ``z`` (also through ``code_probs``). ``return_code_probs=True`` also returns ``q`` as
    ``[num_groups, 2^g]`` (code c's bit j is the j-th dim of the group).
    """
    sample, codebook, code_probs = torch.ops.fastvq.lfq_entropy.default(z, temperature, group_bits)
    return (sample, codebook, code_probs) if return_code_probs else (sample, codebook)


# ---- fake kernels -------------------------------------------------------------------------------------

def _group_width(op: str, D: int, group_bits: int, max_bits: int) -> int:
    torch._check(group_bits >= 0, lambda: f"{op}: group_bits must be >= 0, got {group_bits}")
    if group_bits == 0:
        torch._check(D <= max_bits, lambda: f"{op}: D={D} needs group_bits (one group of more than {max_bits} bits)")
        return D
    torch._check(group_bits <= max_bits, lambda: f"{op}: group_bits must be <= {max_bits}, got {group_bits}")
    torch._check(D % group_bits == 0, lambda: f"{op}: D={D} must be divisible by group_bits={group_bits}")
    return group_bits


def _check_z(op: str, z: Tensor) -> None:
    torch._check(z.dtype in _FLOATS, lambda: f"{op}: z must be float32, float16, bfloat16 or float64, got {z.dtype}")
    torch._check(z.dim() >= 1 and z.shape[-1] >= 1, lambda: f"{op}: z must be [..., D] with D >= 1, got {list(z.shape)}")


@torch.library.register_fake("fastvq::lfq_quantize")
def _lfq_quantize_fake(z: Tensor, group_bits: int = 0) -> tuple[Tensor, Tensor]:
    _check_z("lfq_quantize", z)
    D = z.shape[-1]
    g = _group_width("lfq_quantize", D, group_bits, MAX_ID_BITS)
    id_shape = z.shape[:-1] if group_bits == 0 else (*z.shape[:-1], D // g)
    return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(id_shape, dtype=torch.long)


@torch.library.register_fake("fastvq::lfq_codes_from_ids")
def _lfq_codes_from_ids_fake(ids: Tensor, dim: int, group_bits: int = 0, dtype=None) -> Tensor:
    torch._check(ids.dtype == torch.long, lambda: f"lfq_codes_from_ids: ids must be int64, got {ids.dtype}")
    g = _group_width("lfq_codes_from_ids", dim, group_bits, MAX_ID_BITS)
    lead = ids.shape if group_bits == 0 else ids.shape[:-1]
    if group_bits != 0:
        torch._check(ids.dim() >= 1 and ids.shape[-1] == dim // g,
                     lambda: f"lfq_codes_from_ids: ids must be [..., {dim // g}], got {list(ids.shape)}")
    return ids.new_empty((*lead, dim), dtype=dtype or torch.float32)


def _entropy_shape(z: Tensor, temperature: float, group_bits: int) -> tuple[int, int, torch.dtype]:
    _check_z("lfq_entropy", z)
    torch._check(temperature > 0, lambda: f"lfq_entropy: temperature must be > 0, got {temperature}")
    D = z.shape[-1]
    torch._check(z.numel() // D >= 1, lambda: f"lfq_entropy: z must have at least one row, got shape {list(z.shape)}")
    g = _group_width("lfq_entropy", D, group_bits, MAX_ENTROPY_BITS)
    return D // g, g, (torch.float64 if z.dtype == torch.float64 else torch.float32)


@torch.library.register_fake("fastvq::lfq_entropy")
def _lfq_entropy_fake(z: Tensor, temperature: float = 0.01, group_bits: int = 0):
    G, g, acc = _entropy_shape(z, temperature, group_bits)
    return z.new_empty((), dtype=acc), z.new_empty((), dtype=acc), z.new_empty((G, 2 ** g), dtype=acc)


@torch.library.register_fake("fastvq::lfq_entropy_backward")
def _lfq_entropy_backward_fake(grad_sample, grad_codebook, grad_code_probs, z, code_probs, temperature, group_bits):
    _entropy_shape(z, temperature, group_bits)
    return torch.empty_like(z, memory_format=torch.contiguous_format)


# ---- autograd -----------------------------------------------------------------------------------------

def _register_non_differentiable(op: str, num_inputs: int) -> None:
    """Outputs are marked non-differentiable (codes are a sign; use a straight-through estimator)."""

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))

    def backward(ctx, *grads):
        return (None,) * num_inputs

    torch.library.register_autograd(op, backward, setup_context=setup_context)


_register_non_differentiable("fastvq::lfq_quantize", 2)
_register_non_differentiable("fastvq::lfq_codes_from_ids", 4)


def _lfq_entropy_setup_context(ctx, inputs, output):
    z, temperature, group_bits = inputs
    ctx.save_for_backward(z, output[2])
    ctx.temperature, ctx.group_bits = temperature, group_bits


def _lfq_entropy_backward(ctx, grad_sample, grad_codebook, grad_code_probs):
    z, code_probs = ctx.saved_tensors
    grad_z = torch.ops.fastvq.lfq_entropy_backward.default(
        grad_sample, grad_codebook, grad_code_probs, z, code_probs, ctx.temperature, ctx.group_bits)
    return grad_z, None, None


torch.library.register_autograd(
    "fastvq::lfq_entropy", _lfq_entropy_backward, setup_context=_lfq_entropy_setup_context)
