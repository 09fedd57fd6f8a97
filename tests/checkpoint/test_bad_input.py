"""Bad input: every error names the file at fault, and reading writes nothing anywhere."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lightning_reshape.checkpoint.inspect import inspect_checkpoint
from lightning_reshape.checkpoint.reader import consolidate_fp32, read_manifest
from lightning_reshape.errors import CheckpointError, ReshapeError
from tests.checkpoint.helpers import copy_save, snapshot


def _read_all(path: Path) -> None:
    consolidate_fp32(read_manifest(path))


def _expect(path: Path, root: Path, pattern: str) -> str:
    before = snapshot(root)
    with pytest.raises(CheckpointError, match=pattern) as err:
        _read_all(path)
    with pytest.raises(ReshapeError):
        inspect_checkpoint(path)
    assert snapshot(root) == before, "reading wrote or touched something"
    return str(err.value)


def test_missing_shard(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[2] / "z2", tmp_path / "z2")
    os.remove(save / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    msg = _expect(save, tmp_path, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert "missing shard" in msg and "dp_world_size=2" in msg


def test_missing_zero3_model_shard(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[4] / "z3", tmp_path / "z3")
    os.remove(save / "global_step2" / "zero_pp_rank_2_mp_rank_00_model_states.pt")
    _expect(save, tmp_path, "zero_pp_rank_2_mp_rank_00_model_states.pt: missing shard")


def test_missing_pipeline_layer(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[2] / "pp_z1", tmp_path / "pp")
    os.remove(save / "global_step2" / "layer_02-model_00-model_states.pt")
    _expect(save, tmp_path, "layer_02-model_00-model_states.pt")


def test_truncated_file(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[2] / "z1", tmp_path / "z1")
    target = save / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    _expect(save, tmp_path, r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: truncated or corrupt")


def test_corrupt_file(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[2] / "z3", tmp_path / "z3")
    target = save / "global_step2" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    target.write_bytes(os.urandom(4096))
    _expect(save, tmp_path, r"zero_pp_rank_1_mp_rank_00_model_states\.pt: truncated or corrupt")


def test_mixed_saves_optimizer_file(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[2] / "z1", tmp_path / "z1")
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(save / "global_step1" / name, save / "global_step2" / name)
    msg = _expect(save, tmp_path, "different saves")
    assert name in msg


def test_mixed_saves_model_file(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[2] / "z1", tmp_path / "z1")
    name = "mp_rank_00_model_states.pt"
    shutil.copy(save / "global_step1" / name, save / "global_step2" / name)
    _expect(save, tmp_path, f"{name}: says global_steps=1 but lies in tag 'global_step2'")


def test_mixed_saves_between_tp_ranks(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[2] / "tp_z1", tmp_path / "tp")
    other = ckpt_root[2] / "tp_z0" / "global_step2" / "mp_rank_01_model_states.pt"
    shutil.copy(other, save / "global_step2" / "mp_rank_01_model_states.pt")
    _expect(save, tmp_path, "different saves|mp_rank_01")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", tmp_path, r"empty.*is an empty directory")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "notes"
    d.mkdir()
    (d / "readme.txt").write_text("hello")
    (d / "sub").mkdir()
    _expect(d, tmp_path, r"notes: is not a DeepSpeed checkpoint")


def test_missing_path(tmp_path: Path) -> None:
    _expect(tmp_path / "nope", tmp_path, "nope: no such file or directory")


def test_latest_points_nowhere(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[1] / "z0", tmp_path / "z0")
    (save / "latest").write_text("global_step99")
    _expect(save, tmp_path, r"global_step99.*does not exist; tags present: \['global_step2'\]")


@pytest.mark.parametrize("run", ["z1", "z2"])
def test_dp_rank_files_swapped(ckpt_root: dict[int, Path], tmp_path: Path, run: str) -> None:
    """Two dp ranks' optimizer files swapped by name: each partition has the right size, so
    this read (and convert, and the direct load) took rank 1's elements for rank 0's, silently;
    the files' own param_slice_mappings say which partition they hold."""
    save = copy_save(ckpt_root[2] / run, tmp_path / run)
    tag = save / "global_step2"
    a, b = (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))
    a.rename(tag / "swap")
    b.rename(a)
    (tag / "swap").rename(b)
    msg = _expect(save, tmp_path, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert "param_slice_mappings" in msg and "swapped" in msg
