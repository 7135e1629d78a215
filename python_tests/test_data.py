"""fastvq.data: sources, cache (incl. corrupt files), splits, the distributed loader, bad input."""
import json
import os

import numpy as np
import pytest
import torch

import fastvq.data as data
from fastvq.data import sources
from fastvq.data.dataset import cache_path
from datautil import needs

FMNIST = needs(paths=[sources.FASHION_MNIST_DIR])


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTVQ_PROGRESS", "0")
    return tmp_path / "cache"


@FMNIST
def test_fashion_mnist_splits_captions_labels():
    tr, va, te = (data.load_dataset("fashion_mnist", s) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (55000, 5000, 10000)
    assert len(set(tr.indices) | set(va.indices) | set(te.indices)) == 70000
    assert data.DEFAULT_DATASET == "fashion_mnist"
    item = te[3]
    assert item["image"].shape == (3, 28, 28) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1 and item["image"].max() > 0.5
    assert torch.equal(item["image"][0], item["image"][2])  # grey repeated to RGB
    name = sources.FASHION_MNIST_CLASSES[item["label"]]
    assert name in item["caption"] and item["caption"][0].isupper()
    assert set(np.unique(tr.labels)) == set(range(10)) and tr.class_names[9] == "ankle boot"
    # deterministic: a second load gives the same validation list and the same first image
    va2 = data.load_dataset("fashion_mnist", "val", channels=1, image_size=14)
    assert np.array_equal(va.indices, va2.indices)
    assert va2[0]["image"].shape == (1, 14, 14)
    # the official test images are items 60000..69999 in file order
    assert te.keys[0] == "test/0" and te.indices[0] == 60000


@FMNIST
def test_cache_reused_and_corrupt_file_rebuilt(tmp_cache):
    ds = data.load_dataset("fashion_mnist", "test")
    path = cache_path("fashion_mnist", {})
    assert path.is_file() and path.parent.parent == tmp_cache
    mtime = path.stat().st_mtime_ns
    data.load_dataset("fashion_mnist", "test")
    assert path.stat().st_mtime_ns == mtime  # read, not rebuilt
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match=r"load_dataset\('fashion_mnist'\).*corrupt"):
        again = data.load_dataset("fashion_mnist", "test")
    assert np.array_equal(again.images(np.arange(5)), ds.images(np.arange(5)))
    # a readable file with wrong content (labels of the wrong length) is rebuilt too, not trusted
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["labels"] = arrays["labels"][:10]
    np.savez(path, **arrays)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert len(data.load_dataset("fashion_mnist", "test").labels) == 10000
    # a file holding a pickled object array is refused (allow_pickle=False), never executed
    arrays = {k: v for k, v in arrays.items()}
    arrays["captions"] = np.array([object()] * 3, dtype=object)
    np.savez(path, **arrays)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        data.load_dataset("fashion_mnist", "test")


def test_unknown_name_and_bad_split():
    with pytest.raises(ValueError, match=r"load_dataset: name must be one of .*'nope'"):
        data.load_dataset("nope")
    with pytest.raises(ValueError, match="split must be one of"):
        data.ImageCaptionDataset({"images": np.zeros((1, 2, 2, 1), np.uint8)}, "x", "validation")


def test_missing_package_names_install_command(monkeypatch, tmp_cache):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", sources.Path("/nonexistent/fashion-mnist"))
    with pytest.raises(data.MissingDependencyError, match=r"apt-get install dataset-fashion-mnist.*install\.sh"):
        data.load_dataset("fashion_mnist")
    from fastvq.data._util import package_file, require_module
    with pytest.raises(data.MissingDependencyError, match=r"pip install no-such-pkg"):
        require_module("no_such_module_xyz", "no-such-pkg", "who")
    with pytest.raises(data.MissingDependencyError, match=r"pip install --no-deps fid-x"):
        package_file("no_such_module_xyz", "a.pt", "fid-x", "who", extra="--no-deps ")


def _write_folder(root, sizes, captions=True):
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(sizes):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (s[1], s[0], 3), dtype=np.uint8)).save(root / f"img{i}.png")
        rows.append({"file": f"img{i}.png", "caption": f"picture number {i}", "label": ["cat", "dog"][i % 2]})
    if captions:
        (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


@needs("PIL")
def test_folder(tmp_path, tmp_cache):
    rows = _write_folder(tmp_path / "f", [(20, 16)] * 12)
    ds = data.load_folder(tmp_path / "f", "all")
    assert len(ds) == 12 and ds[0]["image"].shape == (3, 16, 20)
    assert ds.captions == [r["caption"] for r in rows]
    assert ds.class_names == ["cat", "dog"] and list(ds.labels[:4]) == [0, 1, 0, 1]
    from PIL import Image
    px = np.array(Image.open(tmp_path / "f" / "img3.png"))
    assert torch.equal(ds[3]["image"], torch.from_numpy(px).permute(2, 0, 1).float() / 255)
    n = sum(len(data.load_folder(tmp_path / "f", s)) for s in data.SPLITS)
    assert n == 12


@needs("PIL")
def test_folder_errors(tmp_path, tmp_cache):
    _write_folder(tmp_path / "nocap", [(8, 8)] * 2, captions=False)
    with pytest.raises(FileNotFoundError, match=r"load_folder: root .* has no captions\.jsonl"):
        data.load_folder(tmp_path / "nocap")
    _write_folder(tmp_path / "mixed", [(16, 16), (16, 16), (24, 12)])
    with pytest.raises(ValueError, match=r"load_folder: images have mixed sizes.*image_size="):
        data.load_folder(tmp_path / "mixed")
    ds = data.load_folder(tmp_path / "mixed", "all", image_size=10)
    assert ds.images().shape == (3, 3, 10, 10)
    (tmp_path / "mixed" / "captions.jsonl").write_text('{"file": "img0.png"}\n')
    with pytest.raises(ValueError, match="must have string 'file' and 'caption'"):
        data.load_folder(tmp_path / "mixed", rebuild=True)
    with pytest.raises(FileNotFoundError, match="root must be a folder"):
        data.load_folder(tmp_path / "absent")


@needs("emoji", "PIL", paths=[sources.EMOJI_FONT])
def test_emoji_subset(tmp_cache):
    ds = data.load_dataset("emoji", "all", limit=12)
    assert 8 <= len(ds) <= 12 and ds[0]["image"].shape == (3, 64, 64)
    x = ds.images()
    assert (x < 0.9).float().mean() > 0.05  # something coloured is drawn on the white square
    assert all(c.endswith(".") and len(c) > 3 for c in ds.captions)


@needs("PIL", "cairosvg")
def test_tuxpaint_subset(tmp_cache):
    try:
        sources.tuxpaint_dir()
    except data.MissingDependencyError:
        if os.environ.get("FASTVQ_REQUIRE_DATA") == "1":
            raise
        pytest.skip("Tux Paint stamps not extracted")
    ds = data.load_dataset("tuxpaint", "all", limit=10)
    assert len(ds) == 10 and len(ds.class_names) == 16
    assert all(c and c[0].isupper() for c in ds.captions)
    assert ds.images().shape == (10, 3, 64, 64)


@needs("PIL", "cairosvg", paths=[sources.OPENCLIPART_DIR])
def test_openclipart_subset_and_captions(tmp_cache):
    ds = data.load_dataset("openclipart", "all", subset=8)
    assert 6 <= len(ds) <= 8 and "Keywords:" in ds.captions[0]
    assert ds.meta["subset"] == 8 and ds.images().shape[1:] == (3, 64, 64)
    svg = b"""<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
      xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><metadata><dc:title>Red apple</dc:title>
      <dc:subject><rdf:Bag><rdf:li>fruit</rdf:li><rdf:li>hash</rdf:li><rdf:li>food</rdf:li></rdf:Bag></dc:subject>
      </metadata></svg>"""
    cap = sources.openclipart_caption(svg, sources.Path("food/fruit/apple-v0.2.svg"))
    assert cap == "Red apple: apple. Keywords: fruit, food."


class _Noise(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i), float(np.random.rand())])


def test_loader_distributed_and_seeded_workers():
    ds = _Noise()
    shards = [torch.cat(list(data.make_loader(ds, 3, seed=5, rank=r, world_size=2)))[:, 0] for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))  # disjoint, complete
    again = torch.cat(list(data.make_loader(ds, 3, seed=5, rank=0, world_size=2)))[:, 0]
    assert torch.equal(again, shards[0])
    ld = data.make_loader(ds, 3, seed=5, rank=0, world_size=2)
    ld.sampler.set_epoch(1)
    assert not torch.equal(torch.cat(list(ld))[:, 0], shards[0])
    a = torch.cat(list(data.make_loader(ds, 2, seed=1, num_workers=2)))
    b = torch.cat(list(data.make_loader(ds, 2, seed=1, num_workers=2)))
    assert torch.equal(a, b) and a[:, 1].unique().numel() == 10  # numpy RNG seeded per worker, reproducibly
    with pytest.raises(ValueError, match="make_loader: batch_size must be >= 1"):
        data.make_loader(ds, 0)


def test_hash_splits_stable():
    keys = [f"k{i}" for i in range(2000)]
    s = sources.hash_splits(keys)
    assert np.array_equal(s[:100], sources.hash_splits(keys[:100]))  # independent of the other items
    frac = np.bincount(s, minlength=3) / len(s)
    assert abs(frac[0] - 0.8) < 0.04 and abs(frac[1] - 0.1) < 0.03


def test_kernel_layer_does_not_import_data_or_eval():
    import subprocess
    import sys
    code = ("import sys, fastvq; bad = [m for m in ('fastvq.data', 'fastvq.eval', 'PIL', 'sklearn', 'transformers', 'timm') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
