"""``lightning-reshape groups``: the installed console script against Megatron-core."""

from __future__ import annotations

import json
import subprocess

import pytest

from lightning_reshape.cli import main

from .megatron_oracle import RankGenerator

DENSE = ("tp", "pp", "dp", "cp", "dp-cp", "tp-pp")
EXPERT = {"ep": "ep", "etp": "tp", "tp-ep": "tp-ep", "tp-ep-pp": "tp-ep-pp", "edp": "dp"}


def _groups_json(*args: str) -> dict[str, list[list[int]]]:
    out = subprocess.run(
        ["lightning-reshape", "groups", *args, "--json"], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("order", ["tp-pp-dp", "tp-cp-ep-dp-pp"])
def test_world_8_tp2_pp2_matches_megatron(order: str) -> None:
    got = _groups_json("--world-size", "8", "--tp", "2", "--pp", "2", "--order", order)
    dense = RankGenerator(tp=2, ep=1, dp=2, pp=2, cp=1, order=order)
    expert = RankGenerator(tp=2, ep=1, dp=2, pp=2, cp=1, order=order)
    for token in DENSE:
        assert got[token] == dense.get_ranks(token), token
    for kind, token in EXPERT.items():
        assert got[kind] == expert.get_ranks(token), kind
    assert got["embedding"] == [[g[0], g[-1]] for g in dense.get_ranks("pp")]


def test_expert_groups_match_megatron_expert_generator(capsys: pytest.CaptureFixture) -> None:
    assert main(["groups", "--world-size", "32", "--tp", "2", "--pp", "2", "--ep", "4",
                 "--etp", "1", "--json"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    expert = RankGenerator(tp=1, ep=4, dp=4, pp=2, cp=1, order="tp-cp-ep-dp-pp")
    for kind, token in EXPERT.items():
        assert got[kind] == expert.get_ranks(token), kind


def test_table_names_every_group_kind(capsys: pytest.CaptureFixture) -> None:
    assert main(["groups", "--world-size", "16", "--tp", "2", "--pp", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("world 16: tp=2 pp=2 dp=4")
    kinds = [line.split()[0] for line in lines[2:]]
    assert kinds == ["tp", "pp", "dp", "cp", "dp-cp", "tp-pp", "ep", "etp", "tp-ep", "tp-ep-pp",
                     "edp", "embedding"]  # fmt: skip
    assert "[0,2,4,6]" in next(line for line in lines if line.startswith("dp "))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--world-size", "6", "--tp", "4"], "not divisible by tp*cp*pp"),
        (["--world-size", "zero"], "'zero' is not a whole number"),
        (["--world-size", "8", "--order", "tp-xx"], "unknown axis 'xx'"),
        (["--world-size", "8", "--tp", "-2"], "-2 is below 1"),
        (["--tp", "2"], "--world-size"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args: list[str], needle: str) -> None:
    out = subprocess.run(["lightning-reshape", "groups", *args], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
