"""UniTok's multi-codebook quantizer as an nn.Module, on fastvq's mcq ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvq.ops.mcq import mcq_gather, mcq_search

_COSINE_EPS = 1e-6


class MultiCodebookQuantizer(nn.Module):
    """Multi-codebook quantization (MCQ, UniTok): the last dim of ``z`` is split into ``num_codebooks``
    chunks, each quantized to the nearest code of its own codebook.

    ``forward(z)`` with ``z [..., dim]`` returns ``(quantized [..., dim], indices [..., num_codebooks],
    loss)`` like ``vector_quantize_pytorch``. The straight-through estimator passes gradients from
    ``quantized`` to ``z``; ``loss = commitment_weight * mse(z, sg(q)) + codebook_weight * mse(sg(z), q)``
    trains the encoder and the codebooks. With ``metric="cosine"`` (UniTok's setting) chunks and codes are
    L2-normalised, so ``quantized`` holds unit-norm chunks and the loss is taken between unit vectors.

    Training-mode forwards accumulate per-code usage counts (``usage_counts [G, K]``) for
    :meth:`codebook_usage`; :attr:`last_perplexity` holds each codebook's perplexity on the last batch.
    """

    def __init__(self, dim: int = 64, num_codebooks: int = 8, codebook_size: int = 4096, metric: str = "cosine",
                 commitment_weight: float = 0.25, codebook_weight: float = 1.0):
        super().__init__()
        if dim <= 0 or num_codebooks <= 0 or dim % num_codebooks != 0:
            raise ValueError(f"MultiCodebookQuantizer: dim ({dim}) must be a positive multiple of "
                             f"num_codebooks ({num_codebooks})")
        if codebook_size <= 0:
            raise ValueError(f"MultiCodebookQuantizer: codebook_size must be positive, got {codebook_size}")
        if metric not in ("l2", "cosine"):
            raise ValueError(f'MultiCodebookQuantizer: metric must be "l2" or "cosine", got {metric!r}')
        self.dim = dim
        self.num_codebooks = num_codebooks
        self.codebook_dim = dim // num_codebooks
        self.codebook_size = codebook_size
        self.metric = metric
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        # VQGAN/UniTok initialisation: uniform in +-1/K.
        self.codebooks = nn.Parameter(
            torch.empty(num_codebooks, codebook_size, self.codebook_dim).uniform_(-1.0 / codebook_size,
                                                                                  1.0 / codebook_size))
        self.register_buffer("usage_counts", torch.zeros(num_codebooks, codebook_size, dtype=torch.long),
                             persistent=False)
        self.register_buffer("last_perplexity", torch.zeros(num_codebooks), persistent=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"metric={self.metric!r}, commitment_weight={self.commitment_weight}, "
                f"codebook_weight={self.codebook_weight}")

    def _codes(self, indices: Tensor) -> Tensor:
        q = mcq_gather(indices, self.codebooks)  # [..., G, d]
        return F.normalize(q, dim=-1, eps=_COSINE_EPS) if self.metric == "cosine" else q

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if z.shape[-1] != self.dim:
            raise ValueError(f"MultiCodebookQuantizer: z must be [..., {self.dim}], got shape {list(z.shape)}")
        zc = z.reshape(*z.shape[:-1], self.num_codebooks, self.codebook_dim)  # [..., G, d]
        if self.metric == "cosine":
            zc = F.normalize(zc, dim=-1, eps=_COSINE_EPS)
        indices, _ = mcq_search(zc.detach().to(self.codebooks.dtype), self.codebooks.detach(), self.metric)
        q = self._codes(indices).to(zc.dtype)
        loss = (self.commitment_weight * F.mse_loss(zc, q.detach())
                + self.codebook_weight * F.mse_loss(zc.detach(), q))
        quantized = zc + (q - zc).detach()  # straight-through
        if self.training:
            self._update_stats(indices)
        return quantized.reshape(z.shape), indices, loss

    @torch.no_grad()
    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``[..., num_codebooks]`` indices -> ``[..., dim]`` codes (unit-norm chunks for cosine)."""
        return self._codes(indices).reshape(*indices.shape[:-1], self.dim)

    @torch.no_grad()
    def _update_stats(self, indices: Tensor) -> None:
        G, K = self.num_codebooks, self.codebook_size
        flat = indices.reshape(-1, G) + torch.arange(G, device=indices.device) * K
        counts = torch.bincount(flat.reshape(-1), minlength=G * K).view(G, K)
        self.usage_counts += counts
        p = counts.float() / counts.sum(-1, keepdim=True).clamp_min(1)
        self.last_perplexity.copy_(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum(-1)))

    @torch.no_grad()
    def codebook_usage(self) -> Tensor:
        """Fraction of each codebook's codes picked at least once since the last reset: float ``[G]``."""
        return (self.usage_counts > 0).float().mean(-1)

    @torch.no_grad()
    def reset_usage(self) -> None:
        self.usage_counts.zero_()
        self.last_perplexity.zero_()
