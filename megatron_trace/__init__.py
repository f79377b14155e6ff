"""megatron-trace: TRACE (token-routed self-distillation + GRPO) on Megatron-Core.

Data flow, one subpackage per stage: rollout -> rewards -> annotate -> (routing in loss) -> loss -> train -> rollout
(weight sync). `distributed`, `models` and `checkpoint` are the Megatron foundation under all of them.
"""

__version__ = "0.1.0"
