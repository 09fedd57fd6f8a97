"""DeepSpeed's pipeline engine: layer files, stage cuts and tied layers.

Why: a ``PipelineModule`` saves one file per layer and tp rank,
``layer_{idx:02d}-model_{tp:02d}-model_states.pt``, each a plain ``state_dict()`` of that layer
keyed by the global layer index, so moving a layer to another stage is renaming only; the
stage's ZeRO 1 state (``mp_rank_XX``/optimizer files, see :mod:`zero12`) is re-partitioned.
Stage boundaries follow ``PipelineModule``'s ``partition_method`` (default "parameters":
balanced by each layer's trainable parameter count). ``TiedLayerSpec`` modules are named
``tied_modules.<key>.<name>``, held by every stage using them; which stages those are is known
only from our sidecar's record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lightning_reshape.checkpoint.manifest import (
    ROLE_BUFFER,
    ROLE_FP32,
    ROLE_PARAM,
    KeyPath,
    Manifest,
)
from lightning_reshape.checkpoint.plan import Target, TargetFile, TensorFill, _local_shape
from lightning_reshape.checkpoint.reader import TIED_PREFIX, _whole
from lightning_reshape.checkpoint.sidecar import Sidecar, TPSplit
from lightning_reshape.checkpoint.torchfile import TensorRef, is_tensor
from lightning_reshape.checkpoint.zero_layout import _check_bounds, _check_degree, bounds_from_sizes
from lightning_reshape.errors import CheckpointError, LayoutError
from lightning_reshape.topology.reshape_map import uniform_boundaries

if TYPE_CHECKING:
    from lightning_reshape.checkpoint.plan import PlanContext, RankPlan, _Selection
    from lightning_reshape.checkpoint.reader import _Builder, _Files


# --------------------------------------------------------------------------------------------
# write side: target layout -> layer files


def _layer_of(name: str) -> int:
    """Global pipeline layer index of a pipeline-engine name (``<layer>.<name in layer>``)."""
    head = name.split(".", 1)[0]
    if not head.isdigit():
        raise CheckpointError(
            f"{name}: not a pipeline-engine parameter name (<layer index>.<name>); the checkpoint "
            "mixes pipeline and plain module files"
        )
    return int(head)


def _layers_of(name: str, ties: Mapping[str, Any]) -> tuple[int, ...]:
    """The pipeline layers using a parameter: its own, or every use of its tied module."""
    if name.startswith(TIED_PREFIX):
        key = name[len(TIED_PREFIX) :].split(".", 1)[0]
        if key not in ties:
            raise CheckpointError(
                f"{name}: a TiedLayerSpec parameter whose uses are not recorded; only checkpoints "
                "with our sidecar's pipeline record (ReshapeDeepSpeedStrategy) can move it"
            )
        return tuple(ties[key]["layers"])
    return (_layer_of(name),)


def _in_stage(name: str, lo: int, hi: int, ties: Mapping[str, Any]) -> bool:
    return any(lo <= x < hi for x in _layers_of(name, ties))


def _stage_names(
    names: Sequence[str], lo: int, hi: int, ties: Mapping[str, Any]
) -> tuple[str, ...]:
    """A stage's parameters of one group in PipelineModule's order: its tied modules first
    (registered before the layers, in the order of their first use in the stage), then its
    layers' parameters in layer order."""
    mine = [n for n in names if _in_stage(n, lo, hi, ties)]
    tied = [n for n in mine if n.startswith(TIED_PREFIX)]
    first_use = {n: min(x for x in _layers_of(n, ties) if lo <= x < hi) for n in tied}
    tied.sort(key=lambda n: first_use[n])  # stable: a module's own order is kept
    return (*tied, *(n for n in mine if not n.startswith(TIED_PREFIX)))


def target_stages(
    manifest: Manifest,
    target: Target,
    groups: Sequence[Sequence[str]],
    splits: Mapping[str, TPSplit | None],
) -> tuple[int, ...]:
    """Stage boundaries at the target pp, as DeepSpeed's PipelineModule computes them for the
    target's ``partition_method``: by default "parameters", balanced by each layer's trainable
    (tp-local) parameter count; "uniform"; or explicit boundaries. Layers are numbered by their
    files; a layer without a file (a function) counts as 0 parameters. Function layers after the
    last layer file are known only from our sidecar (its layer count)."""
    layers = {p.layer for e in manifest.tensors for p in e.pieces if p.layer is not None}
    known = manifest.extra.get("pipeline_layers") or {}
    ties = known.get("ties") or {}
    layers.update(x for t in ties.values() for x in t["layers"])
    layers.update(known.get("module_layers", ()))
    if not layers:
        raise CheckpointError(f"{manifest.root}: a pipeline checkpoint without layer files")
    counts = [0] * max(max(layers) + 1, int(known.get("num_layers", 0) or 0))
    shapes = {e.name: e.shape for e in manifest.entries(ROLE_FP32)}
    for names in groups:
        for n in names:
            numel = math.prod(_local_shape(shapes[n], splits.get(n), target.tp))
            for layer in _layers_of(n, ties):  # DeepSpeed counts a tied module at every use
                counts[layer] += numel
    if target.pp > len(counts):
        raise LayoutError(
            f"target pp={target.pp} exceeds the {len(counts)} pipeline layers of "
            f"{manifest.root}; choose pp <= {len(counts)}"
        )
    method = target.pp_partition.strip().lower()
    if method in ("parameters", "uniform"):
        return pipeline_stages(len(counts), target.pp, method, layer_params=counts).parts
    try:
        bounds = tuple(int(x) for x in method.split(","))
    except ValueError:
        raise LayoutError(
            f"pp_partition={target.pp_partition!r}: expected 'parameters', 'uniform' or stage "
            f"boundaries like '0,{len(counts) // 2},{len(counts)}' (pp + 1 layer offsets)"
        ) from None
    try:
        return pipeline_stages(len(counts), target.pp, "explicit", boundaries=bounds).parts
    except LayoutError as exc:
        raise LayoutError(f"pp_partition={target.pp_partition!r}: {exc}") from None


def stage_groups(
    ctx: PlanContext, stage: int, layers: tuple[int, int]
) -> tuple[tuple[str, ...], ...]:
    """A target stage's trainable names per param group (DeepSpeed builds one flat group per
    optimizer param group, so none may be empty)."""
    lo, hi = layers
    groups = [_stage_names(g, lo, hi, ctx.ties) for g in ctx.groups]
    first = next((g[0] for g in groups if g), None)
    if first is None:
        raise LayoutError(
            f"{ctx.manifest.root}: target pipeline stage {stage} (layers {lo}..{hi - 1}) holds "
            f"no trainable parameter at pp={ctx.target.pp}; choose a smaller pp"
        )
    ctx.entry(first, ROLE_FP32)
    kept = tuple(g for g in groups if g)
    if len(kept) != len(groups):
        raise LayoutError(
            f"{ctx.manifest.root}: target pipeline stage {stage} would hold parameters of "
            f"only {len(kept)} of the {len(groups)} optimizer param groups; "
            "such a layout is not supported"
        )
    return kept


def stage_buffers(ctx: PlanContext, layers: tuple[int, int]) -> list[str]:
    """A stage's buffer names (its model file lists them; the module itself is in the layer
    files)."""
    lo, hi = layers
    return [n for n in ctx.buffers if _in_stage(n, lo, hi, ctx.ties)]


def layer_file_name(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def _entry_layers(e: Any, ties: Mapping[str, Any]) -> tuple[int, ...]:
    """The layer files holding a parameter or buffer: its own layer, or (a tied module) the file
    of each of its uses without a forward_fn."""
    if e.name.startswith(TIED_PREFIX):
        return tuple(ties[e.name[len(TIED_PREFIX) :].split(".", 1)[0]]["module_layers"])
    return (e.pieces[0].layer,) if e.pieces[0].layer is not None else ()


def file_layers(ctx: PlanContext) -> tuple[int, ...]:
    """Every layer with a file at the target: those holding a parameter or buffer, and modules
    without any (activations, dropout): an empty state dict, which DeepSpeed's load_state_dir
    requires."""

    def make() -> tuple[int, ...]:
        known = ctx.manifest.extra.get("pipeline_layers") or {}
        out = set(known.get("module_layers", ()))
        for e in ctx.manifest.tensors:
            if e.role in (ROLE_PARAM, ROLE_BUFFER) and e.pieces:
                out.update(_entry_layers(e, ctx.ties))
        return tuple(sorted(out))

    return ctx._memo("file_layers", make)


def layer_files(ctx: PlanContext, rank: RankPlan, sel: _Selection) -> list[TargetFile]:
    """The pipeline layer files of one stage and tp rank (those ``sel`` wants): each a plain
    state dict of the layer (weights as stored, buffers), keyed by global layer index."""
    assert rank.layers is not None
    lo, hi = rank.layers
    wanted = {
        x for x in file_layers(ctx) if lo <= x < hi and sel.wants(layer_file_name(x, rank.mp))
    }
    by_layer: dict[int, list[TensorFill]] = {x: [] for x in wanted}
    for e in ctx.manifest.tensors:
        if e.role not in (ROLE_PARAM, ROLE_BUFFER) or not e.pieces:
            continue
        shape = ctx.local_shape(e)
        for layer in (x for x in _entry_layers(e, ctx.ties) if x in wanted):
            copies = ctx.res.copies(e, rank.mp, 0, math.prod(shape), 0)
            by_layer[layer].append(TensorFill(e.pieces[0].key, e.dtype, shape, tuple(copies)))
    return [
        TargetFile(layer_file_name(layer, rank.mp), tuple(fills))
        for layer, fills in sorted(by_layer.items())
    ]


# --------------------------------------------------------------------------------------------
# read side: layer files -> module parameters and buffers of each stage; the layer record


def read_ties(b: _Builder, sidecar: Sidecar | None) -> None:
    """Our sidecar's record of the tied modules and the source's stage boundaries, which the
    checkpoint itself does not hold."""
    record = (sidecar.extra.get("pipeline") if sidecar is not None else None) or {}
    if record.get("ties") and record.get("parts"):
        b.ties = {str(k): dict(v) for k, v in record["ties"].items()}
        b.src_parts = [int(x) for x in record["parts"]]


def layer_params(
    b: _Builder,
    sd: Mapping[str, Any],
    tp_rank: int,
    pp_stage: int,
    buffer_names: list[str],
) -> dict[str, tuple[str, KeyPath, TensorRef, int | None]]:
    """name -> (file, key path, tensor, layer) for every parameter of one stage's layer files
    (``<layer>.<name>``, or ``tied_modules.<key>.<name>``); records buffers."""
    out: dict[str, tuple[str, KeyPath, TensorRef, int | None]] = {}
    buffers = set(buffer_names)
    layer_ids = sorted({layer for layer, _ in b.files.layers})
    for layer in _stage_layers(b, sd, layer_ids, buffer_names):
        if (layer, tp_rank) not in b.files.layers:
            raise CheckpointError(
                f"{b.path(layer_file_name(layer, tp_rank))}: missing shard "
                f"(pipeline stage {pp_stage} holds layer {layer})"
            )
        lfile = b.files.layers[(layer, tp_rank)]
        lsd = b.load(lfile)
        tie = next((k for k, t in b.ties.items() if layer in t.get("module_layers", ())), None)
        for local, tensor in lsd.items():
            if not is_tensor(tensor):
                continue
            name = f"{layer}.{local}" if tie is None else f"{TIED_PREFIX}{tie}.{local}"
            if name in buffers:
                _whole(
                    b, name, ROLE_BUFFER, None, lfile, (local,), tensor, tp_rank, pp_stage, layer
                )
            else:
                out[name] = (lfile, (local,), tensor, layer)
    return out


def _stage_layers(
    b: _Builder, sd: Mapping[str, Any], layer_ids: list[int], buffer_names: list[str]
) -> list[int]:
    """Which pipeline layers a stage holds, from its param_shapes / buffers / optimizer."""
    owned: set[int] = set()
    for group in sd.get("param_shapes") or []:
        owned.update(int(n.split(".", 1)[0]) for n in group if not n.startswith(TIED_PREFIX))
        tied = {n.split(".", 2)[1] for n in group if n.startswith(TIED_PREFIX)}
        if tied and owned:
            # the tie's module layers inside this stage's range (our sidecar's record)
            stage = next(i for i in range(len(b.src_parts) - 1) if b.src_parts[i + 1] > min(owned))
            lo, hi = b.src_parts[stage], b.src_parts[stage + 1]
            for key in tied:
                owned.update(x for x in b.ties[key].get("module_layers", ()) if lo <= x < hi)
    owned.update(int(n.split(".", 1)[0]) for n in buffer_names if n.split(".", 1)[0].isdigit())
    opt = sd.get("optimizer")
    if not owned and not opt:
        raise CheckpointError(
            f"{b.tag_dir}: cannot tell which pipeline layers each stage holds (no param_shapes, "
            "buffers or optimizer state); add a lightning_reshape.json sidecar"
        )
    if opt and not sd.get("param_shapes"):
        return _zero0_stage_layers(b, opt, layer_ids, buffer_names)
    return sorted(owned)


def _zero0_stage_layers(
    b: _Builder, opt: Mapping[str, Any], layer_ids: list[int], buffer_names: list[str]
) -> list[int]:
    """ZeRO 0: stages hold contiguous runs of layers in order and the stage's optimizer lists
    its parameters; take the run after the previous stage's whose count matches."""
    inner = opt.get("optimizer_state_dict", opt)
    n_params = sum(len(g["params"]) for g in inner.get("param_groups") or [])
    start = b.next_layer
    buffers = set(buffer_names)
    run, total = [], 0
    for layer in (x for x in layer_ids if x >= start):
        if total == n_params and run:
            break
        if (layer, 0) not in b.files.layers:
            raise CheckpointError(
                f"{b.path(f'layer_{layer:02d}-model_00-model_states.pt')}: missing shard"
            )
        lsd = b.load(b.files.layers[(layer, 0)])
        run.append(layer)
        total += sum(1 for k, v in lsd.items() if is_tensor(v) and f"{layer}.{k}" not in buffers)
    if total != n_params:
        raise CheckpointError(
            f"{b.tag_dir}: cannot match pipeline layers to stages from the optimizer state; "
            "add a lightning_reshape.json sidecar"
        )
    b.next_layer = run[-1] + 1 if run else start
    return run


def pipeline_layers(f: _Files, sidecar: Sidecar | None) -> dict[str, Any]:
    """Which pipeline layers are modules (DeepSpeed writes a layer file for each, parameters or
    not, and expects each at load) and how many layers the list holds (functions after the
    last module are only known from our sidecar)."""
    modules = {layer for layer, _ in f.layers}
    record = (sidecar.extra.get("pipeline") if sidecar is not None else None) or {}
    modules.update(int(x) for x in record.get("module_layers", ()))
    count = max(modules) + 1 if modules else 0
    count = max(count, int(record.get("num_layers", 0) or 0))
    ties = {
        str(k): {"layers": tuple(v.get("layers", ())), "module_layers": tuple(v["module_layers"])}
        for k, v in (record.get("ties") or {}).items()
    }
    return {"module_layers": tuple(sorted(modules)), "num_layers": count, "ties": ties}


def refuse_tied_modules(b: _Builder, file: str, param_shapes: Any) -> None:
    """Pipeline ``TiedLayerSpec`` modules are saved once, in the layer file of their first use,
    but held (and optimized) by every stage that uses them; which stages those are is not in the
    checkpoint, so no target layout can be derived: refuse rather than guess."""
    tied = sorted({n for g in param_shapes or [] for n in g if str(n).startswith(TIED_PREFIX)})
    if tied:
        raise CheckpointError(
            f"{b.path(file)}: pipeline parameters {tied[:3]} belong to TiedLayerSpec modules; "
            "the checkpoint does not record which stages use a tied module, so it cannot be "
            "reshaped (pipeline models without tied layers can; checkpoints saved by "
            "ReshapeDeepSpeedStrategy record the ties in their sidecar)"
        )


# --------------------------------------------------------------------------------------------
# layout: stage boundaries as PipelineModule's partition methods draw them
# --------------------------------------------------------------------------------------------


def partition_uniform(num_items: int, num_parts: int) -> tuple[int, ...]:
    """Bounds cutting ``num_items`` into ``num_parts`` runs as DeepSpeed's ``partition_uniform``:
    sizes differ by at most one, the larger ones first; with fewer items than parts, one item per
    part and empty parts at the end."""
    _check_degree("num_parts", num_parts)
    if num_items < 0:
        raise LayoutError(f"num_items={num_items} must be >= 0.")
    return tuple(uniform_boundaries(num_items, num_parts))


def partition_balanced(weights: Sequence[int], num_parts: int) -> tuple[int, ...]:
    """Bounds cutting ``weights`` into ``num_parts`` non-empty runs as DeepSpeed's
    ``partition_balanced``: minimise (heaviest run - lightest run); among equally good cuts the
    one found last wins (the last run as short as possible, then the one before, ...). Falls back
    to :func:`partition_uniform` when there are no more items than parts. O(n^2 * parts)."""
    _check_degree("num_parts", num_parts)
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    prefix = bounds_from_sizes([int(w) for w in weights]) if all(w >= 0 for w in weights) else None
    if prefix is None:
        raise LayoutError("layer weights must be >= 0 (trainable parameter counts).")
    # best[j][i] = (cost, heaviest, lightest, cut) for the first i items in j runs, or None.
    best: list[list[tuple[int, int, int | None, int] | None]] = [
        [None] * (n + 1) for _ in range(m + 1)
    ]
    best[0][0] = (0, 0, None, 0)
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            chosen = None
            for k in range(i):
                prev = best[j - 1][k]
                if prev is None:
                    continue
                run = prefix[i] - prefix[k]
                heaviest = max(prev[1], run)
                lightest = run if prev[2] is None else min(prev[2], run)
                cost = heaviest - lightest
                if chosen is None or chosen[0] >= cost:
                    chosen = (cost, heaviest, lightest, k)
            best[j][i] = chosen
    parts = [n]
    for j in range(m, 0, -1):
        entry = best[j][parts[-1]]
        assert entry is not None  # n > m makes every state on the way back reachable
        parts.append(entry[3])
    return tuple(reversed(parts))


@dataclass(frozen=True)
class PipelineStages:
    """Which layers each pipeline stage owns: stage ``s`` has layers ``parts[s]:parts[s + 1]``
    (DeepSpeed's ``PipelineModule.parts``)."""

    parts: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.parts) - 1

    @property
    def num_layers(self) -> int:
        return self.parts[-1]

    def layers(self, stage: int) -> range:
        """Global indices of the layers of ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise LayoutError(f"stage={stage} is outside 0..{self.num_stages - 1}.")
        return range(self.parts[stage], self.parts[stage + 1])

    def stage_of(self, layer: int) -> int:
        """The stage owning global layer index ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise LayoutError(f"layer={layer} is outside 0..{self.num_layers - 1}.")
        for s in range(self.num_stages):
            if layer < self.parts[s + 1]:
                return s
        raise AssertionError("unreachable")


def pipeline_stages(
    num_layers: int,
    pp: int,
    method: Literal["uniform", "parameters", "explicit"] = "parameters",
    *,
    layer_params: Sequence[int] | None = None,
    boundaries: Sequence[int] | None = None,
) -> PipelineStages:
    """The stage boundaries of a ``PipelineModule`` with ``num_layers`` layer specs at ``pp``.

    ``method`` is DeepSpeed's ``partition_method``: ``"uniform"`` (equal layer counts) or
    ``"parameters"`` (balanced by ``layer_params``, the trainable parameter count of each layer,
    DeepSpeed's default); ``"explicit"`` takes ``boundaries`` (``pp + 1`` sorted offsets from 0 to
    ``num_layers``) as given. DeepSpeed's ``"type:REGEX"`` is :func:`partition_balanced` over 0/1
    weights marking the matching layers.
    """
    _check_degree("pp", pp)
    if num_layers < 0:
        raise LayoutError(f"num_layers={num_layers} must be >= 0.")
    method_l = method.lower()
    if method_l == "uniform":
        parts = partition_uniform(num_layers, pp)
    elif method_l == "parameters":
        if layer_params is None or len(layer_params) != num_layers:
            got = None if layer_params is None else len(layer_params)
            raise LayoutError(
                f"method='parameters' needs layer_params with one count per layer "
                f"({num_layers}), got {got}."
            )
        parts = partition_balanced(layer_params, pp)
    elif method_l == "explicit":
        if boundaries is None:
            raise LayoutError("method='explicit' needs boundaries=(0, ..., num_layers).")
        parts = tuple(int(b) for b in boundaries)
        if len(parts) != pp + 1 or parts[0] != 0 or parts[-1] != num_layers:
            raise LayoutError(
                f"boundaries={parts!r} must hold pp + 1 = {pp + 1} offsets from 0 to "
                f"num_layers={num_layers}."
            )
        _check_bounds("boundaries", parts)
    else:
        raise LayoutError(
            f"method={method!r} is not one of 'uniform', 'parameters', 'explicit'; for "
            "DeepSpeed's 'type:REGEX' pass 0/1 weights to partition_balanced."
        )
    return PipelineStages(parts)
