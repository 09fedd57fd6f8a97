"""CRC-32s: outputs carry correct ones (``unzip -t`` passes), and a source record whose bytes no
longer match its CRC is refused by ``convert`` and ``verify``, never copied."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from lightning_reshape.checkpoint.convert import convert_checkpoint
from lightning_reshape.checkpoint.manifest import ROLE_FP32
from lightning_reshape.checkpoint.reader import ShardReader, read_manifest
from lightning_reshape.checkpoint.verify import verify
from lightning_reshape.errors import CheckpointError
from tests.checkpoint.damage import flip_data_byte, run_cli
from tests.checkpoint.helpers import copy_save

OPTIM0 = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _fp32_key(path: Path) -> str:
    """The storage record of the fp32 master partition (what a bit flip would hurt most)."""
    from lightning_reshape.checkpoint import torchfile

    sd = torchfile.load(path)
    return sd["optimizer_state_dict"]["single_partition_of_fp32_groups"][0].storage.key


@pytest.mark.parametrize(("save", "tp", "dp"), [("z1", 1, 1), ("z2", 1, 3), ("tp_z1", 1, 2)])
def test_outputs_carry_correct_crcs(
    ckpt_root: Mapping[int, Path], tmp_path: Path, save: str, tp: int, dp: int
) -> None:
    out = convert_checkpoint(ckpt_root[2] / save, tmp_path / "out", tp=tp, dp=dp)
    files = sorted(out.glob("*.pt"))
    assert files
    for f in files:
        with zipfile.ZipFile(f) as zf:
            assert zf.testzip() is None, f
            for info in zf.infolist():
                assert info.CRC == zlib.crc32(zf.read(info)), (f, info.filename)
        if shutil.which("unzip"):
            proc = subprocess.run(["unzip", "-tq", str(f)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        torch.load(f, weights_only=False)  # and torch still reads it


def test_flipped_source_bit_refused(ckpt_root: Mapping[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[2] / "z1", tmp_path / "z1")
    shard = save / "global_step2" / OPTIM0
    key = _fp32_key(shard)
    flip_data_byte(shard, key, 17)
    code, err = run_cli("convert", str(save), str(tmp_path / "out"), "--tp", "1", "--dp", "1")
    assert code == 2 and len(err) == 1, err
    assert OPTIM0 in err[0] and f"data/{key} fails its CRC-32 check" in err[0]
    assert not (tmp_path / "out" / "global_step2").exists()
    with pytest.raises(CheckpointError, match=f"{OPTIM0}: storage record .*data/{key} fails"):
        verify(ckpt_root[2] / "z1", save)
    # the opt-out copies what it finds (documented): the flip reaches the output, and the
    # output's own CRC-32s describe the bytes it holds
    code, err = run_cli(
        "convert", str(save), str(tmp_path / "raw"), "--tp", "1", "--dp", "1", "--no-crc-check"
    )
    assert (code, err) == (0, [])
    for f in (tmp_path / "raw" / "global_step2").glob("*.pt"):
        assert zipfile.ZipFile(f).testzip() is None


def test_direct_path_reader_checks_crcs(ckpt_root: Mapping[int, Path], tmp_path: Path) -> None:
    """The direct resume reads slices through ShardReader(check_crc=True): a flipped record is
    refused before its bytes reach an engine; without the check they would be read."""
    save = copy_save(ckpt_root[2] / "z1", tmp_path / "z1")
    shard = save / "global_step2" / OPTIM0
    flip_data_byte(shard, _fp32_key(shard), 5)
    manifest = read_manifest(save)
    piece = next(
        p for e in manifest.entries(ROLE_FP32) for p in e.pieces if p.file == OPTIM0 and p.numel
    )
    with ShardReader(manifest.root) as plain:
        plain.read(piece)
    with ShardReader(manifest.root, check_crc=True) as checked:
        with pytest.raises(CheckpointError, match=f"{OPTIM0}: storage record data/.* CRC-32"):
            checked.read(piece)


def test_record_crc_over_bytes_in_memory(tmp_path: Path) -> None:
    """``StoredFile.check_crc(have=...)`` (the direct load's check of bytes it read into place):
    any split of a record into parts in memory (gaps, overlaps, the whole) plus the rest read from
    the file gives the zip's CRC-32; a part that differs from the file in memory is refused."""
    import os

    from lightning_reshape.checkpoint import torchfile

    path = tmp_path / "t.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    ref = torchfile.load(path)["w"]
    stored, key = ref.storage.file, ref.storage.key
    off, n = stored.offsets[key]
    fd = stored.open()
    try:
        data = memoryview(os.pread(fd, n, off))
        for parts in (
            [],
            [(0, data)],
            [(100, data[100:900]), (600, data[600:2000])],
            [(0, data[:5]), (5, data[5:9]), (n - 7, data[n - 7 :])],
        ):
            stored.check_crc(fd, key, parts)
        bad = bytearray(data[100:900])
        bad[10] ^= 1
        with pytest.raises(CheckpointError, match=f"{path}: storage record data/{key} fails"):
            stored.check_crc(fd, key, [(100, memoryview(bad))])
    finally:
        os.close(fd)
