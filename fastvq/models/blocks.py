"""Shared building blocks of the four tokenizers (UniTok, MergeVQ, VQRAE, UniWeTok); docs/models.md.

Token sequences are ``[B, N, C]`` (channel-last), feature maps ``[B, C, H, W]`` (channel-first). Every block
is plain PyTorch (``F.scaled_dot_product_attention`` for attention) and works under ``torch.compile``.

| block | from | what |
|---|---|---|
| :class:`RoPE2D` | axial 2-D RoPE (EVA-02, FiT, UniWeTok) | rotary positions from the grid size at call time |
| :class:`Attention`, :class:`ViTBlock` | ViT, pre-norm | SDPA, optional qk-norm, RoPE, prefix (register) tokens |
| :class:`GeGLU` | Shazeer 2020; UniTok / ViTamin ``GeGluMlp`` | ``W2(gelu_tanh(W0 x) * W1 x)`` |
| :class:`ResBlock`, :class:`Downsample`, :class:`Upsample` | VQGAN (taming-transformers) | GroupNorm + SiLU convs |
| :class:`AdaptiveGroupNorm` | MAGVIT-v2 / UniWeTok decoder | GroupNorm whose scale and shift come from a condition |
| :class:`LayerNorm2d`, :class:`MBConv`, :class:`ViTaminStem` | ViTamin ``MbConvLNBlock``, ``Stem`` | UniTok's conv stages |
| :class:`AttnProjection` | UniTok ``AttnProjection`` (``quant_proj``) | LN → linear + head-averaged attention, then GeGLU |
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RoPE2D", "Attention", "ViTBlock", "GeGLU", "LayerNorm2d", "AdaptiveGroupNorm", "ResBlock", "Downsample",
           "Upsample", "MBConv", "ViTaminStem", "AttnProjection"]


# ---- rotary positions ------------------------------------------------------------------------------------------

def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RoPE2D(nn.Module):
    """Axial 2-D rotary position embedding, resolution-independent.

    The head dim ``d`` (a multiple of 4) is split in two halves: the first is rotated by the token's row ``y``,
    the second by its column ``x``. Within a half of width ``h = d/2``, channel pairs ``(j, j + h/2)`` rotate by
    the angle ``p · θ_j`` with ``θ_j = base^(-2j/h)``, ``j < h/2`` (the rotate-half convention of GPT-NeoX / EVA).
    Positions are the integer grid coordinates of the ``H × W`` grid given **at call time**, so one module
    serves any resolution and any aspect ratio, and ``q·k`` depends only on the offset ``(Δy, Δx)``.

    ``forward(t [B, heads, P + H·W, d], grid=(H, W), num_prefix=P)``: the first ``P`` tokens (CLS / register
    tokens) are returned unrotated; the rest are the grid in row-major order. Rotated in fp32 (fp64 for fp64
    input), returned in ``t``'s dtype.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE2D: head_dim must be a multiple of 4 (two axes x rotation pairs), got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        quarter = head_dim // 4
        inv_freq = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # [d/4]

    def angles(self, grid: tuple[int, int], dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """cos, sin of the rotation angles, each ``[H·W, d]`` in ``dtype``."""
        h, w = grid
        inv = self.inv_freq.to(dtype)
        ys = torch.arange(h, device=inv.device, dtype=dtype).repeat_interleave(w)  # [H·W] row index
        xs = torch.arange(w, device=inv.device, dtype=dtype).repeat(h)             # [H·W] column index
        fy = ys[:, None] * inv  # [H·W, d/4]
        fx = xs[:, None] * inv
        ang = torch.cat((fy, fy, fx, fx), dim=-1)  # [H·W, d]: (y half: pairs j, j+d/4), (x half)
        return ang.cos(), ang.sin()

    def forward(self, t: Tensor, grid: tuple[int, int], num_prefix: int = 0) -> Tensor:
        h, w = int(grid[0]), int(grid[1])
        if t.shape[-1] != self.head_dim or t.shape[-2] != num_prefix + h * w:
            raise ValueError(f"RoPE2D: expected [..., {num_prefix} + {h}*{w}, {self.head_dim}] tokens, "
                             f"got {list(t.shape)}")
        work = torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 for fp64 input
        cos, sin = self.angles((h, w), work)
        prefix, body = t[..., :num_prefix, :], t[..., num_prefix:, :].to(work)
        half = self.head_dim // 2
        by, bx = body[..., :half], body[..., half:]
        cy, cx = cos[:, :half], cos[:, half:]
        sy, sx = sin[:, :half], sin[:, half:]
        body = torch.cat((by * cy + _rotate_half(by) * sy, bx * cx + _rotate_half(bx) * sx), dim=-1)
        return torch.cat((prefix, body.to(t.dtype)), dim=-2)


# ---- transformer ---------------------------------------------------------------------------------------------

class GeGLU(nn.Module):
    """Gated-GELU MLP (Shazeer 2020), as UniTok's / ViTamin's ``GeGluMlp``:
    ``y = W2 (gelu_tanh(W0 x) ⊙ W1 x)``, ``x [..., dim] → y [..., out_dim or dim]``.

    ``inner_norm=True`` first applies a LayerNorm (eps 1e-6) to ``x``, as ViTamin's ``GeGluMlp`` does even
    inside a pre-norm block (UniTok inherits that double norm; keep it to match its parameter count)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, inner_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6) if inner_norm else nn.Identity()
        self.w0 = nn.Linear(dim, hidden_dim)
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class Attention(nn.Module):
    """Multi-head self-attention over ``x [B, N, dim]`` with ``F.scaled_dot_product_attention``.

    ``qk_norm``: LayerNorm over each head's q and k (ViT-22B; timm's ``qk_norm``). ``rope``: a
    :class:`RoPE2D` applied to q and k of the grid tokens (``grid`` must then be given to ``forward``; the first
    ``num_prefix`` tokens are not rotated). ``attn_bias``: an additive float bias broadcastable to
    ``[B, heads, N, N]`` (e.g. MergeVQ's proportional-attention ``log(size)``), or a bool mask (True = attend).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 rope: bool = False, rope_base: float = 10000.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.rope = RoPE2D(self.head_dim, rope_base) if rope else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None, num_prefix: int = 0,
                attn_bias: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, h, N, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if grid is None:
                raise ValueError("Attention: rope=True needs grid=(H, W) in forward")
            q, k = self.rope(q, grid, num_prefix), self.rope(k, grid, num_prefix)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=is_causal)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``; ``x [B, N, dim]``.

    ``mlp="geglu"`` (hidden ``int(dim · mlp_ratio)``; ViTamin / UniTok use ratio 2) or ``"gelu"`` (the ViT MLP).
    ``rope``/``qk_norm``/``forward`` arguments as :class:`Attention`. LayerNorm eps 1e-6 (timm's ViT)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, mlp: str = "geglu", qkv_bias: bool = True,
                 qk_norm: bool = False, rope: bool = False, rope_base: float = 10000.0, inner_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, rope, rope_base)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        if mlp == "geglu":
            self.mlp = GeGLU(dim, hidden, inner_norm=inner_norm)
        elif mlp == "gelu":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        else:
            raise ValueError(f"ViTBlock: mlp must be 'geglu' or 'gelu', got {mlp!r}")

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None, num_prefix: int = 0,
                attn_bias: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), grid, num_prefix, attn_bias, is_causal)
        return x + self.mlp(self.norm2(x))


# ---- convolutional blocks ------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``x [B, C, H, W]`` at each position (timm's ``LayerNorm2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm whose per-channel scale and shift are predicted from a conditioning vector (the adaptive
    GroupNorm of MAGVIT-v2's decoder, used by UniWeTok's decoder):

    ``y = GN(x) · (W_s c + b_s)[:, :, None, None] + (W_b c + b_b)[:, :, None, None]``,
    ``x [B, C, *spatial]``, ``c [B, cond_dim]`` (the model decides what ``c`` is, e.g. pooled code statistics).
    GN has no affine parameters of its own. Initialised to the identity affine (``W_s = W_b = 0``, ``b_s = 1``,
    ``b_b = 0``), so at initialisation it equals a plain GroupNorm whatever ``c`` is."""

    def __init__(self, num_channels: int, cond_dim: int, num_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"AdaptiveGroupNorm: num_channels {num_channels} must be divisible by num_groups "
                             f"{num_groups}")
        self.num_groups, self.eps = num_groups, eps
        self.scale = nn.Linear(cond_dim, num_channels)
        self.shift = nn.Linear(cond_dim, num_channels)
        nn.init.zeros_(self.scale.weight)
        nn.init.ones_(self.scale.bias)
        nn.init.zeros_(self.shift.weight)
        nn.init.zeros_(self.shift.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        if cond.dim() != 2 or cond.shape[0] != x.shape[0]:
            raise ValueError(f"AdaptiveGroupNorm: cond must be [B, cond_dim] with B = {x.shape[0]}, "
                             f"got {list(cond.shape)}")
        view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        y = F.group_norm(x, self.num_groups, eps=self.eps)
        return y * self.scale(cond).view(view) + self.shift(cond).view(view)


def _group_norm(channels: int, cond_dim: int | None, num_groups: int) -> nn.Module:
    if cond_dim is None:
        return nn.GroupNorm(num_groups, channels, eps=1e-6)
    return AdaptiveGroupNorm(channels, cond_dim, num_groups)


class ResBlock(nn.Module):
    """VQGAN's residual block on ``x [B, in_ch, H, W] → [B, out_ch, H, W]``:
    ``h = conv3(SiLU(GN(x)))``, ``h = conv3(dropout(SiLU(GN(h))))``, ``y = shortcut(x) + h``, with GroupNorm
    (32 groups, eps 1e-6) and a 1×1 conv shortcut when the widths differ. ``cond_dim``: both norms become
    :class:`AdaptiveGroupNorm` and ``forward`` takes ``cond [B, cond_dim]`` (UniWeTok's decoder)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, dropout: float = 0.0, num_groups: int = 32,
                 cond_dim: int | None = None):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm1 = _group_norm(in_ch, cond_dim, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch, cond_dim, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.conditional = cond_dim is not None

    def _norm(self, norm: nn.Module, x: Tensor, cond: Tensor | None) -> Tensor:
        if self.conditional:
            if cond is None:
                raise ValueError("ResBlock: built with cond_dim, so forward needs cond [B, cond_dim]")
            return norm(x, cond)
        return norm(x)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, cond)))
        h = self.conv2(self.dropout(F.silu(self._norm(self.norm2, h, cond))))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """VQGAN's downsampling: pad (right 1, bottom 1) then a 3×3 conv with stride 2;
    ``[B, C, H, W] → [B, out, ⌊H/2⌋, ⌊W/2⌋]``."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """VQGAN's upsampling: nearest ×2 then a 3×3 conv; ``[B, C, H, W] → [B, out, 2H, 2W]``."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _make_divisible(v: float, divisor: int = 8) -> int:
    """timm's ``make_divisible``: round to a multiple of ``divisor``, never below 90% of ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class MBConv(nn.Module):
    """ViTamin's stage block (``MbConvLNBlock``): a pre-norm inverted bottleneck on ``[B, in_ch, H, W] →
    [B, out_ch, H/stride, W/stride]``:

    ``h = conv1x1(GELU(dwconv_k(GELU(conv1x1(LN2d(x))), stride)))``, ``y = shortcut(x) + h``, with the
    expansion width ``make_divisible(out_ch · expand_ratio, 8)``, LayerNorm2d eps 1e-6, and the shortcut
    ``AvgPool(3, stride 2, pad 1, count_include_pad=False)`` (+ 1×1 conv if the widths differ) for stride 2,
    a 1×1 conv for a width change, otherwise the identity."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, expand_ratio: float = 4.0, kernel_size: int = 3):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MBConv: stride must be 1 or 2, got {stride}")
        mid = _make_divisible(out_ch * expand_ratio)
        if stride == 2:
            pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
            self.shortcut = nn.Sequential(pool, nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else pool
        else:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.pre_norm = LayerNorm2d(in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size, stride=stride, padding=kernel_size // 2, groups=mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.conv1(self.pre_norm(x)))
        h = F.gelu(self.conv2(h))
        return self.shortcut(x) + self.conv3(h)


class ViTaminStem(nn.Module):
    """ViTamin's stem: ``conv3x3 stride 2 → LayerNorm2d + GELU → conv3x3``; ``[B, in_ch, H, W] → [B, out_ch, H/2,
    W/2]``."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.gelu(self.norm1(self.conv1(x))))


# ---- UniTok's attention-factorization projection ---------------------------------------------------------------

class _FactorizedAttention(nn.Module):
    """The attention inside :class:`AttnProjection` (UniTok's ``CausalAttention``).

    Down-projection (``in_dim > out_dim``): q, k, v have ``in_dim`` channels in ``num_heads`` heads of
    ``in_dim / num_heads``; the heads' outputs are **averaged** (``[B, N, in_dim/heads]``) and, if that is not
    ``out_dim``, average-pooled to ``out_dim`` (``adaptive_avg_pool1d``). Up-projection: q, k, v have ``out_dim``
    channels and the heads are concatenated. Then a linear ``out_dim → out_dim``. q and v have biases, k none
    (a key bias adds a per-query constant, which softmax ignores)."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool):
        super().__init__()
        width = in_dim if in_dim > out_dim else out_dim
        if width % num_heads:
            raise ValueError(f"AttnProjection: {width} channels must be divisible by num_heads {num_heads}")
        self.in_dim, self.out_dim, self.num_heads, self.causal = in_dim, out_dim, num_heads, causal
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(in_dim, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, heads, N, head_dim]
        if self.in_dim > self.out_dim:
            o = o.mean(dim=1)  # [B, N, head_dim]: the heads averaged
            if self.head_dim != self.out_dim:
                o = F.adaptive_avg_pool1d(o, self.out_dim)
        else:
            o = o.transpose(1, 2).reshape(b, n, self.out_dim)
        return self.proj(o)


class AttnProjection(nn.Module):
    """UniTok's attention-factorization projection (``quant_proj`` / ``post_quant_proj``), ``x [B, N, in_dim] →
    [B, N, out_dim]``:

    ``y = Linear(LN3(x)) + Attn(LN1(x))``, then ``y = y + GeGLU(LN2(y))`` (GeGLU hidden ``out_dim · mlp_ratio``
    with its own inner LayerNorm, as UniTok's ``GeGluMlp``), where ``Attn`` is the head-averaging attention of
    :class:`_FactorizedAttention`. UniTok: ``quant_proj = AttnProjection(1024, 64, 8)`` (8 heads of 128 averaged
    to 128, pooled to 64) and ``post_quant_proj = AttnProjection(64, 1024, 8)``. ``causal=True`` (UniTok's code
    always is) makes token ``i``'s output depend only on tokens ``≤ i``; every other part is per token.
    ``out_dim`` must divide ``in_dim`` or be a multiple of it (as in UniTok)."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, mlp_ratio: float = 2.0, causal: bool = True):
        super().__init__()
        if out_dim % in_dim and in_dim % out_dim:
            raise ValueError(f"AttnProjection: out_dim {out_dim} must divide in_dim {in_dim} or be a multiple of it")
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = _FactorizedAttention(in_dim, out_dim, num_heads, causal)
        self.norm3 = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGLU(out_dim, int(out_dim * mlp_ratio), inner_norm=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
