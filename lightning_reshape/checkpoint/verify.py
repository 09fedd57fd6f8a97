"""Compare two checkpoints' logical content bit for bit, whatever their layouts.

Why: a reshape is only trustworthy if the state it moved is exactly the state it read. Two
checkpoints of the same training state at different (tp, pp, dp, ZeRO stage) must hold the same
logical tensors (fp32 masters, every optimizer state, buffers, frozen weights) bit for bit and the
same non-tensor state (optimizer step counters, loss scaler, lr scheduler, global steps, client
state). One logical tensor is in memory at a time. Like ``convert``, it reads torch's file
format itself and compares raw bytes: neither torch nor DeepSpeed is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.checkpoint.manifest import (
    ROLE_BUFFER,
    ROLE_FP32,
    ROLE_OPTIM,
    ROLE_PARAM,
    Manifest,
)
from lightning_reshape.checkpoint.reader import ShardReader, entry_bytes, read_manifest
from lightning_reshape.checkpoint.torchfile import Opaque, TensorRef, is_tensor

__all__ = ["verify"]

# Non-tensor state that must survive a reshape (layout keys such as dp_world_size may differ).
_CARRIED = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps", "data_sampler")


def _ref_bytes(t: TensorRef) -> bytes:
    """A stored tensor's bytes in logical order, read from its file (torch only for the rare
    non-contiguous tensor)."""
    size = t.element_size()
    if t.is_contiguous() and t.file_offset is not None and t.storage.file is not None:
        fd = t.storage.file.open()
        try:
            return os.pread(fd, t.numel() * size, t.file_offset)
        finally:
            os.close(fd)
    import torch

    return t.to_torch().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(x: Any, y: Any) -> bool:
    """Equal values, tensors by dtype, shape and bits."""
    if is_tensor(x) or is_tensor(y):
        return (
            is_tensor(x)
            and is_tensor(y)
            and x.dtype == y.dtype
            and tuple(x.shape) == tuple(y.shape)
            and _ref_bytes(x) == _ref_bytes(y)
        )
    if isinstance(x, Opaque) or isinstance(y, Opaque):
        return type(x) is type(y) and _same(dict(vars(x)), dict(vars(y)))
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        return list(x) == list(y) and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y, strict=True))
    return bool(x == y)


def _logical_keys(m: Manifest) -> dict[tuple[str, str, str | None], Any]:
    """Entries compared: masters, optimizer states, buffers, and weights with no master
    (frozen parameters; trainable weights are compared through their fp32 masters)."""
    masters = {e.name for e in m.entries(ROLE_FP32)}
    out = {}
    for e in m.tensors:
        if e.role in (ROLE_FP32, ROLE_OPTIM, ROLE_BUFFER) or (
            e.role == ROLE_PARAM and e.name not in masters
        ):
            out[e.key] = e
    return out


def _steps(m: Manifest) -> list[tuple[str, Any]]:
    vals = {(s.state_key, repr(s.value)) for s in m.scalars}
    return sorted(vals)


def verify(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    trust: bool = False,
    limit: int | None = None,
) -> list[str]:
    """Differences between the logical content of checkpoints ``a`` and ``b`` (empty: equal)."""
    ma = read_manifest(a, trust_checkpoint=trust)
    mb = read_manifest(b, trust_checkpoint=trust)
    diffs: list[str] = []

    def add(msg: str) -> bool:
        diffs.append(msg)
        return limit is not None and len(diffs) >= limit

    ka, kb = _logical_keys(ma), _logical_keys(mb)
    for key in [k for k in ka if k not in kb] + [k for k in kb if k not in ka]:
        side = "a" if key in ka else "b"
        if add(f"{key[0]} ({key[1]} {key[2] or ''}): only in {side}".replace(" )", ")")):
            return diffs
    with (
        ShardReader(ma.root, trust_checkpoint=trust) as ra,
        ShardReader(mb.root, trust_checkpoint=trust) as rb,
    ):
        for key, ea in ka.items():
            if key not in kb:
                continue
            eb = kb[key]
            label = f"{key[0]} ({key[1]}{' ' + key[2] if key[2] else ''})"
            if ea.shape != eb.shape or ea.dtype != eb.dtype:
                if add(f"{label}: {ea.dtype}{list(ea.shape)} vs {eb.dtype}{list(eb.shape)}"):
                    return diffs
                continue
            ba, bb = entry_bytes(ea, ra), entry_bytes(eb, rb)
            if ba != bb:
                n = sum(1 for x, y in zip(ba, bb, strict=True) if x != y)
                if add(f"{label}: {n} bytes differ"):
                    return diffs
    if _steps(ma) != _steps(mb):
        if add(f"optimizer scalar state: {_steps(ma)} vs {_steps(mb)}"):
            return diffs
    # non-tensor state of the first model file, and the optimizer's global state
    fa = torchfile.load(os.path.join(ma.root, _main_file(ma)), trust_checkpoint=trust)
    fb = torchfile.load(os.path.join(mb.root, _main_file(mb)), trust_checkpoint=trust)
    for k in (*_CARRIED, *sorted(set(ma.client_state_keys) | set(mb.client_state_keys))):
        if (k in fa) != (k in fb):
            if add(f"{k}: only in {'a' if k in fa else 'b'}"):
                return diffs
        elif k in fa and not _same(fa[k], fb[k]):
            if add(f"{k}: {_short(fa[k])} vs {_short(fb[k])}"):
                return diffs
    ra_refs = {r.name: r for r in ma.state_refs if r.name.startswith("optimizer:")}
    rb_refs = {r.name: r for r in mb.state_refs if r.name.startswith("optimizer:")}
    for name in sorted(set(ra_refs) & set(rb_refs)):
        if name == "optimizer:param_groups":
            continue
        va = _load_ref(ma, ra_refs[name].file, ra_refs[name].key, trust)
        vb = _load_ref(mb, rb_refs[name].file, rb_refs[name].key, trust)
        if not _same(va, vb):
            if add(f"{name}: {_short(va)} vs {_short(vb)}"):
                return diffs
    return diffs


def _main_file(m: Manifest) -> str:
    for f in m.files:
        if f.startswith("mp_rank_00_") or f.startswith("zero_pp_rank_0_mp_rank_00_model"):
            return f
    return m.files[0]


def _load_ref(m: Manifest, file: str, key: tuple[Any, ...], trust: bool) -> Any:
    obj = torchfile.load(os.path.join(m.root, file), trust_checkpoint=trust)
    for k in key:
        obj = obj[k]
    return obj


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) < 80 else text[:77] + "..."
