"""Benchmarks of compressed-KV decoding (MergeAR) against what a user writes without fastvq.

One attention layer decoded token by token: 256 steps, B=32 sequences, 12 heads, head dim 64, float32,
at 0%, 44% (256 -> 144 kept) and 86% (256 -> 36 kept) of the cache entries dropped (every sequence has the
same keep pattern, so the hand-sliced SDPA baseline is possible at all). Each step attends the new query
over the kept entries and the token itself, then keeps the token only where it is a first occurrence:

- ``fastvq``: one ``decode_step`` per step: attention over the compacted cache and the token's own row,
  which is kept only for first occurrences (what :meth:`fastvq.nn.CompressedKVCache.attend` runs);
- ``fastvq-ops``: the same step as three ops, ``kv_append`` (the token's row) + ``decode_attention`` +
  ``lengths -= ~keep`` (what ``decode_step`` fuses; the same result bit for bit);
- ``sdpa-sliced``: the same compacted cache, ``scaled_dot_product_attention`` over its slice ``[:n + 1]``
  (the best a user writes by hand; only possible when every sequence keeps the same count);
- ``full-mask``: the uncompressed loop the issue measured: a full-length (static, 256-row) cache of every
  position and a boolean mask hiding the dropped (and future) ones, SDPA over all of it;
- ``full-prefix-mask``: the same over the filled prefix ``[:t + 1]`` only (the cheapest uncompressed loop).

``bytes`` is the K/V cache bytes each implementation reads over the 256 steps (for the bandwidth
fraction); ``rows`` is the number of tokens decoded (B * 256).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch

import torch.nn.functional as F

from fastvq.bench import timed_row
from fastvq.ops import decode_attention, decode_step, kv_append

if TYPE_CHECKING:
    from conftest import BenchConfig
    from pytest_benchmark.fixture import BenchmarkFixture

B, H, D, STEPS = 32, 12, 64, 256
KEPT = {0: 256, 44: 144, 86: 36}  # pruning % -> kept entries of 256


def keep_pattern(kept: int, steps: int = STEPS, seed: int = 0) -> torch.Tensor:
    """[steps] bool with exactly ``kept`` True, position 0 always kept (a first occurrence)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(steps, dtype=torch.bool)
    keep[0] = True
    keep[1 + torch.randperm(steps - 1, generator=gen)[: kept - 1]] = True
    return keep


class DecodeProblem:
    """Pre-generated per-step q, k, v ([STEPS, B, H, D]) and the keep pattern."""

    def __init__(self, kept: int, batch: int = B, heads: int = H, dim: int = D, steps: int = STEPS,
                 dtype: torch.dtype = torch.float32):
        gen = torch.Generator().manual_seed(1)
        self.q, self.k, self.v = (torch.randn(steps, batch, heads, dim, generator=gen).to(dtype) for _ in range(3))
        self.keep = keep_pattern(kept, steps)
        self.keep_list = self.keep.tolist()
        self.keep_b = self.keep[:, None].expand(steps, batch).contiguous()
        self.batch, self.heads, self.dim, self.steps, self.kept, self.dtype = batch, heads, dim, steps, kept, dtype

    def cache_bytes_read(self, impl: str = "fastvq") -> int:
        """K and V bytes an implementation reads over all steps: the kept entries so far and the token
        (compacted caches), every row (full-mask), or the filled prefix (full-prefix-mask)."""
        n, total = 0, 0
        for t in range(self.steps):
            total += {"full-mask": self.steps, "full-prefix-mask": t + 1}.get(impl, n + 1)
            n += int(self.keep_list[t])
        return total * self.batch * self.heads * self.dim * 2 * self.q.element_size()

    def fastvq(self) -> torch.Tensor:
        kc = torch.empty(self.batch, self.heads, self.kept + 1, self.dim, dtype=self.dtype)
        vc = torch.empty_like(kc)
        lengths = torch.zeros(self.batch, dtype=torch.int32)
        out = None
        for t in range(self.steps):
            out = decode_step(self.q[t], kc, vc, lengths, self.k[t], self.v[t], self.keep_b[t])
        return out

    def fastvq_ops(self) -> torch.Tensor:
        kc = torch.empty(self.batch, self.heads, self.kept + 1, self.dim, dtype=self.dtype)
        vc = torch.empty_like(kc)
        lengths = torch.zeros(self.batch, dtype=torch.int32)
        every = torch.ones(self.batch, dtype=torch.bool)
        drop = (~self.keep_b).to(torch.int32)
        out = None
        for t in range(self.steps):
            kv_append(kc, vc, lengths, self.k[t], self.v[t], every)
            out = decode_attention(self.q[t], kc, vc, lengths)
            lengths.sub_(drop[t])
        return out

    def sdpa_sliced(self) -> torch.Tensor:
        kc = torch.empty(self.batch, self.heads, self.kept + 1, self.dim, dtype=self.dtype)
        vc = torch.empty_like(kc)
        n, out = 0, None
        for t in range(self.steps):
            kc[:, :, n] = self.k[t]
            vc[:, :, n] = self.v[t]
            out = F.scaled_dot_product_attention(self.q[t][:, :, None], kc[:, :, : n + 1], vc[:, :, : n + 1])
            n += int(self.keep_list[t])
        return out[:, :, 0]

    def full_mask(self, prefix: bool = False) -> torch.Tensor:
        """A full-length (static) cache of every position and a boolean mask over all of it: the kept
        entries so far and the token itself (later positions are hidden too). ``prefix``: attend only the
        filled prefix ``[:t + 1]`` of the full cache (full_prefix_mask)."""
        kc = torch.zeros(self.batch, self.heads, self.steps, self.dim, dtype=self.dtype)
        vc = torch.zeros_like(kc)
        mask = torch.zeros(self.steps, dtype=torch.bool)
        out = None
        for t in range(self.steps):
            kc[:, :, t] = self.k[t]
            vc[:, :, t] = self.v[t]
            mask[t] = True  # the token sees itself ...
            n = t + 1 if prefix else self.steps
            out = F.scaled_dot_product_attention(self.q[t][:, :, None], kc[:, :, :n], vc[:, :, :n],
                                                 attn_mask=mask[None, None, None, :n])
            mask[t] = self.keep_list[t]  # ... and later tokens see it only if it is kept
        return out[:, :, 0]

    def full_prefix_mask(self) -> torch.Tensor:
        return self.full_mask(prefix=True)


IMPLS: dict[str, Callable[[DecodeProblem], torch.Tensor]] = {
    "fastvq": DecodeProblem.fastvq,
    "fastvq-ops": DecodeProblem.fastvq_ops,
    "sdpa-sliced": DecodeProblem.sdpa_sliced,
    "full-mask": DecodeProblem.full_mask,
    "full-prefix-mask": DecodeProblem.full_prefix_mask,
}
BASELINE = {"full-mask": "naive", "sdpa-sliced": "best"}  # the table's "vs naive" / "vs best" columns




# (pruning %, cache dtype): the three cases, and the 44% one with a bfloat16 cache (what a model
# decoding in bf16 keeps: half the bytes)
LOOP_CASES = [(0, torch.float32), (44, torch.float32), (44, torch.bfloat16), (86, torch.float32)]


@pytest.mark.parametrize(("pruning", "dtype"), LOOP_CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_decode_loop(benchmark: BenchmarkFixture, bench_config: BenchConfig, impl: str, pruning: int,
                     dtype: torch.dtype) -> None:
    batch = bench_config.scaled(B * 16) // 16 or 1  # --fastvq-quick: 2 sequences
    problem = DecodeProblem(KEPT[pruning], batch=batch, dtype=dtype)
    info = {"baseline": BASELINE[impl]} if impl in BASELINE else {}
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    timed_row(benchmark, bench_config, lambda: IMPLS[impl](problem),
        f"decode {STEPS} steps B={batch} H={H} d={D} {name}, {pruning}% pruned (256->{KEPT[pruning]})",
        # (G only orders fastvq.bench's table: by pruning, bf16 after fp32, the loops before the single calls)
        op="decode_attention", impl=impl, N=batch, rows=batch * STEPS,
        G=-pruning - (0.5 if dtype == torch.bfloat16 else 0), bytes=problem.cache_bytes_read(impl), roof="l3_read",
        **info)


CALL_IMPLS = ("fastvq", "sdpa-sliced")


@pytest.mark.parametrize("length", [145, 1024])
@pytest.mark.parametrize("impl", CALL_IMPLS)
def test_decode_call(benchmark: BenchmarkFixture, bench_config: BenchConfig, impl: str, length: int) -> None:
    """One decode_attention call over full caches of ``length`` rows (B=32, 12 heads, d=64, fp32): 145 rows
    (the 44% case's last step, 28.5 MB: L3-resident here) and 1,024 (201 MB: from DRAM). ``bytes`` = K and V."""
    batch = bench_config.scaled(B * 16) // 16 or 1
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(batch, H, D, generator=gen)
    k, v = (torch.randn(batch, H, length, D, generator=gen) for _ in range(2))
    lengths = torch.full((batch,), length, dtype=torch.int32)
    q, k, v, lengths = bench_config.on(q, k, v, lengths)
    if impl == "fastvq":
        fn = lambda: decode_attention(q, k, v, lengths)  # noqa: E731
    else:
        fn = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v)  # noqa: E731
    timed_row(benchmark, bench_config, fn, f"decode_attention B={batch} H={H} L={length} d={D} fp32 (one call)",
        op="decode_attention", impl=impl, N=batch, rows=batch, G=-1000 - length, bytes=k.nbytes + v.nbytes,
        roof="l3_read" if length < 256 else "dram_read", **({"baseline": "best"} if impl == "sdpa-sliced" else {}))
