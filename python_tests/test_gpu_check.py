"""scripts/gpu_check.sh (the one call that verifies the CUDA kernels on a GPU), checked where there is none:
it parses, it stops clearly without a GPU, and the `cuda` marker it selects with (`pytest -m cuda`) lands on
the CUDA cases of every test file."""
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch

import conftest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None, reason="a GPU is here")
def test_gpu_check_stops_clearly_without_a_gpu():
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "gpu_check: no NVIDIA GPU here" in r.stderr


class _Item:
    def __init__(self, name, params=None):
        self.name = self.originalname = name
        if params is not None:
            self.callspec = types.SimpleNamespace(params=params)
        self.markers = []

    def add_marker(self, m):
        self.markers.append(m.name)


def test_cuda_marker_selects_the_cuda_cases():
    items = {
        "emu": _Item("test_mcq_search_emulated", {"cuda_ops": "emu"}),
        "gpu": _Item("test_mcq_search_emulated", {"cuda_ops": "cuda"}),
        "cpu-device": _Item("test_stack", {"device": "cpu"}),
        "cuda-device": _Item("test_stack", {"device": "cuda"}),
        "named": _Item("test_cuda_matches_cpu_bitwise"),
        "plain": _Item("test_mcq_search_matches_reference"),
        "substring": _Item("test_barracuda_is_not_a_device"),
    }
    conftest.pytest_collection_modifyitems(None, list(items.values()))
    assert {k for k, it in items.items() if "cuda" in it.markers} == {"gpu", "cuda-device", "named"}


def test_every_family_has_cuda_cases():
    # the files whose CUDA cases gpu_check.sh runs: one per op family, each with a cuda_ops-parametrized test
    for name in ("test_cuda_emulated.py", "test_lfq.py", "test_merge.py", "test_decode.py",
                 "test_cuda_errors.py", "test_cuda_device.py"):
        text = (ROOT / "python_tests" / name).read_text()
        assert "cuda_ops" in text or "def test_cuda_" in text, name
