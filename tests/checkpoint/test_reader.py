"""Manifest + consolidation against real DeepSpeed checkpoints (zero_to_fp32 and live engines)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lightning_reshape.checkpoint.manifest import ROLE_FP32, ROLE_OPTIM, ROLE_PARAM
from lightning_reshape.checkpoint.plan import Target, build_plan, rank_files, read_source_meta
from lightning_reshape.checkpoint.reader import (
    TPRule,
    consolidate_fp32,
    consolidate_optimizer_states,
    read_manifest,
)
from lightning_reshape.checkpoint.sidecar import SIDECAR_NAME, Sidecar, TPSplit, write_sidecar
from lightning_reshape.errors import CheckpointError
from tests.checkpoint.conftest import PP_SPECS, TP_SPECS, ZERO_SPECS
from tests.checkpoint.helpers import copy_save, deepspeed_fp32, expected_state, snapshot

ZERO_CASES = [(w, s) for w, specs in ZERO_SPECS.items() for s in specs]
TP_CASES = [(w, s) for w, specs in TP_SPECS.items() for s in specs]
PP_CASES = [(w, s) for w, specs in PP_SPECS.items() for s in specs]


def _check_against_live(save_dir: Path, manifest_fp32: dict, states: dict) -> None:
    exp = expected_state(save_dir)
    for name, value in exp["params"].items():
        assert name in manifest_fp32, name
        assert torch.equal(manifest_fp32[name], value.float()), name
    for name, per_key in exp["states"].items():
        for key, value in per_key.items():
            assert torch.equal(states[name][key], value), (name, key)
        assert set(states.get(name, {})) == set(per_key), name
    for name, value in exp["buffers"].items():
        if name in manifest_fp32:  # non-persistent buffers are not saved
            assert torch.equal(manifest_fp32[name], value.float()), name


def _check_geometry(manifest) -> None:
    """Every tensor's pieces cover each tp shard exactly once."""
    for entry in manifest.tensors:
        by_rank: dict[int, list] = {}
        for p in entry.pieces:
            by_rank.setdefault(p.tp_rank, []).append(p)
        for pieces in by_rank.values():
            n = 1
            for s in pieces[0].local_shape:
                n *= s
            spans = sorted((p.dst_offset, p.dst_offset + p.numel) for p in pieces)
            assert spans[0][0] == 0 and spans[-1][1] == n, entry.key
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), entry.key


@pytest.mark.parametrize("world,spec", ZERO_CASES, ids=[f"dp{w}-{s.name}" for w, s in ZERO_CASES])
def test_zero_checkpoints(ckpt_root: dict[int, Path], world: int, spec) -> None:
    save_dir = ckpt_root[world] / spec.name
    before = snapshot(ckpt_root[world])
    manifest = read_manifest(save_dir)
    assert manifest.topology.dp == world and manifest.topology.zero_stage == spec.stage
    assert (manifest.topology.tp, manifest.topology.pp) == (1, 1)
    _check_geometry(manifest)
    fp32 = consolidate_fp32(manifest)
    states = consolidate_optimizer_states(manifest)
    if spec.stage >= 1:  # DeepSpeed's own consolidation, bit for bit
        ref = deepspeed_fp32(save_dir)
        for name, value in ref.items():
            assert torch.equal(fp32[name], value), name
    _check_against_live(save_dir, fp32, states)
    # tied weight, frozen params, buffer
    assert ("head.weight", "emb.weight") in manifest.aliases
    assert fp32["head.weight"] is fp32["emb.weight"]
    assert {"frozen.weight", "frozen.bias"} <= set(manifest.extra["frozen"])
    assert "running" in fp32
    keys = set(manifest.optimizer_state_keys())
    assert (
        keys
        == {
            "adam": {"exp_avg", "exp_avg_sq"},
            "adamw": {"exp_avg", "exp_avg_sq"},
            "sgd": {"momentum_buffer"},
            "adagrad": {"sum"},
        }[spec.optimizer]
    )
    assert any(s.state_key == "step" for s in manifest.scalars) or spec.optimizer == "sgd"
    if spec.dtype == "bf16":
        assert manifest.model_dtype == "bfloat16"
    if spec.dtype == "bf16" and spec.stage >= 1:
        assert manifest.extra["bf16_prefixed_files"]
    assert {"client:epoch", "client:my_key", "global_steps"} <= {
        r.name for r in manifest.state_refs
    }
    assert manifest.global_steps == spec.steps
    assert snapshot(ckpt_root[world]) == before


@pytest.mark.parametrize("world,spec", PP_CASES, ids=[f"w{w}-{s.name}" for w, s in PP_CASES])
def test_pipeline_checkpoints(ckpt_root: dict[int, Path], world: int, spec) -> None:
    save_dir = ckpt_root[world] / spec.name
    manifest = read_manifest(save_dir)
    assert manifest.layout.endswith("pipeline")
    assert (manifest.topology.pp, manifest.topology.dp) == (2, world // 2)
    _check_geometry(manifest)
    layers = {p.layer for e in manifest.tensors for p in e.pieces if e.role == ROLE_PARAM}
    assert layers == {0, 1, 2, 3}
    stages = {e.name: e.pieces[0].pp_stage for e in manifest.entries(ROLE_PARAM)}
    assert stages["0.emb.weight"] == 0 and stages["3.proj.weight"] == 1
    _check_against_live(
        save_dir, consolidate_fp32(manifest), consolidate_optimizer_states(manifest)
    )


@pytest.mark.parametrize("world,spec", TP_CASES, ids=[f"w{w}-{s.name}" for w, s in TP_CASES])
def test_tensor_parallel_with_sidecar(ckpt_root: dict[int, Path], world: int, spec) -> None:
    save_dir = ckpt_root[world] / spec.name
    manifest = read_manifest(save_dir)
    assert manifest.topology.source == "sidecar"
    assert (manifest.topology.tp, manifest.topology.dp) == (2, world // 2)
    col = manifest.get("col.weight", ROLE_PARAM)
    assert col.shape == (12, 8) and col.tp_split == TPSplit(0)
    role = ROLE_FP32 if spec.stage else ROLE_PARAM  # ZeRO 0 fp32: the weight is the master
    assert manifest.get("row.weight", role).shape == (8, 12)
    _check_geometry(manifest)
    _check_against_live(
        save_dir, consolidate_fp32(manifest), consolidate_optimizer_states(manifest)
    )


def test_tensor_parallel_rules_and_refusal(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save_dir = copy_save(ckpt_root[2] / "tp_z1", tmp_path / "tp")
    (save_dir / "global_step2" / SIDECAR_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"col\.weight.*sidecar.*TPRule") as err:
        read_manifest(save_dir)
    assert "differ" in str(err.value)
    rules = [TPRule(r"^col\.", TPSplit(0)), TPRule(r"^row\.weight$", TPSplit(1))]
    manifest = read_manifest(save_dir, tp_rules=rules)  # replicated params are proven equal
    assert manifest.get("norm.weight", ROLE_PARAM).tp_split is None
    exp_dir = ckpt_root[2] / "tp_z1"
    _check_against_live(exp_dir, consolidate_fp32(manifest), consolidate_optimizer_states(manifest))
    # optimizer states exist and have global shapes
    assert manifest.get("row.weight", ROLE_OPTIM, "exp_avg").shape == (8, 12)


def test_sidecar_disagreeing_with_deepspeed(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save_dir = copy_save(ckpt_root[2] / "z1", tmp_path / "z1")
    write_sidecar(save_dir / "global_step2", Sidecar(tp=1, pp=1, dp=4, zero_stage=1))
    with pytest.raises(
        CheckpointError, match=r"lightning_reshape\.json.*dp: sidecar 4 vs deepspeed 2"
    ):
        read_manifest(save_dir)


def test_sidecar_roundtrip(tmp_path: Path) -> None:
    from lightning_reshape.checkpoint.sidecar import read_sidecar

    sc = Sidecar(tp=2, pp=3, dp=4, zero_stage=2, tp_splits={"a": TPSplit(0, 3), "b": None})
    write_sidecar(tmp_path, sc)
    assert read_sidecar(tmp_path) == sc
    assert read_sidecar(tmp_path / "nowhere") is None
    (tmp_path / SIDECAR_NAME).write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not a valid lightning-reshape sidecar"):
        read_sidecar(tmp_path)


def test_layouts(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    """Lightning X.ckpt dirs, save dirs with several tags, tag folders, and friendly errors."""
    src = ckpt_root[2] / "z1"
    # a save dir with two tags: latest is used, tag= chooses
    assert read_manifest(src).tag == "global_step2"
    early = read_manifest(src, tag="global_step1")
    assert early.global_steps == 1
    assert read_manifest(src / "global_step1").tag == "global_step1"
    # Lightning layout: X.ckpt/{latest, checkpoint/}
    ckpt = tmp_path / "epoch=0-step=2.ckpt"
    ckpt.mkdir()
    import shutil

    shutil.copytree(src / "global_step2", ckpt / "checkpoint")
    (ckpt / "latest").write_text("checkpoint")
    # DeepSpeed's tag check: Lightning's tag is not global_stepN, so the tag check is skipped
    m = read_manifest(ckpt)
    assert m.layout == "lightning-deepspeed" and m.tag == "checkpoint"
    assert read_manifest(ckpt / "checkpoint").layout == "lightning-deepspeed"
    with pytest.raises(
        CheckpointError, match=r"single file.*Pass the checkpoint directory.*\.ckpt"
    ):
        read_manifest(ckpt / "checkpoint" / "mp_rank_00_model_states.pt")
    # a save dir without latest: say which tag to pass
    nolatest = copy_save(src, tmp_path / "nolatest")
    (nolatest / "latest").unlink()
    with pytest.raises(CheckpointError, match="no 'latest' file; pass one tag folder"):
        read_manifest(nolatest)
    with pytest.raises(CheckpointError, match="tag folder 'nope'"):
        read_manifest(src, tag="nope")


@pytest.mark.parametrize("name", ["z0", "z2bf16", "z3", "tp_z1", "pp_z1"])
def test_planning_does_no_io(ckpt_root: dict[int, Path], tmp_path: Path, name: str) -> None:
    """The manifest carries all source metadata: once read, the same plans come out after its
    folder is moved away and then deleted (whole plan, and one rank's files)."""
    src = tmp_path / name
    shutil.copytree(ckpt_root[2] / name, src)
    manifest = read_manifest(src)
    meta = read_source_meta(manifest)
    target = Target(tp=1, pp=1, dp=3, zero_stage=1)
    full = build_plan(manifest, meta, target)
    own = rank_files(manifest, None, target, 0, 0, 2)
    src.rename(tmp_path / "moved")
    assert build_plan(manifest, None, target) == full
    assert build_plan(manifest, meta, target, files=own).files == tuple(
        f for f in full.files if f.name in own
    )
    shutil.rmtree(tmp_path / "moved")
    assert read_source_meta(manifest) is meta
    assert build_plan(manifest, meta, target) == full


def test_a_lying_sidecar_is_refused_naming_it(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    """A hand-edited sidecar giving a tp-split parameter another dim or stride: what the files
    confirm (the dim exists, every tp shard has the same shape, the dim holds whole stride
    chunks) is checked when the manifest is read; a wrong dim on equal shards is not in the
    files, and is refused against the model's own shard shapes before anything is loaded."""
    from lightning_reshape.checkpoint.convert import plan_conversion
    from lightning_reshape.checkpoint.target_shapes import check_target_shapes, planned_shapes

    src = copy_save(ckpt_root[2] / "tp_z1", tmp_path / "src")  # tp 2: col (6, 8), row (8, 6)
    tag = src / (src / "latest").read_text().strip()
    honest = (tag / SIDECAR_NAME).read_text()
    truth = planned_shapes(plan_conversion(src, tp=1, dp=1), 0)  # what the model at tp 1 has
    assert truth["col.weight"] == (12, 8) and truth["row.weight"] == (8, 12)
    check_target_shapes(plan_conversion(src, tp=1, dp=1), 0, truth)

    def lie(name: str, split: TPSplit) -> None:
        sidecar = Sidecar.from_json(json.loads(honest), "honest")
        splits = {**sidecar.tp_splits, name: split}
        write_sidecar(tag, Sidecar(**{**sidecar.__dict__, "tp_splits": splits}))

    for name, split, why in [
        ("col.bias", TPSplit(dim=1), "they have no dim 1"),
        ("col.weight", TPSplit(dim=0, stride=4), r"dim 0 \(6\) does not hold 4 whole chunks"),
    ]:
        lie(name, split)
        with pytest.raises(CheckpointError) as err:
            read_manifest(src)
        message = str(err.value)
        assert message.startswith(f"{tag / SIDECAR_NAME}: tp_splits[{name!r}] declares ")
        assert f"dim={split.dim} stride={split.stride}" in message
        assert re.search(why, message) and "correct or remove that entry" in message

    lie("col.weight", TPSplit(dim=1))  # (6, 8) shards read as halves of (6, 16): files agree
    plan = plan_conversion(src, tp=1, dp=1)
    with pytest.raises(CheckpointError) as err:
        check_target_shapes(plan, 0, truth)
    message = str(err.value)
    assert message.startswith("col.weight: the checkpoint's tensor-parallel split (dim=1 stride=1")
    assert "shard of shape (6, 16)" in message and "the model here has (12, 8)" in message
    assert str(tag / SIDECAR_NAME) in message
