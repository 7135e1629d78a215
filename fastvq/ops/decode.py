"""Compressed-KV autoregressive decoding ops (MergeAR): attention of one new query per sequence over a
ragged, compacted KV cache, and the deduplicating cache append.

Each function is a documented call of a dispatcher op (``torch.ops.fastvq.*``), followed by the op's fake
kernel (its only shape logic) and its autograd registration. Semantics and cache layout: docs/ops/decode.md.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX = (torch.int64, torch.int32)
MAX_HEAD_DIM = 256  # a CUDA block stages a [32, D] fp32 tile of the cache in shared memory
MAX_GROUP = 64  # query heads per kv-head


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float | None = None,
                     bias: Tensor | None = None) -> Tensor:
    """Attention of one new query per sequence over the valid prefix of its KV cache (ragged lengths).

    ``out[b, h] = softmax(scale * q[b, h] . k[b, h // G, :n] + bias[b, :n]) @ v[b, h // G, :n]`` with
    ``n = lengths[b]`` and ``G = Hq // Hkv`` (grouped-query attention: query head ``h`` reads kv-head ``h // G``).

    Args:
        q: ``[B, Hq, D]`` float32/float16/bfloat16, any strides.
        k_cache, v_cache: ``[B, Hkv, Lmax, D]`` in q's dtype, any strides (a slice of a bigger buffer is fine);
            only rows ``< lengths[b]`` are read.
        lengths: ``[B]`` int64 or int32, ``0 <= lengths[b] <= Lmax``.
        scale: logit scale, default ``1 / sqrt(D)``.
        bias: optional ``[B, Lmax]`` float32/float16/bfloat16 added to the logits (e.g. the log of how many
            positions a cached entry stands for); ``-inf`` masks an entry.

    Returns:
        ``[B, Hq, D]`` in q's dtype. Accumulation is fp32 (online softmax over chunks of 32 keys); a sequence
        with ``lengths[b] == 0``, or whose logits are all ``-inf``, gets zeros. ``D <= 256`` and
        ``Hq / Hkv <= 64``. On CUDA, lengths out of range trip a device-side assert. Inference only: the op
        has no backward (use :func:`fastvq.reference.decode_attention_ref` to train).
    """
    return torch.ops.fastvq.decode_attention.default(q, k_cache, v_cache, lengths, scale, bias)


def kv_append(k_cache: Tensor, v_cache: Tensor, lengths: Tensor, k_new: Tensor, v_new: Tensor, keep: Tensor) -> None:
    """Deduplicating cache append, in place: where ``keep[b]``, write ``k_new[b]`` and ``v_new[b]``
    (``[B, Hkv, D]``) at row ``lengths[b]`` of ``k_cache[b]`` / ``v_cache[b]`` (``[B, Hkv, Lmax, D]``) and
    increment ``lengths[b]`` (``[B]`` int64/int32); other sequences are untouched.

    ``keep`` is ``[B]`` bool. All tensors on one device; the new rows in the cache's dtype. Appending to a
    full cache (``lengths[b] == Lmax`` where ``keep[b]``) raises before anything is written (a device-side
    assert on CUDA). Returns None.
    """
    torch.ops.fastvq.kv_append.default(k_cache, v_cache, lengths, k_new, v_new, keep)


def decode_step(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, k_new: Tensor, v_new: Tensor,
                keep: Tensor, scale: float | None = None, bias: Tensor | None = None) -> Tensor:
    """One MergeAR decode step of one layer, in place: the new token attends to the kept entries *and to
    itself*, and its key and value stay in the cache only where ``keep``.

    ``out[b] = decode_attention`` over the cache rows ``[0, lengths[b])`` followed by the token's own
    ``k_new[b], v_new[b]`` (as if at row ``lengths[b]``, whose bias is ``bias[b, lengths[b]]``). Then,
    where ``keep[b]``, that row is written at ``lengths[b]`` and ``lengths[b]`` grows by one; elsewhere
    the cache is untouched. The result equals, bit for bit, :func:`kv_append` with ``keep`` all True,
    :func:`decode_attention`, then ``lengths -= ~keep``: one op (one pass, no extra dispatch) instead of
    three.

    Args:
        q: ``[B, Hq, D]``; k_cache, v_cache: ``[B, Hkv, Lmax, D]``; lengths: ``[B]`` int64/int32 with
            ``0 <= lengths[b] <= Lmax - 1`` (the token needs a free row, even where it is not kept).
        k_new, v_new: ``[B, Hkv, D]``, the token's key and value, in q's dtype; they must not overlap the caches.
        keep: ``[B]`` bool, True where the token is the first occurrence of its merge group.
        scale, bias: as for :func:`decode_attention` (``bias [B, Lmax]``).

    Returns:
        ``[B, Hq, D]`` in q's dtype. Mutates ``k_cache``, ``v_cache`` and ``lengths``; every check comes before
        any write (on CUDA, lengths out of range trip a device-side assert). Inference only.
    """
    return torch.ops.fastvq.decode_step.default(q, k_cache, v_cache, lengths, k_new, v_new, keep, scale, bias)


# ---- fake kernels -------------------------------------------------------------------------------------

def _check_lengths(op: str, lengths: Tensor, B: int, device: torch.device) -> None:
    torch._check(lengths.dtype in _INDEX, lambda: f"{op}: lengths must be int64 or int32, got {lengths.dtype}")
    torch._check(lengths.dim() == 1 and lengths.shape[0] == B,
                 lambda: f"{op}: lengths must be [B] = [{B}], got shape {list(lengths.shape)}")
    torch._check(lengths.device == device, lambda: f"{op}: lengths must be on {device} like the cache, got {lengths.device}")


def _check_attention(op, q, k_cache, v_cache, lengths, scale, bias):
    torch._check(q.dtype in _FLOATS, lambda: f"{op}: q must be float32, float16 or bfloat16, got {q.dtype}")
    torch._check(q.dim() == 3, lambda: f"{op}: q must be [B, Hq, D], got shape {list(q.shape)}")
    torch._check(k_cache.dim() == 4, lambda: f"{op}: k_cache must be [B, Hkv, Lmax, D], got shape {list(k_cache.shape)}")
    torch._check(v_cache.shape == k_cache.shape,
                 lambda: f"{op}: v_cache must have k_cache's shape {list(k_cache.shape)}, got {list(v_cache.shape)}")
    torch._check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
                 lambda: f"{op}: k_cache and v_cache must have q's dtype {q.dtype}, got {k_cache.dtype} and {v_cache.dtype}")
    torch._check(k_cache.device == q.device and v_cache.device == q.device,
                 lambda: f"{op}: q, k_cache and v_cache must be on one device, got {q.device}, {k_cache.device} "
                         f"and {v_cache.device}")
    B, Hq, D = q.shape
    _, Hkv, Lmax, _ = k_cache.shape
    torch._check(k_cache.shape[0] == B and k_cache.shape[3] == D,
                 lambda: f"{op}: k_cache must be [B, Hkv, Lmax, D] with B={B} and D={D} from q, got shape {list(k_cache.shape)}")
    torch._check(1 <= D <= MAX_HEAD_DIM, lambda: f"{op}: head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")
    torch._check(Hkv >= 1 and Hq % Hkv == 0,
                 lambda: f"{op}: the query heads Hq={Hq} must be a multiple of the kv-heads Hkv={Hkv} (grouped-query attention)")
    torch._check(Hq // Hkv <= MAX_GROUP, lambda: f"{op}: at most {MAX_GROUP} query heads per kv-head, got Hq / Hkv = {Hq // Hkv}")
    _check_lengths(op, lengths, B, q.device)
    if bias is not None:
        torch._check(bias.device == q.device, lambda: f"{op}: bias must be on {q.device}, got {bias.device}")
        torch._check(bias.dtype in _FLOATS, lambda: f"{op}: bias must be float32, float16 or bfloat16, got {bias.dtype}")
        torch._check(bias.dim() == 2 and bias.shape[0] == B and bias.shape[1] == Lmax,
                     lambda: f"{op}: bias must be [B, Lmax] = [{B}, {Lmax}], got shape {list(bias.shape)}")
    if scale is not None:
        torch._check(math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale}")


def _check_append(op, k_cache, v_cache, lengths, k_new, v_new, keep):
    torch._check(k_cache.dtype in _FLOATS, lambda: f"{op}: k_cache must be float32, float16 or bfloat16, got {k_cache.dtype}")
    torch._check(k_cache.dim() == 4, lambda: f"{op}: k_cache must be [B, Hkv, Lmax, D], got shape {list(k_cache.shape)}")
    torch._check(v_cache.shape == k_cache.shape,
                 lambda: f"{op}: v_cache must have k_cache's shape {list(k_cache.shape)}, got {list(v_cache.shape)}")
    B, Hkv, _, D = k_cache.shape
    torch._check(k_new.dim() == 3 and tuple(k_new.shape) == (B, Hkv, D),
                 lambda: f"{op}: k_new must be [B, Hkv, D] = [{B}, {Hkv}, {D}], got shape {list(k_new.shape)}")
    torch._check(v_new.shape == k_new.shape, lambda: f"{op}: v_new must have k_new's shape {list(k_new.shape)}, got {list(v_new.shape)}")
    for t in (v_cache, k_new, v_new):
        torch._check(t.dtype == k_cache.dtype,
                     lambda: f"{op}: v_cache, k_new and v_new must have k_cache's dtype {k_cache.dtype}, got {t.dtype}")
        torch._check(t.device == k_cache.device,
                     lambda: f"{op}: every tensor must be on k_cache's device {k_cache.device}, got {t.device}")
    _check_lengths(op, lengths, B, k_cache.device)
    torch._check(keep.dtype == torch.bool, lambda: f"{op}: keep must be bool, got {keep.dtype}")
    torch._check(keep.dim() == 1 and keep.shape[0] == B, lambda: f"{op}: keep must be [B] = [{B}], got shape {list(keep.shape)}")
    torch._check(keep.device == k_cache.device, lambda: f"{op}: keep must be on {k_cache.device}, got {keep.device}")


@torch.library.register_fake("fastvq::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, lengths, scale=None, bias=None):
    _check_attention("decode_attention", q, k_cache, v_cache, lengths, scale, bias)
    return q.new_empty(q.shape)


@torch.library.register_fake("fastvq::kv_append")
def _kv_append_fake(k_cache, v_cache, lengths, k_new, v_new, keep):
    _check_append("kv_append", k_cache, v_cache, lengths, k_new, v_new, keep)
    return None


@torch.library.register_fake("fastvq::decode_step")
def _decode_step_fake(q, k_cache, v_cache, lengths, k_new, v_new, keep, scale=None, bias=None):
    _check_attention("decode_step", q, k_cache, v_cache, lengths, scale, bias)
    _check_append("decode_step", k_cache, v_cache, lengths, k_new, v_new, keep)
    return q.new_empty(q.shape)


# ---- autograd -----------------------------------------------------------------------------------------

def _decode_attention_setup_context(ctx, inputs, output):
    pass


def _decode_attention_backward(ctx, grad):
    raise RuntimeError("decode_attention: the op is inference-only and has no backward; train with "
                       "fastvq.reference.decode_attention_ref or a full forward with fastvq.nn.merge_causal_mask")


torch.library.register_autograd("fastvq::decode_attention", _decode_attention_backward,
                                setup_context=_decode_attention_setup_context)
