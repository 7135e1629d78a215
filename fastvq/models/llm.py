"""The LLaMA-style decoder under fastvq's MLLM and MergeAR (docs/mllm.md).

One readable file in the spirit of nanoGPT / LlamaGen's ``gpt.py``: RMSNorm, rotary positions (the
rotate-half convention of Hugging Face's Llama, so its weights load unchanged, :func:`decoder_from_hf`),
SwiGLU, grouped-query attention. It works on *embeddings*, not token ids: the MLLM and MergeAR put text
embeddings, visual-code embeddings and instruction tokens into one sequence and own their heads.

Three ways to run it, one set of weights:

* :meth:`Decoder.forward` — the full (training) forward, ``F.scaled_dot_product_attention`` under the causal
  mask or any boolean mask (MergeAR's :func:`fastvq.nn.merge_causal_mask`);
* :meth:`Decoder.forward` with ``cache=`` — the same, and every layer's keys and values are written into a
  cache (prefill; per-row ``keep`` flags, ragged prompts);
* :meth:`Decoder.step` — one new position per sequence against a cache. Two caches share one interface
  (``prefill(layer, k, v, keep)``, ``attend(layer, q, k, v, keep)``):

  - :class:`fastvq.nn.CompressedKVCache`: fastvq's decode ops (``decode_step``: attention over a ragged,
    compacted cache and the deduplicating append, one op per layer). Rows not kept are never written; an
    ordinary LLM keeps every row.
  - :class:`StaticKVCache`: the LlamaGen formulation, a full-length preallocated cache where every position is
    written at its own row and attention is SDPA under a boolean mask over all ``max_len`` rows. The baseline
    of the benchmarks and the oracle of the equality tests.

Positions are explicit (``positions [B, L]`` int64) because sequences in one batch have different prompt
lengths and a MergeAR cache row's position is not its row index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.nn import CompressedKVCache

__all__ = ["DecoderConfig", "Decoder", "RMSNorm", "SwiGLU", "StaticKVCache", "rope_cos_sin", "apply_rope",
           "decoder_from_hf", "copy_llama_weights", "HF_LLAMA_NAMES", "init_weights",
           "new_cache"]


@dataclass(frozen=True)
class DecoderConfig:
    """A LLaMA-style decoder. ``hidden_dim`` 0: SwiGLU width ``8/3 · dim`` rounded up to ``multiple_of``
    (LLaMA's rule). ``num_kv_heads`` divides ``num_heads`` (grouped-query attention; equal = multi-head)."""
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    hidden_dim: int = 0
    multiple_of: int = 32
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("dim", "num_layers", "num_heads", "num_kv_heads", "max_seq_len", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecoderConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"DecoderConfig: dim {self.dim} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderConfig: num_heads {self.num_heads} must be a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig: the head dim {self.head_dim} must be even (rotary pairs)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim:
            return self.hidden_dim
        h = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(h / self.multiple_of)


class RMSNorm(nn.Module):
    """``x / rms(x) · weight``, computed in fp32 (LLaMA)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32):
    """``positions [...]`` (int64) -> ``(cos, sin)`` each ``[..., head_dim]``: angle ``p · θ^(-2j/d)`` for pair
    ``(j, j + d/2)`` (rotate-half layout, as Hugging Face Llama)."""
    inv = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[..., None] * inv
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, L, D]`` by ``cos, sin [B, L, D]``."""
    a, b = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-b, a), dim=-1) * sin[:, None]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class StaticKVCache(nn.Module):
    """LlamaGen's preallocated full-length cache: ``k, v [layers, B, Hkv, max_len, D]``; each sequence writes
    row ``t`` at its ``t``-th position and attention is SDPA over all ``max_len`` rows under a boolean mask
    (rows written so far whose ``keep`` flag is set, plus the current row). Same interface as
    :class:`fastvq.nn.CompressedKVCache`; memory and time grow with ``max_len`` whatever is kept."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.num_layers, self.batch_size, self.max_len = num_layers, batch_size, max_len
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(num_layers, batch_size, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("visible", torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
                             persistent=False)

    def prefill(self, layer: int, k: Tensor, v: Tensor, keep: Tensor) -> None:
        """Rows ``l`` of ``k, v [B, Hkv, L, D]`` where ``keep [B, L]``... are written at rows ``lengths + l`` (all of
        them, as LlamaGen does; only kept rows become visible). ``keep`` must be a prefix per sequence for
        rows past a sequence's end (padding); the length grows by the last kept row + 1."""
        L = k.shape[2]
        n = self.lengths[layer]
        if bool((n != n[0]).any()):
            raise ValueError("StaticKVCache.prefill: every sequence must start at the same length")
        s = int(n[0])
        if s + L > self.max_len:
            raise ValueError(f"StaticKVCache.prefill: {s + L} rows exceed max_len {self.max_len}")
        self.k[layer, :, :, s:s + L] = k
        self.v[layer, :, :, s:s + L] = v
        idx = torch.arange(L, device=keep.device)
        last = torch.where(keep, idx + 1, torch.zeros_like(idx)).amax(1) if L else torch.zeros_like(n)
        self.lengths[layer] = n + last
        if layer == 0:
            self.visible[:, s:s + L] = keep

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, *, scale: float | None = None) -> Tensor:
        """One decode step: write ``k, v [B, Hkv, D]`` at each sequence's next row, attend ``q [B, Hq, D]`` to
        the visible rows and itself; the row stays visible where ``keep [B]``. Returns ``[B, Hq, D]``."""
        n = self.lengths[layer]
        if bool((n >= self.max_len).any()):
            raise ValueError(f"StaticKVCache.attend: the cache is full (max_len {self.max_len})")
        b = torch.arange(self.batch_size, device=q.device)
        self.k[layer, b, :, n] = k
        self.v[layer, b, :, n] = v
        rows = torch.arange(self.max_len, device=q.device)
        if layer == 0:
            self.visible[b, n] = keep
        mask = (self.visible & (rows < n[:, None])) | (rows == n[:, None])  # [B, max_len]
        self.lengths[layer] = n + 1
        out = F.scaled_dot_product_attention(q[:, :, None], self.k[layer], self.v[layer], attn_mask=mask[:, None, None],
                                             scale=scale, enable_gqa=True)
        return out[:, :, 0]

    def reset(self) -> None:
        self.lengths.zero_()
        self.visible.zero_()

    def memory_stats(self) -> dict:
        kv = self.k.numel() * self.k.element_size() * 2
        return {"kv_allocated": kv, "kv_used": kv}


def _prefill_compressed(cache: CompressedKVCache, layer: int, k: Tensor, v: Tensor, keep: Tensor,
                        positions: Tensor) -> None:
    """Append the rows of ``k, v [B, Hkv, L, D]`` where ``keep [B, L]`` to ``cache`` (compacted, in order)."""
    b_idx, l_idx = keep.nonzero(as_tuple=True)
    n = cache.lengths[layer].long()
    dest = (keep.long().cumsum(1) - 1)[b_idx, l_idx] + n[b_idx]
    if dest.numel() and int(dest.max()) >= cache.capacity - 1:
        raise ValueError(f"prefill: {int(dest.max()) + 1} kept rows exceed the cache's max_kept {cache.max_kept}")
    cache.k[layer, b_idx, :, dest] = k[b_idx, :, l_idx].to(cache.k.dtype)
    cache.v[layer, b_idx, :, dest] = v[b_idx, :, l_idx].to(cache.v.dtype)
    cache.lengths[layer] += keep.sum(1).to(cache.lengths.dtype)
    if layer == 0:
        cache.positions[b_idx, dest] = positions[b_idx, l_idx]
        cache.steps += k.shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.h, self.hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, self.h * self.hd, bias=False)
        self.wk = nn.Linear(cfg.dim, self.hkv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.dim, self.hkv * self.hd, bias=False)
        self.wo = nn.Linear(self.h * self.hd, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, layer: int, cache=None,
                keep: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.h, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, L, self.hkv, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, L, self.hkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if isinstance(cache, CompressedKVCache):
                _prefill_compressed(cache, layer, k, v, keep, positions)
            else:
                cache.prefill(layer, k, v, keep)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, L, -1))

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, cache, keep: Tensor) -> Tensor:
        B = x.shape[0]
        q = self.wq(x).view(B, 1, self.h, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, 1, self.hkv, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, 1, self.hkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin)[:, :, 0], apply_rope(k, cos, sin)[:, :, 0]
        dt = cache.k.dtype
        o = cache.attend(layer, q.to(dt).contiguous(), k.to(dt).contiguous(), v[:, :, 0].to(dt).contiguous(), keep)
        return self.wo(o.to(x.dtype).reshape(B, -1))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_dim)


class Decoder(nn.Module):
    """Pre-norm LLaMA blocks over embeddings ``[B, L, dim]``; the output is normed (the final RMSNorm), ready for
    whatever head the caller owns."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # rotary tables of every position < max_seq_len (fp32, the values rope_cos_sin gives), gathered by
        # Decoder.step instead of recomputed at every step; non-persistent (not in the state dict)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._build_rope(None)

    def _build_rope(self, device) -> None:
        cfg = self.config
        pos = torch.arange(cfg.max_seq_len, device=device)
        self.rope_cos, self.rope_sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would round the tables; rebuild them in fp32 on the new device instead (the step
        # casts the gathered rows to the activations' dtype, as rope_cos_sin(..., dtype) does)
        super()._apply(fn, recurse)
        self._build_rope(self.rope_cos.device)
        return self

    def _check(self, h: Tensor, positions: Tensor, who: str) -> None:
        if h.dim() != 3 or h.shape[-1] != self.config.dim:
            raise ValueError(f"Decoder.{who}: h must be [B, L, {self.config.dim}], got {list(h.shape)}")
        if positions.shape != h.shape[:2] or positions.dtype != torch.long:
            raise ValueError(f"Decoder.{who}: positions must be int64 [B, L] = {list(h.shape[:2])}, got "
                             f"{positions.dtype} {list(positions.shape)}")
        # a data-dependent check: skipped inside torch.compile graphs (positions come from the caller there)
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"Decoder.{who}: position {int(positions.max())} is past max_seq_len "
                             f"{self.config.max_seq_len}")

    def forward(self, h: Tensor, positions: Tensor, mask: Tensor | None = None, *, cache=None,
                keep: Tensor | None = None) -> Tensor:
        """``h [B, L, dim]``, ``positions [B, L]`` int64, ``mask`` bool ``[B, L, L]`` (True = attend; ``None``:
        causal) -> normed hidden states ``[B, L, dim]``. With ``cache``, every layer's keys and values of the
        rows where ``keep [B, L]`` (default all) are appended to it (prefill)."""
        self._check(h, positions, "forward")
        if cache is not None and keep is None:
            keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        for i, blk in enumerate(self.layers):
            h = h + blk.attention(blk.attention_norm(h), cos, sin, mask, i, cache, keep, positions)
            h = h + blk.feed_forward(blk.ffn_norm(h))
        return self.norm(h)

    def step(self, h: Tensor, positions: Tensor, cache, keep: Tensor | None = None, *, check: bool = True) -> Tensor:
        """One decode step: ``h [B, dim]`` at ``positions [B]`` attends to the cache and itself; its keys and values
        stay in the cache where ``keep [B]`` (default all). Returns the normed hidden state ``[B, dim]``.
        ``check=False`` skips the data-dependent check ``0 <= positions < max_seq_len`` (a host sync per step):
        for loops that checked their position range once (the shape checks stay)."""
        if check:
            self._check(h[:, None], positions[:, None], "step")
            if positions.numel() and int(positions.min()) < 0:
                raise ValueError(f"Decoder.step: positions must be >= 0, got {int(positions.min())}")
        elif h.dim() != 2 or positions.shape != h.shape[:1]:
            raise ValueError(f"Decoder.step: h must be [B, dim] and positions [B], got {list(h.shape)} and "
                             f"{list(positions.shape)}")
        if keep is None:
            keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        cos = self.rope_cos[positions][:, None].to(h.dtype)                  # [B, 1, head_dim]
        sin = self.rope_sin[positions][:, None].to(h.dtype)
        for i, blk in enumerate(self.layers):
            h = h + blk.attention.step(blk.attention_norm(h), cos, sin, i, cache, keep)
            h = h + blk.feed_forward(blk.ffn_norm(h))
        return self.norm(h)


def init_weights(m: nn.Module) -> None:
    """GPT-2 / LlamaGen initialisation, for ``model.apply``: linear and embedding weights N(0, 0.02), biases zero."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


def new_cache(cfg: DecoderConfig, batch_size: int, rows: int, kind: str = "fastvq", *,
              dtype: torch.dtype = torch.float32, device=None):
    """A cache for ``batch_size`` sequences: ``kind="fastvq"`` a :class:`CompressedKVCache` holding up to ``rows``
    kept rows per sequence; ``"static"`` a :class:`StaticKVCache` of ``rows`` positions."""
    if kind == "fastvq":
        return CompressedKVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, rows, dtype=dtype,
                                 device=device)
    if kind == "static":
        return StaticKVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, rows, dtype=dtype,
                             device=device)
    raise ValueError(f"new_cache: kind must be 'fastvq' or 'static', got {kind!r}")


# fastvq Block parameter -> Hugging Face LlamaDecoderLayer parameter (the one place the two namings meet)
HF_LLAMA_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


@torch.no_grad()
def copy_llama_weights(dec: Decoder, hf_base: nn.Module, to_hf: bool) -> None:
    """Copy the block and final-norm weights between ``dec`` and a Hugging Face ``LlamaModel`` ``hf_base`` of the
    same shape: into ``hf_base`` when ``to_hf``, else into ``dec`` (:data:`HF_LLAMA_NAMES`)."""
    for blk, layer in zip(dec.layers, hf_base.layers, strict=True):
        ours, theirs = blk.state_dict(keep_vars=True), layer.state_dict(keep_vars=True)
        for a, b in HF_LLAMA_NAMES.items():
            dst, src = (theirs[b], ours[a]) if to_hf else (ours[a], theirs[b])
            dst.copy_(src)
    dst, src = (hf_base.norm.weight, dec.norm.weight) if to_hf else (dec.norm.weight, hf_base.norm.weight)
    dst.copy_(src)


def decoder_from_hf(model) -> tuple[Decoder, nn.Module, nn.Module | None]:
    """A Hugging Face ``LlamaForCausalLM`` (or ``LlamaModel``) -> ``(Decoder, embed_tokens, lm_head)`` with its
    weights (copied; HF's rotate-half RoPE is fastvq's). Rope scaling other than none is refused."""
    hf_cfg = model.config
    rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"decoder_from_hf: rope scaling {rope} is not supported (only the default rotary)")
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        raise ValueError("decoder_from_hf: attention_bias / mlp_bias Llama variants are not supported")
    theta = rope.get("rope_theta") or getattr(hf_cfg, "rope_theta", None) or 10000.0
    cfg = DecoderConfig(dim=hf_cfg.hidden_size, num_layers=hf_cfg.num_hidden_layers, num_heads=hf_cfg.num_attention_heads,
                        num_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
                        hidden_dim=hf_cfg.intermediate_size, max_seq_len=hf_cfg.max_position_embeddings,
                        rope_theta=float(theta), norm_eps=hf_cfg.rms_norm_eps)
    if getattr(hf_cfg, "head_dim", None) not in (None, cfg.head_dim):
        raise ValueError(f"decoder_from_hf: head_dim {hf_cfg.head_dim} != hidden_size / heads {cfg.head_dim}")
    base = model.model if hasattr(model, "model") else model
    dec = Decoder(cfg)
    with torch.no_grad():
        copy_llama_weights(dec, base, to_hf=False)
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"decoder_from_hf: hidden_act {hf_cfg.hidden_act!r} (fastvq's SwiGLU is silu)")
    dec.norm.eps = hf_cfg.rms_norm_eps
    embed = nn.Embedding.from_pretrained(base.embed_tokens.weight.detach().clone(), freeze=False)
    head = None
    if hasattr(model, "lm_head"):
        head = nn.Linear(cfg.dim, model.lm_head.weight.shape[0], bias=False)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
    return dec.to(base.embed_tokens.weight.dtype), embed, head
