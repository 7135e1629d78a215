"""Captioning metrics: BLEU-4 and CIDEr-D with the COCO caption-evaluation definitions.

``caption_scores(predictions, references)`` uses pycocoevalcap (PTB tokenizer + its Bleu and Cider
scorers) where the package and a Java runtime are installed (``backend="auto"`` or ``"pycocoevalcap"``),
and otherwise fastvq's own implementation (``backend="fastvq"``), which computes the same formulas (tests
check it against pycocoevalcap's scorers on one tokenisation and against hand-computed cases). The two
backends differ only in tokenisation: fastvq's lowercases and keeps runs of letters/digits (with inner
apostrophes), which matches the PTB tokenizer on plain English captions but not on every input.
"""
from __future__ import annotations

import math
import re
import shutil
from collections import Counter

import numpy as np

from fastvq.eval.metrics import MetricResult

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list:
    """fastvq's fallback tokenizer: lowercase, keep [a-z0-9]+ runs (with an inner apostrophe part)."""
    return _TOKEN.findall(text.lower())


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(predictions: dict, references: dict, n: int = 4) -> tuple[float, list]:
    """Corpus BLEU-n of tokenised captions (lists of words), as in the COCO evaluation: clipped n-gram
    precisions p_k = (Σ matches_k + 1e-15) / (Σ candidates_k + 1e-9) over the corpus, BLEU =
    (Π_{k≤n} p_k)^{1/n} · BP with BP = exp(1 − r/c) when c < r, c = total candidate length and r = Σ of
    each caption's closest reference length (the shorter one on a tie). Returns (BLEU-n, [BLEU-1..n])."""
    tiny, small = 1e-15, 1e-9
    match, total = [0] * n, [0] * n
    c_len = r_len = 0
    for key, hyp in predictions.items():
        refs = references[key]
        c_len += len(hyp)
        r_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for k in range(1, n + 1):
            h = _ngrams(hyp, k)
            maxref = Counter()
            for r in refs:
                for g, cnt in _ngrams(r, k).items():
                    maxref[g] = max(maxref[g], cnt)
            match[k - 1] += sum(min(cnt, maxref[g]) for g, cnt in h.items())
            total[k - 1] += max(len(hyp) - k + 1, 0)
    scores, prod = [], 1.0
    bp = math.exp(1 - (r_len + small) / (c_len + tiny)) if (c_len + tiny) / (r_len + small) < 1 else 1.0
    for k in range(n):
        prod *= (match[k] + tiny) / (total[k] + small)
        scores.append(prod ** (1 / (k + 1)) * bp)
    return scores[-1], scores


def cider_d(predictions: dict, references: dict, n: int = 4, sigma: float = 6.0) -> tuple[float, dict]:
    """CIDEr-D (Vedantam et al. 2015, as in the COCO evaluation code) of tokenised captions. For each
    k ≤ n, a caption is a vector of tf·idf weights g(w) = count(w) · (ln |I| − ln max(1, df(w))), df(w)
    = the number of images whose references contain n-gram w, |I| = the number of images. Against
    each reference: s_k = Σ_w min(g_h(w), g_r(w)) · g_r(w) / (‖g_h‖‖g_r‖) · exp(−(ℓ_h − ℓ_r)² / (2σ²))
    (ℓ = word count); CIDEr-D(image) = 10 · mean over references of mean_k s_k; the score is the mean over
    images. Returns (score, per-image scores)."""
    df = Counter()
    for key in predictions:
        seen = set()
        for r in references[key]:
            for k in range(1, n + 1):
                seen.update(_ngrams(r, k))
        df.update(seen)
    log_i = math.log(float(len(predictions)))

    def vec(words):
        v, norms = [], []
        for k in range(1, n + 1):
            g = {w: cnt * (log_i - math.log(max(1.0, df[w]))) for w, cnt in _ngrams(words, k).items()}
            v.append(g)
            norms.append(math.sqrt(sum(x * x for x in g.values())))
        return v, norms, len(words)

    per = {}
    for key, hyp in predictions.items():
        vh, nh, lh = vec(hyp)
        total = 0.0
        for r in references[key]:
            vr, nr, lr = vec(r)
            s = 0.0
            for k in range(n):
                val = sum(min(x, vr[k][w]) * vr[k][w] for w, x in vh[k].items() if w in vr[k])
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                s += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            total += s / n
        per[key] = 10.0 * total / len(references[key])
    return float(np.mean(list(per.values()))), per


def java_available() -> bool:
    return shutil.which("java") is not None


def _check(predictions, references):
    who = "fastvq.eval.caption_scores"
    if not isinstance(predictions, dict) or not isinstance(references, dict):
        raise ValueError(f"{who}: predictions and references must be dicts id -> str / id -> list[str]")
    if not predictions:
        raise ValueError(f"{who}: predictions must not be empty")
    for k, v in predictions.items():
        if not isinstance(v, str):
            raise ValueError(f"{who}: predictions[{k!r}] must be a str, got {type(v).__name__}")
        refs = references.get(k)
        if not refs or isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{who}: references[{k!r}] must be a non-empty list of str, got {refs!r}")


def caption_scores(predictions: dict, references: dict, backend: str = "auto", split: str | None = None) -> dict:
    """BLEU-4 and CIDEr-D of generated captions. predictions: id → caption; references: id → list of
    captions. backend: ``"auto"`` (pycocoevalcap when it and Java are installed, else fastvq),
    ``"pycocoevalcap"`` or ``"fastvq"``. Returns {"bleu4": MetricResult, "cider": MetricResult}."""
    _check(predictions, references)
    if backend not in ("auto", "pycocoevalcap", "fastvq"):
        raise ValueError(f"fastvq.eval.caption_scores: backend must be 'auto', 'pycocoevalcap' or 'fastvq', got {backend!r}")
    if backend == "auto":
        try:
            import pycocoevalcap  # noqa: F401
            backend = "pycocoevalcap" if java_available() else "fastvq"
        except ImportError:
            backend = "fastvq"
    keys = list(predictions)
    if backend == "pycocoevalcap":
        from fastvq.data._util import require_module
        require_module("pycocoevalcap", "pycocoevalcap", "fastvq.eval.caption_scores")
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tok = PTBTokenizer()
        res = tok.tokenize({k: [{"caption": predictions[k]}] for k in keys})
        gts = tok.tokenize({k: [{"caption": r} for r in references[k]] for k in keys})
        b, _ = Bleu(4).compute_score(gts, res, verbose=0)
        c, _ = Cider().compute_score(gts, res)
        b4, blist, cider = float(b[3]), [float(x) for x in b], float(c)
        tokenizer = "PTBTokenizer (Stanford CoreNLP, Java)"
    else:
        res = {k: tokenize(predictions[k]) for k in keys}
        gts = {k: [tokenize(r) for r in references[k]] for k in keys}
        b4, blist = bleu(res, gts)
        cider, _ = cider_d(res, gts)
        tokenizer = "fastvq regex (lowercase [a-z0-9]+)"
    n_refs = sum(len(references[k]) for k in keys)
    settings = dict(backend=backend, tokenizer=tokenizer, n_references=n_refs)
    return {"bleu4": MetricResult("bleu4", b4, len(keys), split, dict(settings, closest_ref_length=True),
                                  dict(bleu1_to_4=blist)),
            "cider": MetricResult("cider_d", cider, len(keys), split, dict(settings, sigma=6.0, n=4, scale=10.0))}
