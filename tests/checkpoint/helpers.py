"""Shared test helpers: expected values from the live engines, directory snapshots."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_reshape.checkpoint.execute import COMPLETE_MARKER

TP_DIMS = {"col.weight": 0, "col.bias": 0, "row.weight": 1}


def expected_state(save_dir: Path) -> dict[str, Any]:
    """The live engines' full fp32 params / optimizer states, merged over pp and tp ranks."""
    files = sorted(save_dir.glob("expected_*.pt"))
    assert files, f"no expected_*.pt in {save_dir}"
    parts = [torch.load(f, weights_only=False) for f in files]
    out: dict[str, Any] = {"params": {}, "states": {}, "buffers": {}}
    if files[0].name.startswith("expected_mp") and len(files) > 1:  # tensor parallel shards
        for name in parts[0]["params"]:
            dim = TP_DIMS.get(name)

            def join(ts: list[torch.Tensor], dim: int | None = dim) -> torch.Tensor:
                return torch.cat(ts, dim) if dim is not None else ts[0]

            out["params"][name] = join([p["params"][name] for p in parts])
            if name in parts[0]["states"]:
                out["states"][name] = {
                    k: join([p["states"][name][k] for p in parts]) for k in parts[0]["states"][name]
                }
        out["buffers"] = parts[0]["buffers"]
        return out
    for p in parts:
        for key in out:
            out[key].update(p[key])
    return out


def deepspeed_fp32(save_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation (zero_to_fp32), quietly."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(save_dir))
    return {k: (v.contiguous() if hasattr(v, "contiguous") else v) for k, v in sd.items()}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with (size, mtime_ns): reading must leave this unchanged."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def copy_save(src: Path, dst: Path) -> Path:
    """Copy a save directory (without the expected_*.pt oracles) to mutate it in a test."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("expected_*.pt"))
    return dst


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (lock files and the completion record, which
    holds host-specific paths, left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock") and p.name != COMPLETE_MARKER:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def flip_tensor_byte(path: Path) -> int:
    """Flip an exponent bit of one fp32 value in the middle of the largest tensor record of a
    torch zip file (a silent, large change of one number); returns the byte offset."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        start = info.header_offset + 30 + name_len + extra_len
        at = start + (info.file_size // 2) // 4 * 4 + 3  # little-endian: sign and exponent
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x40]))
    return at
