"""The CUDA emulation build: fastvq's CUDA kernels, compiled from their own ``.cu`` source by the host
compiler against ``csrc/cuda_emu/``, executed on the CPU as ``torch.ops.fastvq_emu.*`` (same schemas as
``torch.ops.fastvq.*``, CPU tensors). Tests use it to check every CUDA kernel without a GPU.

Build it with ``FASTVQ_EMU=1`` (and ``FASTVQ_EMU_ASAN=1`` for the AddressSanitizer + UBSan variant) at
install time; ``scripts/test.sh`` does. One variant per process: the ASan variant must be loaded into a
process started with ``LD_PRELOAD=$(g++ -print-file-name=libasan.so)`` (see docs/cuda_emu.md).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

VARIANTS = {"plain": "_C_emu", "asan": "_C_emu_asan"}
SCHEDULES = ("forward", "reverse", "shuffled")

_loaded: str | None = None


def library_path(variant: str = "plain") -> Path | None:
    """Path of the built emulation library of ``variant``, or None if it was not built."""
    if variant not in VARIANTS:
        raise ValueError(f"fastvq.emu: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return next(iter(sorted(Path(__file__).parent.glob(VARIANTS[variant] + ".*.so"))), None)


def load(variant: str | None = None) -> str:
    """Load the emulation library (``FASTVQ_EMU_VARIANT`` or ``"plain"`` by default) and return the variant.
    Loading again is a no-op; loading a second, different variant in one process is an error."""
    global _loaded
    variant = variant or os.environ.get("FASTVQ_EMU_VARIANT", "plain")
    if _loaded is not None:
        if _loaded != variant:
            raise RuntimeError(f"fastvq.emu: variant {_loaded!r} is loaded; one variant per process")
        return variant
    path = library_path(variant)
    if path is None:
        flag = "FASTVQ_EMU_ASAN=1" if variant == "asan" else "FASTVQ_EMU=1"
        raise RuntimeError(f"fastvq.emu: the {variant!r} emulation library is not built; reinstall with {flag} "
                           "(pip install --no-build-isolation -e .)")
    torch.ops.load_library(str(path))
    _loaded = variant
    return variant


def set_schedule(schedule: str, seed: int = 0) -> None:
    """Order in which the emulator runs the threads of a block between barriers, and the blocks of a grid:
    ``"forward"``, ``"reverse"`` or ``"shuffled"`` (seeded)."""
    torch.ops.fastvq_emu._set_schedule(schedule, seed)


def set_mode(mode: str) -> None:
    """``"fibers"`` (fast, default) or ``"threads"`` (one OS thread per emulated thread, for TSan)."""
    torch.ops.fastvq_emu._set_mode(mode)


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Within the body, the emulated ops skip their host-side value checks (index ranges, sizes > 0, lengths
    <= capacity) and the kernels' asserts are off, as in a build without either: bad values reach the kernels,
    whose own guards must keep every access in bounds. For tests (under the ASan variant)."""
    torch.ops.fastvq_emu._set_unchecked(True)
    try:
        yield
    finally:
        torch.ops.fastvq_emu._set_unchecked(False)


@contextlib.contextmanager
def schedule(name: str, seed: int = 0) -> Iterator[None]:
    """Run the body under schedule ``name``; restores ``"forward"`` afterwards."""
    set_schedule(name, seed)
    try:
        yield
    finally:
        set_schedule("forward", 0)
