"""Rollout engines behind one SGLang-shaped protocol."""

from ascend_rl.rollout.protocol import GenerateOutput, RolloutEngine, SamplingParams

__all__ = ["GenerateOutput", "RolloutEngine", "SamplingParams"]
