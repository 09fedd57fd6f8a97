"""A source file replaced or rewritten after the reshape was planned is refused by both sinks
(the file writer of ``convert`` and the engine sink of the direct load), never read with the
plan's offsets: before, a dp-rank file swapped in between planning and loading was loaded
silently (a mix of two saves)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

from lightning_reshape.checkpoint.convert import plan_conversion
from lightning_reshape.checkpoint.engine_sink import SourceFiles, materialize
from lightning_reshape.checkpoint.execute import execute_plan
from lightning_reshape.errors import CheckpointError


def _changed(src: Path, how: str) -> str:
    """Change one optimizer file of ``src/z2`` as ``how`` says; its name."""
    tag = src / "z2" / "global_step2"
    name = sorted(n for n in os.listdir(tag) if "optim_states" in n)[0]
    path = tag / name
    if how == "touched":  # same bytes, rewritten in place
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    else:  # replaced by another file under the same name (as mv does)
        other = tag / sorted(n for n in os.listdir(tag) if "optim_states" in n)[1]
        shutil.copyfile(other, str(path) + ".new")
        os.replace(str(path) + ".new", path)
    return name


@pytest.mark.parametrize("how", ["touched", "replaced"])
def test_both_sinks_refuse_a_source_changed_after_planning(
    ckpt_root: Mapping[int, Path], tmp_path: Path, how: str
) -> None:
    src = tmp_path / "src"
    shutil.copytree(ckpt_root[2] / "z2", src / "z2")
    plan = plan_conversion(src / "z2", dp=1)
    name = _changed(src, how)
    target = next(f for f in plan.files if any(name == s for s in f.sources()))
    with pytest.raises(CheckpointError, match=f"{name}: changed since the reshape was planned"):
        materialize(plan, target, SourceFiles(plan, set()))
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match=f"{name}: changed since the reshape was planned"):
        execute_plan(plan, tmp_path / "out")
    if how == "touched":  # planned again, the changed file is what is read
        fresh = plan_conversion(src / "z2", dp=1)
        assert fresh.source_ids[name] != plan.source_ids[name]
    else:  # planned again, the other rank's partition under this name is refused when read
        with pytest.raises(CheckpointError, match="saved by another dp rank"):
            plan_conversion(src / "z2", dp=1)
