"""The computed layouts against what real DeepSpeed writes on CPU/gloo.

Two launches (dp 2 and dp 3) each build and save several engines: ZeRO 1, ZeRO 2 with
round-robin gradients, ZeRO 1 with parameter alignment (+ round robin), the bf16 optimizer and
ZeRO 3 with a small sub_group_size, and build real PipelineModules. The parent then reads the
written files and compares partition sizes, paddings, ``param_slice_mappings`` and the fp32 data
at every computed position with the layouts of ``zero_layout``. Parameter sizes (35, 5, 15, 3,
13 and a 1-element group) do not divide by 2 or 3, so tail padding is non-trivial and the
1-element group is padded on several ranks.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lightning_reshape.checkpoint.zero_layout import (
    PipelineStages,
    SliceAddress,
    ZeroGroupLayout,
    bounds_from_sizes,
    overlaps,
    partition_balanced,
    partition_uniform,
    pipeline_stages,
    round_robin_order,
    undo_round_robin,
    zero3_layout,
    zero_group_layout,
)
from lightning_reshape.errors import LayoutError, ReshapeError
from tests.deepspeed_harness import run_distributed

# Optimizer order of the test model's trainable parameters, per param group.
GROUPS: list[list[tuple[str, int]]] = [
    [("l1.weight", 35), ("l1.bias", 5), ("l2.weight", 15), ("l2.bias", 3), ("extra", 13)],
    [("tiny", 1)],
]
SUB_GROUP_SIZE = 12  # forces ZeRO 3 to split group 0 into several fp32 flat groups

# case name -> (zero stage, extra zero_optimization options, bf16, extra config)
ZERO_CASES: dict[str, tuple[int, dict, bool, dict]] = {
    "z1": (1, {}, False, {}),
    "z2_rr": (2, {"round_robin_gradients": True}, False, {}),
    "z1_align_rr": (1, {"parameter_alignment": True, "round_robin_gradients": True}, False, {}),
    # bf16 weights, bf16 gradient accumulation: DeepSpeed's ZeRO optimizer (16-bit elements, so
    # parameter_alignment pads to 8 elements); the files get a "bf16_" prefix.
    "z2_bf16_align": (2, {"parameter_alignment": True}, True, {}),
    # bf16 weights with fp32 gradient accumulation at ZeRO 1: DeepSpeed's BF16_Optimizer.
    "bf16_opt": (1, {}, True, {"data_types": {"grad_accum_dtype": "fp32"}}),
    "z3": (
        3,
        {"sub_group_size": SUB_GROUP_SIZE, "stage3_param_persistence_threshold": 0},
        False,
        {},
    ),
    # DeepSpeed's defaults: sub_group_size 1e9 (one flat group per param group) and a
    # persistence threshold that keeps all these small parameters gathered.
    "z3_defaults": (3, {}, False, {}),
}

# (layer output widths, partition method) for real PipelineModules at pp = world size
PIPE_CASES: list[tuple[list[int], str]] = [
    ([3, 3, 3, 3, 3], "uniform"),
    ([3] * 8, "uniform"),
    ([2, 9, 1, 7, 4, 4, 8, 1, 2, 5, 3], "parameters"),
    ([16, 1, 1, 1, 1, 1, 16], "parameters"),
    ([4, 4, 4, 4, 4, 4, 4], "parameters"),
]


# --------------------------------------------------------------------------------------------
# Real DeepSpeed, in worker processes
# --------------------------------------------------------------------------------------------


def _build_model() -> torch.nn.Module:
    torch.manual_seed(1234)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(7, 5)
            self.l2 = torch.nn.Linear(5, 3)
            self.extra = torch.nn.Parameter(torch.randn(13))
            self.frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
            self.tiny = torch.nn.Parameter(torch.randn(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.l2(torch.tanh(self.l1(x))).sum(-1)
            return ((y + self.extra.sum() * self.tiny + self.frozen.sum()) ** 2).mean()

    return Net()


def _save_zero_case(
    rank: int, out: Path, stage: int, zero_opts: dict, bf16: bool, extra: dict
) -> None:
    import deepspeed

    model = _build_model()
    named = dict(model.named_parameters())
    groups = [
        {"params": [named[n] for n, _ in GROUPS[0]], "weight_decay": 0.01},
        {"params": [named[n] for n, _ in GROUPS[1]], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, **zero_opts},
        "bf16": {"enabled": bf16},
        **extra,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if not bf16:
        # One step, so that the fp32 masters and optimizer states are not the initial values.
        # (The bf16 optimizer keeps fp32 masters that differ from the bf16 weights after a step;
        # without a step they are exactly the bf16 weights, our reference.)
        torch.manual_seed(rank)
        loss = engine(torch.randn(2, 7))
        engine.backward(loss)
        engine.step()
    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            ref = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    else:
        ref = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    engine.save_checkpoint(str(out), tag="t")
    if rank == 0:
        torch.save(ref, out / "reference.pt")
    engine.destroy()


def _pipeline_parts(world_size: int) -> list[list[int]]:
    from deepspeed.pipe import LayerSpec, PipelineModule

    found = []
    for widths, method in PIPE_CASES:
        specs = [LayerSpec(torch.nn.Linear, 3, w) for w in widths]
        module = PipelineModule(layers=specs, num_stages=world_size, partition_method=method)
        found.append([int(p) for p in module.parts])
    return found


def _worker(rank: int, world_size: int, out_dir: str) -> list[list[int]]:
    for case, (stage, opts, bf16, extra) in ZERO_CASES.items():
        _save_zero_case(rank, Path(out_dir) / case, stage, opts, bf16, extra)
    return _pipeline_parts(world_size)


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, list]]:
    """dp -> (folder with one checkpoint per case, PipelineModule parts per PIPE_CASES)."""
    runs = {}
    for dp in (2, 3):
        out = tmp_path_factory.mktemp(f"ds_dp{dp}")
        parts = run_distributed(_worker, dp, str(out), timeout=300)
        runs[dp] = (out, parts[0])
    return runs


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------
# ZeRO 1/2 and bf16 against DeepSpeed's files
# --------------------------------------------------------------------------------------------


def _zero_layouts(case: str, dp: int) -> list[ZeroGroupLayout]:
    _, opts, bf16, _ = ZERO_CASES[case]
    return [
        zero_group_layout(
            group,
            dp,
            optimizer="bf16" if case == "bf16_opt" else "zero",
            round_robin_gradients=opts.get("round_robin_gradients", False),
            parameter_alignment=opts.get("parameter_alignment", False),
            element_size=2 if bf16 else 4,
        )
        for group in GROUPS
    ]


@pytest.mark.parametrize("dp", [2, 3])
@pytest.mark.parametrize("case", ["z1", "z2_rr", "z1_align_rr", "z2_bf16_align", "bf16_opt"])
def test_zero12_layout_matches_deepspeed(ds_runs, case: str, dp: int) -> None:
    folder = ds_runs[dp][0] / case / "t"
    ref = _load(ds_runs[dp][0] / case / "reference.pt")
    layouts = _zero_layouts(case, dp)
    prefix = "bf16_" if ZERO_CASES[case][2] else ""

    model_states = _load(folder / "mp_rank_00_model_states.pt")
    for g, layout in enumerate(layouts):
        shapes = model_states["param_shapes"][g]
        assert list(shapes) == [p.name for p in layout.params]  # flat order
        assert [s.numel() for s in shapes.values()] == [p.numel for p in layout.params]

    for r in range(dp):
        osd = _load(folder / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        osd = osd["optimizer_state_dict"]
        assert list(osd["partition_count"]) == [dp] * len(layouts)
        for g, layout in enumerate(layouts):
            assert osd["group_paddings"][g] == layout.group_paddings[r]
            if case == "bf16_opt":  # BF16_Optimizer's own state dict, not the ZeRO one
                assert "zero_stage" not in osd and "param_alignment_paddings" not in osd
            else:
                assert list(osd["param_alignment_paddings"][g]) == list(
                    layout.param_alignment_paddings
                )
            written = {
                name: SliceAddress(numel=a.numel, start=a.start)
                for name, a in osd["param_slice_mappings"][g].items()
            }
            assert list(written.items()) == list(layout.slice_mappings[r].items())

            flat = osd["single_partition_of_fp32_groups"][g]
            assert flat.dtype == torch.float32
            assert flat.numel() == layout.saved_partition_numel(r)
            # The optimizer states are saved with their padding, one partition long.
            state = osd["base_optimizer_state"]["state"]
            if state:
                assert state[g]["exp_avg"].numel() == layout.partition_size

            # Data: each computed fragment holds exactly that slice of the parameter; the
            # rest of the saved partition is padding (zeros).
            covered = torch.zeros(flat.numel(), dtype=torch.bool)
            for frag in layout.rank_fragments(r):
                got = flat[frag.partition_start : frag.partition_start + frag.numel]
                want = ref[frag.name].flatten()[frag.param_start : frag.param_start + frag.numel]
                assert torch.equal(got, want), (case, dp, r, frag)
                covered[frag.partition_start : frag.partition_start + frag.numel] = True
            assert not flat[~covered].any()


@pytest.mark.parametrize("dp", [2, 3])
def test_round_robin_slice_mappings_do_not_locate_the_data(ds_runs, dp: int) -> None:
    """DeepSpeed quirk we reproduce rather than fix: with ``round_robin_gradients`` and no
    ``parameter_alignment``, ``param_slice_mappings`` are computed in optimizer order while the
    flat buffer is in round-robin order, so the written addresses miss the data."""
    layout = _zero_layouts("z2_rr", dp)[0]
    truth = {
        r: {f.name: SliceAddress(f.numel, f.partition_start) for f in layout.rank_fragments(r)}
        for r in range(dp)
    }
    assert any(dict(layout.slice_mappings[r]) != truth[r] for r in range(dp))
    # With parameter_alignment DeepSpeed passes the real offsets: the mappings are the truth.
    aligned = _zero_layouts("z1_align_rr", dp)[0]
    for r in range(dp):
        real = {f.name: SliceAddress(f.numel, f.partition_start) for f in aligned.rank_fragments(r)}
        assert dict(aligned.slice_mappings[r]) == real


# --------------------------------------------------------------------------------------------
# ZeRO 3 against DeepSpeed's files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dp", [2, 3])
@pytest.mark.parametrize("case", ["z3", "z3_defaults"])
def test_zero3_layout_matches_deepspeed(ds_runs, case: str, dp: int) -> None:
    folder = ds_runs[dp][0] / case / "t"
    ref = _load(ds_runs[dp][0] / case / "reference.pt")
    if case == "z3":
        layout = zero3_layout(GROUPS, dp, sub_group_size=SUB_GROUP_SIZE)
        assert len(layout.sub_group_numels) > len(GROUPS)  # the sub-group split is exercised
    else:
        layout = zero3_layout(GROUPS, dp)
        assert len(layout.sub_group_numels) == len(GROUPS)

    for r in range(dp):
        model_states = _load(folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        written_shapes = [list(d) for d in model_states["param_shapes"]]
        expected = [
            [p.name for p in layout.sub_group_params(s)]
            for s in range(len(layout.sub_group_numels))
        ]
        assert written_shapes == expected

        osd = _load(folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        osd = osd["optimizer_state_dict"]
        flats = osd["fp32_flat_groups"]
        assert [f.numel() for f in flats] == list(layout.sub_group_numels)
        for p in layout.params:
            # Only the real elements: DeepSpeed leaves a ZeRO 3 partition's padding
            # uninitialised (torch.empty), so it holds arbitrary values, not zeros.
            lo, hi = p.param_bounds()[r : r + 2]
            got = flats[p.sub_group][p.offset : p.offset + hi - lo]
            assert torch.equal(got, ref[p.name].flatten()[lo:hi]), (dp, r, p)
            frags = [f for f in layout.fragments(p.name) if f.rank == r]
            assert [(f.param_start, f.numel) for f in frags] == ([(lo, hi - lo)] if hi > lo else [])
        for frag in layout.fragments("tiny"):
            assert frag.rank == 0  # a 1-element parameter lives on rank 0; the rest is padding


# --------------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline_stages_match_pipeline_module(ds_runs, pp: int) -> None:
    for (widths, method), parts in zip(PIPE_CASES, ds_runs[pp][1], strict=True):
        counts = [3 * w + w for w in widths]  # Linear(3, w): weight + bias
        stages = pipeline_stages(len(widths), pp, method, layer_params=counts)
        assert list(stages.parts) == parts, (widths, method, pp)


def test_partition_functions_match_deepspeed_utils() -> None:
    from deepspeed.runtime import utils as ds_utils

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 14)
        m = rng.randint(1, 6)
        assert list(partition_uniform(n, m)) == list(ds_utils.partition_uniform(n, m))
        weights = [rng.choice([0, 1, 1, 2, 5, 10, 100, rng.randint(0, 1000)]) for _ in range(n)]
        want = [int(x) for x in ds_utils.partition_balanced(weights, m)]
        assert list(partition_balanced(weights, m)) == want, (weights, m)


def test_pipeline_stages_helpers_and_errors() -> None:
    stages = pipeline_stages(7, 3, "explicit", boundaries=[0, 1, 5, 7])
    assert stages == PipelineStages((0, 1, 5, 7))
    assert list(stages.layers(1)) == [1, 2, 3, 4]
    assert [stages.stage_of(i) for i in range(7)] == [0, 1, 1, 1, 1, 2, 2]
    with pytest.raises(LayoutError, match="boundaries"):
        pipeline_stages(7, 3, "explicit", boundaries=[0, 5, 7])
    with pytest.raises(LayoutError, match="layer_params"):
        pipeline_stages(7, 3, "parameters")
    with pytest.raises(ReshapeError, match="type:REGEX"):
        pipeline_stages(7, 3, "profile")


# --------------------------------------------------------------------------------------------
# Pure arithmetic
# --------------------------------------------------------------------------------------------


def test_round_robin_order_and_inverse() -> None:
    assert round_robin_order(5, 2) == (0, 2, 4, 1, 3)
    assert round_robin_order(5, 3) == (0, 3, 1, 4, 2)
    names = [f"p{i}" for i in range(7)]
    for dp in (1, 2, 3, 4, 9):
        saved = [names[i] for i in round_robin_order(7, dp)]
        assert undo_round_robin(saved, dp) == tuple(names)


def test_zero_padding_rules() -> None:
    # 1 element at dp 3: flat 6, partitions of 2; ZeRO pads every rank, bf16 books it all last.
    assert zero_group_layout([("x", 1)], 3).group_paddings == (1, 2, 2)
    assert zero_group_layout([("x", 1)], 3, optimizer="bf16").group_paddings == (0, 0, 5)
    layout = zero_group_layout([("a", 3), ("b", 5)], 2, parameter_alignment=True, element_size=2)
    assert [(p.flat_offset, p.alignment_padding) for p in layout.params] == [(0, 5), (8, 0)]
    assert (layout.flat_numel, layout.partition_size, layout.group_paddings) == (16, 8, (0, 3))
    assert layout.param_bounds("b") == (0, 0, 5)
    with pytest.raises(LayoutError, match="zero-element"):
        zero_group_layout([("a", 0)], 2)
    with pytest.raises(LayoutError, match="twice"):
        zero_group_layout([("a", 1), ("a", 2)], 2)


def test_zero3_sub_groups() -> None:
    groups = [[("a", 10), ("b", 3), ("c", 7)], [("d", 5)]]
    # dp 2: partitions 5, 2, 4 | 3; sub_group_size 6 closes after a (5 < 6? no: after a+b = 7).
    layout = zero3_layout(groups, 2, sub_group_size=6)
    assert [(p.name, p.sub_group, p.offset) for p in layout.params] == [
        ("a", 0, 0),
        ("b", 0, 5),
        ("c", 1, 0),
        ("d", 2, 0),
    ]
    assert layout.sub_group_numels == (7, 4, 3)
    assert layout.sub_group_to_group == (0, 0, 1)
    whole = zero3_layout(groups, 2, sub_group_size=None)
    assert whole.sub_group_numels == (11, 3)
    assert zero3_layout(groups, 3).param("c").param_bounds() == (0, 3, 6, 7)


def test_bounds_from_sizes() -> None:
    assert bounds_from_sizes([3, 0, 4]) == (0, 3, 3, 7)
    assert bounds_from_sizes([]) == (0,)
    with pytest.raises(LayoutError, match="negative"):
        bounds_from_sizes([1, -1])


def _scatter(layout, data: dict[str, list[int]], sizes: list[int]) -> list[list[int]]:
    parts = [[0] * size for size in sizes]
    for name, values in data.items():
        for f in layout.fragments(name):
            chunk = values[f.param_start : f.param_start + f.numel]
            parts[f.rank][f.partition_start : f.partition_start + f.numel] = chunk
    return parts


def _reshape(old, new, old_parts, names, sizes) -> list[list[int]]:
    """Move every parameter's pieces from ``old`` partitions to ``new`` ones with ``overlaps``."""
    new_parts = [[0] * size for size in sizes]
    for name in names:
        old_frags = {f.rank: f for f in old.fragments(name)}
        new_frags = {f.rank: f for f in new.fragments(name)}
        for r, segs in enumerate(overlaps(old.param_bounds(name), new.param_bounds(name))):
            for s in segs:
                src = old_frags[s.old_index].partition_start + s.old_offset
                dst = new_frags[r].partition_start + s.new_offset
                new_parts[r][dst : dst + s.length] = old_parts[s.old_index][src : src + s.length]
    return new_parts


def test_reshape_params_between_layouts() -> None:
    """The intended use: dp 2 ZeRO 1 -> dp 3 ZeRO 2 with round robin -> dp 2 ZeRO 3 (one
    sub-group per parameter) -> back, with every element where the target layout says."""
    group = GROUPS[0]
    names = [n for n, _ in group]
    data = {n: list(range(100 * i, 100 * i + k)) for i, (n, k) in enumerate(group)}
    z1 = zero_group_layout(group, 2)
    z2 = zero_group_layout(group, 3, round_robin_gradients=True)
    z3 = zero3_layout([group], 2, sub_group_size=0)
    assert len(z3.sub_group_numels) == len(group)

    parts = _scatter(z1, data, [z1.partition_size] * 2)
    parts = _reshape(z1, z2, parts, names, [z2.partition_size] * 3)
    flat = [x for part in parts for x in part]
    for p in z2.params:
        assert flat[p.flat_offset : p.flat_offset + p.numel] == data[p.name]

    # ZeRO 3 "partitions" per rank: here one flat group per parameter, so address them by
    # treating each parameter on its own.
    for name in names:
        p3 = z3.param(name)
        per_rank = _reshape(z2, z3, parts, [name], [z3.sub_group_numels[p3.sub_group]] * 2)
        padded = data[name] + [0] * (p3.padded_numel - p3.numel)
        assert [x for part in per_rank for x in part] == padded
    back = _reshape(z2, z1, parts, names, [z1.partition_size] * 2)
    assert back == _scatter(z1, data, [z1.partition_size] * 2)
