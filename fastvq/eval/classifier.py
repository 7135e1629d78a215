"""The Fashion-MNIST classifier behind "generated-image accuracy": a small CNN that fastvq trains once
(fixed seed and settings), caches under ``$FASTVQ_CACHE/models`` with its own test accuracy, and uses to
check that images generated for class c look like class c."""
from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvq.data._util import cache_dir, load_npz, save_npz, stable_hash
from fastvq.eval.metrics import MetricResult

TRAIN_SETTINGS = dict(epochs=3, batch_size=256, lr=2e-3, weight_decay=1e-4, seed=0, optimizer="AdamW",
                      schedule="cosine", augment="random horizontal flip", train_split="fashion_mnist/train (55,000)",
                      eval_split="fashion_mnist/test (10,000)", input="28x28 grey in [0, 1]")


class FashionMNISTNet(nn.Module):
    """conv3×3(16)–pool–conv3×3(32)–pool–conv3×3(64)–pool–fc(128)–fc(10), batch norm, ReLU; 28×28 grey input.
    Small on purpose: it trains in about a minute on 2 CPU cores."""

    def __init__(self):
        super().__init__()

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*block(1, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                                      *block(32, 64), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(inplace=True), nn.Dropout(0.2),
                                  nn.Linear(128, 10))

    def forward(self, x):  # [B, 1, 28, 28] in [0, 1] -> logits [B, 10]
        return self.head(self.features(x))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """[B, 1|3, H, W] in [0, 1] → [B, 1, 28, 28]: RGB to grey (ITU-R 601 luma), area-resized to 28×28."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"fastvq.eval.generated_image_accuracy: images must be [B, 1|3, H, W] in [0, 1], got "
                         f"{tuple(getattr(images, 'shape', ()))}")
    x = images.float().clamp(0, 1)
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return x


def _evaluate(net, x, y, batch=1000):
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).double().mean())


def train_classifier(settings: dict = TRAIN_SETTINGS, n_train: int | None = None, verbose: bool = True):
    """Trains :class:`FashionMNISTNet` on the Fashion-MNIST train split; returns (net, record) with the
    test accuracy. Deterministic for a fixed torch build and thread count."""
    from fastvq.data import load_dataset
    tr, te = load_dataset("fashion_mnist", "train", channels=1), load_dataset("fashion_mnist", "test", channels=1)
    x, y = tr.images(), torch.from_numpy(tr.labels)
    if n_train is not None:
        x, y = x[:n_train], y[:n_train]
    xt, yt = te.images(), torch.from_numpy(te.labels)
    g = torch.Generator().manual_seed(settings["seed"])
    with torch.random.fork_rng():
        torch.manual_seed(settings["seed"])
        net = FashionMNISTNet()
    opt = torch.optim.AdamW(net.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    steps = settings["epochs"] * ((len(x) + settings["batch_size"] - 1) // settings["batch_size"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.time()
    for epoch in range(settings["epochs"]):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), settings["batch_size"]):
            idx = perm[i:i + settings["batch_size"]]
            xb = x[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"fashion_mnist classifier: epoch {epoch + 1}/{settings['epochs']} loss {loss.item():.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    acc = _evaluate(net, xt, yt)
    record = dict(settings, n_train=len(x), test_accuracy=acc, n_test=len(xt), train_seconds=round(time.time() - t0, 1),
                  torch=torch.__version__, threads=torch.get_num_threads())
    return net.eval(), record


_CACHED = {}


def fashion_mnist_classifier(retrain: bool = False, verbose: bool = True):
    """The cached classifier and its record (test accuracy, settings); trained on first use (~1–2 min on
    2 cores) and stored as ``.npz`` (arrays only, no pickle) + JSON record under ``$FASTVQ_CACHE/models``."""
    key = stable_hash("fashion_mnist_classifier", TRAIN_SETTINGS, 1)
    if key in _CACHED and not retrain:
        return _CACHED[key]
    path = cache_dir() / "models" / f"fashion_mnist_classifier-{key}.npz"
    net = FashionMNISTNet()
    names = list(net.state_dict())
    z = None if retrain else load_npz(path, names + ["record"], "fastvq.eval.fashion_mnist_classifier")
    if z is not None:
        try:
            net.load_state_dict({k: torch.from_numpy(z[k]) for k in names})
            record = json.loads(str(z["record"]))
        except Exception as e:  # noqa: BLE001
            import warnings
            warnings.warn(f"fastvq.eval.fashion_mnist_classifier: cache file {path} is corrupt ({e}); retraining",
                          RuntimeWarning, stacklevel=2)
            z = None
    if z is None:
        net, record = train_classifier(verbose=verbose)
        save_npz(path, dict({k: v.detach().numpy() for k, v in net.state_dict().items()},
                            record=np.array(json.dumps(record))))
    for p in net.parameters():
        p.requires_grad_(False)
    _CACHED[key] = (net.eval(), record)
    return _CACHED[key]


def generated_image_accuracy(images: torch.Tensor, labels, classifier=None, split: str | None = None) -> MetricResult:
    """Fraction of generated images that the Fashion-MNIST classifier assigns to the class they were
    generated for. images [B, 1|3, H, W] in [0, 1] (converted by :func:`to_classifier_input`); labels [B]
    the intended classes. The result records the classifier's own test accuracy (its ceiling on real
    images). ``classifier``: a (net, record) pair, default the cached one."""
    net, record = classifier or fashion_mnist_classifier()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if y.shape != (len(images),) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise ValueError(f"fastvq.eval.generated_image_accuracy: labels must be [B] in [0, 10), got {tuple(y.shape)}")
    acc = _evaluate(net, to_classifier_input(images), y)
    return MetricResult("generated_image_accuracy", acc, len(y), split,
                        dict(classifier="fastvq FashionMNISTNet", classifier_test_accuracy=record["test_accuracy"],
                             classifier_settings={k: record[k] for k in TRAIN_SETTINGS}))
