"""Token merging inside a ViT (ToMe, as MergeVQ's encoder uses it), on fastvq's merge ops.

Each :class:`MergingViTBlock` is a pre-norm ViT block that, between attention and MLP, merges the ``r``
most similar tokens of one half of the sequence into the other half (:func:`fastvq.ops.bipartite_merge`,
the metric being the attention keys averaged over heads), tracks how many original tokens each token
stands for (``sizes``, used as a ``log(size)`` attention bias: ToMe's proportional attention), and updates
the integer source map ``[B, T0]`` (:func:`fastvq.ops.compose_source`) from which
:func:`fastvq.ops.unmerge` recovers the full grid. :func:`merge_schedule` spreads a token budget (MergeVQ:
256 -> 144 or 36) over the layers. docs/ops/merge.md describes the ops and the source map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.ops.merge import bipartite_merge, compose_source, mergeable_count


def _fewest_tokens(tokens: int, layers: int, protect_first: bool, cap: int | None = None) -> int:
    """The fewest tokens ``layers`` merge steps can leave, each merging as many as it may (and at most
    ``cap``)."""
    for _ in range(layers):
        r = mergeable_count(tokens, protect_first)
        tokens -= r if cap is None else min(r, cap)
    return tokens


def merge_schedule(tokens: int, target: int, layers: int, protect_first: bool = False) -> list[int]:
    """The ``r`` of each of ``layers`` merge steps taking ``tokens`` tokens down to exactly ``target``.

    A step on ``T`` tokens merges at most :func:`mergeable_count` ``(T, protect_first)`` of them
    (``ceil(T / 2)``, one less with a protected class token). The distribution is as even as that allows:

    1. the largest step is as small as possible: ``c`` = the smallest cap such that steps of at most ``c``
       can reach ``target``;
    2. layer ``l`` merges ``ceil(R_l / L_l)`` of the ``R_l`` tokens still to remove over the ``L_l`` layers
       left, raised (never above ``c``) as far as the later layers need to still reach ``target``.

    When the even split ``[q + 1] * e + [q] * (layers - e)`` (``q, e = divmod(tokens - target, layers)``,
    the larger steps first) is feasible, it is the result: ``merge_schedule(256, 144, 4) == [28] * 4``.
    Budgets near halving every layer front-load the merging, the later layers having fewer tokens to
    merge: ``merge_schedule(256, 36, 4) == [61, 61, 61, 37]``, ``merge_schedule(256, 36, 3) == [109, 74,
    37]``.

    Args:
        tokens: the tokens entering the first layer (``>= 0``).
        target: the tokens after the last layer, ``0 <= target <= tokens``.
        layers: the number of merge steps (``>= 0``).
        protect_first: token 0 is a class token that never merges.

    Returns:
        ``layers`` non-negative ints summing to ``tokens - target``.

    Raises:
        ValueError: for negative arguments, ``target > tokens``, or a budget that ``layers`` steps cannot
            reach (e.g. 256 -> 36 in 2 layers: two halvings leave at least 64).
    """
    op = "merge_schedule"
    if tokens < 0 or layers < 0:
        raise ValueError(f"{op}: tokens and layers must be >= 0, got tokens={tokens}, layers={layers}")
    if not 0 <= target <= tokens:
        raise ValueError(f"{op}: target must be in [0, tokens={tokens}], got {target}")
    fewest = _fewest_tokens(tokens, layers, protect_first)
    if target < fewest:
        raise ValueError(f"{op}: {layers} layers cannot take {tokens} tokens down to {target} (protect_first="
                         f"{protect_first}): a layer merges at most ceil(T/2){' - 1' if protect_first else ''} "
                         f"of its T tokens, so {fewest} tokens is the fewest reachable")
    if layers == 0:
        return []
    cap = -(-(tokens - target) // layers)
    while _fewest_tokens(tokens, layers, protect_first, cap) > target:
        cap += 1
    schedule = []
    t = tokens
    for left in range(layers, 0, -1):
        r = -(-(t - target) // left)  # the even share, rounded up
        while _fewest_tokens(t - r, left - 1, protect_first, cap) > target:  # the rest could not be removed
            r += 1
        schedule.append(r)
        t -= r
    return schedule


def proportional_attention_bias(sizes: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """ToMe's proportional attention: ``log(sizes)`` as an additive bias on the attention logits, so a key
    standing for ``s`` original tokens weighs as ``s`` copies of itself.

    Args:
        sizes: ``[B, T]`` float ``> 0``: how many original tokens each token stands for.
        dtype: the bias dtype (``scaled_dot_product_attention`` needs the query's); default ``sizes.dtype``.

    Returns:
        ``[B, 1, 1, T]``: broadcasts over heads and queries; pass it as ``attn_mask`` to
        :func:`torch.nn.functional.scaled_dot_product_attention` or add it to ``[B, H, T, T]`` logits.
    """
    if sizes.dim() != 2:
        raise ValueError(f"proportional_attention_bias: sizes must be [B, T], got shape {list(sizes.shape)}")
    return sizes.log()[:, None, None, :].to(dtype or sizes.dtype)


class MergingViTBlock(nn.Module):
    """A pre-norm ViT block (timm's ``Block``) with ToMe's token merging between attention and MLP.

    ``forward(x, sizes, source)``:

    1. ``h = LayerNorm(x)``; ``q, k, v`` per head; ``x = x + proj(SDPA(q, k, v, attn_mask=log(sizes)))``
       (proportional attention; no bias when ``sizes`` is ``None``, i.e. every token stands for one);
    2. when ``r > 0``: ``x, sizes, assign = bipartite_merge(x, metric, sizes, r, protect_first)`` with
       ``metric = k`` averaged over heads ``[B, T, head_dim]`` (not differentiated: matching is a
       decision), then ``source = compose_source(source, assign)``. The ``T - r`` outputs are the unmerged
       even-position tokens, then the odd-position ones (docs/ops/merge.md);
    3. ``x = x + MLP(LayerNorm(x))`` (``dim -> mlp_ratio * dim -> dim``, GELU).

    Args:
        dim: channels ``C``; num_heads: attention heads (dividing ``dim``).
        mlp_ratio: MLP hidden width over ``dim``; qkv_bias: bias of the qkv projection.
        r: tokens merged per forward (0: none); ``forward(..., r=...)`` overrides it per call.
        protect_first: token 0 (a class token) never merges.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, r: int = 0,
                 protect_first: bool = False):
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"MergingViTBlock: dim={dim} must be a positive multiple of num_heads={num_heads}")
        if r < 0:
            raise ValueError(f"MergingViTBlock: r must be >= 0, got {r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.r = r
        self.protect_first = protect_first
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, r={self.r}, protect_first={self.protect_first}"

    def attention(self, x: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor]:
        """``x [B, T, C]`` (normalised) -> ``(proj(attention) [B, T, C], keys averaged over heads
        [B, T, head_dim])``, with the ``log(sizes)`` bias on the logits when ``sizes`` is given."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None if sizes is None else proportional_attention_bias(sizes, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, T, head_dim]
        return self.proj(out.transpose(1, 2).reshape(B, T, C)), k.mean(dim=1)

    def forward(self, x: Tensor, sizes: Tensor | None = None, source: Tensor | None = None,
                r: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Args:
            x: ``[B, T, C]`` float.
            sizes: ``[B, T]`` float ``> 0`` (``None``: every token stands for one original token; ones in
                float32, float64 for float64 ``x``).
            source: int64 ``[B, T0]``, the token of every original position (``None``: ``arange(T)``).
            r: overrides ``self.r`` for this call.

        Returns:
            ``(x [B, T - r, C], sizes [B, T - r], source [B, T0])``.
        """
        B, T, _ = x.shape
        attn, metric = self.attention(self.norm1(x), sizes)
        x = x + attn
        if sizes is None:
            sizes = x.new_ones(B, T, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        if source is None:
            source = torch.arange(T, device=x.device).repeat(B, 1)
        r = self.r if r is None else r
        if r > 0:
            x, sizes, assign = bipartite_merge(x, metric.detach(), sizes, r, self.protect_first)
            source = compose_source(source, assign)
        x = x + self.mlp(self.norm2(x))
        return x, sizes, source
