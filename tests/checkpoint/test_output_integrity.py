"""Nothing lost, nothing torn (issue 11, kinds 1, 2, 3 and 7), on a real ZeRO-1 dp-2 checkpoint
written by DeepSpeed (one launch for the module).

- a damaged complete output (flipped byte, truncated, deleted file, unreadable record) is found by
  its completion record (size and CRC-32 of every file) and redone, naming the file;
- several ``convert`` processes of one source to one target, started together, all exit 0 and
  leave one correct output;
- disk full, read-only output and a file-size limit are real faults (a tiny tmpfs, a read-only
  tmpfs, RLIMIT_FSIZE) giving one line, exit 2, and no partial folder left behind;
- a destination inside the source, an existing file or a path under a file: one line, exit 2.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_reshape.checkpoint import execute, torchfile
from lightning_reshape.checkpoint.execute import COMPLETE_MARKER
from lightning_reshape.checkpoint.verify import verify
from lightning_reshape.cli import main
from lightning_reshape.errors import CheckpointError
from tests.checkpoint.helpers import file_hashes, flip_tensor_byte, snapshot

ROOT = Path(__file__).resolve().parents[2]
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # the dp-1 output's optimizer shard


@pytest.fixture(scope="module")
def src(zero1_dp2_src: Path) -> Path:
    return zero1_dp2_src


@pytest.fixture(scope="module")
def reference(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Hashes of a correct dp-1 output, written once."""
    dst = tmp_path_factory.mktemp("reference")
    assert main(["convert", str(src), str(dst), "--tp", "1", "--dp", "1", "--quiet"]) == 0
    return file_hashes(dst)


def _convert(src: Path, dst: Path, *extra: str) -> list[str]:
    return ["convert", str(src), str(dst), "--tp", "1", "--dp", "1", "--quiet", *extra]


def _run_cli(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """The console script in a fresh process (what a user runs)."""
    code = "from lightning_reshape.cli import console_main; console_main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        **kwargs,  # type: ignore[arg-type]
    )


def _one_error_line(stderr: str, *needles: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_partial(dst: Path) -> None:
    assert not list(dst.glob(".*.partial")), sorted(p.name for p in dst.iterdir())


# ------------------------------------------------------------------------------- kind 1


def test_record_lists_every_file_with_size_and_crc(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    assert main(_convert(src, dst)) == 0
    tag = (dst / "latest").read_text()
    record = json.loads((dst / tag / COMPLETE_MARKER).read_text())
    on_disk = sorted(p.name for p in (dst / tag).iterdir() if not p.name.startswith("."))
    assert record["checksum"] == execute.CHECKSUM
    assert sorted(record["files"]) == on_disk
    assert OPTIM in on_disk and "mp_rank_00_model_states.pt" in on_disk
    for name, entry in record["files"].items():
        assert (entry["size"], entry["crc32"]) == execute.file_checksum(dst / tag / name)
    assert not list((dst / tag).glob(".*.sum"))  # the writers' sums are folded into the record
    # the writer's lock file stays, empty, beside the tag folder (execute.lock_output says why:
    # removing a lock file breaks the lock for a writer waiting on it)
    assert (dst / f".{tag}.lock").stat().st_size == 0
    assert sorted(p.name for p in dst.iterdir() if p.name.startswith(".")) == [f".{tag}.lock"]


def test_block_checksums_locate_damage(tmp_path: Path) -> None:
    """A file of several blocks: each block's CRC-32 is zlib's of those bytes (threads give the
    same list), and a flipped byte is reported with the byte range of its block."""
    block = execute.CHECKSUM_BLOCK
    data = bytearray(os.urandom(2 * block + 12345))
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(data))
    size, crcs = execute.file_checksum(path, threads=3)
    assert size == len(data)
    assert crcs == [f"{zlib.crc32(data[a : a + block]):08x}" for a in range(0, size, block)]
    assert execute.file_checksum(path, threads=1) == (size, crcs)
    record = {"files": {"f.bin": {"size": size, "crc32": crcs}}}
    assert execute.check_output(tmp_path, record) == []
    data[2 * block + 5] ^= 0x10
    path.write_bytes(bytes(data))
    [(name, why)] = execute.check_output(tmp_path, record, workers=2)
    assert name == "f.bin" and f"of bytes {2 * block}-{size}" in why and "1 damaged block" in why
    for entry in (["x"], "12", None, 7):  # a record entry that is not {size, crc32}
        [(name, why)] = execute.check_output(tmp_path, {"files": {"f.bin": entry}})
        assert name == "f.bin" and f"its entry in {COMPLETE_MARKER} is " in why, why


def test_end_of_file_errors_name_the_file(tmp_path: Path) -> None:
    """A source shorter than its zip directory says: the read error names the file."""
    path = tmp_path / "short.pt"
    path.write_bytes(os.urandom(1000))
    fd = os.open(path, os.O_RDONLY)
    out = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(CheckpointError, match=rf"^{path}: unexpected end of file at byte 1000"):
            torchfile.crc32_range(fd, 0, 2000, path=str(path))
        with pytest.raises(CheckpointError, match=rf"^{path}: unexpected end of file reading"):
            execute._copy_range(fd, out, 500, 900, 0, src=str(path))
    finally:
        os.close(fd)
        os.close(out)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "entry"])
def test_damaged_output_is_redone(
    damage: str,
    src: Path,
    reference: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's case: damage a written optimizer shard, convert again: the damage is named
    and only the damaged file is written again; the output ends equal to a fresh one."""
    dst = tmp_path / "out"
    assert main(_convert(src, dst)) == 0
    tag = (dst / "latest").read_text()
    shard = dst / tag / OPTIM
    model = dst / tag / "mp_rank_00_model_states.pt"
    model_mtime = model.stat().st_mtime_ns
    if damage == "flip":
        flip_tensor_byte(shard)
    elif damage == "truncate":
        os.truncate(shard, shard.stat().st_size - 4096)
    elif damage == "entry":  # its record entry is not {size, crc32} (was an AttributeError)
        record = json.loads((dst / tag / COMPLETE_MARKER).read_text())
        record["files"][OPTIM] = ["not", "a", "dict"]
        (dst / tag / COMPLETE_MARKER).write_text(json.dumps(record))
    else:
        shard.unlink()
    with caplog.at_level("WARNING"):
        assert main(_convert(src, dst)) == 0
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{OPTIM}: " in warned and "writing 1 file(s) again" in warned, warned
    assert model.stat().st_mtime_ns == model_mtime  # the good file was kept
    assert file_hashes(dst) == reference
    assert verify(src, dst) == []
    _no_partial(dst)
    caplog.clear()  # a third run finds it intact and says nothing
    with caplog.at_level("WARNING"):
        assert main(_convert(src, dst)) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("foreign", [False, True])
def test_unreadable_record_is_refused(foreign: bool, src: Path, tmp_path: Path) -> None:
    """An unreadable completion record: which plan wrote the folder is unknown, so it is neither
    trusted nor overwritten: refused, naming the record (also beside another plan's stamp)."""
    dst = tmp_path / "out"
    assert main(_convert(src, dst)) == 0
    tag = (dst / "latest").read_text()
    assert not (dst / tag / execute.PARTIAL_MARKER).exists()  # a finished copy: one marker
    if foreign:
        (dst / tag / execute.PARTIAL_MARKER).write_text("0123456789abcdef\n")
    (dst / tag / COMPLETE_MARKER).write_text("{not json")
    before = snapshot(dst / tag)
    proc = _run_cli(_convert(src, dst))
    assert proc.returncode == 2
    _one_error_line(proc.stderr, str(dst / tag / COMPLETE_MARKER), "unreadable completion record")
    assert snapshot(dst / tag) == before


# ------------------------------------------------------------------------------- kind 2


def test_concurrent_converts_one_winner(
    src: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    """4 CLI processes of one source to one target, started together, 3 trials (the last one
    over a damaged output): every process exits 0 with no traceback, one correct output."""
    code = "from lightning_reshape.cli import console_main; console_main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for trial in range(3):
        dst = tmp_path / f"t{trial}"
        if trial == 2:  # start from a damaged complete output
            assert main(_convert(src, dst)) == 0
            shard = dst / (dst / "latest").read_text() / OPTIM
            os.truncate(shard, 100)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, *_convert(src, dst, "--workers", "2")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(4)
        ]
        deadline = time.monotonic() + 240
        said = []
        for proc in procs:
            out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
            assert proc.returncode == 0, (trial, err)
            assert "Traceback" not in err, (trial, out, err)
            said.append(out.split(" ", 1)[0])
        assert sorted(said) == ["reused", "reused", "reused", "wrote"], trial  # one writer
        assert file_hashes(dst) == reference, trial
        assert verify(src, dst) == []
        _no_partial(dst)


def test_cli_says_written_or_reused_and_the_layout(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``convert`` states the target layout, and says "reused" (not "wrote") when a complete
    output of the same plan was already there and nothing was written."""
    dst = tmp_path / "out"
    tag_dir = dst / (src / "latest").read_text().strip()
    layout = "tp=1 pp=1 dp=1, ZeRO stage 1"
    assert main(_convert(src, dst)) == 0
    assert capsys.readouterr().out == f"wrote {tag_dir} ({layout})\n"
    before = {p: p.stat().st_mtime_ns for p in tag_dir.iterdir()}
    assert main(_convert(src, dst)) == 0
    assert capsys.readouterr().out == f"reused {tag_dir} (already complete; {layout})\n"
    assert {p: p.stat().st_mtime_ns for p in tag_dir.iterdir()} == before


def test_lock_of_a_killed_writer_is_not_stale(
    src: Path, reference: dict[str, str], tmp_path: Path
) -> None:
    """A writer killed (-9) while holding the lock, its partial folder half written: the next
    convert takes the lock at once and ends with the correct output."""
    dst = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from lightning_reshape.checkpoint.execute import lock_output, partial_dir\n"
        "lock_output(sys.argv[1], sys.argv[2])\n"
        "part = partial_dir(sys.argv[1], sys.argv[2])\n"
        "part.mkdir()\n"
        "(part / 'mp_rank_00_model_states.pt.tmp').write_bytes(b'half')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tag = (src / "latest").read_text().strip()
    killed = subprocess.run([sys.executable, "-c", code, str(dst), tag], env=env, timeout=60)
    assert killed.returncode == -9
    assert (dst / f".{tag}.partial").is_dir()
    t0 = time.monotonic()
    proc = _run_cli(_convert(src, dst))
    assert proc.returncode == 0 and "waiting" not in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 60
    assert file_hashes(dst) == reference
    _no_partial(dst)


# ------------------------------------------------------------------------------- kind 3


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real small or read-only file system (needs root and a kernel that allows mounts)."""
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _output_bytes(reference: dict[str, str], src: Path, tmp_path: Path) -> int:
    dst = tmp_path / "sized"
    assert main(_convert(src, dst)) == 0
    return sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())


def test_disk_full_before_writing(src: Path, tmp_path: Path) -> None:
    """The free-space check against the plan's bytes refuses before writing anything."""
    with _tmpfs(tmp_path / "fs", "size=4k") as fs:
        dst = fs / "out"
        proc = _run_cli(_convert(src, dst))
        assert proc.returncode == 2
        _one_error_line(proc.stderr, str(dst), "ENOSPC", "free")
        _no_partial(dst)
        assert not (dst / "latest").exists()


def test_disk_full_while_writing(
    src: Path, reference: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real ENOSPC in the middle of the copy (the free-space check is told the disk is big, as
    when another process fills it meanwhile): one line naming the file, partial removed."""
    size = _output_bytes(reference, src, tmp_path)
    monkeypatch.setattr(execute.shutil, "disk_usage", lambda path: _Big())
    with _tmpfs(tmp_path / "fs", f"size={size // 2}") as fs:
        dst = fs / "out"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(_convert(src, dst)) == 2
        _one_error_line(err.getvalue(), str(dst), "no space left", "ENOSPC")
        _no_partial(dst)
        assert not (dst / "latest").exists()


class _Big:
    free = 1 << 50


def test_read_only_destination(src: Path, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "fs", "ro,size=1m") as fs:
        proc = _run_cli(_convert(src, fs / "out"))
        assert proc.returncode == 2
        _one_error_line(proc.stderr, str(fs / "out"), "read-only file system", "EROFS")
        assert list(fs.iterdir()) == []


def test_immutable_destination(src: Path, tmp_path: Path) -> None:
    """EPERM, real even for root: an immutable folder (``chattr +i``) as the destination and as
    the destination's parent."""
    folder = tmp_path / "frozen"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        for dst in (folder, folder / "out"):
            proc = _run_cli(_convert(src, dst))
            assert proc.returncode == 2, proc.stderr
            _one_error_line(proc.stderr, str(folder), "operation not permitted", "EPERM")
        assert list(folder.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_file_size_limit(src: Path, reference: dict[str, str], tmp_path: Path) -> None:
    """RLIMIT_FSIZE below the optimizer shard's size: EFBIG (SIGXFSZ is ignored by the CLI),
    one line naming the file, exit 2, partial removed, the source untouched."""
    dst = tmp_path / "out"
    limit = 4096  # the outputs' files are 6-8 KB
    before = snapshot(src)

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _run_cli(_convert(src, dst), preexec_fn=limited)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, str(dst), "file too large", "EFBIG")
    _no_partial(dst)
    assert not (dst / "latest").exists()
    assert snapshot(src) == before
    assert main(_convert(src, dst)) == 0  # without the limit it then goes through
    assert verify(src, dst) == []


def test_copy_range_does_not_swallow_enospc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """copy_file_range failing with ENOSPC is raised, not retried with reads and writes."""
    with _tmpfs(tmp_path / "fs", "size=512k") as fs:
        source = fs / "source.bin"  # same file system: copy_file_range works in place
        source.write_bytes(os.urandom(300 << 10))
        writes: list[int] = []
        real_pwrite = os.pwrite
        monkeypatch.setattr(os, "pwrite", lambda *a: writes.append(1) or real_pwrite(*a))
        sfd = os.open(source, os.O_RDONLY)
        dfd = os.open(fs / "target.bin", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError) as info:
                execute._copy_range(sfd, dfd, 300 << 10, 0, 0)
            assert info.value.errno == errno.ENOSPC
            assert writes == []  # no fallback to reads and writes after ENOSPC
        finally:
            os.close(sfd)
            os.close(dfd)


# ------------------------------------------------------------------------------- kind 7


def test_bad_destinations(src: Path, tmp_path: Path) -> None:
    """Inside the source tree (its save dir, its tag folder, deeper), an existing file, a path
    under a file: one line each, exit 2, nothing written anywhere."""
    tag_dir = src / (src / "latest").read_text().strip()
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    cases = [
        (src, src / tag_dir.name, "inside the source checkpoint"),  # the case
        (src, src, "inside the source checkpoint"),
        (src, src / "reshaped" / "deeper", "inside the source checkpoint"),
        (tag_dir, tag_dir / "out", "inside the source checkpoint"),
        (src, a_file, "is an existing file"),
        (src, a_file / "sub" / "out", f"lies under the file {a_file}"),
    ]
    before = snapshot(src)
    for source, dst, needle in cases:
        proc = _run_cli(_convert(source, dst)) if dst == cases[0][1] else None
        if proc is not None:
            assert proc.returncode == 2
            _one_error_line(proc.stderr, str(dst), needle)
        else:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                assert main(_convert(source, dst)) == 2, dst
            _one_error_line(err.getvalue(), str(dst), needle)
        assert snapshot(src) == before, dst
    assert a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]
