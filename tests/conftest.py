"""Shared test set-up: a per-checkout DeepSpeed extension cache, built once before timed tests.

DeepSpeed JIT-compiles its CPU communication extension on the first start (1 to 4 minutes,
silently) into ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``, shared by every
checkout, which then rebuild it in turn). Here the cache is ``<checkout>/.torch_extensions``,
set before anything imports DeepSpeed and inherited by every child process, and a session
fixture builds it once with no time limit, so no test's own timeout can be eaten by the build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

_BUILD = (
    "from deepspeed.accelerator import get_accelerator\n"
    "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
    "import deepspeed.ops\n"
    "if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False):\n"
    "    b.load(verbose=False)\n"
)


def _extension_built() -> bool:
    cache = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return any(cache.glob("**/deepspeed_shm_comm*.so"))


@pytest.fixture(scope="session", autouse=True)
def deepspeed_extension_built() -> None:
    """Build DeepSpeed's CPU extension once (no timeout) before any test that starts DeepSpeed."""
    if _extension_built():
        return
    start = time.monotonic()
    sys.__stderr__.write(
        f"\nbuilding DeepSpeed's CPU extension once into {os.environ['TORCH_EXTENSIONS_DIR']} "
        "(1-4 minutes, first run only)...\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", _BUILD], capture_output=True, text=True, env=os.environ.copy()
    )
    if done.returncode != 0:  # the tests that need it will report the real error
        sys.__stderr__.write(f"extension build failed:\n{done.stderr[-2000:]}\n")
    else:
        sys.__stderr__.write(f"built in {time.monotonic() - start:.0f} s\n")
