"""Run a test body in N gloo processes under ``torchrun`` and collect each rank's results.

``run_ddp(script, nproc=2, tmp_path=...)`` writes ``script`` (Python source) to a file and runs it with
``python -m torch.distributed.run --standalone --nproc_per_node N``. The script sees ``OUT`` (a directory,
environment ``FASTVQ_DDP_OUT``) and is expected to call ``torch.distributed.init_process_group("gloo")`` and to
save its results with ``save_rank(tensors: dict)``, defined for it in a prelude: safetensors-free, as
``torch.save`` of a dict of CPU tensors, loaded back with ``weights_only=True``. Returns ``[dict per rank]``.

CPU only (gloo), 2 threads per rank split from the machine's cores, a hard timeout, and the worker's output
in the assertion message when it fails.

Teardown: once in a few hundred runs, a gloo rank aborted *after* saving its results ("terminate called without an
active exception", SIGABRT, CI 2026-12-07): a std::thread of the process group destroyed while joinable during
``destroy_process_group`` or interpreter teardown, a torch/gloo shutdown race, not the code under test. So the
prelude makes ``destroy_process_group`` a barrier (every rank still reaches it together; nothing is freed), and the
epilogue, reached only when the body ran to its end, flushes and leaves with ``os._exit(0)``, skipping the
teardown. An exception in the body still exits non-zero and fails the test.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

PRELUDE = '''
import os, torch
import torch.distributed as _dist
OUT = os.environ["FASTVQ_DDP_OUT"]
def _destroy_is_a_barrier(group=None):  # see the module docstring of python_tests/ddp.py
    if _dist.is_initialized():
        _dist.barrier()
_dist.destroy_process_group = _destroy_is_a_barrier
def save_rank(tensors):
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    torch.save({k: v.detach().cpu().clone() for k, v in tensors.items()}, os.path.join(OUT, f"rank{rank}.pt"))
'''


EPILOGUE = '''
import sys as _sys
_sys.stdout.flush()
_sys.stderr.flush()
os._exit(0)  # the body ran to its end and saved its results: skip the teardown (module docstring)
'''


def run_ddp(script: str, tmp_path: Path, nproc: int = 2, timeout: float = 300.0) -> list[dict]:
    tmp_path = Path(tmp_path)
    path = tmp_path / "ddp_body.py"
    path.write_text(PRELUDE + textwrap.dedent(script) + EPILOGUE)
    env = dict(os.environ)
    env["FASTVQ_DDP_OUT"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(path)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
