"""Consolidated export: the full weights of any checkpoint layout as safetensors (or torch) files.

Why: people who trained with ZeRO, tensor or pipeline parallelism want one plain state dict to
serve, fine-tune elsewhere, or publish. DeepSpeed's ``zero_to_fp32`` holds the whole model in
memory and knows neither tp nor pp. Here every logical tensor is assembled from its pieces in the
manifest (the fp32 master where the optimizer has one, else the stored weight), cast, and written
one at a time, so memory stays bounded by the largest tensor. The output is a folder as Hugging
Face writes it: ``model.safetensors``, or shards plus ``model.safetensors.index.json``, with the
names of the module's own ``state_dict`` (tied and frozen parameters and persistent buffers
included), so ``load_state_dict`` or ``from_pretrained`` of the folder works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.checkpoint.execute import output_errors
from lightning_reshape.checkpoint.manifest import (
    ROLE_BUFFER,
    ROLE_FP32,
    ROLE_PARAM,
    Manifest,
    TensorEntry,
)
from lightning_reshape.checkpoint.reader import (
    ShardReader,
    TPRule,
    entry_bytes,
    read_manifest,
)
from lightning_reshape.errors import CheckpointError, ReshapeError

if TYPE_CHECKING:
    import torch

__all__ = ["ExportItem", "export_checkpoint", "export_items", "parse_size"]

FORMATS = ("safetensors", "torch")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# safetensors dtype codes and element sizes, by torch dtype name
_ST_DTYPES = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
_FLOATS = ("float64", "float32", "float16", "bfloat16")
# Lightning < 2.1 saved the module inside a wrapper; its state_dict names carry this prefix
_WRAPPER_PREFIX = "_forward_module."


@dataclass(frozen=True)
class ExportItem:
    """One tensor of the export: its output name, the entry it comes from, its output dtype."""

    name: str
    entry: TensorEntry
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.entry.numel * _ST_DTYPES[self.dtype][1]


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (as Hugging Face reads it)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ReshapeError(f"size {text!r}: expected a number with an optional unit (e.g. 5GB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    value = int(float(m.group(1)) * base**power)
    if value < 1:
        raise ReshapeError(f"size {text!r} is below one byte")
    return value


def export_items(
    manifest: Manifest, dtype: str | None = "fp32", strip_prefix: str | None = None
) -> list[ExportItem]:
    """The tensors of the module's state_dict, in checkpoint order: parameters (fp32 master
    where present), tied aliases, persistent buffers. ``dtype`` casts floating tensors
    (None keeps each tensor's stored dtype). ``strip_prefix`` (e.g. ``"model."``, the attribute
    holding a Hugging Face model inside a LightningModule) is removed from the names that start
    with it, so ``from_pretrained`` finds its own names; a prefix no name has is an error."""
    if dtype is not None and dtype not in DTYPES:
        raise ReshapeError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    masters = {e.name: e for e in manifest.entries(ROLE_FP32)}
    stored = {e.name: e for e in manifest.entries(ROLE_PARAM)}
    chosen: dict[str, TensorEntry] = {}
    for name in manifest.param_names():
        chosen[name] = masters.get(name) or stored[name]
    for entry in manifest.entries(ROLE_BUFFER):
        chosen.setdefault(entry.name, entry)
    for alias, source in manifest.aliases:
        if source in chosen and alias not in chosen:
            chosen[alias] = chosen[source]
    names = list(chosen)
    strip = bool(names) and all(n.startswith(_WRAPPER_PREFIX) for n in names)
    items = []
    for name, entry in chosen.items():
        out_dtype = entry.dtype
        if out_dtype not in _ST_DTYPES:
            raise CheckpointError(
                f"{manifest.root}: {name} has dtype {out_dtype}, which safetensors cannot hold"
            )
        if dtype is not None and out_dtype in _FLOATS:
            out_dtype = DTYPES[dtype]
        out_name = name[len(_WRAPPER_PREFIX) :] if strip else name
        items.append(ExportItem(out_name, entry, out_dtype))
    if not items:
        raise CheckpointError(f"{manifest.root}: the checkpoint holds no tensors to export")
    if strip_prefix:
        items = _strip(items, strip_prefix, manifest.root)
    return items


def _strip(items: list[ExportItem], prefix: str, root: str) -> list[ExportItem]:
    """Names starting with ``prefix`` lose it; the others stay as they are. A prefix is a
    dotted module path: ``model`` means ``model.`` (never a name left starting with a dot)."""
    bare = prefix.rstrip(".")
    prefix = f"{bare}."
    for i in items:
        if i.name == bare:
            raise ReshapeError(f"{root}: removing {bare!r} leaves {i.name!r} without a name")
    if not any(i.name.startswith(prefix) for i in items):
        common = os.path.commonprefix([i.name for i in items])
        common = common[: common.rfind(".") + 1]
        hint = (
            f"all names start with {common!r}: pass that to strip it"
            if common
            else f"the names share no prefix (e.g. {items[0].name!r}): leave --strip-prefix out"
        )
        raise ReshapeError(f"{root}: no tensor name starts with {prefix!r}; {hint}")
    out = [
        ExportItem(i.name[len(prefix) :], i.entry, i.dtype) if i.name.startswith(prefix) else i
        for i in items
    ]
    seen: dict[str, str] = {}
    for old, new in zip(items, out, strict=True):
        if not new.name:
            raise ReshapeError(f"{root}: removing {prefix!r} leaves {old.name!r} without a name")
        if new.name in seen:
            raise ReshapeError(
                f"{root}: removing {prefix!r} gives {old.name!r} and {seen[new.name]!r} the same "
                f"name {new.name!r}; choose another prefix"
            )
        seen[new.name] = old.name
    return out


def _shards(items: Sequence[ExportItem], max_bytes: int) -> list[list[ExportItem]]:
    """Greedy split in order (Hugging Face's rule): a new shard when the next tensor would
    overflow the current one; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[ExportItem]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _file_names(fmt: str, n: int) -> list[str]:
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if n == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]


def _index_name(fmt: str) -> str:
    if fmt == "safetensors":
        return "model.safetensors.index.json"
    return "pytorch_model.bin.index.json"


def _safetensors_header(items: Sequence[ExportItem], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for item in items:
        code, _ = _ST_DTYPES[item.dtype]
        header[item.name] = {
            "dtype": code,
            "shape": list(item.entry.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(raw)) + raw


def _check_crcs(manifest: Manifest, items: Sequence[ExportItem]) -> None:
    """CRC-32 check every storage record of every source file the export reads.

    Why whole files, as convert does: a flipped bit anywhere in a file the weights come from
    (an optimizer moment next to the fp32 master) means the save is damaged; export refuses it
    as convert and verify do, rather than writing weights from it with exit code 0."""
    files = dict.fromkeys(p.file for item in items for p in item.entry.pieces)
    for file in files:
        path = os.path.join(manifest.root, file)
        try:
            torchfile.check_crcs(path)
        except CheckpointError as exc:  # e.g. a file truncated since it was listed
            if path in str(exc):
                raise
            raise CheckpointError(f"{path}: {exc}") from None


def _check_consistency(manifest: Manifest, tp_rules: Sequence[TPRule]) -> None:
    """Refuse a source whose files do not form one save, with convert's checks.

    Why: export reads only the weights, so an optimizer shard copied from another save (a
    different step, partitions that do not cover the parameters) would go unnoticed; planning
    the identity reshape runs every cross-file check convert runs, reading metadata only."""
    from lightning_reshape.checkpoint.plan import Target, build_plan, read_source_meta

    if manifest.extra.get("elastic_checkpoint"):
        return  # export reads elastic saves, which convert cannot plan (refuse_elastic)
    meta = read_source_meta(manifest)
    topo = manifest.topology
    target = Target(topo.tp, topo.pp, topo.dp, topo.zero_stage, "parameters")
    build_plan(manifest, meta, target, tp_rules=tp_rules)


def _data(item: ExportItem, reader: ShardReader) -> bytes | bytearray | memoryview:
    """The tensor's bytes in the output dtype; torch only when a cast is needed."""
    data = entry_bytes(item.entry, reader)
    if len(data) != item.entry.numel * _ST_DTYPES[item.entry.dtype][1]:
        raise CheckpointError(
            f"{reader.root}: {item.name} assembled to {len(data)} bytes, the manifest's shape "
            f"{item.entry.shape} needs {item.entry.numel * _ST_DTYPES[item.entry.dtype][1]}"
        )
    if item.dtype == item.entry.dtype or not data:
        return data
    import torch

    with warnings.catch_warnings():  # read-only bytes: ``src`` is only read, never written
        warnings.simplefilter("ignore", UserWarning)
        src = torch.frombuffer(data, dtype=getattr(torch, item.entry.dtype))
    del data
    out = src.to(getattr(torch, item.dtype))
    del src
    return memoryview(out.view(torch.uint8).numpy())  # keeps ``out`` alive, no copy


def _tensor(item: ExportItem, reader: ShardReader) -> torch.Tensor:
    import torch

    data = _data(item, reader)
    want = getattr(torch, item.dtype)
    if not data:
        return torch.empty(item.entry.shape, dtype=want)
    with warnings.catch_warnings():  # a read-only buffer is copied by the caller if needed
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=want).reshape(item.entry.shape)


def _write_safetensors(
    path: Path, items: Sequence[ExportItem], reader: ShardReader, tick: Callable[[int], None]
) -> None:
    with open(path, "wb") as fh:
        fh.write(_safetensors_header(items, {"format": "pt"}))
        for item in items:
            fh.write(_data(item, reader))
            tick(item.nbytes)
        fh.flush()
        os.fsync(fh.fileno())
    # the library reads the header back and checks every offset against the file size
    # ("numpy" only names the framework of later reads: torch is not imported for this)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as check:
            listed = len(list(check.keys()))
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: written file does not read back ({exc})") from exc
    if listed != len(items):
        raise CheckpointError(f"{path}: written file lists {listed} of {len(items)} tensors")


def _write_torch(
    path: Path, items: Sequence[ExportItem], reader: ShardReader, tick: Callable[[int], None]
) -> None:
    import torch

    out: dict[str, torch.Tensor] = {}
    by_entry: dict[tuple[str, str, str | None, str], torch.Tensor] = {}
    for item in items:
        key = (*item.entry.key, item.dtype)
        if key not in by_entry:  # tied names share one tensor, as torch.save keeps them
            by_entry[key] = _tensor(item, reader)
        out[item.name] = by_entry[key]
        tick(item.nbytes)
    with open(path, "wb") as fh:
        torch.save(out, fh)
        fh.flush()
        os.fsync(fh.fileno())


def export_checkpoint(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fmt: str = "safetensors",
    dtype: str | None = "fp32",
    max_shard_size: int | str = "5GB",
    tag: str | None = None,
    trust: bool = False,
    tp_rules: Sequence[TPRule] = (),
    progress: bool = False,
    strip_prefix: str | None = None,
) -> Path:
    """Write the full weights of ``src`` into the new folder ``out``; return it.

    ``fmt`` is ``"safetensors"`` (streamed: one tensor in memory at a time) or ``"torch"``
    (``pytorch_model.bin``: one shard in memory at a time). The folder appears complete or not
    at all; ``src`` is only read. ``strip_prefix``: see :func:`export_items`.
    """
    if fmt not in FORMATS:
        raise ReshapeError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    if limit < 1:
        raise ReshapeError(f"max_shard_size={max_shard_size!r} must be at least one byte")
    out_path = Path(out).absolute()
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise ReshapeError(f"{out_path}: exists and is not an empty folder; choose a new path")
    manifest = read_manifest(src, tag=tag, trust_checkpoint=trust, tp_rules=tp_rules)
    _check_consistency(manifest, tp_rules)
    items = export_items(manifest, dtype, strip_prefix)
    _check_crcs(manifest, items)
    shards = _shards(items, limit)
    names = _file_names(fmt, len(shards))
    total = sum(i.nbytes for i in items)

    part = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
    with output_errors(out_path):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", leave=False)

    def tick(n: int) -> None:
        if bar is not None:
            bar.update(n)

    write = _write_safetensors if fmt == "safetensors" else _write_torch
    reader = ShardReader(manifest.root, trust_checkpoint=manifest.trusted)
    try:
        with reader, output_errors(out_path):
            for shard, name in zip(shards, names, strict=True):
                write(part / name, shard, reader, tick)
            if len(shards) > 1:
                index = {
                    "metadata": {"total_size": total},
                    "weight_map": {
                        i.name: n for s, n in zip(shards, names, strict=True) for i in s
                    },
                }
                (part / _index_name(fmt)).write_text(json.dumps(index, indent=2) + "\n")
            fd = os.open(part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(part, out_path)  # an empty folder at out_path is replaced atomically
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out_path
