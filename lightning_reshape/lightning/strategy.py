"""ReshapeDeepSpeedStrategy: Lightning's DeepSpeed strategy plus a parallel layout and reshaping.

Why a subclass: Lightning's strategy builds no model-parallel groups, never hands DeepSpeed an
``mpu``, samples data over the whole world, refuses CPU, and cannot resume a checkpoint saved
at another (tp, pp, dp). This class changes exactly those places and leaves the rest to
Lightning and DeepSpeed. The resume path is in ``load_checkpoint`` (design.md, "The path of
one resume"): the engine already exists at the new layout, so the saved layout is compared
with it there, and a reshaped copy is written beside the original before DeepSpeed loads it.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn import Module
from torch.optim import Optimizer

from lightning_reshape.checkpoint.reader import MODEL_RE, Z3_MODEL_RE, resolve_checkpoint
from lightning_reshape.checkpoint.safe_load import safe_load
from lightning_reshape.checkpoint.sidecar import Sidecar, TPSplit, read_sidecar, write_sidecar
from lightning_reshape.errors import CheckpointError, ReshapeError, TopologyError
from lightning_reshape.lightning.callback import ReshapePolicy, find_policy
from lightning_reshape.topology import ParallelConfig, ParallelLayout

__all__ = ["ReshapeDeepSpeedStrategy", "SavedTopology", "ResumeReport", "read_saved_topology"]

RESHAPED_PREFIX = "reshaped-"
_T = TypeVar("_T")


@dataclass(frozen=True)
class SavedTopology:
    """The layout a checkpoint was saved at, and where we learned it."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    source: str  # "sidecar" | "deepspeed"

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp}"


@dataclass(frozen=True)
class ResumeReport:
    """What the last ``load_checkpoint`` did; tests and logs read it."""

    checkpoint: str
    saved: SavedTopology
    current: SavedTopology
    reshaped: bool
    seconds: float
    loaded_from: str

    def __str__(self) -> str:
        """One readable line, e.g. for a log or a summary file."""
        saved = f"{self.saved.describe()} (ZeRO {self.saved.zero_stage})"
        current = f"{self.current.describe()} (ZeRO {self.current.zero_stage})"
        if not self.reshaped:
            return (
                f"resumed {self.checkpoint} at its saved layout {saved} in {self.seconds:.1f} s; "
                "no reshape needed"
            )
        how = "loaded directly" if self.loaded_from == self.checkpoint else "reshaped"
        where = "" if self.loaded_from == self.checkpoint else f", loaded from {self.loaded_from}"
        return (
            f"resumed {self.checkpoint} saved at {saved} at {current}: {how} in "
            f"{self.seconds:.1f} s{where}"
        )


def read_saved_topology(
    checkpoint_path: str | os.PathLike[str], *, trust_checkpoint: bool = False
) -> SavedTopology:
    """The saved (tp, pp, dp, ZeRO stage), as cheaply as possible.

    The sidecar is a few hundred bytes of JSON; without it (a checkpoint of Lightning's plain
    DeepSpeedStrategy) one model-states file is opened memory-mapped for DeepSpeed's own
    ``dp_world_size`` / ``checkpoint_parallel_dimensions`` / ``ds_config``; no shard is read.
    """
    loc = resolve_checkpoint(checkpoint_path)
    sidecar = read_sidecar(loc.tag_dir)
    if sidecar is not None:
        return SavedTopology(sidecar.tp, sidecar.pp, sidecar.dp, sidecar.zero_stage, "sidecar")
    names = sorted(os.listdir(loc.tag_dir))
    first = next((n for n in names if MODEL_RE.match(n)), None)
    if first is None:
        first = next((n for n in names if Z3_MODEL_RE.match(n)), None)
    if first is None:
        raise CheckpointError(
            f"{loc.tag_dir}: no mp_rank_*_model_states.pt file; the save is incomplete or this is "
            "a pipeline-engine checkpoint, which needs a lightning_reshape.json sidecar"
        )
    meta = safe_load(os.path.join(loc.tag_dir, first), trust_checkpoint=trust_checkpoint)
    dims = meta.get("checkpoint_parallel_dimensions") or {}
    mp = int(meta.get("mp_world_size", 1) or 1)
    tp = int(dims.get("tp_degree", 0) or mp)
    pp = int(dims.get("pp_degree", 0) or max(1, mp // tp))
    zero = (meta.get("ds_config") or {}).get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0) if isinstance(zero, Mapping) else 0
    return SavedTopology(tp, pp, int(meta.get("dp_world_size", 1) or 1), stage, "deepspeed")


class ReshapeDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed with a declared parallel layout, CPU support, and resume at another layout.

    Args:
        parallel: the layout (``ParallelConfig``, a mapping of its fields, or None for pure
            data parallelism), resolved against the world size in ``setup_environment``.
        **kwargs: everything :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` takes.
    """

    strategy_name = "deepspeed_reshape"

    def __init__(
        self, *args: Any, parallel: ParallelConfig | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if parallel is None:
            parallel = ParallelConfig()
        elif isinstance(parallel, Mapping):
            parallel = ParallelConfig(**dict(parallel))
        elif not isinstance(parallel, ParallelConfig):
            raise TopologyError(
                f"parallel={parallel!r} is neither a ParallelConfig nor a mapping; pass e.g. "
                "parallel={'tp': 2} or ParallelConfig(tp=2)"
            )
        self.parallel = parallel
        self.layout: ParallelLayout | None = None
        self.parallel_state: Any = None
        self.last_resume: ResumeReport | None = None

    # ---------------------------------------------------------------- environment, groups

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        from lightning_reshape.lightning.precheck import install_precheck

        install_precheck(self)  # layout and ckpt_path checked before any process starts

    def setup_environment(self) -> None:
        # Lightning's DeepSpeedStrategy refuses anything but CUDA here; DeepSpeed itself runs on
        # CPU with gloo, so only the CUDA check is skipped (DDP's set-up still runs).
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_environment()
        else:
            DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            super().setup_distributed()  # validates device indices, inits deepspeed's comm
        else:
            # CPU devices carry no index, so Lightning's index check cannot apply.
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
        # Lightning's DDP destroys its process groups at exit; deepspeed.init_distributed does
        # not, and gloo groups torn down during interpreter shutdown can abort the process.
        from lightning.fabric.utilities.distributed import _destroy_dist_connection

        atexit.register(_destroy_dist_connection)
        layout = self.parallel.resolve(self.world_size)
        # Groups outlive teardown on purpose: Trainer.save_checkpoint after fit still needs
        # them (as DDP keeps its world group); a second fit on the same layout reuses them.
        if self.parallel_state is None or self.layout != layout:
            self.parallel_state = self._build_parallel_state(layout)
        self.layout = layout
        rank_zero_info(f"lightning-reshape: layout {self.layout.describe()}")

    def _build_parallel_state(self, layout: ParallelLayout) -> Any:
        """This rank's groups (collective: every rank builds its own), DeepSpeed's ``mpu``."""
        from lightning_reshape.distributed import ParallelState

        return ParallelState.build(layout, rank=self.global_rank, timeout=self._timeout)

    @property
    def mpu(self) -> Any:
        """What DeepSpeed receives as ``mpu``: the strategy's ParallelState."""
        return self.parallel_state

    @property
    def dp_rank(self) -> int:
        """This rank's coordinate on the data-parallel axis."""
        assert self.layout is not None
        return self.layout.group_of(self.global_rank, "dp").index(self.global_rank)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        # Ranks of one tensor/pipeline group must see the same samples: shard over dp only.
        if self.layout is None:
            return super().distributed_sampler_kwargs
        return {"num_replicas": self.layout.dp, "rank": self.dp_rank}

    @property
    def current_zero_stage(self) -> int:
        assert isinstance(self.config, dict)
        zero = self.config.get("zero_optimization")
        return int(zero.get("stage", 0) or 0) if isinstance(zero, Mapping) else 0

    def current_topology(self) -> SavedTopology:
        assert self.layout is not None
        layout = self.layout
        return SavedTopology(layout.tp, layout.pp, layout.dp, self.current_zero_stage, "current")

    # ---------------------------------------------------------------- deepspeed.initialize

    def _ds_args(self) -> argparse.Namespace:
        # DeepSpeed compares device_rank with 0; a CPU device has no index, so use local_rank.
        index = self.root_device.index
        return argparse.Namespace(device_rank=self.local_rank if index is None else index)

    def _setup_model_and_optimizer(
        self,
        model: Module,
        optimizer: Optimizer | None,
        lr_scheduler: Any = None,
    ) -> tuple[Any, Optimizer]:
        import deepspeed

        self._refuse_pipeline()

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=self._ds_args(),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            mpu=self.mpu,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _refuse_pipeline(self) -> None:
        """DeepSpeed's pipeline engine needs a PipelineModule and its own grid (mpu=None)."""
        if self.layout is not None and self.layout.pp > 1:
            raise TopologyError(
                f"pp={self.layout.pp}: this strategy does not drive DeepSpeed's pipeline engine "
                "(PipelineModule) yet; set pp=1 (tp and dp may change freely), or convert a "
                "pipeline checkpoint offline with `lightning-reshape convert`"
            )

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        self._refuse_pipeline()

        assert isinstance(self.config, dict)
        # Timers need a micro batch size; precision and ZeRO-3 partitioning follow training's.
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                config[key] = self.config[key]
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        engine, _, _, _ = deepspeed.initialize(
            args=self._ds_args(),
            config=config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            mpu=self.mpu,
            dist_init_required=False,
        )
        self.model = engine

    def _set_deepspeed_activation_checkpointing(self) -> None:
        import deepspeed

        assert isinstance(self.config, dict)
        settings = self.config.get("activation_checkpointing")
        if not settings:
            return
        # Partitioned activations are split over the tensor-parallel group: DeepSpeed needs it.
        deepspeed.checkpointing.configure(
            mpu_=self.mpu,
            partition_activations=settings.get("partition_activations"),
            contiguous_checkpointing=settings.get("contiguous_memory_optimization"),
            checkpoint_in_cpu=settings.get("cpu_checkpointing"),
            profile=settings.get("profile"),
        )

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        import deepspeed

        self._init_config_if_needed()
        # ZeRO-3 partitions each parameter over the data-parallel group, not the world.
        with deepspeed.zero.Init(
            enabled=self.zero_stage_3,
            remote_device=self.remote_device,
            config_dict_or_path=self.config,
            mpu=self.mpu,
        ):
            yield

    # ---------------------------------------------------------------- save

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """DeepSpeed's save, then our sidecar: layout, ZeRO stage, each parameter's tp split."""
        filepath = self.broadcast(filepath)
        super().save_checkpoint(checkpoint, filepath, storage_options)
        sidecar = self._sidecar()
        self.barrier("lightning_reshape_sidecar")  # every shard is on disk before the record
        if self.is_global_zero:
            write_sidecar(os.path.join(os.fspath(filepath), "checkpoint"), sidecar)
        self.barrier("lightning_reshape_sidecar_written")

    def _sidecar(self) -> Sidecar:
        assert self.layout is not None
        splits: dict[str, TPSplit | None] = {}
        for name, param in self.deepspeed_engine.module.named_parameters():
            # Recorded at tp=1 too: the tensor is whole then, but a later tp>1 must know the cut.
            if getattr(param, "tensor_model_parallel", False):
                stride = int(getattr(param, "partition_stride", 1))
                splits[name] = TPSplit(dim=int(param.partition_dim), stride=stride)
            else:
                splits[name] = None
        layout = self.layout
        return Sidecar(
            tp=layout.tp,
            pp=layout.pp,
            dp=layout.dp,
            zero_stage=self.current_zero_stage,
            tp_splits=splits,
            extra={"world_size": layout.world_size, "order": layout.order, "cp": layout.cp},
        )

    # ---------------------------------------------------------------- load

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load as DeepSpeed does when the layout is unchanged; otherwise reshape first."""
        if self.load_full_weights and self.zero_stage_3:
            return super().load_checkpoint(checkpoint_path, weights_only)
        checkpoint_path = os.path.abspath(os.fspath(self.broadcast(checkpoint_path)))
        policy, _ = find_policy(self._callbacks())
        start = time.perf_counter()
        saved = read_saved_topology(checkpoint_path, trust_checkpoint=policy.trust_checkpoint)
        current = self.current_topology()
        if _same(saved, current):
            client_state = super().load_checkpoint(checkpoint_path, weights_only)
            self.last_resume = ResumeReport(
                checkpoint_path, saved, current, False, time.perf_counter() - start, checkpoint_path
            )
            return client_state
        if not policy.enabled:
            raise ReshapeError(
                f"{checkpoint_path}: saved at {saved.describe()} (ZeRO {saved.zero_stage}), "
                f"this run is {current.describe()} (ZeRO {current.zero_stage}) and "
                "AutoReshape(enabled=False) forbids reshaping; enable it, or resume with "
                f"parallel={{'tp': {saved.tp}, 'pp': {saved.pp}}} on "
                f"{saved.tp * saved.pp * saved.dp} devices"
            )
        if policy.direct and self._direct_possible(saved, current):
            return self._load_direct(checkpoint_path, saved, current, policy, start)
        target = self._reshaped_dir(checkpoint_path, current, policy)
        reused = self._reshape(checkpoint_path, target, current, policy)
        seconds = time.perf_counter() - start
        zero_note = ""
        if saved.zero_stage != current.zero_stage:
            zero_note = f" (ZeRO {current.zero_stage})"
        size = _human_bytes(_disk_usage(target)) if self.is_global_zero else ""
        if reused:
            done = f"reusing the reshaped copy made earlier, {target} ({size} on disk)"
        else:
            done = f"reshaped in {seconds:.1f} s into {target} ({size} on disk)"
        rank_zero_info(
            f"lightning-reshape: checkpoint {checkpoint_path} saved at {saved.describe()} "
            f"(ZeRO {saved.zero_stage}), resuming at {current.describe()}{zero_note}: {done}"
        )
        client_state = self._engine_load(target)
        self.last_resume = ResumeReport(checkpoint_path, saved, current, True, seconds, target)
        if not policy.keep_old and self.is_global_zero:
            removed, freed = _delete_other_copies(target)
            if removed:
                rank_zero_info(
                    f"lightning-reshape: removed {removed} older reshaped "
                    f"cop{'y' if removed == 1 else 'ies'} beside it ({_human_bytes(freed)} freed; "
                    "AutoReshape(keep_old=True) keeps them, output_dir=... puts copies elsewhere)"
                )
        self.barrier("lightning_reshape_loaded")
        return client_state

    def _direct_possible(self, saved: SavedTopology, current: SavedTopology) -> bool:
        """A dp-only change under the same ZeRO 1/2 stage, on a plain ZeRO optimizer."""
        from lightning_reshape.checkpoint.direct import direct_unsupported_reason

        if (saved.tp, saved.pp, saved.zero_stage) != (current.tp, current.pp, current.zero_stage):
            return False
        if current.pp != 1 or current.zero_stage not in (1, 2):
            return False
        return direct_unsupported_reason(self.deepspeed_engine) is None

    def _load_direct(
        self,
        checkpoint_path: str,
        saved: SavedTopology,
        current: SavedTopology,
        policy: ReshapePolicy,
        start: float,
    ) -> dict[str, Any]:
        """Path (b): DeepSpeed loads the module, each rank fills its own ZeRO partitions from
        the slices of the source it owns (checkpoint/direct.py); no copy is written."""
        from lightning_reshape.checkpoint.direct import load_direct
        from lightning_reshape.checkpoint.reader import read_manifest

        assert self.lightning_module is not None
        manifest = self._on_all(
            lambda: read_manifest(
                checkpoint_path,
                trust_checkpoint=policy.trust_checkpoint,
                tp_rules=policy.tp_rules or (),
            ),
            checkpoint_path,
            current,
        )
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        client_state = self._on_all(
            lambda: load_direct(
                self.deepspeed_engine,
                checkpoint_path,
                load_optimizer_states=fitting,
                load_module_strict=self.lightning_module.strict_loading,
                tp_rank=self.mpu.get_model_parallel_rank(),
                manifest=manifest,
            ),
            checkpoint_path,
            current,
        )
        seconds = time.perf_counter() - start
        rank_zero_info(
            f"lightning-reshape: checkpoint {checkpoint_path} saved at {saved.describe()} "
            f"(ZeRO {saved.zero_stage}), resuming at {current.describe()}: loaded directly in "
            f"{seconds:.1f} s (no copy written)"
        )
        self.last_resume = ResumeReport(
            checkpoint_path, saved, current, True, seconds, checkpoint_path
        )
        self.barrier("lightning_reshape_loaded")
        return client_state

    def _callbacks(self) -> list[Any]:
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        return list(trainer.callbacks) if trainer is not None else []

    def _reshaped_dir(
        self, checkpoint_path: str, current: SavedTopology, policy: ReshapePolicy
    ) -> str:
        c = current
        name = f"{RESHAPED_PREFIX}tp{c.tp}-pp{c.pp}-dp{c.dp}-zero{c.zero_stage}"
        if policy.output_dir is None:
            return os.path.join(checkpoint_path, name)
        return os.path.join(os.path.abspath(policy.output_dir), Path(checkpoint_path).name, name)

    def _reshape(
        self, source: str, target: str, current: SavedTopology, policy: ReshapePolicy
    ) -> bool:
        """Write the reshaped copy at ``target``, every rank writing its share of the files.

        Returns True when a complete copy of the same plan was already there (reused as is).

        Plan on every rank (metadata only), rank 0 prepares the partial folder, each rank
        executes ``plan.shard(rank, world)``, rank 0 renames the folder into place. An error on
        any rank is raised on every rank, so nobody waits forever at a barrier.
        """
        from lightning_reshape.checkpoint import convert

        plan = self._on_all(
            lambda: convert.plan_conversion(
                source,
                tp=current.tp,
                pp=current.pp,
                dp=current.dp,
                zero_stage=current.zero_stage,
                trust=policy.trust_checkpoint,
                tp_rules=policy.tp_rules,
            ),
            source,
            current,
        )
        tag = plan.source_tag
        prepared = self._on_zero(lambda: convert.prepare_output(plan, target, tag), source, current)
        part, complete = prepared
        if not complete:
            mine = plan.shard(self.global_rank, self.world_size)
            self._on_all(
                lambda: convert.execute_plan(
                    plan, part, only_files=mine, workers=max(1, policy.workers)
                ),
                source,
                current,
            )

        def finish() -> None:
            if not complete:
                convert.finalize_output(plan, target, tag, latest=True)
                if policy.verify:
                    from lightning_reshape.checkpoint.verify import verify

                    diffs = verify(source, target, trust=policy.trust_checkpoint, limit=5)
                    if diffs:
                        raise CheckpointError(
                            f"{target}: reshaped copy differs from the original: "
                            + "; ".join(diffs)
                        )
            convert.copy_recovery_script(target)
            latest = os.path.join(target, "latest")
            if not os.path.isfile(latest):
                tmp = f"{latest}.tmp"
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(tag)
                os.replace(tmp, latest)

        self._on_zero(finish, source, current)
        return bool(complete)

    def _on_all(self, fn: Callable[[], _T], source: str, current: SavedTopology) -> _T:
        """Run ``fn`` on every rank; if any rank fails, every rank raises its message."""
        result: Any = None
        error: str | None = None
        try:
            result = fn()
        except ReshapeError as exc:
            error = str(exc)
        errors: list[str | None] = [None] * self.world_size
        torch.distributed.all_gather_object(errors, error)
        self._raise_first(errors, source, current)
        return result

    def _on_zero(self, fn: Callable[[], _T], source: str, current: SavedTopology) -> _T:
        """Run ``fn`` on global rank 0 and hand its result (or its error) to every rank."""
        payload: tuple[Any, str | None] = (None, None)
        if self.is_global_zero:
            try:
                payload = (fn(), None)
            except ReshapeError as exc:
                payload = (None, str(exc))
        result, error = self.broadcast(payload)
        self._raise_first([error], source, current)
        return result

    @staticmethod
    def _raise_first(errors: list[str | None], source: str, current: SavedTopology) -> None:
        first = next((e for e in errors if e is not None), None)
        if first is not None and "TPRule(" in first:
            first += "; in Lightning pass such rules as AutoReshape(tp_rules=[...])"
        if first is not None:
            raise ReshapeError(
                f"cannot resume {source} at {current.describe()} (ZeRO {current.zero_stage}): "
                f"{first}"
            )

    def _engine_load(self, save_dir: str) -> dict[str, Any]:
        assert self.lightning_module is not None
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        _, client_state = self.deepspeed_engine.load_checkpoint(
            save_dir,
            load_optimizer_states=fitting,
            load_lr_scheduler_states=False,
            load_module_strict=self.lightning_module.strict_loading,
        )
        if client_state is None:
            raise CheckpointError(f"{save_dir}: DeepSpeed could not load the reshaped copy")
        return client_state

    # ---------------------------------------------------------------- registry

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Our names only (the inherited method would re-register Lightning's ``deepspeed*``)."""
        variants: dict[str, tuple[str, dict[str, Any]]] = {
            "deepspeed_reshape": ("DeepSpeed (ZeRO 2) with a parallel layout and reshape", {}),
            "deepspeed_reshape_stage_1": ("... ZeRO stage 1", {"stage": 1}),
            "deepspeed_reshape_stage_2": ("... ZeRO stage 2", {"stage": 2}),
            "deepspeed_reshape_stage_2_offload": (
                "... ZeRO stage 2, optimizer offloaded to CPU",
                {"stage": 2, "offload_optimizer": True},
            ),
            "deepspeed_reshape_stage_3": ("... ZeRO stage 3", {"stage": 3}),
            "deepspeed_reshape_stage_3_offload": (
                "... ZeRO stage 3, parameters and optimizer offloaded to CPU",
                {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
            ),
        }
        for name, (description, params) in variants.items():
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, **params)


def _same(a: SavedTopology, b: SavedTopology) -> bool:
    return (a.tp, a.pp, a.dp, a.zero_stage) == (b.tp, b.pp, b.dp, b.zero_stage)


def _delete_other_copies(keep: str) -> tuple[int, int]:
    """Remove sibling ``reshaped-*`` copies we wrote earlier; never the original checkpoint.

    Returns (copies removed, bytes freed)."""
    parent = os.path.dirname(keep)
    removed, freed = 0, 0
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(RESHAPED_PREFIX) and path != keep and os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "latest")):
                size = _disk_usage(path)
                shutil.rmtree(path, ignore_errors=True)
                removed, freed = removed + 1, freed + size
    return removed, freed


def _disk_usage(path: str) -> int:
    """Bytes the files under ``path`` occupy on disk (allocated blocks, as ``du`` counts)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
