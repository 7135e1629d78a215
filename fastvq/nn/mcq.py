"""UniTok's multi-codebook quantizer (MCQ) as a preset of :class:`fastvq.nn.VectorQuantize`."""
from __future__ import annotations

import torch
from torch import Tensor

from fastvq.nn.vq import VectorQuantize


class MultiCodebookQuantizer(VectorQuantize):
    """Multi-codebook quantization (MCQ, UniTok, Ma et al. 2025): the last dim of ``x`` is split into
    ``num_codebooks`` chunks, each quantized to the nearest code of its own codebook.

    This is :class:`VectorQuantize` with separate codebooks per head, so everything documented there
    (``forward(x, mask=None, ...)`` returning ``(quantized, indices, loss)``, masks, channel-first input,
    ``get_codes_from_indices`` / ``get_output_from_indices``, EMA, k-means init, dead codes, gradient
    accumulation, DDP, the fp32 island, usage statistics) applies. It takes UniTok's keywords or
    vector-quantize-pytorch's spelling of the same layer:

    =============================  =========================================================================
    UniTok (this class)             VectorQuantize
    =============================  =========================================================================
    ``num_codebooks=8``             ``heads=8, separate_codebook_per_head=True``
    (``dim // num_codebooks``)      ``codebook_dim`` (a different value adds project_in / project_out)
    ``metric="cosine"``             ``use_cosine_sim=True`` (``metric="l2"``: ``use_cosine_sim=False``)
    ``codebooks [G, K, d]``         ``codebook`` / ``embed``
    =============================  =========================================================================

    Defaults that differ from :class:`VectorQuantize`, on purpose (UniTok's training recipe):

    * ``dim=64, num_codebooks=8, codebook_size=4096, metric="cosine"``: UniTok's quantizer (8 codebooks of
      4,096 8-d codes);
    * ``learnable_codebook=True, ema_update=False``: UniTok learns the codebooks by gradient, with the
      codebook loss ``codebook_weight * mse(sg(z), q)`` (``codebook_weight=1.0``), and
      ``commitment_weight=0.25`` (VectorQuantize: EMA codebooks, commitment 1.0). With cosine, the
      codebook loss is taken between unit vectors and codes are normalised at lookup (vector-quantize-pytorch
      refuses cosine with a learnable codebook; UniTok uses it);
    * ``rotation_trick=False``: the straight-through estimator, as UniTok;
    * codebooks start uniform in ``+-1 / codebook_size`` (VQGAN / UniTok), not kaiming-uniform.

    All arguments but ``dim`` are keyword-only: UniTok's positional order ``(dim, num_codebooks,
    codebook_size)`` and vector-quantize-pytorch's ``(dim, codebook_size, codebook_dim)`` differ, so no
    positional call could be read both ways. Any other :class:`VectorQuantize` keyword is passed through
    (``ema_update=True, learnable_codebook=False`` gives an EMA-trained MCQ).

    State dicts of the earlier ``MultiCodebookQuantizer`` (one ``codebooks`` parameter) load.
    """

    _legacy_keys = {"codebooks": "embed"}

    def __init__(self, dim: int = 64, *, num_codebooks: int | None = None, codebook_size: int = 4096,
                 metric: str | None = None, commitment_weight: float = 0.25, codebook_weight: float = 1.0,
                 heads: int | None = None, separate_codebook_per_head: bool = True,
                 codebook_dim: int | None = None, use_cosine_sim: bool | None = None,
                 learnable_codebook: bool = True, ema_update: bool | None = None,
                 rotation_trick: bool | None = False, **kwargs):
        name = type(self).__name__
        if num_codebooks is not None and heads is not None and num_codebooks != heads:
            raise ValueError(f"{name}: num_codebooks ({num_codebooks}) and heads ({heads}) name the same "
                             "thing; pass one")
        G = num_codebooks if num_codebooks is not None else (heads if heads is not None else 8)
        if not separate_codebook_per_head:
            raise ValueError(f"{name}: separate_codebook_per_head must be True (one codebook per chunk); use "
                             "VectorQuantize(heads=..., separate_codebook_per_head=False) for a shared one")
        if metric is not None and metric not in ("l2", "cosine"):
            raise ValueError(f'{name}: metric must be "l2" or "cosine", got {metric!r}')
        if metric is not None and use_cosine_sim is not None and use_cosine_sim != (metric == "cosine"):
            raise ValueError(f"{name}: metric={metric!r} contradicts use_cosine_sim={use_cosine_sim}")
        cosine = use_cosine_sim if use_cosine_sim is not None else (metric or "cosine") == "cosine"
        if codebook_dim is None:
            if not (isinstance(dim, int) and isinstance(G, int) and dim > 0 and G > 0 and dim % G == 0):
                raise ValueError(f"{name}: dim ({dim}) must be a positive multiple of num_codebooks ({G}) "
                                 "(or pass codebook_dim to project)")
            codebook_dim = dim // G
        super().__init__(dim, codebook_size, codebook_dim=codebook_dim, heads=G, separate_codebook_per_head=True,
                         use_cosine_sim=cosine, commitment_weight=commitment_weight,
                         codebook_weight=codebook_weight, learnable_codebook=learnable_codebook,
                         ema_update=ema_update, rotation_trick=rotation_trick, **kwargs)
        if not self.kmeans_init:  # VQGAN / UniTok initialisation: uniform in +-1/K
            with torch.no_grad():
                self.embed.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
                if cosine and not learnable_codebook:  # an EMA cosine codebook is kept unit-norm
                    self.embed.copy_(torch.nn.functional.normalize(self.embed, dim=-1))
                self.embed_avg.copy_(self.embed)

    @property
    def codebooks(self) -> Tensor:
        """The codebooks ``[num_codebooks, codebook_size, codebook_dim]`` (the ``embed`` parameter or buffer)."""
        return self.embed
