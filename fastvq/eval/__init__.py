"""fastvq.eval: frozen networks and metrics with exact, recorded definitions (docs/eval.md).

Not imported by ``import fastvq``. Networks come only from installed packages (``FASTVQ_DATA=1 bash
scripts/install.sh``); a missing one raises :class:`fastvq.data.MissingDependencyError` naming the command.
"""
from fastvq.eval.captions import bleu, caption_scores, cider_d
from fastvq.eval.classifier import fashion_mnist_classifier, generated_image_accuracy
from fastvq.eval.metrics import (LINEAR_PROBE_CS, MetricResult, codebook_usage, feature_stats, fid_from_features,
                                 frechet_distance, kid_from_features, linear_probe, psnr, psnr_per_image,
                                 retrieval_recall, ssim, ssim_per_image, zero_shot_classification,
                                 zero_shot_from_features)
from fastvq.eval.networks import (EfficientNetLite0, EncoderOutput, FIDInceptionV3, FrozenImageEncoder,
                                  MiniLMTextEncoder, TimmImageEncoder, extract_features)
from fastvq.eval.recon import DEFAULT_N, ReconstructionEvaluator

__all__ = ["DEFAULT_N", "EfficientNetLite0", "EncoderOutput", "FIDInceptionV3", "FrozenImageEncoder", "LINEAR_PROBE_CS",
           "MetricResult", "MiniLMTextEncoder", "ReconstructionEvaluator", "TimmImageEncoder", "bleu", "caption_scores",
           "cider_d", "codebook_usage", "extract_features", "fashion_mnist_classifier", "feature_stats",
           "fid_from_features", "frechet_distance", "generated_image_accuracy", "kid_from_features", "linear_probe",
           "psnr", "psnr_per_image", "retrieval_recall", "ssim", "ssim_per_image", "zero_shot_classification",
           "zero_shot_from_features"]
