"""Pure-PyTorch references of the lfq ops (lookup-free / binary quantization): the test oracles and the
benchmark baseline.

- :func:`lfq_quantize_ref` / :func:`lfq_codes_from_indices_ref`: signs <-> integer indices. ``bit_order="msb"``
  (the default): dimension ``j`` of a g-bit group is bit ``g - 1 - j`` of its index (vector-quantize-pytorch,
  BSQ-ViT, Open-MAGVIT2, MergeVQ); ``"lsb"``: dimension ``j`` is bit ``j``.
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
MAX_INDEX_BITS = 62  # an index of up to 62 bits fits a (non-negative) int64 with room to spare
MAX_ENTROPY_BITS = 24  # exact whole-codebook entropy: 2^24 codes per group at most
BIT_ORDERS = ("msb", "lsb")

EntropyResult = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]


def _group_width(op: str, dim: int, group_bits: int) -> int:
    """Bits per group ``g`` (``dim`` itself when ``group_bits == 0``), after checking the combination."""
    if group_bits == 0:
        if not 1 <= dim <= MAX_INDEX_BITS:
            raise ValueError(f"{op}: the last dim D={dim} must be in [1, {MAX_INDEX_BITS}] without group_bits "
                             "(an index must fit an int64)")
        return dim
    if not 1 <= group_bits <= MAX_INDEX_BITS:
        raise ValueError(f"{op}: group_bits must be 0 or in [1, {MAX_INDEX_BITS}], got {group_bits}")
    if dim % group_bits != 0:
        raise ValueError(f"{op}: D={dim} must be divisible by group_bits={group_bits}")
    return group_bits


def _check_float(op: str, z: Tensor) -> None:
    if z.dtype not in _FLOATS:
        raise ValueError(f"{op}: z must be float32, float16, bfloat16 or float64, got {z.dtype}")


def _compute_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _check_bit_order(op: str, bit_order: str) -> None:
    if bit_order not in BIT_ORDERS:
        raise ValueError(f'{op}: bit_order must be "msb" or "lsb", got {bit_order!r}')


def bit_positions(g: int, bit_order: str = "msb", device: torch.device | str | None = None) -> Tensor:
    """``[g]`` int64: the bit of a g-bit index that dimension ``j`` of its group sets (``g - 1 - j`` for
    ``"msb"``, ``j`` for ``"lsb"``)."""
    j = torch.arange(g, device=device)
    return g - 1 - j if bit_order == "msb" else j


def lfq_quantize_ref(z: Tensor, group_bits: int = 0, bit_order: str = "msb") -> tuple[Tensor, Tensor]:
    """Reference of :func:`fastvq.ops.lfq_quantize`.

    Args:
        z: ``[..., D]`` float32 / float16 / bfloat16 / float64.
        group_bits: ``0``: one index of all ``D <= 62`` bits; ``g``: ``D / g`` indices of ``g`` bits each.
        bit_order: ``"msb"`` or ``"lsb"`` (:func:`bit_positions`).

    Returns:
        ``(codes, indices)``: ``codes`` like ``z`` with ``+1`` where ``z > 0`` and ``-1`` elsewhere (zero and
        NaN included); ``indices`` int64 ``[...]`` (``group_bits == 0``) or ``[..., D / g]``, where
        ``indices[..., i] = sum_j 2^pos(j) [z[..., i*g + j] > 0]``.
    """
    _check_float("lfq_quantize_ref", z)
    _check_bit_order("lfq_quantize_ref", bit_order)
    D = z.shape[-1] if z.dim() > 0 else 0
    g = _group_width("lfq_quantize_ref", D, group_bits)
    bits = z > 0  # NaN > 0 is False
    codes = torch.where(bits, 1.0, -1.0).to(z.dtype)
    grouped = bits.reshape(*z.shape[:-1], D // g, g).long()
    indices = (grouped << bit_positions(g, bit_order, z.device)).sum(-1)
    return codes, (indices.squeeze(-1) if group_bits == 0 else indices)


def lfq_codes_from_indices_ref(indices: Tensor, dim: int, group_bits: int = 0,
                               dtype: torch.dtype = torch.float32, bit_order: str = "msb") -> Tensor:
    """Reference of :func:`fastvq.ops.lfq_codes_from_indices`, the inverse of :func:`lfq_quantize_ref`.

    Args:
        indices: int64 ``[...]`` (``group_bits == 0``) or ``[..., dim / g]``, each in ``[0, 2^g)``.
        dim: ``D``, the number of bits (code dimensions) per row.
        group_bits: as in :func:`lfq_quantize_ref`.
        dtype: the floating dtype of the codes.
        bit_order: as in :func:`lfq_quantize_ref`.

    Returns:
        ``[..., dim]`` of ``dtype``: ``+1`` where the bit is set, ``-1`` elsewhere.
    """
    op = "lfq_codes_from_indices_ref"
    if indices.dtype != torch.int64:
        raise ValueError(f"{op}: indices must be int64, got {indices.dtype}")
    if dtype not in _FLOATS:
        raise ValueError(f"{op}: dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    _check_bit_order(op, bit_order)
    g = _group_width(op, dim, group_bits)
    G = dim // g
    grouped = indices.unsqueeze(-1) if group_bits == 0 else indices
    if group_bits != 0 and (indices.dim() == 0 or indices.shape[-1] != G):
        raise ValueError(f"{op}: indices must be [..., {G}] (dim / group_bits), got shape {list(indices.shape)}")
    if grouped.numel() and bool(((grouped < 0) | (grouped >= (1 << g))).any()):
        raise ValueError(f"{op}: indices must be in [0, 2^{g}) (no bits above the group width)")
    bits = (grouped.unsqueeze(-1) >> bit_positions(g, bit_order, indices.device)) & 1  # [..., G, g]
    codes = torch.where(bits.bool(), 1.0, -1.0).to(dtype)
    return codes.reshape(*grouped.shape[:-1], dim)


def _entropy_groups(op: str, z: Tensor, temperature: float, group_bits: int, weight: Tensor | None,
                    bit_order: str) -> tuple[Tensor, int, Tensor]:
    """Checks shared by the entropy references; returns the rows ``[N, D]`` in the compute dtype (rows of
    weight 0 zeroed, so a NaN there reaches nothing), ``g``, and the row weights ``[N]`` (ones without
    ``weight``)."""
    _check_float(op, z)
    _check_bit_order(op, bit_order)
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
    if weight is None:
        return x, g, x.new_ones(x.shape[0])
    if tuple(weight.shape) != tuple(z.shape[:-1]):
        raise ValueError(f"{op}: weight must have z's leading shape {list(z.shape[:-1])}, got {list(weight.shape)}")
    w = weight.reshape(-1).to(x.dtype)
    return torch.where((w != 0)[:, None], x, 0.0), g, w


def _weighted_mean(values: Tensor, w: Tensor) -> Tensor:
    """``sum_n w_n values[n] / sum_n w_n`` over dim 0 (0 when every weight is 0)."""
    total = w.sum()
    return (w.reshape(-1, *([1] * (values.dim() - 1))) * values).sum(0) / torch.where(total > 0, total, 1.0)


def _xlogx_entropy(q: Tensor) -> Tensor:
    """``-sum_c q_c log(max(q_c, tiny))`` over the last dim: a probability that underflowed to 0 adds 0."""
    return -(q * q.clamp_min(torch.finfo(q.dtype).tiny).log()).sum(-1)


def all_codes(g: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              bit_order: str = "msb") -> Tensor:
    """Every code of a ``g``-bit group as ``+-1`` vectors: ``[2^g, g]``, row ``c`` having ``+1`` in column
    ``j`` iff the bit of ``c`` that dimension ``j`` sets (:func:`bit_positions`) is 1."""
    c = torch.arange(1 << g, device=device)
    bits = (c[:, None] >> bit_positions(g, bit_order, device)) & 1
    return torch.where(bits.bool(), 1.0, -1.0).to(dtype)


def lfq_entropy_ref(z: Tensor, temperature: float = 0.01, group_bits: int = 0, return_code_probs: bool = False,
                    *, weight: Tensor | None = None, bit_order: str = "msb") -> EntropyResult:
    """Reference of :func:`fastvq.ops.lfq_entropy` by its definition: a softmax over every code.

    For each group of ``g`` bits (all ``D`` when ``group_bits == 0``), with the ``2^g`` codes
    ``C in {-1, +1}^(2^g x g)`` and rows ``x [N, g]`` (all leading dims of ``z`` flattened):

        probs            = softmax(2 x C^T / temperature)           # [N, 2^g]
        sample entropy   = mean_n -sum_c probs log probs
        code_probs       = mean_n probs                             # [2^g], code c = row c of C
        codebook entropy = -sum_c code_probs log max(code_probs, tiny)

    with ``mean_n`` weighted by ``weight`` (``sum_n w_n (.) / sum_n w_n``, 0 when every weight is 0) and
    ``C`` listed in ``bit_order`` (:func:`all_codes`)

    and both entropies are averaged over the groups. This materialises ``[N, 2^g]`` per group, exactly like
    vector-quantize-pytorch / Open-MAGVIT2 (which use ``eps = 1e-5`` where this uses
    ``tiny = torch.finfo(dtype).tiny``). Differentiable.

    Args:
        z: ``[..., D]`` float32 / float16 / bfloat16 / float64 with at least one row.
        temperature: softmax temperature (> 0).
        group_bits: ``0`` (one group, ``D <= 24``) or ``g <= 24`` dividing ``D``.
        return_code_probs: also return ``code_probs [D / g, 2^g]``.
        weight: ``z.shape[:-1]`` row weights (bool or float), or None.
        bit_order: ``"msb"`` or ``"lsb"``: the order of ``code_probs``.

    Returns:
        ``(sample_entropy, codebook_entropy[, code_probs])``: 0-dim tensors (and the ``[G, 2^g]`` code
        distribution), float64 for float64 ``z``, else float32. Natural log.
    """
    x, g, w = _entropy_groups("lfq_entropy_ref", z, temperature, group_bits, weight, bit_order)
    codes = all_codes(g, x.dtype, x.device, bit_order)  # [2^g, g]
    tiny = torch.finfo(x.dtype).tiny
    sample, codebook, code_probs = [], [], []
    for xg in x.split(g, dim=-1):  # [N, g] per group
        probs = torch.softmax(2.0 * (xg @ codes.T) / temperature, dim=-1)  # [N, 2^g]
        sample.append(_weighted_mean(-(probs * probs.clamp_min(tiny).log()).sum(-1), w))
        avg = _weighted_mean(probs, w)  # [2^g]
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
                               return_code_probs: bool = False, *, weight: Tensor | None = None,
                               bit_order: str = "msb") -> EntropyResult:
    """:func:`lfq_entropy_ref`'s quantities through the bit factorisation; same arguments and results.

    The softmax over ``c in {-1, +1}^g`` of ``2 <x, c> / T`` is a product of independent Bernoullis with
    ``p_j = sigmoid(4 x_j / T)`` (``P(c_j = +1)``), so per group

        sample entropy = mean_n sum_j h(p[n, j]),   h(p) = -p log p - (1 - p) log(1 - p)
        code_probs     = (1/N) P_A^T P_B  (as a 2^|A| x 2^|B| matrix; A = the low bits, B = the high bits)

    where ``P_A[n, a]`` is the probability of row ``n`` taking the bit pattern ``a`` on ``A``. Memory is
    ``O(N 2^(g/2) + 2^g)`` instead of ``N x 2^g``. ``h`` uses ``log p = logsigmoid(a)``,
    ``log(1 - p) = logsigmoid(-a)`` with ``a = 4 x / T`` (exact even where ``p`` rounds to 0 or 1). The
    bits are listed from the index's least significant: for ``"msb"`` each group's dims are reversed first.
    Row weights scale the rows of ``P_A`` and the per-row entropies.
    """
    x, g, w = _entropy_groups("lfq_entropy_factorized_ref", z, temperature, group_bits, weight, bit_order)
    G = x.shape[1] // g
    if bit_order == "msb":  # the least significant bit of an msb index is the group's last dim
        x = x.view(-1, G, g).flip(-1).reshape(-1, G * g)
    a = 4.0 * x / temperature  # [N, D] Bernoulli logits
    p, q = torch.sigmoid(a), torch.sigmoid(-a)  # P(bit = 1), P(bit = 0)
    h = -(p * F.logsigmoid(a) + q * F.logsigmoid(-a))  # [N, D]
    total = w.sum()
    total = torch.where(total > 0, total, 1.0)
    sample_h = (w[:, None] * h).sum(0).view(G, g).sum(-1) / total  # [G]
    low = g // 2
    code_probs = []
    for pg, qg in zip(p.split(g, dim=-1), q.split(g, dim=-1)):
        PA = w[:, None] * _bit_products(pg[:, :low], qg[:, :low])  # [N, 2^low]
        PB = _bit_products(pg[:, low:], qg[:, low:])  # [N, 2^(g-low)]
        # code c = a + 2^low * b, so the row-major [2^(g-low), 2^low] matrix P_B^T P_A lists codes in order
        code_probs.append((PB.T @ PA).reshape(-1) / total)
    cp = torch.stack(code_probs)  # [G, 2^g]
    codebook_h = _xlogx_entropy(cp)  # [G]
    if return_code_probs:
        return sample_h.mean(), codebook_h.mean(), cp
    return sample_h.mean(), codebook_h.mean()


def siglu(z: Tensor) -> Tensor:
    """UniWeTok's bounding of the encoder output into ``(-1, 1)``: ``2 sigmoid(z) - 1``."""
    return 2.0 * torch.sigmoid(z) - 1.0


def lfq_loss_ref(
    x: Tensor,
    codebook_size: int,
    num_codebooks: int = 1,
    inv_temperature: float = 100.0,
    entropy_loss_weight: float = 0.1,
    commitment_loss_weight: float = 0.0,
    diversity_gamma: float = 1.0,
    codebook_scale: float = 1.0,
    spherical: bool = False,
    soft_clamp_input_value: float | None = None,
    bound: str | None = None,
    bit_order: str = "msb",
    mask: Tensor | None = None,
    entropy_fn: Callable[..., EntropyResult] = lfq_entropy_ref,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Reference of :class:`fastvq.nn.LFQ`'s training forward without projections, on channel-last
    ``x [..., C * d]`` (``C = num_codebooks``, ``d = log2(codebook_size)``), written the way
    vector-quantize-pytorch writes it: masked rows are selected out (``x[mask]``) before the losses.

    1. ``soft_clamp_input_value`` v: ``x <- v tanh(x / v)``; ``bound="siglu"``: ``x <- 2 sigmoid(x) - 1``;
    2. per codebook ``[..., C, d]``: ``spherical``: ``x <- codebook_scale * x / ||x||``; the code
       magnitude is ``m = codebook_scale`` (``codebook_scale / sqrt(d)`` when spherical);
    3. ``q = m * sign(x)`` (``-m`` at 0), indices in ``bit_order`` ``[..., C]``;
    4. ``per_sample, codebook = entropy_fn(m x, 1 / inv_temperature, d)`` over the kept rows (logits
       ``2 <x, c> inv_temperature`` with codes ``c in {-m, m}^d``), ``commitment = mse(x, sg(q))`` over the
       kept rows (a term of weight 0 is 0); ``loss = entropy_loss_weight * (per_sample - diversity_gamma * codebook) +
       commitment_loss_weight * commitment``;
    5. ``quantized = x + sg(q - x)``, 0 at masked positions, whose index is -1.

    Returns ``(quantized [..., C * d], indices int64 [..., C], loss 0-dim, breakdown)``.
    """
    d = int(math.log2(codebook_size))
    if soft_clamp_input_value is not None:
        x = (x / soft_clamp_input_value).tanh() * soft_clamp_input_value
    if bound == "siglu":
        x = siglu(x)
    x = x.unflatten(-1, (num_codebooks, d))
    m = codebook_scale
    if spherical:
        x = F.normalize(x, dim=-1) * codebook_scale
        m = codebook_scale / math.sqrt(d)
    codes, indices = lfq_quantize_ref(x.detach().flatten(-2), d, bit_order)
    q = (codes * m).unflatten(-1, (num_codebooks, d))
    kept = x if mask is None else x[mask]  # [n, C, d]
    zero = x.new_zeros(())
    per_sample = codebook = zero
    if kept.shape[0] and entropy_loss_weight != 0:
        per_sample, codebook = entropy_fn(kept.flatten(-2) * m, 1.0 / inv_temperature, d, bit_order=bit_order)
    commitment = zero
    if kept.shape[0] and commitment_loss_weight != 0:
        commitment = F.mse_loss(kept, (q if mask is None else q[mask]).detach())
    loss = entropy_loss_weight * (per_sample - diversity_gamma * codebook) + commitment_loss_weight * commitment
    quantized = (x + (q - x).detach()).flatten(-2)
    if mask is not None:
        quantized = torch.where(mask[..., None], quantized, 0.0)
        indices = torch.where(mask[..., None], indices, -1)
    breakdown = {"per_sample_entropy": per_sample, "codebook_entropy": codebook, "commitment": commitment}
    return quantized, indices, loss, breakdown
