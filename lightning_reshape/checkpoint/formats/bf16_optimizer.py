"""DeepSpeed's BF16_Optimizer: when DeepSpeed uses it, and how its files differ from ZeRO 1/2.

Why: with bf16 and fp32 gradient accumulation at ZeRO 1 (the Megatron-DeepSpeed recipe), or bf16
in the pipeline engine at ZeRO 0, DeepSpeed wraps the optimizer in its BF16_Optimizer instead of
its ZeRO optimizer. Its files (``bf16_zero_pp_rank_D_mp_rank_XX_optim_states.pt``) hold the same
flat partitions as ZeRO 1 (:mod:`zero12`) with the tail padding kept, ``clip_grad`` as the only
loss-scale entry, and no ``zero_stage`` or ``param_alignment_paddings``: the stage is the
config's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["configured_stage", "uses_bf16_optimizer"]


def uses_bf16_optimizer(config: Mapping[str, Any], stage: int, pipeline: bool) -> bool:
    """Whether DeepSpeed (``engine._do_optimizer_sanity_check``) wraps the optimizer in its
    BF16_Optimizer for this config and stage: bf16 with fp32 gradient accumulation at ZeRO 1
    without offload (the Megatron-DeepSpeed recipe), or bf16 in the pipeline engine at ZeRO 0."""
    bf16 = config.get("bf16") or config.get("bfloat16") or {}
    if not (isinstance(bf16, Mapping) and bf16.get("enabled")):
        return False
    accum = str((config.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    fp32_accum = accum in ("fp32", "float32", "float", "torch.float32")
    zcfg = config.get("zero_optimization") or {}
    offload = (zcfg.get("offload_optimizer") or {}).get("device") not in (None, "none")
    if stage == 1:
        return fp32_accum and not offload
    return stage == 0 and pipeline and not fp32_accum


def configured_stage(optim_sd: Any, model_sd: Mapping[str, Any]) -> int:
    """``zero_optimization.stage`` of the config saved with the files (0 when absent): the
    BF16_Optimizer does not record its stage."""
    for sd in (optim_sd, model_sd):
        cfg = sd.get("ds_config") if isinstance(sd, Mapping) else None
        if isinstance(cfg, Mapping):
            zcfg = cfg.get("zero_optimization") or {}
            if isinstance(zcfg, Mapping):
                return int(zcfg.get("stage", 0) or 0)
    return 0
