"""Metrics with exact definitions (docs/eval.md). Each returns a :class:`MetricResult` that records N,
the data split and the settings, so two numbers are comparable or visibly not."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class MetricResult:
    name: str
    value: float               # the headline number
    n: int                     # images (or captions, queries) it was computed over
    split: str | None = None   # data set + split, e.g. "fashion_mnist/val"
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # secondary numbers (per codebook, per C, std, ...)

    def __float__(self):
        return float(self.value)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=float)


def _pair(x, y, who):
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or not t.is_floating_point():
            raise ValueError(f"{who}: {name} must be a float tensor [B, C, H, W] in [0, 1], got "
                             f"{type(t).__name__} {getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}")
    if x.shape != y.shape:
        raise ValueError(f"{who}: x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{who}: x must hold at least one image, got shape {tuple(x.shape)}")


def quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """What a saved 8-bit image holds: round(clamp(x, 0, 1)·255) / 255, in float64."""
    return torch.round(x.detach().double().clamp(0, 1) * 255) / 255


# ---- PSNR / SSIM --------------------------------------------------------------------------------------

def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] PSNR in dB of each image pair after uint8 rounding, data range 1:
    10·log10(1 / MSE_i), MSE_i over all C·H·W values of image i (inf for identical images)."""
    _pair(x, y, "fastvq.eval.psnr")
    mse = (quantize_uint8(x) - quantize_uint8(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def psnr(x: torch.Tensor, y: torch.Tensor, split: str | None = None) -> MetricResult:
    """Mean over images of the per-image PSNR (never the PSNR of the batch's pooled MSE)."""
    p = psnr_per_image(x, y)
    return MetricResult("psnr", float(p.mean()), len(p), split,
                        dict(data_range=1.0, quantize="uint8", reduction="mean of per-image PSNR",
                             resolution=list(x.shape[1:])), dict(min=float(p.min()), max=float(p.max())))


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    g = torch.exp(-(torch.arange(size, dtype=dtype) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
                   k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """[B] SSIM (Wang et al. 2004) after uint8 rounding, data range L = 1, C1 = (k1·L)², C2 = (k2·L)²:
    local means, variances and covariance under a separable Gaussian window (11 taps, σ = 1.5,
    population statistics), 'valid' positions only (no padding), the SSIM map averaged over positions
    and then over channels (each RGB channel separately, no grey conversion)."""
    _pair(x, y, "fastvq.eval.ssim")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"fastvq.eval.ssim: x must be at least {window}x{window} pixels for the window, "
                         f"got {tuple(x.shape[-2:])}")
    x, y = quantize_uint8(x), quantize_uint8(y)
    c = x.shape[1]
    g = gaussian_window(window, sigma).to(x.device)
    gh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    gv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = k1 ** 2, k2 ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.mean((2, 3)).mean(1)


def ssim(x: torch.Tensor, y: torch.Tensor, split: str | None = None) -> MetricResult:
    """Mean over images of :func:`ssim_per_image`."""
    s = ssim_per_image(x, y)
    return MetricResult("ssim", float(s.mean()), len(s), split,
                        dict(data_range=1.0, quantize="uint8", window="gaussian 11, sigma 1.5", k1=0.01, k2=0.03,
                             padding="valid", channels="per channel, then mean", reduction="mean over images",
                             resolution=list(x.shape[1:])))


# ---- FID / KID ----------------------------------------------------------------------------------------

def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [C] and unbiased covariance [C, C] (divisor N − 1) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"fastvq.eval.feature_stats: features must be [N, C] with N >= 2, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1 Σ2)^{1/2}), in float64. tr((Σ1 Σ2)^{1/2}) is computed as
    Σ_i sqrt(λ_i) over the eigenvalues of the symmetric PSD matrix Σ1^{1/2} Σ2 Σ1^{1/2} (similar to Σ1 Σ2),
    with Σ1^{1/2} from a symmetric eigendecomposition and negative round-off eigenvalues clamped to 0."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"fastvq.eval.frechet_distance: mu must be [C] and sigma [C, C] on both sides, got "
                         f"{tuple(mu1.shape)}, {tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def frechet_distance_from_features(real, fake) -> float:
    """The Fréchet distance of the Gaussian fits of two feature sets [N1, C], [N2, C], computed in the
    sample space: with A_i the centred features, Σ_i = A_iᵀA_i / (N_i − 1), the non-zero eigenvalues of
    Σ1Σ2 are the squared singular values of M = A1 A2ᵀ / sqrt((N1 − 1)(N2 − 1)), so tr((Σ1Σ2)^{1/2}) =
    ‖M‖_* (the sum of its singular values): an [N1, N2] SVD instead of [C, C] eigendecompositions,
    exact, and much cheaper when N < C (e.g. 500 images of 2048-d Inception features)."""
    a1 = torch.as_tensor(np.asarray(real, np.float64))
    a2 = torch.as_tensor(np.asarray(fake, np.float64))
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[1] != a2.shape[1] or min(len(a1), len(a2)) < 2:
        raise ValueError(f"fastvq.eval.feature_stats: features must be [N, C] with N >= 2 and one C, got "
                         f"{tuple(a1.shape)} and {tuple(a2.shape)}")
    mu1, mu2 = a1.mean(0), a2.mean(0)
    c1, c2 = a1 - mu1, a2 - mu2
    n1, n2 = len(a1) - 1, len(a2) - 1
    tr1, tr2 = c1.pow(2).sum() / n1, c2.pow(2).sum() / n2
    tr_covmean = torch.linalg.svdvals(c1 @ c2.T).sum() / math.sqrt(n1 * n2)
    return float((mu1 - mu2).pow(2).sum() + tr1 + tr2 - 2 * tr_covmean)


def fid_from_features(real, fake, split: str | None = None, settings: dict | None = None) -> MetricResult:
    """FID between two sets of features [N, C] (the Fréchet distance of their Gaussian fits; when
    min(N) < C through :func:`frechet_distance_from_features`, else :func:`frechet_distance`). With
    few samples (N < C) the covariances are rank-deficient and FID is biased upward: compare only
    numbers with the same N (recorded)."""
    r, f = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if r.ndim == 2 and f.ndim == 2 and min(len(r), len(f)) < r.shape[1]:
        d = frechet_distance_from_features(r, f)
    else:
        d = frechet_distance(*feature_stats(r), *feature_stats(f))
    return MetricResult("fid", d, min(len(r), len(f)), split, dict(settings or {}, n_real=len(r), n_fake=len(f)))


def _poly_kernel(a, b, d):
    return (a @ b.T / d + 1) ** 3


def kid_from_features(real, fake, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                      split: str | None = None, settings: dict | None = None) -> MetricResult:
    """KID (Bińkowski et al. 2018): the unbiased estimator of MMD² with the kernel k(a, b) = (a·b/C + 1)³,
    averaged over ``n_subsets`` random subsets of m = min(subset_size, N_real, N_fake) items drawn without
    replacement from each side (numpy Generator(seed)); ``details`` has the std over subsets (one subset
    when m equals both set sizes: every subset is then the whole sets). Per subset:
    MMD²_u = Σ_{i≠j} k(x_i,x_j)/(m(m−1)) + Σ_{i≠j} k(y_i,y_j)/(m(m−1)) − 2·Σ_{i,j} k(x_i,y_j)/m²."""
    r = torch.as_tensor(np.asarray(real, np.float64))
    f = torch.as_tensor(np.asarray(fake, np.float64))
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"fastvq.eval.kid: real and fake must be [N, C] with one C, got {tuple(r.shape)}, {tuple(f.shape)}")
    m = min(subset_size, len(r), len(f))
    if m < 2:
        raise ValueError(f"fastvq.eval.kid: needs at least 2 items on each side, got {len(r)} and {len(f)}")
    d = r.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    # when every subset is a whole set on both sides, all subsets give the same value: compute it once
    for _ in range(1 if m == len(r) == len(f) else n_subsets):
        x = r[torch.from_numpy(rng.choice(len(r), m, replace=False))]
        y = f[torch.from_numpy(rng.choice(len(f), m, replace=False))]
        kxx, kyy, kxy = _poly_kernel(x, x, d), _poly_kernel(y, y, d), _poly_kernel(x, y, d)
        mmd = ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
               - 2 * kxy.mean())
        vals.append(float(mmd))
    vals = np.array(vals)
    return MetricResult("kid", float(vals.mean()), min(len(r), len(f)), split,
                        dict(settings or {}, n_subsets=len(vals), subset_size=m, seed=seed, kernel="(a.b/C + 1)^3",
                             estimator="unbiased MMD^2", n_real=len(r), n_fake=len(f)),
                        dict(std=float(vals.std())))


# ---- codebook usage -----------------------------------------------------------------------------------

def codebook_usage(indices: torch.Tensor, codebook_size: int, split: str | None = None) -> MetricResult:
    """Per-codebook usage of code indices ``[..., G]`` (G codebooks; a 1-D tensor is one codebook), each
    in [0, codebook_size); −1 marks a masked position and is ignored. With p_k the frequency of code k:
    usage = |{k: p_k > 0}| / K, entropy H = −Σ p_k ln p_k (nats; ``details`` also in bits and normalised by
    ln K), perplexity = exp(H). ``value`` is the mean usage over codebooks; ``details`` has every list."""
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point():
        raise ValueError(f"fastvq.eval.codebook_usage: indices must be an integer tensor [..., G], got "
                         f"{type(indices).__name__} {getattr(indices, 'dtype', '')}")
    if codebook_size < 1:
        raise ValueError(f"fastvq.eval.codebook_usage: codebook_size must be >= 1, got {codebook_size}")
    idx = indices.reshape(-1, 1) if indices.ndim == 1 else indices.reshape(-1, indices.shape[-1])
    if idx.numel() and (idx.max() >= codebook_size or idx.min() < -1):
        raise ValueError(f"fastvq.eval.codebook_usage: indices must be in [-1, {codebook_size}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    usage, ent, ppl, counts_n = [], [], [], []
    for g in range(idx.shape[1]):
        col = idx[:, g]
        col = col[col >= 0]
        cnt = torch.bincount(col.cpu(), minlength=codebook_size).double()
        n = cnt.sum()
        p = cnt[cnt > 0] / n if n > 0 else cnt[:0]
        h = float(-(p * p.log()).sum()) if n > 0 else 0.0
        usage.append(float((cnt > 0).sum()) / codebook_size)
        ent.append(h)
        ppl.append(math.exp(h))
        counts_n.append(int(n))
    return MetricResult("codebook_usage", float(np.mean(usage)), int(idx.shape[0]), split,
                        dict(codebook_size=codebook_size, num_codebooks=idx.shape[1], ignore_index=-1, log="natural"),
                        dict(usage=usage, entropy_nats=ent, entropy_bits=[h / math.log(2) for h in ent],
                             normalized_entropy=[h / math.log(codebook_size) if codebook_size > 1 else 0.0 for h in ent],
                             perplexity=ppl, counted=counts_n, mean_perplexity=float(np.mean(ppl)),
                             mean_entropy_nats=float(np.mean(ent))))


# ---- zero-shot classification, retrieval, linear probe ------------------------------------------------

def _as_float_tensor(a, who, arg):
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    if t.ndim != 2:
        raise ValueError(f"{who}: {arg} must be [N, D], got {tuple(t.shape)}")
    return t


def zero_shot_from_features(image_features, class_features, labels, topk=(1, 5), split: str | None = None,
                            settings: dict | None = None) -> MetricResult:
    """Top-k accuracy of assigning each image to the class whose text embedding has the highest cosine
    similarity. image_features [N, D]; class_features [L, D], or [L, P, D] for P prompts per class (the
    L2-normalised prompt embeddings are averaged and renormalised: prompt ensembling); labels [N]."""
    who = "fastvq.eval.zero_shot"
    img = F.normalize(_as_float_tensor(image_features, who, "image_features"), dim=-1)
    cls = torch.as_tensor(np.asarray(class_features) if not isinstance(class_features, torch.Tensor) else class_features).double()
    if cls.ndim == 3:
        cls = F.normalize(F.normalize(cls, dim=-1).mean(1), dim=-1)
    elif cls.ndim == 2:
        cls = F.normalize(cls, dim=-1)
    else:
        raise ValueError(f"{who}: class_features must be [L, D] or [L, P, D], got {tuple(cls.shape)}")
    if cls.shape[-1] != img.shape[-1]:
        raise ValueError(f"{who}: image and class features must share D, got {img.shape[-1]} and {cls.shape[-1]}")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if y.shape != (len(img),) or y.min() < 0 or y.max() >= len(cls):
        raise ValueError(f"{who}: labels must be [N] in [0, {len(cls)}), got shape {tuple(y.shape)}")
    sim = img @ cls.T
    ks = [k for k in topk if k <= len(cls)]
    top = sim.topk(max(ks), dim=1).indices
    acc = {f"top{k}": float((top[:, :k] == y[:, None]).any(1).double().mean()) for k in ks}
    return MetricResult("zero_shot_top1", acc["top1"], len(img), split,
                        dict(settings or {}, num_classes=len(cls), similarity="cosine"), acc)


def zero_shot_classification(image_tower, text_tower, images, labels, class_names, templates=("a photo of a {}.",),
                             batch_size: int = 64, split: str | None = None) -> MetricResult:
    """Zero-shot classification through any model's towers: ``image_tower(images [B, 3, H, W]) → [B, D]``
    and ``text_tower(list[str]) → [P, D]`` in one embedding space (e.g. a UniTok model's image and text
    encoders). Class embeddings ensemble ``templates``. fastvq ships no CLIP-like pair: EfficientNet-Lite0
    and MiniLM do not share a space, so pairing them measures nothing."""
    with torch.no_grad():
        feats = torch.cat([torch.as_tensor(image_tower(images[i:i + batch_size])).double()
                           for i in range(0, len(images), batch_size)])
        cls = torch.stack([torch.as_tensor(text_tower([t.format(c) for t in templates])).double() for c in class_names])
    return zero_shot_from_features(feats, cls, labels, split=split,
                                   settings=dict(templates=list(templates), class_names=list(class_names)))


def retrieval_recall(image_features, text_features, text_to_image, ks=(1, 5), split: str | None = None,
                     settings: dict | None = None) -> MetricResult:
    """Image↔text retrieval by cosine similarity. image_features [Ni, D], text_features [Nt, D],
    text_to_image [Nt]: the image each caption describes (several captions may share an image).
    image→text R@k: fraction of images with at least one of their captions among the k most similar
    texts; text→image R@k: fraction of captions whose image is among the k most similar images.
    ``value`` is the mean of the four R@1/R@5 numbers (ks=(1, 5))."""
    who = "fastvq.eval.retrieval_recall"
    img = F.normalize(_as_float_tensor(image_features, who, "image_features"), dim=-1)
    txt = F.normalize(_as_float_tensor(text_features, who, "text_features"), dim=-1)
    t2i = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    if t2i.shape != (len(txt),) or (len(t2i) and (t2i.min() < 0 or t2i.max() >= len(img))):
        raise ValueError(f"{who}: text_to_image must be [Nt] with values in [0, {len(img)}), got {tuple(t2i.shape)}")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"{who}: image and text features must share D, got {img.shape[1]} and {txt.shape[1]}")
    sim = img @ txt.T  # [Ni, Nt]
    out = {}
    own = t2i[None, :] == torch.arange(len(img))[:, None]  # [Ni, Nt] caption t belongs to image i
    for k in ks:
        ki, kt = min(k, len(txt)), min(k, len(img))
        top_t = sim.topk(ki, dim=1).indices                       # [Ni, k]
        out[f"i2t_R@{k}"] = float(own.gather(1, top_t).any(1).double().mean())
        top_i = sim.T.topk(kt, dim=1).indices                     # [Nt, k]
        out[f"t2i_R@{k}"] = float((top_i == t2i[:, None]).any(1).double().mean())
    return MetricResult("retrieval_mean_recall", float(np.mean(list(out.values()))), len(img), split,
                        dict(settings or {}, n_images=len(img), n_texts=len(txt), similarity="cosine"), out)


LINEAR_PROBE_CS = (0.001, 0.01, 0.1, 1.0, 10.0)


def linear_probe(train_features, train_labels, val_features, val_labels, test_features=None, test_labels=None,
                 Cs=LINEAR_PROBE_CS, max_iter: int = 1000, split: str | None = None,
                 settings: dict | None = None) -> MetricResult:
    """Linear probe: features standardised with the train mean/std, multinomial logistic regression
    (scikit-learn, L-BFGS, L2 penalty) fit on train for each C in ``Cs``; C is chosen by validation
    accuracy (the smallest C on a tie) and ``value`` is that model's test accuracy (validation accuracy
    when no test set is given). Every C's validation accuracy is in ``details``."""
    from fastvq.data._util import require_module
    require_module("sklearn", "scikit-learn", "fastvq.eval.linear_probe")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    xtr, xva = np.asarray(train_features, np.float64), np.asarray(val_features, np.float64)
    ytr, yva = np.asarray(train_labels), np.asarray(val_labels)
    if xtr.ndim != 2 or len(xtr) != len(ytr) or xva.ndim != 2 or len(xva) != len(yva):
        raise ValueError(f"fastvq.eval.linear_probe: features must be [N, D] with one label each, got "
                         f"{xtr.shape}/{ytr.shape} and {xva.shape}/{yva.shape}")
    scaler = StandardScaler().fit(xtr)
    xtr, xva = scaler.transform(xtr), scaler.transform(xva)
    val_acc, models = {}, {}
    for c in Cs:
        clf = LogisticRegression(C=c, max_iter=max_iter).fit(xtr, ytr)
        val_acc[str(c)] = float((clf.predict(xva) == yva).mean())
        models[c] = clf
    best = max(Cs, key=lambda c: (val_acc[str(c)], -c))
    details = dict(val_accuracy=val_acc, best_C=best)
    value = val_acc[str(best)]
    n = len(xva)
    if test_features is not None:
        xte = scaler.transform(np.asarray(test_features, np.float64))
        value = float((models[best].predict(xte) == np.asarray(test_labels)).mean())
        details["test_accuracy"] = value
        n = len(xte)
    return MetricResult("linear_probe_accuracy", value, n, split,
                        dict(settings or {}, Cs=list(Cs), solver="lbfgs", penalty="l2", max_iter=max_iter,
                             standardize=True, n_train=len(xtr), n_val=len(xva)), details)
