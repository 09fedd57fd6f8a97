"""Ways to damage a real checkpoint file, for the hostile-input tests.

Each helper writes a valid zip (the damage is in what the zip holds, unless truncation is the
point), so the reader's own checks are what is exercised, not the zip library's.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.checkpoint.torchfile import Opaque, TensorRef


def _record(path: Path, suffix: str) -> tuple[zipfile.ZipInfo, int, int]:
    """(info, data offset, central directory entry offset) of the record ending in suffix."""
    with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
        pos = zf.start_dir
        for info in zf.infolist():
            if info.filename.endswith(suffix):
                header = os.pread(fh.fileno(), 30, info.header_offset)
                n, e = struct.unpack("<HH", header[26:30])
                return info, info.header_offset + 30 + n + e, pos
            pos += 46 + len(info.filename.encode()) + len(info.extra) + len(info.comment)
    raise KeyError(suffix)


def patch_record(path: Path, suffix: str, at: int, new: bytes) -> None:
    """Overwrite bytes of a stored record in place and fix its CRC-32 (local header and
    central directory), as a careful attacker or a bit flip before the zip was written would."""
    info, data, cd = _record(path, suffix)
    with open(path, "r+b") as fh:
        fh.seek(data)
        body = bytearray(fh.read(info.file_size))
        body[at : at + len(new)] = new
        fh.seek(data + at)
        fh.write(new)
        crc = struct.pack("<I", zlib.crc32(bytes(body)))
        fh.seek(info.header_offset + 14)
        fh.write(crc)
        fh.seek(cd + 16)
        fh.write(crc)


def flip_pkl_byte(path: Path, seed: int) -> str:
    """Flip one bit of one byte of data.pkl (position and bit from ``seed``), CRC fixed up."""
    info, _, _ = _record(path, "/data.pkl")
    import random

    rng = random.Random(seed)
    at = rng.randrange(2, info.file_size - 1)  # keep the protocol header and STOP
    with open(path, "rb") as fh:
        _, data, _ = _record(path, "/data.pkl")
        fh.seek(data + at)
        old = fh.read(1)[0]
    new = old ^ (1 << rng.randrange(8))
    patch_record(path, "/data.pkl", at, bytes([new]))
    return f"data.pkl byte {at}: {old:#04x} -> {new:#04x}"


def flip_data_byte(path: Path, key: str, at: int) -> None:
    """Flip a bit in a tensor record WITHOUT fixing the CRC: corruption the zip can tell."""
    _, data, _ = _record(path, f"/data/{key}")
    with open(path, "r+b") as fh:
        fh.seek(data + at)
        b = fh.read(1)[0]
        fh.seek(data + at)
        fh.write(bytes([b ^ 0x10]))


def rewrite(src: Path, dst: Path, mutate: Callable[[Any], Any]) -> None:
    """Load ``src`` with our reader, let ``mutate`` change the object tree (return value, if
    not None, replaces it), write it back as torch's format with the original storages' bytes
    (tensors may be re-pointed at other geometry; their storages keep their bytes)."""
    obj = torchfile.load(src, trust_checkpoint=True)
    out = mutate(obj)
    obj = obj if out is None else out
    storages: dict[int, Any] = {}
    _storages(obj, storages, set())
    tmp = Path(f"{dst}.tmp")
    offsets = torchfile.save(obj, tmp, archive=Path(dst).stem)
    with open(tmp, "r+b") as fh:
        for sid, ref in storages.items():
            if ref.file is None or sid not in offsets:
                continue
            off, n = ref.file.offsets[ref.key]
            with open(ref.file.path, "rb") as sf:
                sf.seek(off)
                data = sf.read(min(n, ref.numel * ref.dtype.itemsize))
            fh.seek(offsets[sid])
            fh.write(data)
    torchfile.fill_crcs(tmp)
    os.replace(tmp, dst)


def _storages(obj: Any, out: dict[int, Any], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, TensorRef):
        out[id(obj.storage)] = obj.storage
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, out, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, out, seen)
    elif isinstance(obj, Opaque):
        d = obj.__dict__
        for v in (*d["args"], d["state"], *(v for _, v in d["items"]), *d["listitems"]):
            _storages(v, out, seen)


def zip_with_pkl(path: Path, pkl: bytes) -> None:
    """A torch-format file whose data.pkl is ``pkl`` (no storages)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")


def run_cli(*args: str, timeout: int = 60) -> tuple[int, list[str]]:
    """``lightning-reshape ARGS`` in this process: (exit code, stderr lines). Any exception
    escaping ``main`` propagates (that is a failure: bad input must be one of our errors), and
    a call running past ``timeout`` seconds raises TimeoutError (a hang)."""
    import contextlib
    import io
    import signal

    from lightning_reshape import cli

    def hang(*_: object) -> None:
        raise TimeoutError(f"lightning-reshape {' '.join(args)}: no answer in {timeout} s")

    err, out = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main(list(args))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue().splitlines()
