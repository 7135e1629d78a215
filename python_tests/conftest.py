import os

import pytest
import torch

import fastvq
import fastvq.emu as emu

_ISAS = [i for i in ("scalar", "avx2", "avx512")
         if ("scalar", "avx2", "avx512").index(i) <= ("scalar", "avx2", "avx512").index(
             fastvq.build_info()["cpu_isa_supported"])]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=_ISAS)
def cpu_isa(request):
    """Runs a test once per CPU vector path this machine supports, restoring the automatic choice."""
    prev = fastvq.set_cpu_isa(request.param)
    yield request.param
    fastvq.set_cpu_isa(prev)


# FASTVQ_TEST_CUDA=1 adds the CUDA parametrizations even without a GPU, so that a machine without one can
# check which tests a GPU run would select (python_tests/test_gpu_check.py; they fail if run there).
FORCE_CUDA_CASES = os.environ.get("FASTVQ_TEST_CUDA") == "1"


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() or FORCE_CUDA_CASES else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (scripts/gpu_check.sh: pytest -m cuda)")


def pytest_collection_modifyitems(config, items):
    """Marks `cuda` every test that runs on a CUDA device: a `cuda` parameter of `cuda_ops` or `device`, or
    `cuda` in the test function's name (the tests that skip without a GPU)."""
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        name = getattr(item, "originalname", item.name)
        if params.get("cuda_ops") == "cuda" or params.get("device") == "cuda" or "cuda" in name.split("_"):
            item.add_marker(pytest.mark.cuda)


# ---- the CUDA emulation build (torch.ops.fastvq_emu.*; see test_cuda_emulated.py) ----------------------

def _load_emu() -> str | None:
    """Loads the emulation library once per session; the reason it is missing, or None. With
    FASTVQ_REQUIRE_EMU=1 (CI) a missing build is an error, not a skip."""
    try:
        emu.load()
        return None
    except RuntimeError as e:
        if os.environ.get("FASTVQ_REQUIRE_EMU") == "1":
            raise
        return f"emulation build not available: {e}"


EMU_MISSING = _load_emu()
needs_emu = pytest.mark.skipif(EMU_MISSING is not None, reason=str(EMU_MISSING))
EMU_SEEDS = {"forward": 0, "reverse": 0, "shuffled": 1234}


@pytest.fixture(params=emu.SCHEDULES)
def schedule(request):
    """Runs a test once per emulator schedule (thread and block order); a no-op without the emulation build
    (a test that also takes `cuda_ops` then runs on the GPU only)."""
    if EMU_MISSING is not None:
        yield request.param
        return
    with emu.schedule(request.param, EMU_SEEDS[request.param]):
        yield request.param


# ---- the CUDA kernels: emulated on the CPU, and on a real device when one is present --------------------

HAS_CUDA = torch.cuda.is_available()
CUDA_BACKENDS = ["emu"] + (["cuda"] if HAS_CUDA or FORCE_CUDA_CASES else [])


def to_device_like(t: torch.Tensor, device) -> torch.Tensor:
    """A copy of t on `device` with t's strides (a transposed or sliced view stays one), so kernels see the
    same layouts on the device as on the CPU. Expanded (stride-0) tensors stay expanded."""
    if t.device == torch.device(device) or t.numel() == 0:
        return t.to(device)
    if 0 in t.stride():
        one = tuple(slice(0, 1) if s == 0 else slice(None) for s in t.stride())
        return t[one].contiguous().to(device).expand(t.shape)
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


class CudaOps:
    """torch.ops.fastvq_emu (the CUDA kernels' source run on the CPU) or torch.ops.fastvq on a CUDA device,
    called with CPU tensors: inputs go to the device with their strides, outputs (and tensors the op mutates
    in place, like the KV cache) come back, so a test body is the same for both."""

    def __init__(self, name: str):
        self.name = name
        self.device = "cpu" if name == "emu" else "cuda"

    def __getattr__(self, op):
        fn = getattr(torch.ops.fastvq_emu if self.name == "emu" else torch.ops.fastvq, op)
        if self.name == "emu":
            return fn

        def call(*args):
            dev = [to_device_like(a, "cuda") if isinstance(a, torch.Tensor) else a for a in args]
            out = fn(*dev)
            for a, d in zip(args, dev):  # in-place ops: the device copy's new values back into the CPU tensor
                if isinstance(a, torch.Tensor) and a.numel() > 0 and 0 not in a.stride():
                    a.copy_(d.cpu())
            return torch.utils._pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out)
        return call

    def __repr__(self):
        return self.name


@pytest.fixture(params=CUDA_BACKENDS)
def cuda_ops(request):
    """Runs a test of the CUDA kernels on the emulator and, when a GPU is present, on it (the emulator's
    schedules matter only to it: on a GPU only the forward-schedule instance runs)."""
    if request.param == "cuda":
        if EMU_MISSING is None and "schedule" in request.fixturenames and \
                request.getfixturevalue("schedule") != "forward":
            pytest.skip("emulator schedules do not apply to a GPU")
        return CudaOps("cuda")
    if EMU_MISSING is not None:
        pytest.skip(str(EMU_MISSING))
    return CudaOps("emu")
