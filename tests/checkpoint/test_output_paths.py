"""The output never leads outside the destination, and nothing found there is trusted blindly
(hostile findings 1, 3, 4, 5, 6, 8), on a real ZeRO-1 dp-2 checkpoint written by DeepSpeed (one
launch for the module).

- a tag that is not one plain folder name (``../x``, ``/abs``, ``a/b``, ``..``, NUL, or such a
  ``latest`` in the source) is refused before anything is written;
- symlinks planted at the partial or final folder are refused; at ``.latest.tmp`` or a
  ``<file>.tmp`` they are replaced, never written through; the source stays byte-identical;
- a re-used partial folder keeps a finished file only when it matches its ``.NAME.sum``;
- a FIFO or folder where an output file should be is damage (no hang), and a completion record
  naming files outside its folder is refused as unreadable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_reshape.checkpoint.convert import convert_checkpoint, plan_conversion
from lightning_reshape.checkpoint.execute import (
    COMPLETE_MARKER,
    execute_plan,
    lock_output,
    partial_dir,
    prepare_output,
)
from lightning_reshape.errors import CheckpointError
from tests.checkpoint.helpers import file_hashes, flip_tensor_byte

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # the dp-1 output's optimizer shard
MODEL = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def src(zero1_dp2_src: Path) -> Path:
    return zero1_dp2_src


@pytest.fixture(scope="module")
def reference(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Hashes of a correct dp-1 output's tag folder, written once."""
    dst = tmp_path_factory.mktemp("reference")
    return file_hashes(convert_checkpoint(src, dst, tp=1, dp=1))


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A blocking open of a FIFO would hang forever: fail instead."""
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _timeout(*_: object) -> None:
    raise TimeoutError("hung (a FIFO opened for reading?)")


def _tag(src: Path) -> str:
    return (src / "latest").read_text().strip()


# ------------------------------------------------------------------------------- tags


@pytest.mark.parametrize("bad", ["../../evil", "ABSOLUTE", "a/b", "..", ".", "x\0y"])
def test_tag_must_be_one_folder_name(src: Path, tmp_path: Path, bad: str) -> None:
    absolute = tmp_path / "abs_tag"  # an absolute tag would write outside the destination
    bad = str(absolute) if bad == "ABSOLUTE" else bad
    before = file_hashes(src)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not a plain folder name") as err:
        convert_checkpoint(src, dst, tp=1, dp=1, tag=bad)
    assert repr(bad) in str(err.value)
    assert not dst.exists()  # not even the recovery scripts
    assert not absolute.exists()
    assert file_hashes(src) == before


def test_source_latest_with_dotdot_is_refused(src: Path, tmp_path: Path) -> None:
    """``latest`` = ``../z1/TAG`` names the right folder, but as an output tag it would leave
    the destination."""
    copy = tmp_path / "z1"
    shutil.copytree(src, copy)
    (copy / "latest").write_text(f"../z1/{_tag(src)}")
    before = file_hashes(copy)
    dst = tmp_path / "out" / "deep"
    with pytest.raises(CheckpointError, match="not a plain folder name"):
        convert_checkpoint(copy, dst, tp=1, dp=1)
    assert not dst.exists()
    assert file_hashes(copy) == before


# ------------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize("where", ["partial", "final"])
def test_symlinked_output_folder_is_refused(src: Path, tmp_path: Path, where: str) -> None:
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    tag = _tag(copy)
    before = file_hashes(copy)
    dst = tmp_path / "out"
    dst.mkdir()
    link = partial_dir(dst, tag) if where == "partial" else dst / tag
    link.symlink_to(copy / tag)
    with pytest.raises(CheckpointError, match="symbolic link") as err:
        convert_checkpoint(copy, dst, tp=1, dp=3)
    assert str(link) in str(err.value)
    assert file_hashes(copy) == before
    assert link.is_symlink()


def test_planted_tmp_links_are_never_followed(
    src: Path, tmp_path: Path, reference: dict[str, str]
) -> None:
    """Links at ``.latest.tmp``, ``<file>.tmp`` and ``.<file>.sum.tmp`` inside the partial
    folder point at source files: they are replaced, the source stays byte-identical."""
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    tag = _tag(copy)
    before = file_hashes(copy)
    victims = sorted(p for p in (copy / tag).iterdir() if p.is_file())
    dst = tmp_path / "out"
    part = partial_dir(dst, tag)
    part.mkdir(parents=True)
    (dst / ".latest.tmp").symlink_to(victims[0])
    (dst / "latest").symlink_to(victims[1])
    for k, name in enumerate([OPTIM, MODEL]):
        (part / f"{name}.tmp").symlink_to(victims[k])
        (part / f".{name}.sum.tmp").symlink_to(victims[-1 - k])
    final = convert_checkpoint(copy, dst, tp=1, dp=1)
    assert file_hashes(copy) == before
    assert file_hashes(final) == reference
    assert not (dst / "latest").is_symlink() and (dst / "latest").read_text() == tag
    assert not os.path.lexists(dst / ".latest.tmp")


# ------------------------------------------------------------------------------- partial reuse


def _interrupted(src: Path, dst: Path) -> tuple[Path, str]:
    """A partial folder with every file finished (and its ``.sum``), as a kill before the
    rename leaves it."""
    plan = plan_conversion(src, tp=1, dp=1)
    tag = plan.source_tag
    lock = lock_output(dst, tag)
    try:
        part, complete = prepare_output(plan, dst, tag)
        assert not complete
        execute_plan(plan, part)
    finally:
        lock.release()
    return part, tag


def test_partial_file_kept_only_when_it_matches_its_sum(
    src: Path, tmp_path: Path, reference: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    dst = tmp_path / "out"
    part, _ = _interrupted(src, dst)
    flip_tensor_byte(part / OPTIM)
    kept = os.stat(part / MODEL).st_ino
    with caplog.at_level(logging.WARNING):
        final = convert_checkpoint(src, dst, tp=1, dp=1)
    assert file_hashes(final) == reference
    assert os.stat(final / MODEL).st_ino == kept  # the intact one was kept
    assert any(OPTIM in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["fifo", "folder", "no sum"])
def test_partial_non_regular_or_unsummed_file_is_redone(
    src: Path, tmp_path: Path, reference: dict[str, str], kind: str
) -> None:
    dst = tmp_path / "out"
    part, _ = _interrupted(src, dst)
    if kind == "no sum":
        (part / f".{OPTIM}.sum").unlink()
    else:
        (part / OPTIM).unlink()
        os.mkfifo(part / OPTIM) if kind == "fifo" else (part / OPTIM).mkdir()
    assert file_hashes(convert_checkpoint(src, dst, tp=1, dp=1)) == reference


# ------------------------------------------------------------------------------- complete output


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_non_regular_file_in_complete_output_is_damage(
    src: Path, tmp_path: Path, reference: dict[str, str], kind: str
) -> None:
    dst = tmp_path / "out"
    final = convert_checkpoint(src, dst, tp=1, dp=1)
    (final / OPTIM).unlink()
    os.mkfifo(final / OPTIM) if kind == "fifo" else (final / OPTIM).mkdir()
    kept = os.stat(final / MODEL).st_ino
    assert file_hashes(convert_checkpoint(src, dst, tp=1, dp=1)) == reference
    assert os.stat(final / MODEL).st_ino == kept  # only the damaged file was redone


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "a/b", ".."])
def test_record_naming_files_outside_is_refused(src: Path, tmp_path: Path, name: str) -> None:
    dst = tmp_path / "out"
    final = convert_checkpoint(src, dst, tp=1, dp=1)
    os.mkfifo(dst / "outside")  # read through the record, it would hang
    record_path = final / COMPLETE_MARKER
    record = json.loads(record_path.read_text())
    record["files"][name] = {"size": 0, "crc32": []}
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="unreadable completion record") as err:
        convert_checkpoint(src, dst, tp=1, dp=1)
    assert "remove that folder" in str(err.value) and str(final) in str(err.value)
