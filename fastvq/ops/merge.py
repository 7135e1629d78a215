"""Token merging with a source map (ToMe bipartite soft matching as MergeVQ uses it): merge, track where
every original token went, and recover the full grid.

Each function is a thin, documented call of a dispatcher op (``torch.ops.fastvq.*``), followed by the op's
fake kernel (its only shape logic) and its autograd formula. docs/ops/merge.md has the algorithm.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def mergeable_count(tokens: int, protect_first: bool = False) -> int:
    """The largest ``r`` :func:`bipartite_merge` accepts on ``tokens`` tokens: the size of set A (the even
    positions, ``ceil(T / 2)``), less token 0 when ``protect_first``; 0 when set B is empty (``T < 2``)."""
    if tokens < 2:
        return 0
    return (tokens + 1) // 2 - (1 if protect_first else 0)


def bipartite_merge(x: Tensor, metric: Tensor, sizes: Tensor, r: int,
                    protect_first: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the ``r`` most similar tokens of set A (even positions) into their best match in set B (odd
    positions), size-weighted, in one fused pass.

    Args:
        x: ``[B, T, C]`` features to merge, float32 / float16 / bfloat16 / float64, any strides.
        metric: ``[B, T, Cm]`` similarity features (e.g. attention keys averaged over heads), any float dtype.
        sizes: ``[B, T]`` how many original tokens each token stands for (> 0), any float dtype.
        r: how many tokens to remove, ``0 <= r <= ceil(T/2)`` (minus one with ``protect_first``; 0 if T < 2).
        protect_first: token 0 (a class token) is never merged.

    Matching: ``best[a] = argmax_b cos(metric[a], metric[b])`` (first b on ties; cosine with norms clamped
    at 1e-6; fp32 arithmetic, fp64 for a float64 metric; NaN scores rank last); the ``r`` A tokens with the
    highest score (then the smaller position) merge.

    Returns:
        ``(merged, merged_sizes, assign)``: ``merged [B, T - r, C]`` (x's dtype): the unmerged A tokens in
        ascending position, then every B token in ascending position, each B token the size-weighted mean
        ``(x_b s_b + sum x_a s_a) / (s_b + sum s_a)`` (summed in ascending a; a B token nothing merged into is
        copied bit for bit); ``merged_sizes [B, T - r]`` (sizes' dtype); ``assign [B, T]`` int64, the output
        slot of every input token. Deterministic (no atomics): the same bits on every run, CPU and CUDA.
        Differentiable w.r.t. ``x`` (the matching is not; ``sizes`` gets no gradient).
    """
    return torch.ops.fastvq.bipartite_merge.default(x, metric, sizes, r, protect_first)


def bipartite_merge_backward(grad_merged: Tensor, sizes: Tensor, merged_sizes: Tensor, assign: Tensor) -> Tensor:
    """:func:`bipartite_merge`'s backward w.r.t. ``x``, one scaled gather:
    ``grad_x[b, t] = grad_merged[b, assign[b, t]] * sizes[b, t] / merged_sizes[b, assign[b, t]]``
    (``[B, T', C]``, ``[B, T]``, ``[B, T']``, ``[B, T]`` int64 -> ``[B, T, C]`` in grad_merged's dtype; the
    weight in fp32, fp64 for float64 grads)."""
    return torch.ops.fastvq.bipartite_merge_backward.default(grad_merged, sizes, merged_sizes, assign)


def compose_source(source: Tensor, assign: Tensor) -> Tensor:
    """Follow one merge: ``source'[b, p] = assign[b, source[b, p]]``.

    ``source [B, T0]`` int64 maps every original position to its current token (start from
    ``arange(T0)``); ``assign [B, T]`` is a :func:`bipartite_merge` output. Returns ``[B, T0]`` int64.
    Entries of ``source`` outside ``[0, T)`` raise on CPU and trap on CUDA."""
    return torch.ops.fastvq.compose_source.default(source, assign)


def unmerge(merged: Tensor, source: Tensor) -> Tensor:
    """Recover the full grid: ``out[b, p] = merged[b, source[b, p]]`` (``[B, T, C]``, ``[B, T0]`` int64 ->
    ``[B, T0, C]``). Differentiable w.r.t. ``merged``; the backward is a deterministic segmented sum
    (:func:`unmerge_backward`), not a scatter-add with atomics."""
    return torch.ops.fastvq.unmerge.default(merged, source)


def unmerge_backward(grad: Tensor, source: Tensor, num_tokens: int) -> Tensor:
    """``out[b, j] = sum of grad[b, p] over p with source[b, p] == j``, summed in ascending p with fp32
    accumulation (``[B, T0, C]``, ``[B, T0]`` -> ``[B, num_tokens, C]``): unmerge's backward."""
    return torch.ops.fastvq.unmerge_backward.default(grad, source, num_tokens)


# ---- fake kernels (shape logic for torch.compile / meta tensors) --------------------------------------

def _check_float(op: str, name: str, t: Tensor) -> None:
    torch._check(t.dtype in _FLOATS, lambda: f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_source(op: str, source: Tensor, B, device) -> None:
    torch._check(source.dtype == torch.int64, lambda: f"{op}: source must be int64, got {source.dtype}")
    torch._check(source.dim() == 2 and source.shape[0] == B,
                 lambda: f"{op}: source must be [B, T0] with B={B}, got shape {list(source.shape)}")
    torch._check(source.device == device, lambda: f"{op}: source must be on device {device}, got {source.device}")


@torch.library.register_fake("fastvq::bipartite_merge")
def _bipartite_merge_fake(x, metric, sizes, r, protect_first=False):
    op = "bipartite_merge"
    torch._check(x.dim() == 3, lambda: f"{op}: x must be [B, T, C], got shape {list(x.shape)}")
    torch._check(metric.dim() == 3, lambda: f"{op}: metric must be [B, T, Cm], got shape {list(metric.shape)}")
    torch._check(sizes.dim() == 2, lambda: f"{op}: sizes must be [B, T], got shape {list(sizes.shape)}")
    B, T, C = x.shape
    torch._check(metric.shape[0] == B and metric.shape[1] == T,
                 lambda: f"{op}: metric must be [B, T, Cm] with B, T of x {list(x.shape)}, got shape {list(metric.shape)}")
    torch._check(sizes.shape[0] == B and sizes.shape[1] == T,
                 lambda: f"{op}: sizes must be [B, T] with B, T of x {list(x.shape)}, got shape {list(sizes.shape)}")
    for name, t in (("x", x), ("metric", metric), ("sizes", sizes)):
        _check_float(op, name, t)
        torch._check(t.device == x.device, lambda: f"{op}: {name} must be on x's device {x.device}, got {t.device}")
    mergeable = mergeable_count(T, protect_first)
    torch._check(0 <= r and r <= mergeable, lambda: f"{op}: r must be in [0, {mergeable}] (the mergeable tokens "
                 f"of A for T={T}{' with protect_first' if protect_first else ''}), got {r}")
    return (x.new_empty((B, T - r, C)), sizes.new_empty((B, T - r)), x.new_empty((B, T), dtype=torch.int64))


@torch.library.register_fake("fastvq::bipartite_merge_backward")
def _bipartite_merge_backward_fake(grad_merged, sizes, merged_sizes, assign):
    op = "bipartite_merge_backward"
    torch._check(grad_merged.dim() == 3, lambda: f"{op}: grad_merged must be [B, T', C], got shape {list(grad_merged.shape)}")
    _check_float(op, "grad_merged", grad_merged)
    B = grad_merged.shape[0]
    torch._check(assign.dtype == torch.int64 and assign.dim() == 2 and assign.shape[0] == B,
                 lambda: f"{op}: assign must be [B, T] int64 with B={B}, got {assign.dtype} shape {list(assign.shape)}")
    torch._check(sizes.dim() == 2 and sizes.shape == assign.shape and sizes.dtype in _FLOATS,
                 lambda: f"{op}: sizes must be a float [B, T] tensor like assign {list(assign.shape)}, got "
                         f"{sizes.dtype} shape {list(sizes.shape)}")
    torch._check(merged_sizes.dim() == 2 and merged_sizes.shape[0] == B and merged_sizes.shape[1] == grad_merged.shape[1]
                 and merged_sizes.dtype in _FLOATS,
                 lambda: f"{op}: merged_sizes must be a float [B, T'] tensor with B, T' of grad_merged "
                         f"{list(grad_merged.shape)}, got {merged_sizes.dtype} shape {list(merged_sizes.shape)}")
    for t in (sizes, merged_sizes, assign):
        torch._check(t.device == grad_merged.device, lambda: f"{op}: every argument must be on grad_merged's device "
                     f"{grad_merged.device}, got {t.device}")
    return grad_merged.new_empty((B, assign.shape[1], grad_merged.shape[2]))


@torch.library.register_fake("fastvq::compose_source")
def _compose_source_fake(source, assign):
    torch._check(assign.dtype == torch.int64, lambda: f"compose_source: assign must be int64, got {assign.dtype}")
    torch._check(assign.dim() == 2, lambda: f"compose_source: assign must be [B, T], got shape {list(assign.shape)}")
    _check_source("compose_source", source, assign.shape[0], assign.device)
    return torch.empty_like(source, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastvq::unmerge")
def _unmerge_fake(merged, source):
    torch._check(merged.dim() == 3, lambda: f"unmerge: merged must be [B, T, C], got shape {list(merged.shape)}")
    _check_float("unmerge", "merged", merged)
    _check_source("unmerge", source, merged.shape[0], merged.device)
    return merged.new_empty((merged.shape[0], source.shape[1], merged.shape[2]))


@torch.library.register_fake("fastvq::unmerge_backward")
def _unmerge_backward_fake(grad, source, num_tokens):
    torch._check(grad.dim() == 3, lambda: f"unmerge_backward: grad must be [B, T0, C], got shape {list(grad.shape)}")
    _check_float("unmerge_backward", "grad", grad)
    _check_source("unmerge_backward", source, grad.shape[0], grad.device)
    torch._check(source.shape[1] == grad.shape[1],
                 lambda: f"unmerge_backward: source must be [B, T0] with T0={grad.shape[1]}, got shape {list(source.shape)}")
    torch._check(num_tokens >= 0, lambda: f"unmerge_backward: num_tokens must be >= 0, got {num_tokens}")
    return grad.new_empty((grad.shape[0], num_tokens, grad.shape[2]))


# ---- autograd -----------------------------------------------------------------------------------------
# merged[slot] = sum over the tokens t with assign[t] == slot of x[t] * sizes[t] / merged_sizes[slot], so
# grad_x[t] = grad_merged[assign[t]] * sizes[t] / merged_sizes[assign[t]]: a gather (unmerge) and a scale.

def _bipartite_merge_setup_context(ctx, inputs, output):
    x, _metric, sizes, _r, _protect = inputs
    _merged, merged_sizes, assign = output
    ctx.mark_non_differentiable(merged_sizes, assign)
    ctx.save_for_backward(sizes, merged_sizes, assign)
    ctx.x_dtype = x.dtype


def _bipartite_merge_backward(ctx, grad_merged, _grad_sizes, _grad_assign):
    sizes, merged_sizes, assign = ctx.saved_tensors
    if grad_merged is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    return bipartite_merge_backward(grad_merged, sizes, merged_sizes, assign), None, None, None, None


torch.library.register_autograd("fastvq::bipartite_merge", _bipartite_merge_backward,
                                setup_context=_bipartite_merge_setup_context)


# bipartite_merge_backward is linear in grad_merged with the weights w[t] = sizes[t] / merged_sizes[assign[t]];
# its adjoint sums w[t] * gg[t] over the tokens of each slot: unmerge_backward (ordered, no atomics).
def _merge_backward_setup_context(ctx, inputs, output):
    grad_merged, sizes, merged_sizes, assign = inputs
    ctx.save_for_backward(sizes, merged_sizes, assign)
    ctx.num_tokens = grad_merged.shape[1]


def _merge_backward_backward(ctx, gg):
    sizes, merged_sizes, assign = ctx.saved_tensors
    acc = torch.float64 if gg.dtype == torch.float64 else torch.float32
    weight = (sizes.to(acc) / merged_sizes.to(acc).gather(1, assign)).unsqueeze(-1).to(gg.dtype)
    return unmerge_backward(gg * weight, assign, ctx.num_tokens), None, None, None


torch.library.register_autograd("fastvq::bipartite_merge_backward", _merge_backward_backward,
                                setup_context=_merge_backward_setup_context)


def _unmerge_setup_context(ctx, inputs, output):
    merged, source = inputs
    ctx.save_for_backward(source)
    ctx.num_tokens = merged.shape[1]


def _unmerge_backward(ctx, grad):
    (source,) = ctx.saved_tensors
    return unmerge_backward(grad, source, ctx.num_tokens), None


torch.library.register_autograd("fastvq::unmerge", _unmerge_backward, setup_context=_unmerge_setup_context)


def _unmerge_backward_setup_context(ctx, inputs, output):
    _grad, source, _num_tokens = inputs
    ctx.save_for_backward(source)


def _unmerge_backward_backward(ctx, gg):
    (source,) = ctx.saved_tensors  # unmerge_backward is linear in grad: its adjoint is unmerge
    return unmerge(gg, source), None, None


torch.library.register_autograd("fastvq::unmerge_backward", _unmerge_backward_backward,
                                setup_context=_unmerge_backward_setup_context)
