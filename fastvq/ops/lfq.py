"""Lookup-free and binary quantization ops (MergeVQ LFQ, BSQ, UniWeTok): sign quantization with bit
packing, and the exact factorised entropy losses.

Each function is a documented call of a dispatcher op (``torch.ops.fastvq.*``), followed by the op's fake
kernel (its only shape logic) and its autograd formula. Semantics: docs/ops/lfq.md.

Bit order: every op takes ``bit_order="msb"`` (default; the first dimension of a group is the most significant
bit of its index, as vector-quantize-pytorch, BSQ-ViT, Open-MAGVIT2 and MergeVQ) or ``"lsb"``.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_INDEX_BITS = 62
MAX_ENTROPY_BITS = 24
BIT_ORDERS = ("msb", "lsb")


def lfq_quantize(z: Tensor, group_bits: int = 0, bit_order: str = "msb") -> tuple[Tensor, Tensor]:
    """Sign quantization with bit packing.

    Args:
        z: ``[..., D]`` float32/float16/bfloat16/float64, any strides.
        group_bits: 0 packs all D bits into one index (``D <= 62``); ``g > 0`` packs each run of g dims
            into its own index (``D % g == 0``, ``g <= 62``).
        bit_order: ``"msb"`` (default): dimension ``j`` of a g-bit group is bit ``g - 1 - j`` of its index
            (the first dimension is the most significant bit, as vector-quantize-pytorch, BSQ-ViT,
            Open-MAGVIT2 and MergeVQ pack them); ``"lsb"``: dimension ``j`` is bit ``j``.

    Returns:
        ``codes``: z's shape and dtype, ``+1`` where ``z > 0`` else ``-1`` (zero and NaN give ``-1``);
        ``indices``: int64 ``[...]`` (``group_bits=0``) or ``[..., D / g]``, bit ``[z_j > 0]`` for the j-th dim
        of each group at the position ``bit_order`` says. Not differentiable (use a straight-through estimator).
    """
    return torch.ops.fastvq.lfq_quantize.default(z, group_bits, bit_order)


def lfq_codes_from_indices(indices: Tensor, dim: int, group_bits: int = 0, dtype: torch.dtype = torch.float32,
                           bit_order: str = "msb") -> Tensor:
    """Exact inverse of :func:`lfq_quantize`'s packing: int64 indices ``[...]`` (``group_bits=0``) or
    ``[..., dim / g]`` -> codes ``[..., dim]`` of ``+-1`` in ``dtype``, in the same ``bit_order``. Indices
    outside ``[0, 2^g)`` raise on CPU and on CUDA (a device-side check first)."""
    return torch.ops.fastvq.lfq_codes_from_indices.default(indices, dim, group_bits, dtype, bit_order)


def lfq_entropy(z: Tensor, temperature: float = 0.01, group_bits: int = 0, return_code_probs: bool = False, *,
                weight: Tensor | None = None, bit_order: str = "msb") -> tuple[Tensor, ...]:
    """Exact entropy terms of LFQ's loss without the ``N x 2^D`` logit matrix.

    With ``p = sigmoid(4 z / temperature)`` (the per-bit marginals of the softmax over codes
    ``c in {-1,+1}^g`` of logits ``2 <z, c> / temperature``), per group of g bits (all D when
    ``group_bits=0``; ``g <= 24``) and row weights ``w_n`` (all 1 without ``weight``):

    - ``sample_entropy`` = ``sum_n w_n H_n / sum_n w_n``, ``H_n`` the sum of the group's per-bit binary
      entropies of row n;
    - ``codebook_entropy`` = ``H(q)`` of the weighted average code distribution
      ``q[c] = sum_n w_n prod_j p_nj(c_j) / sum_n w_n``, as ``-sum q log max(q, tiny)``.

    Both are averaged over groups. Computed in float64 for float64 ``z``, else float32; differentiable
    w.r.t. ``z`` (also through ``code_probs``), not w.r.t. ``weight``.

    Args:
        weight: ``z.shape[:-1]`` (one per row), bool (a mask) or float, non-negative. A row of weight 0
            contributes nothing (it may hold NaN) and gets a zero gradient; when every weight is 0 both
            entropies and ``code_probs`` are 0. No host synchronisation either way.
        bit_order: the layout of ``code_probs`` (``[num_groups, 2^g]``): entry ``c`` is the code whose index
            in ``bit_order`` is ``c`` (as :func:`lfq_quantize` numbers them).
    """
    sample, codebook, code_probs = torch.ops.fastvq.lfq_entropy.default(z, temperature, group_bits, weight,
                                                                        bit_order)
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


def _check_bit_order(op: str, bit_order: str) -> None:
    torch._check(bit_order in BIT_ORDERS, lambda: f'{op}: bit_order must be "msb" or "lsb", got "{bit_order}"')


def _check_z(op: str, z: Tensor) -> None:
    torch._check(z.dtype in _FLOATS, lambda: f"{op}: z must be float32, float16, bfloat16 or float64, got {z.dtype}")
    torch._check(z.dim() >= 1 and z.shape[-1] >= 1, lambda: f"{op}: z must be [..., D] with D >= 1, got {list(z.shape)}")


@torch.library.register_fake("fastvq::lfq_quantize")
def _lfq_quantize_fake(z: Tensor, group_bits: int = 0, bit_order: str = "msb") -> tuple[Tensor, Tensor]:
    _check_z("lfq_quantize", z)
    _check_bit_order("lfq_quantize", bit_order)
    D = z.shape[-1]
    g = _group_width("lfq_quantize", D, group_bits, MAX_INDEX_BITS)
    index_shape = z.shape[:-1] if group_bits == 0 else (*z.shape[:-1], D // g)
    return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(index_shape, dtype=torch.long)


@torch.library.register_fake("fastvq::lfq_codes_from_indices")
def _lfq_codes_from_indices_fake(indices: Tensor, dim: int, group_bits: int = 0, dtype=None,
                                 bit_order: str = "msb") -> Tensor:
    op = "lfq_codes_from_indices"
    torch._check(indices.dtype == torch.long, lambda: f"{op}: indices must be int64, got {indices.dtype}")
    _check_bit_order(op, bit_order)
    g = _group_width(op, dim, group_bits, MAX_INDEX_BITS)
    lead = indices.shape if group_bits == 0 else indices.shape[:-1]
    if group_bits != 0:
        torch._check(indices.dim() >= 1 and indices.shape[-1] == dim // g,
                     lambda: f"{op}: indices must be [..., {dim // g}], got {list(indices.shape)}")
    return indices.new_empty((*lead, dim), dtype=dtype or torch.float32)


def _entropy_shape(z: Tensor, temperature: float, group_bits: int, weight: Tensor | None,
                   bit_order: str) -> tuple[int, int, torch.dtype]:
    _check_z("lfq_entropy", z)
    _check_bit_order("lfq_entropy", bit_order)
    if weight is not None:
        torch._check(weight.dtype == torch.bool or weight.dtype in _FLOATS,
                     lambda: f"lfq_entropy: weight must be bool or float32/float16/bfloat16/float64, got {weight.dtype}")
        torch._check(weight.shape == z.shape[:-1], lambda: f"lfq_entropy: weight must have z's leading shape "
                     f"{list(z.shape[:-1])} (one weight per row), got {list(weight.shape)}")
    torch._check(temperature > 0, lambda: f"lfq_entropy: temperature must be > 0, got {temperature}")
    D = z.shape[-1]
    torch._check(z.numel() // D >= 1, lambda: f"lfq_entropy: z must have at least one row, got shape {list(z.shape)}")
    g = _group_width("lfq_entropy", D, group_bits, MAX_ENTROPY_BITS)
    return D // g, g, (torch.float64 if z.dtype == torch.float64 else torch.float32)


@torch.library.register_fake("fastvq::lfq_entropy")
def _lfq_entropy_fake(z: Tensor, temperature: float = 0.01, group_bits: int = 0, weight: Tensor | None = None,
                      bit_order: str = "msb"):
    G, g, acc = _entropy_shape(z, temperature, group_bits, weight, bit_order)
    return z.new_empty((), dtype=acc), z.new_empty((), dtype=acc), z.new_empty((G, 2 ** g), dtype=acc)


@torch.library.register_fake("fastvq::lfq_entropy_backward")
def _lfq_entropy_backward_fake(grad_sample, grad_codebook, grad_code_probs, z, code_probs, temperature, group_bits,
                               weight, bit_order):
    _entropy_shape(z, temperature, group_bits, weight, bit_order)
    return torch.empty_like(z, memory_format=torch.contiguous_format)


# ---- autograd -----------------------------------------------------------------------------------------

def _register_non_differentiable(op: str, num_inputs: int) -> None:
    """Outputs are marked non-differentiable (codes are a sign; use a straight-through estimator)."""

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))

    def backward(ctx, *grads):
        return (None,) * num_inputs

    torch.library.register_autograd(op, backward, setup_context=setup_context)


_register_non_differentiable("fastvq::lfq_quantize", 3)
_register_non_differentiable("fastvq::lfq_codes_from_indices", 5)


def _lfq_entropy_setup_context(ctx, inputs, output):
    z, temperature, group_bits, weight, bit_order = inputs
    ctx.save_for_backward(z, output[2], weight)
    ctx.temperature, ctx.group_bits, ctx.bit_order = temperature, group_bits, bit_order


def _lfq_entropy_backward(ctx, grad_sample, grad_codebook, grad_code_probs):
    z, code_probs, weight = ctx.saved_tensors
    grad_z = torch.ops.fastvq.lfq_entropy_backward.default(
        grad_sample, grad_codebook, grad_code_probs, z, code_probs, ctx.temperature, ctx.group_bits, weight,
        ctx.bit_order)
    return grad_z, None, None, None, None


torch.library.register_autograd(
    "fastvq::lfq_entropy", _lfq_entropy_backward, setup_context=_lfq_entropy_setup_context)
