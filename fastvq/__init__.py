"""fastvq: fast C++/CUDA kernels for unified visual tokenizers.

Ops are torch ops (``torch.ops.fastvq.*``, wrapped with docstrings in :mod:`fastvq.ops`); modules
live in :mod:`fastvq.nn`; pure-PyTorch references (the test oracles) in :mod:`fastvq.reference`.
"""
import torch  # noqa: F401  (before _C: provides libc10 / libtorch)
from fastvq import _C  # noqa: F401  (loads the native library: registers torch.ops.fastvq.*)
from fastvq import ops, reference  # noqa: F401
from fastvq import nn  # noqa: F401

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How the native library was built: version, torch, cuda (bool), cuda_archs, nvcc, cxx, openmp,
    num_threads, cpu_isa (in use) and cpu_isa_supported, debug."""
    return _C.build_info()


def set_cpu_isa(name: str) -> str:
    """Force the CPU kernels' vector ISA: ``"scalar"``, ``"avx2"``, ``"avx512"`` or ``"auto"`` (the
    best this CPU supports). Returns the previous setting. The ``FASTVQ_CPU_ISA`` environment variable
    sets the initial value."""
    return _C.set_cpu_isa(name)


def cpu_isa() -> str:
    """The vector ISA the CPU kernels use now."""
    return _C.cpu_isa()
