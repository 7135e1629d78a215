"""Atomic, verified checkpoint directories (docs/training.md, "Checkpoints").

A run keeps its checkpoints under ``<out>/checkpoints/``::

    step-000200/     config.json + model.safetensors (Tokenizer.save_pretrained: from_pretrained loads it),
                     train_config.json, state.json (every non-tensor state), ema.safetensors,
                     optim.safetensors (optimizer, discriminator and its optimizer), rng.safetensors,
                     manifest.json (sha256 and size of every other file; written last)
    latest           the name of the newest complete checkpoint ("step-000200"), replaced atomically

A checkpoint is written into ``.tmp-step-000200-<pid>/``, every file and the directory fsynced, renamed to its
final name, the parent fsynced, and only then is ``latest`` replaced (temp file + fsync + ``os.replace``) and
the oldest checkpoints beyond ``keep_last`` deleted. A kill at any point leaves ``latest`` naming a complete,
verified checkpoint (or no ``latest`` before the first one). Loading verifies the manifest, so a truncated or
altered file is an error naming it, never silently loaded. Nothing here unpickles: tensors are safetensors,
everything else JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Callable

__all__ = ["CheckpointError", "write_atomic", "write_checkpoint", "resolve_checkpoint", "list_checkpoints",
           "MANIFEST", "LATEST", "checkpoint_name"]

MANIFEST = "manifest.json"
LATEST = "latest"
_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (the previous ones are intact) or read (missing, corrupt)."""


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically: a reader (or a process after a crash) sees the old or the new
    content, never a mix or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / MANIFEST).is_file())


def write_checkpoint(root: Path, step: int, writers: dict[str, Callable[[Path], None]], keep_last: int) -> Path:
    """Write checkpoint ``step`` under ``root``: ``writers`` maps each file name to a function that writes it at
    the given path. Returns the checkpoint directory. An ``OSError`` (a full disk, a read-only file system) is a
    :class:`CheckpointError` that says which checkpoint is still the latest; the partial directory is removed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        manifest = {}
        for fname, write in writers.items():
            path = tmp / fname
            write(path)
            _fsync_file(path)
            manifest[fname] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1) + "\n")
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt: replaced
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        write_atomic(root / LATEST, (name + "\n").encode())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        latest = root / LATEST
        kept = latest.read_text().strip() if latest.is_file() else "none"
        raise CheckpointError(f"write_checkpoint: could not write checkpoint {final} ({e.strerror or e}); "
                              f"the latest complete checkpoint is still {kept!r}") from e
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    # fault injection for the exact-resume tests (docs/dev.md): FASTVQ_TEST_SIGKILL_AFTER=<step> kills this process
    # with SIGKILL once checkpoint <step> is published, so "killed right after a checkpoint" needs no timing
    if os.environ.get("FASTVQ_TEST_SIGKILL_AFTER") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return final


def clean_partial(root: Path) -> None:
    """Remove the ``.tmp-*`` directories that a killed writer left under ``root``."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or (p.name.startswith(f".{LATEST}.tmp-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def verify_checkpoint(path: Path) -> dict:
    """Check every file of checkpoint directory ``path`` against its manifest; returns the manifest."""
    path = Path(path)
    who = "fastvq.train.resolve_checkpoint"
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{who}: {path} is not a complete checkpoint (no {MANIFEST}); it was not finished "
                              "or is not a fastvq checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{who}: {path / MANIFEST} is corrupt ({e})") from None
    for fname, rec in files.items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{who}: {path} is corrupt: {fname} is missing")
        if f.stat().st_size != rec["bytes"] or _sha256(f) != rec["sha256"]:
            raise CheckpointError(f"{who}: {path} is corrupt: {fname} does not match its sha256 in {MANIFEST} "
                                  "(truncated or altered)")
    return manifest


def resolve_checkpoint(path: str | Path) -> Path:
    """The verified checkpoint directory that ``path`` names: a checkpoint directory, a ``checkpoints/``
    directory or a run directory (both: the one ``latest`` names)."""
    path = Path(path)
    who = "fastvq.train.resolve_checkpoint"
    if not path.exists():
        raise FileNotFoundError(f"{who}: {path} does not exist")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / LATEST).is_file() or (path.is_dir() and not (path / MANIFEST).exists()
                                     and any(p.name.startswith(_PREFIX) for p in path.iterdir())):
        latest = path / LATEST
        if not latest.is_file():
            names = [p.name for p in list_checkpoints(path)]
            raise CheckpointError(f"{who}: {path} has no {LATEST} file; pass one of {names}")
        target = path / latest.read_text().strip()
        others = [str(p) for p in list_checkpoints(path) if p != target]
        try:
            verify_checkpoint(target)
        except CheckpointError as e:
            raise CheckpointError(f"{e}. Older checkpoints to resume from instead: {others or 'none'}") from None
        return target
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path
    raise CheckpointError(f"{who}: {path} is neither a run, a checkpoints directory nor a checkpoint")
