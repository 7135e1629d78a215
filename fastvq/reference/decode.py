"""Pure-PyTorch references of the decode ops (compressed-KV autoregressive decoding, MergeAR): the test
oracles and the benchmark baselines.

- :func:`decode_attention_ref`: attention of one query per sequence over the valid prefix of a ragged
  cache, by the definition (padded logits masked with ``-inf``, a softmax in float32).
- :func:`kv_append_ref`: the deduplicating append, out of place.
- :func:`decode_step_ref`: one MergeAR decode step (attend over the kept entries and the token itself, then
  keep the token's row where it is a first occurrence), out of place.
- :func:`decode_attention_full_mask_ref`: the baseline MergeAR replaces, what a model without a compacted
  cache does each step: attention over the *full* cache of every past position, with a boolean mask that
  hides the dropped (duplicate) entries.

The semantics are documented in docs/ops/decode.md.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _attend(q: Tensor, k: Tensor, v: Tensor, logit_mask: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """q [B, Hq, D], k/v [B, Hkv, L, D], logit_mask [B, L] bool (True = attended) -> [B, Hq, D] in float32
    (float64 for float64 q). Rows with no attended entry (or only -inf logits) give zeros."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    qf = q.to(acc).reshape(B, Hkv, Hq // Hkv, D)
    logits = torch.einsum("bhgd,bhld->bhgl", qf, k.to(acc)) * scale
    if bias is not None:
        logits = logits + bias.to(acc)[:, None, None, :]
    logits = logits.masked_fill(~logit_mask[:, None, None, :], float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)
    empty = m == float("-inf")
    p = torch.exp(logits - torch.where(empty, torch.zeros_like(m), m))
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhgl,bhld->bhgd", p, v.to(acc)) / torch.where(empty, torch.ones_like(denom), denom)
    return out.masked_fill(empty, 0.0).reshape(B, Hq, D)


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float | None = None,
                         bias: Tensor | None = None) -> Tensor:
    """Reference of :func:`fastvq.ops.decode_attention`: ``q [B, Hq, D]``, caches ``[B, Hkv, Lmax, D]``,
    ``lengths [B]``, ``bias [B, Lmax]`` -> ``[B, Hq, D]`` in q's dtype, computed in float32 (float64 for
    float64 inputs). Differentiable."""
    B, Hq, D = q.shape
    Lmax = k_cache.shape[2]
    if Hq % k_cache.shape[1] != 0:
        raise ValueError(f"decode_attention_ref: Hq={Hq} must be a multiple of Hkv={k_cache.shape[1]}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    valid = torch.arange(Lmax, device=q.device)[None, :] < lengths.to(q.device).long()[:, None]
    return _attend(q, k_cache, v_cache, valid, scale, bias).to(q.dtype)


def kv_append_ref(k_cache: Tensor, v_cache: Tensor, lengths: Tensor, k_new: Tensor, v_new: Tensor,
                  keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`fastvq.ops.kv_append`, out of place: returns the new ``(k_cache, v_cache, lengths)``.
    Raises ValueError when a kept sequence's cache is full."""
    k_cache, v_cache, lengths = k_cache.clone(), v_cache.clone(), lengths.clone()
    Lmax = k_cache.shape[2]
    for b in range(k_cache.shape[0]):
        if not bool(keep[b]):
            continue
        n = int(lengths[b])
        if not 0 <= n < Lmax:
            raise ValueError(f"kv_append_ref: the cache of sequence {b} is full (lengths[{b}] = {n}, Lmax = {Lmax})")
        k_cache[b, :, n] = k_new[b]
        v_cache[b, :, n] = v_new[b]
        lengths[b] = n + 1
    return k_cache, v_cache, lengths


def decode_step_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, k_new: Tensor, v_new: Tensor,
                    keep: Tensor, scale: float | None = None,
                    bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference of :func:`fastvq.ops.decode_step`, out of place: returns ``(out, k_cache, v_cache, lengths)``.
    The token's row is appended to every sequence, attended, and kept only where ``keep``. Raises ValueError
    when a sequence has no free row."""
    every = torch.ones_like(keep)
    k_all, v_all, len_all = kv_append_ref(k_cache, v_cache, lengths, k_new, v_new, every)
    out = decode_attention_ref(q, k_all, v_all, len_all, scale, bias)
    k_kept, v_kept, len_kept = kv_append_ref(k_cache, v_cache, lengths, k_new, v_new, keep)
    return out, k_kept, v_kept, len_kept


def decode_attention_full_mask_ref(q: Tensor, k_full: Tensor, v_full: Tensor, mask: Tensor,
                                   scale: float | None = None) -> Tensor:
    """The uncompressed baseline: ``q [B, Hq, D]`` over a full cache ``k_full / v_full [B, Hkv, T, D]`` of
    every past position, ``mask [B, T]`` bool (True = attended: the kept entries and the current position).
    Same result as :func:`decode_attention_ref` over the compacted cache of the masked rows."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _attend(q, k_full, v_full, mask, scale, None).to(q.dtype)
