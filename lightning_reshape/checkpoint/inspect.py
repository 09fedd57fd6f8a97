"""``lightning-reshape inspect``: what a checkpoint holds, as a dict (``--json``) or a table.

Why: before reshaping, users want to see the saved layout, precision and size at a glance;
this reads metadata only (through the manifest), so it is fast and writes nothing.
"""

from __future__ import annotations

import os
from typing import Any

from lightning_reshape.checkpoint.manifest import (
    ROLE_BUFFER,
    ROLE_FP32,
    ROLE_OPTIM,
    ROLE_PARAM,
    Manifest,
)
from lightning_reshape.checkpoint.reader import TPRule, read_manifest

__all__ = ["inspect_checkpoint", "format_inspect", "manifest_report"]

_ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def _bytes(dtype: str, numel: int) -> int:
    return _ITEMSIZE.get(dtype, 4) * numel


def manifest_report(manifest: Manifest, top: int = 10) -> dict[str, Any]:
    """The inspect report for an already-read manifest (JSON-serializable)."""
    topo = manifest.topology
    by_role: dict[str, dict[str, int]] = {}
    for entry in manifest.tensors:
        role = entry.role if entry.role != ROLE_OPTIM else f"optim:{entry.state_key}"
        slot = by_role.setdefault(role, {"tensors": 0, "numel": 0, "bytes": 0})
        slot["tensors"] += 1
        slot["numel"] += entry.numel
        slot["bytes"] += _bytes(entry.dtype, entry.numel)
    params = [e for e in manifest.tensors if e.role in (ROLE_PARAM, ROLE_FP32)]
    names = manifest.param_names()
    largest: dict[str, Any] = {}
    for e in sorted(params, key=lambda e: -e.numel):
        if e.name not in largest:
            largest[e.name] = {
                "name": e.name,
                "shape": list(e.shape),
                "numel": e.numel,
                "dtype": e.dtype,
                "tp_split": (
                    None
                    if e.tp_split is None
                    else {"dim": e.tp_split.dim, "stride": e.tp_split.stride}
                ),
                "frozen": e.frozen,
            }
    file_bytes = 0
    for f in manifest.files:
        try:
            file_bytes += os.path.getsize(os.path.join(manifest.root, f))
        except OSError:
            pass
    client = dict(manifest.extra.get("client_scalars", {}))
    trainable = [n for n in names if n not in set(manifest.extra.get("frozen", ()))]
    return {
        "path": manifest.root,
        "format": manifest.layout,
        "tag": manifest.tag,
        "ds_version": manifest.ds_version,
        "zero_stage": topo.zero_stage,
        "optimizer_wrapper": manifest.optimizer_wrapper,
        "elastic_checkpoint": bool(manifest.extra.get("elastic_checkpoint")),
        "dtype": manifest.model_dtype,
        "topology": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "source": topo.source},
        "parameters": {
            "count": len(names),
            "trainable": len(trainable),
            "frozen": len(names) - len(trainable),
            "numel": sum(v["numel"] for v in largest.values()),
            "tied": [list(p) for p in manifest.aliases],
        },
        "buffers": len(manifest.entries(ROLE_BUFFER)),
        "optimizer_state_keys": list(manifest.optimizer_state_keys()),
        "tensors": {
            "count": len(manifest.tensors),
            "bytes": sum(v["bytes"] for v in by_role.values()),
        },
        "by_role": by_role,
        "files": {"count": len(manifest.files), "bytes": file_bytes},
        "largest": list(largest.values())[:top],
        "client_state": {
            "global_step": client.get("global_step", manifest.global_steps),
            "global_steps": manifest.global_steps,
            "epoch": client.get("epoch"),
            "keys": list(manifest.client_state_keys),
        },
    }


def inspect_checkpoint(
    path: str | os.PathLike[str],
    trust: bool = False,
    *,
    tag: str | None = None,
    tp_rules: tuple[TPRule, ...] = (),
    top: int = 10,
) -> dict[str, Any]:
    """Read ``path`` (metadata only) and return the inspect report as a JSON-ready dict."""
    manifest = read_manifest(path, tag=tag, trust_checkpoint=trust, tp_rules=tp_rules)
    return manifest_report(manifest, top=top)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_inspect(report: dict[str, Any]) -> str:
    """A readable table of an inspect report."""
    topo = report["topology"]
    p = report["parameters"]
    cs = report["client_state"]
    rows = [
        ("path", report["path"]),
        ("format", f"{report['format']} (tag {report['tag']}, deepspeed {report['ds_version']})"),
        (
            "zero stage",
            f"{report['zero_stage']} ({report['optimizer_wrapper']}"
            + (", elastic_checkpoint" if report.get("elastic_checkpoint") else "")
            + ")",
        ),
        ("dtype", report["dtype"]),
        ("topology", f"tp={topo['tp']} pp={topo['pp']} dp={topo['dp']} (from {topo['source']})"),
        (
            "parameters",
            f"{p['count']} ({p['trainable']} trainable, {p['frozen']} frozen), "
            f"{p['numel']:,} elements",
        ),
        ("tied", ", ".join(f"{a} -> {s}" for a, s in p["tied"]) or "none"),
        ("buffers", str(report["buffers"])),
        ("optimizer states", ", ".join(report["optimizer_state_keys"]) or "none"),
        (
            "tensors",
            f"{report['tensors']['count']} logical, {_human(report['tensors']['bytes'])}; "
            f"{report['files']['count']} files, {_human(report['files']['bytes'])} on disk",
        ),
        ("global step", str(cs["global_step"])),
        ("epoch", str(cs["epoch"])),
        ("client state", ", ".join(cs["keys"]) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("")
    lines.append("by role:")
    for role, slot in report["by_role"].items():
        lines.append(
            f"  {role.ljust(24)} {slot['tensors']:>6} tensors {slot['numel']:>14,} elements "
            f"{_human(slot['bytes']):>10}"
        )
    lines.append("")
    lines.append("largest parameters:")
    header = f"  {'name':<40} {'shape':<18} {'dtype':<9} {'tp split':<10}"
    lines.append(header)
    for t in report["largest"]:
        split = "replicated" if t["tp_split"] is None else f"dim {t['tp_split']['dim']}"
        if topo["tp"] == 1:
            split = "-"
        if t["tp_split"] is not None and t["tp_split"]["stride"] > 1:
            split += f"/{t['tp_split']['stride']}"
        name = t["name"] + (" (frozen)" if t["frozen"] else "")
        lines.append(f"  {name:<40} {str(tuple(t['shape'])):<18} {t['dtype']:<9} {split:<10}")
    return "\n".join(lines)
