"""``benchmarks/scale.py``: its synthesized manifests equal what ``read_manifest`` reads from
real DeepSpeed saves of the same model shape and layout, and its quick mode runs.

Why: the benchmark's figures (plan time, read amplification, memory at 1,024 and 8,192 ranks)
mean something only if the manifest it invents is the one the real files would give. One
4-process launch writes two tiny saves of the project's pipeline GPT with the
Megatron-DeepSpeed recipe (bf16 + fp32 gradient accumulation at ZeRO 1: BF16_Optimizer):
tp 2 x pp 2 x dp 1 and tp 1 x pp 2 x dp 2.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_reshape.checkpoint.plan import Target, build_plan, rank_files, read_source_meta
from lightning_reshape.checkpoint.reader import ShardReader, read_manifest
from tests.deepspeed_harness import run_distributed
from tests.reshape.scale_workers import GPTRun, save_worker

RUNS = {"tp2pp2": (GPTRun("tp2pp2", 2, 2), 1), "tp1pp2dp2": (GPTRun("tp1pp2dp2", 1, 2), 2)}
ROOT = Path(__file__).resolve().parents[2]


def _scale() -> Any:
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("scale")
    parts = run_distributed(save_worker, 4, str(out), [r for r, _ in RUNS.values()], timeout=300)
    return {"root": out, "parts": parts[0], "scale": _scale()}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_synthesized_manifest_equals_read_manifest(saves: dict[str, Any], name: str) -> None:
    scale = saves["scale"]
    run, dp = RUNS[name]
    real = read_manifest(saves["root"] / name)
    shape = scale.GPTShape("tiny", run.vocab, run.hidden, run.layers, run.heads, run.seq, run.ffn)
    assert list(scale.stage_bounds(shape, run.tp, run.pp)) == saves["parts"][name]
    src = scale.synthesize(
        shape, run.tp, run.pp, dp, steps=run.steps, micro_batch=run.micro_batch,
        grad_accum=run.grad_accum, root=real.root,
    )  # fmt: skip
    syn = src.manifest
    # every field the planner reads, piece by piece
    assert syn.tensors == real.tensors
    assert syn.scalars == real.scalars
    assert [(r.name, r.file, r.key) for r in syn.state_refs] == [
        (r.name, r.file, r.key) for r in real.state_refs
    ]
    for field in ("layout", "tag", "topology", "model_dtype", "optimizer_wrapper", "aliases"):
        assert getattr(syn, field) == getattr(real, field), field
    for field in ("files", "client_state_keys", "global_steps", "ds_version"):
        assert getattr(syn, field) == getattr(real, field), field
    for key, value in syn.extra.items():
        assert real.extra[key] == value, key
    assert src.meta == read_source_meta(real) == real.source_meta
    assert syn.source_meta == src.meta
    # the read model's records: each tensor its own storage record, of the real size, in the
    # real order within its file
    with ShardReader(real.root) as reader:
        for file, records in src.records.items():
            sd = reader.load(file)
            where = {}
            for key, (_, nbytes) in records.items():
                t = sd
                for k in key:
                    t = t[k]
                assert t.storage_offset() == 0, (file, key)
                assert t.storage.numel * t.element_size() == nbytes, (file, key)
                where[key] = t.storage.data_offset
            assert sorted(records, key=records.__getitem__) == sorted(where, key=where.__getitem__)
    # and so the plans are equal, here for a pp and dp change; each rank loads the files the
    # benchmark names for it
    target = Target(tp=run.tp, pp=3, dp=2 // run.tp, zero_stage=1)
    assert build_plan(syn, None, target) == build_plan(real, None, target)
    for rank in range(target.tp * target.pp * target.dp):
        stage, d, t = scale.rank_coords(target, rank)
        named = rank_files(real, None, target, t, stage, d)
        assert set(named) == set(scale.rank_files(shape, target, rank))
        one = build_plan(syn, None, target, files=named)
        assert sorted(f.name for f in one.files) == sorted(named)


def test_rank_files_and_sample_cover_the_layout(saves: dict[str, Any]) -> None:
    scale = saves["scale"]
    target = Target(tp=8, pp=8, dp=12, zero_stage=1)
    ranks = scale.sample_ranks(target, 32)
    coords = [scale.rank_coords(target, r) for r in ranks]
    assert len(ranks) == 32
    assert {s for s, _, _ in coords} == set(range(8)) and {t for _, _, t in coords} == set(range(8))
    for stage in range(8):
        assert {d for s, d, _ in coords if s == stage} == {0, 11}
    files = scale.rank_files(scale.MODELS["gpt-175b"], target, 8 * 12 * 3 + 8 * 5 + 2)
    assert files[0] == "mp_rank_26_model_states.pt"  # stage 3, tp rank 2
    assert files[-1] == "bf16_zero_pp_rank_5_mp_rank_26_optim_states.pt"
    assert all(f.endswith("-model_02-model_states.pt") for f in files[1:-1])


def test_quick_mode_runs(saves: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert saves["scale"].main(["--quick", "--no-rows"]) == 0
    out = capsys.readouterr().out
    assert "== world 1024: tp 8 x pp 16 x dp 8 = 1024 -> tp 8 x pp 8 x dp 12 = 768 ranks" in out
    targets = out.split("== targets", 1)[1].strip().splitlines()[1:]
    assert len(targets) == 3
    assert all(line.split()[0] in ("PASS", "MISS", "n/a") for line in targets)
    assert "read amplification" in targets[0]


@pytest.mark.parametrize(
    ("worlds", "says"),
    [
        (",", "expected comma-separated integers"),  # was an IndexError traceback
        ("128,128", "given twice"),  # was a "flat memory" PASS comparing 128 with itself
        ("128000000000", "is above 1,048,576"),  # was a synthesis that never ended
    ],
)
def test_bad_worlds_are_one_line(
    worlds: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _scale().main(["--quick", "--no-rows", "--worlds", worlds])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
