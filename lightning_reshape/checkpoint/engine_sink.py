"""The engine sink: one target file of a :class:`Plan` built in memory, as real torch objects.

Why: the copy path (``execute._write_file``) writes each target file to disk and DeepSpeed's
``engine.load_checkpoint`` reads it back. :func:`materialize` builds the very object that
``torch.load`` of that file would return, straight from the source files, so DeepSpeed can run
its own load (every format, its own fragment linking) on it with no copy on disk
(``direct.py``). Same plan, second sink: ``SetValue`` through ``execute._convert``, ``Carry``
values from the source loaded by torch's loader (memory-mapped: bytes no plan item names are
never read), ``TensorFill`` a zero tensor filled from its ``Copy`` ranges (only those elements
are read), ``tie`` the same tensor object. Every source storage record used is CRC-32 checked
first, as the copy path checks it: that check reads each such record once, whole (a zip CRC
covers its record), so a rank also reads the parts of a record other ranks need.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

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
        return _build(_single_runs(tf), sources)
    finally:
        sources.close()


def _single_runs(tf: TargetFile) -> TargetFile:
    """``tf`` with each strided copy as one copy per run, for a ``_fill`` that reads ``numel``
    (drop once ``_fill`` iterates ``Copy.runs()``)."""
    if all(c.rows == 1 for t in tf.tensors for c in t.copies):
        return tf
    items = [
        replace(
            i,
            copies=tuple(
                replace(c, src_offset=s, dst_offset=d, numel=n, rows=1, src_stride=0, dst_stride=0)
                for c in i.copies
                for s, d, n in c.runs()
            ),
        )
        if isinstance(i, TensorFill)
        else i
        for i in tf.items
    ]
    return replace(tf, items=tuple(items))


def _build(tf: TargetFile, sources: SourceFiles) -> dict[Any, Any]:
    for item in tf.items:  # check every record first: nothing corrupt reaches the engine
        if isinstance(item, Carry):
            sources.check(item.src_file, item.src_key)
        elif isinstance(item, TensorFill):
            for c in item.copies:
                sources.check(c.src_file, c.src_key)
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
    return obj


def _fill(item: TensorFill, sources: SourceFiles) -> torch.Tensor:
    """A tensor of the target dtype and shape: the planned source elements, zero elsewhere.

    Why ``empty`` and reads into place: each byte of the target is written once, and runs
    stored contiguously in the target's dtype are read from the files straight into the tensor,
    many per syscall (``execute._read_scattered``: a row-parallel split is thousands of short
    runs); only casts and strided views go through torch's memory map."""
    out = torch.empty(item.shape, dtype=torchfile.dtype(item.dtype).to_torch())
    flat = out.view(-1)
    esize = flat.element_size()
    reads: dict[str, list[tuple[str, int, int, int]]] = {}
    for c in item.copies:
        at = _file_offset(flat, c, sources) if c.numel else None
        if at is not None:
            run = (c.src_file, at + c.src_offset * esize, c.dst_offset * esize, c.numel * esize)
            reads.setdefault(c.src_file, []).append(run)
        elif c.numel:
            flat.narrow(0, c.dst_offset, c.numel).copy_(_source_run(c, sources, out))
    if reads:
        view = memoryview(flat.view(torch.uint8).numpy())
        for name, runs in reads.items():
            runs.sort(key=lambda r: r[1])
            _read_scattered(sources.fd(name), sources.path(name), runs, view, 0)
    end = 0
    for a, b in sorted((c.dst_offset, c.dst_offset + c.numel) for c in item.copies if c.numel):
        if a > end:
            flat[end:a].zero_()
        end = max(end, b)
    if end < flat.numel():
        flat[end:].zero_()
    return out


def _file_offset(flat: torch.Tensor, c: Copy, sources: SourceFiles) -> int | None:
    """Byte offset in its file of the source tensor of ``c`` when the run can be read into
    ``flat`` as stored (contiguous, the target's dtype, in bounds); None otherwise."""
    ref = sources.ref(c.src_file, c.src_key)
    if not isinstance(ref, torchfile.TensorRef) or ref.storage.file is None:
        return None
    at = ref.file_offset if ref.is_contiguous() else None
    if at is None or ref.dtype.to_torch() != flat.dtype:
        return None
    if c.src_offset + c.numel > ref.numel() or c.dst_offset + c.numel > flat.numel():
        return None  # the torch path names the mismatch
    sources.fd(c.src_file, ref.storage.file)  # opened now: the very file our reader read
    return at


def _source_run(c: Copy, sources: SourceFiles, out: torch.Tensor) -> torch.Tensor:
    """Elements ``[src_offset, +numel)`` of the source tensor, in logical order (a view of the
    memory-mapped file where it is contiguous)."""
    src = sources.value(c.src_file, c.src_key)
    if (
        not torch.is_tensor(src)
        or c.src_offset + c.numel > src.numel()
        or (c.dst_offset + c.numel > out.numel())
    ):
        raise CheckpointError(
            f"{sources.path(c.src_file)}: a copy of {c.numel} elements at {c.src_offset} does not "
            f"fit (source {src.numel() if torch.is_tensor(src) else 'not a tensor'}, target "
            f"{out.numel()} at {c.dst_offset}); the checkpoint does not match its manifest"
        )
    return src.reshape(-1).narrow(0, c.src_offset, c.numel)


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
