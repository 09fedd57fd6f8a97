"""Shared test helpers: expected values from the live engines, directory snapshots."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch

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
