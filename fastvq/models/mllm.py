"""The unified MLLM: one LLaMA decoder that reads and writes discrete visual tokens (docs/mllm.md).

UniTok's MLLM (Liquid on Llama-2) is the reference design; LlamaGen gives the generation loop::

    text ids ──────────── text embedding ───────┐
    codes [B, L, G] ─ adapter ────────────────── one sequence ─ Decoder (fastvq.models.llm) ─ hidden [B, T, dim]
        "mcq":  sub-code embeddings concatenated [B, L, G·e] → causal AttnProjection → LN-Linear-GELU-Linear
        "bits": per-group embeddings summed → dim
    hidden at a text position  ─ text head  ─ next text token
    hidden before image pos i  ─ depth head ─ sub-codes v_i,0 .. v_i,G-1 in order:
        a depth_layers-layer Llama decoder over the depth axis, input 0 = the LLM hidden state, input g = an embedding
        of sub-code g-1; output g → logits of sub-code g (one head shared by the groups when they have one size,
        UniTok's MCQ; one head per group otherwise: the factorised group heads of LFQ / binary codes, MergeVQ's
        6 + 12 bits)

Sequence layouts (one format, one loss; ``collate``)::

    t2i       [bos] prompt [boi] v_1 .. v_L [eoi]                       loss: v_1..v_L (image), eoi (text)
    caption   [bos] [boi] v_1 .. v_L [eoi] answer [eos]                 loss: answer, eos (text)
    qa        [bos] [boi] v_1 .. v_L [eoi] question answer [eos]         loss: answer, eos (text)

The loss is ``text_loss + image_loss + z_loss_weight · z_loss`` (cross-entropies over the supervised positions only;
``z_loss`` = mean squared log-partition of every supervised logit row, PaLM's). In training (``model.train()``) a
t2i prompt is dropped with probability ``cfg_dropout`` (classifier-free guidance).

Generation (:meth:`MLLM.generate_images`): the prompts are prefilled into a KV cache (``Decoder.forward(cache=)``) and
each image position is one ``Decoder.step``; ``cache="fastvq"`` is fastvq's :class:`~fastvq.nn.CompressedKVCache`
(the ``decode_step`` op: attention over each sequence's ragged valid prefix, in-place append), ``"static"`` the
LlamaGen full-length cache with a mask. CFG doubles the batch with the unconditional prompt ``[bos] [boi]`` and
combines ``uncond + s · (cond - uncond)`` at every depth step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.models.blocks import AttnProjection
from fastvq.models.llm import Decoder, DecoderConfig, decoder_from_hf, init_weights, new_cache
from fastvq.models.text import VOCAB_NAME, TextTokenizer
from fastvq.models.tokenizer import load_weights_strict

__all__ = ["VisualCodec", "MLLMConfig", "MLLM", "register_mllm_preset", "list_mllm_presets", "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
IGNORE = -100  # text targets that carry no loss


# ---- visual code layout ----------------------------------------------------------------------------------------

def _config_hash(tok) -> str:
    from fastvq.models.tokenizer import config_to_dict
    blob = json.dumps(config_to_dict(tok.config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class VisualCodec:
    """The canonical layout of one tokenizer's codes for the MLLM: int64 ``[B, L, G]``, ``L`` raster positions,
    sub-code ``g`` in ``[0, group_sizes[g])``.

    ``kind`` "mcq" (UniTok's codebooks, VQGAN / VQRAE's single codebook: G = 1) or "bits" (UniWeTok's groups of
    bits, MergeVQ's LFQ index factorised into ``bits_split`` groups, **low bits first**: 18 bits -> group 0 = the low
    6 bits, group 1 = the high 12). ``tokenizer`` / ``config_hash`` name the tokenizer the codes come from
    (:meth:`MLLM.check_tokenizer`); ``keep`` is MergeVQ's merged token count for ``encode`` (0: its default)."""
    kind: str
    group_sizes: tuple[int, ...]
    grid: tuple[int, int]
    tokenizer: str = ""
    config_hash: str = ""
    bits_split: tuple[int, ...] = ()
    keep: int = 0

    def __post_init__(self):
        object.__setattr__(self, "group_sizes", tuple(int(g) for g in self.group_sizes))
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "bits_split", tuple(int(g) for g in self.bits_split))
        if self.kind not in ("mcq", "bits"):
            raise ValueError(f"VisualCodec: kind must be 'mcq' or 'bits', got {self.kind!r}")
        if not self.group_sizes or min(self.group_sizes) < 2:
            raise ValueError(f"VisualCodec: group_sizes must be a non-empty tuple of sizes >= 2, got "
                             f"{self.group_sizes}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"VisualCodec: grid must be (h, w) >= 1, got {self.grid}")

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | VisualCodec) -> VisualCodec:
        if isinstance(data, VisualCodec):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"VisualCodec.from_dict: expected a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"VisualCodec.from_dict: unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def from_tokenizer(cls, tok, keep: int | None = None) -> VisualCodec:
        """The layout of a fastvq tokenizer (``tok.config``): UniTok G = num_codebooks × codebook_size ("mcq");
        UniWeTok G = code_bits / group_bits groups of 2^group_bits ("bits"); MergeVQ the full h·w grid, each
        position carrying its merge group's LFQ code split into ``(b // 3, b - b // 3)`` bits (18 -> 6 + 12, low
        first; "bits"); VQGAN / VQRAE G = 1 ("mcq")."""
        name, cfg = getattr(tok, "model_name", ""), getattr(tok, "config", None)
        if cfg is None:
            raise ValueError(f"VisualCodec.from_tokenizer: {type(tok).__name__} is not a fastvq tokenizer (no config)")
        side = cfg.image_size // cfg.downsample
        grid, common = (side, side), {"tokenizer": name, "config_hash": _config_hash(tok)}
        if name == "unitok":
            return cls("mcq", (cfg.codebook_size,) * cfg.num_codebooks, grid, **common)
        if name == "uniwetok":
            return cls("bits", (2 ** cfg.group_bits,) * (cfg.code_bits // cfg.group_bits), grid, **common)
        if name in ("vqgan", "vqrae"):
            return cls("mcq", (cfg.codebook_size,), grid, **common)
        if name == "mergevq":
            b = cfg.code_bits
            split = (b // 3, b - b // 3)
            return cls("bits", tuple(2 ** s for s in split), grid, bits_split=split, keep=int(keep or 0), **common)
        raise ValueError(f"VisualCodec.from_tokenizer: unknown tokenizer model {name!r} "
                         "(known: unitok, uniwetok, mergevq, vqgan, vqrae)")

    def check_codes(self, codes: Tensor, who: str) -> None:
        """``codes`` must be int64 ``[B, L, G]`` with every sub-code in range (ValueError naming ``who``)."""
        L, G = self.num_positions, self.num_groups
        if not isinstance(codes, Tensor) or codes.dtype != torch.int64 or codes.dim() != 3 or codes.shape[1:] != (L, G):
            shape = list(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            dt = codes.dtype if isinstance(codes, Tensor) else ""
            raise ValueError(f"{who}: codes must be int64 [B, L={L}, G={G}], got {dt} {shape}")
        if codes.numel():
            sizes = torch.tensor(self.group_sizes, device=codes.device)
            bad = (codes < 0) | (codes >= sizes)
            if bool(bad.any()):
                b, l, g = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"{who}: codes[{b}, {l}, {g}] = {int(codes[b, l, g])} is outside "
                                 f"[0, {self.group_sizes[g]}) (an unknown code)")

    # ---- tokenizer round trip ----

    def _check_tok(self, tok, who: str) -> None:
        if getattr(tok, "model_name", "") != self.tokenizer:
            raise ValueError(f"{who}: this codec is for a {self.tokenizer!r} tokenizer, got "
                             f"{getattr(tok, 'model_name', tok)!r}")

    @torch.no_grad()
    def encode_with_extras(self, tok, images: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """``images [B, C, H, W]`` in [-1, 1] -> ``(codes [B, L, G] int64, extras)`` (MergeVQ's extras hold the
        source map needed to decode the kept tokens exactly)."""
        who = "VisualCodec.encode"
        self._check_tok(tok, who)
        if self.tokenizer == "mergevq":
            out = tok.encode(images, keep=self.keep or None)
            full = out.indices.gather(1, out.extras["source"])                     # [B, N]: each position's code
            lo = self.bits_split[0]
            codes = torch.stack((full & (2 ** lo - 1), full >> lo), dim=-1)
            return codes, out.extras
        out = tok.encode(images)
        idx = out.indices
        codes = idx.reshape(idx.shape[0], self.num_positions, -1)
        return codes, out.extras

    def encode(self, tok, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` in [-1, 1] -> codes ``[B, L, G]`` int64."""
        return self.encode_with_extras(tok, images)[0]

    @torch.no_grad()
    def decode(self, tok, codes: Tensor, extras: dict[str, Any] | None = None) -> Tensor:
        """codes ``[B, L, G]`` -> images ``[B, C, H, W]`` (not clamped). MergeVQ: with ``extras["source"]`` the
        code of each merge group's first position is decoded with that source map; without (generated codes),
        every position is its own token (``source = arange(L)``)."""
        who = "VisualCodec.decode"
        self._check_tok(tok, who)
        self.check_codes(codes, who)
        B, (h, w) = codes.shape[0], self.grid
        if self.tokenizer == "unitok":
            return tok.decode_indices(codes.reshape(B, h, w, -1))
        if self.tokenizer == "uniwetok":
            return tok.decode_indices(codes)
        if self.tokenizer in ("vqgan", "vqrae"):
            return tok.decode_indices(codes.reshape(B, h, w))
        if self.tokenizer == "mergevq":
            full = codes[..., 0] | (codes[..., 1] << self.bits_split[0])         # [B, N]
            source = (extras or {}).get("source")
            if source is None:
                source = torch.arange(h * w, device=codes.device).expand(B, -1).contiguous()
                indices = full
            else:
                from fastvq.nn import first_occurrence
                K = int(source.max()) + 1
                first = first_occurrence(source)
                indices = torch.zeros(B, K, dtype=torch.int64, device=codes.device)
                b_idx, p_idx = first.nonzero(as_tuple=True)
                indices[b_idx, source[b_idx, p_idx]] = full[b_idx, p_idx]
            return tok.decode_indices(indices, {"source": source, "grid": (h, w)})
        raise ValueError(f"{who}: unknown tokenizer {self.tokenizer!r}")


# ---- config and presets ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MLLMConfig:
    """The MLLM: a LLaMA decoder (``dim`` ... ``norm_eps``, as :class:`~fastvq.models.llm.DecoderConfig`), the text
    vocabulary size, the visual ``codec`` (a :class:`VisualCodec` dict), the input ``adapter`` ("mcq" / "bits"; ""
    = the codec's kind) with ``code_dim`` per sub-code embedding and ``proj_heads`` (mcq's attention projection),
    the depth head (``depth_layers`` Llama layers, 0 = the heads read the LLM hidden state directly), the loss
    (``z_loss_weight``), CFG prompt dropout ``cfg_dropout``, and ``max_text_len`` (text pieces kept per prompt,
    question or answer). ``max_seq_len`` must hold the longest layout, ``L + 2·max_text_len + 4``."""
    text_vocab_size: int = 0
    codec: dict = field(default_factory=dict)
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    hidden_dim: int = 0
    multiple_of: int = 32
    max_seq_len: int = 0   # 0: L + 2·max_text_len + 4
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    depth_layers: int = 3
    adapter: str = ""
    code_dim: int = 32
    proj_heads: int = 4
    z_loss_weight: float = 1e-4
    cfg_dropout: float = 0.1
    max_text_len: int = 32

    def __post_init__(self):
        who = "MLLMConfig"
        codec = VisualCodec.from_dict(self.codec) if self.codec else None
        if codec is None:
            raise ValueError(f"{who}: codec is required (VisualCodec.from_tokenizer(tok).to_dict())")
        object.__setattr__(self, "codec", codec.to_dict())
        if not self.adapter:
            object.__setattr__(self, "adapter", codec.kind)
        if self.adapter not in ("mcq", "bits"):
            raise ValueError(f"{who}: adapter must be 'mcq' or 'bits', got {self.adapter!r}")
        if self.text_vocab_size < 7:
            raise ValueError(f"{who}: text_vocab_size must be >= 7 (6 specials + a piece), got {self.text_vocab_size}")
        need = codec.num_positions + 2 * self.max_text_len + 4
        if not self.max_seq_len:
            object.__setattr__(self, "max_seq_len", need)
        if self.max_seq_len < need:
            raise ValueError(f"{who}: max_seq_len {self.max_seq_len} cannot hold L + 2·max_text_len + 4 = {need}")
        for name in ("depth_layers", "max_text_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{who}: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_text_len < 1:
            raise ValueError(f"{who}: max_text_len must be >= 1, got {self.max_text_len}")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"{who}: cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        if self.code_dim < 1 or (codec.num_groups * self.code_dim) % self.proj_heads:
            raise ValueError(f"{who}: G·code_dim = {codec.num_groups * self.code_dim} must be divisible by proj_heads "
                             f"{self.proj_heads}")
        self.decoder_config()  # validates the decoder fields

    @property
    def visual(self) -> VisualCodec:
        return VisualCodec.from_dict(self.codec)

    def decoder_config(self, num_layers: int | None = None, max_seq_len: int | None = None) -> DecoderConfig:
        return DecoderConfig(dim=self.dim, num_layers=self.num_layers if num_layers is None else num_layers,
                             num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, hidden_dim=self.hidden_dim,
                             multiple_of=self.multiple_of, max_seq_len=max_seq_len or self.max_seq_len,
                             rope_theta=self.rope_theta, norm_eps=self.norm_eps)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], who: str = "MLLMConfig.from_dict") -> MLLMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{who}: unknown MLLMConfig fields {unknown}")
        return cls(**data)


_PRESETS: dict[str, dict[str, Any]] = {}


def register_mllm_preset(name: str, **fields) -> None:
    """Register MLLMConfig fields (without ``text_vocab_size`` / ``codec``, given at build time) as ``name``."""
    bad = sorted(set(fields) - {f.name for f in dataclasses.fields(MLLMConfig)})
    if bad:
        raise ValueError(f"register_mllm_preset({name!r}): unknown MLLMConfig fields {bad}")
    _PRESETS[name] = dict(fields)


def list_mllm_presets() -> list[str]:
    return sorted(_PRESETS)


# CPU-sized: a training step of a batch of 8 unitok-tiny sequences takes well under a second on one thread.
register_mllm_preset("mllm-tiny", dim=128, num_layers=2, num_heads=4, num_kv_heads=2, depth_layers=3, code_dim=32,
                     proj_heads=4, max_text_len=24)
# The benchmark size (benchmarks/bench_mllm.py, docs/mllm.md "Speed").
register_mllm_preset("mllm-small", dim=512, num_layers=8, num_heads=8, num_kv_heads=4, depth_layers=3, code_dim=64,
                     proj_heads=8, max_text_len=32)


# ---- sampling --------------------------------------------------------------------------------------------------

def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """``logits [B, K]`` -> token ids ``[B]`` int64: argmax when ``temperature == 0``; otherwise softmax of
    ``logits / temperature`` restricted to the ``top_k`` largest (0: all) and to the smallest set whose probability
    reaches ``top_p`` (nucleus; the top token always stays), sampled with ``generator``."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p    # the mass before this token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _check_sampling(who: str, temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"{who}: temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"{who}: top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{who}: top_p must be in (0, 1], got {top_p}")


# ---- the model -------------------------------------------------------------------------------------------------

class McqAdapter(nn.Module):
    """UniTok / Liquid's input side for MCQ codes: ``codes [B, L, G] → [B, L, dim]``: sub-code embeddings
    concatenated (``[B, L, G·code_dim]``), a causal :class:`~fastvq.models.blocks.AttnProjection` over the L
    positions, then the MLP LayerNorm → Linear → GELU → Linear into the LLM width. Position ``i``'s output depends
    on positions ``≤ i`` only, so generation runs it incrementally (:meth:`step`, with its own small KV cache)."""

    def __init__(self, group_sizes: tuple[int, ...], code_dim: int, heads: int, dim: int):
        super().__init__()
        width = len(group_sizes) * code_dim
        self.register_buffer("offsets", torch.tensor((0,) + tuple(group_sizes[:-1])).cumsum(0), persistent=False)
        self.embed = nn.Embedding(sum(group_sizes), code_dim)
        self.proj = AttnProjection(width, width, heads, causal=True)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))

    def embed_codes(self, codes: Tensor) -> Tensor:
        return self.embed(codes + self.offsets).flatten(-2)              # [..., G·code_dim]

    def forward(self, codes: Tensor) -> Tensor:
        return self.mlp(self.proj(self.embed_codes(codes)))

    def new_state(self, batch_size: int, length: int, dtype: torch.dtype, device) -> dict[str, Any]:
        """The incremental state: the attention's keys and values of the positions so far."""
        a = self.proj.attn
        shape = (batch_size, a.num_heads, length, a.head_dim)
        return {"k": torch.empty(shape, dtype=dtype, device=device),
                "v": torch.empty(shape, dtype=dtype, device=device), "n": 0,
                "qkv_bias": torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))}

    def step(self, codes: Tensor, state: dict[str, Any]) -> Tensor:
        """``codes [B, G]`` of the next position -> its embedding ``[B, dim]``; equals ``forward`` on all positions
        so far, at the last one."""
        p, a = self.proj, self.proj.attn
        x = self.embed_codes(codes)[:, None]                               # [B, 1, width]
        B, n = x.shape[0], state["n"]
        bias = state.get("qkv_bias")
        if bias is None:
            bias = torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))
        q, k, v = F.linear(p.norm1(x), a.qkv.weight, bias).view(B, 1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        state["k"][:, :, n:n + 1], state["v"][:, :, n:n + 1] = k, v
        state["n"] = n + 1
        o = F.scaled_dot_product_attention(q, state["k"][:, :, :n + 1], state["v"][:, :, :n + 1])  # [B, heads, 1, hd]
        if a.in_dim > a.out_dim:
            o = o.mean(dim=1)
            if a.head_dim != a.out_dim:
                o = F.adaptive_avg_pool1d(o, a.out_dim)
        else:
            o = o.transpose(1, 2).reshape(B, 1, a.out_dim)
        y = p.proj(p.norm3(x)) + a.proj(o)
        y = y + p.mlp(p.norm2(y))
        return self.mlp(y)[:, 0]


class BitsAdapter(nn.Module):
    """The input side for binary / LFQ codes: one embedding table per group, summed: ``codes [B, L, G] → [B, L, dim]``
    (per position; no state)."""

    def __init__(self, group_sizes: tuple[int, ...], dim: int):
        super().__init__()
        self.register_buffer("offsets", torch.tensor((0,) + tuple(group_sizes[:-1])).cumsum(0), persistent=False)
        self.embed = nn.Embedding(sum(group_sizes), dim)

    def forward(self, codes: Tensor) -> Tensor:
        return self.embed(codes + self.offsets).sum(-2)

    def new_state(self, batch_size: int, length: int, dtype: torch.dtype, device) -> dict[str, Any]:
        return {}

    def step(self, codes: Tensor, state: dict[str, Any]) -> Tensor:
        return self.forward(codes[:, None])[:, 0]


class DepthHead(nn.Module):
    """Predicts the G sub-codes of one position in order from the LLM hidden state ``h``: a ``layers``-layer Llama
    decoder over the depth axis (input 0 = ``h``, input g = the embedding of sub-code g-1; causal), output g →
    logits of sub-code g. ``shared``: one Linear to the common group size (UniTok's MCQ); else one Linear per group
    (factorised group heads, LFQ / binary codes). ``layers == 0``: the heads read ``h`` (and, for g > 0, ``h`` plus
    the embeddings of the earlier sub-codes, summed)."""

    def __init__(self, cfg: MLLMConfig, group_sizes: tuple[int, ...]):
        super().__init__()
        G = len(group_sizes)
        self.group_sizes = group_sizes
        self.shared = len(set(group_sizes)) == 1
        self.register_buffer("offsets", torch.tensor((0,) + tuple(group_sizes[:-1])).cumsum(0), persistent=False)
        self.embed = nn.Embedding(max(sum(group_sizes[:-1]), 1), cfg.dim)   # sub-codes 0..G-2
        self.decoder = Decoder(cfg.decoder_config(cfg.depth_layers, max(G, 1))) if cfg.depth_layers else None
        if self.shared:
            self.head = nn.Linear(cfg.dim, group_sizes[0], bias=False)
        else:
            self.heads = nn.ModuleList(nn.Linear(cfg.dim, k, bias=False) for k in group_sizes)

    def head_of(self, g: int) -> nn.Linear:
        return self.head if self.shared else self.heads[g]

    def inputs(self, h: Tensor, codes: Tensor) -> Tensor:
        """``h [N, dim]``, teacher codes ``[N, G]`` -> the depth sequence ``[N, G, dim]``."""
        e = self.embed(codes[:, :-1] + self.offsets[:-1])                 # [N, G-1, dim]
        if self.decoder is None:
            return h[:, None] + torch.cat((e.new_zeros(e.shape[0], 1, e.shape[2]), e), 1).cumsum(1)
        return torch.cat((h[:, None], e), dim=1)

    def run(self, x: Tensor) -> Tensor:
        """The depth decoder over ``x [N, j, dim]`` (causal) -> ``[N, j, dim]``."""
        if self.decoder is None:
            return x
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.decoder(x, pos)

    def forward(self, h: Tensor, codes: Tensor) -> list[Tensor]:
        """Teacher-forced: ``h [N, dim]``, ``codes [N, G]`` -> per group logits ``[N, K_g]``."""
        out = self.run(self.inputs(h, codes))
        if self.shared:
            logits = self.head(out)
            return list(logits.unbind(1))
        return [self.heads[g](out[:, g]) for g in range(len(self.group_sizes))]


class MLLM(nn.Module):
    """The unified MLLM (module docstring): ``collate`` builds a batch, ``forward(batch)`` returns the losses,
    ``generate_images`` / ``generate_text`` sample, ``save_pretrained`` / ``from_pretrained`` store it (JSON +
    safetensors + the text vocabulary)."""

    model_name = "mllm"

    def __init__(self, config: MLLMConfig, text_tokenizer: TextTokenizer | None = None):
        super().__init__()
        if not isinstance(config, MLLMConfig):
            raise ValueError(f"MLLM: config must be an MLLMConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.codec = codec = config.visual
        self.text_tokenizer = None
        if text_tokenizer is not None:
            self.attach_text_tokenizer(text_tokenizer)
        self.text_embed = nn.Embedding(cfg.text_vocab_size, cfg.dim)
        if cfg.adapter == "mcq":
            self.adapter = McqAdapter(codec.group_sizes, cfg.code_dim, cfg.proj_heads, cfg.dim)
        else:
            self.adapter = BitsAdapter(codec.group_sizes, cfg.dim)
        self.decoder = Decoder(cfg.decoder_config())
        self.text_head = nn.Linear(cfg.dim, cfg.text_vocab_size, bias=False)
        self.depth = DepthHead(cfg, codec.group_sizes)
        self.apply(init_weights)

    def attach_text_tokenizer(self, tok: TextTokenizer) -> None:
        """Use ``tok`` for ``collate`` / generation; its vocabulary size must be the config's."""
        if not isinstance(tok, TextTokenizer):
            raise ValueError(f"MLLM.attach_text_tokenizer: expected a TextTokenizer, got {type(tok).__name__}")
        if tok.vocab_size != self.config.text_vocab_size:
            raise ValueError(f"MLLM.attach_text_tokenizer: the tokenizer has {tok.vocab_size} ids, the model "
                             f"text_vocab_size {self.config.text_vocab_size}")
        self.text_tokenizer = tok

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, text_vocab_size: int | None = None, codec=None,
                    text_tokenizer: TextTokenizer | None = None, **overrides) -> MLLM:
        """Build preset ``name`` (``list_mllm_presets()``) for a text vocabulary (``text_vocab_size``, or the given
        ``text_tokenizer``'s) and a ``codec`` (:class:`VisualCodec` or its dict); ``overrides`` replace fields."""
        if name not in _PRESETS:
            raise ValueError(f"MLLM.from_preset: unknown preset {name!r}; known: {list_mllm_presets()}")
        if text_vocab_size is None:
            if text_tokenizer is None:
                raise ValueError("MLLM.from_preset: give text_vocab_size or text_tokenizer")
            text_vocab_size = text_tokenizer.vocab_size
        if codec is None:
            raise ValueError("MLLM.from_preset: codec is required (VisualCodec.from_tokenizer(tok))")
        codec = VisualCodec.from_dict(codec).to_dict()
        fields = {**_PRESETS[name], **overrides, "text_vocab_size": text_vocab_size, "codec": codec}
        try:
            cfg = MLLMConfig(**fields)
        except TypeError as e:
            raise ValueError(f"MLLM.from_preset({name!r}): {e}") from None
        return cls(cfg, text_tokenizer)

    @classmethod
    def from_hf_backbone(cls, hf_model, *, codec, text_vocab_size: int | None = None,
                         text_tokenizer: TextTokenizer | None = None, **overrides) -> MLLM:
        """An MLLM whose LLM is a Hugging Face ``LlamaForCausalLM`` / ``LlamaModel`` (its weights copied through
        :func:`fastvq.models.llm.decoder_from_hf`; e.g. ``LlamaForCausalLM.from_pretrained(path)``). The text
        embeddings and head are copied too when the HF vocabulary has ``text_vocab_size`` ids (the same text
        tokenizer), else they are new (fastvq's pruned MiniLM vocabulary is not Llama's). ``max_seq_len`` is the HF
        ``max_position_embeddings`` unless overridden; the visual adapter and depth head are new."""
        dec, embed, head = decoder_from_hf(hf_model)
        d = dec.config
        if text_vocab_size is None:
            if text_tokenizer is None:
                raise ValueError("MLLM.from_hf_backbone: give text_vocab_size or text_tokenizer")
            text_vocab_size = text_tokenizer.vocab_size
        fields = dict(dim=d.dim, num_layers=d.num_layers, num_heads=d.num_heads, num_kv_heads=d.num_kv_heads,
                      hidden_dim=d.ffn_dim, max_seq_len=d.max_seq_len, rope_theta=d.rope_theta, norm_eps=d.norm_eps)
        fields.update(overrides)
        cfg = MLLMConfig(text_vocab_size=text_vocab_size, codec=VisualCodec.from_dict(codec).to_dict(), **fields)
        model = cls(cfg, text_tokenizer)
        model.decoder.load_state_dict(dec.state_dict())
        with torch.no_grad():
            if embed.weight.shape[0] == text_vocab_size:
                model.text_embed.weight.copy_(embed.weight)
                if head is not None:
                    model.text_head.weight.copy_(head.weight)
        return model.to(embed.weight.dtype)

    def check_tokenizer(self, tok) -> None:
        """Raise ValueError if the visual tokenizer ``tok`` is not the one this MLLM was built for (model name and
        config hash of :class:`VisualCodec`)."""
        mine = self.codec
        theirs = VisualCodec.from_tokenizer(tok, keep=mine.keep or None)
        if theirs != mine:
            diff = {k: (getattr(mine, k), getattr(theirs, k)) for k in mine.to_dict()
                    if getattr(mine, k) != getattr(theirs, k)}
            raise ValueError("MLLM.check_tokenizer: the tokenizer does not match the one this MLLM was built for: "
                             + ", ".join(f"{k} {a!r} (model) != {b!r} (tokenizer)" for k, (a, b) in diff.items()))

    # ---- batches -----------------------------------------------------------------------------------------------

    def _text_ids(self, text: str, who: str, what: str, truncate: bool = True) -> list[int]:
        if self.text_tokenizer is None:
            raise ValueError(f"{who}: no text tokenizer attached (MLLM(config, text_tokenizer) or "
                             "attach_text_tokenizer)")
        if not isinstance(text, str):
            raise ValueError(f"{who}: {what} must be a str, got {type(text).__name__}")
        ids = self.text_tokenizer.encode(text)
        if not ids:
            raise ValueError(f"{who}: {what} is empty")
        if len(ids) > self.config.max_text_len:
            if not truncate:
                raise ValueError(f"{who}: {what} has {len(ids)} text tokens, more than max_text_len "
                                 f"{self.config.max_text_len} (the context holds {self.config.max_seq_len} positions)")
            ids = ids[:self.config.max_text_len]
        return ids

    def collate(self, codes: Tensor, texts: list[str], task: str, questions: list[str] | None = None, *,
                generator: torch.Generator | None = None, drop_prompt: Tensor | None = None) -> dict[str, Tensor]:
        """One training / evaluation batch (module docstring, "Sequence layouts").

        Args:
            codes: int64 ``[B, L, G]`` (``VisualCodec.encode``).
            texts: ``B`` strings: the prompts (t2i) or the answers (caption, qa); truncated to ``max_text_len``
                pieces.
            task: "t2i" | "caption" | "qa"; questions: ``B`` strings for "qa".
            generator: the RNG of the CFG prompt dropout (t2i in training mode, probability ``cfg_dropout``).
            drop_prompt: bool ``[B]``, drop these prompts (overrides the random draw; e.g. unconditional rows).

        Returns a dict: ``input_ids [B, T]`` (text ids; pad at image positions and after the end), ``codes [B, L, G]``,
        ``image_start [B]`` (position of v_1), ``positions [B, T]``, ``text_targets [B, T]`` (the next token where
        it carries loss, else -100), ``image_mask [B]`` (the image carries loss), ``lengths [B]``, ``dropped [B]``.
        """
        who = "MLLM.collate"
        if task not in ("t2i", "caption", "qa"):
            raise ValueError(f"{who}: task must be 't2i', 'caption' or 'qa', got {task!r}")
        self.codec.check_codes(codes, who)
        B, L = codes.shape[0], codes.shape[1]
        if isinstance(texts, str) or len(texts) != B:
            raise ValueError(f"{who}: texts must be a list of B={B} str, got {type(texts).__name__} of "
                             f"{len(texts) if not isinstance(texts, str) else 'a str'}")
        if task == "qa":
            if questions is None or isinstance(questions, str) or len(questions) != B:
                raise ValueError(f"{who}: task 'qa' needs questions, a list of B={B} str")
        elif questions is not None:
            raise ValueError(f"{who}: questions are only for task 'qa'")
        if drop_prompt is None:
            drop_prompt = torch.zeros(B, dtype=torch.bool)
            if task == "t2i" and self.training and self.config.cfg_dropout > 0:
                drop_prompt = torch.rand(B, generator=generator) < self.config.cfg_dropout
        drop_prompt = torch.as_tensor(drop_prompt, dtype=torch.bool).cpu()
        if drop_prompt.shape != (B,):
            raise ValueError(f"{who}: drop_prompt must be bool [B={B}], got {list(drop_prompt.shape)}")
        tk = self.text_tokenizer
        seqs, starts, targets = [], [], []
        for b in range(B):
            text = self._text_ids(texts[b], who, f"texts[{b}]")
            if task == "t2i":
                prompt = [] if bool(drop_prompt[b]) else text
                pre = [tk.bos_id] + prompt + [tk.boi_id]
                seq = pre + [tk.pad_id] * L + [tk.eoi_id]
                sup = {len(seq) - 1}                                    # eoi
            else:
                q = self._text_ids(questions[b], who, f"questions[{b}]") if task == "qa" else []
                pre = [tk.bos_id, tk.boi_id]
                seq = pre + [tk.pad_id] * L + [tk.eoi_id] + q + text + [tk.eos_id]
                sup = set(range(len(seq) - len(text) - 1, len(seq)))    # answer + eos
            seqs.append(seq)
            starts.append(len(pre))
            targets.append(sup)
        T = max(len(s) for s in seqs)
        input_ids = torch.full((B, T), tk.pad_id, dtype=torch.long)
        text_targets = torch.full((B, T), IGNORE, dtype=torch.long)
        for b, (seq, sup) in enumerate(zip(seqs, targets)):
            input_ids[b, :len(seq)] = torch.tensor(seq)
            for t in sup:                                               # position t-1 predicts token t
                text_targets[b, t - 1] = seq[t]
        dev = codes.device
        return {"input_ids": input_ids.to(dev), "codes": codes, "image_start": torch.tensor(starts, device=dev),
                "positions": torch.arange(T, device=dev).expand(B, T).contiguous(),
                "text_targets": text_targets.to(dev),
                "image_mask": torch.full((B,), task == "t2i", dtype=torch.bool, device=dev),
                "lengths": torch.tensor([len(s) for s in seqs], device=dev), "dropped": drop_prompt.to(dev)}

    # ---- forward and loss --------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor, codes: Tensor | None = None, image_start: Tensor | None = None) -> Tensor:
        """``input_ids [B, T]`` -> ``[B, T, dim]``: text embeddings, with ``adapter(codes [B, L, G])`` placed at
        positions ``image_start[b] + l``."""
        h = self.text_embed(input_ids)
        if codes is None:
            return h
        img = self.adapter(codes)                                        # [B, L, dim]
        idx = (image_start[:, None] + torch.arange(codes.shape[1], device=codes.device))[..., None]
        return h.scatter(1, idx.expand(-1, -1, h.shape[-1]), img.to(h.dtype))

    def hidden_states(self, batch: dict[str, Tensor]) -> Tensor:
        """The LLM's (normed) hidden states ``[B, T, dim]`` of a ``collate`` batch (full causal forward)."""
        h = self.embed(batch["input_ids"], batch["codes"], batch["image_start"])
        return self.decoder(h, batch["positions"])

    def image_logits(self, batch: dict[str, Tensor], hidden: Tensor | None = None) -> list[Tensor]:
        """Teacher-forced image logits of every row: per group ``[B, L, K_g]`` (position l's sub-code g given the
        sequence before it and sub-codes < g)."""
        out = self.hidden_states(batch) if hidden is None else hidden
        codes = batch["codes"]
        B, L, G = codes.shape
        rows = (batch["image_start"][:, None] - 1 + torch.arange(L, device=codes.device))[..., None]
        hs = out.gather(1, rows.expand(-1, -1, out.shape[-1]))            # [B, L, dim]
        logits = self.depth(hs.reshape(B * L, -1), codes.reshape(B * L, G))
        return [lg.view(B, L, -1) for lg in logits]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Losses of a ``collate`` batch: ``loss`` (= ``text_loss + image_loss + z_loss_weight · z_loss``) and the
        unweighted ``text_loss``, ``image_loss``, ``z_loss`` (each 0 when nothing in the batch carries it)."""
        out = self.hidden_states(batch)
        zero = out.new_zeros(())
        lse = []
        targets = batch["text_targets"]
        sel = targets != IGNORE
        text_loss = zero
        if bool(sel.any()):
            tl = self.text_head(out[sel]).float()                        # [n, V]
            text_loss = F.cross_entropy(tl, targets[sel])
            lse.append(tl.logsumexp(-1))
        image_loss = zero
        m = batch["image_mask"]
        if bool(m.any()):
            sub = {k: batch[k][m] for k in ("codes", "image_start")}
            logits = self.image_logits(sub, out[m])
            codes = sub["codes"]
            ce = [F.cross_entropy(lg.flatten(0, 1).float(), codes[..., g].flatten()) for g, lg in enumerate(logits)]
            image_loss = torch.stack(ce).mean()
            lse += [lg.float().logsumexp(-1).flatten() for lg in logits]
        z_loss = torch.cat(lse).pow(2).mean() if lse else zero
        loss = text_loss + image_loss + self.config.z_loss_weight * z_loss
        return {"loss": loss, "text_loss": text_loss.detach(), "image_loss": image_loss.detach(),
                "z_loss": z_loss.detach()}

    # ---- generation --------------------------------------------------------------------------------------------

    def _prefill(self, seqs: list[list[int]], extra: int, cache: str, codes: Tensor | None = None,
                 image_start: Tensor | None = None):
        """Right-pad ``seqs``, prefill a new cache of ``extra`` more rows; returns (cache, last hidden [B, dim],
        next positions [B])."""
        dev = self.text_embed.weight.device
        B, P = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, P), self.text_tokenizer.pad_id if self.text_tokenizer else 0, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
        ids = ids.to(dev)
        lengths = torch.tensor([len(s) for s in seqs], device=dev)
        positions = torch.arange(P, device=dev).expand(B, P).contiguous()
        keep = positions < lengths[:, None]
        kv = new_cache(self.decoder.config, B, P + extra, cache, dtype=self.text_embed.weight.dtype, device=dev)
        h = self.embed(ids, codes, image_start)
        out = self.decoder(h, positions, cache=kv, keep=keep)
        return kv, out[torch.arange(B, device=dev), lengths - 1], lengths.clone()

    def _sample_position(self, h: Tensor, B: int, cfg_scale: float | None, sampling: dict, depth_cache=None) -> Tensor:
        """Sub-codes ``[B, G]`` of one image position from the LLM hidden states ``h [B or 2B, dim]`` (CFG combined at
        every depth step when the batch is doubled). ``depth_cache``: a KV cache of the depth decoder (reset here),
        so that depth step g runs one ``Decoder.step`` instead of a forward over the g + 1 inputs so far."""
        depth = self.depth
        G = len(depth.group_sizes)
        x, out_codes = h, []                                             # x: the depth input of step g, [N, dim]
        if depth_cache is not None:
            depth_cache.reset()
            pos = self._depth_positions(h.shape[0], G, h.device)           # [G, N]: positions g, built once
        else:
            seq = h[:, None]
        for g in range(G):
            if depth.decoder is None:
                y = x
            elif depth_cache is not None:  # g < G = the depth decoder's max_seq_len: no per-step position check
                y = depth.decoder.step(x, pos[g], depth_cache, check=False)
            else:
                y = depth.decoder(seq, torch.arange(g + 1, device=h.device).expand(h.shape[0], -1))[:, -1]
            logits = depth.head_of(g)(y).float()
            if cfg_scale is not None:
                c, u = logits[:B], logits[B:]
                logits = u + cfg_scale * (c - u)
            code = sample_logits(logits, **sampling)                     # [B]
            out_codes.append(code)
            if g + 1 < G:
                e = depth.embed(code + depth.offsets[g])                 # [B, dim]: both CFG halves share it
                if cfg_scale is not None:
                    e = torch.cat((e, e))
                x = x + e if depth.decoder is None else e
                if depth_cache is None and depth.decoder is not None:
                    seq = torch.cat((seq, x[:, None]), dim=1)
        return torch.stack(out_codes, dim=-1)

    def _depth_positions(self, N: int, G: int, device) -> Tensor:
        """``[G, N]`` int64, row g filled with g (the depth decoder's positions), cached per (N, G, device)."""
        key = (N, G, str(device))
        cached = getattr(self, "_depth_pos_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, torch.arange(G, device=device)[:, None].expand(G, N).contiguous())
            self._depth_pos_cache = cached
        return cached[1]

    @torch.inference_mode()
    def generate_images(self, prompts: list[str], cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, generator: torch.Generator | None = None, cache: str = "fastvq") -> Tensor:
        """Text-to-image: ``prompts`` (B non-empty strings) -> codes ``[B, L, G]`` int64.

        The prompts ``[bos] prompt [boi]`` (ragged lengths, right-padded, explicit positions) are prefilled into a
        ``cache`` ("fastvq": :class:`~fastvq.nn.CompressedKVCache` and ``decode_step``; "static": LlamaGen's
        full-length :class:`~fastvq.models.llm.StaticKVCache`), then each position is one ``Decoder.step``. CFG
        (``cfg_scale`` != 1): the batch is doubled with the unconditional prompt ``[bos] [boi]`` and the logits are
        ``uncond + cfg_scale · (cond - uncond)`` at every depth step. ``temperature == 0``: greedy."""
        who = "MLLM.generate_images"
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"{who}: prompts must be a non-empty list of str")
        _check_sampling(who, temperature, top_k, top_p)
        if cache not in ("fastvq", "static"):
            raise ValueError(f"{who}: cache must be 'fastvq' or 'static', got {cache!r}")
        tk, L = self.text_tokenizer, self.codec.num_positions
        seqs = [[tk.bos_id] + self._text_ids(p, who, f"prompts[{i}]", truncate=False) + [tk.boi_id]
                for i, p in enumerate(prompts)]
        for i, s in enumerate(seqs):
            if len(s) + L > self.config.max_seq_len:
                raise ValueError(f"{who}: prompts[{i}] needs {len(s) + L} positions, more than the context "
                                 f"max_seq_len {self.config.max_seq_len}")
        B = len(seqs)
        use_cfg = cfg_scale is not None and cfg_scale != 1.0
        if use_cfg:
            seqs = seqs + [[tk.bos_id, tk.boi_id]] * B
        kv, h, pos = self._prefill(seqs, L, cache)
        state = self.adapter.new_state(B, L, h.dtype, h.device)          # the halves share their codes
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        dcache = None
        if self.depth.decoder is not None:
            dcache = new_cache(self.depth.decoder.config, len(seqs), self.codec.num_groups, cache, dtype=h.dtype,
                               device=h.device)
        codes = torch.empty(B, L, self.codec.num_groups, dtype=torch.long, device=h.device)
        for i in range(L):
            code = self._sample_position(h, B, cfg_scale if use_cfg else None, sampling, dcache)
            codes[:, i] = code
            if i + 1 == L:
                break
            e = self.adapter.step(code, state)                             # [B, dim]
            # positions < len(prompt) + L <= max_seq_len (checked above): no per-step host sync
            h = self.decoder.step(torch.cat((e, e)) if use_cfg else e, pos, kv, check=False)
            pos = pos + 1
        return codes

    @torch.inference_mode()
    def generate_text(self, codes: Tensor, question: str | None = None, max_new_tokens: int = 32,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None, cache: str = "fastvq") -> list[str]:
        """Captioning / QA: ``codes [B, L, G]`` (and one ``question`` for every image, or None for a caption) ->
        ``B`` strings, each up to ``max_new_tokens`` pieces, ending at ``[eos]``. Greedy by default."""
        who = "MLLM.generate_text"
        self.codec.check_codes(codes, who)
        _check_sampling(who, temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"{who}: max_new_tokens must be >= 1, got {max_new_tokens}")
        if cache not in ("fastvq", "static"):
            raise ValueError(f"{who}: cache must be 'fastvq' or 'static', got {cache!r}")
        tk, (B, L, _) = self.text_tokenizer, codes.shape
        q = self._text_ids(question, who, "question", truncate=False) if question is not None else []
        if tk is None:
            raise ValueError(f"{who}: no text tokenizer attached")
        seq = [tk.bos_id, tk.boi_id] + [tk.pad_id] * L + [tk.eoi_id] + q
        if len(seq) + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"{who}: {len(seq)} prompt positions + max_new_tokens {max_new_tokens} exceed the "
                             f"context max_seq_len {self.config.max_seq_len}")
        dev = codes.device
        kv, h, pos = self._prefill([seq] * B, max_new_tokens, cache, codes, torch.full((B,), 2, device=dev))
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        out = torch.full((B, max_new_tokens), tk.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(max_new_tokens):
            tok = sample_logits(self.text_head(h).float(), **sampling)
            tok = torch.where(done, torch.full_like(tok, tk.pad_id), tok)
            out[:, t] = tok
            done |= tok == tk.eos_id
            if bool(done.all()) or t + 1 == max_new_tokens:
                break
            h = self.decoder.step(self.text_embed(tok), pos, kv, check=False)  # positions checked above
            pos = pos + 1
        return [tk.decode(row) for row in out.cpu()]

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` (``{"model": "mllm", "config": {...}}``), ``model.safetensors`` and, with a text
        tokenizer attached, ``text_vocab.json`` into ``directory``."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"model": self.model_name, "config": self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model": self.model_name})
        if self.text_tokenizer is not None:
            self.text_tokenizer.save(directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> MLLM:
        """Load a :meth:`save_pretrained` directory strictly: a missing / unexpected key or a shape mismatch is a
        ValueError naming the file and the keys; the text tokenizer is loaded when ``text_vocab.json`` exists."""
        directory = Path(directory)
        who = "MLLM.from_pretrained"
        cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{who}: {p} does not exist")
        meta = json.loads(cfg_path.read_text())
        if meta.get("model") != cls.model_name:
            raise ValueError(f"{who}: {cfg_path} names model {meta.get('model')!r}, not 'mllm'")
        config = MLLMConfig.from_dict(meta["config"], f"{who}({cfg_path})")
        tok = TextTokenizer.load(directory) if (directory / VOCAB_NAME).is_file() else None
        model = cls(config, tok)
        return load_weights_strict(model, weights_path, who, map_location)
