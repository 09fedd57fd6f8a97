"""The direct load's placeholder folder: an unusable temporary directory is one CheckpointError
(the strategy gathers ReshapeErrors from every rank; a raw OSError on one rank left the others
waiting in that gather), and a folder half made is removed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_reshape.checkpoint import direct
from lightning_reshape.errors import CheckpointError

PLAN = SimpleNamespace(
    source_root="/ckpt/src",
    source_tag="src",
    files=(SimpleNamespace(name="mp_rank_00_model_states.pt"),),
    target=SimpleNamespace(tp=1, pp=1),
)


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_unusable_tmpdir_is_one_error(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    if kind == "a file":
        tmp.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.raises(CheckpointError, match="placeholder folder in .*TMPDIR"):
        direct._placeholders(PLAN)  # type: ignore[arg-type]


def test_half_made_folder_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(direct, "placeholder_names", lambda plan: ["ok.pt", "no/such/dir.pt"])
    with pytest.raises(CheckpointError, match="No such file"):
        direct._placeholders(PLAN)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_source_tag_is_not_globbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed globs ``<dir>/<tag>/*model_states.pt``: a source tag such as ``run[1]`` matched
    no placeholder and the direct load died on DeepSpeed's bare ``assert``; the placeholders
    live under a tag of ours."""
    import glob

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root, folder = direct._placeholders(SimpleNamespace(**{**vars(PLAN), "source_tag": "run[1]"}))  # type: ignore[arg-type]
    assert folder == os.path.join(root, direct.PLACEHOLDER_TAG)
    assert glob.glob(os.path.join(folder, "*_model_states.pt"))


def test_tmpdir_with_glob_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "job[7]"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.raises(CheckpointError, match="glob character"):
        direct._placeholders(PLAN)  # type: ignore[arg-type]
    assert os.listdir(tmp) == []
