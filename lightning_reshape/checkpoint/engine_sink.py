"""The engine sink: one target file of a :class:`Plan` built in memory, as real torch objects.

Why: the copy path (``execute._write_file``) writes each target file to disk and DeepSpeed's
``engine.load_checkpoint`` reads it back. :func:`materialize` builds the very object that
``torch.load`` of that file would return, straight from the source files, so DeepSpeed can run
its own load (every format, its own fragment linking) on it with no copy on disk
(``direct.py``). Same plan, second sink: ``SetValue`` through ``execute._convert``, ``Carry``
values from the source loaded by torch's loader (memory-mapped: bytes no plan item names are
never read), ``TensorFill`` a zero tensor filled from its ``Copy`` ranges (only those elements
are read), ``tie`` the same tensor object. Every source storage record used is CRC-32 checked before
:func:`materialize` returns, as the copy path checks it. A zip CRC covers its whole record:
the bytes read into place are checked in memory as they lie there, and only the parts of a
record this rank does not need (other ranks' slices) are read for the check.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.checkpoint.execute import _convert, _get, _read_scattered, _set
from lightning_reshape.checkpoint.plan import (
    Carry,
    Copy,
    Plan,
    SetValue,
    TargetFile,
    TensorFill,
    check_source_file,
)
from lightning_reshape.checkpoint.safe_load import safe_load
from lightning_reshape.errors import CheckpointError

__all__ = ["SourceFiles", "materialize"]


class SourceFiles:
    """The source files one :func:`materialize` call reads, each opened once: torch's object
    (memory-mapped) for the values, our metadata (record offsets, CRC-32s) for the check.

    ``checked`` (shared between calls; None: no check) holds the records already checked."""

    def __init__(self, plan: Plan, checked: set[tuple[Any, ...]] | None) -> None:
        self.plan = plan
        self.checked = checked
        self._torch: dict[str, Any] = {}
        self._refs: dict[str, Any] = {}
        self._fds: dict[str, int] = {}
        # records read into place, checked in memory at :meth:`check_read`:
        # (identity, file, record) -> (stored file, [(offset in record, the bytes read)])
        self._read: dict[tuple[Any, ...], tuple[torchfile.StoredFile, list[Any]]] = {}

    def path(self, name: str) -> str:
        """The source file's path."""
        return os.path.join(self.plan.source_root, name)

    def torch(self, name: str) -> Any:
        """The file as ``torch.load`` (memory-mapped, allow-listed) returns it."""
        if name not in self._torch:
            check_source_file(self.plan, name)  # the very file that was planned
            self._torch[name] = safe_load(self.path(name), trust_checkpoint=self.plan.trusted)
            check_source_file(self.plan, name)  # and not replaced while torch read it
        return self._torch[name]

    def value(self, name: str, key: tuple[Any, ...]) -> Any:
        """The value at ``key`` of source file ``name``; a missing key is one clear error."""
        try:
            return _get(self.torch(name), key)
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(
                f"{self.path(name)}: key {key!r} missing; the file does not match its manifest"
            ) from None

    def ref(self, name: str, key: tuple[Any, ...]) -> Any:
        """The value at ``key`` as our reader records it (tensors as file offsets)."""
        if name not in self._refs:
            check_source_file(self.plan, name)
            self._refs[name] = torchfile.load(self.path(name), trust_checkpoint=self.plan.trusted)
            check_source_file(self.plan, name)
        try:
            return _get(self._refs[name], key)
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(
                f"{self.path(name)}: key {key!r} missing; the file does not match its manifest"
            ) from None

    def fd(self, name: str, stored: torchfile.StoredFile | None = None) -> int:
        """A read-only descriptor of the very file our reader read (kept until :meth:`close`;
        the first call for a file passes its ``stored`` record)."""
        if name not in self._fds:
            assert stored is not None
            self._fds[name] = stored.open()
        return self._fds[name]

    def close(self) -> None:
        """Close the descriptors :meth:`fd` opened."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def check(self, name: str, key: tuple[Any, ...]) -> None:
        """CRC-32 check every storage record under ``key`` of file ``name`` (each once)."""
        if self.checked is None:
            return
        for ref in _tensor_refs(self.ref(name, key)):
            stored = ref.storage.file
            mark = (stored.identity, name, ref.storage.key) if stored is not None else None
            if mark is None or mark in self.checked:
                continue
            stored.check_crc(self.fd(name, stored), ref.storage.key)
            self.checked.add(mark)

    def read_into_place(
        self, name: str, storage: torchfile.StorageRef, at: int, data: memoryview
    ) -> None:
        """Note that ``data`` will hold the bytes of ``storage`` (a record of file ``name``) from
        byte ``at`` of the record, read into place: :meth:`check_read` checks the record's CRC-32
        over them in memory instead of reading them again."""
        stored = storage.file
        if self.checked is None or stored is None:
            return
        mark = (stored.identity, name, storage.key)
        if mark not in self.checked:
            self._read.setdefault(mark, (stored, []))[1].append((at, data))

    def check_read(self) -> None:
        """CRC-32 check the records :meth:`read_into_place` noted (after the reads), each once."""
        checked = self.checked
        if checked is None:  # nothing was noted: read_into_place keeps nothing unchecked
            return
        for mark, (stored, parts) in self._read.items():
            if mark not in checked:
                parts.sort(key=lambda p: p[0])
                stored.check_crc(self.fd(mark[1], stored), mark[2], parts)
                checked.add(mark)
        self._read.clear()


def _tensor_refs(value: Any) -> Iterator[torchfile.TensorRef]:
    """Every tensor (as our reader's record) inside ``value``."""
    stack, seen = [value], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torchfile.TensorRef):
            yield obj
        stack.extend(torchfile._children(obj))


def materialize(plan: Plan, tf: TargetFile, sources: SourceFiles) -> dict[Any, Any]:
    """The state dict ``torch.load`` returns for target file ``tf`` as the copy path writes it."""
    try:
        return _build(tf, sources)
    finally:
        sources.close()


def _build(tf: TargetFile, sources: SourceFiles) -> dict[Any, Any]:
    for item in tf.items:  # carried records are checked first: torch hands them on as they are
        if isinstance(item, Carry):
            sources.check(item.src_file, item.src_key)
    obj: dict[Any, Any] = {}
    memo: dict[int, Any] = {}  # carried values share storages as in the source
    carried: set[tuple[str, tuple[Any, ...]]] = set()
    for item in tf.items:
        if isinstance(item, SetValue):
            _set(obj, item.key, _real(_convert(item.kind, copy.deepcopy(item.value))))
        elif isinstance(item, Carry):
            # one source value carried to several places gets its own copy (execute's "again")
            mark = (item.src_file, tuple(item.src_key))
            value = sources.value(item.src_file, item.src_key)
            _set(obj, item.dst_key, copy.deepcopy(value, {} if mark in carried else memo))
            carried.add(mark)
        elif item.tie is not None:
            _set(obj, item.key, _get(obj, item.tie))
        else:
            _set(obj, item.key, _fill(item, sources))
    sources.check_read()  # before anything is returned: nothing corrupt reaches the engine
    return obj


def _fill(item: TensorFill, sources: SourceFiles) -> torch.Tensor:
    """A tensor of the target dtype and shape: the planned source elements, zero elsewhere.

    Why ``empty`` and reads into place: each byte of the target is written once, and runs
    stored contiguously in the target's dtype are read from the files straight into the tensor,
    many per syscall (``execute._read_scattered``: a row-parallel split is thousands of short
    runs), then CRC-checked where they lie (:meth:`SourceFiles.read_into_place`); only casts
    and strided views go through torch's memory map (their records checked first)."""
    out = torch.empty(item.shape, dtype=torchfile.dtype(item.dtype).to_torch())
    flat = out.view(-1)
    esize = flat.element_size()
    view = memoryview(flat.view(torch.uint8).numpy())
    reads: dict[str, list[tuple[str, int, int, int]]] = {}
    spans: list[tuple[int, int]] = []
    stored: dict[tuple[str, tuple[Any, ...]], _Stored | None] = {}  # a copy per row, often
    for c in item.copies:
        mark = (c.src_file, tuple(c.src_key))
        if mark not in stored:
            stored[mark] = _stored_as_target(flat, c, sources)
        st = stored[mark]
        if st is not None and _reads_as_spans(c, st, flat):
            _fill_strided(c, st, flat, sources)
            spans.extend((d, d + n) for _, d, n in c.runs())
            continue
        for s, d, n in c.runs():
            if not n:
                continue
            spans.append((d, d + n))
            if st is not None and s + n <= st.numel and d + n <= flat.numel():
                at = st.at + s * esize
                reads.setdefault(c.src_file, []).append((c.src_file, at, d * esize, n * esize))
                part = view[d * esize : (d + n) * esize]
                sources.read_into_place(c.src_file, st.storage, at - st.record_at, part)
            else:  # the torch path names a run out of bounds
                sources.check(c.src_file, c.src_key)
                flat.narrow(0, d, n).copy_(_source_run(c, s, d, n, sources, out))
    for name, runs in reads.items():
        runs.sort(key=lambda r: r[1])
        _read_scattered(sources.fd(name), sources.path(name), runs, view, 0)
    end = 0
    for a, b in sorted(spans):
        if a > end:
            flat[end:a].zero_()
        end = max(end, b)
    if end < flat.numel():
        flat[end:].zero_()
    return out


class _Stored(NamedTuple):
    """A source tensor readable as stored: its storage record, the byte offset in its file of
    its element 0 and of its record's first byte, its element count."""

    storage: torchfile.StorageRef
    at: int
    record_at: int
    numel: int


def _stored_as_target(flat: torch.Tensor, c: Copy, sources: SourceFiles) -> _Stored | None:
    """Where the source tensor of ``c`` lies when its runs can be read into ``flat`` as stored
    (contiguous, in the target's dtype); None otherwise."""
    ref = sources.ref(c.src_file, c.src_key)
    if not isinstance(ref, torchfile.TensorRef) or ref.storage.file is None:
        return None
    at = ref.file_offset
    if at is None or not ref.is_contiguous() or ref.dtype.to_torch() != flat.dtype:
        return None
    sources.fd(c.src_file, ref.storage.file)  # opened now: the very file our reader read
    return _Stored(ref.storage, at, ref.storage.data_offset, ref.numel())


#: at most this many bytes of a strided copy's source span are held at once
STRIDED_CHUNK_BYTES = 64 << 20


def _reads_as_spans(c: Copy, st: _Stored, flat: torch.Tensor) -> bool:
    """Whether strided copy ``c`` is read best as whole source spans (:func:`_fill_strided`):
    several rows that neither overlap nor leave ``flat`` or the source; otherwise its runs are
    read one by one (and a run out of bounds is named there)."""
    if c.rows < 2 or c.src_stride < c.numel or c.dst_stride < c.numel or not c.numel:
        return False
    src_end = c.src_offset + (c.rows - 1) * c.src_stride + c.numel
    dst_end = c.dst_offset + (c.rows - 1) * c.dst_stride + c.numel
    return src_end <= st.numel and dst_end <= flat.numel()


def _fill_strided(c: Copy, st: _Stored, flat: torch.Tensor, sources: SourceFiles) -> None:
    """A strided copy (a row-parallel weight: a run per row) read as whole source spans, a
    chunk of rows at a time, then placed row by row in one strided torch copy.

    Why: per run it would be a Python step, an iovec and a CRC call per row; read as a span it
    is one ``pread`` and one in-memory CRC-32 per chunk (the bytes between the rows are other
    tp ranks' and the record's CRC needs them anyway)."""
    esize = flat.element_size()
    per_chunk = max(1, STRIDED_CHUNK_BYTES // max(1, c.src_stride * esize))
    fd, path = sources.fd(c.src_file), sources.path(c.src_file)
    for r0 in range(0, c.rows, per_chunk):
        rows = min(per_chunk, c.rows - r0)
        span = (rows - 1) * c.src_stride + c.numel
        src = torch.empty(span, dtype=flat.dtype)
        data = memoryview(src.view(torch.uint8).numpy())
        at = st.at + (c.src_offset + r0 * c.src_stride) * esize
        if os.preadv(fd, [data], at) != len(data):
            raise CheckpointError(
                f"{path}: unexpected end of file reading bytes {at}-{at + len(data)}"
            )
        sources.read_into_place(c.src_file, st.storage, at - st.record_at, data)
        dst = flat.as_strided((rows, c.numel), (c.dst_stride, 1), c.dst_offset + r0 * c.dst_stride)
        dst.copy_(src.as_strided((rows, c.numel), (c.src_stride, 1)))


def _source_run(
    c: Copy, s: int, d: int, n: int, sources: SourceFiles, out: torch.Tensor
) -> torch.Tensor:
    """Elements ``[s, s + n)`` of the source tensor of ``c``, in logical order, for elements
    ``[d, d + n)`` of ``out`` (a view of the memory-mapped file where it is contiguous)."""
    src = sources.value(c.src_file, c.src_key)
    if not torch.is_tensor(src) or s + n > src.numel() or d + n > out.numel():
        raise CheckpointError(
            f"{sources.path(c.src_file)}: a copy of {n} elements at {s} does not fit (source "
            f"{src.numel() if torch.is_tensor(src) else 'not a tensor'}, target "
            f"{out.numel()} at {d}); the checkpoint does not match its manifest"
        )
    return src.reshape(-1).narrow(0, s, n)


def _real(value: Any) -> Any:
    """``_convert``'s stand-ins (torch.Size, DeepSpeed's classes) as the objects torch's
    unpickler builds from them."""
    if isinstance(value, torchfile.Size):
        return torch.Size(value)
    if isinstance(value, torchfile.DType):
        return value.to_torch()
    if isinstance(value, torchfile.Opaque):
        return _real_opaque(value)
    if isinstance(value, dict):
        out = type(value)() if isinstance(value, OrderedDict) else {}
        for k, v in value.items():
            out[k] = _real(v)
        return out
    if type(value) in (list, tuple):
        return type(value)(_real(v) for v in value)
    return value


def _real_opaque(value: torchfile.Opaque) -> Any:
    """What pickle's REDUCE / NEWOBJ + BUILD make of a recorded instance."""
    d = value.__dict__
    cls = getattr(importlib.import_module(value._module), value._name)
    args = tuple(_real(a) for a in d["args"])
    obj = cls(*args) if d["called"] else cls.__new__(cls, *args)
    state = _real(d["state"])
    if state is not None:
        setstate = getattr(obj, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        else:
            obj.__dict__.update(state)
    for k, v in d["items"]:
        obj[k] = _real(v)
    for v in d["listitems"]:
        obj.append(_real(v))
    return obj
