"""DeepSpeed's checkpoint formats, one module each, read side and write side together.

Why: a new format (ZeRO 0, MoE experts) should be one new module, not edits in four places.
:mod:`model_states` (``mp_rank_XX_model_states.pt``), :mod:`zero12` (ZeRO 1/2 flat partitions),
:mod:`zero3` (ZeRO 3 partitions and sub-groups), :mod:`zero0` (the whole optimizer in the model
file), :mod:`bf16_optimizer` (DeepSpeed's BF16_Optimizer) and :mod:`pipeline` (layer files,
stage cuts, tied layers). The format-free parts live beside them: :mod:`..reader` finds and
loads the files, :mod:`..plan` holds the geometry (targets, copies, the tp resolver) and
dispatches to the formats' write sides.
"""
