"""DeepSpeed's pipeline engine inside an ordinary ``Trainer.fit``.

Why: the pipeline engine (``PipelineModule`` / ``PipelineEngine``) runs forward, backward and the
optimizer step of a whole global batch in one call, ``engine.train_batch(data_iter)``, and
refuses ``forward``/``backward``/``step``. Lightning's loop calls exactly those. So a
LightningModule declares its model as a layer list through one hook, :meth:`configure_pipeline`
(see :class:`PipelineLightningModule`), the strategy builds the ``PipelineModule`` on the
strategy's own layout, and the module's ``training_step`` calls :func:`pipeline_step`, which
runs ``train_batch`` on the step's batch cut into micro-batches; the strategy makes Lightning's
backward and optimizer step no-ops for this engine. Everything else (``self.log``, validation
through ``eval_batch``, LR schedulers, checkpoints, resume) stays Lightning's.

The engine is used at every pp, pp = 1 included, so one LightningModule trains at any
(tp, pp, dp) and its checkpoints always have DeepSpeed's pipeline layout (layer files), which
``lightning-reshape`` moves between pipeline degrees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_reshape.errors import TopologyError
from lightning_reshape.topology import ParallelConfig, ParallelLayout

__all__ = [
    "PipelineLayers",
    "PipelineLightningModule",
    "build_pipeline_module",
    "deepspeed_topology",
    "micro_batches_of",
    "pipeline_step",
]

#: our axis name -> DeepSpeed's ProcessTopology axis name
_DS_AXES = {"pp": "pipe", "dp": "data", "tp": "model"}


@dataclass
class PipelineLayers:
    """What :meth:`PipelineLightningModule.configure_pipeline` returns.

    Args:
        layers: the model as a sequence: ``nn.Module`` instances, DeepSpeed ``LayerSpec`` /
            ``TiedLayerSpec`` (built only on the stage that holds them), or plain functions.
            The output of each layer is the input of the next.
        loss_fn: ``loss_fn(outputs, labels) -> scalar`` on the last stage.
        split_batch: turns the loader's batch into ``(inputs, labels)``; default: the batch is
            already such a pair.
        activation_checkpoint_interval: DeepSpeed's activation checkpointing granularity.
    """

    layers: Sequence[Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    split_batch: Callable[[Any], tuple[Any, Any]] | None = None
    activation_checkpoint_interval: int = 0


class PipelineLightningModule(pl.LightningModule):
    """A LightningModule trained by DeepSpeed's pipeline engine at any (tp, pp, dp).

    Implement :meth:`configure_pipeline` (and ``configure_optimizers`` over
    ``self.parameters()``); the default ``training_step`` / ``validation_step`` run the pipeline
    on the batch and log ``train_loss`` / ``val_loss``. Override them to log more, calling
    :func:`pipeline_step` for the loss. The built ``PipelineModule`` (this rank's stage) is
    ``self.pipeline`` once the strategy has set up.
    """

    def configure_pipeline(self) -> PipelineLayers:
        """The layer list and loss function; called once, after ``configure_model``, when the
        strategy's process groups exist (``self.trainer.strategy.parallel_state`` gives the
        tensor-parallel group for layers split inside a stage)."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_pipeline()")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = pipeline_step(self, batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = pipeline_step(self, batch)
        self.log("val_loss", loss, prog_bar=True)
        return loss


def pipeline_step(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """Run the whole pipeline on this step's batch: ``train_batch`` while training (forward,
    backward and optimizer step of every micro-batch), ``eval_batch`` otherwise. Returns the
    loss averaged over micro-batches and data-parallel ranks, the same on every rank."""
    strategy = module.trainer.strategy
    run = getattr(strategy, "run_pipeline", None)
    if run is None:
        raise TopologyError(
            f"{type(module).__name__}: the pipeline engine needs lightning-reshape's strategy; "
            "train with strategy=ReshapeDeepSpeedStrategy(...) (or 'deepspeed_reshape_stage_1')"
        )
    return run(batch, train=module.trainer.training)


def micro_batches_of(pair: tuple[Any, Any], count: int) -> list[tuple[Any, Any]]:
    """Cut ``(inputs, labels)`` (tensors, or tuples of tensors) into ``count`` micro-batches
    along dim 0."""

    def size(x: Any) -> int:
        return int(x.shape[0]) if torch.is_tensor(x) else size(x[0])

    def cut(x: Any, i: int, per: int) -> Any:
        if torch.is_tensor(x):
            return x[i * per : (i + 1) * per]
        return type(x)(cut(t, i, per) for t in x)

    rows = size(pair[0])
    if rows % count:
        raise TopologyError(
            f"a batch of {rows} rows does not split into {count} micro-batches; make the "
            f"loader's batch size a multiple of {count} (micro_batches / accumulate_grad_batches)"
        )
    per = rows // count
    return [(cut(pair[0], i, per), cut(pair[1], i, per)) for i in range(count)]


def deepspeed_topology(layout: ParallelLayout) -> Any:
    """DeepSpeed's ``ProcessTopology`` with the same rank placement as ``layout``.

    Megatron's order lists the fastest axis first, DeepSpeed's axes the slowest first, so the
    axes are the order reversed (``tp-dp-pp`` -> ``pipe, data, model``, DeepSpeed's
    ``PipeModelDataParallelTopology``)."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    if layout.cp != 1 or getattr(layout, "ep", 1) != 1:
        raise TopologyError(
            f"{layout.describe()}: DeepSpeed's pipeline engine has no context or expert axis; "
            "use cp=1 and ep=1 with pp"
        )
    sizes = {"tp": layout.tp, "dp": layout.dp, "pp": layout.pp}
    tokens = [t for t in layout.order.split("-") if t in _DS_AXES]
    axes = [_DS_AXES[t] for t in reversed(tokens)]
    dims = [sizes[t] for t in reversed(tokens)]
    return ProcessTopology(axes=axes, dims=dims)


def config_from_topology(topology: Any) -> ParallelConfig:
    """The ``ParallelConfig`` of a DeepSpeed ``ProcessTopology`` (axes pipe, data, model)."""
    names = {v: k for k, v in _DS_AXES.items()}
    unknown = [a for a in topology.get_axis_names() if a not in names]
    if unknown:
        raise TopologyError(
            f"topology axes {topology.get_axis_names()}: {unknown[0]!r} is not one of "
            "'pipe', 'data', 'model'; pass a PipeModelDataParallelTopology or a ParallelConfig"
        )
    order = [names[a] for a in reversed(topology.get_axis_names())]
    for axis in ("tp", "dp", "pp"):
        if axis not in order:
            order.append(axis)
    return ParallelConfig(
        tp=_dim(topology, "model"),
        pp=_dim(topology, "pipe"),
        dp=_dim(topology, "data"),
        order="-".join(order),
    )


def _dim(topology: Any, axis: str) -> int:
    return int(topology.get_dim(axis)) if axis in topology.get_axis_names() else 1


def check_topology(topology: Any, state: Any, rank: int) -> None:
    """The pipeline's stage, data and model ranks must be ParallelState's, or the layer files
    and the ZeRO shards would be written under another rank's name."""
    coord = topology.get_coord(rank)
    ours = {
        "pipe": state.get_pipeline_model_parallel_rank(),
        "data": state.get_data_parallel_rank(),
        "model": state.get_tensor_model_parallel_rank(),
    }
    theirs = {a: int(getattr(coord, a, 0)) for a in ours}
    if theirs != ours:
        raise TopologyError(
            f"rank {rank}: the pipeline topology places it at {theirs} but the strategy's "
            f"layout {state.layout.describe()} at {ours}; pass a topology with the layout's "
            "rank order (or none: the strategy builds it)"
        )


def build_pipeline_module(
    spec: PipelineLayers,
    layout: ParallelLayout,
    state: Any,
    rank: int,
    *,
    partition_method: str = "parameters",
    topology: Any = None,
) -> Any:
    """This rank's ``PipelineModule``: the stage of ``spec.layers`` that the layout gives it."""
    from deepspeed.pipe import PipelineModule

    if not isinstance(spec, PipelineLayers):
        raise TopologyError(
            f"configure_pipeline() returned {type(spec).__name__}; return "
            "PipelineLayers(layers=[...], loss_fn=...)"
        )
    if len(spec.layers) < layout.pp:
        raise TopologyError(
            f"{len(spec.layers)} pipeline layers cannot fill pp={layout.pp} stages; use "
            f"pp <= {len(spec.layers)}"
        )
    topology = deepspeed_topology(layout) if topology is None else topology
    check_topology(topology, state, rank)
    return PipelineModule(
        layers=list(spec.layers),
        topology=topology,
        loss_fn=spec.loss_fn,
        partition_method=partition_method,
        activation_checkpoint_interval=spec.activation_checkpoint_interval,
    )


def partition_boundaries(module: Any) -> str:
    """The built module's stage boundaries as ``convert``'s explicit ``pp_partition``."""
    return ",".join(str(int(x)) for x in module.parts)
