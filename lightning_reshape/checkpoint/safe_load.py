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
import functools
import os
import pickle
import re
import zipfile
from typing import Any

import torch

from lightning_reshape.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["safe_load", "allowed_globals", "TRUST_HINT"]

TRUST_HINT = (
    "if you trust this checkpoint, pass trust_checkpoint=True "
    "(CLI: --trust-checkpoint) to load it with full unpickling"
)

# "module.Qualname" of the non-builtin types allowed, resolved lazily (DeepSpeed and Lightning
# imports are slow and optional for reading plain torch files).
_ALLOWED_NAMES: tuple[str, ...] = (
    # DeepSpeed: fp16/bf16 loss scalers, ZeRO stage enum, ZeRO-1/2 fragment addresses.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.fp16.loss_scaler.LossScalerBase",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO",
    # Lightning: hyper-parameters container and the loops' progress dataclasses live as plain
    # dicts in the client state; AttributeDict appears in hparams.
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
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


@functools.lru_cache(maxsize=1)
def allowed_globals() -> tuple[Any, ...]:
    """The resolved allow-list (cached: resolving imports DeepSpeed once)."""
    resolved: list[Any] = list(_STDLIB_ALLOWED)
    for dotted in _ALLOWED_NAMES:
        module_name, _, attr = dotted.rpartition(".")
        try:
            module = __import__(module_name, fromlist=[attr])
            obj = getattr(module, attr)
        except Exception:  # noqa: BLE001 - an optional package missing just narrows the list
            continue
        if isinstance(obj, type):
            resolved.append(obj)
    return tuple(resolved)


def _refused_type(message: str) -> str:
    """Pull the refused 'module.name' out of torch's UnpicklingError text."""
    match = re.search(r"GLOBAL ([\w.]+ [\w.]+|[\w.]+)", message)
    if match:
        return match.group(1).replace(" ", ".")
    match = re.search(r"(?:global|class|function) [`']?([\w.]+)", message)
    return match.group(1) if match else "an unsupported type"


def safe_load(path: str | os.PathLike[str], *, trust_checkpoint: bool = False) -> Any:
    """Load a torch checkpoint file read-only, memory-mapped, refusing unknown pickled types.

    Raises UnsafeCheckpointError (naming the type and file) for a type outside the
    allow-list, CheckpointError for a missing, truncated or corrupt file.
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
        # mmap needs the zip (new) serialization format; legacy files fall back below.
        try:
            with torch.serialization.safe_globals(list(allowed_globals())):
                return torch.load(path, mmap=True, **kwargs)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            with torch.serialization.safe_globals(list(allowed_globals())):
                return torch.load(path, **kwargs)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
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
