"""Post-training: TRL's SFT, DPO and GRPO as one ordered chain of stages, and GRPO's reward functions."""

from flywheel.posttrain.chain import PosttrainResult, StageResult, posttrain

__all__ = ["PosttrainResult", "StageResult", "posttrain"]
