"""ReshapeDeepSpeedStrategy: Lightning's DeepSpeed strategy plus a parallel layout and reshaping.

Why a subclass: Lightning's strategy builds no model-parallel groups, never hands DeepSpeed an
``mpu``, samples data over the whole world, refuses CPU, and cannot resume a checkpoint saved
at another (tp, pp, dp). This class changes exactly those places and leaves the rest to
Lightning and DeepSpeed. The resume path is in ``load_checkpoint`` (design.md, "The path of
one resume"): the engine already exists at the new layout, so the saved layout is compared
with it there, and a reshaped copy is written beside the original before DeepSpeed loads it.
A LightningModule with ``configure_pipeline`` is trained by DeepSpeed's pipeline engine at any
pp (``lightning/pipeline.py`` says how it fits Lightning's loop).
"""

from __future__ import annotations

import argparse
import atexit
import os
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

from lightning_reshape.checkpoint.copies import disk_usage, hold_in_use, remove_other_copies
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
        partition_method: DeepSpeed's ``PipelineModule`` partition_method ("parameters",
            "uniform", "type:REGEX") for a LightningModule with ``configure_pipeline``.
        micro_batches: micro-batches per step for the pipeline engine; default
            ``Trainer(accumulate_grad_batches)``. Each step's batch is cut into this many.
        topology: a DeepSpeed ``ProcessTopology`` (axes pipe, data, model) instead of
            ``parallel``; the pipeline is then built on it.
        **kwargs: everything :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` takes.
    """

    strategy_name = "deepspeed_reshape"

    def __init__(
        self,
        *args: Any,
        parallel: ParallelConfig | Mapping[str, Any] | None = None,
        partition_method: str = "parameters",
        micro_batches: int | None = None,
        topology: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if topology is not None:
            from lightning_reshape.lightning.pipeline import config_from_topology

            if parallel is not None:
                raise TopologyError(
                    "pass either parallel= or topology= (a DeepSpeed ProcessTopology), not both"
                )
            parallel = config_from_topology(topology)
        if micro_batches is not None and int(micro_batches) < 1:
            raise TopologyError(f"micro_batches={micro_batches}: expected a positive integer")
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
        # pipeline engine (a LightningModule with configure_pipeline): DeepSpeed's
        # partition_method, micro-batches per step (None: accumulate_grad_batches), topology
        self.partition_method = partition_method
        self.micro_batches = None if micro_batches is None else int(micro_batches)
        self.pipeline_topology = topology
        self.pipeline: Any = None  # this rank's PipelineModule, once built
        self._pipeline_spec: Any = None

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
        if self.pipeline is not None:
            # DeepSpeed builds its PipelineEngine for a PipelineModule; its grid (the module's
            # topology, checked equal to ours) replaces the mpu.
            if self.current_zero_stage > 1:
                raise TopologyError(
                    f"ZeRO stage {self.current_zero_stage}: DeepSpeed's pipeline engine supports "
                    "ZeRO 0 and 1 only; use ReshapeDeepSpeedStrategy(stage=1) with pp"
                )
            model = self.pipeline
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=self._ds_args(),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            mpu=None if self.pipeline is not None else self.mpu,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _refuse_pipeline(self) -> None:
        """pp > 1 needs the model as a layer list: a LightningModule with configure_pipeline."""
        if self.layout is not None and self.layout.pp > 1 and self.pipeline is None:
            raise TopologyError(
                f"pp={self.layout.pp}: DeepSpeed's pipeline engine needs the model as a layer "
                "list; implement configure_pipeline() on the LightningModule (see "
                "lightning_reshape.lightning.PipelineLightningModule), or set pp=1"
            )

    # ---------------------------------------------------------------- pipeline engine

    def _wants_pipeline(self) -> bool:
        module = self.lightning_module
        return module is not None and callable(getattr(module, "configure_pipeline", None))

    def setup(self, trainer: Any) -> None:
        if self._wants_pipeline():
            if self.pipeline is None:
                self._build_pipeline()
            self._init_config_if_needed()
            self._pipeline_batch_config()
        super().setup(trainer)

    def _build_pipeline(self) -> None:
        """Build this rank's PipelineModule from the module's hook, on our layout, and hang it
        on the LightningModule (``module.pipeline``) so configure_optimizers sees its
        parameters and Lightning moves it with the module."""
        from lightning_reshape.lightning.pipeline import build_pipeline_module

        assert self.layout is not None and self.lightning_module is not None
        module = self.lightning_module
        spec = module.configure_pipeline()
        self.pipeline = build_pipeline_module(
            spec,
            self.layout,
            self.parallel_state,
            self.global_rank,
            partition_method=self.partition_method,
            topology=self.pipeline_topology,
        )
        self._pipeline_spec = spec
        module.pipeline = self.pipeline

    def _pipeline_micro_batches(self) -> int:
        if self.micro_batches is not None:
            return self.micro_batches
        assert self.lightning_module is not None
        return int(self.lightning_module.trainer.accumulate_grad_batches)

    def _pipeline_batch_config(self) -> None:
        """One Lightning step = one ``train_batch`` over the loader's batch cut into
        micro-batches. Set after the config is formatted (``configure_model`` formats it before
        the pipeline exists) and from the loader's batch size, so it can run again."""
        assert isinstance(self.config, dict) and self.layout is not None
        micro = self._pipeline_micro_batches()
        rows = self._auto_select_batch_size()
        if rows % micro:
            raise TopologyError(
                f"the loader's batch of {rows} rows does not split into {micro} micro-batches; "
                f"make the batch size a multiple of {micro}"
            )
        self.config["gradient_accumulation_steps"] = micro
        self.config["train_micro_batch_size_per_gpu"] = rows // micro
        self.config["train_batch_size"] = rows * self.layout.dp

    def run_pipeline(self, batch: Any, *, train: bool) -> torch.Tensor:
        """One global step of the pipeline on this rank's batch (see ``pipeline_step``)."""
        from lightning_reshape.lightning.pipeline import micro_batches_of

        if self.pipeline is None:
            raise TopologyError(
                "pipeline_step() needs the pipeline engine: the LightningModule must implement "
                "configure_pipeline()"
            )
        split = self._pipeline_spec.split_batch
        pair = split(batch) if split is not None else tuple(batch)
        if len(pair) != 2:
            raise TopologyError(
                f"the pipeline batch must be (inputs, labels); got {len(pair)} items; give "
                "PipelineLayers(split_batch=...) to build the pair"
            )
        engine = self.deepspeed_engine
        micro = engine.micro_batches
        chunks = micro_batches_of((pair[0], pair[1]), micro)
        if train:
            return engine.train_batch(iter(chunks))
        return engine.eval_batch(iter(chunks), num_micro_batches=micro)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipeline is None:
            return super().training_step(*args, **kwargs)
        # PipelineEngine refuses forward(): the module's step calls run_pipeline itself.
        assert self.lightning_module is not None
        with self.precision_plugin.train_step_context():
            return self.lightning_module.training_step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipeline is None:
            return super().validation_step(*args, **kwargs)
        assert self.lightning_module is not None
        with self.precision_plugin.val_step_context():
            return self.lightning_module.validation_step(*args, **kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any):
        if self.pipeline is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        # train_batch has run every backward already; keep Lightning's hooks around it.
        assert self.lightning_module is not None
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        return self.precision_plugin.post_backward(closure_loss, self.lightning_module)

    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        if self.pipeline is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        # The closure runs training_step, i.e. train_batch, which steps the optimizer (with
        # DeepSpeed's gradient clipping); LR schedulers stay Lightning's, as for DeepSpeed.
        model = model or self.lightning_module
        result = closure()
        self.precision_plugin._after_closure(model, optimizer)
        return result

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        if self.pipeline is not None:
            raise TopologyError(
                "trainer.validate/test/predict outside fit is not supported with the pipeline "
                "engine; validation inside Trainer.fit works (val_dataloaders)"
            )
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
        # ZeRO-3 partitions each parameter over the data-parallel group, not the world: zero.Init
        # takes that group only as ``data_parallel_group`` (its ``mpu`` is not used for it), and
        # without it a tp rank's parameters were split over the tp ranks too.
        dp_group = self.mpu.get_data_parallel_group() if self.mpu is not None else None
        with deepspeed.zero.Init(
            enabled=self.zero_stage_3,
            remote_device=self.remote_device,
            config_dict_or_path=self.config,
            mpu=self.mpu,
            data_parallel_group=dp_group,
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
        extra: dict[str, Any] = {
            "world_size": layout.world_size,
            "order": layout.order,
            "cp": layout.cp,
        }
        if self.pipeline is not None:
            # Each stage sees only its own layers: the record joins every stage's splits.
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, splits)
            for part in gathered:
                splits.update(part)
            extra["pipeline"] = self._pipeline_record()
        return Sidecar(
            tp=layout.tp,
            pp=layout.pp,
            dp=layout.dp,
            zero_stage=self.current_zero_stage,
            tp_splits=splits,
            extra=extra,
        )

    def _pipeline_record(self) -> dict[str, Any]:
        """What a stock pipeline checkpoint does not say: how many layers, which are modules
        (they have a layer file, even without parameters), where the stages cut."""
        from deepspeed.pipe import TiedLayerSpec

        pipe = self.pipeline
        specs = list(pipe._layer_specs)
        # TiedLayerSpec: every layer using a key holds (and optimizes) the tied module; a stock
        # checkpoint does not say which layers those are
        ties: dict[str, dict[str, list[int]]] = {}
        for i, spec in enumerate(specs):
            if isinstance(spec, TiedLayerSpec):
                tie = ties.setdefault(spec.key, {"layers": [], "module_layers": []})
                tie["layers"].append(i)
                if spec.forward_fn is None:
                    tie["module_layers"].append(i)
        return {
            "num_layers": len(specs),
            "module_layers": [i for i, s in enumerate(specs) if _is_module_layer(s)],
            "parts": [int(x) for x in pipe.parts],
            "partition_method": self.partition_method,
            "ties": ties,
        }

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
            rank_zero_info(
                f"lightning-reshape: layout unchanged ({current.describe()}, ZeRO "
                f"{current.zero_stage}): DeepSpeed loads {checkpoint_path} as saved"
            )
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
        if policy.direct:
            reason = self._direct_unsupported(policy)
            if reason is None:
                return self._load_direct(checkpoint_path, saved, current, policy, start)
            rank_zero_info(
                f"lightning-reshape: loading {checkpoint_path} through a reshaped copy: the direct "
                f"load cannot serve this run ({reason})"
            )
        target = self._reshaped_dir(checkpoint_path, current, policy)
        # every rank marks the copy in use from before it is written or checked until its
        # engine has loaded it: another job's keep_old=False cleanup keeps it meanwhile
        with hold_in_use(target):
            reused = self._reshape(checkpoint_path, target, current, policy)
            seconds = time.perf_counter() - start
            zero_note = ""
            if saved.zero_stage != current.zero_stage:
                zero_note = f" (ZeRO {current.zero_stage})"
            size = _human_bytes(disk_usage(Path(target))) if self.is_global_zero else ""
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
            _delete_other_copies(target)
        self.barrier("lightning_reshape_loaded")
        return client_state

    def _fitting(self) -> bool:
        assert self.lightning_module is not None
        return self.lightning_module.trainer.state.fn == TrainerFn.FITTING

    def _direct_unsupported(self, policy: ReshapePolicy) -> str | None:
        """Why DeepSpeed's own load on this engine cannot be served from the plan (None: it can)."""
        from lightning_reshape.checkpoint.direct import direct_unsupported_reason

        if policy.verify:
            return "AutoReshape(verify=True), which checks a reshaped copy"
        return direct_unsupported_reason(
            self.deepspeed_engine, load_optimizer_states=self._fitting()
        )

    def _plan(self, source: str, current: SavedTopology, policy: ReshapePolicy) -> Any:
        """The reshape plan to this run's layout (metadata only), built on every rank; the copy
        path writes it."""
        from lightning_reshape.checkpoint import convert

        return self._on_all(
            lambda: self._checked(
                convert.plan_conversion(source, **self._plan_args(current, policy))
            ),
            source,
            current,
        )

    def _checked(self, plan: Any) -> Any:
        """``plan`` once this rank's planned parameter shapes are the model's own: a wrong
        tensor-parallel split (a hand-edited sidecar) is refused by name before anything is
        loaded or written, not met as torch's size mismatch inside DeepSpeed's load."""
        from lightning_reshape.checkpoint.target_shapes import check_target_shapes

        rank = self._rank_coordinates()
        if rank is not None and self.layout is not None:
            tp_rank, pp_stage, _ = rank
            shapes = {
                name: tuple(getattr(p, "ds_shape", None) or p.shape)
                for name, p in self.deepspeed_engine.module.named_parameters()
            }
            check_target_shapes(plan, pp_stage * self.layout.tp + tp_rank, shapes)
        return plan

    def _plan_args(self, current: SavedTopology, policy: ReshapePolicy) -> dict[str, Any]:
        return {
            "tp": current.tp,
            "pp": current.pp,
            "dp": current.dp,
            "zero_stage": current.zero_stage,
            "trust": policy.trust_checkpoint,
            "tp_rules": policy.tp_rules,
            **self._pipeline_target(),
        }

    def _rank_plan(self, source: str, current: SavedTopology, policy: ReshapePolicy) -> Any:
        """The direct path's plan: this rank's own files (planning does not grow with the world
        size) and a planner for any other file DeepSpeed asks for; or the whole plan when the
        rank's file coordinates are not known."""
        from lightning_reshape.checkpoint import convert

        rank = self._rank_coordinates()
        args = self._plan_args(current, policy)
        if rank is None:
            return self._plan(source, current, policy), None

        def plan() -> tuple[Any, Any]:
            own, plan_file = convert.plan_rank_load(source, rank, **args)
            return self._checked(own), plan_file

        return self._on_all(plan, source, current)

    def _rank_coordinates(self) -> tuple[int, int, int] | None:
        """(tp rank, pp stage, dp rank) of this rank, as DeepSpeed names its files; None when
        context or expert parallelism puts more than dp in DeepSpeed's data-parallel group."""
        layout = self.layout
        if layout is None or layout.cp != 1 or layout.ep != 1:
            return None
        rank = self.global_rank
        return (
            layout.group_of(rank, "tp").index(rank),
            layout.group_of(rank, "pp").index(rank),
            self.dp_rank,
        )

    def _load_direct(
        self,
        checkpoint_path: str,
        saved: SavedTopology,
        current: SavedTopology,
        policy: ReshapePolicy,
        start: float,
    ) -> dict[str, Any]:
        """Path (b): the copy path's plan, served to DeepSpeed's own load by the engine sink
        (checkpoint/direct.py): each rank reads only the source slices it needs; no copy."""
        from lightning_reshape.checkpoint.direct import load_direct

        assert self.lightning_module is not None
        plan, plan_file = self._rank_plan(checkpoint_path, current, policy)
        client_state = self._on_all(
            lambda: load_direct(
                self.deepspeed_engine,
                plan,
                load_optimizer_states=self._fitting(),
                load_lr_scheduler_states=False,
                load_module_strict=self.lightning_module.strict_loading,
                plan_file=plan_file,
            ),
            checkpoint_path,
            current,
        )
        seconds = time.perf_counter() - start
        zero_note = ""
        if saved.zero_stage != current.zero_stage:
            zero_note = f" (ZeRO {current.zero_stage})"
        rank_zero_info(
            f"lightning-reshape: checkpoint {checkpoint_path} saved at {saved.describe()} "
            f"(ZeRO {saved.zero_stage}), resuming at {current.describe()}{zero_note}: loaded "
            f"directly in {seconds:.1f} s (no copy written)"
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
        any rank is raised on every rank, so nobody waits forever at a barrier, and the partial
        folder is removed. Rank 0 holds the output's lock throughout: a second job resuming the
        same checkpoint at the same layout waits, then checks and reuses this copy. A complete
        copy is reused only if every file matches its recorded size and CRC-32; damaged files
        are written again.
        """
        from lightning_reshape.checkpoint import convert

        plan = self._plan(source, current, policy)
        tag = plan.source_tag
        workers = max(1, policy.workers)
        held: list[Any] = []  # rank 0: the output's lock, held until the copy is complete

        def claim() -> tuple[Path, bool]:
            held.append(convert.lock_output(target, tag))  # another job writing it: wait
            return convert.prepare_output(plan, target, tag, workers=workers)

        def finish() -> None:
            if not complete:
                convert.finalize_output(plan, target, tag, latest=True, workers=workers)
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

        try:
            part, complete = self._on_zero(claim, source, current)
            if not complete:
                mine = plan.shard(self.global_rank, self.world_size)
                self._on_all(
                    lambda: convert.execute_plan(plan, part, only_files=mine, workers=workers),
                    source,
                    current,
                )
            self._on_zero(finish, source, current)
        except ReshapeError:
            if held:  # rank 0 owns the partial folder: a failed write frees its space
                convert.discard_partial(target, tag)
            raise
        finally:
            for lock in held:
                lock.release()
        return bool(complete)

    def _pipeline_target(self) -> dict[str, Any]:
        """The target stages exactly as this run's PipelineModule cut them."""
        if self.pipeline is None:
            return {}
        from lightning_reshape.lightning.pipeline import partition_boundaries

        return {"pp_partition": partition_boundaries(self.pipeline)}

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


def _is_module_layer(spec: Any) -> bool:
    """A layer DeepSpeed writes a file for: a module or a LayerSpec, not a plain function
    (a TiedLayerSpec with a forward_fn is saved as its module only where it is first built)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if isinstance(spec, TiedLayerSpec):
        return spec.forward_fn is None
    return isinstance(spec, (Module, LayerSpec))


def _same(a: SavedTopology, b: SavedTopology) -> bool:
    return (a.tp, a.pp, a.dp, a.zero_stage) == (b.tp, b.pp, b.dp, b.zero_stage)


def _delete_other_copies(keep: str) -> None:
    """keep_old=False: remove the sibling ``reshaped-*`` copies we wrote earlier, never the
    original checkpoint, and never a copy another job is loading or writing (those are kept,
    with a line each; checkpoint/copies.py says how that is known)."""
    done = remove_other_copies(keep, RESHAPED_PREFIX)
    if done.removed:
        n = len(done.removed)
        rank_zero_info(
            f"lightning-reshape: removed {n} older reshaped cop{'y' if n == 1 else 'ies'} beside "
            f"it ({_human_bytes(done.freed)} freed; only the newest copy is kept: "
            "AutoReshape(keep_old=True) keeps them all, output_dir=... puts copies elsewhere)"
        )
    for path, why in done.kept:
        rank_zero_info(f"lightning-reshape: kept the older reshaped copy {path}: {why}")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
