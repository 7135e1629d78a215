"""MergeAR: class-conditional raster autoregression over MergeVQ tokens with a compacted KV cache
(docs/mergear.md).

MergeVQ's paper describes its generator in one sentence: "During training, we sample a merge ratio r, introduce a
Merge Instruction Token M, and construct a causal mask. In inference, we utilize a KV cache to prune repeated
tokens." This file is one reading of it, on the shared LLaMA decoder (:mod:`fastvq.models.llm`)::

    sequence   [class c] [M_K] x_0 x_1 ... x_{L-1}          L = h·w raster positions, K = kept tokens
    x_p        = sum_g code_embed[g](sub-code g of the code of p's merge group)   (factorised LFQ bits, low first)
                 + pos_embed[p] + repeat_embed[p is not the first position of its group]
    attention  merge_causal_mask(group ids): a position sees the class and M tokens, the *first* position of
               every earlier merge group, and itself; a repeated position is seen by nobody after it
    heads      out at the position before p (the M token for p = 0) predicts p:
               slot  softmax over [group 0 .. group n-1, "new"] (n = groups opened before p): a pointer
                     (q · k / sqrt(d) with k the pointer key of each opened group's first position, i.e. of a
                     kept cache row) and one "new" logit, in one distribution; the target is MergeVQ's source
                     map value at p (groups are numbered in first-occurrence order, so "new" is slot n).
                     The budget of exactly K groups is enforced: no "new" once n == K, only "new" when the
                     positions left equal K - n.
               code  for a new group: sub-code 0 from out, sub-code g from out + the embeddings of the
                     sub-codes before it (the factorised prediction of Open-MAGVIT2's AR, MergeVQ's base)
    loss       CE(slot) averaged over the L positions + CE(code) averaged over the K new positions

Generation runs the same model one position at a time (:meth:`MergeAR.generate`): the decision is sampled, a
repeat takes its group's code, and the position's step runs with ``keep = is_new``, so a
:class:`fastvq.nn.CompressedKVCache` (the fused ``decode_step`` op) writes only first occurrences: 2 + K rows
per sequence. ``cache="static"`` runs the same loop over LlamaGen's full-length cache under the same mask and
``cache="none"`` re-runs the full forward under :func:`fastvq.nn.merge_causal_mask` at every position; the three
agree token for token and map for map under greedy sampling (python_tests/test_mergear.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.models.llm import Decoder, DecoderConfig, init_weights, new_cache
from fastvq.models.tokenizer import CONFIG_NAME, WEIGHTS_NAME, config_to_dict, load_weights_strict
from fastvq.nn import first_occurrence, merge_causal_mask

__all__ = ["MergeARConfig", "MergeAR", "MergeARSample", "tokenizer_fingerprint", "canonical_source",
           "encode_for_mergear", "sample_batch", "train_mergear", "generate_images", "is_mergear_checkpoint",
           "FASHION_MNIST_CLASSES", "make_optimizer", "train_step", "MergeARTrainConfig", "MergeARTrainer",
           "MERGEAR_RESUME_MUTABLE", "resolve_mergear_checkpoint"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot")
MODEL_NAME = "mergear"


def tokenizer_fingerprint(tok) -> str:
    """A tokenizer's config identity: the first 16 hex digits of the SHA-256 of its config as sorted JSON (the
    ``config_hash`` of ``fastvq.models.mllm``'s codec, so the two models name a tokenizer alike). Two tokenizers
    with one fingerprint produce interchangeable indices and source maps; the model name is checked apart."""
    text = json.dumps(config_to_dict(tok.config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_mergear_checkpoint(directory: str | Path) -> bool:
    """True when ``directory`` holds a MergeAR (:func:`resolve_mergear_checkpoint`: a :meth:`MergeAR.save_pretrained`
    directory, or a ``fastvq train mergear`` run / checkpoint whose ``config.json`` says ``"model": "mergear"``):
    how a command line tells a MergeAR checkpoint from another model's."""
    try:
        resolve_mergear_checkpoint(directory)
        return True
    except Exception:  # noqa: BLE001 -- any unreadable or foreign directory is "not a MergeAR checkpoint"
        return False


def canonical_source(source: Tensor) -> Tensor:
    """Relabel a merge source map ``[B, L]`` (integer; equal values = one merge group) so that groups are numbered
    in order of first occurrence: ``out[:, 0] == 0`` and each new group takes the running maximum + 1 (MergeVQ's
    ``encode`` already returns this order). Returns int64 ``[B, L]``."""
    B, L = source.shape
    first = first_occurrence(source)
    rank = first.long().cumsum(1) - 1                                   # slot of each first position
    # every position takes the slot of its group's first position: scatter slots by group value, gather back
    _, inv = torch.unique(source, return_inverse=True)                    # [B, L] in [0, V)
    table = torch.zeros(B, int(inv.max()) + 1 if inv.numel() else 1, dtype=torch.long, device=source.device)
    b_idx, p_idx = first.nonzero(as_tuple=True)
    table[b_idx, inv[b_idx, p_idx]] = rank[b_idx, p_idx]
    return table.gather(1, inv)


@dataclass(frozen=True)
class MergeARConfig:
    """MergeAR's architecture and what it was built for.

    Decoder: ``dim``, ``num_layers``, ``num_heads``, ``num_kv_heads``, ``hidden_dim`` (0: LLaMA's 8/3 rule),
    ``rope_theta`` (positions: class 0, M 1, raster position p at p + 2). Tokens: ``grid`` (h, w) of the
    tokenizer, ``code_bits`` of its LFQ, factorised into ``code_split`` (bits per sub-code, lowest bits first;
    18 = 6 + 12 as MergeVQ's AR), ``keep_candidates`` / ``keep_probs`` (the merge instruction tokens: a training
    sample's keep count is drawn from them). Conditioning: ``num_classes`` labels (``class_names`` resolve
    prompts) and one null class, used for a label with probability ``cfg_dropout`` in training (CFG).
    ``pointer_dim``: width of the pointer head's queries and keys. ``tokenizer_model`` / ``tokenizer_hash``:
    :func:`tokenizer_fingerprint` of the tokenizer (empty: unchecked)."""

    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    hidden_dim: int = 0
    rope_theta: float = 10000.0
    grid: tuple[int, int] = (8, 8)
    code_bits: int = 18
    code_split: tuple[int, ...] = (6, 12)
    keep_candidates: tuple[int, ...] = (25, 36, 49, 64)
    keep_probs: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    num_classes: int = 10
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES
    cfg_dropout: float = 0.1
    pointer_dim: int = 64
    tokenizer_model: str = "mergevq"
    tokenizer_hash: str = ""

    def __post_init__(self):
        who = "MergeARConfig"
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"{who}: grid must be (h, w) with h, w >= 1, got {self.grid}")
        if sum(self.code_split) != self.code_bits or min(self.code_split) < 1 or max(self.code_split) > 20:
            raise ValueError(f"{who}: code_split {self.code_split} must be positive bit counts (<= 20) summing to "
                             f"code_bits {self.code_bits}")
        L = self.num_positions
        if not self.keep_candidates or len(self.keep_candidates) != len(self.keep_probs):
            raise ValueError(f"{who}: keep_candidates and keep_probs must be non-empty and of equal length, got "
                             f"{self.keep_candidates}, {self.keep_probs}")
        cands = self.keep_candidates
        if any(not 1 <= k <= L for k in cands) or len(set(cands)) != len(cands):
            raise ValueError(f"{who}: keep_candidates must be distinct counts in [1, {L}] (the grid), got "
                             f"{self.keep_candidates}")
        if min(self.keep_probs) < 0 or not sum(self.keep_probs) > 0:
            raise ValueError(f"{who}: keep_probs must be >= 0 with a positive sum, got {self.keep_probs}")
        if self.num_classes < 1 or (self.class_names and len(self.class_names) != self.num_classes):
            raise ValueError(f"{who}: num_classes {self.num_classes} must be >= 1 and match class_names "
                             f"({len(self.class_names)})")
        if not 0 <= self.cfg_dropout < 1 or self.pointer_dim < 1:
            raise ValueError(f"{who}: cfg_dropout must be in [0, 1) and pointer_dim >= 1, got {self.cfg_dropout}, "
                             f"{self.pointer_dim}")
        self.decoder_config()  # its own checks

    @property
    def num_positions(self) -> int:
        """``L = h · w`` raster positions."""
        return self.grid[0] * self.grid[1]

    def decoder_config(self) -> DecoderConfig:
        """The :class:`~fastvq.models.llm.DecoderConfig`: ``max_seq_len = L + 2`` (class, M, L positions)."""
        return DecoderConfig(dim=self.dim, num_layers=self.num_layers, num_heads=self.num_heads,
                             num_kv_heads=self.num_kv_heads, hidden_dim=self.hidden_dim,
                             max_seq_len=self.num_positions + 2,
                             rope_theta=self.rope_theta)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeARConfig:
        """The inverse of :meth:`to_dict`; an unknown field is a ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"MergeARConfig.from_dict: unknown fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class MergeARSample(NamedTuple):
    """What :meth:`MergeAR.generate` returns, in MergeVQ's layout: ``indices [B, K]`` int64 (one LFQ index per
    merge group, in first-occurrence order), ``source [B, L]`` int64 (the generated source map, values in
    ``[0, K)``), ``codes [B, L]`` int64 (the code of every raster position, ``indices.gather(1, source)``) and
    ``keep`` (K). :attr:`extras` is what ``MergeVQ.decode_indices`` takes."""
    indices: Tensor
    source: Tensor
    codes: Tensor
    keep: int
    grid: tuple[int, int]

    @property
    def extras(self) -> dict[str, Any]:
        """``{"source", "keep", "grid"}``: MergeVQ ``encode``'s extras, for ``decode_indices``."""
        return {"source": self.source, "keep": self.keep, "grid": self.grid}


def _sample(logits: Tensor, temperature: float, top_k: int, top_p: float, generator) -> Tensor:
    """``logits [B, V]`` (``-inf`` = not allowed) -> ``[B]`` int64: argmax when ``temperature == 0``, else a draw
    from the softmax of ``logits / temperature`` restricted to the ``top_k`` best (0: all) and the smallest set
    whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, order = logits.sort(-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) >= top_p                       # keep the first token past top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # inverse-CDF draw: one uniform per row (torch.multinomial draws an exponential per entry: 10x slower at 4,096)
    cdf = logits.softmax(-1).cumsum(-1)                                  # [B, V]; zero-probability entries never win
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


class MergeAR(nn.Module):
    """MergeAR (module docstring): ``forward(batch) -> losses``, :meth:`generate`, :meth:`save_pretrained` /
    :meth:`from_pretrained`, :meth:`check_tokenizer`. Build it for a tokenizer with :meth:`from_tokenizer`."""

    def __init__(self, config: MergeARConfig):
        super().__init__()
        cfg = self.config = config
        d, L = cfg.dim, cfg.num_positions
        self.decoder = Decoder(cfg.decoder_config())
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)          # the last row is the null class (CFG)
        self.keep_embed = nn.Embedding(len(cfg.keep_candidates), d)      # the merge instruction tokens M_K
        self.code_embed = nn.ModuleList(nn.Embedding(2 ** b, d) for b in cfg.code_split)
        self.pos_embed = nn.Parameter(torch.zeros(L, d))
        self.repeat_embed = nn.Embedding(2, d)                           # 0: opens a group, 1: repeats one
        self.new_head = nn.Linear(d, 1)
        self.pointer_q = nn.Linear(d, cfg.pointer_dim, bias=False)
        self.pointer_k = nn.Linear(d, cfg.pointer_dim, bias=False)
        self.code_heads = nn.ModuleList(nn.Linear(d, 2 ** b) for b in cfg.code_split)
        self.sub_embed = nn.ModuleList(nn.Embedding(2 ** b, d) for b in cfg.code_split[:-1])
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        shifts, s = [], 0
        for b in cfg.code_split:
            shifts.append(s)
            s += b
        self._shifts = tuple(shifts)

    # ---- construction and identity ------------------------------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tok, **overrides) -> MergeAR:
        """A MergeAR for the MergeVQ tokenizer ``tok``: its grid (``image_size / downsample``), ``code_bits``,
        ``keep_candidates`` / ``keep_probs`` and fingerprint; ``code_split`` default ``(b // 3, b - b // 3)``
        (18 -> 6 + 12). ``overrides``: other :class:`MergeARConfig` fields."""
        c = getattr(tok, "config", None)
        if getattr(tok, "model_name", None) != "mergevq" or c is None:
            raise ValueError(f"MergeAR.from_tokenizer: tok must be a MergeVQ tokenizer, got {type(tok).__name__}")
        side = c.image_size // c.downsample
        bits = c.code_bits
        base = dict(grid=(side, side), code_bits=bits, code_split=(bits // 3, bits - bits // 3),
                    keep_candidates=tuple(c.keep_candidates), keep_probs=tuple(float(p) for p in c.keep_probs),
                    tokenizer_model="mergevq", tokenizer_hash=tokenizer_fingerprint(tok))
        base.update(overrides)
        return cls(MergeARConfig(**base))

    def check_tokenizer(self, tok, argument: str = "tok") -> None:
        """``ValueError`` naming ``argument`` unless ``tok`` is the tokenizer this model was built for (its
        fingerprint, or at least its grid and code bits when the model records no fingerprint)."""
        cfg = self.config
        c = getattr(tok, "config", None)
        if getattr(tok, "model_name", None) != cfg.tokenizer_model or c is None:
            raise ValueError(f"MergeAR: {argument} must be a {cfg.tokenizer_model} tokenizer, got {type(tok).__name__}")
        side = c.image_size // c.downsample
        if (side, side) != tuple(cfg.grid) or c.code_bits != cfg.code_bits:
            raise ValueError(f"MergeAR: {argument} has a {side}x{side} grid of {c.code_bits}-bit codes; this model "
                             f"was built for {cfg.grid[0]}x{cfg.grid[1]} and {cfg.code_bits} bits")
        if cfg.tokenizer_hash and tokenizer_fingerprint(tok) != cfg.tokenizer_hash:
            raise ValueError(f"MergeAR: {argument} is not the tokenizer this model was built for (config fingerprint "
                             f"{tokenizer_fingerprint(tok)} != {cfg.tokenizer_hash})")

    def keep_index(self, keep: int, argument: str = "keep") -> int:
        """The merge instruction token of a keep count; ``ValueError`` naming ``argument`` unless it is one of
        the trained ``keep_candidates``."""
        cands = self.config.keep_candidates
        if isinstance(keep, bool) or not isinstance(keep, int) or keep not in cands:
            raise ValueError(f"MergeAR: {argument} must be one of the trained keep_candidates {list(cands)}, "
                             f"got {keep!r}")
        return cands.index(keep)

    def sample_keep(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """``[batch_size]`` int64 keep counts drawn from ``keep_candidates`` with ``keep_probs`` (one per sample)."""
        probs = torch.tensor(self.config.keep_probs, dtype=torch.float64)
        idx = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return torch.tensor(self.config.keep_candidates, dtype=torch.long)[idx]

    # ---- codes ----------------------------------------------------------------------------------------------

    def split_codes(self, codes: Tensor) -> list[Tensor]:
        """LFQ indices ``[...]`` int64 -> one sub-code tensor per ``code_split`` group (lowest bits first)."""
        return [(codes >> s) & ((1 << b) - 1) for s, b in zip(self._shifts, self.config.code_split)]

    def join_codes(self, subs: list[Tensor]) -> Tensor:
        """The inverse of :meth:`split_codes`."""
        out = torch.zeros_like(subs[0])
        for s, c in zip(self._shifts, subs):
            out = out | (c << s)
        return out

    def embed_positions(self, codes: Tensor, repeat: Tensor, positions: Tensor) -> Tensor:
        """Input embeddings of raster positions: ``codes`` int64 (the LFQ index of each position's group),
        ``repeat`` bool (not its group's first position) and ``positions`` int64 raster indices, all one shape
        ``[...]`` -> ``[..., dim]``."""
        h = self.pos_embed[positions] + self.repeat_embed(repeat.long())
        for emb, sub in zip(self.code_embed, self.split_codes(codes)):
            h = h + emb(sub)
        return h

    def code_logits(self, h: Tensor, subs: list[Tensor] | None = None, group: int = 0) -> Tensor:
        """Logits of sub-code ``group`` from hidden states ``h [..., dim]`` and the earlier sub-codes ``subs``
        (``group`` of them, each ``[...]``): ``[..., 2^bits]``."""
        for g in range(group):
            h = h + self.sub_embed[g](subs[g])
        return self.code_heads[group](h)

    # ---- training -------------------------------------------------------------------------------------------

    def _check_tokens(self, codes: Tensor, source: Tensor, keep: Tensor, who: str) -> tuple[Tensor, Tensor, Tensor]:
        cfg, L = self.config, self.config.num_positions
        if source.dim() != 2 or source.dtype not in (torch.int64, torch.int32, torch.int16):
            raise ValueError(f"{who}: source must be an integer [B, L] source map, got {source.dtype} "
                             f"{list(source.shape)}")
        if source.shape[1] != L:
            raise ValueError(f"{who}: source has {source.shape[1]} positions but this model was built for a "
                             f"{cfg.grid[0]}x{cfg.grid[1]} grid ({L}); is it from another tokenizer?")
        B = source.shape[0]
        if codes.shape != (B, L) or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{who}: codes must be int64 [B, L] = [{B}, {L}] (the LFQ index of each position), got "
                             f"{codes.dtype} {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** cfg.code_bits):
            raise ValueError(f"{who}: codes must be in [0, 2^{cfg.code_bits}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1).expand(B)
        source = canonical_source(source.long())
        counts = source.amax(1) + 1
        bad = [k for k in keep.unique().tolist() if k not in cfg.keep_candidates]
        if bad:
            raise ValueError(f"{who}: keep must be among the trained keep_candidates {list(cfg.keep_candidates)}, "
                             f"got {bad}")
        if not bool((counts == keep).all()):
            i = int((counts != keep).nonzero()[0])
            raise ValueError(f"{who}: source of sample {i} has {int(counts[i])} merge groups but its keep is "
                             f"{int(keep[i])}")
        return codes.long(), source, keep

    def forward(self, codes: Tensor, source: Tensor, keep: Tensor | int, labels: Tensor, *,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The training loss of a batch of MergeVQ tokens.

        Args:
            codes: ``[B, L]`` int64, the LFQ index of every raster position (``indices.gather(1, source)``).
            source: ``[B, L]`` integer, the tokenizer's source map at keep ``keep[b]`` (relabelled in
                first-occurrence order).
            keep: ``[B]`` int64 or an int, each a trained keep candidate; the source has exactly that many groups.
            labels: ``[B]`` int64 class labels in ``[0, num_classes)``; in training mode each is replaced by the null
                class with probability ``cfg_dropout`` (``generator``).

        Returns:
            dict ``loss`` (= ``slot_loss + code_loss``), ``slot_loss`` (CE of the open/repeat-and-which decision,
            mean over positions), ``code_loss`` (CE of the sub-codes of new groups, mean over them and summed over
            sub-codes), ``slot_accuracy``, ``open_accuracy`` (new-vs-repeat decided right), ``code_accuracy``.
        """
        who = "MergeAR.forward"
        cfg, L = self.config, self.config.num_positions
        codes, source, keep = self._check_tokens(codes, source, keep, who)
        B = codes.shape[0]
        labels = torch.as_tensor(labels, dtype=torch.long, device=codes.device)
        if labels.shape != (B,) or (B and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes)):
            raise ValueError(f"{who}: labels must be int64 [B={B}] in [0, {cfg.num_classes}), got {list(labels.shape)}")
        if self.training and cfg.cfg_dropout > 0:
            drop = torch.rand(B, generator=generator) < cfg.cfg_dropout
            labels = torch.where(drop.to(labels.device), cfg.num_classes, labels)
        dev = self.pos_embed.device
        codes, source, keep, labels = codes.to(dev), source.to(dev), keep.to(dev), labels.to(dev)
        first = first_occurrence(source)                                          # [B, L]
        kidx = torch.tensor([cfg.keep_candidates.index(int(k)) for k in keep.tolist()], device=dev)
        pos = torch.arange(L, device=dev)
        img = self.embed_positions(codes, ~first, pos.expand(B, L))             # [B, L, d]
        h = torch.cat((self.class_embed(labels)[:, None], self.keep_embed(kidx)[:, None], img[:, :-1]), 1)
        gids = torch.cat((torch.tensor([L, L + 1], device=dev).expand(B, 2), source[:, :-1]), 1)  # prefix: own groups
        out = self.decoder(h, torch.arange(L + 1, device=dev).expand(B, L + 1), merge_causal_mask(gids))
        pred = out[:, 1:]                                                          # [B, L, d]: predicts position p
        # slot logits: pointer to the first position of every opened group, and "new" at slot n_p
        n = first.long().cumsum(1) - first.long()                                  # groups opened before p
        fpos = torch.where(first, pos, L).sort(1).values                           # [B, L]: first position of slot s
        keys = self.pointer_k(out[:, 2:])                                          # [B, L-1, pd]: image positions
        keys = F.pad(keys, (0, 0, 0, 1)).gather(1, fpos.clamp(max=L - 1)[..., None].expand(-1, -1, keys.shape[-1]))
        logits = self.pointer_q(pred) @ keys.transpose(1, 2) / math.sqrt(cfg.pointer_dim)   # [B, L(p), L(s)]
        logits = logits.scatter(2, n[..., None], self.new_head(pred))
        logits = logits.masked_fill(~self._slot_allowed(n, keep[:, None], pos, L, L), float("-inf"))
        target = source
        slot_loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        # factorised code of the new groups
        hp, subs = pred[first], self.split_codes(codes[first])                    # [B·K, d], G x [B·K]
        code_loss, correct = pred.new_zeros(()), torch.ones_like(subs[0], dtype=torch.bool)
        for g in range(len(cfg.code_split)):
            lg = self.code_logits(hp, subs, g).float()
            code_loss = code_loss + F.cross_entropy(lg, subs[g])
            correct &= lg.argmax(-1) == subs[g]
        with torch.no_grad():
            guess = logits.argmax(-1)
            slot_acc = (guess == target).float().mean()
            open_acc = ((guess == n) == first).float().mean()
        return {"loss": slot_loss + code_loss, "slot_loss": slot_loss.detach(), "code_loss": code_loss.detach(),
                "slot_accuracy": slot_acc, "open_accuracy": open_acc, "code_accuracy": correct.float().mean()}

    @staticmethod
    def _slot_allowed(n: Tensor, keep: Tensor, pos: Tensor, L: int, slots: int) -> Tensor:
        """Allowed slots ``[..., slots]`` at raster positions ``pos`` with ``n`` groups opened before and a budget of
        ``keep`` groups (``n``, ``keep``, ``pos`` broadcast to one shape ``[...]``): slot ``s < n`` (repeat group
        ``s``) unless every position left must open a group (``L - pos == keep - n``); slot ``n`` ("new") while
        ``n < keep``."""
        s = torch.arange(slots, device=n.device)
        must_open = ((L - pos) == (keep - n))[..., None]
        n_, keep_ = n[..., None], keep[..., None]
        return ((s < n_) & ~must_open) | ((s == n_) & (n_ < keep_))

    # ---- generation -----------------------------------------------------------------------------------------

    def resolve_labels(self, prompts) -> Tensor:
        """Class labels from ``prompts``: a list of ints, an int64 tensor, or strings naming a class (the longest
        ``class_names`` entry that occurs in the lowercased prompt, e.g. "A photo of an ankle boot.")."""
        cfg = self.config
        if isinstance(prompts, Tensor):
            labels = prompts.long().reshape(-1)
        else:
            prompts = [prompts] if isinstance(prompts, (str, int)) else list(prompts)
            labels = []
            for p in prompts:
                if isinstance(p, str):
                    # every class name and its "/"-separated parts ("T-shirt/top": also "t-shirt", "top")
                    hits = [(len(a), i) for i, c in enumerate(cfg.class_names) for a in {c, *c.split("/")}
                            if a and a.lower() in p.lower()]
                    if not hits:
                        raise ValueError(f"MergeAR.generate: prompt {p!r} names none of the classes "
                                         f"{list(cfg.class_names)}")
                    labels.append(max(hits)[1])                       # the longest match: "t-shirt" over "shirt"
                else:
                    labels.append(int(p))
            labels = torch.tensor(labels, dtype=torch.long)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes:
            raise ValueError(f"MergeAR.generate: prompts must be class labels in [0, {cfg.num_classes}) or class "
                             f"names, got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def generate(self, prompts, keep: int | None = None, cfg_scale: float = 3.0, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 cache: str = "fastvq", source: Tensor | None = None, return_stats: bool = False):
        """Generate MergeVQ tokens for ``prompts`` (class labels or prompts naming a class; B of them).

        Args:
            keep: the number of merge groups K, one of ``keep_candidates`` (default the most probable one).
            cfg_scale: classifier-free guidance ``l_u + s (l_c - l_u)`` on the slot and code logits, by batch
                doubling with the null class (1.0: no unconditional half).
            temperature, top_k, top_p, generator: sampling; ``temperature == 0`` is greedy.
            cache: ``"fastvq"`` (:class:`~fastvq.nn.CompressedKVCache`, 2 + K rows, repeats never written),
                ``"static"`` (LlamaGen's full-length cache of L + 1 rows under the merge mask) or ``"none"``
                (the full forward under :func:`~fastvq.nn.merge_causal_mask` at every position; the oracle).
            source: optional ``[B, L]`` merge layout to follow (e.g. ``MergeVQ.encode``'s source map at ``keep``):
                the slots are taken from it instead of sampled (the slot logits are still computed) and only the
                codes are generated; it must have this model's grid and exactly ``keep`` groups.
            return_stats: also return a dict (``kv_bytes`` allocated, ``kv_rows`` per sequence, ``seconds``).

        Returns:
            :class:`MergeARSample` (``indices [B, K]``, ``source [B, L]``, ``codes [B, L]``), decodable with
            ``tok.decode_indices(sample.indices, sample.extras)``; with ``return_stats``, ``(sample, stats)``.
        """
        cfg, L = self.config, self.config.num_positions
        keep = max(zip(cfg.keep_probs, cfg.keep_candidates))[1] if keep is None else keep
        kidx = self.keep_index(keep)
        if cache not in ("fastvq", "static", "none"):
            raise ValueError(f"MergeAR.generate: cache must be 'fastvq', 'static' or 'none', got {cache!r}")
        labels = self.resolve_labels(prompts)
        forced = None
        if source is not None:
            src = torch.as_tensor(source)
            if src.dim() != 2 or src.shape[0] != labels.shape[0] or src.dtype.is_floating_point:
                raise ValueError(f"MergeAR.generate: source must be an integer [B={labels.shape[0]}, L] source map, "
                                 f"got {src.dtype} {list(src.shape)}")
            codes0 = torch.zeros(src.shape, dtype=torch.long)
            _, forced, _ = self._check_tokens(codes0, src, keep, "MergeAR.generate")
            forced = forced.to(self.pos_embed.device)
        t0 = time.perf_counter()
        dev, dt = self.pos_embed.device, self.pos_embed.dtype
        B, K = labels.shape[0], keep
        guided = cfg_scale != 1.0
        if guided:
            labels = torch.cat((labels, torch.full_like(labels, cfg.num_classes)))
        Bc = labels.shape[0]
        labels = labels.to(dev)
        prefix = torch.cat((self.class_embed(labels)[:, None],
                            self.keep_embed(torch.full_like(labels, kidx))[:, None]), 1)   # [Bc, 2, d]
        pre_pos = torch.arange(2, device=dev).expand(Bc, 2)
        kv = None
        if cache == "none":
            seq_h, seq_g = prefix, torch.tensor([L, L + 1], device=dev).expand(Bc, 2)
            out = self.decoder(seq_h, pre_pos, merge_causal_mask(seq_g))
        else:
            rows = 2 + K if cache == "fastvq" else L + 1
            kv = new_cache(self.decoder.config, Bc, rows, cache, dtype=dt, device=dev)
            out = self.decoder(prefix, pre_pos, cache=kv)
        pred = out[:, -1]                                                          # [Bc, d]
        ptr_keys = torch.zeros(Bc, K, cfg.pointer_dim, device=dev, dtype=dt)        # one per opened group
        source = torch.zeros(B, L, dtype=torch.long, device=dev)
        indices = torch.zeros(B, K, dtype=torch.long, device=dev)
        n = torch.zeros(B, dtype=torch.long, device=dev)
        rows_b = torch.arange(B, device=dev)
        scale = 1.0 / math.sqrt(cfg.pointer_dim)
        G = len(cfg.code_split)
        keep_t = torch.full((B,), K, dtype=torch.long, device=dev)

        def guide(logits: Tensor) -> Tensor:                                      # [Bc, V] -> [B, V]
            if not guided:
                return logits
            c, u = logits[:B], logits[B:]
            return u + cfg_scale * (c - u)

        for p in range(L):
            # 1. the slot: repeat group s < n (pointer) or open group n ("new")
            raw = torch.cat((torch.einsum("bd,bkd->bk", self.pointer_q(pred), ptr_keys) * scale,
                             pred.new_zeros(Bc, 1)), 1)                            # [Bc, K + 1]
            nn_ = n.repeat(2) if guided else n
            raw = raw.scatter(1, nn_[:, None], self.new_head(pred))
            logits = guide(raw.float())
            allowed = self._slot_allowed(n, keep_t, torch.full_like(n, p), L, K + 1)
            if forced is None:
                slot = _sample(logits.masked_fill(~allowed, float("-inf")), temperature, top_k, top_p, generator)
            else:
                slot = forced[:, p]
            is_new = slot == n
            # 2. the code: a new group samples its sub-codes, a repeat takes its group's code
            code = indices.gather(1, slot.clamp(max=K - 1)[:, None])[:, 0]
            new_rows = rows_b[is_new]
            if new_rows.numel():
                both = torch.cat((new_rows, new_rows + B)) if guided else new_rows
                hp, subs = pred[both], []
                for g in range(G):
                    lg = self.code_logits(hp, [s.repeat(2) if guided else s for s in subs], g).float()
                    if guided:
                        m = new_rows.numel()
                        lg = lg[m:] + cfg_scale * (lg[:m] - lg[m:])
                    subs.append(_sample(lg, temperature, top_k, top_p, generator))
                code = code.index_put((new_rows,), self.join_codes(subs))
                indices[new_rows, n[new_rows]] = code[new_rows]
            source[:, p] = slot
            if p == L - 1:
                break
            # 3. the position's own step: attends to the kept rows and itself, stays in the cache only if new
            x = self.embed_positions(code, ~is_new, torch.full_like(code, p))      # [B, d]
            keep_c = is_new
            if guided:
                x, keep_c = x.repeat(2, 1), is_new.repeat(2)
            if cache == "none":
                seq_h = torch.cat((seq_h, x[:, None]), 1)
                seq_g = torch.cat((seq_g, (slot.repeat(2) if guided else slot)[:, None]), 1)
                full = self.decoder(seq_h, torch.arange(p + 3, device=dev).expand(Bc, p + 3), merge_causal_mask(seq_g))
                pred = full[:, -1]
            else:
                pred = self.decoder.step(x, torch.full((Bc,), p + 2, dtype=torch.long, device=dev), kv, keep_c)
            if new_rows.numel():
                both = torch.cat((new_rows, new_rows + B)) if guided else new_rows
                nb = n[new_rows].repeat(2) if guided else n[new_rows]
                ptr_keys[both, nb] = self.pointer_k(pred[both])
            n = n + is_new.long()
        sample = MergeARSample(indices, source, indices.gather(1, source), K, tuple(cfg.grid))
        if not return_stats:
            return sample
        if kv is None:
            kv_bytes, kv_rows = 0, L + 1
        else:
            kv_bytes, kv_rows = kv.memory_stats()["kv_allocated"], int(kv.lengths[0].max())
        return sample, {"kv_bytes": kv_bytes, "kv_rows": kv_rows, "seconds": time.perf_counter() - t0,
                        "batch": Bc, "cache": cache}

    def decode(self, tok, sample: MergeARSample) -> Tensor:
        """Images ``[B, C, H, W]`` (not clamped, in ``[-1, 1]``) of a generated sample through ``tok``'s
        ``decode_indices`` (checked to be this model's tokenizer)."""
        self.check_tokenizer(tok)
        return tok.decode_indices(sample.indices, sample.extras)

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> Path:
        """Write ``config.json`` (``{"model": "mergear", "config": {...}}``) and ``model.safetensors``; with
        ``tokenizer`` (checked by :meth:`check_tokenizer`), also its ``save_pretrained`` under ``tokenizer/``, so that
        the directory alone generates images (:func:`generate_images`)."""
        from safetensors.torch import save_file
        directory = Path(directory)
        if tokenizer is not None:
            self.check_tokenizer(tokenizer, "tokenizer")
            tokenizer.save_pretrained(directory / "tokenizer")
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"model": MODEL_NAME, "config": self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model": MODEL_NAME})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> MergeAR:
        """Read what :meth:`save_pretrained` wrote, strictly (a missing, unexpected or reshaped key is a
        ``ValueError`` naming the file)."""
        directory = Path(directory)
        who = "MergeAR.from_pretrained"
        cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{who}: {p} does not exist")
        meta = json.loads(cfg_path.read_text())
        if meta.get("model") != MODEL_NAME:
            raise ValueError(f"{who}: {cfg_path} names model {meta.get('model')!r}, not {MODEL_NAME!r}")
        model = cls(MergeARConfig.from_dict(meta["config"]))
        return load_weights_strict(model, weights_path, who, map_location)


def generate_images(directory: str | Path, prompts, keep: int | None = None, *, tokenizer=None, **kwargs
                    ) -> tuple[Tensor, MergeARSample]:
    """Images ``[B, C, H, W]`` in ``[0, 1]`` for ``prompts`` from a MergeAR checkpoint directory (the
    ``fastvq generate CKPT "prompt" --keep 144`` path): the model from ``directory``, the tokenizer from
    ``tokenizer`` (a tokenizer or a directory) or ``directory/tokenizer``; ``kwargs`` go to
    :meth:`MergeAR.generate` (``cfg_scale``, ``temperature``, ``top_k``, ``top_p``, ``generator``). Returns the
    images and the sample."""
    from fastvq.models.tokenizer import from_pretrained
    directory = resolve_mergear_checkpoint(directory)
    model = MergeAR.from_pretrained(directory).eval()
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tok_dir = Path(tokenizer) if tokenizer is not None else directory / "tokenizer"
        if not (tok_dir / CONFIG_NAME).is_file():
            raise ValueError(f"generate_images: no tokenizer at {tok_dir}; save the model with "
                             f"save_pretrained(dir, tokenizer=tok) or pass tokenizer=")
        tokenizer = from_pretrained(tok_dir)
    tokenizer.eval()
    sample = model.generate(prompts, keep=keep, **kwargs)
    with torch.no_grad():
        images = model.decode(tokenizer, sample)
    return ((images.clamp(-1, 1) + 1) / 2), sample


# ---- data and training ------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_for_mergear(tok, images: Tensor, labels, keep_candidates: tuple[int, ...] | None = None,
                       batch_size: int = 64) -> dict[str, Any]:
    """MergeVQ tokens of ``images [N, C, H, W]`` (in ``[-1, 1]``) at every keep candidate, for MergeAR training.

    MergeVQ's ``encode(images, keep=K)`` already merges to any reachable ``K``, so each image is encoded once per
    candidate (default ``tok.config.keep_candidates``) and a training batch picks one encoding per sample.

    Returns a dict: ``codes`` int64 ``[N, C, L]`` (the LFQ index of every raster position at candidate ``c``),
    ``source`` int64 ``[N, C, L]`` (the source map, first-occurrence order), ``labels`` int64 ``[N]``,
    ``keep_candidates`` (the ``C`` counts), ``grid``, ``fingerprint`` (:func:`tokenizer_fingerprint`)."""
    if images.dim() != 4:
        raise ValueError(f"encode_for_mergear: images must be [N, C, H, W], got {list(images.shape)}")
    keeps = tuple(tok.config.keep_candidates if keep_candidates is None else keep_candidates)
    was = tok.training
    tok.eval()
    codes, source, grid = [], [], None
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            c_k, s_k = [], []
            for k in keeps:
                out = tok.encode(x, keep=k)
                s_k.append(out.extras["source"])
                c_k.append(out.indices.gather(1, out.extras["source"]))
                grid = out.extras["grid"]
            codes.append(torch.stack(c_k, 1))
            source.append(torch.stack(s_k, 1))
    finally:
        tok.train(was)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.shape[0] != len(images):
        raise ValueError(f"encode_for_mergear: labels must be [N={len(images)}], got {list(labels.shape)}")
    return {"codes": torch.cat(codes), "source": torch.cat(source), "labels": labels, "keep_candidates": keeps,
            "grid": tuple(grid), "fingerprint": tokenizer_fingerprint(tok)}


def _check_data(model: MergeAR, data: dict[str, Any]) -> Tensor:
    """The column of each model keep candidate in ``data`` (``encode_for_mergear``'s dict); ``ValueError``
    naming ``data`` when it comes from another tokenizer or lacks a candidate."""
    cfg = model.config
    if tuple(data["grid"]) != tuple(cfg.grid):
        raise ValueError(f"train_mergear: data was encoded on a {tuple(data['grid'])} grid; the model's is "
                         f"{tuple(cfg.grid)} (another tokenizer)")
    if cfg.tokenizer_hash and data.get("fingerprint") != cfg.tokenizer_hash:
        raise ValueError(f"train_mergear: data comes from tokenizer {data.get('fingerprint')}, the model was built "
                         f"for {cfg.tokenizer_hash}")
    missing = [k for k in cfg.keep_candidates if k not in data["keep_candidates"]]
    if missing:
        raise ValueError(f"train_mergear: data has no encoding at keep {missing} (it has {data['keep_candidates']})")
    return torch.tensor([list(data["keep_candidates"]).index(k) for k in cfg.keep_candidates])


def sample_batch(model: MergeAR, data: dict[str, Any], batch_size: int, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A random training batch of ``encode_for_mergear`` data: ``(codes [B, L], source [B, L], keep [B], labels
    [B])``, the keep count of each sample drawn by :meth:`MergeAR.sample_keep`."""
    cols = _check_data(model, data)
    idx = torch.randint(len(data["labels"]), (batch_size,), generator=generator)
    keep = model.sample_keep(batch_size, generator)
    col = cols[torch.tensor([model.config.keep_candidates.index(int(k)) for k in keep])]
    return data["codes"][idx, col], data["source"][idx, col], keep, data["labels"][idx]


def make_optimizer(model: MergeAR, lr: float = 1e-3, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with ``weight_decay`` on the >= 2-D weights that are not embeddings."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def train_step(model: MergeAR, opt: torch.optim.Optimizer, data: dict[str, Any], step: int, generator: torch.Generator,
               batch_size: int = 32, lr: float = 1e-3, warmup: int = 20, grad_clip: float = 1.0) -> dict[str, float]:
    """Optimizer step ``step`` (0-based): lr ``lr · min(1, (step + 1) / warmup)``, a :func:`sample_batch` batch and
    the CFG label dropout both drawn from ``generator`` (the only randomness: a run is a function of its seed,
    and resuming needs only the generator's state), gradient clip ``grad_clip``. Returns the batch's terms."""
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
    codes, source, keep, labels = sample_batch(model, data, batch_size, generator)
    out = model(codes, source, keep, labels, generator=generator)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return {k: float(v.detach()) for k, v in out.items()}


def train_mergear(model: MergeAR, data: dict[str, Any], *, steps: int | None = None, seconds: float | None = None,
                  batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.05, warmup: int = 20,
                  seed: int = 0, log_every: int = 50, log=print) -> list[dict[str, float]]:
    """Train ``model`` on ``data`` (``encode_for_mergear``'s dict) with AdamW (:func:`make_optimizer`, gradient clip
    1.0, linear warmup over ``warmup`` steps, then constant ``lr``; :func:`train_step`) for ``steps`` steps or
    ``seconds`` of wall clock, whichever comes first (at least one given). Returns the per-step log (``loss``,
    ``slot_loss``, ``code_loss``, accuracies, ``time``). No checkpoints: :class:`MergeARTrainer` (``fastvq train
    mergear``) runs the same steps with atomic checkpoints and exact resume."""
    if steps is None and seconds is None:
        raise ValueError("train_mergear: give steps or seconds")
    _check_data(model, data)
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, lr, weight_decay)
    model.train()
    history, t0, step = [], time.perf_counter(), 0
    while (steps is None or step < steps) and (seconds is None or time.perf_counter() - t0 < seconds):
        rec = train_step(model, opt, data, step, g, batch_size, lr, warmup)
        step += 1
        rec.update(step=step, time=time.perf_counter() - t0)
        history.append(rec)
        if log is not None and log_every and step % log_every == 0:
            log(f"mergear step {step}: loss {rec['loss']:.3f} (slot {rec['slot_loss']:.3f}, "
                f"code {rec['code_loss']:.3f}), "
                f"open acc {rec['open_accuracy']:.3f}, {rec['time']:.0f} s")
    model.eval()
    return history


# ---- the training command (fastvq train mergear) -----------------------------------------------------------------

@dataclass
class MergeARTrainConfig:
    """A ``fastvq train mergear`` run; dumped as ``train_config.json`` in every checkpoint.

    ``tokenizer``: the frozen MergeVQ (a run, ``checkpoints/``, ``step-*`` or ``save_pretrained`` directory; its
    EMA weights when it has them). ``data``: ``name:n`` (a labelled ``fastvq.data`` set and ``n`` fixed items of
    its train split, ``fixed_subset(n, seed=0)``; 0 or no ``:n``: all), encoded once at every keep candidate.
    ``model``: :class:`MergeARConfig` overrides (``dim``, ``num_layers``, ...). Optimisation: ``steps`` and
    ``seconds`` (wall clock of the training steps over the whole run, resumes included; 0: no limit), whichever
    ends first; ``batch_size``, AdamW ``lr`` / ``weight_decay``, linear ``warmup`` steps then constant, gradient
    clip ``grad_clip``, ``seed`` (initialisation and the one training generator). ``log_every`` (``metrics.jsonl``),
    ``ckpt_every`` (0: only the final checkpoint), ``keep_last``, ``out``."""

    tokenizer: str = ""
    data: str = "fashion_mnist:4000"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 1000
    seconds: float = 0.0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 200
    keep_last: int = 2
    out: str = "runs/mergear"

    def validate(self) -> None:
        who = "MergeARTrainConfig"
        if not self.tokenizer:
            raise ValueError(f"{who}: tokenizer must name the frozen MergeVQ checkpoint (--tokenizer CKPT)")
        for name in ("steps", "batch_size", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{who}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("seconds", "warmup", "ckpt_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{who}: {name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"{who}: lr must be > 0, got {self.lr}")
        self.data_item()

    def data_item(self) -> tuple[str, int]:
        """``(data set, items)`` from ``data`` (``name`` or ``name:n``)."""
        name, sep, n = self.data.strip().partition(":")
        try:
            count = int(n) if sep else 0
        except ValueError:
            raise ValueError(f"MergeARTrainConfig: data must be name or name:n (n an int), got {self.data!r}") from None
        if not name or count < 0 or "," in self.data:
            raise ValueError(f"MergeARTrainConfig: data must be one labelled set, name or name:n with n >= 0, got "
                             f"{self.data!r}")
        return name.strip(), count

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeARTrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"MergeARTrainConfig.from_dict: unknown fields {unknown}")
        return cls(**data)


# what a resumed run may change (how long it runs and what it writes, not what it computes)
MERGEAR_RESUME_MUTABLE = frozenset({"steps", "seconds", "out", "log_every", "ckpt_every", "keep_last", "tokenizer"})


def resolve_mergear_checkpoint(path: str | Path) -> Path:
    """The directory holding a MergeAR's ``config.json`` that ``path`` names: a :meth:`MergeAR.save_pretrained`
    directory, or a ``fastvq train mergear`` run, its ``checkpoints/`` or one ``step-*`` checkpoint (verified
    against its manifest; the latest one). ``ValueError`` when it holds no MergeAR."""
    from fastvq.train.checkpoint import resolve_checkpoint
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"resolve_mergear_checkpoint: {path} does not exist")
    if (path / CONFIG_NAME).is_file() and not (path / "manifest.json").is_file():
        ckpt = path
    else:
        ckpt = resolve_checkpoint(path)
    try:
        model = json.loads((ckpt / CONFIG_NAME).read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        model = None
    if model != MODEL_NAME:
        raise ValueError(f"resolve_mergear_checkpoint: {ckpt} holds no MergeAR (config.json model {model!r})")
    return ckpt


class MergeARTrainer:
    """``MergeARTrainer(MergeARTrainConfig(tokenizer=..., ...), resume=None).train()`` (``fastvq train mergear``):
    the frozen tokenizer, its tokens of the data at every keep candidate (:func:`encode_for_mergear`, once), a
    :class:`MergeAR` built for it (``torch.manual_seed(seed)``), and :func:`train_step` to ``steps`` steps or
    ``seconds`` of training wall clock, logging to ``out/metrics.jsonl``.

    Checkpoints (``out/checkpoints/step-NNNNNN``, :func:`fastvq.train.checkpoint.write_checkpoint`: atomic, a
    sha256 manifest, ``latest``): :meth:`MergeAR.save_pretrained`'s ``config.json`` + ``model.safetensors`` and
    ``tokenizer/`` (so the checkpoint alone generates: ``fastvq generate CKPT``), ``train_config.json``,
    ``state.json`` (step, training seconds so far, optimizer groups), ``optim.safetensors`` (AdamW moments),
    ``rng.safetensors`` (the training generator: batches and label dropout draw from it alone). ``resume``
    (``"auto"``: the latest checkpoint of ``out``; or a run / checkpoint path) restores all of it, so a resumed
    run is bit-identical to an uninterrupted one from that checkpoint on (``python_tests/test_mergear_cli.py``)."""

    def __init__(self, config: MergeARTrainConfig, resume: str | None = None, log=print):
        from fastvq.train.checkpoint import LATEST, resolve_checkpoint
        from fastvq.train.config import resume_mismatches
        from fastvq.train.trainer import TrainingError, load_checkpoint_model
        config.validate()
        self.cfg, self.log = config, log
        self.out = Path(config.out)
        self.ckpt_root = self.out / "checkpoints"
        resume_dir = None
        if resume is not None:
            target = self.out if resume == "auto" else Path(resume)
            resume_dir = resolve_checkpoint(target)
            saved = MergeARTrainConfig.from_dict(json.loads((resume_dir / "train_config.json").read_text()))
            diff = resume_mismatches(saved, config, MERGEAR_RESUME_MUTABLE)
            if diff:
                raise TrainingError(f"fastvq train mergear --resume: {resume_dir} was trained with another "
                                    f"configuration: {'; '.join(diff)}. Only {sorted(MERGEAR_RESUME_MUTABLE)} may "
                                    "change; or start a new run with another --out")
        elif (self.ckpt_root / LATEST).exists():
            raise TrainingError(f"fastvq train mergear: {self.out} already holds checkpoints; pass --resume to "
                                "continue that run, or another --out")
        tok_path = resume_dir / "tokenizer" if resume_dir is not None else Path(config.tokenizer)
        if not tok_path.exists():
            raise FileNotFoundError(f"fastvq train mergear: tokenizer checkpoint {tok_path} does not exist")
        self.tokenizer = load_checkpoint_model(tok_path, ema=True).eval()
        for p in self.tokenizer.parameters():
            p.requires_grad_(False)
        if getattr(self.tokenizer, "model_name", None) != "mergevq":
            raise ValueError(f"fastvq train mergear: --tokenizer {config.tokenizer} is a "
                             f"{getattr(self.tokenizer, 'model_name', '?')} tokenizer; MergeAR needs a MergeVQ")
        from fastvq.data import load_dataset
        name, n = config.data_item()
        size = self.tokenizer.config.image_size
        ds = load_dataset(name, "train", channels=self.tokenizer.config.in_channels, image_size=size)
        if not ds.class_names or (ds.labels < 0).any():
            raise ValueError(f"fastvq train mergear: data {name!r} has no class labels (MergeAR is class-conditional:"
                             " fashion_mnist, tuxpaint)")
        pos = ds.fixed_subset(n, seed=0) if 0 < n < len(ds) else list(range(len(ds)))
        t0 = time.perf_counter()
        self.data = encode_for_mergear(self.tokenizer, ds.images(pos) * 2 - 1, ds.labels[pos])
        self.encode_seconds = time.perf_counter() - t0
        if log is not None:
            log(f"fastvq train mergear: encoded {len(pos)} {name}/train images at keeps "
                f"{list(self.data['keep_candidates'])} in {self.encode_seconds:.1f} s")
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items()}
        overrides.setdefault("num_classes", len(ds.class_names))
        overrides.setdefault("class_names", tuple(ds.class_names))
        torch.manual_seed(config.seed)
        self.model = MergeAR.from_tokenizer(self.tokenizer, **overrides)
        self.opt = make_optimizer(self.model, config.lr, config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step, self.seconds = 0, 0.0
        if resume_dir is not None:
            self._load(resume_dir)

    def _load(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        from fastvq.train.trainer import TrainingError, _load_optimizer
        state = json.loads((ckpt / "state.json").read_text())
        saved = MergeAR.from_pretrained(ckpt)
        if saved.config != self.model.config:
            raise TrainingError(f"fastvq train mergear --resume: {ckpt} holds another MergeAR config (or was built "
                                "for another tokenizer)")
        self.model.load_state_dict(saved.state_dict())
        _load_optimizer(self.opt, load_file(str(ckpt / "optim.safetensors")), state["optimizer"], "opt")
        self.generator.set_state(load_file(str(ckpt / "rng.safetensors"))["generator"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        log = self.out / "metrics.jsonl"
        if log.is_file():  # drop what the interrupted run logged after this checkpoint
            from fastvq.train.checkpoint import write_atomic
            kept = [line for line in log.read_text().splitlines() if line.strip()
                    and json.loads(line)["step"] <= self.step]
            write_atomic(log, "".join(line + "\n" for line in kept).encode())

    def save(self) -> Path:
        """Write the checkpoint of the current step (:func:`~fastvq.train.checkpoint.write_checkpoint`)."""
        import shutil
        import tempfile

        from safetensors.torch import save_file

        from fastvq.train.checkpoint import write_checkpoint
        from fastvq.train.trainer import _optimizer_tensors
        opt_tensors, opt_meta = _optimizer_tensors(self.opt, "opt")
        state = {"step": self.step, "seconds": self.seconds, "optimizer": opt_meta, "model_class": "MergeAR",
                 "tokenizer_fingerprint": self.model.config.tokenizer_hash, "encode_seconds": self.encode_seconds}
        self.out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out))
        try:
            self.model.save_pretrained(staging, tokenizer=self.tokenizer)

            def copy(src: Path):
                def write(p: Path) -> None:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, p)
                return write
            writers = {str(p.relative_to(staging)): copy(p) for p in sorted(staging.rglob("*")) if p.is_file()}
            rng = {"generator": self.generator.get_state()}
            writers.update({
                "train_config.json": lambda p: p.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n"),
                "state.json": lambda p: p.write_text(json.dumps(state, indent=1) + "\n"),
                "optim.safetensors": lambda p: save_file(opt_tensors, str(p)),
                "rng.safetensors": lambda p: save_file(rng, str(p)),
            })
            return write_checkpoint(self.ckpt_root, self.step, writers, self.cfg.keep_last)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def train(self) -> Path:
        """Train to ``steps`` (or until ``seconds`` of training), checkpointing every ``ckpt_every`` steps and at
        the end; returns the final checkpoint directory (what ``fastvq generate`` reads)."""
        from fastvq.train.checkpoint import clean_partial
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        clean_partial(self.ckpt_root)
        (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.model.train()
        last = None
        while self.step < cfg.steps and (not cfg.seconds or self.seconds < cfg.seconds):
            t0 = time.perf_counter()
            rec = train_step(self.model, self.opt, self.data, self.step, self.generator, cfg.batch_size, cfg.lr,
                             cfg.warmup, cfg.grad_clip)
            self.seconds += time.perf_counter() - t0
            self.step += 1
            last = None
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, "seconds": round(self.seconds, 3), **rec}) + "\n")
                if self.log is not None:
                    self.log(f"mergear step {self.step}: loss {rec['loss']:.3f} (slot {rec['slot_loss']:.3f}, "
                             f"code {rec['code_loss']:.3f}), open acc {rec['open_accuracy']:.3f}, "
                             f"{self.seconds:.0f} s")
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                last = self.save()
        self.model.eval()
        return last if last is not None else self.save()
