"""fastvq.losses: the tokenizers' training losses (docs/models.md, "Losses").

Not imported by ``import fastvq``. Everything here needs only torch; the default network of
:class:`PerceptualFeatureLoss` (EfficientNet-Lite0, from ``fastvq.eval``) is imported only when that loss is
built without an encoder. Commitment, codebook and entropy losses come from the quantizers (``fastvq.nn``).
"""
from fastvq.losses.contrastive import ClipContrastiveLoss, gather_with_grad
from fastvq.losses.distill import frozen_copy, kl_distillation_loss, self_distillation_loss
from fastvq.losses.gan import (GANLoss, LeCamEMA, PatchDiscriminator, adaptive_gan_weight, gan_schedule,
                               hinge_d_loss, hinge_g_loss, non_saturating_d_loss, non_saturating_g_loss)
from fastvq.losses.reconstruction import PerceptualFeatureLoss, reconstruction_loss

__all__ = ["ClipContrastiveLoss", "GANLoss", "LeCamEMA", "PatchDiscriminator", "PerceptualFeatureLoss",
           "adaptive_gan_weight", "frozen_copy", "gan_schedule", "gather_with_grad", "hinge_d_loss", "hinge_g_loss",
           "kl_distillation_loss", "non_saturating_d_loss", "non_saturating_g_loss", "reconstruction_loss",
           "self_distillation_loss"]
