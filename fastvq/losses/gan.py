"""The adversarial part of VQGAN-style tokenizer training: a PatchGAN discriminator, hinge and non-saturating
losses, VQGAN's adaptive weight, the discriminator start / warm-up schedule, and LeCam regularisation."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvq.nn._quantizer import all_reduce_sum_, world_size


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator of pix2pix as used by VQGAN (taming-transformers' ``NLayerDiscriminator``),
    LlamaGen, UniTok and most tokenizers since: images ``[B, in_channels, H, W]`` → patch logits
    ``[B, 1, h, w]`` (30×30 for 256×256 with ``n_layers=3``).

    ``conv4×4/2(in → ndf)``, LeakyReLU(0.2); for ``n = 1 … n_layers−1``: ``conv4×4/2`` to ``ndf·min(2ⁿ, 8)``,
    norm, LeakyReLU; ``conv4×4/1`` to ``ndf·min(2^n_layers, 8)``, norm, LeakyReLU; ``conv4×4/1`` to 1 channel;
    padding 1 everywhere. ``norm``: ``"batch"`` (taming's default; the normed convs then have no bias),
    ``"group"`` (gcd(32, width) groups) or ``"none"``. Conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02)
    (taming's ``weights_init``)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"PatchDiscriminator: norm must be 'batch', 'group' or 'none', got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator: n_layers must be >= 1, got {n_layers}")

        def norm_layer(c):
            return {"batch": lambda: nn.BatchNorm2d(c), "group": lambda: nn.GroupNorm(math.gcd(32, c), c),
                    "none": nn.Identity}[norm]()

        bias = norm != "batch"
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias), norm_layer(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images)


# ---- losses on logits (means over every patch of every image) -------------------------------------------------

def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))`` (VQGAN)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """``−mean D(x̂)``."""
    return -logits_fake.float().mean()


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The standard GAN discriminator loss, ``½ (mean softplus(−D(x)) + mean softplus(D(x̂)))``
    (= ½ (BCE(D(x), 1) + BCE(D(x̂), 0)); taming's "vanilla")."""
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """The non-saturating generator loss, ``mean softplus(−D(x̂))`` (= BCE(D(x̂), 1))."""
    return F.softplus(-logits_fake.float()).mean()


_D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}
_G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def adaptive_gan_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, eps: float = 1e-4,
                        max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, eq. 7): ``λ = ‖∇_w L_nll‖ / (‖∇_w L_G‖ + eps)``, clamped to
    ``[0, max_weight]`` and detached, with ``w = last_layer`` (the decoder's last weight). Gradients come from
    ``torch.autograd.grad`` with ``retain_graph=True``, so the caller's backward still works. Returns a 0-d fp32
    tensor (no host sync)."""
    g_nll = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = g_nll.float().norm() / (g_gan.float().norm() + eps)
    return w.clamp(0.0, max_weight).detach()


def gan_schedule(step: int, start: int = 0, warmup: int = 0) -> float:
    """The adversarial weight factor at training ``step``: 0 before ``start`` (VQGAN's ``disc_start``), then a
    linear ramp ``(step − start) / warmup`` capped at 1 (UniTok's discriminator warm-up; 1 at once when
    ``warmup == 0``)."""
    if step < start:
        return 0.0
    if warmup <= 0:
        return 1.0
    return min(1.0, (step - start) / warmup)


class LeCamEMA(nn.Module):
    """LeCam regularisation of the discriminator (Tseng et al. 2021, "Regularizing GANs under limited data"):

    ``R = mean relu(D(x) − α_F)² + mean relu(α_R − D(x̂))²``, where ``α_R`` and ``α_F`` are exponential moving
    averages (decay 0.99, zero-debiased, as the authors' code) of the mean real and fake logits. In training
    mode each call first folds the batch's detached mean logits into the averages (all-reduced over ranks, so
    every replica holds the same values), then evaluates ``R`` with the updated averages. The averages and
    the update count are persistent buffers; nothing syncs with the host."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCamEMA: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        means = torch.stack((logits_real.detach().float().mean(), logits_fake.detach().float().mean()))
        means = all_reduce_sum_(means) / world_size()
        self.ema_real.mul_(self.decay).add_((1 - self.decay) * means[0])
        self.ema_fake.mul_(self.decay).add_((1 - self.decay) * means[1])
        self.num_updates.add_(1)

    def averages(self) -> tuple[Tensor, Tensor]:
        """The zero-debiased ``(α_R, α_F)`` (0 before the first update)."""
        debias = (1 - torch.full_like(self.ema_real, self.decay).pow(self.num_updates)).clamp_min(1e-12)
        return self.ema_real / debias, self.ema_fake / debias

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        if self.training:
            self.update(logits_real, logits_fake)
        a_real, a_fake = self.averages()
        return (F.relu(logits_real.float() - a_fake).square().mean()
                + F.relu(a_real - logits_fake.float()).square().mean())


class GANLoss(nn.Module):
    """The adversarial loss of a VQGAN-style tokenizer, with its discriminator.

    Generator side (:meth:`generator_loss`): ``disc_weight · s(step) · λ · L_G(D(x̂))`` with ``s`` the
    :func:`gan_schedule` (``disc_start``, ``disc_warmup``) and ``λ`` the :func:`adaptive_gan_weight` over the
    decoder's ``last_layer`` when ``adaptive_weight`` (otherwise 1). The discriminator's parameters get no
    gradient from it. Discriminator side (:meth:`discriminator_loss`): ``L_D(D(x), D(x̂)) + lecam_weight · R``
    on detached images, from ``step >= disc_start`` on. ``disc_loss``/``gen_loss``: ``"hinge"`` or
    ``"non_saturating"``. Outside their active steps both return a zero tensor that needs no backward
    (check :meth:`active`). UniTok: ``disc_weight=0.4``, hinge, adaptive.

    ``discriminator``: any module images → logits; default ``PatchDiscriminator(**disc_kwargs)``.
    """

    def __init__(self, discriminator: nn.Module | None = None, disc_weight: float = 1.0, disc_start: int = 0,
                 disc_warmup: int = 0, disc_loss: str = "hinge", gen_loss: str = "hinge",
                 adaptive_weight: bool = True, adaptive_max: float = 1e4, adaptive_eps: float = 1e-4,
                 lecam_weight: float = 0.0, lecam_decay: float = 0.99, **disc_kwargs):
        super().__init__()
        if disc_loss not in _D_LOSSES:
            raise ValueError(f"GANLoss: disc_loss must be one of {sorted(_D_LOSSES)}, got {disc_loss!r}")
        if gen_loss not in _G_LOSSES:
            raise ValueError(f"GANLoss: gen_loss must be one of {sorted(_G_LOSSES)}, got {gen_loss!r}")
        self.discriminator = discriminator if discriminator is not None else PatchDiscriminator(**disc_kwargs)
        self.disc_weight, self.disc_start, self.disc_warmup = disc_weight, disc_start, disc_warmup
        self.d_loss, self.g_loss = _D_LOSSES[disc_loss], _G_LOSSES[gen_loss]
        self.adaptive_weight, self.adaptive_max, self.adaptive_eps = adaptive_weight, adaptive_max, adaptive_eps
        self.lecam_weight = lecam_weight
        self.lecam = LeCamEMA(lecam_decay) if lecam_weight > 0 else None

    def active(self, step: int) -> bool:
        return step >= self.disc_start

    def generator_loss(self, fake: Tensor, step: int, nll_loss: Tensor | None = None,
                       last_layer: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``fake [B, C, H, W]`` (the reconstruction, with its graph). ``nll_loss`` (the weighted
        reconstruction + perceptual loss) and ``last_layer`` are needed when ``adaptive_weight``. Under
        ``torch.no_grad`` the adaptive weight is 0 (as taming's, which cannot take gradients there).
        Returns ``(loss, {"gan_g", "gan_adaptive_weight", "gan_factor"})``; ``gan_g`` unweighted."""
        factor = self.disc_weight * gan_schedule(step, self.disc_start, self.disc_warmup)
        zero = fake.new_zeros((), dtype=torch.float32)
        if factor == 0.0:
            return zero, {"gan_g": zero, "gan_adaptive_weight": zero, "gan_factor": zero}
        params = [p for p in self.discriminator.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            g = self.g_loss(self.discriminator(fake))
        finally:
            for p in params:
                p.requires_grad_(True)
        if self.adaptive_weight:
            if nll_loss is None or last_layer is None:
                raise ValueError("GANLoss.generator_loss: adaptive_weight=True needs nll_loss and last_layer")
            lam = (adaptive_gan_weight(nll_loss, g, last_layer, self.adaptive_eps, self.adaptive_max)
                   if torch.is_grad_enabled() else zero)
        else:
            lam = torch.ones_like(zero)
        return factor * lam * g, {"gan_g": g.detach(), "gan_adaptive_weight": lam,
                                  "gan_factor": torch.full_like(zero, factor)}

    def discriminator_loss(self, real: Tensor, fake: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``real``, ``fake`` ``[B, C, H, W]`` (detached here). Returns ``(loss, {"gan_d", "lecam",
        "logits_real", "logits_fake"})`` (unweighted terms and the mean logits)."""
        zero = real.new_zeros((), dtype=torch.float32)
        if not self.active(step):
            return zero, {"gan_d": zero, "lecam": zero, "logits_real": zero, "logits_fake": zero}
        lr = self.discriminator(real.detach())
        lf = self.discriminator(fake.detach())
        d = self.d_loss(lr, lf)
        reg = self.lecam(lr, lf) if self.lecam is not None else zero
        return d + self.lecam_weight * reg, {"gan_d": d.detach(), "lecam": reg.detach(),
                                             "logits_real": lr.detach().float().mean(),
                                             "logits_fake": lf.detach().float().mean()}
