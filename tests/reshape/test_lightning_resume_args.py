"""``benchmarks/lightning_resume.py``: bad ``--rows`` / ``--repeat`` are one usage error (exit 2)
and leave no work folder behind (it was made before the arguments were checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "lightning_resume.py"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "bogus"], "--rows 'bogus': choose from dp, tp, zero, pp"),
        (["--rows", "dp,"], "--rows 'dp,': choose from"),
        (["--repeat", "0"], "--repeat 0: give at least 1"),
        (["--repeat", "-3"], "--repeat -3: give at least 1"),
    ],
)
def test_bad_arguments_leave_no_workdir(tmp_path: Path, args: list[str], message: str) -> None:
    work = tmp_path / "not-made"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--workdir", str(work), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not work.exists()
