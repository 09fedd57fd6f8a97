"""Read and write torch's checkpoint files without importing torch: metadata in, bytes placed.

Why: a reshape never computes on a tensor; it only needs where each tensor's bytes are and
where they go. ``import torch`` (plus DeepSpeed) costs about 2 s, longer than moving a
gigabyte, so the convert path reads and writes torch's format itself:

* a ``torch.save`` file is a zip archive (stored, not compressed): ``data.pkl`` (the object
  tree, a protocol-2 pickle whose tensors refer to storages by persistent id), one record
  ``data/<key>`` of raw bytes per storage, aligned to 64 bytes, and small records (``byteorder``,
  ``version``, ...);
* :func:`load` unpickles ``data.pkl`` with stand-ins: a tensor becomes a :class:`TensorRef`
  (dtype, shape, stride and the file offset of its bytes); any other class becomes an
  :class:`Opaque` record of how it was pickled. Nothing from the file is imported or called,
  and classes outside :data:`ALLOWED_GLOBALS` are refused unless the file is trusted;
* :func:`save` writes such a tree back in torch's layout, with the storages of new tensors
  reserved (sparse) and their file offsets returned, so the bytes can be copied in by the kernel.

Objects read here re-pickle exactly as they were pickled, so client state of any shape (loss
scalers, enums, Lightning's containers) survives a conversion unchanged. A reserved storage
record is written with CRC 0 by :func:`save`; once its bytes are in, :func:`fill_crcs` writes
the real CRC-32s (as ``torch.save`` has them), and :meth:`StoredFile.check_crc` checks a source
record's bytes against its CRC before they are copied.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import io
import mmap
import os
import pickle
import pickletools
import re
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_reshape.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "ALLOWED_GLOBALS",
    "TRUST_HINT",
    "DType",
    "Opaque",
    "Size",
    "StoredFile",
    "TensorRef",
    "is_tensor",
    "load",
    "opaque",
    "save",
    "storage_key",
]

TRUST_HINT = (
    "if you trust this checkpoint, pass trust_checkpoint=True "
    "(CLI: --trust-checkpoint) to load it with full unpickling"
)

# "module.Qualname" of the classes real DeepSpeed and Lightning checkpoints contain (found by
# saving real checkpoints). Anything else is refused unless the file is trusted.
ALLOWED_GLOBALS: tuple[str, ...] = (
    # DeepSpeed: fp16/bf16 loss scalers, ZeRO stage enum, ZeRO-1/2 fragment addresses.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.fp16.loss_scaler.LossScalerBase",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO",
    # Lightning: hyper-parameters container.
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    # torch and the standard library values torch's own weights_only loader accepts.
    "torch.device",
    "argparse.Namespace",
    "collections.defaultdict",
    "collections.deque",
    "collections.Counter",
)

#: bytes the allowed callables (``set``, ``bytearray``, ``torch.Size``, ...) may allocate
#: while one ``data.pkl`` is unpickled, on top of 64 bytes per byte of pickle
UNPICKLE_BUDGET_BYTES = 64 << 20
#: how deep containers may nest in a checkpoint's object tree (real ones: under 15); deeper
#: trees, and self-referencing ones, are refused (they would exhaust Python's recursion later)
MAX_NESTING = 100
#: elements of the object tree counted as a tree (a shared sub-tree once per reference):
#: bounds walks over it, which a pickle of shared references could make exponential
MAX_TREE_NODES = 5_000_000
_SIZED = (str, bytes, bytearray, range, tuple, list, dict, set, frozenset)
_ITEM_BYTES = {("builtins", "bytearray"): 1, ("builtins", "set"): 64, ("builtins", "frozenset"): 64}

# Built-in classes rebuilt as themselves: calling them on unpickled data runs no user code.
_REAL: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "range"): range,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): lambda text, encoding="utf-8": text.encode(encoding),
}


# --------------------------------------------------------------------------------------------
# dtypes


@dataclass(frozen=True)
class DType:
    """A torch dtype by name; prints as torch does (``torch.float32``)."""

    name: str
    itemsize: int
    storage: str  # torch's legacy typed-storage class, as pickled in the persistent id
    struct_code: str  # for reading one element (``item``); "" where struct has no code
    floating: bool

    def __str__(self) -> str:
        return f"torch.{self.name}"

    def __repr__(self) -> str:
        return str(self)

    @property
    def is_floating_point(self) -> bool:
        return self.floating

    def to_torch(self) -> Any:
        import torch

        return getattr(torch, self.name)


_DTYPE_LIST = (
    DType("float32", 4, "FloatStorage", "f", True),
    DType("float64", 8, "DoubleStorage", "d", True),
    DType("float16", 2, "HalfStorage", "e", True),
    DType("bfloat16", 2, "BFloat16Storage", "", True),
    DType("int64", 8, "LongStorage", "q", False),
    DType("int32", 4, "IntStorage", "i", False),
    DType("int16", 2, "ShortStorage", "h", False),
    DType("int8", 1, "CharStorage", "b", False),
    DType("uint8", 1, "ByteStorage", "B", False),
    DType("bool", 1, "BoolStorage", "?", False),
    DType("complex64", 8, "ComplexFloatStorage", "", False),
    DType("complex128", 16, "ComplexDoubleStorage", "", False),
)
DTYPES: dict[str, DType] = {d.name: d for d in _DTYPE_LIST}
_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64"}
_BY_STORAGE: dict[str, DType] = {d.storage: d for d in _DTYPE_LIST}
_BY_STORAGE["UntypedStorage"] = DTYPES["uint8"]


def dtype(name: str) -> DType:
    """The :class:`DType` called ``name`` (``"float32"`` or ``"torch.float32"``)."""
    key = name.replace("torch.", "")
    key = _ALIASES.get(key, key)
    try:
        return DTYPES[key]
    except KeyError:
        raise CheckpointError(
            f"dtype {name!r} is not supported by the reshape engine ({', '.join(DTYPES)})"
        ) from None


# --------------------------------------------------------------------------------------------
# stand-ins


class Size(tuple):  # type: ignore[type-arg]
    """``torch.Size``: a tuple of ints that pickles as ``torch.Size``."""


class GlobalName:
    """A module-level name seen in (or written to) a pickle: ``torch._utils._rebuild_tensor_v2``.

    Callable only so that pickle accepts it in a reduce tuple; it is never called.
    """

    _cache: dict[tuple[str, str], GlobalName] = {}

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    @classmethod
    def of(cls, module: str, name: str) -> GlobalName:
        key = (module, name)
        if key not in cls._cache:
            cls._cache[key] = cls(module, name)
        return cls._cache[key]

    def __call__(self, *args: Any) -> Any:  # pragma: no cover - pickle only checks callable()
        raise TypeError(f"{self.module}.{self.name} is a stand-in and cannot be called")

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class StoredFile:
    """One read checkpoint file: its path, identity and the data offset of each storage record."""

    path: str
    offsets: Mapping[str, tuple[int, int]]  # storage key -> (byte offset, nbytes)
    identity: tuple[int, ...] = ()  # (device, inode, size, mtime) when it was read
    crcs: Mapping[str, int] = field(default_factory=dict)  # storage key -> zip CRC-32

    def check_crc(self, fd: int, key: str, have: Iterable[tuple[int, memoryview]] = ()) -> None:
        """Compare the CRC-32 of storage record ``data/<key>`` with the one the zip directory
        holds: a flipped bit in tensor data is caught before it is used.

        ``have``: parts of the record already in memory, each (byte offset in the record,
        bytes read from this file there), sorted by offset; only the rest is read through
        ``fd``, so a caller that read the record into place pays no second read. Raises
        CheckpointError naming the file and record."""
        want = self.crcs.get(key)
        if not want:  # 0: not recorded (torch's skip_data, and our outputs before 0.x wrote 0)
            return
        off, n = self.offsets[key]
        crc = pos = 0
        for at, data in have:
            if at + len(data) <= pos:
                continue  # read twice (two targets of one source run): counted once
            if at > pos:
                crc = crc32_range(fd, off + pos, at - pos, path=self.path, crc=crc)
            crc = crc32(data[pos - at :] if at < pos else data, crc)
            pos = at + len(data)
        if pos < n:
            crc = crc32_range(fd, off + pos, n - pos, path=self.path, crc=crc)
        if crc != want:
            raise CheckpointError(
                f"{self.path}: storage record data/{key} fails its CRC-32 check (stored "
                f"{want:08x}, computed {crc:08x}): the tensor bytes are corrupt; restore the file "
                "from a good copy"
            )

    def open(self) -> int:
        """A read-only descriptor of this very file; refuses one replaced or rewritten since it
        was read (its offsets would point at other bytes)."""
        fd = os.open(self.path, os.O_RDONLY)
        if _identity(os.fstat(fd)) != self.identity:
            os.close(fd)
            raise CheckpointError(
                f"{self.path}: changed since it was read (rewritten or replaced); run again"
            )
        return fd


try:  # ISA-L's CRC-32 is about 5x zlib's; the same polynomial and values
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    crc32 = zlib.crc32

CRC_CHUNK = 8 << 20


def crc32_range(
    fd: int, offset: int, nbytes: int, *, path: str = "checkpoint file", crc: int = 0
) -> int:
    """CRC-32 (zip's) of ``nbytes`` bytes of ``fd`` from ``offset``, read a chunk at a time,
    continuing ``crc`` (the CRC of the bytes before); ``path`` names the file in errors."""
    buf = bytearray(min(nbytes, CRC_CHUNK))
    view = memoryview(buf)
    while nbytes > 0:
        got = os.preadv(fd, [view[: min(nbytes, CRC_CHUNK)]], offset)
        if got <= 0:
            raise CheckpointError(
                f"{path}: unexpected end of file at byte {offset} computing a CRC-32 (the file "
                "is shorter than its zip directory says: truncated); restore it from a good copy"
            )
        crc = crc32(view[:got], crc)
        offset, nbytes = offset + got, nbytes - got
    return crc


def check_crcs(path: str | os.PathLike[str]) -> int:
    """Check every storage record of a checkpoint file against its zip CRC-32 (records whose
    CRC is 0, i.e. not recorded, are skipped); returns the number of bytes checked. Raises
    CheckpointError naming the file and record."""
    path = os.fspath(path)
    checked = 0
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            for info in zf.infolist():
                if "/data/" not in info.filename or not info.CRC:
                    continue
                got = crc32_range(
                    fh.fileno(), _local_data_offset(fh, info), info.file_size, path=path
                )
                if got != info.CRC:
                    raise CheckpointError(
                        f"{path}: storage record {info.filename} fails its CRC-32 check (stored "
                        f"{info.CRC:08x}, computed {got:08x}): the tensor bytes are corrupt; "
                        "restore the file from a good copy"
                    )
                checked += info.file_size
    except (zipfile.BadZipFile, OSError, struct.error) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint file ({exc})") from exc
    return checked


def fill_crcs(path: str | os.PathLike[str]) -> None:
    """Write the CRC-32 of every storage record of a file written by :func:`save` (whose bytes
    were copied in afterwards) into its local header and its central directory entry, as
    ``torch.save`` has them: ``unzip -t`` and any zip reader can check the file again."""
    fd = os.open(path, os.O_RDWR)
    try:
        with open(fd, "rb", closefd=False) as fh, zipfile.ZipFile(fh) as zf:
            infos, pos = zf.infolist(), zf.start_dir
            for info in infos:
                entry = pos
                pos += 46 + len(info.filename.encode()) + len(info.extra) + len(info.comment)
                if "/data/" not in info.filename:
                    continue
                crc = crc32_range(fd, _local_data_offset(fh, info), info.file_size, path=str(path))
                raw = struct.pack("<I", crc)
                if os.pread(fd, 4, entry) != b"PK\x01\x02":
                    raise CheckpointError(f"{path}: unexpected central directory layout")
                os.pwrite(fd, raw, info.header_offset + 14)
                os.pwrite(fd, raw, entry + 16)
    finally:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class StorageRef:
    """One storage record of a file (or, with ``file`` None, a storage to be written)."""

    file: StoredFile | None
    key: str
    dtype: DType
    numel: int

    @property
    def data_offset(self) -> int | None:
        return None if self.file is None else self.file.offsets[self.key][0]


class TensorRef:
    """A tensor's geometry and the place of its bytes; answers what the reader asks of tensors.

    ``to_torch()`` maps the bytes as a real (copy-on-write) tensor when arithmetic is needed.
    """

    __slots__ = ("storage", "offset", "shape", "_stride", "requires_grad", "wrapper_state")

    def __init__(
        self,
        storage: StorageRef,
        offset: int,
        shape: Iterable[int],
        stride: Iterable[int],
        requires_grad: bool = False,
        wrapper_state: Any = None,
    ) -> None:
        self.storage = storage
        self.offset = int(offset)
        self.shape = Size(int(s) for s in shape)
        self._stride = tuple(int(s) for s in stride)
        self.requires_grad = bool(requires_grad)
        # torch pickles a tensor carrying Python attributes (DeepSpeed's ``ds_id``) through
        # ``_rebuild_from_type_v2``; the attributes are kept here and written back the same way.
        self.wrapper_state = wrapper_state

    @classmethod
    def empty(cls, shape: Iterable[int], dtype_name: str) -> TensorRef:
        """A new contiguous tensor to be written (its bytes are copied in after ``save``)."""
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        stride, acc = [], 1
        for s in reversed(shape):
            stride.append(acc)
            acc *= max(s, 1)
        return cls(StorageRef(None, "", dtype(dtype_name), numel), 0, shape, reversed(stride))

    @property
    def dtype(self) -> DType:
        return self.storage.dtype

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def dim(self) -> int:
        return len(self.shape)

    def stride(self) -> tuple[int, ...]:
        return self._stride

    def storage_offset(self) -> int:
        return self.offset

    def element_size(self) -> int:
        return self.storage.dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.storage.dtype.floating

    def is_contiguous(self) -> bool:
        acc = 1
        for size, st in zip(reversed(self.shape), reversed(self._stride), strict=True):
            if size != 1 and st != acc:
                return False
            acc *= size
        return True

    def overlaps(self) -> bool:
        """Whether two indices address one element (an ``expand``-ed or stride-0 view): such a
        tensor has more elements than bytes behind it, so it can only be written as a view."""
        acc = 1
        for size, st in sorted(
            ((size, st) for size, st in zip(self.shape, self._stride, strict=True) if size > 1),
            key=lambda p: p[1],
        ):
            if st < acc:
                return True
            acc = st * (size - 1) + acc
        return False

    @property
    def file_offset(self) -> int | None:
        """Byte offset of the first element in the file (None for a tensor not yet written)."""
        base = self.storage.data_offset
        return None if base is None else base + self.offset * self.element_size()

    def item(self) -> float | int | bool:
        """The value of a one-element tensor, read from the file."""
        if self.numel() != 1 or self.storage.file is None:
            raise ValueError("item() needs a one-element tensor read from a file")
        size = self.element_size()
        fd = self.storage.file.open()
        try:
            raw = os.pread(fd, size, self.file_offset)  # type: ignore[arg-type]
        finally:
            os.close(fd)
        if self.dtype.name == "bfloat16":
            return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
        if not self.dtype.struct_code:
            return self.to_torch().item()
        return struct.unpack("<" + self.dtype.struct_code, raw)[0]

    def to_torch(self) -> Any:
        """The tensor itself, memory-mapped copy-on-write: pages are read when touched and
        writes never reach the file."""
        import torch

        if self.storage.file is None:
            raise ValueError("to_torch() needs a tensor read from a file")
        mm = _mapping(self.storage.file)
        base, nbytes = self.storage.file.offsets[self.storage.key]
        t_dtype = self.dtype.to_torch()
        count = nbytes // self.element_size()
        if count == 0:
            flat = torch.empty(0, dtype=t_dtype)
        else:
            flat = torch.frombuffer(mm, dtype=t_dtype, count=count, offset=base)
        return flat.as_strided(self.shape, self._stride, self.offset)

    def __repr__(self) -> str:
        return f"TensorRef({self.dtype}, shape={tuple(self.shape)})"


_MAPS: dict[tuple[Any, ...], mmap.mmap] = {}
_MAPS_LOCK = threading.Lock()


def _mapping(file: StoredFile) -> mmap.mmap:
    """A private (copy-on-write) mapping of the whole file, shared by its tensors."""
    key = (file.path, *file.identity)
    with _MAPS_LOCK:
        mm = _MAPS.get(key)
        if mm is None:
            fd = file.open()
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
            if len(_MAPS) > 64:
                _MAPS.clear()  # tensors keep their own mapping alive
            _MAPS[key] = mm
        return mm


def is_tensor(value: Any) -> bool:
    return isinstance(value, TensorRef)


def storage_key(t: TensorRef) -> tuple[Any, ...]:
    """Identifies a view: two equal keys are the same elements of the same storage."""
    return (t.storage.key, t.offset, tuple(t.shape), t.stride())


class Opaque:
    """An instance of a class we do not import, recorded as it was pickled.

    ``args`` are the constructor arguments (REDUCE calls the class, NEWOBJ only ``__new__``),
    ``state`` the BUILD state, ``items`` / ``listitems`` what SETITEMS / APPENDS added. Attribute
    reads fall through to a dict state (``fragment.numel``); ``int()`` gives an int enum's value.
    """

    _module = ""
    _name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        self = object.__new__(cls)
        d = self.__dict__
        d["args"], d["kwargs"], d["called"] = args, kwargs, False
        d["state"], d["items"], d["listitems"] = None, [], []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["called"] = True  # reached only through REDUCE (a call)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"].append((key, value))

    def __getitem__(self, key: Any) -> Any:
        for k, v in reversed(self.__dict__["items"]):
            if k == key:
                return v
        raise KeyError(key)

    def keys(self) -> list[Any]:
        return [k for k, _ in self.__dict__["items"]]

    def append(self, value: Any) -> None:
        self.__dict__["listitems"].append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.__dict__["listitems"].extend(values)

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__.get("state")
        if isinstance(state, Mapping) and name in state:
            return state[name]
        raise AttributeError(f"{self._module}.{self._name} has no attribute {name!r}")

    def __int__(self) -> int:
        args = self.__dict__["args"]
        if len(args) == 1 and isinstance(args[0], int):
            return args[0]
        raise TypeError(f"{self._module}.{self._name} is not an int enum")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Opaque)
            and (self._module, self._name) == (other._module, other._name)
            and self.__dict__ == other.__dict__
        )

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<{self._module}.{self._name} args={self.args!r} state={self.state!r}>"


_OPAQUE_TYPES: dict[tuple[str, str], type[Opaque]] = {}


def _opaque_type(module: str, name: str) -> type[Opaque]:
    key = (module, name)
    if key not in _OPAQUE_TYPES:
        _OPAQUE_TYPES[key] = type(name, (Opaque,), {"_module": module, "_name": name})
    return _OPAQUE_TYPES[key]


def opaque(
    module: str, name: str, *, args: tuple[Any, ...] = (), state: Any = None, call: bool = True
) -> Opaque:
    """A new instance to write, as ``module.name(*args)`` (``call``) or ``__new__`` + state."""
    obj = _opaque_type(module, name).__new__(_opaque_type(module, name), *args)
    obj.__dict__["called"] = call
    obj.__dict__["state"] = state
    return obj


# --------------------------------------------------------------------------------------------
# reading


_MAX_DIMS = 64  # torch's limit on tensor dims


def _ints(value: Any, what: str, path: str) -> tuple[int, ...]:
    """A tuple of plain ints from the pickle, refusing anything else before it is iterated (a
    ``range(10**10)`` would otherwise be expanded)."""
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS:
        raise CheckpointError(
            f"{path}: a tensor's {what} is {type(value).__name__} "
            f"{_clip(value)}, not a tuple of at most {_MAX_DIMS} ints; the file is damaged"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{path}: a tensor's {what} {_clip(value)} holds non-integers")
    return tuple(value)


def _printable(name: str) -> str:
    """A name from the file, as one short line (a damaged pickle can put anything in it)."""
    return name if name.isprintable() and len(name) < 200 else repr(name[:200])


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _rebuild_tensor_v2(
    storage: StorageRef,
    storage_offset: int,
    size: Iterable[int],
    stride: Iterable[int],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    """A tensor's geometry, checked as torch checks it on load (and more): offset, sizes and
    strides are non-negative ints, and every element addressed lies inside its storage record,
    whose bytes were checked against the file. Nothing downstream sees an impossible tensor."""
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"a tensor is rebuilt from {_clip(storage)}, not a storage")
    path, where = storage.file.path if storage.file else "?", f"storage data/{storage.key}"
    shape, strides = _ints(size, "shape", path), _ints(stride, "stride", path)
    if len(shape) != len(strides):
        raise CheckpointError(
            f"{path}: tensor on {where} has shape {shape} but strides {strides}; the file is "
            "damaged"
        )
    if isinstance(storage_offset, bool) or not isinstance(storage_offset, int):
        raise CheckpointError(f"{path}: tensor on {where} has offset {_clip(storage_offset)}")
    bad = [v for v in (storage_offset, *shape, *strides) if v < 0]
    if bad:
        raise CheckpointError(
            f"{path}: tensor on {where} has a negative offset, size or stride (offset "
            f"{storage_offset}, shape {shape}, stride {strides}); torch refuses it, the file is "
            "damaged"
        )
    t = TensorRef(storage, storage_offset, shape, strides, requires_grad)
    if t.numel():
        end = storage_offset + 1 + sum((s - 1) * st for s, st in zip(shape, strides, strict=True))
    else:
        end = storage_offset
    if end > storage.numel:
        raise CheckpointError(
            f"{path}: tensor of shape {shape} (stride {strides}) at offset {storage_offset} "
            f"reaches element {end} of {where}, which holds {storage.numel}; the file is damaged"
        )
    return t


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple[Any, ...], state: Any) -> Any:
    if not (isinstance(new_type, type) and issubclass(new_type, Opaque)) or (
        new_type._module,
        new_type._name,
    ) != ("torch", "Tensor"):
        raise UnsafeCheckpointError(f"tensor subclass {new_type!r} is not supported")
    t = func(*args)
    if isinstance(t, TensorRef):
        t.wrapper_state = state
    return t


def _rebuild_parameter(data: TensorRef, requires_grad: bool, backward_hooks: Any) -> TensorRef:
    data.requires_grad = bool(requires_grad)
    return data


_TORCH_FUNCS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, file: StoredFile, trusted: bool) -> None:
        super().__init__(io.BytesIO(data))
        self.data = data
        # What callables may build, beyond the objects the opcodes themselves hold (those are
        # bounded by the pickle's size): generous for real checkpoints, far below a machine.
        self.budget = UNPICKLE_BUDGET_BYTES + 64 * len(data)
        self.spent = 0
        self.file = file
        self.trusted = trusted
        self.storages: dict[str, StorageRef] = {}  # views of one storage share one ref

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 (torch.save's) names builtins as Python 2 did: map them as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _REAL:
            return self._budgeted(f"{module}.{name}", _REAL[key], _ITEM_BYTES.get(key, 8))
        if key == ("torch", "Size"):
            return self._budgeted("torch.Size", Size, 8)
        if key in _TORCH_FUNCS:
            return _TORCH_FUNCS[key]
        if key == ("torch.storage", "UntypedStorage"):
            return _BY_STORAGE["UntypedStorage"]
        if module == "torch":
            if name in _BY_STORAGE:
                return _BY_STORAGE[name]  # storage class -> its dtype (for persistent ids)
            if name in DTYPES:
                return DTYPES[name]
            if name == "Tensor":
                return _opaque_type(module, name)
        dotted = f"{module}.{name}"
        if dotted in ALLOWED_GLOBALS or self.trusted:
            return _opaque_type(module, name)
        raise UnsafeCheckpointError(
            f"{self.file.path}: refusing to unpickle {_printable(dotted)}, which is not on the "
            f"allow-list of types DeepSpeed/Lightning checkpoints contain; {TRUST_HINT}"
        )

    def _budgeted(self, name: str, fn: Any, item_bytes: int) -> Any:
        """``fn`` charged against the unpickling budget before it runs: the size of what it
        would build is known from its arguments (a count, or the length of a sized argument;
        an unsized iterable is refused), so ``bytearray(1.5e9)`` or ``set(range(10**10))`` in a
        1 MB file is refused instead of allocated."""

        def call(*args: Any) -> Any:
            count = 0
            for a in args:
                if isinstance(a, int) and not isinstance(a, bool):
                    count += max(a, 0) if fn is bytearray else 1
                elif isinstance(
                    a, (str, bytes, bytearray, range, tuple, list, dict, set, frozenset)
                ):
                    count += len(a)
                elif hasattr(a, "__iter__"):
                    raise CheckpointError(
                        f"{self.file.path}: data.pkl calls {name} on a {type(a).__name__}; the "
                        "file is damaged or hostile"
                    )
            self.spent += count * item_bytes
            if self.spent > self.budget:
                raise CheckpointError(
                    f"{self.file.path}: data.pkl would allocate over {self.budget >> 20} MiB "
                    f"(at {name} of {count} items) for a {len(self.data) >> 10} KiB pickle; "
                    "the file is damaged or hostile"
                )
            return fn(*args)

        return call

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.file.path}: unexpected persistent id {pid!r}")
        _, storage_dtype, key, _location, numel = pid
        if not isinstance(storage_dtype, DType):
            raise CheckpointError(f"{self.file.path}: unsupported storage type {storage_dtype!r}")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(
                f"{self.file.path}: storage data/{key} declares {_clip(numel)} elements; the "
                "file is damaged"
            )
        key = str(key)
        if key in self.storages:
            return self.storages[key]
        if key not in self.file.offsets:
            raise CheckpointError(f"{self.file.path}: storage record data/{key} is missing")
        nbytes = self.file.offsets[key][1]
        if nbytes < int(numel) * storage_dtype.itemsize:
            raise CheckpointError(
                f"{self.file.path}: storage record data/{key} holds {nbytes} bytes, "
                f"{int(numel) * storage_dtype.itemsize} expected; the file is truncated or corrupt"
            )
        ref = self.storages[key] = StorageRef(self.file, key, storage_dtype, int(numel))
        return ref


def _opcode_args() -> tuple[int, ...]:
    """Per opcode byte: 0 no argument, n > 0 a fixed n-byte argument, -1 a text line, -2/-3/
    -4/-5 a 1/4/4/8-byte length and that many bytes; -9 not an opcode."""
    table = [-9] * 256
    for op in pickletools.opcodes:
        table[ord(op.code)] = 0 if op.arg is None else op.arg.n
    return tuple(table)


_OP_ARGS = _opcode_args()
_LEN_WIDTH = {-2: 1, -3: 4, -4: 4, -5: 8}
_SIGNED_LEN = {ord("T"), 0x8B}  # BINSTRING, LONG4
_PUT, _LONG_BINPUT, _FRAME, _STOP = ord("p"), ord("r"), 0x95, ord(".")
_TWO_LINES = {ord("c"), ord("i")}  # GLOBAL, INST: module and name


def _check_opcodes(data: bytes, path: str) -> None:
    """Refuse a pickle whose opcodes would make the unpickler allocate by a number in the
    file rather than by the file's size: a memo index (C's unpickler grows its memo array to
    twice the index: one flipped byte asked for 16 GB here) or a length past the end of the
    data. Walks the opcodes without building anything; a malformed stream is left to the
    unpickler, which reports it."""
    n, i = len(data), 0
    table, widths = _OP_ARGS, _LEN_WIDTH
    while i < n:
        code = data[i]
        kind = table[code]
        i += 1
        if kind == 0:
            if code == _STOP:
                return
        elif kind > 0:
            if code == _LONG_BINPUT or code == _FRAME:
                value = int.from_bytes(data[i : i + kind], "little")
                limit = n if code == _LONG_BINPUT else n - i - kind
                if value > limit:
                    raise CheckpointError(
                        f"{path}: data.pkl opcode at byte {i - 1} asks for {value} "
                        f"{'memo slots' if code == _LONG_BINPUT else 'bytes'} in a {n}-byte "
                        "pickle; the file is damaged or hostile"
                    )
            i += kind
        elif kind == -1:
            j = data.find(b"\n", i)
            if j >= 0 and code in _TWO_LINES:
                j = data.find(b"\n", j + 1)
            if j < 0:
                return
            if code == _PUT and data[i:j].strip().isdigit() and int(data[i:j]) > n:
                raise CheckpointError(
                    f"{path}: data.pkl opcode at byte {i - 1} asks for memo slot "
                    f"{int(data[i:j])} in a {n}-byte pickle; the file is damaged or hostile"
                )
            i = j + 1
        elif kind in widths:
            w = widths[kind]
            size = int.from_bytes(data[i : i + w], "little", signed=code in _SIGNED_LEN)
            if size < 0 or size > n - i - w:
                raise CheckpointError(
                    f"{path}: data.pkl opcode at byte {i - 1} claims {size} bytes, "
                    f"{n - i - w} remain; the file is damaged or hostile"
                )
            i += w + size
        else:
            return


def _local_data_offset(fh: Any, info: zipfile.ZipInfo) -> int:
    """Where a stored record's bytes start: after its local header, name and extra field."""
    header = os.pread(fh.fileno(), 30, info.header_offset)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load(path: str | os.PathLike[str], *, trust_checkpoint: bool = False) -> Any:
    """The object tree of a ``torch.save`` file, tensors as :class:`TensorRef`. Reads
    ``data.pkl`` and the zip directory only; runs nothing from the file.

    Raises UnsafeCheckpointError for a class outside :data:`ALLOWED_GLOBALS` (unless
    ``trust_checkpoint``) and CheckpointError for a missing, truncated or corrupt file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found (a shard is missing from the checkpoint)")
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            pkl = [i for i in infos if re.fullmatch(r"[^/]+/data\.pkl", i.filename)]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: not a torch checkpoint (no data.pkl record)")
            prefix = pkl[0].filename[: -len("data.pkl")]
            offsets: dict[str, tuple[int, int]] = {}
            crcs: dict[str, int] = {}
            for info in infos:
                rest = info.filename[len(prefix) :]
                if info.filename.startswith(prefix) and rest.startswith("data/"):
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise CheckpointError(f"{path}: record {info.filename} is compressed")
                    offsets[rest[5:]] = (_local_data_offset(fh, info), info.file_size)
                    crcs[rest[5:]] = info.CRC
            st = os.fstat(fh.fileno())
            size = st.st_size
            for key, (off, n) in offsets.items():
                if off + n > size:
                    raise CheckpointError(f"{path}: storage data/{key} runs past the end of file")
            data = zf.read(pkl[0])
        _check_opcodes(data, path)
        obj = _Unpickler(
            data, StoredFile(path, offsets, _identity(st), crcs), trust_checkpoint
        ).load()
        _check_tree(obj, path)
        return obj
    except CheckpointError as exc:
        if path in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from exc  # raised where the file is not known
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint file ({type(exc).__name__}: {exc}); "
            "re-copy it from the original save"
        ) from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint file ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises anything; say which file
        raise CheckpointError(
            f"{path}: cannot read checkpoint file ({type(exc).__name__}: {exc})"
        ) from exc


def _children(obj: Any) -> Iterable[Any]:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    if isinstance(obj, Opaque):
        d = obj.__dict__
        return [*d["args"], d["state"], *d["items"], *d["listitems"]]
    if isinstance(obj, TensorRef):
        return [obj.wrapper_state]
    return ()


def _check_tree(root: Any, path: str) -> None:
    """Refuse an object tree nested deeper than :data:`MAX_NESTING`, referring to itself, or
    larger than :data:`MAX_TREE_NODES` when walked as a tree. Iterative, so that the check
    itself cannot exhaust the recursion limit; each object is walked once per depth increase."""
    done: dict[int, tuple[int, int]] = {}  # id -> (height, tree size)
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        obj, expanded = stack.pop()
        oid = id(obj)
        kids = _children(obj)
        if not expanded:
            if oid in done:
                continue
            if oid in on_path:
                raise CheckpointError(f"{path}: data.pkl holds a container that contains itself")
            if len(on_path) >= MAX_NESTING:
                raise CheckpointError(
                    f"{path}: data.pkl nests containers deeper than {MAX_NESTING} levels; the "
                    "file is damaged or hostile"
                )
            if not kids:
                done[oid] = (0, 1)
                continue
            on_path.add(oid)
            stack.append((obj, True))
            stack.extend((k, False) for k in kids)
            continue
        on_path.discard(oid)
        height, size = 0, 1
        for k in kids:
            h, n = done[id(k)]
            height, size = max(height, h + 1), size + n
        if height > MAX_NESTING:
            raise CheckpointError(
                f"{path}: data.pkl nests containers deeper than {MAX_NESTING} levels; the "
                "file is damaged or hostile"
            )
        if size > MAX_TREE_NODES:
            raise CheckpointError(
                f"{path}: data.pkl's object tree has over {MAX_TREE_NODES} elements counting "
                "shared references; the file is damaged or hostile"
            )
        done[oid] = (height, size)


# --------------------------------------------------------------------------------------------
# writing

_REBUILD_V2 = GlobalName.of("torch._utils", "_rebuild_tensor_v2")
_FROM_TYPE_V2 = GlobalName.of("torch._tensor", "_rebuild_from_type_v2")
_TORCH_TENSOR = GlobalName.of("torch", "Tensor")
_TORCH_SIZE = GlobalName.of("torch", "Size")


class _Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """Pickles our stand-ins as torch would have pickled the real objects (protocol 2)."""

    def __init__(self, buf: io.BytesIO, storages: dict[int, tuple[str, StorageRef]]) -> None:
        super().__init__(buf, protocol=2)
        self.storages = storages  # id(StorageRef) -> (new key, ref)

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:  # noqa: FBT001, FBT002
        if isinstance(obj, StorageRef):
            raise CheckpointError(
                f"a bare storage (record data/{obj.key}, not inside a tensor) cannot be "
                "written; only tensors' storages are moved"
            )
        handler = _SAVERS.get(type(obj))
        if handler is None and isinstance(obj, type) and issubclass(obj, Opaque):
            handler = _Pickler._save_opaque_type
        elif handler is None and isinstance(obj, Opaque):
            handler = _Pickler._save_opaque
        if handler is None:
            super().save(obj, save_persistent_id)
            return
        memo = self.memo.get(id(obj))
        if memo is not None:
            self.write(self.get(memo[0]))
            return
        handler(self, obj)

    def _global(self, module: str, name: str) -> None:
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def _save_global(self, obj: GlobalName) -> None:
        self._global(obj.module, obj.name)
        self.memoize(obj)

    def _save_opaque_type(self, obj: type[Opaque]) -> None:
        self._global(obj._module, obj._name)
        self.memoize(obj)

    def _save_dtype(self, obj: DType) -> None:
        self._global("torch", obj.name)
        self.memoize(obj)

    def _save_size(self, obj: Size) -> None:
        self.save(_TORCH_SIZE)
        self.save((tuple(int(s) for s in obj),))
        self.write(pickle.REDUCE)
        self.memoize(obj)

    def _save_tensor(self, t: TensorRef) -> None:
        ref = t.storage
        if id(ref) not in self.storages:
            self.storages[id(ref)] = (str(len(self.storages)), ref)
        pid = ("storage", GlobalName.of("torch", ref.dtype.storage), self.storages[id(ref)][0])

        def rebuild_args() -> None:
            self.write(pickle.MARK)
            self.save_pers((*pid, "cpu", ref.numel))
            for a in (t.offset, tuple(t.shape), t.stride(), t.requires_grad, OrderedDict()):
                self.save(a)
            self.write(pickle.TUPLE)

        if t.wrapper_state is None:  # _rebuild_tensor_v2(storage, offset, size, stride, ...)
            self.save(_REBUILD_V2)
            rebuild_args()
        else:  # _rebuild_from_type_v2(_rebuild_tensor_v2, Tensor, (args), state)
            self.save(_FROM_TYPE_V2)
            self.write(pickle.MARK)
            self.save(_REBUILD_V2)
            self.save(_TORCH_TENSOR)
            rebuild_args()
            self.save(t.wrapper_state)
            self.write(pickle.TUPLE)
        self.write(pickle.REDUCE)
        self.memoize(t)

    def _save_opaque(self, obj: Opaque) -> None:
        d = obj.__dict__
        self.save(_opaque_type(obj._module, obj._name))
        self.save(tuple(d["args"]))
        if d["kwargs"]:
            raise pickle.PicklingError(f"{obj!r}: keyword constructor arguments are not supported")
        self.write(pickle.REDUCE if d["called"] else pickle.NEWOBJ)
        self.memoize(obj)
        if d["listitems"]:
            self.write(pickle.MARK)
            for v in d["listitems"]:
                self.save(v)
            self.write(pickle.APPENDS)
        if d["items"]:
            self.write(pickle.MARK)
            for k, v in d["items"]:
                self.save(k)
                self.save(v)
            self.write(pickle.SETITEMS)
        if d["state"] is not None:
            self.save(d["state"])
            self.write(pickle.BUILD)


_SAVERS: dict[type, Any] = {
    GlobalName: _Pickler._save_global,
    DType: _Pickler._save_dtype,
    Size: _Pickler._save_size,
    TensorRef: _Pickler._save_tensor,
}


_ALIGN = 64
_U32 = 0xFFFFFFFF


@dataclass
class _Entry:
    name: bytes
    offset: int  # of the local header
    size: int
    crc: int


def _zip64_extra(fields: list[int]) -> bytes:
    return struct.pack("<HH", 1, 8 * len(fields)) + b"".join(struct.pack("<Q", f) for f in fields)


def _local_header(fh: Any, name: bytes, size: int, crc: int) -> None:
    """Write a stored record's local header, padded so that its data starts 64-aligned."""
    offset = fh.tell()
    big = size >= _U32
    extra = _zip64_extra([size, size]) if big else b""
    start = offset + 30 + len(name) + len(extra)
    pad = (-(start + 4)) % _ALIGN
    extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch writes
    fh.write(
        struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            45 if big else 20,
            0x0800,  # names are UTF-8; sizes known up front (no data descriptor)
            0,  # stored
            0,
            0x21,  # 1980-01-01, as torch writes
            crc,
            _U32 if big else size,
            _U32 if big else size,
            len(name),
            len(extra),
        )
    )
    fh.write(name)
    fh.write(extra)


def _central_directory(fh: Any, entries: list[_Entry]) -> None:
    cd_start = fh.tell()
    for e in entries:
        fields = [e.size, e.size] if e.size >= _U32 else []
        if e.offset >= _U32:
            fields.append(e.offset)
        extra = _zip64_extra(fields) if fields else b""
        fh.write(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                45,
                45 if fields else 20,
                0x0800,
                0,
                0,
                0x21,
                e.crc,
                _U32 if e.size >= _U32 else e.size,
                _U32 if e.size >= _U32 else e.size,
                len(e.name),
                len(extra),
                0,
                0,
                0,
                0,
                _U32 if e.offset >= _U32 else e.offset,
            )
        )
        fh.write(e.name)
        fh.write(extra)
    cd_end = fh.tell()
    cd_size, n = cd_end - cd_start, len(entries)
    if cd_start >= _U32 or cd_size >= _U32 or n >= 0xFFFF:
        fh.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
        fh.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        fh.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _U32, _U32, 0))
    else:
        fh.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_start, 0))


def save(obj: Any, path: str | os.PathLike[str], *, archive: str | None = None) -> dict[int, int]:
    """Write ``obj`` as ``torch.save`` would, the bytes of its tensors' storages left as holes.

    Returns {id(storage): byte offset of its data in the file}: fill those ranges afterwards
    (the file is sparse until then). ``archive`` is the record prefix (default: the file stem).
    Tensors sharing a storage in ``obj`` share it in the file.
    """
    path = os.fspath(path)
    if archive is None:
        base = os.path.basename(path)
        base = base[:-4] if base.endswith(".tmp") else base
        archive = os.path.splitext(base)[0]
    storages: dict[int, tuple[str, StorageRef]] = {}
    buf = io.BytesIO()
    _Pickler(buf, storages).dump(obj)
    small = [
        ("data.pkl", buf.getvalue()),
        (".format_version", b"1"),
        (".storage_alignment", str(_ALIGN).encode()),
        ("byteorder", b"little"),
    ]
    tail = [("version", b"3\n"), (".data/serialization_id", _serialization_id(small[0][1]))]
    entries: list[_Entry] = []
    offsets: dict[int, int] = {}
    with open(path, "wb") as fh:

        def record(name: str, data: bytes | None, size: int) -> int:
            raw = f"{archive}/{name}".encode()
            crc = crc32(data) if data is not None else 0
            entries.append(_Entry(raw, fh.tell(), size, crc))
            _local_header(fh, raw, size, crc)
            start = fh.tell()
            if data is not None:
                fh.write(data)
            else:
                fh.seek(size, os.SEEK_CUR)  # a hole: the caller copies the bytes in
            return start

        for name, data in small:
            record(name, data, len(data))
        for sid, (key, ref) in storages.items():
            offsets[sid] = record(f"data/{key}", None, ref.numel * ref.dtype.itemsize)
        for name, data in tail:
            record(name, data, len(data))
        _central_directory(fh, entries)
    return offsets


def _serialization_id(pickled: bytes) -> bytes:
    """40 decimal digits, like torch's per-save id; derived from the content, so that the same
    conversion writes the same bytes."""
    return str(int.from_bytes(hashlib.sha256(pickled).digest()[:16], "big")).zfill(40).encode()
