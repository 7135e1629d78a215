"""Shared by test_data.py and test_eval.py: skip a test whose package is not installed, except under
FASTVQ_REQUIRE_DATA=1 (CI, after `FASTVQ_DATA=1 scripts/install.sh`), where a missing package fails."""
import importlib.util
import os
from pathlib import Path

import pytest

REQUIRE = os.environ.get("FASTVQ_REQUIRE_DATA") == "1"


def needs(*modules, paths=()):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    missing += [str(p) for p in paths if not Path(p).exists()]
    return pytest.mark.skipif(bool(missing) and not REQUIRE,
                              reason=f"not installed: {missing} (FASTVQ_DATA=1 bash scripts/install.sh)")
