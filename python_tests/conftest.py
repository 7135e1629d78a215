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


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
    """Runs a test once per emulator schedule (thread and block order)."""
    with emu.schedule(request.param, EMU_SEEDS[request.param]):
        yield request.param
