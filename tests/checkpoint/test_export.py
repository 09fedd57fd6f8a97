"""``export``: full weights of ZeRO 1/2/3, tp and pp checkpoints as safetensors / torch files.

Oracles: DeepSpeed's own ``zero_to_fp32`` for ZeRO (bit for bit), the live engines' full
parameters (``expected_*.pt``, tp shards joined, pipeline stages merged) for tp and pp, and
``load_state_dict(strict=True)`` of the module the checkpoint came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_reshape.checkpoint.export import export_checkpoint
from lightning_reshape.cli import main
from tests.checkpoint.ds_workers import TinyNet, TPNet
from tests.checkpoint.helpers import copy_save, deepspeed_fp32, expected_state, snapshot

FROZEN = {"frozen.weight", "frozen.bias"}


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """What a Hugging Face loader does: the single file, or every shard named by the index."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(folder / "model.safetensors")
    weight_map = json.loads(index.read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = load_file(folder / shard)
        assert {k for k, v in weight_map.items() if v == shard} == set(part)
        out.update(part)
    return out


@pytest.mark.parametrize("name", ["z1", "z2", "z3", "z2bf16", "z3bf16"])
def test_zero_export_equals_zero_to_fp32(
    ckpt_root: dict[int, Path], tmp_path: Path, name: str
) -> None:
    save = ckpt_root[2] / name
    before = snapshot(save)
    out = export_checkpoint(save, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # what from_pretrained requires
    got = load_file(out / "model.safetensors")
    ref = deepspeed_fp32(save)
    assert set(ref) <= set(got)
    for key, value in ref.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], value.float()), key
    # frozen parameters too (zero_to_fp32 drops them for some stages); the live values
    live = expected_state(save)
    for key in FROZEN:
        assert torch.equal(got[key], live["params"][key].float()), key
    assert torch.equal(got["head.weight"], got["emb.weight"])  # tied, under both names
    TinyNet().load_state_dict(got, strict=True)
    assert snapshot(save) == before


def test_tp_export_equals_full_model(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    """TPNet trained at tp 2: the export is the full (tp 1) model, as the live engines held it."""
    save = ckpt_root[2] / "tp_z1"
    got = _load_folder(export_checkpoint(save, tmp_path / "out"))
    live = expected_state(save)
    for key, value in {**live["params"], **live["buffers"]}.items():
        assert torch.equal(got[key], value.float()), key
    assert got["col.weight"].shape == (12, 8) and got["row.weight"].shape == (8, 12)
    TPNet(1, 0, None).load_state_dict(got, strict=True)


def test_pp_export_equals_pipeline_module(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    """A 2-stage PipelineModule: names as the whole PipelineModule's state_dict (layer.param)."""
    save = ckpt_root[2] / "pp_z1"
    got = _load_folder(export_checkpoint(save, tmp_path / "out"))
    live = expected_state(save)
    want = {**live["params"], **live["buffers"]}
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value.float()), key


def test_shards_dtypes_torch_format_and_cli(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = ckpt_root[2] / "z2"
    single = load_file(export_checkpoint(save, tmp_path / "one") / "model.safetensors")
    # sharded: files of at most 200 bytes (one tensor may exceed it alone), with HF's index
    sharded = export_checkpoint(save, tmp_path / "many", max_shard_size=200)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in single.values())
    got = _load_folder(sharded)
    assert set(got) == set(single) and all(torch.equal(got[k], single[k]) for k in single)
    # bf16 and the torch format (tied names share one tensor, as torch.save keeps them)
    assert main(["export", str(save), str(tmp_path / "pt"), "--format", "torch",
                 "--dtype", "bf16", "--quiet"]) == 0  # fmt: skip
    pt = torch.load(tmp_path / "pt" / "pytorch_model.bin", weights_only=True)
    assert set(pt) == set(single)
    for key, value in single.items():
        assert torch.equal(pt[key], value.to(torch.bfloat16)), key
    assert pt["head.weight"].data_ptr() == pt["emb.weight"].data_ptr()


def test_export_errors_are_one_line_and_leave_nothing(
    ckpt_root: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save = ckpt_root[2] / "z1"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    assert main(["export", str(save), str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not an empty folder" in err
    assert (taken / "x").read_text() == "keep me"
    assert main(["export", str(save), str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "expected a number with an optional unit" in capsys.readouterr().err
    # a shard truncated under our feet: the export fails and leaves no folder, no partial
    broken = copy_save(save, tmp_path / "broken")
    optim = next((broken / "global_step2").glob("zero_pp_rank_1_*optim_states.pt"))
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])
    assert main(["export", str(broken), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken"]
    shutil.rmtree(broken)


def test_strip_prefix(
    ckpt_root: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--strip-prefix``: names that start with it lose it, the others stay; a prefix that no
    name has, or that leaves a name empty, is one line and exit 2 (tests/lightning/
    test_hf_export.py runs the Hugging Face case end to end)."""
    save = ckpt_root[2] / "z2"
    full = load_file(export_checkpoint(save, tmp_path / "full") / "model.safetensors")
    got = load_file(
        export_checkpoint(save, tmp_path / "l1", strip_prefix="l1.") / "model.safetensors"
    )
    assert set(got) == {n.removeprefix("l1.") for n in full}
    assert torch.equal(got["weight"], full["l1.weight"]) and "l2.weight" in got
    bare = load_file(  # a module path without its dot means the same (no ".weight" names)
        export_checkpoint(save, tmp_path / "l1b", strip_prefix="l1") / "model.safetensors"
    )
    assert set(bare) == set(got)
    for prefix, says in (("model.", "no tensor name starts with 'model.'"),
                         ("emb.weight", "leaves 'emb.weight' without a name")):  # fmt: skip
        assert main(["export", str(save), str(tmp_path / "o"), "--strip-prefix", prefix]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "o").exists()
