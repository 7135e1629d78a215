"""Cached image–caption data sets, deterministic splits, and data loaders that work under
``torch.distributed`` (``DistributedSampler``) with seeded workers."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastvq.data import sources
from fastvq.data._util import cache_dir, load_npz, save_npz, stable_hash

DATASETS = tuple(sources.BUILDERS)
# The embedded default for the main job and the tests: Fashion-MNIST needs one Debian package and nothing
# else (no renderer, no font, no PyPI package), builds in seconds, and carries labels, which the probe,
# zero-shot and generated-image-accuracy metrics need.
DEFAULT_DATASET = "fashion_mnist"
FORMAT_VERSION = 1  # bump when a builder's output changes: old cache files are then ignored
_ARRAYS = ("images", "captions", "labels", "keys", "splits", "class_names", "meta")


def cache_path(name: str, options: dict) -> Path:
    """The cache file of data set ``name`` built with ``options``."""
    return cache_dir() / "data" / f"{name}-{stable_hash(name, FORMAT_VERSION, options)}.npz"


def _validate(z: dict, name: str) -> None:
    n = len(z["images"])
    if z["images"].dtype != np.uint8 or z["images"].ndim != 4 or z["images"].shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, H, W, 1|3], got {z['images'].dtype} {z['images'].shape}")
    for k in ("captions", "labels", "keys", "splits"):
        if len(z[k]) != n:
            raise ValueError(f"{k} has {len(z[k])} entries for {n} images")
    if z["captions"].dtype.kind != "U" or z["keys"].dtype.kind != "U":
        raise ValueError("captions and keys must be str arrays")
    if z["splits"].size and (z["splits"].min() < 0 or z["splits"].max() > 2):
        raise ValueError("splits must be 0, 1 or 2")
    if len(z["class_names"]) and z["labels"].size and z["labels"].max() >= len(z["class_names"]):
        raise ValueError("labels exceed class_names")
    meta = json.loads(str(z["meta"]))
    if meta.get("name") != name or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"meta names {meta.get('name')!r} format {meta.get('format')}, expected {name!r} {FORMAT_VERSION}")


def load_arrays(name: str, *, rebuild: bool = False, **options) -> dict:
    """The arrays of data set ``name`` (all splits): read from the cache, or built and cached. A cache
    file that cannot be read or fails validation is rebuilt, not trusted (with a warning)."""
    who = f"fastvq.data.load_dataset({name!r})"
    if name == "folder":
        if not options.get("root"):
            raise ValueError("fastvq.data.load_dataset('folder'): root must name the folder, got none")
        root = Path(options["root"]).resolve()
        cap = root / options.get("captions_file", "captions.jsonl")
        stat = cap.stat() if cap.is_file() else None
        key_opts = dict(options, root=str(root), stamp=[stat.st_size, stat.st_mtime_ns] if stat else None)
        builder = sources.build_folder
    elif name in sources.BUILDERS:
        key_opts, builder = options, sources.BUILDERS[name]
    else:
        raise ValueError(f"fastvq.data.load_dataset: name must be one of {DATASETS + ('folder',)}, got {name!r}")
    path = cache_path(name, key_opts)
    z = None if rebuild else load_npz(path, _ARRAYS, who)
    if z is not None:
        try:
            _validate(z, name)
            return z
        except Exception as e:  # noqa: BLE001
            import warnings
            warnings.warn(f"{who}: cache file {path} is corrupt ({e}); rebuilding it", RuntimeWarning, stacklevel=2)
    raw = builder(**options)
    meta = dict(raw.meta, name=name, format=FORMAT_VERSION, options=key_opts, n=len(raw.captions))
    z = dict(images=np.ascontiguousarray(raw.images, dtype=np.uint8), captions=np.array(raw.captions, dtype=str),
             labels=np.asarray(raw.labels, np.int64), keys=np.array(raw.keys, dtype=str),
             splits=np.asarray(raw.splits, np.int8), class_names=np.array(raw.class_names, dtype=str),
             meta=np.array(json.dumps(meta)))
    if z["class_names"].size == 0:
        z["class_names"] = np.zeros(0, dtype="<U1")
    _validate(z, name)
    save_npz(path, z)
    return z


class ImageCaptionDataset(torch.utils.data.Dataset):
    """One split of an image–caption data set.

    ``ds[i]`` is a dict: ``image`` float32 [C, H, W] in [0, 1], ``caption`` str, ``label`` int (-1 when the
    set has none), ``index`` int (the item's index in the whole set, which names it in recorded image lists).
    ``channels=3`` repeats grey images to RGB; ``image_size`` resizes (bilinear, antialiased) on access.
    """

    def __init__(self, arrays: dict, name: str, split: str, channels: int | None = 3, image_size: int | None = None):
        if split not in sources.SPLITS + ("all",):
            raise ValueError(f"fastvq.data.ImageCaptionDataset: split must be one of {sources.SPLITS + ('all',)}, "
                             f"got {split!r}")
        if channels not in (None, 1, 3):
            raise ValueError(f"fastvq.data.ImageCaptionDataset: channels must be None, 1 or 3, got {channels!r}")
        self.name, self.split, self.channels, self.image_size = name, split, channels, image_size
        self._images = arrays["images"]
        self._captions = arrays["captions"]
        self._labels = arrays["labels"]
        self._keys = arrays["keys"]
        self.class_names = [str(c) for c in arrays["class_names"]]
        self.meta = json.loads(str(arrays["meta"]))
        sel = np.arange(len(self._images)) if split == "all" else np.flatnonzero(
            arrays["splits"] == sources.SPLITS.index(split))
        self.indices = sel.astype(np.int64)  # [n] indices into the whole set

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def captions(self) -> list:
        return [str(c) for c in self._captions[self.indices]]

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self.indices]

    @property
    def keys(self) -> list:
        return [str(k) for k in self._keys[self.indices]]

    def _convert(self, x: torch.Tensor) -> torch.Tensor:  # uint8 [B, H, W, C] -> float [B, C', H', W']
        x = x.permute(0, 3, 1, 2).float().div_(255)
        if self.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif self.channels == 1 and x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 1)
        return x.contiguous()

    def images(self, positions=None) -> torch.Tensor:
        """Images at ``positions`` of this split (all when None) as float32 [B, C, H, W] in [0, 1]."""
        pos = np.arange(len(self)) if positions is None else np.asarray(positions, np.int64)
        return self._convert(torch.from_numpy(self._images[self.indices[pos]]))

    def __getitem__(self, i: int) -> dict:
        g = int(self.indices[i])
        return dict(image=self._convert(torch.from_numpy(self._images[g:g + 1]))[0], caption=str(self._captions[g]),
                    label=int(self._labels[g]), index=g)

    def fixed_subset(self, n: int, seed: int = 0) -> np.ndarray:
        """Positions of ``n`` items of this split chosen by a permutation with ``seed``: the same list on
        every machine and run, and nested (the first n of a larger subset). Metrics record it."""
        if not 0 < n <= len(self):
            raise ValueError(f"{type(self).__name__}.fixed_subset: n must be in [1, {len(self)}], got {n}")
        return np.random.default_rng(seed).permutation(len(self))[:n]

    def __repr__(self):
        return (f"ImageCaptionDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"image={tuple(self[0]['image'].shape) if len(self) else None}, classes={len(self.class_names)})")


def load_dataset(name: str = DEFAULT_DATASET, split: str = "train", *, channels: int | None = 3,
                 image_size: int | None = None, rebuild: bool = False, **options) -> ImageCaptionDataset:
    """One split (``"train"``, ``"val"``, ``"test"`` or ``"all"``) of an offline image–caption data set:
    ``"fashion_mnist"`` (the default), ``"emoji"``, ``"tuxpaint"``, ``"openclipart"``, or ``"folder"``
    (``root=...``). ``options`` go to the builder (``resolution``, ``subset``, ``limit``); the set is
    built once and cached under ``$FASTVQ_CACHE/data`` (see docs/data.md)."""
    return ImageCaptionDataset(load_arrays(name, rebuild=rebuild, **options), name, split, channels, image_size)


def load_folder(root, split: str = "train", *, image_size: int | None = None, channels: int | None = 3,
                captions_file: str = "captions.jsonl", rebuild: bool = False) -> ImageCaptionDataset:
    """A user folder of images with ``captions.jsonl`` (see :func:`fastvq.data.sources.build_folder`)."""
    arrays = load_arrays("folder", rebuild=rebuild, root=str(root), image_size=image_size, captions_file=captions_file)
    return ImageCaptionDataset(arrays, "folder", split, channels)


# ---- loading under torch.distributed ------------------------------------------------------------------

def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seeds Python's and numpy's RNGs from the worker's torch seed, which the loader
    derives from its generator (so the whole pipeline is fixed by one seed)."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                num_workers: int = 0, rank: int | None = None, world_size: int | None = None, **kwargs):
    """A DataLoader over ``dataset`` with a ``DistributedSampler`` (rank and world size from
    ``torch.distributed`` when initialised, else 0 and 1): every rank reads a disjoint shard, the order
    is fixed by ``seed`` and the epoch (call ``loader.sampler.set_epoch(e)`` each epoch), and workers
    are seeded by :func:`seed_worker` from a generator seeded with ``seed + rank``."""
    if batch_size < 1:
        raise ValueError(f"fastvq.data.make_loader: batch_size must be >= 1, got {batch_size}")
    dist = torch.distributed
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                  seed=seed, drop_last=drop_last)
    g = torch.Generator()
    g.manual_seed(seed + rank)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                       num_workers=num_workers, worker_init_fn=seed_worker, generator=g, **kwargs)
