"""The executor: write the files of a :class:`Plan` with bounded memory, in parallel, atomically.

Why: a checkpoint can be far larger than memory. Each target file is first written by
``torch.save`` with its tensor data skipped (``torch.serialization.skip_data``: a sparse file of the
right size, metadata only), then every planned copy moves bytes from the source file's storage
record to the target's with ``os.copy_file_range`` (in the kernel, no user-space buffer); only
dtype casts go through a small buffer. Memory stays at the metadata plus one chunk, whatever the
size of the checkpoint. Source files are only ever opened read-only. Adjacent runs are merged into
one copy, and write-back of copied blocks starts at once, so the closing fsync overlaps the copy
(measured: the library call costs about one durable ``cat`` of the same bytes).

Output protocol: files go into a partial folder beside the destination (``.<tag>.partial``),
each written as ``name.tmp`` then renamed; when all are there the folder is fsynced and renamed to
``<tag>``, a completion marker is written and ``latest`` updated. An existing complete output with
the same plan fingerprint is reused; an incomplete one is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lightning_reshape.checkpoint.plan import Carry, Plan, SetValue, TargetFile, TensorFill
from lightning_reshape.checkpoint.safe_load import safe_load
from lightning_reshape.checkpoint.sidecar import write_sidecar
from lightning_reshape.errors import CheckpointError

__all__ = [
    "COMPLETE_MARKER",
    "PARTIAL_MARKER",
    "plan_fingerprint",
    "partial_dir",
    "execute_plan",
    "finalize_output",
    "write_plan",
]

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".lightning_reshape_complete"
PARTIAL_MARKER = ".lightning_reshape_partial"
CHUNK_BYTES = 16 << 20
WRITEBACK_BYTES = 64 << 20


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


def _walk_tensors(obj: Any, path: tuple[Any, ...] = ()) -> Iterable[tuple[tuple[Any, ...], Any]]:
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk_tensors(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, (*path, i))


class _Mapped:
    """A loaded (mmapped) torch file plus the byte offset of every storage in the file."""

    def __init__(self, path: str, trusted: bool) -> None:
        self.path = path
        self.obj = safe_load(path, trust_checkpoint=trusted)
        self.base: int | None = None
        ptrs = sorted(
            {
                t.untyped_storage().data_ptr()
                for _, t in _walk_tensors(self.obj)
                if t.untyped_storage().nbytes() > 0
            }
        )
        if not ptrs:
            return
        reader = torch._C.PyTorchFileReader(path)
        offsets = sorted(
            reader.get_record_offset(r) for r in reader.get_all_records() if "data/" in r
        )
        known = set(offsets)
        for off in offsets:
            base = ptrs[0] - off
            if all((p - base) in known for p in ptrs):
                self.base = base
                break

    def byte_offset(self, t: torch.Tensor) -> int | None:
        """File offset of ``t``'s first element, or None when bytes cannot be addressed."""
        if self.base is None or not t.is_contiguous():
            return None
        return t.untyped_storage().data_ptr() - self.base + t.storage_offset() * t.element_size()


def _copy_range(src_fd: int, dst_fd: int, nbytes: int, src_off: int, dst_off: int) -> None:
    """Copy in the kernel; start write-back of each copied block so the final fsync overlaps
    the copy instead of following it (the kernel would otherwise wait for its dirty limits)."""
    while nbytes > 0:
        want = min(nbytes, WRITEBACK_BYTES or (1 << 30))
        try:
            done = os.copy_file_range(src_fd, dst_fd, want, src_off, dst_off)
        except OSError:
            done = 0
        if done <= 0:  # not supported here: plain reads and writes, one chunk at a time
            step = min(nbytes, CHUNK_BYTES)
            data = os.pread(src_fd, step, src_off)
            if not data:
                raise CheckpointError(f"unexpected end of file reading {step} bytes at {src_off}")
            os.pwrite(dst_fd, data, dst_off)
            done = len(data)
        if WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            # Linux: DONTNEED on dirty pages queues their write-back (asynchronously)
            os.posix_fadvise(dst_fd, dst_off, done, os.POSIX_FADV_DONTNEED)
        nbytes -= done
        src_off += done
        dst_off += done


_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "bool": torch.bool,
}


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        return getattr(torch, name)


def _convert(kind: str, value: Any) -> Any:
    from collections import OrderedDict

    if kind == "raw":
        return value
    if kind == "list":
        return [None] * int(value)
    if kind == "odict":
        return OrderedDict()
    if kind == "shapes":
        return [OrderedDict((n, torch.Size(s)) for n, s in g.items()) for g in value]
    if kind == "frozen_shapes":
        return OrderedDict((n, torch.Size(s)) for n, s in value.items())
    if kind == "slice_mappings":
        from deepspeed.utils.tensor_fragment import fragment_address

        return [
            OrderedDict((n, fragment_address(numel=a, start=b)) for n, (a, b) in g.items())
            for g in value
        ]
    if kind == "zero_stage":
        from deepspeed.runtime.zero.config import ZeroStageEnum

        return ZeroStageEnum(int(value))
    raise CheckpointError(f"unknown plan value kind {kind!r}")


# --------------------------------------------------------------------------------------------
# one file


def _write_file(plan: Plan, tf: TargetFile, folder: Path, sources: dict[str, _Mapped]) -> int:
    """Write one target file into ``folder`` (as ``name.tmp``, then renamed); returns bytes."""

    def source(name: str) -> _Mapped:
        if name not in sources:
            sources[name] = _Mapped(os.path.join(plan.source_root, name), plan.trusted)
        return sources[name]

    obj: dict[Any, Any] = {}
    # (dst key path, dtype, [(src file, src tensor, src elem offset, dst elem offset, numel)])
    jobs: list[tuple[tuple[Any, ...], list[tuple[str, torch.Tensor, int, int, int]]]] = []
    for item in tf.items:
        if isinstance(item, SetValue):
            _set(obj, item.key, _convert(item.kind, item.value))
        elif isinstance(item, Carry):
            src = source(item.src_file)
            try:
                value = _get(src.obj, item.src_key)
            except (KeyError, IndexError, TypeError):
                raise CheckpointError(
                    f"{src.path}: key {item.src_key!r} missing; the file does not match its "
                    "manifest"
                ) from None
            value, found = _replace_tensors(value)
            _set(obj, item.dst_key, value)
            for sub, (placeholder, original) in found.items():
                jobs.append(
                    ((*item.dst_key, *sub), [(item.src_file, original, 0, 0, original.numel())])
                )
                del placeholder
        elif isinstance(item, TensorFill):
            if item.tie is not None:
                _set(obj, item.key, _get(obj, item.tie))
                continue
            _set(obj, item.key, torch.empty(item.shape, dtype=_dtype(item.dtype)))
            runs = []
            for c in item.copies:
                src = source(c.src_file)
                t = _get(src.obj, c.src_key)
                runs.append((c.src_file, t, c.src_offset, c.dst_offset, c.numel))
            jobs.append((item.key, runs))
    tmp = folder / f"{tf.name}.tmp"
    with torch.serialization.skip_data():
        torch.save(obj, tmp)
    del obj
    out = _Mapped(str(tmp), trusted=True)
    moved = 0
    # byte ranges to move in the kernel: (source file, src offset, dst offset, nbytes)
    ranges: list[tuple[str, int, int, int]] = []
    fd = os.open(tmp, os.O_WRONLY)
    try:
        for key, runs in jobs:
            dst_t = _get(out.obj, key)
            dst_base = out.byte_offset(dst_t)
            if dst_base is None and dst_t.numel() > 0:
                raise CheckpointError(f"{tmp}: cannot address tensor {key!r} in the output")
            esize = dst_t.element_size()
            for file, src_t, s_off, d_off, n in runs:
                if n == 0:
                    continue
                if s_off + n > src_t.numel() or d_off + n > dst_t.numel():
                    raise CheckpointError(
                        f"{os.path.join(plan.source_root, file)}: a copy of {n} elements at "
                        f"{s_off} does not fit (source {src_t.numel()}, target "
                        f"{dst_t.numel()} at {d_off}); the checkpoint does not match its "
                        "manifest"
                    )
                src_base = sources[file].byte_offset(src_t)
                if src_base is not None and src_t.dtype == dst_t.dtype:
                    ranges.append(
                        (
                            file,
                            src_base + s_off * esize,
                            dst_base + d_off * esize,  # type: ignore[operator]
                            n * esize,
                        )
                    )
                else:  # cast (or a view we cannot address): through a bounded buffer
                    flat = src_t.reshape(-1)
                    step = max(1, CHUNK_BYTES // max(esize, src_t.element_size()))
                    for a in range(0, n, step):
                        b = min(n, a + step)
                        chunk = flat[s_off + a : s_off + b].to(dst_t.dtype).contiguous()
                        os.pwrite(
                            fd,
                            chunk.view(torch.uint8).numpy().tobytes(),
                            dst_base + (d_off + a) * esize,  # type: ignore[operator]
                        )
                moved += n * esize
        src_fds: dict[str, int] = {}
        try:
            for file, src_off, dst_off, nbytes in _coalesce(ranges):
                if file not in src_fds:
                    src_fds[file] = os.open(os.path.join(plan.source_root, file), os.O_RDONLY)
                _copy_range(src_fds[file], fd, nbytes, src_off, dst_off)
        finally:
            for sfd in src_fds.values():
                os.close(sfd)
        os.fsync(fd)
    finally:
        os.close(fd)
    del out
    os.replace(tmp, folder / tf.name)
    return moved


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


def _replace_tensors(value: Any) -> tuple[Any, dict[tuple[Any, ...], tuple[Any, torch.Tensor]]]:
    """Copy containers, put empty placeholders where tensors are (their bytes are copied later)."""
    found: dict[tuple[Any, ...], tuple[Any, torch.Tensor]] = {}

    def rec(v: Any, path: tuple[Any, ...]) -> Any:
        if torch.is_tensor(v):
            p = torch.empty(v.shape, dtype=v.dtype)
            found[path] = (p, v)
            return p
        if isinstance(v, Mapping) and type(v) in (dict, type(_odict())):
            out = type(v)()
            for k, x in v.items():
                out[k] = rec(x, (*path, k))
            return out
        if type(v) in (list, tuple):
            return type(v)(rec(x, (*path, i)) for i, x in enumerate(v))
        return v

    return rec(value, ()), found


def _odict() -> Any:
    from collections import OrderedDict

    return OrderedDict()


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
) -> list[str]:
    """Write the plan's files (or ``only_files``) into ``folder``; returns the names written.

    Files already present in ``folder`` (complete, renamed from ``.tmp``) are kept, so a rank that
    died half-way can simply run again. Threads: ``workers`` files at a time.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(only_files) if only_files is not None else None
    todo = [
        f
        for f in plan.files
        if (wanted is None or f.name in wanted) and not (folder / f.name).exists()
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
        sources: dict[str, _Mapped] = {}
        moved = _write_file(plan, tf, folder, sources)
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_output(plan: Plan, dst: str | os.PathLike[str], tag: str) -> tuple[Path, bool]:
    """(partial folder to write into, already_complete). Refuses to overwrite foreign data."""
    dst = Path(dst)
    final = dst / tag
    if Path(plan.source_root).resolve() == final.resolve():
        raise CheckpointError(
            f"{final}: is the source tag folder; write the reshaped copy under another tag or "
            "folder (the original is never modified)"
        )
    marker = final / COMPLETE_MARKER
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("fingerprint") == plan_fingerprint(plan):
            return final, True
        raise CheckpointError(
            f"{final}: holds a complete reshaped checkpoint of a different plan "
            f"({done.get('target')}); choose another destination or remove it"
        )
    if final.exists():
        if (final / PARTIAL_MARKER).is_file():
            shutil.rmtree(final)  # ours, renamed but never marked complete: redo it
        else:
            raise CheckpointError(
                f"{final}: already exists and is not a lightning-reshape output; choose another "
                "destination or tag, or remove it"
            )
    part = partial_dir(dst, tag)
    part.mkdir(parents=True, exist_ok=True)
    stamp = part / PARTIAL_MARKER
    fp = plan_fingerprint(plan)
    if stamp.is_file() and stamp.read_text().strip() != fp:
        shutil.rmtree(part)  # an interrupted output of another plan
        part.mkdir(parents=True)
    stamp.write_text(fp + "\n")
    return part, False


def finalize_output(plan: Plan, dst: str | os.PathLike[str], tag: str, *, latest: bool) -> Path:
    """Check every file is there, rename the partial folder into place, mark it complete."""
    dst = Path(dst)
    part = partial_dir(dst, tag)
    final = dst / tag
    missing = [f.name for f in plan.files if not (part / f.name).is_file()]
    if missing:
        raise CheckpointError(
            f"{part}: {len(missing)} planned files are missing (e.g. {missing[0]}); a rank did not "
            "finish its share: run the conversion again"
        )
    if plan.sidecar is not None:
        write_sidecar(part, plan.sidecar)
    _fsync_dir(part)
    os.replace(part, final)
    _fsync_dir(dst)
    info = {
        "fingerprint": plan_fingerprint(plan),
        "source": os.path.join(plan.source_root),
        "source_layout": plan.source,
        "target": str(plan.target),
        "files": [f.name for f in plan.files],
    }
    tmp = final / f"{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, final / COMPLETE_MARKER)
    if latest:
        tmp_latest = dst / ".latest.tmp"
        tmp_latest.write_text(tag)
        os.replace(tmp_latest, dst / "latest")
    _fsync_dir(final)
    return final


def write_plan(
    plan: Plan,
    dst: str | os.PathLike[str],
    tag: str,
    *,
    workers: int = 1,
    progress: bool = False,
    latest: bool = True,
) -> Path:
    """The whole protocol in one process: prepare, execute every file, finalize."""
    part, complete = prepare_output(plan, dst, tag)
    if complete:
        log.info("%s: complete output of the same plan found, reused", part)
        if latest:
            (Path(dst) / "latest").write_text(tag)
        return part
    execute_plan(plan, part, workers=workers, progress=progress)
    return finalize_output(plan, dst, tag, latest=latest)
