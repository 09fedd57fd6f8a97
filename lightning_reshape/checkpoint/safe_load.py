"""The one loader every read goes through: memory-mapped, ``weights_only``, explicit allow-list.

Why: a checkpoint is a pickle, and unpickling an untrusted pickle runs arbitrary code. We load
with ``weights_only=True`` and allow exactly the non-tensor types that real DeepSpeed and
Lightning checkpoints contain (found by saving real checkpoints and seeing what
``weights_only`` refuses). Anything else is refused with the type and the file named, unless
the user says they trust the file (``trust_checkpoint=True``; CLI ``--trust-checkpoint``).
``mmap=True`` means tensors stay on disk until touched, so reading a slice of a shard does not
load the whole shard.
"""

from __future__ import annotations

import argparse
import collections
import enum
import importlib
import os
import pickle
import re
import sys
import threading
import zipfile
from collections.abc import Iterable
from typing import Any

import torch

from lightning_reshape.checkpoint.torchfile import ALLOWED_GLOBALS, TRUST_HINT
from lightning_reshape.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["safe_load", "allowed_globals", "TRUST_HINT"]

# "module.Qualname" of the non-builtin types allowed (one list for both loaders), resolved
# lazily: DeepSpeed and Lightning imports are slow and optional for reading plain torch files.
_ALLOWED_NAMES: tuple[str, ...] = tuple(
    n
    for n in ALLOWED_GLOBALS
    if n.split(".", 1)[0] in ("deepspeed", "lightning", "lightning_fabric", "pytorch_lightning")
)

_STDLIB_ALLOWED: tuple[Any, ...] = (
    argparse.Namespace,
    collections.OrderedDict,
    collections.defaultdict,
    collections.deque,
    collections.Counter,
    enum.Enum,
    torch.Size,
    torch.dtype,
    torch.device,
    slice,
    complex,
    set,
    frozenset,
    range,
)


# torch's allow-list (``add_safe_globals``) is one process-wide set that every weights_only load
# iterates; its ``safe_globals()`` context clears and refills that set on exit, which races with
# loads in other threads. So we only ever add to the set, under this lock, and hold the lock
# during our loads too (they read pickled metadata only: milliseconds, tensors stay mmapped).
_LOCK = threading.Lock()
_registered: set[str] = set()


def _resolve(dotted: str) -> Any | None:
    """The class named ``dotted`` (imports its module), or None if it is not available."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        obj = getattr(module, attr)
    except Exception:  # noqa: BLE001 - an optional package missing just narrows the list
        return None
    return obj if isinstance(obj, type) else None


def _register(names: Iterable[str]) -> bool:
    """Add the named allow-list entries to torch's set (once each); True if any was new.

    Caller holds ``_LOCK``. A name that cannot be resolved now is not remembered, so it is tried
    again later (say, once its package has finished importing).
    """
    new: list[Any] = []
    if "<stdlib>" not in _registered:
        _registered.add("<stdlib>")
        new.extend(_STDLIB_ALLOWED)
    for dotted in names:
        if dotted in _registered:
            continue
        obj = _resolve(dotted)
        if obj is not None:
            _registered.add(dotted)
            new.append(obj)
    if new:
        torch.serialization.add_safe_globals(new)
    return bool(new)


def _imported_names() -> list[str]:
    """Allow-list entries whose package is already imported: registering them costs nothing.

    Why lazily: importing Lightning just to name ``AttributeDict`` costs seconds, and most
    checkpoints (all plain DeepSpeed ones) never contain it; a refused entry is imported on
    demand and the load retried.
    """
    return [n for n in _ALLOWED_NAMES if n.split(".", 1)[0] in sys.modules]


def allowed_globals() -> tuple[Any, ...]:
    """The whole resolved allow-list, registered with torch (imports DeepSpeed and Lightning)."""
    with _LOCK:
        _register(_ALLOWED_NAMES)
    resolved = [_resolve(n) for n in _ALLOWED_NAMES]
    return (*_STDLIB_ALLOWED, *(o for o in resolved if o is not None))


def _refused_type(message: str) -> str:
    """Pull the refused 'module.name' out of torch's UnpicklingError text."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match:
        return match.group(1)
    match = re.search(r"(?:global|class|function) [`']?([\w.]+)", message)
    return match.group(1) if match else "an unsupported type"


def _is_refusal(text: str) -> bool:
    return "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text


def _load(path: str, kwargs: dict[str, Any]) -> Any:
    """torch.load with the allow-list; imports a refused allow-listed type once and retries."""
    with _LOCK:
        _register(_imported_names())
        while True:
            try:
                try:
                    return torch.load(path, mmap=True, **kwargs)
                except RuntimeError as exc:
                    # mmap needs the zip (new) serialization format; legacy files load in full.
                    if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                        raise
                    return torch.load(path, **kwargs)
            except pickle.UnpicklingError as exc:
                refused = _refused_type(str(exc))
                if not (_is_refusal(str(exc)) and refused in _ALLOWED_NAMES):
                    raise
                if refused in _registered or not _register([refused]):
                    raise  # allow-listed but not importable here: refuse as unknown


def safe_load(path: str | os.PathLike[str], *, trust_checkpoint: bool = False) -> Any:
    """Load a torch checkpoint file read-only, memory-mapped, refusing unknown pickled types.

    Raises UnsafeCheckpointError (naming the type and file) for a type outside the
    allow-list, CheckpointError for a missing, truncated or corrupt file. Thread-safe.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found (a shard is missing from the checkpoint)")
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not trust_checkpoint}
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since 1.6; anything else here is a damaged file
        # (truncation cuts off the zip directory) or a legacy file we only read when trusted.
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head != b"\x80\x02" or not trust_checkpoint:
            raise CheckpointError(
                f"{path}: truncated or corrupt checkpoint file (not a torch zip archive); re-copy "
                "it from the original save"
                + ("" if head != b"\x80\x02" else f" (legacy torch format: {TRUST_HINT})")
            )
    try:
        return _load(path, kwargs)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if _is_refusal(text):
            raise UnsafeCheckpointError(
                f"{path}: refusing to unpickle {_refused_type(text)}, which is not on the "
                f"allow-list of types DeepSpeed/Lightning checkpoints contain; {TRUST_HINT}"
            ) from None
        raise CheckpointError(f"{path}: corrupt checkpoint file ({_short(exc)})") from exc
    except (EOFError, zipfile.BadZipFile, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint file ({_short(exc)}); re-copy it "
            "from the original save"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - anything from a trusted unpickle is still "corrupt"
        raise CheckpointError(f"{path}: cannot load checkpoint file ({_short(exc)})") from exc


def _short(exc: BaseException) -> str:
    """First line of an exception, with its type; torch's messages run to many lines."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]
