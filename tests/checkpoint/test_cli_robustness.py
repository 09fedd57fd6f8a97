"""Hostile input to the CLI: every failure is one line on stderr and exit 2 (130 on Ctrl-C),
never a traceback, and export refuses the damaged sources convert refuses."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import time
from pathlib import Path

import pytest

from lightning_reshape.cli import main
from tests.checkpoint.damage import flip_data_byte
from tests.checkpoint.helpers import copy_save


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run the CLI in process; assert exit 2 and one error line holding every needle."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors exit from inside parse_args
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tag(save: Path) -> Path:
    return save / (save / "latest").read_text().strip()


def test_export_refuses_a_flipped_bit_and_a_shard_of_another_save(
    ckpt_root: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = ckpt_root[2] / "z1"
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    # (a) one flipped bit in an optimizer record, zip CRC left stale
    flipped = copy_save(src, tmp_path / "flipped")
    flip_data_byte(_tag(flipped) / shard, "1", 3)
    _fails(capsys, ["export", str(flipped), str(tmp_path / "o1")], shard, "CRC-32")
    assert not (tmp_path / "o1").exists()
    # (b) rank 1's optimizer shard copied from an earlier save of the same run
    mixed = copy_save(src, tmp_path / "mixed")
    tags = sorted(p for p in mixed.iterdir() if p.is_dir() and p.name.startswith("global_step"))
    assert len(tags) >= 2, tags
    shutil.copy2(tags[0] / shard, _tag(mixed) / shard)
    line = _fails(capsys, ["export", str(mixed), str(tmp_path / "o2")])
    assert "convert" not in line
    code = main(["convert", str(mixed), str(tmp_path / "c2")])  # convert refuses it too
    assert code == 2
    capsys.readouterr()
    assert not (tmp_path / "o2").exists()
    # the pristine source still exports
    assert main(["export", str(src), str(tmp_path / "ok")]) == 0
    capsys.readouterr()


def test_export_output_errors_are_one_line(
    ckpt_root: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = ckpt_root[2] / "z1"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # the output's parent is a file: NotADirectoryError / FileExistsError -> one line
    _fails(capsys, ["export", str(src), str(blocker / "out")], str(blocker))
    # a file-size limit (ulimit -f): the write fails with EFBIG, as the console script sees it
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, old_limit[1]))
    try:
        code = main(["export", str(src), str(tmp_path / "big")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot write" in err and "EFBIG" in err, err
    assert not (tmp_path / "big").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_bad_tp_rules_degrees_and_world_sizes_are_one_line(
    ckpt_root: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = str(ckpt_root[2] / "z1")
    out = str(tmp_path / "out")
    _fails(capsys, ["convert", src, out, "--tp", "2", "--tp-rule", "(=0", "--dry-run"], "regex")
    _fails(capsys, ["inspect", src, "--tp-rule", "x=0:0"], "'x=0:0'", "STRIDE >= 1")
    _fails(capsys, ["export", src, out, "--tp-rule", "x=-1"], "'x=-1'", "DIM >= 0")
    _fails(capsys, ["export", src, out, "--tp-rule", "[=replicated"], "regex")
    _fails(capsys, ["groups", "--world-size", "99999999999999999999"], "2**20")
    _fails(capsys, ["groups", "--world-size", "8", "--tp", "2097152"], "2**20")
    _fails(capsys, ["convert", "--dry-run", src, out, "--dp", "99999999"], "--dp", "2**20")
    t0 = time.perf_counter()  # below 2**20 but above the model's elements: refused at once
    _fails(capsys, ["convert", "--dry-run", src, out, "--dp", "1048576"], "--dp", "elements")
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "out").exists()


def test_keyboard_interrupt_is_one_line_exit_130(
    ckpt_root: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during a reshape: 'interrupted', exit 130, no traceback (SIGINT sent for real)."""
    src = str(ckpt_root[2] / "z1")
    import lightning_reshape.checkpoint.convert as convert_mod

    real = convert_mod.plan_conversion

    def plan_then_sigint(*args: object, **kwargs: object) -> object:
        plan = real(*args, **kwargs)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGINT)  # the default handler raises KeyboardInterrupt
        return plan

    convert_mod.plan_conversion = plan_then_sigint  # type: ignore[assignment]
    try:
        code = main(["convert", src, str(tmp_path / "out")])
    finally:
        convert_mod.plan_conversion = real
    err = capsys.readouterr().err
    assert code == 130, err
    assert err.strip() == "lightning-reshape convert: interrupted", err


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"format": 1' + "0" * 100_000 + "}", "integer string conversion"),
        (
            '{"format": "lightning-reshape", "version": 1, "topology": [1, 2], "zero_stage": 1}',
            "not a valid lightning-reshape sidecar",
        ),
        ("\xff\xfe garbage", "cannot read sidecar"),
    ],
    ids=["deep", "bigint", "types", "garbage"],
)
def test_hostile_sidecar_is_one_line_naming_it(
    ckpt_root: dict[int, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    body: str,
    needle: str,
) -> None:
    save = copy_save(ckpt_root[2] / "z1", tmp_path / "src")
    sidecar = _tag(save) / "lightning_reshape.json"
    sidecar.write_bytes(body.encode("latin-1"))
    out = str(tmp_path / "out")
    for argv in (
        ["inspect", str(save)],
        ["convert", "--dry-run", str(save), out],
        ["export", str(save), out],
        ["verify", str(save), str(ckpt_root[2] / "z1")],
    ):
        _fails(capsys, argv, str(sidecar), needle)
    assert not (tmp_path / "out").exists()


def test_export_names_a_source_file_truncated_after_it_was_listed(
    ckpt_root: dict[int, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file is cut (as by a copy still running) between listing and reading: the error
    names it."""
    import lightning_reshape.checkpoint.export as export_mod

    save = copy_save(ckpt_root[2] / "z1", tmp_path / "src")
    shard = _tag(save) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    real = export_mod.export_items

    def items_then_truncate(*args: object, **kwargs: object) -> object:
        items = real(*args, **kwargs)  # type: ignore[arg-type]
        os.truncate(shard, shard.stat().st_size * 2 // 3)
        return items

    monkeypatch.setattr(export_mod, "export_items", items_then_truncate)
    _fails(capsys, ["export", str(save), str(tmp_path / "out")], str(shard))
    assert not (tmp_path / "out").exists()
