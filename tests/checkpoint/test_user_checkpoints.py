"""Checkpoints shaped as real users bring them (issue 12), all written by DeepSpeed here:
``elastic_checkpoint: true`` saves, Hugging Face Trainer-style ``checkpoint-N/global_stepN``
folders without ``latest`` (bf16 files), custom tags; and a newcomer's rough edges in the CLI."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_reshape.checkpoint.convert import copy_recovery_script
from lightning_reshape.checkpoint.execute import COMPLETE_MARKER, PARTIAL_MARKER
from lightning_reshape.checkpoint.reader import (
    consolidate_fp32,
    consolidate_optimizer_states,
    read_manifest,
)
from lightning_reshape.checkpoint.verify import verify
from lightning_reshape.cli import _build_parser, main
from lightning_reshape.errors import CheckpointError
from tests.checkpoint.helpers import deepspeed_fp32, expected_state, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _fp32_oracle(save: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if tag is None:
        return deepspeed_fp32(save)
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(save), tag=tag))


@pytest.mark.parametrize("name", ["elastic_z1", "elastic_z2"])
def test_elastic_checkpoint_is_read_and_refused_for_reshape_in_one_line(
    user_ckpts: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    save = user_ckpts / name
    before = snapshot(save)
    manifest = read_manifest(save)
    assert manifest.extra["elastic_checkpoint"] and manifest.topology.dp == 2
    fp32 = consolidate_fp32(manifest)
    for key, value in _fp32_oracle(save).items():
        assert torch.equal(fp32[key], value), key
    live = expected_state(save)
    states = consolidate_optimizer_states(manifest)
    for param, per_key in live["states"].items():
        assert set(states[param]) == set(per_key), param
        for key, value in per_key.items():
            assert torch.equal(states[param][key], value), (param, key)
    assert main(["inspect", str(save)]) == 0
    assert "elastic_checkpoint" in capsys.readouterr().out
    assert main(["export", str(save), str(tmp_path / "weights"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", str(save), str(tmp_path / "out"), "--dp", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zero_optimization.elastic_checkpoint=true" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert snapshot(save) == before


@pytest.mark.parametrize(
    "path,tag",
    [
        ("hf/checkpoint-3", "global_step3"),  # HF Trainer: parent of a single tag, no latest
        ("hf/checkpoint-3/global_step3", "global_step3"),  # the tag folder itself
        ("custom_tag", "my-run_final"),  # a custom tag, no latest
        ("custom_tag/my-run_final", "my-run_final"),
    ],
)
def test_hf_trainer_and_custom_tag_saves(
    user_ckpts: Path, tmp_path: Path, path: str, tag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = user_ckpts / path
    save = user_ckpts / path.split("/")[0] / ("checkpoint-3" if path.startswith("hf") else "")
    manifest = read_manifest(src)
    assert manifest.tag == tag and manifest.topology.dp == 2
    if path.startswith("hf"):
        assert manifest.extra["bf16_prefixed_files"] and manifest.model_dtype == "bfloat16"
    assert main(["inspect", str(src)]) == 0
    assert f"tag {tag}" in capsys.readouterr().out
    # convert with only --dp (tp and pp keep the source's), then compare bit for bit
    out = tmp_path / "dp3"
    assert main(["convert", str(src), str(out), "--dp", "3", "--quiet"]) == 0
    capsys.readouterr()
    assert read_manifest(out).topology.dp == 3 and (out / "latest").read_text() == tag
    assert verify(src, out) == []
    # export: DeepSpeed's own zero_to_fp32 (given the tag, as it needs without `latest`)
    assert main(["export", str(src), str(tmp_path / "weights"), "--quiet"]) == 0
    from safetensors.torch import load_file

    got = load_file(tmp_path / "weights" / "model.safetensors")
    for key, value in _fp32_oracle(save, tag).items():
        assert torch.equal(got[key], value.float()), key


def test_hf_output_dir_and_plain_lightning_file_say_what_to_pass(
    user_ckpts: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=r"folder of saves.*hf/checkpoint-3"):
        read_manifest(user_ckpts / "hf")
    plain = tmp_path / "epoch=0-step=4.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "pytorch-lightning_version": "2.5.0"}, plain)
    with pytest.raises(CheckpointError, match=r"plain Lightning checkpoint.*load_state_dict"):
        read_manifest(plain)
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="single torch file, not a DeepSpeed checkpoint"):
        read_manifest(other)


def test_convert_omitted_axes_marker_and_recovery_script(
    ckpt_root: dict[int, Path], tmp_path: Path
) -> None:
    """tp 2 source, only --dp given: tp stays 2. One completion marker; zero_to_fp32.py beside."""
    src = ckpt_root[2] / "tp_z1"
    out = tmp_path / "tp2dp2"
    assert main(["convert", str(src), str(out), "--dp", "2", "--quiet"]) == 0
    m = read_manifest(out)
    assert (m.topology.tp, m.topology.dp) == (2, 2)
    tag_dir = out / m.tag
    assert (tag_dir / COMPLETE_MARKER).is_file() and not (tag_dir / PARTIAL_MARKER).exists()
    script = out / "zero_to_fp32.py"
    assert script.is_file() and os.access(script, os.X_OK)
    import deepspeed.utils.zero_to_fp32 as stock

    assert script.read_bytes() == Path(stock.__file__).read_bytes()
    assert copy_recovery_script(out) == []  # present already: left alone


def test_help_describes_every_option_without_rest_markup() -> None:
    parser = _build_parser()
    assert "`" not in parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"groups", "inspect", "convert", "verify", "export"}
    for name, command in sub.choices.items():
        text = command.format_help()
        assert "`" not in text, name
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help text"


def test_verify_and_fp32_export_do_not_import_torch(
    ckpt_root: dict[int, Path], tmp_path: Path
) -> None:
    src = ckpt_root[2] / "z1"
    out = tmp_path / "dp1"
    assert main(["convert", str(src), str(out), "--dp", "1", "--quiet"]) == 0
    code = (
        "import sys\n"
        "from lightning_reshape.cli import main\n"
        "code = main(['verify', sys.argv[1], sys.argv[2]])\n"
        "code |= main(['export', sys.argv[1], sys.argv[3], '--quiet'])\n"
        "heavy = sorted(m for m in ('torch', 'deepspeed') if m in sys.modules)\n"
        "print('imported:', heavy)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(src), str(out), str(tmp_path / "weights")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "equal" in done.stdout and "imported: []" in done.stdout
