"""Vector quantization with a learned codebook (VQ-VAE / VQGAN), vector-quantize-pytorch's ``VectorQuantize``
on fastvq's ops: nearest-code search (:func:`fastvq.ops.mcq_search`), lookup (:func:`fastvq.ops.mcq_gather`),
per-code sums for the EMA (:func:`fastvq.ops.segment_sum`) and k-means init (:func:`fastvq.ops.kmeans`).

The learning rules, the gradient-accumulation protocol and the DDP semantics are in docs/nn/vector_quantize.md.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.nn._quantizer import (QuantizeOutput, all_gather_rows, all_reduce_sum_, check_mask, fp32_island,
                                  masked_mse, rotation_trick, straight_through, to_channel_last, world_size)
from fastvq.ops.kmeans import kmeans
from fastvq.ops.mcq import mcq_gather, mcq_search
from fastvq.ops.segment import segment_sum

COSINE_EPS = 1e-6  # F.normalize's eps for cosine codebooks (vector-quantize-pytorch's l2norm)
_M32 = 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    """A bijection of ``[0, 2^32)`` (int64 holding 32-bit values) with good avalanche: the integer hash
    finaliser ``h ^= h >> 16; h *= 0x45d9f3b`` (twice), ``h ^= h >> 16``. No product exceeds 2^59."""
    h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32
    h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32
    return (h >> 16) ^ h


def _row_keys(rows: Tensor, step: Tensor) -> Tensor:
    """Pseudo-random priorities of ``rows [n, C, d]`` (float32) for dead-code replacement: int64 ``[n, C]``
    in ``[0, 2^62)``, a hash of the float32 bits ``b_j`` of (up to) three coordinates of each row,
    ``j = 0, s, 2s`` with ``s = max(1, d // 3)``, salted by ``step`` (an int64 scalar tensor). A row's key
    depends on its content only, so the rows a replacement takes are the same however the batch is split
    into micro-batches or over ranks. Everything stays on the device (no host copy in either direction).

    Each 31-bit half is ``mix32((sum_j b_j m_j + salt(step)) mod 2^32) >> 1`` with odd 26-bit
    multipliers ``m_j`` per half (products below 2^58: no int64 overflow)."""
    bits = rows[..., :: max(1, rows.shape[-1] // 3)][..., :3].contiguous().view(torch.int32).long() & _M32
    j = torch.arange(bits.shape[-1], device=rows.device)  # [s]
    halves = []
    for stream in (1, 2):
        mult = (_mix32((j * 0x9E3779B1 + stream * 0x68E31DA4) & _M32) >> 6) | 1
        salt = _mix32((step * 0x85EBCA77 + stream * 0xC2B2AE3D) & _M32)
        halves.append(_mix32(((bits * mult).sum(-1) + salt) & _M32) >> 1)
    return (halves[0] << 31) | halves[1]


class VectorQuantize(nn.Module):
    """Vector quantization with ``vector_quantize_pytorch.VectorQuantize``'s keywords, defaults and outputs.

    ``forward(x)`` maps ``x [..., dim]`` (``[B, dim, *spatial]`` with ``channel_first``) through
    ``project_in`` (a Linear ``dim -> heads * codebook_dim``, only when that differs from ``dim``), splits
    it into ``heads`` vectors ``z`` of ``codebook_dim``, L2-normalises them for ``use_cosine_sim``, finds
    each one's nearest code ``k = argmin_k ||z - e_k||^2`` (cosine: ``argmax_k <z, e_k>/|e_k|``; ties go
    to the smallest ``k``) in one shared codebook or, with ``separate_codebook_per_head``, in its head's
    own, and outputs ``project_out(q)`` with ``q = e_k`` (unit-norm for cosine). Gradients reach ``x``
    through the rotation trick (default) or the straight-through estimator.

    Returns :class:`~fastvq.nn._quantizer.QuantizeOutput` ``(quantized, indices, loss)``: ``quantized``
    in ``x``'s shape and dtype; ``indices`` int64 ``[...]`` (``[..., heads]`` when ``heads > 1``; ``-1``
    at masked positions); ``loss`` a float32 scalar,
    ``commitment_weight * mse(z, sg(q)) + codebook_weight * mse(sg(z), q)`` (the codebook term only with
    ``learnable_codebook``), over the kept positions, in codebook space; 0 in eval mode unless
    ``aux_loss_in_eval``.

    Codebook learning (training-mode forwards; docs/nn/vector_quantize.md has the formulas):

    * EMA (default, ``ema_update``): ``N_k <- decay N_k + (1 - decay) n_k``, ``m_k <- decay m_k +
      (1 - decay) s_k`` with ``n_k``, ``s_k`` the batch's count and sum of the vectors that chose code
      ``k``, then ``e_k = m_k / ((N_k + eps) / (sum N + K eps) * sum N)`` (Laplace smoothing), normalised
      for cosine;
    * ``learnable_codebook``: the codebook is a Parameter trained by the codebook loss (no EMA);
    * ``kmeans_init``: the codebook starts as k-means (``kmeans_iters`` Lloyd iterations) of the first
      training batch;
    * ``threshold_ema_dead_code > 0``: codes whose EMA count ``N_k`` falls below it are replaced by vectors
      of the current batch (their ``N_k`` reset to the threshold).

    Each optimizer step should see one codebook update. By default every training forward is one; with
    ``manual_ema_update=True`` forwards only accumulate the batch statistics and :meth:`update_codebook`
    applies them (EMA and dead-code replacement) once, for gradient accumulation: N micro-batches then one
    ``update_codebook()`` equal one forward of the concatenated batch. Under ``torch.distributed`` (when
    ``sync_codebook``; default: whenever a process group of more than one rank exists) statistics are
    summed over ranks and every random choice is made identically on all ranks, so replicas never diverge.

    Usage statistics (persistent buffers, updated on the device without host syncs): ``usage_counts``
    int64 ``[C, K]`` (C = heads with separate codebooks, else 1) for :meth:`codebook_usage`, and
    ``last_perplexity [C]``, ``exp(entropy)`` of the last update's code distribution.

    The search, losses and statistics run in float32 (``project_in``/``project_out`` too) inside a
    bf16/fp16 autocast region, so autocast picks the same codes as float32; keep the module's parameters
    in float32.

    Differences from vector-quantize-pytorch, on purpose (docs/nn/vector_quantize.md lists them all):
    ``manual_ema_update`` defers the whole step (EMA and dead codes), which gradient accumulation needs
    (theirs defers only the codebook recomputation); ``ema_update`` defaults to ``not learnable_codebook``
    (theirs refuses the combination unless told); the learnable-codebook loss is written as two terms
    (same gradients with the default weights; twice the value); cosine works with a learnable codebook
    (UniTok); dead codes are replaced by vectors chosen by a content hash rather than ``randperm``, so the
    choice is the same across micro-batch splits and ranks; bad arguments raise ``ValueError`` naming
    the module and the argument. Not supported: theirs' research options that need the dense ``[N, K]``
    distance matrix (orthogonal / diversity losses, stochastic sampling, ``topk``, in-place optimizer,
    affine parameters).

    Args:
        dim: channels of ``x``.
        codebook_size: codes per codebook (K).
        codebook_dim: dimension of the codes (default ``dim``, as vector-quantize-pytorch, so ``heads > 1``
            alone projects ``dim -> heads * dim``); ``heads * codebook_dim != dim`` adds project_in/out.
        heads: vectors per position; ``dim`` is split into ``heads`` chunks.
        separate_codebook_per_head: one codebook per head (``[heads, K, codebook_dim]``) instead of one shared.
        decay, eps: of the EMA and of the Laplace smoothing.
        freeze_codebook: no codebook update (k-means, EMA, dead codes; usage is still counted); can be
            overridden per forward.
        kmeans_init, kmeans_iters: k-means init on the first training batch (``initted`` buffer).
        use_cosine_sim: cosine similarity (unit-norm inputs and codes) instead of L2.
        layernorm_after_project_in: a LayerNorm after ``project_in``.
        threshold_ema_dead_code: dead-code threshold on the EMA count (0: off).
        channel_last: ``False`` takes ``[B, dim, *spatial]`` (vector-quantize-pytorch's spelling);
        accept_image_fmap, accept_3d_fmap, channel_first: aliases of ``channel_last=False``.
        commitment_weight: weight of ``mse(z, sg(q))``.
        codebook_weight: weight of ``mse(sg(z), q)`` with ``learnable_codebook``.
        straight_through: the straight-through estimator instead of the rotation trick.
        rotation_trick: default ``dim > 1 and not straight_through``.
        ema_update: default ``not learnable_codebook``.
        learnable_codebook: the codebook is an ``nn.Parameter`` learned by gradient.
        manual_ema_update: accumulate statistics until :meth:`update_codebook`.
        sync_codebook: all-reduce statistics over ranks (default: when distributed).
        aux_loss_in_eval: compute the loss in eval mode too.
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int | None = None, heads: int = 1,
                 separate_codebook_per_head: bool = False, decay: float = 0.8, eps: float = 1e-5,
                 freeze_codebook: bool = False, kmeans_init: bool = False, kmeans_iters: int = 10,
                 use_cosine_sim: bool = False, layernorm_after_project_in: bool = False,
                 threshold_ema_dead_code: float = 0, channel_last: bool = True, accept_image_fmap: bool = False,
                 accept_3d_fmap: bool = False, channel_first: bool = False, commitment_weight: float = 1.0,
                 codebook_weight: float = 1.0, straight_through: bool = False, rotation_trick: bool | None = None,
                 ema_update: bool | None = None, learnable_codebook: bool = False, manual_ema_update: bool = False,
                 sync_codebook: bool | None = None, aux_loss_in_eval: bool = False):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("dim", dim), ("codebook_size", codebook_size), ("heads", heads)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if codebook_dim is None:
            codebook_dim = dim
        if not (isinstance(codebook_dim, int) and codebook_dim >= 1):
            raise ValueError(f"{name}: codebook_dim must be a positive int, got {codebook_dim!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"{name}: decay must be in [0, 1], got {decay}")
        if not eps > 0:
            raise ValueError(f"{name}: eps must be positive, got {eps}")
        if kmeans_iters < 0 or threshold_ema_dead_code < 0 or commitment_weight < 0 or codebook_weight < 0:
            raise ValueError(f"{name}: kmeans_iters, threshold_ema_dead_code, commitment_weight and "
                             f"codebook_weight must be >= 0, got {kmeans_iters}, {threshold_ema_dead_code}, "
                             f"{commitment_weight}, {codebook_weight}")
        if rotation_trick is None:
            rotation_trick = dim > 1 and not straight_through
        if rotation_trick and straight_through:
            raise ValueError(f"{name}: rotation_trick and straight_through are exclusive gradient estimators")
        if ema_update is None:
            ema_update = not learnable_codebook
        if ema_update and learnable_codebook:
            raise ValueError(f"{name}: ema_update=True and learnable_codebook=True are exclusive (a codebook "
                             "learned by gradient is not also an EMA of the data)")

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        self.num_codebooks = heads if separate_codebook_per_head else 1
        self.decay = decay
        self.eps = eps
        self.freeze_codebook = freeze_codebook
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.use_cosine_sim = use_cosine_sim
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.channel_first = bool(channel_first or accept_image_fmap or accept_3d_fmap or not channel_last)
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.rotation_trick = rotation_trick
        self.ema_update = ema_update
        self.learnable_codebook = learnable_codebook
        self.manual_ema_update = manual_ema_update
        self.sync_codebook = sync_codebook
        self.aux_loss_in_eval = aux_loss_in_eval

        inner = heads * codebook_dim
        self.has_projections = inner != dim
        if self.has_projections:
            lin = nn.Linear(dim, inner)
            self.project_in = nn.Sequential(lin, nn.LayerNorm(inner)) if layernorm_after_project_in else lin
            self.project_out = nn.Linear(inner, dim)
        else:
            self.project_in = self.project_out = nn.Identity()

        C, K, d = self.num_codebooks, codebook_size, codebook_dim
        if kmeans_init:
            embed = torch.zeros(C, K, d)
        else:  # vector-quantize-pytorch's init: kaiming-uniform over [C, K, d] (bound sqrt(6 / (K d)))
            embed = nn.init.kaiming_uniform_(torch.empty(C, K, d))
            if use_cosine_sim:
                embed = F.normalize(embed, dim=-1, eps=COSINE_EPS)
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        # vector-quantize-pytorch's codebook state (same names and initial values; its state dicts load)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(C, K))
        self.register_buffer("embed_avg", embed.clone())
        # usage statistics and the step counter that salts dead-code choices
        self.register_buffer("usage_counts", torch.zeros(C, K, dtype=torch.long))
        self.register_buffer("last_perplexity", torch.zeros(C))
        self.register_buffer("update_steps", torch.zeros((), dtype=torch.long))
        # statistics accumulated since the last update_codebook() (not saved: checkpoint after updates)
        self.register_buffer("acc_usage", torch.zeros(C, K), persistent=False)
        if self._tracks_ema:
            self.register_buffer("acc_cluster_size", torch.zeros(C, K), persistent=False)
            self.register_buffer("acc_embed_sum", torch.zeros(C, K, d), persistent=False)
        if threshold_ema_dead_code > 0:  # the K highest-priority vectors seen: replacement candidates
            self.register_buffer("candidates", torch.zeros(K, C, d), persistent=False)
            self.register_buffer("candidate_keys", torch.full((K, C), -1, dtype=torch.long), persistent=False)
        self._pending_forwards = 0  # training forwards since the last update
        self._pending_ema = False  # whether one of them fed the EMA (was not frozen)
        self._initted_known = not kmeans_init  # host-side copy of `initted`, so forwards need no sync

    @property
    def _tracks_ema(self) -> bool:
        return self.ema_update or self.threshold_ema_dead_code > 0

    @property
    def metric(self) -> str:
        return "cosine" if self.use_cosine_sim else "l2"

    @property
    def codebook(self) -> Tensor:
        """The codebook: ``[K, codebook_dim]``, or ``[heads, K, codebook_dim]`` with separate codebooks."""
        return self.embed if self.separate_codebook_per_head else self.embed[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        with torch.no_grad():
            self.embed.copy_(codes if self.separate_codebook_per_head else codes[None])

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"heads={self.heads}, separate_codebook_per_head={self.separate_codebook_per_head}, "
                f"metric={self.metric!r}, ema_update={self.ema_update}, "
                f"learnable_codebook={self.learnable_codebook}, kmeans_init={self.kmeans_init}, "
                f"threshold_ema_dead_code={self.threshold_ema_dead_code}, rotation_trick={self.rotation_trick}")

    # ---- search and lookup -----------------------------------------------------------------------------

    def _search(self, z: Tensor) -> Tensor:
        """``z [N, H, d]`` float32 -> nearest codes ``[N, H]`` int64."""
        embed = self.embed.detach().float()
        if self.separate_codebook_per_head:
            return mcq_search(z, embed, self.metric)[0]
        return mcq_search(z.reshape(-1, 1, self.codebook_dim), embed, self.metric)[0].view(z.shape[:2])

    def _lookup(self, indices: Tensor) -> Tensor:
        """``indices [N, H]`` (``-1`` -> zeros) -> codes ``[N, H, d]`` float32 (unit-norm for cosine),
        differentiable w.r.t. a learnable codebook."""
        embed = self.embed.float()
        if self.separate_codebook_per_head:
            codes = mcq_gather(indices, embed)  # -1 -> zeros
        else:
            codes = mcq_gather(indices.reshape(-1, 1), embed).view(*indices.shape, self.codebook_dim)
        return F.normalize(codes, dim=-1, eps=COSINE_EPS) if self.use_cosine_sim else codes

    def _encode(self, x: Tensor) -> Tensor:
        """``x [..., dim]`` -> ``z [N, H, d]`` float32 in codebook space (normalised for cosine)."""
        z = self.project_in(x.float()).reshape(-1, self.heads, self.codebook_dim)
        return F.normalize(z, dim=-1, eps=COSINE_EPS) if self.use_cosine_sim else z

    # ---- forward -------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor | None = None, lens: Tensor | None = None,
                freeze_codebook: bool | None = None, return_loss_breakdown: bool = False,
                aux_loss_in_eval: bool | None = None):
        """Quantize ``x [..., dim]`` (``[B, dim, *spatial]`` when channel-first).

        Args:
            mask: bool, ``x``'s token shape (``x`` without its channel dim); ``False`` positions get index
                ``-1``, a zero output, and take no part in the loss, the statistics, k-means or dead codes.
            lens: ``[B]`` lengths of ``x [B, N, dim]`` (vector-quantize-pytorch's alternative to ``mask``).
            freeze_codebook: override the module's ``freeze_codebook`` for this call.
            return_loss_breakdown: also return ``{"commitment": ..., "codebook": ...}`` (unweighted).
            aux_loss_in_eval: override the module's ``aux_loss_in_eval`` for this call.
        """
        name = type(self).__name__
        xl, to_input_layout = to_channel_last(x, self.channel_first, name)
        if xl.dim() < 1 or xl.shape[-1] != self.dim:
            layout = "[B, dim, *spatial]" if self.channel_first else "[..., dim]"
            raise ValueError(f"{name}: x must have {self.dim} channels ({layout}), got shape {list(x.shape)}")
        token_shape = xl.shape[:-1]
        if lens is not None:
            if mask is not None or len(token_shape) != 2:
                raise ValueError(f"{name}: lens needs x [B, N, dim] and no mask, got x {list(x.shape)}")
            mask = torch.arange(token_shape[1], device=x.device) < lens.to(x.device)[:, None]
        mask = check_mask(mask, token_shape, x.device, name)
        frozen = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        want_loss = self.training or (self.aux_loss_in_eval if aux_loss_in_eval is None else aux_loss_in_eval)
        H, d = self.heads, self.codebook_dim

        with fp32_island(x.device):
            z = self._encode(xl)  # [N, H, d]
            keep = mask.reshape(-1) if mask is not None else None  # [N]
            if self.training and not frozen and not self._initted_known:
                self._kmeans_init(z.detach(), keep)
            indices = self._search(z.detach())
            if keep is not None:
                indices = indices.masked_fill(~keep[:, None], -1)
            q = self._lookup(indices)  # [N, H, d], before this step's codebook update
            if self.training:
                self._accumulate(z.detach(), indices, frozen)
                if not self.manual_ema_update:
                    self.update_codebook()

            zero = z.new_zeros(())
            commitment = masked_mse(z, q.detach(), keep) if want_loss else zero
            codebook = (masked_mse(z.detach(), q, keep) if want_loss and self.learnable_codebook and not frozen
                        else zero)
            loss = self.commitment_weight * commitment + self.codebook_weight * codebook

            out = q.detach()
            if self.training and z.requires_grad:
                out = rotation_trick(z, out) if self.rotation_trick else straight_through(z, out)
            out = self.project_out(out.reshape(*token_shape, H * d))
            if mask is not None:
                out = out.masked_fill(~mask[..., None], 0.0)
        out = to_input_layout(out.to(x.dtype))
        indices = indices.view(*token_shape, H) if H > 1 else indices.view(token_shape)
        result = QuantizeOutput(out, indices, loss)
        if return_loss_breakdown:
            return result, {"commitment": commitment, "codebook": codebook}
        return result

    # ---- codebook learning ----------------------------------------------------------------------------

    def _rows(self, t: Tensor) -> Tensor:
        """``[N, H, ...]`` -> per-codebook rows ``[n, C, ...]`` (a shared codebook sees N * H rows)."""
        return t if self.separate_codebook_per_head else t.reshape(-1, 1, *t.shape[2:])

    @torch.no_grad()
    def _kmeans_init(self, z: Tensor, keep: Tensor | None) -> None:
        """k-means of the kept vectors of this batch (of all ranks' batches when synced) as the codebook.
        Runs once (sets ``initted``); a batch with every position masked leaves it for the next one."""
        rows = self._rows(z if keep is None else z[keep])  # [n, C, d]
        if self._sync:
            rows = all_gather_rows(rows)
        n, K = rows.shape[0], self.codebook_size
        if n == 0:
            return
        if n < K:
            warnings.warn(f"{type(self).__name__}: k-means init received {n} vectors for {K} codes per "
                          "codebook; vectors are repeated, so some codes start as duplicates")
            rows = rows.repeat(math.ceil(K / n), 1, 1)
        res = kmeans(rows, K, iters=self.kmeans_iters, seed=0, metric=self.metric)
        counts = segment_sum(rows[..., :1], res.indices, K)[1]  # [C, K]
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(res.centroids * counts[..., None])
        self._set_embed_from_ema()
        self.initted.fill_(True)
        self._initted_known = True

    @property
    def _sync(self) -> bool:
        return (world_size() > 1) if self.sync_codebook is None else (self.sync_codebook and world_size() > 1)

    @torch.no_grad()
    def _accumulate(self, z: Tensor, indices: Tensor, frozen: bool) -> None:
        """Add this batch's per-code counts (and, for the EMA, sums and dead-code candidates) to the
        accumulators. ``z [N, H, d]`` float32, ``indices [N, H]`` with ``-1`` for masked rows."""
        rows, idx = self._rows(z), self._rows(indices)  # [n, C, d], [n, C]
        feeds_ema = self._tracks_ema and not frozen
        sums, counts = segment_sum(rows if feeds_ema else rows[..., :1], idx, self.codebook_size)
        self.acc_usage += counts
        self._pending_forwards += 1
        if not feeds_ema:
            return
        self.acc_cluster_size += counts
        self.acc_embed_sum += sums
        self._pending_ema = True
        if self.threshold_ema_dead_code > 0:
            keys = _row_keys(rows, self.update_steps).masked_fill(idx < 0, -1)
            self._keep_top_candidates(torch.cat([self.candidates, rows]), torch.cat([self.candidate_keys, keys]))

    def _keep_top_candidates(self, rows: Tensor, keys: Tensor) -> None:
        """The candidates become the K rows of ``rows [n, C, d]`` with the highest ``keys [n, C]``, best
        first (a key of -1 marks an empty slot or a masked row)."""
        top = keys.topk(self.codebook_size, dim=0)
        self.candidate_keys.copy_(top.values)
        self.candidates.copy_(rows.gather(0, top.indices[..., None].expand(-1, -1, rows.shape[-1])))

    def _set_embed_from_ema(self) -> None:
        """``e_k = m_k / N~_k`` with the Laplace-smoothed counts ``N~_k = (N_k + eps) / (N + K eps) * N``."""
        n = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        embed = self.embed_avg / smoothed[..., None]
        if self.use_cosine_sim:
            embed = F.normalize(embed, dim=-1, eps=COSINE_EPS)
        self.embed.data.copy_(embed)

    @torch.no_grad()
    def update_codebook(self) -> None:
        """Apply the statistics accumulated since the last call: sum them over ranks (when synced), add
        the counts to the usage statistics, then (unless every forward was frozen) one EMA step of
        ``cluster_size`` and ``embed_avg``, the codebook from them (``ema_update``), and the replacement of
        dead codes. Training forwards call it themselves unless ``manual_ema_update``; with it, call it
        once per optimizer step, on every rank. A no-op when nothing was accumulated."""
        if self._pending_forwards == 0:
            return
        ema = self._pending_ema
        if self._sync:
            stats = [self.acc_usage] + ([self.acc_cluster_size, self.acc_embed_sum] if ema else [])
            flat = all_reduce_sum_(torch.cat([t.reshape(-1) for t in stats]))
            for t, part in zip(stats, flat.split([t.numel() for t in stats])):
                t.copy_(part.view_as(t))
        self.usage_counts += self.acc_usage.long()
        p = self.acc_usage / self.acc_usage.sum(-1, keepdim=True).clamp_min(1)
        self.last_perplexity.copy_(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum(-1)))
        if ema:
            self.cluster_size.lerp_(self.acc_cluster_size, 1.0 - self.decay)
            self.embed_avg.lerp_(self.acc_embed_sum, 1.0 - self.decay)
            if self.ema_update:
                self._set_embed_from_ema()
            if self.threshold_ema_dead_code > 0:
                self._replace_dead_codes()
            self.acc_cluster_size.zero_()
            self.acc_embed_sum.zero_()
        self.acc_usage.zero_()
        self.update_steps += 1
        self._pending_forwards, self._pending_ema = 0, False

    def _replace_dead_codes(self) -> None:
        """Codes with ``N_k < threshold`` take the candidates in priority order (the r-th dead code of a
        codebook, in index order, the r-th candidate); ``N_k`` is reset to the threshold and ``m_k`` to the
        new code times it. With fewer candidates than dead codes, the rest wait for a later step."""
        if self._sync:  # every rank ends up with the same K best candidates of all ranks
            self._keep_top_candidates(all_gather_rows(self.candidates), all_gather_rows(self.candidate_keys))
        dead = self.cluster_size < self.threshold_ema_dead_code  # [C, K]
        rank = (dead.long().cumsum(-1) - 1).clamp_min(0)  # [C, K]
        keys = self.candidate_keys.t().gather(1, rank)  # [C, K]
        new = self.candidates.transpose(0, 1).gather(1, rank[..., None].expand(-1, -1, self.codebook_dim))
        replace = dead & (keys >= 0)
        reset = float(self.threshold_ema_dead_code)
        self.embed.data.copy_(torch.where(replace[..., None], new.to(self.embed.dtype), self.embed.data))
        self.cluster_size.copy_(torch.where(replace, torch.full_like(self.cluster_size, reset), self.cluster_size))
        self.embed_avg.copy_(torch.where(replace[..., None], new * reset, self.embed_avg))
        self.candidate_keys.fill_(-1)
        self.candidates.zero_()

    # ---- indices -> codes --------------------------------------------------------------------------------

    def _check_indices(self, indices: Tensor) -> Tensor:
        """``indices [..., heads]`` (``[...]`` for one head) -> ``[N, H]``, checked (one host read)."""
        name = type(self).__name__
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: indices must be an int64 or int32 tensor, got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if self.heads > 1 and (indices.dim() < 1 or indices.shape[-1] != self.heads):
            raise ValueError(f"{name}: indices must be [..., heads={self.heads}], got shape {list(indices.shape)}")
        if indices.numel() and not bool(((indices >= -1) & (indices < self.codebook_size)).all()):
            raise ValueError(f"{name}: indices must be in [-1, {self.codebook_size}) (-1 = masked), got values "
                             f"in [{int(indices.min())}, {int(indices.max())}]")
        return indices.long().reshape(-1, self.heads)

    def _to_channel_first(self, y: Tensor) -> Tensor:
        return y.permute(0, y.dim() - 1, *range(1, y.dim() - 1)) if self.channel_first else y

    @torch.no_grad()
    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes in codebook space: ``indices [..., heads]`` (``[...]`` for one head) -> ``[...,
        heads * codebook_dim]`` float32 (channel-first: ``[B, heads * codebook_dim, *spatial]``); unit-norm
        chunks for cosine; ``-1 -> zeros``."""
        lead = indices.shape[:-1] if self.heads > 1 else indices.shape
        codes = self._lookup(self._check_indices(indices).to(self.embed.device))
        return self._to_channel_first(codes.reshape(*lead, self.heads * self.codebook_dim))

    @torch.no_grad()
    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What ``forward`` outputs (in eval mode) for ``indices``: the codes through ``project_out``, in
        the input layout; positions whose indices are all ``-1`` are zeros. Float32."""
        lead = indices.shape[:-1] if self.heads > 1 else indices.shape
        idx = self._check_indices(indices).to(self.embed.device)
        with fp32_island(idx.device):
            out = self.project_out(self._lookup(idx).reshape(*lead, self.heads * self.codebook_dim))
        out = out.masked_fill((idx < 0).all(-1).view(*lead, 1), 0.0)
        return self._to_channel_first(out)

    # ---- statistics ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def codebook_usage(self) -> Tensor:
        """Fraction of each codebook's codes chosen at least once since the last reset: float32 ``[C]``."""
        return (self.usage_counts > 0).float().mean(-1)

    @torch.no_grad()
    def reset_usage(self) -> None:
        """Zero ``usage_counts`` and ``last_perplexity``."""
        self.usage_counts.zero_()
        self.last_perplexity.zero_()

    # ---- state dicts ---------------------------------------------------------------------------------------

    _vqp_keys = ("embed", "cluster_size", "embed_avg", "initted")
    _legacy_keys: dict[str, str] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also loads vector-quantize-pytorch's state dicts (``_codebook.embed``, ...): buffers fastvq adds
        (usage statistics) keep their current values when the dict lacks them."""
        renames = {f"{prefix}_codebook.{k}": f"{prefix}{k}" for k in self._vqp_keys}
        renames.update({f"{prefix}{old}": f"{prefix}{new}" for old, new in self._legacy_keys.items()})
        found = [k for k in renames if k in state_dict]
        for old in found:
            state_dict[renames[old]] = state_dict.pop(old)
        if found:
            for key in ("cluster_size", "embed_avg", "initted", "usage_counts", "last_perplexity", "update_steps"):
                state_dict.setdefault(prefix + key, getattr(self, key).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted_known = bool(self.initted)  # a host read at load time, not in a training step
