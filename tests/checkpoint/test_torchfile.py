"""torchfile reads and writes torch's checkpoint format without torch, exactly as torch would.

Oracle: ``torch.load`` of every real DeepSpeed file, against ``torch.load`` of what torchfile
wrote back from its own reading of that file.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.errors import CheckpointError, UnsafeCheckpointError
from tests.checkpoint.test_safety import Payload

REPO = Path(__file__).resolve().parents[2]


def _real_files(ckpt_root: dict[int, Path]) -> list[Path]:
    files = [p for w in ckpt_root.values() for p in w.rglob("*.pt") if "expected" not in p.name]
    assert len(files) > 40
    return sorted(files)


def _refs(obj: Any) -> list[torchfile.TensorRef]:
    if isinstance(obj, torchfile.TensorRef):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _refs(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _refs(v)]
    if isinstance(obj, torchfile.Opaque):
        d = obj.__dict__
        return _refs([d["args"], d["state"], [v for _, v in d["items"]], d["listitems"]])
    return []


def _rewrite(src: Path, dst: Path) -> None:
    """Read ``src`` with torchfile, write it back, copy each storage's bytes into its hole."""
    obj = torchfile.load(src)
    offsets = torchfile.save(obj, dst)
    done: set[int] = set()
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        for t in _refs(obj):
            s = t.storage
            if id(s) in done:
                continue
            done.add(id(s))
            data = os.pread(fin.fileno(), s.numel * s.dtype.itemsize, s.data_offset)
            os.pwrite(fout.fileno(), data, offsets[id(s)])


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b), path
        assert (a.dtype, a.shape, a.stride(), a.requires_grad) == (
            b.dtype,
            b.shape,
            b.stride(),
            b.requires_grad,
        ), path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
        assert getattr(a, "ds_id", None) == getattr(b, "ds_id", None), path
        return
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}/{i}")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        _assert_same(vars(a), vars(b), f"{path}.__dict__")
    else:
        assert a == b, (path, a, b)


def _shared_storages(obj: Any) -> list[list[str]]:
    """Groups of key paths whose tensors share one storage (tied weights, flat buffers)."""
    groups: dict[int, list[str]] = {}

    def walk(x: Any, path: str) -> None:
        if torch.is_tensor(x) and x.untyped_storage().nbytes() > 0:  # empty ones share NULL
            groups.setdefault(x.untyped_storage().data_ptr(), []).append(path)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")

    walk(obj, "")
    return sorted(g for g in groups.values() if len(g) > 1)


def test_round_trip_of_every_real_file(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    """Everything DeepSpeed wrote (loss scalers, stage enums, fragment addresses, tensors with
    ``ds_id``, bf16, views of one flat buffer) comes back identical through torch.load."""
    for i, src in enumerate(_real_files(ckpt_root)):
        dst = tmp_path / f"{i}.pt"
        _rewrite(src, dst)
        want = torch.load(src, weights_only=False, map_location="cpu")
        for mmap in (False, True):
            got = torch.load(dst, weights_only=False, map_location="cpu", mmap=mmap)
            _assert_same(want, got, str(src))
        assert _shared_storages(got) == _shared_storages(want), src
        assert abs(dst.stat().st_size - src.stat().st_size) < 4096, src  # no storage duplicated


def test_tensor_metadata_matches_torch(ckpt_root: dict[int, Path]) -> None:
    for src in _real_files(ckpt_root)[:12]:
        refs = torchfile.load(src)
        real = torch.load(src, weights_only=False, map_location="cpu", mmap=True)

        def walk(r: Any, t: Any) -> None:
            if torch.is_tensor(t):
                assert isinstance(r, torchfile.TensorRef)
                assert tuple(r.shape) == tuple(t.shape) and r.stride() == t.stride()
                assert str(r.dtype) == str(t.dtype) and r.storage_offset() == t.storage_offset()
                assert r.is_contiguous() == t.is_contiguous()
                assert torch.equal(r.to_torch(), t)
                if t.numel() == 1:
                    assert r.item() == t.item()
            elif isinstance(t, dict):
                for k in t:
                    walk(r[k], t[k])
            elif isinstance(t, (list, tuple)):
                for x, y in zip(r, t, strict=True):
                    walk(x, y)

        walk(refs, real)


def test_nothing_runs_even_when_trusted(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"obj": Payload(str(marker)), "w": torch.ones(3)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refusing to unpickle .*system"):
        torchfile.load(path)
    obj = torchfile.load(path, trust_checkpoint=True)  # kept as a record, never called
    assert isinstance(obj["obj"], torchfile.Opaque) and obj["obj"]._name == "system"
    assert not marker.exists()


def test_damaged_files_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated or corrupt"):
        torchfile.load(cut)
    with pytest.raises(CheckpointError, match=r"missing\.pt: file not found"):
        torchfile.load(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        torchfile.load(junk)


def test_pickled_objects_round_trip_as_they_were(tmp_path: Path) -> None:
    """Trusted foreign objects (numpy arrays and scalars here) are kept as records and written
    back as pickled: torch.load gives the same values. A bare storage cannot be written."""
    import numpy as np

    src = tmp_path / "np.pt"
    torch.save({"a": np.arange(3, dtype=np.float32), "s": np.float64(2.5)}, src)
    with pytest.raises(UnsafeCheckpointError, match=r"np\.pt: refusing to unpickle numpy"):
        torchfile.load(src)
    torchfile.save(torchfile.load(src, trust_checkpoint=True), tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=False)
    assert back["a"].tolist() == [0.0, 1.0, 2.0] and back["a"].dtype == np.float32
    assert back["s"] == np.float64(2.5) and type(back["s"]) is np.float64
    bare = tmp_path / "bare.pt"
    torch.save({"s": torch.ones(3).untyped_storage()}, bare)
    with pytest.raises(CheckpointError, match="bare storage"):
        torchfile.save(torchfile.load(bare), tmp_path / "bare2.pt")


def test_a_file_rewritten_after_reading_is_refused(tmp_path: Path) -> None:
    """Offsets read from a file are never applied to another file at the same path."""
    path = tmp_path / "x.pt"
    torch.save({"w": torch.arange(4.0), "step": torch.tensor(3)}, path)
    obj = torchfile.load(path)
    assert obj["step"].item() == 3 and obj["w"].to_torch().tolist() == [0.0, 1.0, 2.0, 3.0]
    torch.save({"w": torch.zeros(4), "step": torch.tensor(9), "pad": torch.ones(100)}, path)
    with pytest.raises(CheckpointError, match=r"x\.pt: changed since it was read"):
        obj["step"].item()
    fresh = torchfile.load(path)
    assert fresh["step"].item() == 9


def test_same_object_same_bytes(tmp_path: Path) -> None:
    """A conversion run twice writes identical files (the serialization id comes from content)."""
    obj = {"a": torchfile.TensorRef.empty((4, 3), "bfloat16"), "s": torchfile.Size((4, 3))}
    torchfile.save(obj, tmp_path / "x.pt")
    torchfile.save(obj, tmp_path / "y.pt", archive="x")
    assert (tmp_path / "x.pt").read_bytes() == (tmp_path / "y.pt").read_bytes()


def test_zip64_storage_larger_than_4gib(tmp_path: Path) -> None:
    """Storages past 4 GiB need zip64 records; the file is sparse, so this costs no disk."""
    n = (5 << 30) // 4
    big = torchfile.TensorRef.empty((n,), "float32")
    small = torchfile.TensorRef.empty((3,), "int64")
    path = tmp_path / "big.pt"
    offsets = torchfile.save({"small": small, "big": big, "after": small}, path)
    with open(path, "r+b") as fh:
        os.pwrite(fh.fileno(), struct.pack("<f", 7.5), offsets[id(big.storage)] + 4 * (n - 1))
        os.pwrite(fh.fileno(), struct.pack("<3q", 1, 2, 3), offsets[id(small.storage)])
    got = torch.load(path, mmap=True, weights_only=True)
    assert got["big"].shape == (n,) and got["big"][-1].item() == 7.5
    assert got["small"].tolist() == [1, 2, 3] and got["after"] is got["small"]
    back = torchfile.load(path)
    assert back["big"].file_offset == offsets[id(big.storage)]


def test_convert_imports_neither_torch_nor_deepspeed(
    ckpt_root: dict[int, Path], tmp_path: Path
) -> None:
    """The point of torchfile: a dp change, end to end, in a process that never imports torch."""
    script = (
        "import sys\n"
        "from lightning_reshape.checkpoint.convert import convert_checkpoint\n"
        "convert_checkpoint(sys.argv[1], sys.argv[2], tp=1, dp=1)\n"
        "heavy = sorted(m for m in ('torch', 'deepspeed', 'lightning') if m in sys.modules)\n"
        "print('imported:', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ckpt_root[2] / "z1"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "imported: []"
    from lightning_reshape.checkpoint.verify import verify

    assert verify(ckpt_root[2] / "z1", tmp_path / "out") == []
