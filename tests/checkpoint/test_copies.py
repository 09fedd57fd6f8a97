"""keep_old=False never deletes a reshaped copy that another job is loading or writing.

Real processes and real kernel locks: a second Python process marks a copy in use
(``hold_in_use``: flock LOCK_SH) or holds its output lock (``execute.lock_output``, the writer's
lock), and this process runs the deleter a resume with ``keep_old=False`` runs."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lightning_reshape.checkpoint.copies import IN_USE_LOCK, hold_in_use, remove_other_copies

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "reshaped-"


def _copy(folder: Path) -> Path:
    """A finished copy as the strategy leaves it: the tag folder, ``latest``."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10000)
    (folder / "latest").write_text("checkpoint")
    return folder


def _holder(code: str) -> subprocess.Popen[str]:
    """A process that takes a lock, prints "held", and keeps it until its stdin closes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code + "\nprint('held', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def test_copies_in_use_or_being_written_are_kept(tmp_path: Path) -> None:
    ckpt = tmp_path / "X.ckpt"
    loading = _copy(ckpt / "reshaped-tp1-pp1-dp3-zero1")
    writing = _copy(ckpt / "reshaped-tp1-pp1-dp4-zero1")
    idle = _copy(ckpt / "reshaped-tp2-pp1-dp1-zero1")
    unfinished = ckpt / "reshaped-tp1-pp1-dp5-zero1"  # no ``latest``: never a candidate
    unfinished.mkdir()
    (ckpt / "checkpoint").mkdir()  # the original
    keep = _copy(ckpt / "reshaped-tp1-pp1-dp2-zero1")
    loader = _holder(
        "import sys\nfrom lightning_reshape.checkpoint.copies import hold_in_use\n"
        f"ctx = hold_in_use({str(loading)!r}); ctx.__enter__()"
    )
    writer = _holder(
        "import sys\nfrom lightning_reshape.checkpoint.execute import lock_output\n"
        f"lock = lock_output({str(writing)!r}, 'checkpoint')"
    )
    try:
        done = remove_other_copies(keep, PREFIX)
        assert done.removed == [str(idle)] and done.freed >= 10000
        assert done.kept == [
            (str(loading), "another job is loading it"),
            (str(writing), "another job is writing or checking it"),
        ]
        assert loading.is_dir() and writing.is_dir() and not idle.exists()
        assert (loading / "checkpoint" / "mp_rank_00_model_states.pt").stat().st_size == 10000
        assert unfinished.is_dir() and (ckpt / "checkpoint").is_dir() and keep.is_dir()
    finally:
        _release(loader)
        _release(writer)
    done = remove_other_copies(keep, PREFIX)  # nobody uses them any more
    assert sorted(done.removed) == [str(loading), str(writing)] and done.kept == []
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint", keep.name, unfinished.name]


def test_a_loader_waiting_on_a_removed_copy_locks_the_new_one(tmp_path: Path) -> None:
    """The deleter removes the lock file with the copy while a loader waits on it: the loader
    must end up holding the lock of the copy it writes anew, not of the removed file."""
    copy = _copy(tmp_path / "X.ckpt" / "reshaped-tp1-pp1-dp3-zero1")
    fd = os.open(copy / IN_USE_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the deleter's lock
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    loader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom lightning_reshape.checkpoint.copies import hold_in_use\n"
            f"with hold_in_use({str(copy)!r}):\n    print('held', flush=True)\n"
            "    sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # wait until the loader has opened the lock file (it then blocks on LOCK_SH)
        for _ in range(600):
            if any(
                os.path.realpath(f"/proc/{loader.pid}/fd/{n}") == str(copy / IN_USE_LOCK)
                for n in os.listdir(f"/proc/{loader.pid}/fd")
            ):
                break
            time.sleep(0.05)
        shutil.rmtree(copy)
        os.close(fd)  # the deleter is done
        assert loader.stdout is not None and loader.stdout.readline().strip() == "held"
        assert (copy / IN_USE_LOCK).is_file()  # made anew, and locked by the loader:
        other = os.open(copy / IN_USE_LOCK, os.O_RDWR)
        try:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("the loader holds no lock on the new copy")
            except BlockingIOError:
                pass
        finally:
            os.close(other)
    finally:
        _release(loader)


def test_hold_in_use_is_shared(tmp_path: Path) -> None:
    """Any number of ranks hold one copy at once (shared lock), here two in one process."""
    copy = tmp_path / "reshaped-x"
    with hold_in_use(copy) as a, hold_in_use(copy) as b:
        assert a and b and copy.is_dir()
        done = remove_other_copies(tmp_path / "reshaped-y", PREFIX)
        assert done.removed == [] and done.kept == []  # no ``latest``: not a finished copy


def test_an_odd_lock_file_keeps_that_copy_only(tmp_path: Path) -> None:
    """A copy whose in-use lock is a symlink or a folder (O_NOFOLLOW: ELOOP; EISDIR) is kept
    with a reason; the cleanup goes on with the others, and nothing outside is touched (the
    raw OSError used to end the cleanup, after a successful load)."""
    keep = _copy(tmp_path / f"{PREFIX}new")
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    linked = _copy(tmp_path / f"{PREFIX}a-linked")
    (linked / IN_USE_LOCK).symlink_to(outside)
    folder = _copy(tmp_path / f"{PREFIX}b-folder")
    (folder / IN_USE_LOCK).mkdir()
    plain = _copy(tmp_path / f"{PREFIX}c-plain")
    done = remove_other_copies(keep, PREFIX)
    assert done.removed == [str(plain)]
    assert {p for p, _ in done.kept} == {str(linked), str(folder)}
    assert all("cannot lock it" in why for _, why in done.kept)
    assert outside.read_text() == "precious" and linked.is_dir() and folder.is_dir()
