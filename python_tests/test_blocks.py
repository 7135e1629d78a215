"""fastvq.models.blocks: values against hand computations (tiny shapes)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastvq.models.blocks import (AdaptiveGroupNorm, Attention, AttnProjection, Downsample, GeGLU, LayerNorm2d, MBConv,
                                  ResBlock, RoPE2D, Upsample, ViTaminStem, ViTBlock, _make_divisible)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- RoPE2D ----------------------------------------------------------------------------------------------------

def _grid_index(y, x, w, prefix=0):
    return prefix + y * w + x


def test_rope_hand_value():
    """head_dim 4: one pair for rows (θ = 1), one for columns: [a, b] -> [a cos p - b sin p, b cos p + a sin p]."""
    rope = RoPE2D(4)
    t = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).expand(1, 1, 6, 4)  # grid 2 x 3
    out = rope(t, (2, 3))
    for y in range(2):
        for x in range(3):
            cy, sy, cx, sx = math.cos(y), math.sin(y), math.cos(x), math.sin(x)
            want = torch.tensor([1 * cy - 2 * sy, 2 * cy + 1 * sy, 3 * cx - 4 * sx, 4 * cx + 3 * sx], dtype=torch.float64)
            torch.testing.assert_close(out[0, 0, _grid_index(y, x, 3)], want, rtol=0, atol=1e-12)


def test_rope_relative_position_property():
    """q·k after rotation depends only on the offset (Δy, Δx) between the two tokens."""
    rope = RoPE2D(16, base=100.0)
    h, w = 5, 6
    q = torch.randn(16, dtype=torch.float64)
    k = torch.randn(16, dtype=torch.float64)
    rq = rope(q.expand(1, 1, h * w, 16), (h, w))[0, 0]
    rk = rope(k.expand(1, 1, h * w, 16), (h, w))[0, 0]
    scores = rq @ rk.T  # [HW, HW]
    for dy in (-2, 0, 1, 3):
        for dx in (-4, -1, 0, 2):
            vals = [scores[_grid_index(y, x, w), _grid_index(y + dy, x + dx, w)]
                    for y in range(h) for x in range(w) if 0 <= y + dy < h and 0 <= x + dx < w]
            vals = torch.stack(vals)
            torch.testing.assert_close(vals, vals[:1].expand_as(vals), rtol=0, atol=1e-12)
    # and it does depend on the offset
    assert not torch.isclose(scores[0, 1], scores[0, w])


def test_rope_preserves_norms_and_leaves_prefix_tokens_untouched():
    rope = RoPE2D(8)
    t = torch.randn(2, 3, 4 + 12, 8)
    out = rope(t, (3, 4), num_prefix=4)
    assert torch.equal(out[..., :4, :], t[..., :4, :])  # register tokens: bit-identical
    torch.testing.assert_close(out.norm(dim=-1), t.norm(dim=-1), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[..., 5:, :], t[..., 5:, :])


def test_rope_resolution_independent():
    """A token's rotation depends on its (row, col) only, not on the grid it belongs to; any H x W works."""
    rope = RoPE2D(8)
    v = torch.randn(8)
    a = rope(v.expand(1, 1, 4 * 4, 8), (4, 4))[0, 0]
    b = rope(v.expand(1, 1, 6 * 7, 8), (6, 7))[0, 0]
    c = rope(v.expand(1, 1, 3 * 11, 8), (3, 11))[0, 0]
    for y, x in ((0, 0), (1, 2), (2, 3), (0, 3)):
        torch.testing.assert_close(a[_grid_index(y, x, 4)], b[_grid_index(y, x, 7)], rtol=0, atol=0)
        torch.testing.assert_close(a[_grid_index(y, x, 4)], c[_grid_index(y, x, 11)], rtol=0, atol=0)


def test_rope_errors():
    with pytest.raises(ValueError, match="RoPE2D: head_dim must be a multiple of 4"):
        RoPE2D(6)
    with pytest.raises(ValueError, match="RoPE2D: expected"):
        RoPE2D(8)(torch.randn(1, 1, 10, 8), (3, 3))


# ---- attention and the ViT block -----------------------------------------------------------------------------------

def _manual_attention(attn: Attention, x, grid=None, num_prefix=0, bias=None):
    b, n, c = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope is not None:
        q, k = attn.rope(q, grid, num_prefix), attn.rope(k, grid, num_prefix)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if bias is not None:
        s = s + bias
    o = s.softmax(-1) @ v
    return attn.proj(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_attention_equals_manual(qk_norm, rope):
    attn = Attention(32, 4, qk_norm=qk_norm, rope=rope).double()
    x = torch.randn(2, 2 + 12, 32, dtype=torch.float64)
    bias = torch.randn(2, 1, 14, 14, dtype=torch.float64)
    kw = dict(grid=(3, 4), num_prefix=2)
    torch.testing.assert_close(attn(x, **kw), _manual_attention(attn, x, **kw))
    torch.testing.assert_close(attn(x, attn_bias=bias, **kw), _manual_attention(attn, x, bias=bias, **kw))


def test_attention_rope_needs_grid():
    with pytest.raises(ValueError, match="Attention: rope=True needs grid"):
        Attention(16, 2, rope=True)(torch.randn(1, 4, 16))


def test_vit_block_equals_manual_and_any_resolution():
    blk = ViTBlock(32, 4, mlp_ratio=2.0, rope=True, qk_norm=True).double()
    for grid in ((2, 3), (5, 4)):
        x = torch.randn(2, 4 + grid[0] * grid[1], 32, dtype=torch.float64)
        y = x + _manual_attention(blk.attn, blk.norm1(x), grid, 4)
        want = y + blk.mlp(blk.norm2(y))
        torch.testing.assert_close(blk(x, grid, num_prefix=4), want)
    with pytest.raises(ValueError, match="ViTBlock: mlp must be"):
        ViTBlock(32, 4, mlp="swiglu")


def test_vit_block_rope_breaks_permutation_equivariance():
    """Without positions a block is permutation-equivariant; RoPE makes the output depend on where a token is."""
    x = torch.randn(1, 9, 16)
    perm = torch.tensor([3, 0, 1, 2, 8, 5, 6, 4, 7])
    plain = ViTBlock(16, 2)
    torch.testing.assert_close(plain(x)[:, perm], plain(x[:, perm]), rtol=1e-5, atol=1e-5)
    roped = ViTBlock(16, 2, rope=True)
    assert not torch.allclose(roped(x, (3, 3))[:, perm], roped(x[:, perm], (3, 3)), atol=1e-4)


def test_vit_block_compiles():
    blk = ViTBlock(16, 2, mlp_ratio=2.0, rope=True, qk_norm=True)
    x = torch.randn(2, 1 + 6, 16)
    torch.testing.assert_close(torch.compile(blk, fullgraph=True)(x, (2, 3), 1), blk(x, (2, 3), 1),
                               rtol=1e-5, atol=1e-5)


def test_geglu_hand_formula():
    m = GeGLU(6, 10, out_dim=4, inner_norm=True).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    n = F.layer_norm(x, (6,), m.norm.weight, m.norm.bias, 1e-6)
    want = (F.gelu(n @ m.w0.weight.T + m.w0.bias, approximate="tanh") * (n @ m.w1.weight.T + m.w1.bias)) @ m.w2.weight.T + m.w2.bias
    torch.testing.assert_close(m(x), want)


# ---- conv blocks -------------------------------------------------------------------------------------------------

def test_adaptive_group_norm_is_group_norm_at_scale_one_shift_zero():
    m = AdaptiveGroupNorm(8, cond_dim=5, num_groups=4).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    cond = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x, cond), F.group_norm(x, 4, eps=1e-6), rtol=0, atol=0)
    # trained weights: y = GN(x) * (W_s c + b_s) + (W_b c + b_b), per sample and channel
    for lin in (m.scale, m.shift):
        torch.nn.init.normal_(lin.weight)
        torch.nn.init.normal_(lin.bias)
    s, b = cond @ m.scale.weight.T + m.scale.bias, cond @ m.shift.weight.T + m.shift.bias
    want = F.group_norm(x, 4, eps=1e-6) * s[:, :, None, None] + b[:, :, None, None]
    torch.testing.assert_close(m(x, cond), want)
    with pytest.raises(ValueError, match="AdaptiveGroupNorm: cond must be"):
        m(x, cond[:1])


def test_resblock_hand_formula_and_conditional_identity_init():
    m = ResBlock(32, 64).double()
    x = torch.randn(2, 32, 5, 4, dtype=torch.float64)
    h = m.conv1(F.silu(m.norm1(x)))
    h = m.conv2(F.silu(m.norm2(h)))
    torch.testing.assert_close(m(x), m.shortcut(x) + h)
    assert isinstance(m.shortcut, torch.nn.Conv2d) and isinstance(ResBlock(32).shortcut, torch.nn.Identity)
    c = ResBlock(32, 64, cond_dim=7).double()
    c.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("norm")}, strict=False)
    torch.testing.assert_close(c(x, torch.randn(2, 7, dtype=torch.float64)), m(x))
    with pytest.raises(ValueError, match="ResBlock: built with cond_dim"):
        c(x)


def test_down_up_sample():
    d = Downsample(4, 8)
    x = torch.randn(1, 4, 8, 6)
    assert d(x).shape == (1, 8, 4, 3)
    torch.testing.assert_close(d(x), d.conv(F.pad(x, (0, 1, 0, 1))))
    u = Upsample(4)
    torch.testing.assert_close(u(x), u.conv(x.repeat_interleave(2, -1).repeat_interleave(2, -2)))
    assert u(x).shape == (1, 4, 16, 12)


def test_layernorm2d():
    m = LayerNorm2d(6, eps=1e-6)
    torch.nn.init.normal_(m.weight)
    x = torch.randn(2, 6, 3, 4)
    want = F.layer_norm(x.permute(0, 2, 3, 1), (6,), m.weight, m.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("stride,cin,cout", [(1, 16, 16), (1, 8, 16), (2, 16, 16), (2, 8, 16)])
def test_mbconv_hand_formula(stride, cin, cout):
    m = MBConv(cin, cout, stride=stride).double()
    assert m.conv1.out_channels == _make_divisible(cout * 4) == cout * 4
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64)
    h = F.gelu(m.conv1(F.layer_norm(x.permute(0, 2, 3, 1), (cin,), m.pre_norm.weight, m.pre_norm.bias, 1e-6).permute(0, 3, 1, 2)))
    h = m.conv3(F.gelu(m.conv2(h)))
    if stride == 2:
        s = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        s = m.shortcut[1](s) if cin != cout else s
    else:
        s = m.shortcut(x)
    out = m(x)
    assert out.shape == (2, cout, (7 + stride - 1) // stride, (6 + stride - 1) // stride)
    torch.testing.assert_close(out, s + h)


def test_make_divisible_and_stem():
    assert _make_divisible(64 * 4) == 256 and _make_divisible(20) == 24 and _make_divisible(3) == 8
    assert ViTaminStem(3, 16)(torch.randn(1, 3, 32, 24)).shape == (1, 16, 16, 12)


# ---- UniTok's attention projection -----------------------------------------------------------------------------

def test_attn_projection_down_averages_heads():
    """in 32 > out 4 with 4 heads: the heads (8-d each) are averaged, then pooled 8 -> 4, then projected."""
    m = AttnProjection(32, 4, num_heads=4, causal=False).double()
    torch.nn.init.normal_(m.attn.q_bias)
    torch.nn.init.normal_(m.attn.v_bias)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    a = m.attn
    n = m.norm1(x)
    q = n @ a.qkv.weight[:32].T + a.q_bias
    k = n @ a.qkv.weight[32:64].T
    v = n @ a.qkv.weight[64:].T + a.v_bias
    heads = []
    for i in range(4):
        sl = slice(8 * i, 8 * i + 8)
        p = (q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(8)).softmax(-1)
        heads.append(p @ v[..., sl])
    o = torch.stack(heads).mean(0)                        # [B, N, 8]
    o = o.view(2, 5, 4, 2).mean(-1)                       # adaptive_avg_pool1d 8 -> 4
    y = m.proj(m.norm3(x)) + a.proj(o)
    torch.testing.assert_close(m(x), y + m.mlp(m.norm2(y)))


@pytest.mark.parametrize("dims", [(32, 8), (8, 32)])
def test_attn_projection_shapes_and_causality(dims):
    cin, cout = dims
    x = torch.randn(2, 7, cin, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 4] += torch.randn(cin, dtype=torch.float64)
    causal = AttnProjection(cin, cout, num_heads=4).double()
    y, y2 = causal(x), causal(x2)
    assert y.shape == (2, 7, cout)
    assert torch.equal(y[:, :4], y2[:, :4])                # outputs before the change: bit-identical
    assert not torch.allclose(y[:, 4:], y2[:, 4:])
    full = AttnProjection(cin, cout, num_heads=4, causal=False).double()
    assert not torch.allclose(full(x)[:, :4], full(x2)[:, :4])


def test_attn_projection_errors():
    with pytest.raises(ValueError, match="AttnProjection: out_dim 24 must divide"):
        AttnProjection(64, 24, 8)
    with pytest.raises(ValueError, match="AttnProjection: 30 channels must be divisible"):
        AttnProjection(30, 15, 4)


def test_blocks_under_bf16_autocast_match_fp32():
    """Under CPU bf16 autocast every block runs and stays within bf16 rounding of its fp32 output."""
    x = torch.randn(2, 1 + 12, 32)
    fmap = torch.randn(2, 32, 6, 4)
    cond = torch.randn(2, 5)
    cases = [(ViTBlock(32, 4, 2.0, rope=True, qk_norm=True), (x, (3, 4), 1)),
             (AttnProjection(32, 8, 4), (x,)), (AttnProjection(8, 32, 4), (x[..., :8],)),
             (ResBlock(32, 64, cond_dim=5), (fmap, cond)), (MBConv(32, 32, 2), (fmap,))]
    for m, args in cases:
        ref = m(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(*args)
        assert out.shape == ref.shape
        torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
