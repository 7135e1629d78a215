"""Compressed-KV autoregressive decoding for MergeAR-style generators (docs/ops/decode.md).

A MergeAR model generates tokens in raster order, but a token that the merge map marks as a duplicate of an
earlier token of its merge group is hidden from every later position during training
(:func:`merge_causal_mask`). At inference its key and value are therefore never needed again: the cache
keeps only first occurrences (:func:`first_occurrence`), about K entries instead of L, and decode time,
which is dominated by reading the cache, shrinks with it. A duplicate still runs its own forward step (its
output predicts the next token) and attends to the kept entries *and to itself*:
:meth:`CompressedKVCache.attend` (one :func:`fastvq.ops.decode_step`) attends over the kept prefix plus the
token's own key and value, and writes that row to the cache only when the token is a first occurrence, so
nothing is copied and the result equals a full forward pass under :func:`merge_causal_mask`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastvq.ops.decode import decode_step, kv_append


def first_occurrence(group_ids: Tensor) -> Tensor:
    """Keep flags of a merge map: ``group_ids [..., L]`` (integer; the merge group of each position, e.g.
    the source index of the merge source map) -> bool ``[..., L]``, True where position ``i`` is the first
    position of its group (no ``j < i`` has the same id)."""
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise TypeError(f"first_occurrence: group_ids must be an integer tensor, got {group_ids.dtype}")
    if group_ids.dim() == 0:
        raise ValueError("first_occurrence: group_ids must be [..., L], got a 0-dim tensor")
    L = group_ids.shape[-1]
    if L == 0:
        return torch.zeros(group_ids.shape, dtype=torch.bool, device=group_ids.device)
    flat = group_ids.reshape(-1, L)
    sorted_ids, order = torch.sort(flat, dim=-1, stable=True)  # equal ids keep their order: the first is first
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    keep = torch.empty_like(starts).scatter_(-1, order, starts)
    return keep.reshape(group_ids.shape)


def merge_causal_mask(group_ids: Tensor) -> Tensor:
    """MergeAR's training mask: ``group_ids [B, L]`` -> bool ``[B, L, L]``, True where query position ``i``
    may attend to key position ``j``: ``j <= i`` and (``j`` is the first occurrence of its merge group or
    ``j == i``). The boolean convention of ``scaled_dot_product_attention``'s ``attn_mask`` (add a head
    dimension: ``mask[:, None]``)."""
    if group_ids.dim() != 2:
        raise ValueError(f"merge_causal_mask: group_ids must be [B, L], got shape {list(group_ids.shape)}")
    B, L = group_ids.shape
    keep = first_occurrence(group_ids)
    idx = torch.arange(L, device=group_ids.device)
    causal = idx[None, :] <= idx[:, None]  # [i, j]: j <= i
    diag = idx[None, :] == idx[:, None]
    return causal[None] & (keep[:, None, :] | diag[None])


class CompressedKVCache(nn.Module):
    """Per-layer KV buffers that keep only the first occurrence of each merge group.

    Layout (docs/ops/decode.md): ``k[layer], v[layer]`` are ``[B, Hkv, capacity, D]`` with
    ``capacity = max_kept + 1`` (one spare row for the current token); ``lengths[layer]`` (int32 ``[B]``)
    counts each sequence's kept rows, which form the prefix ``[0, lengths)``. ``positions`` (int64
    ``[B, capacity]``, -1 where unused) is the position cache: the original sequence position of each
    kept row (for RoPE-style positional encodings or a count bias). Decode step ``t``, per layer::

        out = cache.attend(layer, q, k, v, keep)   # q [B, Hq, D], k/v [B, Hkv, D], keep [B] bool

    attends over the kept entries and the token itself (as a full forward under :func:`merge_causal_mask`)
    and keeps the token's row only where ``keep``. :meth:`append` only appends (prefill, or models whose
    query does not see its own key). Each step calls one of them once per layer, layers in order; layer 0's
    call advances the step counter and records positions.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim: the buffers' shape.
        max_kept: the most first occurrences one sequence can have (the merged token count K, e.g. 144).
        dtype, device: of the buffers (float32, float16 or bfloat16).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_kept: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        for name, value, lo in (("num_layers", num_layers, 1), ("batch_size", batch_size, 0),
                                ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1), ("max_kept", max_kept, 0)):
            if not isinstance(value, int) or value < lo:
                raise ValueError(f"CompressedKVCache: {name} must be an int >= {lo}, got {value!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"CompressedKVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_layers, self.batch_size, self.num_kv_heads = num_layers, batch_size, num_kv_heads
        self.head_dim, self.max_kept, self.capacity = head_dim, max_kept, max_kept + 1
        shape = (num_layers, batch_size, num_kv_heads, self.capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(num_layers, batch_size, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("positions", torch.full((batch_size, self.capacity), -1, dtype=torch.int64, device=device),
                             persistent=False)
        self.steps = 0

    # ---- decoding -------------------------------------------------------------------------------------

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, *, scale: float | None = None,
               bias: Tensor | None = None) -> Tensor:
        """One decode step of one layer: attention of ``q [B, Hq, D]`` over the kept entries and the token's
        own ``k, v [B, Hkv, D]``; afterwards the token stays in the cache only where ``keep [B]``.

        One :func:`fastvq.ops.decode_step`: the token's own row is attended straight from ``k, v`` (as the
        row after the kept ones) and written to the cache only where ``keep``: no copy of the cache.
        ``bias``: optional ``[B, capacity]`` logit bias (the token's own logit takes ``bias[b, counts[b]]``).
        Returns ``[B, Hq, D]`` in the cache dtype."""
        keep = self._check_step("attend", layer, k, v, keep)
        lengths = self.lengths[layer]
        row = lengths.to(torch.long, copy=True) if layer == 0 else None  # each token's row, before the op
        out = decode_step(q, self.k[layer], self.v[layer], lengths, k, v, keep, scale, bias)
        if layer == 0:
            self._record(row, keep)
        return out

    def append(self, layer: int, k: Tensor, v: Tensor, keep: Tensor) -> None:
        """Append ``k, v [B, Hkv, D]`` to ``layer`` where ``keep [B]`` (:func:`fastvq.ops.kv_append`)."""
        keep = self._check_step("append", layer, k, v, keep)
        lengths = self.lengths[layer]
        row = lengths.to(torch.long, copy=True) if layer == 0 else None
        kv_append(self.k[layer], self.v[layer], lengths, k, v, keep)
        if layer == 0:
            self._record(row, keep)

    def layer(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(k_cache, v_cache, lengths)`` of one layer: views for calling the ops directly."""
        return self.k[layer], self.v[layer], self.lengths[layer]

    def reset(self) -> None:
        """Empty every sequence of every layer (the buffers are kept)."""
        self.lengths.zero_()
        self.positions.fill_(-1)
        self.steps = 0

    # ---- bookkeeping ----------------------------------------------------------------------------------

    @property
    def counts(self) -> Tensor:
        """Kept entries per sequence, ``[B]`` int32 (layer 0's lengths)."""
        return self.lengths[0].clone()

    def kept_positions(self, b: int) -> Tensor:
        """The original positions of sequence ``b``'s kept entries, in cache order (int64 ``[counts[b]]``)."""
        return self.positions[b, : int(self.lengths[0, b])].clone()

    def memory_stats(self) -> dict:
        """Bytes: ``allocated`` (all buffers), ``kv_allocated`` (the K/V buffers), ``kv_used`` (the kept
        rows, over all layers and sequences), ``kv_full`` (what an uncompressed cache of every decoded
        position would hold, ``steps`` rows per sequence), and ``kept_fraction = kv_used / kv_full``."""
        row = self.num_kv_heads * self.head_dim * self.k.element_size() * 2  # one K row and one V row
        used = int(self.lengths.sum()) * row
        full = self.num_layers * self.batch_size * self.steps * row
        return {
            "allocated": sum(t.numel() * t.element_size() for t in (self.k, self.v, self.lengths, self.positions)),
            "kv_allocated": self.k.numel() * self.k.element_size() * 2,
            "kv_used": used,
            "kv_full": full,
            "kept_fraction": used / full if full else 1.0,
        }

    def _check_step(self, method: str, layer: int, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"CompressedKVCache.{method}: layer must be in [0, {self.num_layers}), got {layer}")
        want = (self.batch_size, self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"CompressedKVCache.{method}: k and v must be [B, Hkv, D] = {list(want)}, got "
                             f"{list(k.shape)} and {list(v.shape)}")
        if keep.dtype != torch.bool or tuple(keep.shape) != (self.batch_size,):
            raise ValueError(f"CompressedKVCache.{method}: keep must be bool [B] = [{self.batch_size}], got "
                             f"{keep.dtype} {list(keep.shape)}")
        return keep.to(self.k.device)

    def _record(self, row: Tensor, keep: Tensor) -> None:
        # row: int64 [B], layer 0's lengths before the step's op (a copy); where keep, positions[b, row[b]] records
        # this step; clamped, in place, on that private copy
        idx = row.clamp_(max=self.capacity - 1).unsqueeze_(1)
        self.positions.scatter_(1, idx, torch.where(keep.unsqueeze(1), self.steps, self.positions.gather(1, idx)))
        self.steps += 1

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, max_kept={self.max_kept}, dtype={self.k.dtype}")
