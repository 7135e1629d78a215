"""Pure-PyTorch references of the lfq ops (lookup-free / binary quantization): the test oracles and the
benchmark baseline.

- :func:`lfq_quantize_ref` / :func:`lfq_codes_from_ids_ref`: signs <-> integer ids, bit ``j`` of an id
  being dimension ``j`` of its group (little-endian).
- :func:`lfq_entropy_ref`: the entropy terms exactly as public LFQ implementations (vector-quantize-pytorch,
  Open-MAGVIT2, MergeVQ) compute them: a softmax over all ``2^g`` codes of a group, materialising an
  ``[N, 2^g]`` matrix. This is the definition and the baseline the kernels are compared against.
- :func:`lfq_entropy_factorized_ref`: the same quantities through the per-bit factorisation (per-bit
  Bernoulli entropies and a half-split matrix product for the code distribution), ``O(N 2^(g/2) + 2^g)``
  memory: a cross-check of the definition and a fast oracle for large ``g``.
- :func:`lfq_loss_ref`: :class:`fastvq.nn.LFQ`'s forward, from the functions above.

The semantics are documented in docs/ops/lfq.md.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_ID_BITS = 62  # an id of up to 62 bits fits a (non-negative) int64 with room to spare
MAX_ENTROPY_BITS = 24  # exact whole-codebook entropy: 2^24 codes per group at most

EntropyResult = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]


def _group_width(op: str, dim: int, group_bits: int) -> int:
    """Bits per group ``g`` (``dim`` itself when ``group_bits == 0``), after checking the combination."""
    if group_bits == 0:
        if not 1 <= dim <= MAX_ID_BITS:
            raise ValueError(f"{op}: the last dim D={dim} must be in [1, {MAX_ID_BITS}] without group_bits "
                             "(an id must fit an int64)")
        return dim
    if not 1 <= group_bits <= MAX_ID_BITS:
        raise ValueError(f"{op}: group_bits must be 0 or in [1, {MAX_ID_BITS}], got {group_bits}")
    if dim % group_bits != 0:
        raise ValueError(f"{op}: D={dim} must be divisible by group_bits={group_bits}")
    return group_bits


def _check_float(op: str, z: Tensor) -> None:
    if z.dtype not in _FLOATS:
        raise ValueError(f"{op}: z must be float32, float16, bfloat16 or float64, got {z.dtype}")


def _compute_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _bit_weights(g: int, device: torch.device) -> Tensor:
    """``[g]`` int64: ``2^j`` for ``j < g``."""
    return torch.ones(g, dtype=torch.long, device=device) << torch.arange(g, device=device)


def lfq_quantize_ref(z: Tensor, group_bits: int = 0) -> tuple[Tensor, Tensor]:
    """Reference of :func:`fastvq.ops.lfq_quantize`.

    Args:
        z: ``[..., D]`` float32 / float16 / bfloat16 / float64.
        group_bits: ``0``: one id of all ``D <= 62`` bits; ``g``: ``D / g`` ids of ``g`` bits each.

    Returns:
        ``(codes, ids)``: ``codes`` like ``z`` with ``+1`` where ``z > 0`` and ``-1`` elsewhere (zero and
        NaN included); ``ids`` int64 ``[...]`` (``group_bits == 0``) or ``[..., D / g]``, where
        ``ids[..., i] = sum_j 2^j [z[..., i*g + j] > 0]``.
    """
    _check_float("lfq_quantize_ref", z)
    D = z.shape[-1] if z.dim() > 0 else 0
    g = _group_width("lfq_quantize_ref", D, group_bits)
    bits = z > 0  # NaN > 0 is False
    codes = torch.where(bits, 1.0, -1.0).to(z.dtype)
    grouped = bits.reshape(*z.shape[:-1], D // g, g).long()
    ids = (grouped * _bit_weights(g, z.device)).sum(-1)
    return codes, (ids.squeeze(-1) if group_bits == 0 else ids)


def lfq_codes_from_ids_ref(ids: Tensor, dim: int, group_bits: int = 0,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference of :func:`fastvq.ops.lfq_codes_from_ids`, the inverse of :func:`lfq_quantize_ref`'s ids.

    Args:
        ids: int64 ``[...]`` (``group_bits == 0``) or ``[..., dim / g]``, each in ``[0, 2^g)``.
        dim: ``D``, the number of bits (code dimensions) per row.
        group_bits: as in :func:`lfq_quantize_ref`.
        dtype: the floating dtype of the codes.

    Returns:
        ``[..., dim]`` of ``dtype``: ``+1`` where the bit is set, ``-1`` elsewhere.
    """
    op = "lfq_codes_from_ids_ref"
    if ids.dtype != torch.int64:
        raise ValueError(f"{op}: ids must be int64, got {ids.dtype}")
    if dtype not in _FLOATS:
        raise ValueError(f"{op}: dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    g = _group_width(op, dim, group_bits)
    G = dim // g
    grouped = ids.unsqueeze(-1) if group_bits == 0 else ids
    if group_bits != 0 and (ids.dim() == 0 or ids.shape[-1] != G):
        raise ValueError(f"{op}: ids must be [..., {G}] (dim / group_bits), got shape {list(ids.shape)}")
    if grouped.numel() and bool(((grouped < 0) | (grouped >= (1 << g))).any()):
        raise ValueError(f"{op}: ids must be in [0, 2^{g}) (no bits above the group width)")
    bits = (grouped.unsqueeze(-1) >> torch.arange(g, device=ids.device)) & 1  # [..., G, g]
    codes = torch.where(bits.bool(), 1.0, -1.0).to(dtype)
    return codes.reshape(*grouped.shape[:-1], dim)


def _entropy_groups(op: str, z: Tensor, temperature: float, group_bits: int) -> tuple[Tensor, int]:
    """Checks shared by the entropy references; returns the rows ``[N, D]`` in the compute dtype and ``g``."""
    _check_float(op, z)
    if z.dim() == 0:
        raise ValueError(f"{op}: z must be [..., D], got a 0-dim tensor")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be positive, got {temperature}")
    D = z.shape[-1]
    g = _group_width(op, D, group_bits)
    if g > MAX_ENTROPY_BITS:
        raise ValueError(f"{op}: an exact whole-codebook entropy needs group bits <= {MAX_ENTROPY_BITS}, got {g}")
    x = z.reshape(-1, D).to(_compute_dtype(z))
    if x.shape[0] == 0:
        raise ValueError(f"{op}: z must have at least one row")
    return x, g


def _xlogx_entropy(q: Tensor) -> Tensor:
    """``-sum_c q_c log(max(q_c, tiny))`` over the last dim: a probability that underflowed to 0 adds 0."""
    return -(q * q.clamp_min(torch.finfo(q.dtype).tiny).log()).sum(-1)


def all_codes(g: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Every code of a ``g``-bit group as ``+-1`` vectors: ``[2^g, g]``, row ``c`` having ``+1`` in column
    ``j`` iff bit ``j`` of ``c`` is set."""
    c = torch.arange(1 << g, device=device)
    bits = (c[:, None] >> torch.arange(g, device=device)) & 1
    return torch.where(bits.bool(), 1.0, -1.0).to(dtype)


def lfq_entropy_ref(z: Tensor, temperature: float = 0.01, group_bits: int = 0,
                    return_code_probs: bool = False) -> EntropyResult:
    """Reference of :func:`fastvq.ops.lfq_entropy` by its definition: a softmax over every code.

    For each group of ``g`` bits (all ``D`` when ``group_bits == 0``), with the ``2^g`` codes
    ``C in {-1, +1}^(2^g x g)`` and rows ``x [N, g]`` (all leading dims of ``z`` flattened):

        probs            = softmax(2 x C^T / temperature)           # [N, 2^g]
        sample entropy   = mean_n -sum_c probs log probs
        code_probs       = mean_n probs                             # [2^g]
        codebook entropy = -sum_c code_probs log max(code_probs, tiny)

    and both entropies are averaged over the groups. This materialises ``[N, 2^g]`` per group, exactly like
    vector-quantize-pytorch / Open-MAGVIT2 (which use ``eps = 1e-5`` where this uses
    ``tiny = torch.finfo(dtype).tiny``). Differentiable.

    Args:
        z: ``[..., D]`` float32 / float16 / bfloat16 / float64 with at least one row.
        temperature: softmax temperature (> 0).
        group_bits: ``0`` (one group, ``D <= 24``) or ``g <= 24`` dividing ``D``.
        return_code_probs: also return ``code_probs [D / g, 2^g]``.

    Returns:
        ``(sample_entropy, codebook_entropy[, code_probs])``: 0-dim tensors (and the ``[G, 2^g]`` code
        distribution), float64 for float64 ``z``, else float32. Natural log.
    """
    x, g = _entropy_groups("lfq_entropy_ref", z, temperature, group_bits)
    codes = all_codes(g, x.dtype, x.device)  # [2^g, g]
    tiny = torch.finfo(x.dtype).tiny
    sample, codebook, code_probs = [], [], []
    for xg in x.split(g, dim=-1):  # [N, g] per group
        probs = torch.softmax(2.0 * (xg @ codes.T) / temperature, dim=-1)  # [N, 2^g]
        sample.append(-(probs * probs.clamp_min(tiny).log()).sum(-1).mean())
        avg = probs.mean(0)  # [2^g]
        codebook.append(_xlogx_entropy(avg))
        code_probs.append(avg)
    sample_h, codebook_h = torch.stack(sample).mean(), torch.stack(codebook).mean()
    if return_code_probs:
        return sample_h, codebook_h, torch.stack(code_probs)
    return sample_h, codebook_h


def _bit_products(p: Tensor, q: Tensor) -> Tensor:
    """``P [N, 2^k]`` with ``P[n, a] = prod_j (p[n, j] if bit j of a else q[n, j])`` for ``p, q [N, k]``
    (``q = 1 - p``, computed accurately by the caller). Built one bit at a time: appending bit ``j`` as the
    new top bit doubles the table, low half ``bit j = 0``, high half ``bit j = 1``."""
    P = p.new_ones(p.shape[0], 1)
    for j in range(p.shape[1]):
        P = torch.cat([P * q[:, j:j + 1], P * p[:, j:j + 1]], dim=1)
    return P


def lfq_entropy_factorized_ref(z: Tensor, temperature: float = 0.01, group_bits: int = 0,
                               return_code_probs: bool = False) -> EntropyResult:
    """:func:`lfq_entropy_ref`'s quantities through the bit factorisation; same arguments and results.

    The softmax over ``c in {-1, +1}^g`` of ``2 <x, c> / T`` is a product of independent Bernoullis with
    ``p_j = sigmoid(4 x_j / T)`` (``P(c_j = +1)``), so per group

        sample entropy = mean_n sum_j h(p[n, j]),   h(p) = -p log p - (1 - p) log(1 - p)
        code_probs     = (1/N) P_A^T P_B  (as a 2^|A| x 2^|B| matrix; A = the low bits, B = the high bits)

    where ``P_A[n, a]`` is the probability of row ``n`` taking the bit pattern ``a`` on ``A``. Memory is
    ``O(N 2^(g/2) + 2^g)`` instead of ``N x 2^g``. ``h`` uses ``log p = logsigmoid(a)``,
    ``log(1 - p) = logsigmoid(-a)`` with ``a = 4 x / T`` (exact even where ``p`` rounds to 0 or 1).
    """
    x, g = _entropy_groups("lfq_entropy_factorized_ref", z, temperature, group_bits)
    N = x.shape[0]
    a = 4.0 * x / temperature  # [N, D] Bernoulli logits
    p, q = torch.sigmoid(a), torch.sigmoid(-a)  # P(bit = 1), P(bit = 0)
    h = -(p * F.logsigmoid(a) + q * F.logsigmoid(-a))  # [N, D]
    G = x.shape[1] // g
    sample_h = h.sum(0).view(G, g).sum(-1) / N  # [G]
    low = g // 2
    code_probs = []
    for pg, qg in zip(p.split(g, dim=-1), q.split(g, dim=-1)):
        PA = _bit_products(pg[:, :low], qg[:, :low])  # [N, 2^low]
        PB = _bit_products(pg[:, low:], qg[:, low:])  # [N, 2^(g-low)]
        # code c = a + 2^low * b, so the row-major [2^(g-low), 2^low] matrix P_B^T P_A lists codes in order
        code_probs.append((PB.T @ PA).reshape(-1) / N)
    cp = torch.stack(code_probs)  # [G, 2^g]
    codebook_h = _xlogx_entropy(cp)  # [G]
    if return_code_probs:
        return sample_h.mean(), codebook_h.mean(), cp
    return sample_h.mean(), codebook_h.mean()


def siglu(z: Tensor) -> Tensor:
    """UniWeTok's bounding of the encoder output into ``(-1, 1)``: ``2 sigmoid(z) - 1``."""
    return 2.0 * torch.sigmoid(z) - 1.0


def lfq_loss_ref(
    z: Tensor,
    group_bits: int = 0,
    temperature: float = 0.01,
    entropy_weight: float = 0.1,
    commitment_weight: float = 0.25,
    spherical: bool = False,
    bound: str | None = None,
    entropy_fn: Callable[..., EntropyResult] = lfq_entropy_ref,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :class:`fastvq.nn.LFQ`'s forward. ``z [..., D]`` -> ``(quantized [..., D],
    ids int64 [...] or [..., D / g], loss 0-dim)``.

    ``bound == "siglu"``: ``z <- 2 sigmoid(z) - 1``; ``spherical`` (BSQ): ``z <- z / ||z||``, codes and the
    entropy's input scaled by ``1 / sqrt(D)``. Then ``loss = commitment_weight * mse(z, sg(q)) +
    entropy_weight * (sample_entropy - codebook_entropy)`` and ``quantized = z + sg(q - z)``.
    ``entropy_fn`` is :func:`lfq_entropy_ref` (the definition) or :func:`lfq_entropy_factorized_ref`.
    """
    if bound == "siglu":
        z = siglu(z)
    elif bound is not None:
        raise ValueError(f'lfq_loss_ref: bound must be None or "siglu", got {bound!r}')
    scale = 1.0
    if spherical:
        z = F.normalize(z, dim=-1)
        scale = 1.0 / math.sqrt(z.shape[-1])
    codes, ids = lfq_quantize_ref(z.detach(), group_bits)
    q = codes * scale if spherical else codes
    loss = commitment_weight * F.mse_loss(z, q.detach())
    if entropy_weight != 0:
        sample_h, codebook_h = entropy_fn(z * scale if spherical else z, temperature, group_bits)
        loss = loss + entropy_weight * (sample_h - codebook_h)
    quantized = z + (q - z).detach()
    return quantized, ids, loss
