import pytest
import torch

import fastvq

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
