"""Builders of the offline image–caption sources. Each returns a :class:`Raw` record (uint8 images of one
size, captions, labels, stable keys, split ids) built only from installed packages; fastvq.data caches it.

| name | package(s) | images | captions | labels |
|---|---|---|---|---|
| fashion_mnist | Debian dataset-fashion-mnist | 70,000 28×28 grey | templates over the class name | 10 classes |
| emoji | Debian fonts-noto-color-emoji, PyPI emoji, libraqm0 | ~3,700 RGB (64×64 default) | CLDR name | none |
| tuxpaint | Debian tuxpaint-stamps-default (png/svg/txt only) | ~950 RGB (64×64 default) | the stamp's own English text | 16 top-level categories |
| openclipart | Debian openclipart-svg, PyPI cairosvg | a fixed subset of 8,121 SVGs | title + file name + keywords | 22 top-level folders |
| folder | a user folder + captions.jsonl | any | given | given (optional) |
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from fastvq.data._util import (MissingDependencyError, cache_dir, progress, require_module, require_path,
                               unit_hash)

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2


@dataclasses.dataclass
class Raw:
    images: np.ndarray          # uint8 [N, H, W, C], C in {1, 3}
    captions: list              # N str
    labels: np.ndarray          # int64 [N], -1 = no label
    keys: list                  # N str: where each image came from (stable across builds)
    splits: np.ndarray          # int8 [N]: 0 train, 1 val, 2 test
    class_names: list           # L str
    meta: dict                  # source, license, settings


def hash_splits(keys, val=0.1, test=0.1) -> np.ndarray:
    """Split ids from a sha1 of each key: an item's split never depends on which other items exist."""
    u = np.array([unit_hash(k) for k in keys])
    return np.where(u < 1 - val - test, TRAIN, np.where(u < 1 - test, VAL, TEST)).astype(np.int8)


def _pil(who):
    return require_module("PIL.Image", "pillow", who)


def fit_square(img, size: int, background=(255, 255, 255)) -> np.ndarray:
    """Composites a PIL image over ``background``, pads it to a centred square (the whole object is
    kept) and resizes it to size×size (Lanczos). Returns uint8 [size, size, 3]."""
    from PIL import Image
    img = img.convert("RGBA")
    side = max(img.size)
    canvas = Image.new("RGBA", (side, side), background + (255,))
    canvas.alpha_composite(img, ((side - img.size[0]) // 2, (side - img.size[1]) // 2))
    canvas = canvas.convert("RGB")
    if side != size:
        canvas = canvas.resize((size, size), Image.LANCZOS)
    return np.asarray(canvas, dtype=np.uint8)


# ---- Fashion-MNIST ------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot"]
# Caption templates; item i of a split uses template i % len(...), so captions are fixed by the index.
FASHION_MNIST_TEMPLATES = ["a photo of {}.", "a black and white photo of {}.", "a small greyscale image of {}.",
                           "a product photo of {}.", "a low-resolution picture of {}.", "{} on a black background."]


def _with_article(name: str) -> str:
    return ("an " if name[0].lower() in "aeiou" else "a ") + name
FASHION_MNIST_VAL = 5000  # the last 5,000 items of a fixed permutation (seed 0) of the official train set


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"fashion_mnist: {path} is not an idx uint8 file (magic {magic:#x})")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"fashion_mnist: {path} is truncated ({arr.size} bytes for shape {shape})")
    return arr.reshape(shape)


def build_fashion_mnist(root: str | Path | None = None) -> Raw:
    """Fashion-MNIST (Zalando, MIT) from the Debian package: official train (60k) and test (10k); the
    validation split is 5,000 train items chosen by a fixed permutation. Captions are templates over the
    class name (``"a photo of a sneaker."``); labels are the 10 classes."""
    who = "fastvq.data.load_dataset('fashion_mnist')"
    root = require_path(root or FASHION_MNIST_DIR, "dataset-fashion-mnist", who)
    parts = []
    for name, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(require_path(root / f"{prefix}-images-idx3-ubyte.gz", "dataset-fashion-mnist", who))
        y = _read_idx(require_path(root / f"{prefix}-labels-idx1-ubyte.gz", "dataset-fashion-mnist", who))
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{who}: {name} has {x.shape[0]} images but {y.shape[0]} labels")
        parts.append((name, x, y.astype(np.int64)))
    (_, xtr, ytr), (_, xte, yte) = parts
    splits = np.concatenate([np.zeros(len(xtr), np.int8), np.full(len(xte), TEST, np.int8)])
    val = np.random.default_rng(0).permutation(len(xtr))[-FASHION_MNIST_VAL:]
    splits[val] = VAL
    images = np.concatenate([xtr, xte])[..., None]
    labels = np.concatenate([ytr, yte])
    keys = [f"train/{i}" for i in range(len(xtr))] + [f"test/{i}" for i in range(len(xte))]
    captions = []
    for i, c in enumerate(labels):
        t = FASHION_MNIST_TEMPLATES[i % len(FASHION_MNIST_TEMPLATES)].format(_with_article(FASHION_MNIST_CLASSES[c]))
        captions.append(t[0].upper() + t[1:])
    return Raw(images, captions, labels, keys, splits, list(FASHION_MNIST_CLASSES),
               dict(source="Debian dataset-fashion-mnist", license="MIT",
                    split_rule=f"official test; val = last {FASHION_MNIST_VAL} of permutation(seed 0) of train",
                    templates=FASHION_MNIST_TEMPLATES))


# ---- emoji --------------------------------------------------------------------------------------------

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


def build_emoji(resolution: int = 64, limit: int | None = None) -> Raw:
    """Noto Color Emoji rendered with Pillow (the CBDT bitmap font exists only at size 109 and needs
    the RAQM layout, i.e. libraqm), cropped to the glyph, padded on white to a square and resized to
    ``resolution``. Every fully-qualified emoji of the PyPI ``emoji`` package that the font draws as one
    glyph is kept; the caption is its CLDR name ("grinning face"). Splits: sha1 of the emoji."""
    who = "fastvq.data.load_dataset('emoji')"
    emoji = require_module("emoji", "emoji", who)
    _pil(who)
    from PIL import Image, ImageDraw, ImageFont, features
    font_path = require_path(EMOJI_FONT, "fonts-noto-color-emoji", who)
    if not features.check("raqm"):
        raise MissingDependencyError(f"{who}: Pillow cannot find libraqm (needed to render the colour emoji font); "
                                     "install it with `apt-get install libraqm0`")
    font = ImageFont.truetype(str(font_path), 109, layout_engine=ImageFont.Layout.RAQM)

    def render(text):
        l, t, r, b = font.getbbox(text)
        im = Image.new("RGBA", (r - l, b - t), (255, 255, 255, 0))
        ImageDraw.Draw(im).text((-l, -t), text, font=font, embedded_color=True)
        return im

    notdef = np.asarray(render("\U000EFFFD"))  # a private-use code point: the font's missing-glyph box
    fully = emoji.STATUS["fully_qualified"]
    chars = sorted(e for e, d in emoji.EMOJI_DATA.items() if d["status"] == fully)
    if limit is not None:
        chars = sorted(chars, key=unit_hash)[:limit]
    images, captions, keys = [], [], []
    for e in progress(chars, len(chars), "emoji"):
        im = render(e)
        a = np.asarray(im)
        if im.size[0] > 1.25 * im.size[1] or (a.shape == notdef.shape and np.array_equal(a, notdef)):
            continue  # drawn as several glyphs (a sequence the font lacks) or as the missing-glyph box
        if a[..., 3].max() == 0:
            continue
        images.append(fit_square(im, resolution))
        name = emoji.EMOJI_DATA[e]["en"].strip(":").replace("_", " ")
        captions.append(name[0].upper() + name[1:] + ".")
        keys.append("U+" + "-".join(f"{ord(c):04X}" for c in e))
    return Raw(np.stack(images), captions, np.full(len(images), -1, np.int64), keys, hash_splits(keys), [],
               dict(source="Debian fonts-noto-color-emoji + PyPI emoji", license="OFL-1.1 (font)",
                    resolution=resolution, emoji_version=getattr(emoji, "__version__", "?"), limit=limit))


# ---- Tux Paint stamps ---------------------------------------------------------------------------------

TUXPAINT_SYSTEM_DIR = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_EXTRACTED = Path("/usr/local/share/fastvq/sources/usr/share/tuxpaint/stamps")
TUXPAINT_INSTALL = ("cd /tmp && apt-get download tuxpaint-stamps-default && mkdir -p /usr/local/share/fastvq/sources && "
                    "dpkg-deb --fsys-tarfile tuxpaint-stamps-default_*.deb | tar -x -C /usr/local/share/fastvq/sources "
                    "--wildcards '*.png' '*.svg' '*.txt'")


def tuxpaint_dir() -> Path:
    """Where the stamps are: ``$FASTVQ_TUXPAINT_DIR``, the system package's folder (apt-get install), or
    the png/svg/txt files that scripts/install.sh extracts from the .deb (skipping ~7,800 sound files)
    into /usr/local/share/fastvq/sources (as root) or ``<cache>/sources``."""
    for p in (os.environ.get("FASTVQ_TUXPAINT_DIR"), TUXPAINT_SYSTEM_DIR, TUXPAINT_EXTRACTED,
              cache_dir() / "sources" / "usr/share/tuxpaint/stamps"):
        if p and Path(p).is_dir():
            return Path(p)
    return require_path(TUXPAINT_EXTRACTED, "tuxpaint-stamps-default", "fastvq.data.load_dataset('tuxpaint')",
                        TUXPAINT_INSTALL)


def build_tuxpaint(resolution: int = 64, root: str | Path | None = None, limit: int | None = None) -> Raw:
    """Tux Paint's default stamps (GPL-2; about half are photographs): every png (or svg, rendered with
    cairosvg, when no png exists) that has a .txt, whose first line is the English caption
    ("A blackbird."). Label = the top-level category folder (16). Splits: sha1 of the relative path.
    ``limit``: only that many stamps (the smallest sha1 of their path; a fixed subset for tests)."""
    who = "fastvq.data.load_dataset('tuxpaint')"
    root = Path(root) if root else tuxpaint_dir()
    _pil(who)
    from PIL import Image
    stems = {}
    for p in sorted(root.rglob("*")):
        if p.suffix in (".png", ".svg"):
            stem = p.with_suffix("")
            if p.suffix == ".png" or stem not in stems:  # a png wins over an svg of the same stamp
                stems[stem] = p
    items = [(p, p.with_suffix(".txt")) for p in stems.values() if p.with_suffix(".txt").is_file()]
    if not items:
        raise FileNotFoundError(f"{who}: no stamp with a caption (.png/.svg + .txt) under {root}")
    classes = sorted({p.relative_to(root).parts[0] for p, _ in items})
    if limit is not None:  # a fixed subset: the stamps with the smallest sha1 of their relative path
        items = sorted(items, key=lambda it: unit_hash(str(it[0].relative_to(root))))[:limit]
    images, captions, labels, keys = [], [], [], []
    for p, txt in progress(items, len(items), "tuxpaint"):
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = first[0].strip() if first else ""
        if not caption:
            continue
        if p.suffix == ".svg":
            try:
                im = _render_svg(p.read_bytes(), resolution * 2, who)
            except Exception:  # noqa: BLE001  (a file cairosvg cannot draw is skipped)
                continue
        else:
            im = Image.open(p)
            im.load()
        images.append(fit_square(im, resolution))
        captions.append(caption)
        rel = p.relative_to(root)
        labels.append(classes.index(rel.parts[0]))
        keys.append(str(rel))
    return Raw(np.stack(images), captions, np.array(labels, np.int64), keys, hash_splits(keys), classes,
               dict(source="Debian tuxpaint-stamps-default", license="GPL-2", resolution=resolution, limit=limit))


# ---- OpenClipArt --------------------------------------------------------------------------------------

OPENCLIPART_DIR = Path("/usr/share/openclipart/svg")
_NS = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
       "svg": "http://www.w3.org/2000/svg"}
_VERSION = re.compile(r"[-_ ]?v?\d+(\.\d+)+$|[-_ ]\d+$")


def _render_svg(data: bytes, size: int, who: str):
    """Renders an SVG from a Debian package with cairosvg. Files made by Inkscape/Illustrator declare XML
    entities (``<!ENTITY ns_svg ...>``), which cairosvg's safe mode refuses; those are rendered with
    entity expansion on (no code runs either way; these files come from the distribution's packages)."""
    cairosvg = require_module("cairosvg", "cairosvg", who)
    from PIL import Image
    try:
        png = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size, unsafe=False)
    except Exception as e:  # noqa: BLE001  (defusedxml's EntitiesForbidden)
        if "Entities" not in type(e).__name__:
            raise
        png = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size, unsafe=True)
    im = Image.open(io.BytesIO(png))
    im.load()
    return im


def openclipart_caption(svg: bytes, rel: Path) -> str:
    """The caption of one clip-art file: its title (``dc:title`` or ``<title>``), its file name (version
    suffix removed, separators as spaces) and up to 5 keywords (``dc:subject``), e.g. ``"Steak. Keywords:
    protein, hash, food."``; the folder names stand in when the file has no title or keywords."""
    title, keywords = "", []
    try:
        root = ET.fromstring(svg)
        for el in root.iter(f"{{{_NS['dc']}}}title"):
            if el.text and el.text.strip():
                title = el.text.strip()
                break
        if not title:
            el = root.find("svg:title", _NS)
            title = el.text.strip() if el is not None and el.text else ""
        for el in root.iter(f"{{{_NS['dc']}}}subject"):
            keywords += [li.text.strip() for li in el.iter(f"{{{_NS['rdf']}}}li") if li.text and li.text.strip()]
    except ET.ParseError:
        pass
    name = _VERSION.sub("", rel.stem).replace("_", " ").replace("-", " ").strip()
    junk = {"hash", "svg", "image", "media", "clip art", "clipart"}  # placeholders common in these files
    words = [w.lower().replace("_", " ") for w in dict.fromkeys(keywords)
             if w.lower() not in junk and w.lower() not in name.lower()][:5]
    if not words:
        words = [w.replace("_", " ") for w in rel.parts[:-1][::-1]]
    head = title if title and title.lower() != name.lower() else ""
    text = (f"{head}: {name}" if head else name) or rel.parts[-2]
    return text[0].upper() + text[1:] + ". Keywords: " + ", ".join(words) + "."


def build_openclipart(resolution: int = 64, subset: int | None = 1024, root: str | Path | None = None) -> Raw:
    """OpenClipArt SVGs (public domain) from Debian openclipart-svg, rendered with cairosvg on white. The
    subset is the ``subset`` files with the smallest sha1 of their relative path (fixed, and nested: a
    smaller subset is a prefix of a larger one); ``subset=None`` renders all 8,121 (minutes). Captions
    from title, file name and keywords (:func:`openclipart_caption`); label = the top-level folder."""
    who = "fastvq.data.load_dataset('openclipart')"
    root = require_path(root or OPENCLIPART_DIR, "openclipart-svg", who)
    require_module("cairosvg", "cairosvg", who)
    files = sorted(root.rglob("*.svg"))
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    rels = sorted((str(p.relative_to(root)) for p in files), key=unit_hash)
    if subset is not None:
        rels = rels[:subset]
    images, captions, labels, keys = [], [], [], []
    for rel in progress(rels, len(rels), "openclipart"):
        data = (root / rel).read_bytes()
        try:
            im = _render_svg(data, resolution * 2, who)
        except Exception:  # noqa: BLE001  (a file cairosvg cannot draw is skipped, and counted)
            continue
        img = fit_square(im, resolution)
        if img.min() == 255:
            continue  # nothing drawn
        images.append(img)
        relp = Path(rel)
        captions.append(openclipart_caption(data, relp))
        labels.append(classes.index(relp.parts[0]) if len(relp.parts) > 1 else -1)
        keys.append(rel)
    return Raw(np.stack(images), captions, np.array(labels, np.int64), keys, hash_splits(keys), classes,
               dict(source="Debian openclipart-svg + PyPI cairosvg", license="public domain",
                    resolution=resolution, subset=subset, candidates=len(rels), rendered=len(images)))


# ---- a user folder ------------------------------------------------------------------------------------

def build_folder(root: str | Path, image_size: int | None = None, captions_file: str = "captions.jsonl") -> Raw:
    """A folder of images plus ``captions.jsonl``: one JSON object a line, ``{"file": "a/b.png",
    "caption": "...", "label": 3}`` (label optional; an optional ``"split"`` of train/val/test overrides
    the sha1 split). All images must have one size unless ``image_size`` is given (then each is resized,
    shorter side to image_size, and centre-cropped). Grey images become RGB; alpha is composited on white."""
    who = "fastvq.data.load_folder"
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{who}: root must be a folder, got {str(root)!r}")
    cap_path = root / captions_file
    if not cap_path.is_file():
        raise FileNotFoundError(f"{who}: root {str(root)!r} has no {captions_file} (one JSON object a line: "
                                '{"file": ..., "caption": ..., "label": ...}); a folder needs captions')
    _pil(who)
    from PIL import Image
    rows = []
    for n, line in enumerate(cap_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{who}: {cap_path}:{n} is not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("caption"), str):
            raise ValueError(f"{who}: {cap_path}:{n} must have string 'file' and 'caption', got {line[:200]!r}")
        if row.get("split", "train") not in SPLITS:
            raise ValueError(f"{who}: {cap_path}:{n}: split must be one of {SPLITS}, got {row['split']!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{who}: {cap_path} has no captions")
    raw_labels = [r.get("label") for r in rows]
    str_labels = sorted({lab for lab in raw_labels if isinstance(lab, str)})
    images, sizes = [], {}
    for r in progress(rows, len(rows), "folder"):
        p = (root / r["file"]).resolve()
        if root.resolve() not in p.parents or not p.is_file():
            raise FileNotFoundError(f"{who}: {cap_path} names {r['file']!r}, which is not a file under root")
        im = Image.open(p)
        im.load()
        if image_size is not None:
            im = im.convert("RGBA")
            s = image_size / min(im.size)
            im = im.resize((max(image_size, round(im.size[0] * s)), max(image_size, round(im.size[1] * s))),
                           Image.LANCZOS)
            l, t = (im.size[0] - image_size) // 2, (im.size[1] - image_size) // 2
            im = im.crop((l, t, l + image_size, t + image_size))
        sizes.setdefault(im.size, r["file"])
        if len(sizes) > 1:
            (s0, f0), (s1, f1) = list(sizes.items())[:2]
            raise ValueError(f"{who}: images have mixed sizes ({f0!r} is {s0[0]}x{s0[1]}, {f1!r} is {s1[0]}x{s1[1]}); "
                             "pass image_size=N to resize and centre-crop every image to N x N")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        bg.alpha_composite(im.convert("RGBA"))
        images.append(np.asarray(bg.convert("RGB"), dtype=np.uint8))
    labels = np.array([-1 if lab is None else (str_labels.index(lab) if isinstance(lab, str) else int(lab))
                       for lab in raw_labels], np.int64)
    keys = [r["file"] for r in rows]
    splits = hash_splits(keys)
    for i, r in enumerate(rows):
        if "split" in r:
            splits[i] = SPLITS.index(r["split"])
    n_cls = int(labels.max()) + 1 if labels.max() >= 0 else 0
    classes = str_labels or [str(i) for i in range(n_cls)]
    return Raw(np.stack(images), [r["caption"] for r in rows], labels, keys, splits, classes,
               dict(source=f"folder {root.resolve()}", image_size=image_size))


BUILDERS = {
    "fashion_mnist": build_fashion_mnist,
    "emoji": build_emoji,
    "tuxpaint": build_tuxpaint,
    "openclipart": build_openclipart,
}
