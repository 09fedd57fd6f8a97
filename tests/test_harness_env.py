"""The harness's DeepSpeed extension cache: one per checkout, inherited, built before tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import _extension_built


def test_extension_cache_is_set_inherited_and_built() -> None:
    cache = os.environ["TORCH_EXTENSIONS_DIR"]  # <checkout>/.torch_extensions unless preset
    assert Path(cache).is_absolute()
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['TORCH_EXTENSIONS_DIR'])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.stdout.strip() == cache  # every launched rank builds/loads from the same place
    assert _extension_built()  # the session warm-up ran before any timed test
