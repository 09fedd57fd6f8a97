"""The executor: write the files of a :class:`Plan` with bounded memory, in parallel, atomically.

Why: a checkpoint can be far larger than memory. Each target file is first written by
:func:`torchfile.save` with its tensor data left as holes (a sparse file of the right size,
metadata only), then every planned copy moves bytes from the source file's storage record to the
target's with ``os.copy_file_range`` (in the kernel, no user-space buffer); only dtype casts go
through a small buffer (and import torch). Memory stays at the metadata plus one chunk, whatever
the size of the checkpoint. Source files are only ever opened read-only. Adjacent runs are merged
into one copy, and write-back of copied blocks starts at once, so the closing fsync overlaps the
copy (measured: the library call costs about one durable ``cat`` of the same bytes, plus reading
the output back once for its checksums, about 0.35 s of CPU per GB).

Output protocol: one writer at a time per output (an exclusive lock file ``.<tag>.lock`` beside
it, held by the process that prepares and finalizes; a second writer waits, then finds the
first one's output complete and reuses it). Files go into a partial folder beside the
destination (``.<tag>.partial``), each written as ``name.tmp``, fsynced, checksummed (CRC-32
per 8 MiB block, kept in ``.name.sum`` by its writer) and renamed; when all are there the
completion record (every file with its size and block CRC-32s) is written into the folder,
which is fsynced and renamed to ``<tag>``, so the output appears complete atomically or not at
all; ``latest`` is updated last. An existing complete output of the same plan is reused only
after every file matches its record; damaged files are redone. Any error while writing removes
the partial folder (a kill leaves it, and the next run keeps its finished files).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.checkpoint.plan import (
    Carry,
    Plan,
    SetValue,
    TargetFile,
    TensorFill,
    check_source_file,
)
from lightning_reshape.checkpoint.sidecar import write_sidecar
from lightning_reshape.checkpoint.torchfile import Opaque, Size, StorageRef, TensorRef
from lightning_reshape.errors import CheckpointError, ReshapeError

__all__ = [
    "COMPLETE_MARKER",
    "PARTIAL_MARKER",
    "plan_fingerprint",
    "partial_dir",
    "execute_plan",
    "prepare_output",
    "finalize_output",
    "discard_partial",
    "lock_output",
    "check_output",
    "file_checksum",
    "check_tag",
    "write_plan",
]

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".lightning_reshape_complete"
PARTIAL_MARKER = ".lightning_reshape_partial"
CHUNK_BYTES = 16 << 20
WRITEBACK_BYTES = 64 << 20
SMALL_RANGE_BYTES = 256 << 10  # below this, a range is gathered in user space (see _gather)
WINDOW_BYTES = 512 << 10  # small enough to stay in the CPU cache between the read and the write


def plan_fingerprint(plan: Plan) -> str:
    """A short hash of what an output depends on: the source files (names, sizes, mtimes), the
    source and target layouts and the target file names. Decides whether an output is reusable."""
    h = hashlib.sha256()
    h.update(repr((plan.source_root, plan.source_tag, plan.source, asdict(plan.target))).encode())
    for name in sorted({c.src_file for f in plan.files for c in _carries_and_copies(f)}):
        st = os.stat(os.path.join(plan.source_root, name))
        h.update(repr((name, st.st_size, st.st_mtime_ns)).encode())
    h.update(repr(sorted(f.name for f in plan.files)).encode())
    return h.hexdigest()[:16]


def _carries_and_copies(tf: TargetFile) -> list[Any]:
    out: list[Any] = [i for i in tf.items if isinstance(i, Carry)]
    for t in tf.tensors:
        out.extend(t.copies)
    return out


def check_tag(tag: str) -> str:
    """Refuse a tag that is not one plain path component (``a/b``, ``..``, ``/abs``, NUL...).

    Why: the tag names the output folder ``dst/tag`` and its partial folder; anything else
    would write outside the destination (into the source, say). Returns the tag."""
    if (
        not isinstance(tag, str)
        or tag in ("", ".", "..")
        or "/" in tag
        or "\0" in tag
        or os.path.isabs(tag)
    ):
        raise CheckpointError(
            f"tag {tag!r}: not a plain folder name (no '/', '..', '.', absolute path or NUL); "
            "give a tag such as global_step100 (--tag), or fix the source's latest file"
        )
    return tag


def _is_regular(path: Path) -> bool:
    """A regular file itself (not a symlink, FIFO, folder or device): safe to open and read."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise CheckpointError(
            f"{path}: is a symbolic link; the output is never written through a link (it "
            "could lead outside the destination): remove it and run again"
        )


def _open_new(path: Path, flags: int = os.O_WRONLY) -> int:
    """Create ``path`` afresh: an existing entry (a planted symlink included) is removed first
    and the new one opened with O_EXCL|O_NOFOLLOW, so no link is ever followed."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def _write_new(path: Path, text: str, *, sync: bool = False) -> None:
    fd = _open_new(path)
    try:
        _pwrite_all(fd, text.encode(), 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read_small(path: Path) -> str:
    """Read a small text file without following a link or blocking on a FIFO (OSError when it
    is not a regular file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def partial_dir(dst: str | os.PathLike[str], tag: str) -> Path:
    """Where ranks write their share before the output is renamed into place."""
    return Path(dst) / f".{tag}.partial"


# --------------------------------------------------------------------------------------------
# object paths and storage offsets


def _get(obj: Any, key: Iterable[Any]) -> Any:
    for k in key:
        obj = obj[k]
    return obj


def _set(obj: dict[Any, Any], key: tuple[Any, ...], value: Any) -> None:
    cur: Any = obj
    for k in key[:-1]:
        if isinstance(cur, dict) and k not in cur:
            cur[k] = {}
        cur = cur[k]
    cur[key[-1]] = value


# copy_file_range errors that mean "not here" (another file system, no support): fall back to
# reads and writes. Anything else (ENOSPC, EFBIG, EIO, ...) is a real failure and propagates.
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


def _copy_range(
    src_fd: int, dst_fd: int, nbytes: int, src_off: int, dst_off: int, *, src: str = "source"
) -> None:
    """Copy in the kernel; start write-back of each copied block so the final fsync overlaps
    the copy instead of following it (the kernel would otherwise wait for its dirty limits).
    ``src`` names the source file in errors."""
    while nbytes > 0:
        want = min(nbytes, WRITEBACK_BYTES or (1 << 30))
        try:
            done = os.copy_file_range(src_fd, dst_fd, want, src_off, dst_off)
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE:
                raise
            done = 0
        if done <= 0:  # not supported here: plain reads and writes, one chunk at a time
            step = min(nbytes, CHUNK_BYTES)
            data = os.pread(src_fd, step, src_off)
            if not data:
                raise CheckpointError(
                    f"{src}: unexpected end of file reading {step} bytes at byte {src_off} (the "
                    "file is shorter than its zip directory says: truncated or replaced); "
                    "restore it from a good copy"
                )
            _pwrite_all(dst_fd, data, dst_off)
            done = len(data)
        if WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            # Linux: DONTNEED on dirty pages queues their write-back (asynchronously)
            os.posix_fadvise(dst_fd, dst_off, done, os.POSIX_FADV_DONTNEED)
        nbytes -= done
        src_off += done
        dst_off += done


def _convert(kind: str, value: Any) -> Any:
    if kind == "raw":
        return value
    if kind == "list":
        return [None] * int(value)
    if kind == "odict":
        return OrderedDict()
    if kind == "shapes":
        return [OrderedDict((n, Size(s)) for n, s in g.items()) for g in value]
    if kind == "frozen_shapes":
        return OrderedDict((n, Size(s)) for n, s in value.items())
    if kind == "slice_mappings":  # as DeepSpeed pickles its dataclass: __new__, then state
        return [
            OrderedDict(
                (n, torchfile.opaque(*_FRAGMENT, state={"numel": a, "start": b}, call=False))
                for n, (a, b) in g.items()
            )
            for g in value
        ]
    if kind == "loss_scaler":  # DeepSpeed's static LossScaler, pickled as __new__ + __dict__
        return torchfile.opaque(*_LOSS_SCALER, state=dict(value), call=False)
    if kind == "zero_stage":  # an enum pickles as a call on its value
        return torchfile.opaque(*_ZERO_STAGE, args=(int(value),))
    raise CheckpointError(f"unknown plan value kind {kind!r}")


_FRAGMENT = ("deepspeed.utils.tensor_fragment", "fragment_address")
_ZERO_STAGE = ("deepspeed.runtime.zero.config", "ZeroStageEnum")
_LOSS_SCALER = ("deepspeed.runtime.fp16.loss_scaler", "LossScaler")


# --------------------------------------------------------------------------------------------
# one file


def _write_file(
    plan: Plan,
    tf: TargetFile,
    folder: Path,
    sources: dict[str, Any],
    checked: set[tuple[Any, ...]] | None = None,
) -> int:
    """Write one target file into ``folder`` (as ``name.tmp``, then renamed); returns bytes.

    ``checked``: CRC-32 check every source storage record this file reads before copying from
    it (records already in the set are not read again; None: no check). The file's own records
    always get their CRC-32s written (:func:`torchfile.fill_crcs`).
    """

    def source(name: str) -> Any:
        if name not in sources:
            check_source_file(plan, name)  # the very file that was planned
            sources[name] = torchfile.load(
                os.path.join(plan.source_root, name), trust_checkpoint=plan.trusted
            )
            check_source_file(plan, name)
        return sources[name]

    obj: dict[Any, Any] = {}
    tensors: dict[tuple[str, Any], Any] = {}  # (src file, key path) -> tensor
    # carried tensors keep their geometry and share storages as in the source (see
    # _replace_tensors): (src file, src storage, new storage), each source storage once
    carried: list[tuple[str, StorageRef, StorageRef]] = []
    memo: dict[int, Any] = {}
    carried_keys: set[tuple[str, tuple[Any, ...]]] = set()
    # (new tensor, [(src file, src tensor, src elem offset, dst elem offset, numel)])
    jobs: list[tuple[TensorRef, list[tuple[str, TensorRef, int, int, int]]]] = []
    for item in tf.items:
        if isinstance(item, SetValue):
            _set(obj, item.key, _convert(item.kind, item.value))
        elif isinstance(item, Carry):
            try:
                value = _get(source(item.src_file), item.src_key)
            except (KeyError, IndexError, TypeError):
                raise CheckpointError(
                    f"{os.path.join(plan.source_root, item.src_file)}: key {item.src_key!r} "
                    "missing; the file does not match its manifest"
                ) from None
            found: list[tuple[StorageRef, StorageRef]] = []
            # storages shared in the source stay shared, but one source value carried to
            # several places (a group's ``step`` into each parameter's ZeRO 0 state) gives
            # independent tensors, or in-place updates after the load would alias them
            again = (item.src_file, tuple(item.src_key)) in carried_keys
            carried_keys.add((item.src_file, tuple(item.src_key)))
            _set(obj, item.dst_key, _replace_tensors(value, found, {} if again else memo))
            carried.extend((item.src_file, original, new) for new, original in found)
        elif isinstance(item, TensorFill):
            if item.tie is not None:
                _set(obj, item.key, _get(obj, item.tie))
                continue
            new = TensorRef.empty(item.shape, item.dtype)
            _set(obj, item.key, new)
            runs = []
            for c in item.copies:
                src_t = tensors.get((c.src_file, c.src_key))
                if src_t is None:
                    src_t = tensors[c.src_file, c.src_key] = _get(source(c.src_file), c.src_key)
                runs.extend((c.src_file, src_t, *r) for r in c.runs())
            jobs.append((new, runs))
    tmp = folder / f"{tf.name}.tmp"
    os.close(_open_new(tmp))  # a planted link at name.tmp is removed, never followed
    offsets = torchfile.save(obj, tmp, archive=Path(tf.name).stem)
    del obj
    moved = 0
    # byte ranges to move in the kernel: (source file, src offset, dst offset, nbytes)
    ranges: list[tuple[str, int, int, int]] = []
    # per source tensor: (elements, byte offset in its file when contiguous)
    addressable: dict[int, tuple[int, int | None]] = {}
    src_files: dict[str, torchfile.StoredFile] = {}  # opened by identity: no swapped file read
    fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        for file, src_s, dst_s in carried:  # whole storage records, byte for byte
            nbytes = src_s.numel * src_s.dtype.itemsize
            if nbytes and src_s.file is not None:
                src_files.setdefault(file, src_s.file)
                ranges.append((file, src_s.file.offsets[src_s.key][0], offsets[id(dst_s)], nbytes))
                moved += nbytes
        for dst_t, runs in jobs:
            dst_base = offsets[id(dst_t.storage)]
            dst_numel = dst_t.numel()
            esize = dst_t.element_size()
            for file, src_t, s_off, d_off, n in runs:
                if n == 0:
                    continue
                known = addressable.get(id(src_t))
                if known is None and isinstance(src_t, TensorRef):
                    if src_t.storage.file is not None:
                        src_files.setdefault(file, src_t.storage.file)
                    at = src_t.file_offset if src_t.is_contiguous() else None
                    known = (src_t.numel(), at)
                    addressable[id(src_t)] = known
                if known is None or s_off + n > known[0] or d_off + n > dst_numel:
                    raise CheckpointError(
                        f"{os.path.join(plan.source_root, file)}: a copy of {n} elements at "
                        f"{s_off} does not fit (source "
                        f"{src_t.numel() if isinstance(src_t, TensorRef) else 'not a tensor'}, "
                        f"target {dst_t.numel()} at {d_off}); the checkpoint does not match its "
                        "manifest"
                    )
                if known[1] is not None and src_t.dtype == dst_t.dtype:
                    ranges.append(
                        (file, known[1] + s_off * esize, dst_base + d_off * esize, n * esize)
                    )
                else:  # a cast (or a strided view): through a bounded buffer
                    _write_cast(fd, src_t, s_off, n, dst_t, dst_base + d_off * esize)
                moved += n * esize
        src_fds: dict[str, int] = {}
        try:
            for file in {r[0] for r in ranges}:
                src_fds[file] = src_files[file].open()
            if checked is not None:
                _check_sources(carried, jobs, src_files, src_fds, checked)
            small: list[tuple[str, int, int, int]] = []
            for file, src_off, dst_off, nbytes in _coalesce(ranges):
                if nbytes < SMALL_RANGE_BYTES:
                    small.append((file, src_off, dst_off, nbytes))
                else:
                    _copy_range(
                        src_fds[file], fd, nbytes, src_off, dst_off, src=src_files[file].path
                    )
            _gather(small, src_fds, fd)
        finally:
            for sfd in src_fds.values():
                os.close(sfd)
        torchfile.fill_crcs(tmp)
        os.fsync(fd)
    finally:
        os.close(fd)
    _write_sum(folder, tf.name, *file_checksum(tmp))
    os.replace(tmp, folder / tf.name)
    return moved


def _check_sources(
    carried: list[tuple[str, StorageRef, StorageRef]],
    jobs: list[tuple[TensorRef, list[tuple[str, TensorRef, int, int, int]]]],
    src_files: dict[str, torchfile.StoredFile],
    src_fds: dict[str, int],
    checked: set[tuple[Any, ...]],
) -> None:
    """CRC-32 check each source storage record read for this file, once per process.

    Why whole records: a zip CRC covers its record, so the bytes a copy skips (another rank's
    partition) are read too; ``copy_file_range`` never shows its bytes to user space, so this
    is a read of its own (cost: see README, "How fast")."""
    used = [(file, s.key) for file, s, _ in carried]
    used += [(file, t.storage.key) for _, runs in jobs for file, t, *_ in runs if t.storage.file]
    for file, key in dict.fromkeys(used):
        stored = src_files.get(file)
        if stored is None:  # pragma: no cover - every source tensor was read from a file
            continue
        mark = (stored.identity, file, key)
        if mark in checked:
            continue
        sfd = src_fds.get(file)
        own = sfd is None
        if own:
            sfd = stored.open()
        try:
            stored.check_crc(sfd, key)
        finally:
            if own:
                os.close(sfd)
        checked.add(mark)


def _write_cast(fd: int, src_t: TensorRef, s_off: int, n: int, dst_t: TensorRef, at: int) -> None:
    """Elements ``[s_off, s_off + n)`` of ``src_t`` (in logical order), cast to the target dtype,
    written at byte ``at``; a chunk at a time (torch is imported only for this)."""
    import torch

    flat = src_t.to_torch().reshape(-1)
    out_dtype = dst_t.dtype.to_torch()
    step = max(1, CHUNK_BYTES // max(dst_t.element_size(), src_t.element_size()))
    for a in range(0, n, step):
        b = min(n, a + step)
        chunk = flat[s_off + a : s_off + b].to(out_dtype).contiguous()
        _pwrite_all(fd, chunk.view(torch.uint8).numpy().tobytes(), at + a * dst_t.element_size())


def _pwrite_all(fd: int, data: bytes | memoryview, at: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, at)
        view, at = view[done:], at + done


_IOV_MAX = 1024
_GAP_BYTES = 256 << 10
_SCRATCH = memoryview(bytearray(_GAP_BYTES))  # read-only sink for skipped source bytes


def _read_scattered(
    src_fd: int, file: str, rs: list[tuple[str, int, int, int]], view: memoryview, d0: int
) -> None:
    """Read source ranges ``rs`` (sorted by source offset) straight into their places in
    ``view`` (which starts at target offset ``d0``): one ``preadv`` per run of ranges that lie
    close together in the source, small gaps read into a scratch buffer (a range that overlaps
    the previous one or lies far from it starts the next read)."""
    k = 0
    while k < len(rs):
        s0 = pos = rs[k][1]
        iov: list[memoryview] = []
        while k < len(rs) and len(iov) < _IOV_MAX - 1:
            _, s_off, d_off, n = rs[k]
            gap = s_off - pos
            if gap < 0 or gap > _GAP_BYTES:
                break
            if gap:
                iov.append(_SCRATCH[:gap])
            iov.append(view[d_off - d0 : d_off - d0 + n])
            pos = s_off + n
            k += 1
        if os.preadv(src_fd, iov, s0) != pos - s0:
            raise CheckpointError(f"{file}: unexpected end of file reading bytes {s0}-{pos}")


def _gather(ranges: list[tuple[str, int, int, int]], src_fds: dict[str, int], fd: int) -> None:
    """Copy many small ranges with few syscalls: scattering reads from the sources assemble the
    target a window at a time in memory, write each window's contiguous runs once.

    Why: a row-parallel (dim 1) split moves a tensor one row at a time, tens of thousands of
    ranges of a few KB; a syscall per range (and its write-back advice) would cost more than the
    bytes. Memory: one window. Bytes between the ranges are never written over.
    """
    if not ranges:
        return
    ranges = sorted(ranges, key=lambda r: r[2])
    buf = memoryview(bytearray(WINDOW_BYTES))  # one buffer for every window: no page faults
    i = 0
    while i < len(ranges):
        d0 = ranges[i][2]
        j = i + 1
        while j < len(ranges) and ranges[j][2] + ranges[j][3] - d0 <= WINDOW_BYTES:
            j += 1
        window = ranges[i:j]
        d1 = max(r[2] + r[3] for r in window)
        view = buf[: d1 - d0]
        by_file: dict[str, list[tuple[str, int, int, int]]] = {}
        for r in window:
            by_file.setdefault(r[0], []).append(r)
        for file, rs in by_file.items():
            _read_scattered(src_fds[file], file, sorted(rs, key=lambda r: r[1]), view, d0)
        start, end = window[0][2], window[0][2] + window[0][3]
        for _, _, d_off, n in [*window[1:], (None, None, -1, 0)]:
            if d_off == end:
                end += n
                continue
            _pwrite_all(fd, view[start - d0 : end - d0], start)
            start, end = d_off, d_off + n
        if hasattr(os, "posix_fadvise"):  # start write-back, as _copy_range does
            os.posix_fadvise(fd, d0, d1 - d0, os.POSIX_FADV_DONTNEED)
        i = j


def _coalesce(ranges: list[tuple[str, int, int, int]]) -> list[tuple[str, int, int, int]]:
    """Merge ranges that continue each other in both files: one syscall instead of many (a
    tensor-parallel split or a ZeRO partition boundary is often many adjacent runs)."""
    merged: list[tuple[str, int, int, int]] = []
    for file, s_off, d_off, n in ranges:
        if merged:
            pf, ps, pd, pn = merged[-1]
            if pf == file and ps + pn == s_off and pd + pn == d_off:
                merged[-1] = (pf, ps, pd, pn + n)
                continue
        merged.append((file, s_off, d_off, n))
    return merged


def _replace_tensors(
    value: Any, found: list[tuple[StorageRef, StorageRef]], memo: dict[int, Any]
) -> Any:
    """A copy of ``value`` with every tensor replaced by a new one of the same geometry (offset,
    shape, stride) on a new storage of the same size; ``found`` collects (new, original) storage
    pairs, whose bytes are copied later.

    Why views stay views: the bytes written are then those of the source's storages, each once
    per file, as ``torch.save`` wrote them, so neither an expanded (stride 0) view nor many
    references to one tensor can make the output larger than its source. ``memo`` keeps shared
    objects shared."""
    if isinstance(value, TensorRef):
        if id(value) in memo:
            return memo[id(value)]
        src = value.storage
        new_s = memo.get(id(src))
        if new_s is None:
            new_s = memo[id(src)] = StorageRef(None, "", src.dtype, src.numel)
            found.append((new_s, src))
        new = TensorRef(new_s, value.offset, value.shape, value.stride(), value.requires_grad)
        new.wrapper_state = value.wrapper_state
        memo[id(value)] = new
        return new
    if isinstance(value, dict):
        out = copy.copy(value)
        for k, v in value.items():
            out[k] = _replace_tensors(v, found, memo)
        return out
    if type(value) in (list, tuple):
        return type(value)(_replace_tensors(v, found, memo) for v in value)
    if isinstance(value, Opaque):
        out = object.__new__(type(value))  # not copy.copy: it would go through __setstate__
        d = out.__dict__
        d.update(value.__dict__)
        d["args"] = tuple(_replace_tensors(v, found, memo) for v in d["args"])
        d["state"] = _replace_tensors(d["state"], found, memo)
        d["items"] = [(k, _replace_tensors(v, found, memo)) for k, v in d["items"]]
        d["listitems"] = [_replace_tensors(v, found, memo) for v in d["listitems"]]
        return out
    return value


# --------------------------------------------------------------------------------------------
# many files


def execute_plan(
    plan: Plan,
    folder: str | os.PathLike[str],
    *,
    only_files: Iterable[str] | None = None,
    workers: int = 1,
    progress: bool = False,
    on_file: Callable[[str, int], None] | None = None,
    check_crc: bool = True,
) -> list[str]:
    """Write the plan's files (or ``only_files``) into ``folder``; returns the names written.

    Files already present in ``folder`` (complete, renamed from ``.tmp``) are kept, so a rank that
    died half-way can simply run again. Threads: ``workers`` files at a time. ``check_crc``:
    every source storage record read is checked against its zip CRC-32 first (each once).
    """
    checked: set[tuple[Any, ...]] | None = set() if check_crc else None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(only_files) if only_files is not None else None
    todo = [
        f
        for f in plan.files
        if (wanted is None or f.name in wanted) and not _finished(folder, f.name)
    ]
    if wanted is not None:
        unknown = wanted - {f.name for f in plan.files}
        if unknown:
            raise CheckpointError(f"only_files names files not in the plan: {sorted(unknown)}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(f.copy_bytes() for f in todo), unit="B", unit_scale=True, desc="convert"
        )

    def run(tf: TargetFile) -> str:
        t0 = time.perf_counter()
        sources: dict[str, Any] = {}
        with output_errors(folder / tf.name):
            moved = _write_file(plan, tf, folder, sources, checked)
        sources.clear()
        if bar is not None:
            bar.update(tf.copy_bytes())
        else:
            log.info("wrote %s (%d bytes) in %.2fs", tf.name, moved, time.perf_counter() - t0)
        if on_file is not None:
            on_file(tf.name, moved)
        return tf.name

    try:
        if workers <= 1:
            done = [run(f) for f in todo]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                done = list(pool.map(run, todo))
    finally:
        if bar is not None:
            bar.close()
    return done


def _finished(folder: Path, name: str) -> bool:
    """Whether ``folder/name`` is a finished file to keep: a regular file matching the size and
    block CRC-32s its writer recorded in ``.name.sum``. Anything else there is removed (logged)
    and written again: a kill may leave a file of an older run, or someone may damage it."""
    path = folder / name
    if not os.path.lexists(path):
        return False
    why = None
    if not _is_regular(path):
        why = "not a regular file"
    else:
        known = _read_sum(folder, name)
        if known is None:
            why = "no checksum record"
        else:
            try:
                got = file_checksum(path)
            except OSError as exc:
                got, why = None, f"unreadable ({exc.strerror})"
            if got is not None and (got[0], got[1]) != (known["size"], known["crc32"]):
                why = "does not match its checksum record"
    if why is None:
        return True
    log.warning("%s: %s; writing it again", path, why)
    _remove(path)
    return False


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --------------------------------------------------------------------------------------------
# checksums, resource errors, the lock


CHECKSUM_BLOCK = 8 << 20
CHECKSUM = "crc32 per 8 MiB block"


def file_checksum(path: str | os.PathLike[str], *, threads: int = 2) -> tuple[int, list[str]]:
    """(size, CRC-32 of each 8 MiB block as 8 hex digits) of a file, ``threads`` blocks at once.

    Why CRC-32 (ISA-L's through ``isal``, zlib's without it): about 8 GB/s a core here with
    ISA-L, 1 GB/s with zlib (BLAKE2b and SHA-256 are 2-5x slower than zlib's); it catches every
    error burst up to 32 bits and, with the size, every truncation; damage here is accidental
    (disks, copies, people), not forged, so a cryptographic hash would only cost time. The zip
    records of a torch file use it too.
    Why per block: blocks are checksummed in parallel (the CRC releases the GIL), so one large
    shard does not cost one core's time, and a mismatch says where the damage is.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO never blocks
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        size = st.st_size

        buffers = threading.local()  # one reused buffer per thread: no page faults per block

        def one(at: int) -> str:
            buf = getattr(buffers, "buf", None)
            if buf is None:
                buf = buffers.buf = memoryview(bytearray(CHECKSUM_BLOCK))
            n = os.preadv(fd, [buf], at)
            return f"{torchfile.crc32(buf[:n]):08x}" if n == min(CHECKSUM_BLOCK, size - at) else ""

        starts = range(0, size, CHECKSUM_BLOCK)
        if threads <= 1 or len(starts) <= 1:
            crcs = [one(at) for at in starts]
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                crcs = list(pool.map(one, starts))
    finally:
        os.close(fd)
    return size, crcs


def _sum_path(folder: Path, name: str) -> Path:
    return folder / f".{name}.sum"


def _write_sum(folder: Path, name: str, size: int, crc: list[str]) -> None:
    """The writer's checksum of a finished file, read back by whoever finalizes the output (so
    every rank checksums only the files it wrote, while they are still in the page cache)."""
    tmp = _sum_path(folder, name).with_suffix(".tmp")
    _write_new(tmp, json.dumps({"size": size, "crc32": crc}))
    os.replace(tmp, _sum_path(folder, name))


def _read_sum(folder: Path, name: str) -> dict[str, Any] | None:
    try:
        value = json.loads(_read_small(_sum_path(folder, name)))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and {"size", "crc32"} <= set(value) else None


_ERRNO_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space or choose another destination",
    errno.EDQUOT: "disk quota exceeded; free space or choose another destination",
    errno.EROFS: "read-only file system; choose a writable destination",
    errno.EPERM: "operation not permitted; choose a destination you may write to",
    errno.EACCES: "permission denied; choose a destination you may write to",
    errno.EFBIG: "file too large (the file system's or the process's file-size limit, "
    "`ulimit -f`); raise the limit or choose another destination",
}


@contextlib.contextmanager
def output_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError while writing the output into one CheckpointError line naming the path
    and the cause (disk full, read-only, file too large...) instead of a traceback."""
    try:
        yield
    except OSError as exc:
        where = exc.filename if exc.filename is not None else os.fspath(path)
        name = errno.errorcode.get(exc.errno or 0, "")
        cause = _ERRNO_ADVICE.get(exc.errno or 0, f"{exc.strerror or exc}")
        raise CheckpointError(
            f"{where}: cannot write the reshaped output: {cause} ({name or type(exc).__name__})"
        ) from None


def lock_output(dst: str | os.PathLike[str], tag: str) -> FileLock:
    """Take the exclusive lock of output ``dst/tag`` (waiting for another writer if needed).

    Why a lock and not private folders: the ranks of one job write their shares into one
    partial folder, so the folder cannot be private to a process; the lock is held by the
    process that prepares and finalizes (rank 0), for the whole write. The kernel drops it when
    its holder dies (kill -9 included), so it never goes stale. Release with ``.release()``.

    The empty ``.<tag>.lock`` stays after success, on purpose: the lock is the file's inode, not
    its name. Removing it would let a writer still waiting on the old inode and a newcomer that
    creates a new file under the same name both "hold" the lock (filelock keeps Unix lock files
    for this reason: tox-dev/filelock#574, #623). It is outside the tag folder and its record.
    """
    check_tag(tag)
    dst = Path(dst)
    _refuse_symlink(dst / f".{tag}.lock")  # opening it would truncate the link's target
    with output_errors(dst):
        dst.mkdir(parents=True, exist_ok=True)
        lock = FileLock(dst / f".{tag}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("%s: another process is writing this output; waiting for it", dst / tag)
            lock.acquire()
    return lock


def _record(final: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(_read_small(final / COMPLETE_MARKER))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return None  # unreadable, or written before records held checksums
    for name in record["files"]:  # a name must stay inside the folder: ``../x``, ``/etc/passwd``
        try:
            check_tag(name)
        except CheckpointError:
            return None
    return record


def check_output(
    folder: str | os.PathLike[str], record: dict[str, Any], *, workers: int = 1
) -> list[tuple[str, str]]:
    """Compare every file of a completion record with the disk: [(file, what is wrong)].

    Reads every byte once (CRC-32, ``workers`` files at a time); empty when all match."""
    folder = Path(folder)

    def one(item: tuple[str, Any]) -> tuple[str, str] | None:
        name, want = item
        path = folder / name
        if not isinstance(want, dict):  # a hand-edited or damaged record: redo that file
            return name, (
                f"its entry in {COMPLETE_MARKER} is {type(want).__name__} {str(want)[:40]!r}, "
                "not {size, crc32}"
            )
        if os.path.lexists(path) and not _is_regular(path):
            return name, "not a regular file"
        try:
            size, crc = file_checksum(path)
        except FileNotFoundError:
            return name, "missing"
        except OSError as exc:
            return name, f"unreadable ({exc.strerror})"
        if size != want.get("size"):
            return name, f"{size} bytes, the record says {want.get('size')}"
        recorded = want.get("crc32")
        if not isinstance(recorded, list) or len(recorded) != len(crc):
            return name, "its record has no block checksums"
        bad = [k for k, (got, said) in enumerate(zip(crc, recorded, strict=True)) if got != said]
        if bad:
            k = bad[0]
            end = min(size, (k + 1) * CHECKSUM_BLOCK)
            return name, (
                f"CRC-32 {crc[k] or 'unreadable'} of bytes {k * CHECKSUM_BLOCK}-{end}, the "
                f"record says {recorded[k]} ({len(bad)} damaged block(s))"
            )
        return None

    items = sorted(record["files"].items())
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [r for r in pool.map(one, items) if r is not None]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reopen(
    final: Path, part: Path, damaged: list[str] | None, record: dict[str, Any] | None = None
) -> None:
    """Turn a damaged complete output back into a partial folder, without its damaged files
    (``None``: all of them), so that only those are written again.

    Order matters for a kill half-way: the record goes first (no longer complete: the next run
    redoes it all), then the damaged files, and only then the folder becomes partial (whose
    files are trusted as finished)."""
    os.remove(final / COMPLETE_MARKER)
    for p in final.iterdir():
        if p.name == PARTIAL_MARKER or p.name.startswith("."):
            continue
        if damaged is None or p.name in damaged:
            _remove(p)
        elif record is not None and isinstance(record["files"].get(p.name), dict):
            # the kept files' checksums go back beside them: a partial folder's files are
            # kept only when they match their sums (checked again, so a bad entry is redone)
            want = record["files"][p.name]
            _write_sum(final, p.name, want.get("size"), want.get("crc32"))
    if os.path.lexists(part):
        _remove(part)
    os.rename(final, part)


def _check_free_space(plan: Plan, part: Path) -> None:
    """Refuse before writing when the planned tensor bytes (a lower bound of the output) do not
    fit on the destination's file system."""
    todo = [f for f in plan.files if not (part / f.name).exists()]
    need = sum(f.copy_bytes() for f in todo) + 4096 * len(todo)  # + a block per file
    free = shutil.disk_usage(part).free
    if need > free:
        raise CheckpointError(
            f"{part.parent}: cannot write the reshaped output: it needs at least {need} bytes, "
            f"{free} are free on that file system (ENOSPC); free space or choose another "
            "destination"
        )


def prepare_output(
    plan: Plan, dst: str | os.PathLike[str], tag: str, *, workers: int = 1
) -> tuple[Path, bool]:
    """(partial folder to write into, already_complete). Refuses to overwrite foreign data.

    Call with the output's lock held (:func:`lock_output`). A complete output of the same plan
    is checked against its record (size and CRC-32 of every file); damaged files are logged by
    name and redone. Ends with a free-space check."""
    check_tag(tag)
    dst = Path(dst)
    final = dst / tag
    _refuse_symlink(final)
    _refuse_symlink(partial_dir(dst, tag))
    if Path(plan.source_root).resolve() == final.resolve():
        raise CheckpointError(
            f"{final}: is the source tag folder; write the reshaped copy under another tag or "
            "folder (the original is never modified)"
        )
    fp = plan_fingerprint(plan)
    part = partial_dir(dst, tag)
    with output_errors(final):
        marker = final / COMPLETE_MARKER
        if os.path.lexists(marker):
            record = _record(final)
            ours = record is not None and record.get("fingerprint") == fp
            if record is not None and not ours:
                raise CheckpointError(
                    f"{final}: holds a complete reshaped checkpoint of a different plan "
                    f"({record.get('target')}); choose another destination or remove it"
                )
            if record is None:
                try:
                    ours = _read_small(final / PARTIAL_MARKER).strip() == fp
                except OSError:
                    ours = False
                if not ours:
                    raise CheckpointError(
                        f"{marker}: unreadable completion record, so which plan wrote {final} "
                        "is unknown; remove that folder to write it again, or choose another "
                        "destination"
                    )
                log.warning(
                    "%s: completion record unreadable or without checksums; writing it again",
                    marker,
                )
                _reopen(final, part, None)
            else:
                damaged = check_output(final, record, workers=workers)
                damaged += [
                    (f.name, "not in the record")
                    for f in plan.files
                    if f.name not in record["files"]
                ]
                if not damaged:
                    return final, True
                log.warning(
                    "%s: damaged reshaped output (%s); writing %d file(s) again",
                    final,
                    "; ".join(f"{name}: {why}" for name, why in damaged),
                    len(damaged),
                )
                _reopen(final, part, [name for name, _ in damaged], record)
        if os.path.lexists(final):
            if _is_regular(final / PARTIAL_MARKER):
                shutil.rmtree(final)  # ours, renamed but never marked complete: redo it
            else:
                raise CheckpointError(
                    f"{final}: already exists and is not a lightning-reshape output; choose "
                    "another destination or tag, or remove it"
                )
        part.mkdir(parents=True, exist_ok=True)
        stamp = part / PARTIAL_MARKER
        if os.path.lexists(stamp) and not (_is_regular(stamp) and _read_small(stamp).strip() == fp):
            shutil.rmtree(part)  # an interrupted output of another plan
            part.mkdir(parents=True)
        _write_new(stamp, fp + "\n")
        try:
            _check_free_space(plan, part)
        except CheckpointError:
            shutil.rmtree(part, ignore_errors=True)  # what it holds frees space too
            raise
    return part, False


def discard_partial(dst: str | os.PathLike[str], tag: str) -> None:
    """Remove the partial folder after a failed write (it may hold most of a disk)."""
    shutil.rmtree(partial_dir(dst, tag), ignore_errors=True)


def _write_latest(dst: Path, tag: str) -> None:
    tmp_latest = dst / ".latest.tmp"
    _write_new(tmp_latest, tag)  # a planted link there is removed, never followed
    os.replace(tmp_latest, dst / "latest")  # replaces a link at ``latest`` itself


def finalize_output(
    plan: Plan, dst: str | os.PathLike[str], tag: str, *, latest: bool, workers: int = 1
) -> Path:
    """Check every file is there, write the completion record (every file with its size and
    CRC-32) into the partial folder and rename it into place: complete atomically."""
    check_tag(tag)
    dst = Path(dst)
    part = partial_dir(dst, tag)
    final = dst / tag
    _refuse_symlink(part)
    _refuse_symlink(final)
    missing = [f.name for f in plan.files if not _is_regular(part / f.name)]
    if missing:
        raise CheckpointError(
            f"{part}: {len(missing)} planned files are missing (e.g. {missing[0]}); a rank did not "
            "finish its share: run the conversion again"
        )
    with output_errors(final):
        if plan.sidecar is not None:
            write_sidecar(part, plan.sidecar)
        for stale in part.glob("*.tmp"):  # left by a writer that was killed: never data
            _remove(stale)
        names = sorted(
            p.name for p in part.iterdir() if _is_regular(p) and not p.name.startswith(".")
        )

        def entry(name: str) -> dict[str, Any]:
            known = _read_sum(part, name)
            if known is None:  # written by an older run, or not by the executor (the sidecar)
                size, crc = file_checksum(part / name)
                known = {"size": size, "crc32": crc}
            return known

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            files = dict(zip(names, pool.map(entry, names), strict=True))
        info = {
            "fingerprint": plan_fingerprint(plan),
            "source": os.path.join(plan.source_root),
            "source_layout": plan.source,
            "target": str(plan.target),
            "checksum": CHECKSUM,
            "files": files,
        }
        for name in names:
            _sum_path(part, name).unlink(missing_ok=True)
        tmp = part / f"{COMPLETE_MARKER}.tmp"
        _write_new(tmp, json.dumps(info, indent=2) + "\n", sync=True)
        os.replace(tmp, part / COMPLETE_MARKER)
        # a finished copy carries one marker: the partial one only told an interrupted run apart
        (part / PARTIAL_MARKER).unlink(missing_ok=True)
        _fsync_dir(part)
        os.replace(part, final)
        _fsync_dir(dst)
        if latest:
            _write_latest(dst, tag)
            _fsync_dir(dst)
    return final


def write_plan(
    plan: Plan,
    dst: str | os.PathLike[str],
    tag: str,
    *,
    workers: int = 1,
    progress: bool = False,
    latest: bool = True,
    check_crc: bool = True,
    on_reuse: Callable[[], object] | None = None,
) -> Path:
    """The whole protocol in one process: lock, prepare, execute every file, finalize.

    A concurrent writer of the same output waits for the lock and then reuses the output
    (``on_reuse`` is called then, so a caller can say nothing was written); an error while
    writing removes the partial folder."""
    check_tag(tag)
    dst = Path(dst)
    lock = lock_output(dst, tag)
    try:
        part, complete = prepare_output(plan, dst, tag, workers=workers)
        if complete:
            log.info("%s: complete output of the same plan found, checked, reused", part)
            if on_reuse is not None:
                on_reuse()
            if latest:
                with output_errors(dst / "latest"):
                    _write_latest(dst, tag)
            return part
        try:
            execute_plan(plan, part, workers=workers, progress=progress, check_crc=check_crc)
            return finalize_output(plan, dst, tag, latest=latest, workers=workers)
        except (ReshapeError, OSError):
            discard_partial(dst, tag)
            raise
    finally:
        lock.release()
