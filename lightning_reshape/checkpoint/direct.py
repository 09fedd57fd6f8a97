"""Load a checkpoint at another layout straight into a live DeepSpeed engine: no copy on disk.

Why: the copy path writes a whole reshaped checkpoint beside the original and DeepSpeed reads it
back (twice the IO, twice the disk). Here the same :class:`Plan` feeds a second sink: DeepSpeed's
own ``engine.load_checkpoint`` runs unchanged on a private folder of zero-byte placeholders named
as the plan's target files, and the engine's ``checkpoint_engine`` is wrapped so that loading a
placeholder returns :func:`engine_sink.materialize` of that target file, built from the slices
of the source this rank needs. DeepSpeed's name logic (``mp_rank_*``, ``zero_pp_rank_*`` vs
``bf16_zero_pp_rank_*``, ``layer_XX-*`` globs), its loads of every format (ZeRO 0-3,
BF16_Optimizer, pipeline layer files, frozen parameters) and its fragment linking all run as
after loading a reshaped copy, so the state is bit for bit the same.

Files DeepSpeed touches by name on this path (deepspeed 0.19, read for this module):
``engine._get_all_ckpt_names`` (glob of ``*model_states.pt``), ``SDLoaderBase.load``
(``os.path.exists``), ``engine._get_all_zero_checkpoint_names`` (``os.path.exists``),
``PipelineModule.ckpt_layer_path_list`` (glob): names only, so placeholders serve them. Read as
data outside ``checkpoint_engine.load`` only where direct cannot work (see
:func:`direct_unsupported_reason`): a ZeRO 3 load without optimizer states
(``get_fp32_state_dict_from_zero_checkpoint`` opens the files), universal checkpoints (their
``zero/`` folders), NVMe offload (copies ``offloaded_tensors/``) and MoE expert files.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from lightning_reshape.checkpoint.engine_sink import SourceFiles, materialize
from lightning_reshape.checkpoint.execute import check_tag
from lightning_reshape.checkpoint.plan import Plan, TargetFile
from lightning_reshape.errors import CheckpointError

__all__ = ["DIRECT_PREFIX", "direct_unsupported_reason", "load_direct"]

#: name prefix of the private placeholder folders (under the system's temporary directory)
DIRECT_PREFIX = "lightning-reshape-direct-"
#: the tag folder inside one: not the source's tag, which DeepSpeed would glob in (a tag such
#: as ``run[1]`` then matches no file and its load fails an ``assert``)
PLACEHOLDER_TAG = "tag"


def direct_unsupported_reason(engine: Any, *, load_optimizer_states: bool = True) -> str | None:
    """Why DeepSpeed's load on this engine would read checkpoint files other than through its
    ``checkpoint_engine`` (None: the direct load works). Cheap, no IO."""
    if engine.load_universal_checkpoint():
        return "the engine loads universal checkpoints (checkpoint.load_universal)"
    if engine.zero_nvme_offload_optimizer():
        return "NVMe offload of the optimizer (DeepSpeed copies its files from the checkpoint)"
    if getattr(engine, "has_moe_layers", False):
        return "MoE layers (expert files are not planned)"
    if engine.zero_optimization_partition_weights() and not load_optimizer_states:
        return "a ZeRO 3 load without optimizer states (DeepSpeed reads the files itself)"
    return None


class SinkCheckpointEngine(CheckpointEngine):
    """The engine's checkpoint engine, except that placeholder paths load from the plan."""

    def __init__(
        self,
        inner: CheckpointEngine,
        plan: Plan,
        folder: str,
        check_crc: bool,
        plan_file: Callable[[str], Plan] | None = None,
    ) -> None:
        super().__init__()
        self.plan_file = plan_file
        self.inner = inner
        self.name = getattr(inner, "name", None)
        self.plan = plan
        self.folder = os.path.normpath(folder)
        self.files: dict[str, TargetFile] = {
            os.path.normpath(os.path.join(folder, f.name)): f for f in plan.files
        }
        self.checked: set[tuple[Any, ...]] | None = set() if check_crc else None

    def load(self, path: str, map_location: Any = None) -> Any:
        """``materialize`` of the target file at a placeholder path; anything else as before."""
        path = os.path.normpath(os.fspath(path))
        tf = self.files.get(path)
        if tf is not None:
            return materialize(self.plan, tf, SourceFiles(self.plan, self.checked))
        if os.path.dirname(path) != self.folder:
            return self.inner.load(path, map_location=map_location)
        # a file the rank's plan did not predict: planned now, by name, as the copy path would
        name = os.path.basename(path)
        plan = self.plan_file(name) if self.plan_file is not None else None
        tf = next((f for f in plan.files if f.name == name), None) if plan is not None else None
        if plan is None or tf is None:
            raise CheckpointError(
                f"{self.plan.source_root}: DeepSpeed asked for {name}, which the plan to "
                f"{self.plan.target} does not hold; resume with AutoReshape(direct=False)"
            )
        return materialize(plan, tf, SourceFiles(plan, self.checked))

    def create(self, info: Any) -> Any:
        return self.inner.create(info)

    def save(self, state_dict: Any, path: str) -> Any:
        return self.inner.save(state_dict, path)

    def commit(self, info: Any) -> Any:
        return self.inner.commit(info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)


_MODEL_FILE = re.compile(r"^(.*mp_rank_)(\d+)(_model_states\.pt)$")
_LAYER_FILE = re.compile(r"^(layer_\d+-model_)(\d+)(-model_states\.pt)$")


def placeholder_names(plan: Plan) -> list[str]:
    """The plan's files, plus the names DeepSpeed globs beside them: the model-states file of
    every mp rank (``_get_all_ckpt_names`` counts them against the mp world size) and every tp
    rank's file of each planned pipeline layer (``ckpt_layer_path_list``). A plan of one rank's
    files (``convert.plan_rank_load``) thus stands in for the whole tag folder."""
    t = plan.target
    names = dict.fromkeys(f.name for f in plan.files)
    for f in plan.files:
        m = _MODEL_FILE.match(f.name)
        for k in range(t.tp * t.pp) if m else ():
            names.setdefault(f"{m[1]}{k:02d}{m[3]}")
        m = _LAYER_FILE.match(f.name)
        for k in range(t.tp) if m else ():
            names.setdefault(f"{m[1]}{k:02d}{m[3]}")
    return list(names)


def _placeholders(plan: Plan) -> tuple[str, str]:
    """A private folder with ``PLACEHOLDER_TAG/`` holding an empty file per name of
    :func:`placeholder_names`."""
    check_tag(plan.source_tag)
    root = None
    try:
        root = tempfile.mkdtemp(prefix=DIRECT_PREFIX)
        if glob.escape(root) != root:  # DeepSpeed globs in it: "[", "*", "?" match no file
            raise OSError(errno.EINVAL, "the path holds a glob character ([, *, ?)")
        folder = os.path.join(root, PLACEHOLDER_TAG)
        os.mkdir(folder)
        for name in placeholder_names(plan):
            with open(os.path.join(folder, name), "xb"):
                pass
    except OSError as exc:
        # one line, as a ReshapeError: the strategy gathers those from every rank (a raw
        # OSError on one rank left the others waiting in that gather)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        raise CheckpointError(
            f"{plan.source_root}: cannot create the direct load's placeholder folder in "
            f"{tempfile.gettempdir()} ({exc.strerror or exc}); point TMPDIR at a writable "
            "folder, or resume with AutoReshape(direct=False)"
        ) from exc
    return root, folder


def load_direct(
    engine: Any,
    plan: Plan,
    *,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = False,
    load_module_strict: bool = True,
    check_crc: bool = True,
    plan_file: Callable[[str], Plan] | None = None,
) -> dict[str, Any]:
    """Load the source of ``plan`` (planned for this engine's layout) into ``engine``.

    ``plan`` may hold only this rank's files (``convert.plan_rank_load``); ``plan_file`` then
    plans, by name, a file DeepSpeed asks for beyond them.
    Returns DeepSpeed's client state, as ``engine.load_checkpoint`` on the reshaped copy would.
    The engine's checkpoint engine is restored and the placeholder folder removed whatever
    happens.
    """
    reason = direct_unsupported_reason(engine, load_optimizer_states=load_optimizer_states)
    if reason is not None:
        raise CheckpointError(f"{plan.source_root}: cannot load directly: {reason}")
    root, folder = _placeholders(plan)
    original = engine.checkpoint_engine
    engine.checkpoint_engine = SinkCheckpointEngine(original, plan, folder, check_crc, plan_file)
    try:
        _, client_state = engine.load_checkpoint(
            root,
            tag=PLACEHOLDER_TAG,
            load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states,
            load_module_strict=load_module_strict,
        )
    finally:
        engine.checkpoint_engine = original
        shutil.rmtree(root, ignore_errors=True)
    if client_state is None:
        raise CheckpointError(f"{plan.source_root}: DeepSpeed could not load the planned state")
    return client_state
