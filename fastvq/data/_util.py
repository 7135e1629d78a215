"""Shared helpers of fastvq.data and fastvq.eval: the cache directory, safe .npz files, progress bars and
clear errors for missing packages. Nothing here executes code from a file: arrays are read with
``np.load(allow_pickle=False)``, metadata is JSON."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

INSTALL_HINT = "FASTVQ_DATA=1 bash scripts/install.sh"


class MissingDependencyError(ImportError):
    """A package that a data set or network needs is not installed; the message names the command."""


def cache_dir() -> Path:
    """The cache root: ``$FASTVQ_CACHE``, default ``~/.cache/fastvq``."""
    return Path(os.environ.get("FASTVQ_CACHE") or Path.home() / ".cache" / "fastvq")


def require_module(module: str, pip_name: str, who: str, extra: str = ""):
    """Imports ``module`` or raises MissingDependencyError naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{who}: needs the PyPI package '{pip_name}' (module {module!r} not importable: {e}); install it with "
            f"`pip install {pip_name}`{extra} or `{INSTALL_HINT}`") from e


def require_path(path: Path | str, debian_pkg: str, who: str, command: str | None = None) -> Path:
    """Returns ``path`` if it exists, else raises MissingDependencyError naming the Debian package."""
    p = Path(path)
    if not p.exists():
        cmd = command or f"apt-get install {debian_pkg}"
        raise MissingDependencyError(
            f"{who}: {p} not found: it comes from the Debian package '{debian_pkg}'; install it with `{cmd}` "
            f"(as root) or `{INSTALL_HINT}`")
    return p


def package_file(module: str, relpath: str, pip_name: str, who: str, extra: str = "") -> Path:
    """The path of a file shipped inside an installed package, found without importing the package
    (``importlib.util.find_spec`` on a top-level name does not execute it)."""
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"{who}: needs the PyPI package '{pip_name}' (module {module!r} not found); install it with "
            f"`pip install {extra}{pip_name}` or `{INSTALL_HINT}`")
    p = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not p.is_file():
        raise MissingDependencyError(f"{who}: {p} is missing from the installed '{pip_name}'; reinstall it with "
                                     f"`pip install --force-reinstall {extra}{pip_name}`")
    return p


def stable_hash(*parts) -> str:
    """A short sha1 of the JSON of ``parts``: cache keys that do not change between runs or machines."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unit_hash(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (sha1): split assignment that is stable when items are added."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0 ** 64


def save_npz(path: Path, arrays: dict) -> None:
    """Writes ``arrays`` (numeric or str arrays only, no objects) to ``path`` atomically (temp file +
    rename), so a killed build never leaves a half-written cache file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for k, v in arrays.items():
        if np.asarray(v).dtype == object:
            raise TypeError(f"save_npz: array {k!r} has dtype object; only numeric and str arrays are stored")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_npz(path: Path, required: Iterable[str], who: str) -> dict | None:
    """Reads every array of ``path`` with ``allow_pickle=False`` (the zip CRC of every member is checked
    as it is read). Returns None, with a warning naming ``who`` and the file, when the file is missing a
    required array or cannot be read: the caller rebuilds it instead of trusting it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        missing = set(required) - set(out)
        if missing:
            raise ValueError(f"missing arrays {sorted(missing)}")
        return out
    except Exception as e:  # noqa: BLE001  (any failure means: do not trust the file)
        warnings.warn(f"{who}: cache file {path} is corrupt ({type(e).__name__}: {e}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None


def progress(it: Iterable, total: int | None = None, desc: str = "") -> Iterator:
    """A progress bar on stderr (tqdm when installed; silent when ``FASTVQ_PROGRESS=0``)."""
    if os.environ.get("FASTVQ_PROGRESS", "1") == "0":
        yield from it
        return
    try:
        from tqdm import tqdm
    except ImportError:
        n = 0
        for x in it:
            n += 1
            if total and (n % max(1, total // 20) == 0 or n == total):
                print(f"\r{desc}: {n}/{total}", end="" if n < total else "\n", file=sys.stderr, flush=True)
            yield x
        return
    yield from tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
