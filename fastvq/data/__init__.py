"""fastvq.data: offline image–caption data sets for training and judging tokenizers (docs/data.md).

Every source comes from an installed package (Debian or PyPI) and is cached as ``.npz`` under
``$FASTVQ_CACHE`` (default ``~/.cache/fastvq``) after its first build. Not imported by ``import fastvq``.

    ds = fastvq.data.load_dataset("fashion_mnist", "train")   # the embedded default
    loader = fastvq.data.make_loader(ds, batch_size=64, seed=0)
"""
from fastvq.data._util import MissingDependencyError, cache_dir
from fastvq.data.dataset import (DATASETS, DEFAULT_DATASET, ImageCaptionDataset, load_arrays, load_dataset,
                                 load_folder, make_loader, seed_worker)
from fastvq.data.sources import SPLITS

__all__ = ["DATASETS", "DEFAULT_DATASET", "SPLITS", "ImageCaptionDataset", "MissingDependencyError", "cache_dir",
           "load_arrays", "load_dataset", "load_folder", "make_loader", "seed_worker"]
